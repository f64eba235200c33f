"""Features: sparse autoencoders trained on capture stores (`sae`, `train`) and their feature maps (`maps`)."""

from .maps import feature_dashboard, sae_features, store_feature_means, top_features
from .sae import SAE, load_sae
from .train import train_sae

__all__ = ["SAE", "feature_dashboard", "load_sae", "sae_features", "store_feature_means", "top_features",
           "train_sae"]
