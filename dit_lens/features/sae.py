"""`SAE`: a trained sparse autoencoder with where it came from, saved and loaded through dit-lens's storage.

A TopK sparse autoencoder (Gao et al. 2024), as EleutherAI's ``sparsify`` defines it (its `SparseCoder`):

    z = TopK(ReLU(W_enc (x − b_dec) + b_enc))        (features,), k of them non-zero
    x̂ = W_decᵀ z + b_dec                             W_dec (features, C), unit-norm rows

on the token activations ``x (C,)`` of one site (``attn2``: the cross-attention output) at some blocks and
denoising steps of one model. The wrapper keeps the coder frozen beside its provenance: the capture store it
was trained on (its content key and prompts, the training and held-out seeds), the model fingerprint, the
site, blocks and steps, every training setting and its quality on held-out seeds (`fvu`, dead and dense
feature rates). `SAE.save` writes all of it as one safetensors file sealed by a digest over tensors *and*
metadata, in a folder claimed through `dit_lens.storage`; `load_sae` refuses a file whose digest fails.

Training is `dit_lens.features.train.train_sae`. ``sparsify`` is an optional dependency
(``pip install 'dit-lens[sae]'``), imported only when an SAE is built.

Examples:
    >>> import tempfile, torch
    >>> sae = SAE.new(d_in=8, k=2, expansion=2, seed=0, site="attn2", layers=(0,), steps=(0, 1),
    ...               model_fingerprint="demo")
    >>> x = torch.randn(5, 8)                        # (tokens, C)
    >>> z = sae.encode(x)                            # (tokens, features)
    >>> z.shape, int((z > 0).sum(-1).max()) <= 2
    (torch.Size([5, 16]), True)
    >>> sae.decode(z).shape
    torch.Size([5, 8])
    >>> back = load_sae(sae.save(tempfile.mkdtemp() + "/sae"))
    >>> torch.equal(back.decode(back.encode(x)), sae.decode(z)), back.digest == sae.digest
    (True, True)
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, TYPE_CHECKING

import torch

from ..storage import DamagedError, claim, exclusive, read_tensors, write_tensors
from ..storage.records import digest, jsonable

if TYPE_CHECKING:
    from ..model.lens import Lens

__all__ = ["SAE", "SAE_FILE", "SAE_KIND", "load_sae", "require_sparsify", "write_sae"]

#: The claimed folder's kind and the file that holds the SAE in it.
SAE_KIND = "sae"
SAE_FILE = "sae.safetensors"
_FORMAT = "dit-lens.sae/1"
_TENSORS = ("encoder.weight", "encoder.bias", "W_dec", "b_dec")


def require_sparsify() -> Any:
    """The ``sparsify`` package (EleutherAI's sparse autoencoders), imported quietly, or a clear ImportError."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints a note about Triton on import
            import sparsify
    except ImportError as err:
        raise ImportError(f"sparse autoencoders need EleutherAI's sparsify library ({err}); install it with "
                          f"pip install 'dit-lens[sae]'") from None
    return sparsify


@dataclass(frozen=True, eq=False)
class SAE:
    """A trained TopK sparse autoencoder of one site, with its provenance and quality.

    Attributes:
        coder: The ``sparsify.SparseCoder`` (float32, CPU, no gradients).
        site: The site it reads (``"attn2"``).
        layers: The blocks whose tokens it was trained on.
        steps: The denoising steps (indices of a run of ``store["num_inference_steps"]`` steps) it was trained on.
        model_fingerprint: The weights' fingerprint (`dit_lens.Lens.fingerprint`) of the model it reads.
        store: The capture store it was trained on: ``capture_key``, ``path``, ``prompts``, ``train_seeds``,
            ``held_out_seeds``, ``num_inference_steps``, ``guidance_scale``, and the model's provenance.
        settings: Every training setting (``kind``, ``k``, ``expansion``, ``tokens``, ``batch_size``, ``lr``,
            ``seed``, ...).
        quality: Measured on the held-out seeds' tokens: ``fvu``, ``dead_rate``, ``dense_rate``, ``tokens``.
        folder: Where it is saved (None until saved or loaded).
    """

    coder: Any = field(repr=False)
    site: str
    layers: tuple[int, ...]
    steps: tuple[int, ...]
    model_fingerprint: str
    store: Mapping[str, Any] = field(default_factory=dict, repr=False)
    settings: Mapping[str, Any] = field(default_factory=dict, repr=False)
    quality: Mapping[str, Any] = field(default_factory=dict, repr=False)
    folder: Path | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
        object.__setattr__(self, "steps", tuple(int(x) for x in self.steps))
        for p in self.coder.parameters():
            p.requires_grad_(False)

    @classmethod
    def new(cls, *, d_in: int, k: int, expansion: int, seed: int, kind: str = "topk", **fields: Any) -> "SAE":
        """A freshly initialised SAE (sparsify's initialisation, seeded; the global RNG is left untouched)."""
        sparsify = require_sparsify()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            coder = sparsify.SparseCoder(int(d_in), sparsify.SparseCoderConfig(
                activation=kind, expansion_factor=int(expansion), k=int(k), normalize_decoder=True))
        return cls(coder.float().eval(), **fields)

    # -- what it computes -------------------------------------------------------------------

    @property
    def num_features(self) -> int:
        return int(self.coder.num_latents)

    @property
    def width(self) -> int:
        """The channels C of the activations it reads."""
        return int(self.coder.d_in)

    @property
    def k(self) -> int:
        return int(self.coder.cfg.k)

    @property
    def fvu(self) -> float:
        """Fraction of variance unexplained on the held-out seeds' tokens (NaN when not measured)."""
        return float(self.quality.get("fvu", float("nan")))

    @property
    def dead_rate(self) -> float:
        """Share of features never active on the held-out tokens."""
        return float(self.quality.get("dead_rate", float("nan")))

    @property
    def dense_rate(self) -> float:
        """Share of features active on more than 10% of the held-out tokens."""
        return float(self.quality.get("dense_rate", float("nan")))

    @property
    def W_dec(self) -> torch.Tensor:  # noqa: N802 (the paper's name)
        """Decoder directions ``(features, C)``, unit norm."""
        return self.coder.W_dec.detach()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations ``(..., features)`` (float32, k non-zero per token) of activations ``(..., C)``."""
        if x.shape[-1] != self.width:
            raise ValueError(f"the SAE reads {self.width} channels, got activations of shape {tuple(x.shape)}")
        flat = x.reshape(-1, self.width).to(dtype=torch.float32, device=self.coder.device)  # (tokens, C)
        with torch.no_grad():
            acts, indices, _ = self.coder.encode(flat)  # (tokens, k) each
            z = torch.zeros(flat.shape[0], self.num_features, dtype=torch.float32, device=flat.device)
            z.scatter_(1, indices, acts.float())  # (tokens, features)
        return z.reshape(*x.shape[:-1], self.num_features)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Reconstructions ``(..., C)`` of feature activations ``(..., features)``: ``z @ W_dec + b_dec``."""
        if z.shape[-1] != self.num_features:
            raise ValueError(f"the SAE has {self.num_features} features, got activations of shape {tuple(z.shape)}")
        with torch.no_grad():
            return z.float() @ self.W_dec + self.coder.b_dec.detach()

    def check_features(self, features: Any, name: str = "features") -> tuple[int, ...]:
        """`features` (an index or indices) as a sorted tuple, each in ``0 … num_features − 1``."""
        import numbers

        values = (features,) if isinstance(features, numbers.Integral) else tuple(features)
        if not values or not all(isinstance(f, numbers.Integral) and not isinstance(f, bool) for f in values):
            raise ValueError(f"{name} must be a feature index or a non-empty list of them, got {features!r}")
        outside = [int(f) for f in values if not 0 <= int(f) < self.num_features]
        if outside:
            raise ValueError(f"{name} {outside} out of range: this SAE has {self.num_features} features "
                             f"(indices 0..{self.num_features - 1})")
        return tuple(sorted({int(f) for f in values}))

    def check_fits(self, lens: Lens, site: str | None = None, name: str = "the SAE") -> None:
        """Refuse a lens or site this SAE was not trained on (other weights, another site, another width)."""
        if lens.fingerprint != self.model_fingerprint:
            raise ValueError(f"{name} was trained on the model with fingerprint {self.model_fingerprint}, not this "
                             f"one ({lens.fingerprint}, {lens.provenance().get('model_source')}); its features mean "
                             f"nothing here: train an SAE on a capture of this model (dit_lens.train_sae)")
        if site is not None and site != self.site:
            raise ValueError(f"{name} was trained on site {self.site!r}, not {site!r}; use site={self.site!r} or "
                             f"train an SAE on a capture of {site!r}")
        if lens.width != self.width:
            raise ValueError(f"{name} reads {self.width} channels, the model's {self.site} gives {lens.width}")

    # -- as a file --------------------------------------------------------------------------

    def metadata(self) -> dict:
        """Everything but the tensors, as saved (JSON values)."""
        return jsonable({
            "format": _FORMAT, "site": self.site, "layers": list(self.layers), "steps": list(self.steps),
            "model_fingerprint": self.model_fingerprint, "store": dict(self.store), "settings": dict(self.settings),
            "quality": dict(self.quality), "d_in": self.width, "sparsify_config": self.coder.cfg.to_dict(),
        })

    def tensors(self) -> dict[str, torch.Tensor]:
        state = self.coder.state_dict()
        return {name: state[name].detach().cpu().contiguous() for name in _TENSORS}

    @property
    def digest(self) -> str:
        """The digest over tensors and metadata that `save` seals the file with."""
        return digest(self.metadata(), self.tensors())

    def identity(self) -> dict:
        """What the claimed folder is made for: the SAE's provenance and settings (not its values)."""
        meta = self.metadata()
        return {key: meta[key] for key in ("site", "layers", "steps", "model_fingerprint", "settings")} | {
            "store": meta["store"].get("capture_key")}

    def save(self, folder: str | Path, *, overwrite: bool = False) -> Path:
        """Write the SAE into `folder` (claimed for it: new, empty, or a dit-lens SAE folder made for the same
        provenance and settings; `overwrite` replaces one made for others). Returns the folder."""
        folder = Path(folder)
        with exclusive(folder):
            write_sae(self, claim(folder, SAE_KIND, identity=self.identity(), overwrite=overwrite, what="SAE folder"))
        return folder

    def at(self, folder: Path) -> "SAE":
        """This SAE, recorded as saved in `folder`."""
        return replace(self, folder=Path(folder))


def write_sae(sae: SAE, claimed: Any) -> str:
    """Write `sae` into a folder claimed for it (`dit_lens.storage.claim`, lock held); returns its digest."""
    claimed.record(SAE_FILE)
    return write_tensors(Path(claimed.path) / SAE_FILE, sae.tensors(), sae.metadata())


def load_sae(folder: str | Path) -> SAE:
    """Read an SAE written by `SAE.save` (or `train_sae`), checked against its digest (tensors and metadata).

    Raises:
        dit_lens.storage.MissingError: no SAE in `folder`.
        dit_lens.storage.DamagedError: the file is truncated, not dit-lens's, or fails its digest.
    """
    folder = Path(folder)
    fix = "train it again with dit_lens.train_sae (or restore the folder from a copy)"
    tensors, meta = read_tensors(folder / SAE_FILE, what="the SAE", fix=fix)
    if meta.get("format") != _FORMAT or set(tensors) != set(_TENSORS):
        raise DamagedError(f"{folder / SAE_FILE} is not a dit-lens SAE (format {meta.get('format')!r}); {fix}")
    sparsify = require_sparsify()
    config = sparsify.SparseCoderConfig.from_dict(meta["sparsify_config"], drop_extra_fields=True)
    coder = sparsify.SparseCoder(int(meta["d_in"]), config)
    coder.load_state_dict(tensors)
    sae = SAE(coder.float().eval(), site=meta["site"], layers=meta["layers"], steps=meta["steps"],
              model_fingerprint=meta["model_fingerprint"], store=meta["store"], settings=meta["settings"],
              quality=meta["quality"], folder=folder)
    if sae.digest != digest(meta, tensors):  # what was read is what is served
        raise DamagedError(f"{folder / SAE_FILE} does not rebuild the SAE it describes; {fix}")
    return sae
