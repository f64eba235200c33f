import numpy as np
import pytest

from dit_lens.downstream import DownstreamConfig, f1_score, roc_auc


def test_auc_equals_the_pairwise_definition():
    rng = np.random.default_rng(0)
    scores = np.round(rng.uniform(size=60), 1)  # ties included
    labels = rng.integers(0, 2, size=60)
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairwise = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert roc_auc(scores, labels) == pytest.approx(pairwise)
    assert roc_auc(np.array([0.9, 0.8, 0.1]), np.array([1, 1, 0])) == 1.0
    with pytest.raises(ValueError, match="both positive and negative"):
        roc_auc(np.array([0.1, 0.2]), np.array([1, 1]))


def test_f1():
    scores, labels = np.array([0.9, 0.7, 0.2, 0.6]), np.array([1, 0, 1, 0])
    # predictions 1,1,0,1: tp 1, fp 2, fn 1
    assert f1_score(scores, labels) == pytest.approx(2 / (2 + 2 + 1))
    assert f1_score(np.zeros(3), np.array([1, 0, 1])) == 0.0


def test_config_validation():
    with pytest.raises(ValueError, match="real_per_class"):
        DownstreamConfig(real_per_class=0)
    with pytest.raises(ValueError, match="train_seeds"):
        DownstreamConfig(train_seeds=())
