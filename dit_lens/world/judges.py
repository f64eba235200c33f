"""The world's judges: an 8-class oracle classifier and two segmenters (lesion, anatomy), small CNNs.

All take images ``(N, H, W, 3)`` float in [0, 1], the call shape every metric uses, so a user's
own classifier or segmenter plugs in the same way. The lesion segmenter finds pathology pixels, the
anatomy segmenter the class's anatomical landmark (lumen, pyloric ring or z-line: `Samples.anatomy`).
They are trained with photometric and geometric augmentation (and on VAE reconstructions) so they
judge generated images, not only the procedural ones; the oracle also sees tinted lumens
(`tint_lumen`), as the generator draws them at high guidance.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..storage import DamagedError, all_finite, read_record, read_tensors, write_record, write_tensors
from ..validate import NonFiniteError
from .procedural import LABELS
from .train import StageConfig, fit, rand, randn

__all__ = ["Oracle", "Segmenter", "OracleNet", "SegmenterNet", "as_batch", "augment", "tint_lumen", "load_oracle",
           "load_segmenter", "load_anatomy_segmenter", "train_oracle", "train_segmenter", "EMBEDDED_JUDGES",
           "SEGMENTER_TARGETS"]

#: Where the shipped judges live (written by ``dit-lens world build``).
EMBEDDED_JUDGES = Path(__file__).resolve().parent.parent / "embedded"
#: A judge's weights (safetensors, with a digest).
WEIGHTS = "weights.safetensors"
#: What a segmenter can find, and the folder of the shipped one under `EMBEDDED_JUDGES`.
SEGMENTER_TARGETS = {"lesion": "segmenter", "anatomy": "anatomy"}


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(4, cout), nn.SiLU())


class OracleNet(nn.Module):
    """Images ``(N, 3, H, W)`` in [-1, 1] → class logits ``(N, num_classes)``."""

    def __init__(self, width: int = 32, num_classes: int = len(LABELS)):
        super().__init__()
        self.config = {"width": width, "num_classes": num_classes}
        w = width
        self.body = nn.Sequential(_conv(3, w), _conv(w, w, 2), _conv(w, 2 * w), _conv(2 * w, 2 * w, 2),
                                  _conv(2 * w, 4 * w), _conv(4 * w, 4 * w, 2), _conv(4 * w, 4 * w))
        self.head = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean((2, 3)))


class SegmenterNet(nn.Module):
    """Images ``(N, 3, H, W)`` in [-1, 1] → mask logits ``(N, H, W)`` (a two-level U-Net)."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.config = {"width": width}
        w = width
        self.enc1, self.enc2 = nn.Sequential(_conv(3, w), _conv(w, w)), nn.Sequential(_conv(w, 2 * w, 2), _conv(2 * w, 2 * w))
        self.mid = nn.Sequential(_conv(2 * w, 4 * w, 2), _conv(4 * w, 4 * w), _conv(4 * w, 4 * w))
        self.dec2 = nn.Sequential(_conv(4 * w + 2 * w, 2 * w), _conv(2 * w, 2 * w))
        self.dec1 = nn.Sequential(_conv(2 * w + w, w), _conv(w, w))
        self.out = nn.Conv2d(w, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        m = self.mid(e2)
        d2 = self.dec2(torch.cat([F.interpolate(m, scale_factor=2.0), e2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, scale_factor=2.0), e1], 1))
        return self.out(d1)[:, 0]


def as_batch(images: Any, name: str) -> torch.Tensor:
    """Images ``(N, H, W, 3)`` float in [0, 1] as the networks' input ``(N, 3, H, W)`` in [-1, 1].

    Args:
        images: The images, any array-like.
        name: Who takes them, named in the error.

    Returns:
        A float32 tensor ``(N, 3, H, W)`` in [-1, 1].

    Raises:
        ValueError: `images` are not of shape ``(N, H, W, 3)`` or not in [0, 1].

    Examples:
        >>> as_batch(np.ones((2, 8, 8, 3)), "the oracle").shape
        torch.Size([2, 3, 8, 8])
        >>> as_batch(np.ones((8, 8, 3)), "the oracle")
        Traceback (most recent call last):
        ...
        ValueError: the oracle takes images of shape (N, H, W, 3) float in [0, 1], got shape (8, 8, 3)
    """
    x = np.asarray(images, dtype=np.float32)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"{name} takes images of shape (N, H, W, 3) float in [0, 1], got shape {x.shape}")
    if x.size and (x.min() < -1e-3 or x.max() > 1 + 1e-3):
        raise ValueError(f"{name} takes images in [0, 1], got values in [{x.min():.3f}, {x.max():.3f}]")
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2) * 2 - 1  # (N, 3, H, W)


def augment(x: torch.Tensor, gen: torch.Generator, masks: torch.Tensor | None = None):
    """Random flips, colour gains, gamma, blur and noise on a batch in [-1, 1] (masks flip along)."""
    n = len(x)
    flip_h = rand((n,), gen, x) < 0.5
    flip_v = rand((n,), gen, x) < 0.5
    x = torch.where(flip_h[:, None, None, None], x.flip(3), x)
    x = torch.where(flip_v[:, None, None, None], x.flip(2), x)
    if masks is not None:
        masks = torch.where(flip_h[:, None, None], masks.flip(2), masks)
        masks = torch.where(flip_v[:, None, None], masks.flip(1), masks)
    img = (x + 1) / 2
    gains = 0.7 + 0.5 * rand((n, 3, 1, 1), gen, x)
    gamma = 0.7 + 0.8 * rand((n, 1, 1, 1), gen, x)
    img = (img * gains).clamp(1e-4, 1) ** gamma
    blurred = F.avg_pool2d(F.pad(img, (1, 1, 1, 1), mode="replicate"), 3, 1)
    blur = rand((n, 1, 1, 1), gen, x)
    img = img * (1 - blur) + blurred * blur
    img = img + 0.03 * rand((n, 1, 1, 1), gen, x) * randn(img.shape, gen, img)
    x = img.clamp(0, 1) * 2 - 1
    return x if masks is None else (x, masks)


def tint_lumen(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Half the batch (in [-1, 1]): the dark pixels (the lumen) get a random, mostly red tint.

    The generator draws the cecum's lumen redder and larger as guidance grows (4.5 and above); an
    oracle that never saw a tinted lumen reads it as a polyp. Training through this makes lumen colour
    carry no class, so the oracle judges the lesion, not the lumen.
    """
    img = (x + 1) / 2
    n = len(img)
    dark = ((0.35 - img.mean(1, keepdim=True)) / 0.35).clamp(0, 1)  # (n, 1, H, W): 1 at black, 0 from 0.35
    tint = torch.stack([0.35 * rand((n,), gen, img), 0.06 * rand((n,), gen, img) - 0.03,
                        0.06 * rand((n,), gen, img) - 0.03], 1)[..., None, None]  # (n, 3, 1, 1)
    on = (rand((n, 1, 1, 1), gen, img) < 0.5).to(img.dtype)
    return (img + on * dark * tint).clamp(0, 1) * 2 - 1


def _fingerprint(net: nn.Module, *extra: str) -> str:
    """Digest of a judge's weights (and what else defines it): two judges that judge alike share it."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(net.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    for item in extra:
        digest.update(item.encode())
    return digest.hexdigest()


class Oracle:
    """The 8-class classifier: ``oracle(images) -> probabilities (N, 8)`` in the order of `labels`."""

    def __init__(self, net: OracleNet, labels=LABELS):
        self.net, self.labels = net.eval(), tuple(labels)

    @property
    def fingerprint(self) -> str:
        """Digest of the weights and labels; studies record it so cells are never reused across judges."""
        return _fingerprint(self.net, "oracle", *self.labels)

    @torch.no_grad()
    def __call__(self, images) -> np.ndarray:
        x = as_batch(images, "the oracle")
        return np.concatenate([torch.softmax(self.net(x[i : i + 256]), 1).numpy() for i in range(0, len(x), 256)]
                              or [np.zeros((0, len(self.labels)), np.float32)])

    @torch.no_grad()
    def features(self, images) -> np.ndarray:
        """The penultimate features ``(N, 4·width)`` of `images` ``(N, H, W, 3)`` in [0, 1]: the pooled
        activations the class head reads, for distances between image sets (`frechet_distance`)."""
        x = as_batch(images, "the oracle")
        width = self.net.head.in_features
        return np.concatenate([self.net.body(x[i : i + 256]).mean((2, 3)).numpy() for i in range(0, len(x), 256)]
                              or [np.zeros((0, width), np.float32)])


class Segmenter:
    """A segmenter: ``segmenter(images) -> bool masks (N, H, W)`` of its `target` ("lesion" or "anatomy")."""

    def __init__(self, net: SegmenterNet, target: str = "lesion"):
        if target not in SEGMENTER_TARGETS:
            raise ValueError(f"a segmenter's target must be one of {list(SEGMENTER_TARGETS)}, got {target!r}")
        self.net, self.target = net.eval(), target

    @property
    def fingerprint(self) -> str:
        """Digest of the weights and target; studies record it so cells are never reused across judges."""
        return _fingerprint(self.net, "segmenter", self.target)

    @torch.no_grad()
    def __call__(self, images) -> np.ndarray:
        x = as_batch(images, "the segmenter" if self.target == "lesion" else f"the {self.target} segmenter")
        return np.concatenate([(self.net(x[i : i + 256]) > 0).numpy() for i in range(0, len(x), 256)]
                              or [np.zeros((0,) + tuple(x.shape[2:]), bool)])


def train_oracle(images: np.ndarray, labels: np.ndarray, cfg: StageConfig, *, device="cpu", log=print) -> Oracle:
    """Train the oracle on `device`; the returned judge runs on the CPU."""
    net = OracleNet().to(device)
    x, y = as_batch(images, "train_oracle").to(device), torch.as_tensor(labels, dtype=torch.long, device=device)
    trained = fit(net, cfg, lambda idx, gen: F.cross_entropy(net(augment(tint_lumen(x[idx], gen), gen)), y[idx]),
                  len(x), log=log, name="oracle")
    return Oracle(trained.cpu())


def train_segmenter(images: np.ndarray, masks: np.ndarray, cfg: StageConfig, *, target: str = "lesion",
                    device="cpu", log=print) -> Segmenter:
    """Train a segmenter of `target` masks ``(N, H, W)`` on `device`; the returned judge runs on the CPU."""
    if target not in SEGMENTER_TARGETS:
        raise ValueError(f"train_segmenter: target must be one of {list(SEGMENTER_TARGETS)}, got {target!r}")
    if np.shape(masks) != np.shape(images)[:3]:
        raise ValueError(f"train_segmenter needs one (H, W) mask per image, got images {np.shape(images)} "
                         f"and masks {np.shape(masks)}")
    net = SegmenterNet().to(device)
    x = as_batch(images, "train_segmenter").to(device)
    m = torch.as_tensor(masks, dtype=torch.float32, device=device)

    def loss(idx, gen):
        xb, mb = augment(x[idx], gen, m[idx])
        logits = net(xb)
        p = torch.sigmoid(logits)
        dice = 1 - (2 * (p * mb).sum() + 1) / (p.sum() + mb.sum() + 1)
        return F.binary_cross_entropy_with_logits(logits, mb) + dice

    name = "segmenter" if target == "lesion" else f"{target} segmenter"
    return Segmenter(fit(net, cfg, loss, len(x), log=log, name=name).cpu(), target)


def save_judge(judge: Oracle | Segmenter, folder: Path) -> None:
    """Write a judge as ``judge.json`` (kind, config, labels or target; sealed) and ``weights.safetensors``
    (its weights, with a digest over them and the same settings), each atomically."""
    folder = Path(folder)
    kind = "oracle" if isinstance(judge, Oracle) else "segmenter"
    meta = {"kind": kind, "config": judge.net.config}
    if kind == "oracle":
        meta["labels"] = list(judge.labels)
    else:
        meta["target"] = judge.target
    if not all_finite(judge.net.state_dict()):
        raise NonFiniteError(f"the {kind}'s weights hold NaN or inf (its training diverged); nothing was written to "
                             f"{folder}; lower the stage's learning rate")
    write_tensors(folder / WEIGHTS, judge.net.state_dict(), meta)
    write_record(folder / "judge.json", meta)


def _a(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def _load(source: str | Path, kind: str, target: str = "lesion"):
    name = kind if kind == "oracle" else SEGMENTER_TARGETS[target]
    what = kind if kind == "oracle" or target == "lesion" else f"{target} segmenter"
    folder = EMBEDDED_JUDGES / name if str(source) == "embedded" else Path(source).expanduser()
    meta_path = folder / "judge.json"
    if not meta_path.is_file():
        hint = "build it with `dit-lens world build`" if str(source) == "embedded" else \
            "pass 'embedded' or a folder written by dit_lens.world.judges.save_judge"
        if str(source) == "embedded" and target == "anatomy":
            hint += " (or only this judge: `python -m dit_lens.world.build anatomy`)"
        raise FileNotFoundError(f"no {what} at {folder} (no judge.json); {hint}")
    fix = "build it again with `dit-lens world build`" if str(source) == "embedded" else \
        "save the judge again with dit_lens.world.judges.save_judge"
    meta = read_record(meta_path, what=f"the {what}'s record", fix=fix, unsealed=True)
    if meta.get("kind") != kind:
        raise ValueError(f"{folder} holds a {meta.get('kind')!r}, not a {kind}")
    held = meta.get("target")
    if kind == "segmenter" and held != target:
        if held not in SEGMENTER_TARGETS:
            raise ValueError(f"{folder} holds a segmenter of unknown target {held!r}; "
                             f"expected one of {list(SEGMENTER_TARGETS)}")
        loader = "load_segmenter" if held == "lesion" else f"load_{held}_segmenter"
        raise ValueError(f"{folder} holds {_a(held)} segmenter, not {_a(target)} segmenter; load it with {loader}()")
    if not (folder / WEIGHTS).is_file() and (folder / "weights.pt").is_file():
        raise ValueError(f"{folder} holds weights.pt, the format of an earlier dit-lens, which this one does not read; "
                         f"judges are rebuilt, not converted: {fix} (the folder was not modified)")
    weights, settings = read_tensors(folder / WEIGHTS, what=f"the {what}'s weights", fix=fix)
    if settings != meta:
        raise DamagedError(f"{folder / 'judge.json'} does not describe the weights beside it ({settings} were "
                           f"saved with them); {fix}")
    net = (OracleNet if kind == "oracle" else SegmenterNet)(**meta["config"])
    net.load_state_dict(weights)
    return Oracle(net, meta["labels"]) if kind == "oracle" else Segmenter(net, target)


def load_oracle(source: str | Path = "embedded") -> Oracle:
    """The 8-class oracle: ``"embedded"`` or a folder saved by `save_judge`."""
    return _load(source, "oracle")


def load_segmenter(source: str | Path = "embedded") -> Segmenter:
    """The lesion segmenter: ``"embedded"`` or a folder saved by `save_judge`."""
    return _load(source, "segmenter")


def load_anatomy_segmenter(source: str | Path = "embedded") -> Segmenter:
    """The anatomy segmenter (lumen, pyloric ring or z-line, as `Samples.anatomy`): ``"embedded"`` or a
    folder saved by `save_judge`.

    Examples:
        >>> from dit_lens.world import render
        >>> masks = load_anatomy_segmenter()(render(["normal z-line"], [100_000]).images)
        >>> masks.shape, masks.dtype
        ((1, 64, 64), dtype('bool'))
    """
    return _load(source, "segmenter", "anatomy")
