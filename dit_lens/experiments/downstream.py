"""Downstream utility of counterfactuals: a binary polyp detector trained on real + synthetic images.

Arms, each trained with several seeds and tested on the embedded world's *shifted* split, where the
positives are the source class and the negatives come from every label in ``test_negatives`` (by
default the colon's other findings: a polyp detector must not fire on colitis or a resection scar,
which the training negatives — the target class only — never show):
- ``real``: real images only (``real_per_class`` per class);
- ``reprompt``: plus K synthetic positives (source prompt) and K negatives (target prompt, same seeds);
- ``pnp``: plus K Plug-and-Play pairs (the source prompt's image, and its DDIM inversion edited
  toward the target prompt with feature and self-attention injection);
- ``hedit``: plus K h-Edit-D pairs (the same originals, inverted and edited by h-Edit);
- ``medsteer``: plus K counterfactual pairs (unsteered positive, steered negative, same seed).
Every synthetic set is the pairs of a registered method (`dit_lens.methods`): each arm adds its
method's K originals as positives and its K counterfactuals as negatives, so the sets are
quantity-matched. PnP and h-Edit run at their registered default settings, with
``inversion_steps`` DDIM steps. Reports AUC and F1 with bootstrap intervals over seeds, and the AUC
gain of ``medsteer`` over each of ``reprompt``, ``pnp`` and ``hedit`` paired by training seed (all
arms see the same real images, initialisation and batch order for a seed, so the pairing removes the
detector's own seed-to-seed spread).

A result folder's ``synthetic.npz`` holds ``{arm}_unsteered`` and ``{arm}_steered`` per synthetic
arm, sealed by ``synthetic.json`` (the arms and the arrays' digest). A set without that record (an
earlier version's, or one changed by hand) is refused, never completed or changed: the message says
which files to delete to make it again.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
import xarray as xr

from .. import metrics as M
from ..interventions.blend import check_blend
from ..trace.attrs import typed
from ..validate import check_int
from ..storage import DamagedError, claim, digest, exclusive, read_record, write_atomic, write_record

if TYPE_CHECKING:
    from ..model.lens import Lens

__all__ = ["DownstreamConfig", "roc_auc", "f1_score", "train_detector", "run_downstream", "synthetic_pairs"]

ARMS = ("real", "reprompt", "pnp", "hedit", "medsteer")
#: The arms MedSteer is compared with, paired by training seed (``auc_gain_medsteer_vs_<arm>``).
BASELINES = ("reprompt", "pnp", "hedit")
#: The synthetic set and its sealed record in a result folder.
SYNTHETIC, SYNTHETIC_RECORD = "synthetic.npz", "synthetic.json"
#: The first synthetic seed (disjoint from the vector seeds and the real images' seeds).
SYNTHETIC_SEED_BASE = 20_000


@dataclass(frozen=True)
class DownstreamConfig:
    source: str = "polyps"
    target: str = "normal cecum"
    real_per_class: int = 20
    synthetic_per_class: int = 64
    test_per_class: int = 200
    test_negatives: tuple[str, ...] = ("normal cecum", "ulcerative colitis", "dyed resection margins")
    train_seeds: tuple[int, ...] = tuple(range(16))
    detector_steps: int = 300
    alpha: float = 3.0
    window: tuple[float, float] = (0.0, 1.0)
    blend: float = 0.0
    vector_seeds: int = 32
    num_inference_steps: int = 20
    guidance_scale: float = 4.5
    inversion_steps: int = 50  # PnP and h-Edit: DDIM steps of the inversion and the edit

    def __post_init__(self) -> None:
        for name in ("real_per_class", "synthetic_per_class", "test_per_class", "detector_steps", "vector_seeds"):
            if getattr(self, name) < 1:
                raise ValueError(f"DownstreamConfig.{name} must be >= 1")
        if not self.train_seeds:
            raise ValueError("DownstreamConfig.train_seeds needs at least one seed")
        object.__setattr__(self, "inversion_steps",
                           check_int(self.inversion_steps, "DownstreamConfig.inversion_steps", minimum=1))
        object.__setattr__(self, "train_seeds", tuple(int(s) for s in self.train_seeds))
        object.__setattr__(self, "test_negatives", tuple(str(x) for x in self.test_negatives))
        from ..world.procedural import LABELS

        unknown = [x for x in (self.source, self.target, *self.test_negatives) if x not in LABELS]
        if unknown:
            raise ValueError(f"DownstreamConfig labels {unknown} are not world classes; expected some of {LABELS}")
        if not self.test_negatives or self.source in self.test_negatives:
            raise ValueError(f"DownstreamConfig.test_negatives must name negative classes other than the source "
                             f"{self.source!r}, got {self.test_negatives}")
        object.__setattr__(self, "window", tuple(float(x) for x in self.window))
        object.__setattr__(self, "blend", check_blend(self.blend))

    def context(self) -> dict:
        """Every setting but the training seeds: runs that share it share their finished cells."""
        data = json.loads(json.dumps(asdict(self)))
        data.pop("train_seeds")
        return data

    def key(self, lens: Lens) -> str:
        """Names the default result folder: changes with the settings (not the seed list) or the model."""
        blob = json.dumps({"config": self.context(), "model": lens.fingerprint}, sort_keys=True)
        return hashlib.blake2b(blob.encode(), digest_size=6).hexdigest()


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (the Mann–Whitney U statistic, ties counted half)."""
    from scipy.stats import mannwhitneyu

    pos, neg = scores[labels == 1], scores[labels == 0]
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("AUC needs both positive and negative examples")
    return float(mannwhitneyu(pos, neg).statistic / (len(pos) * len(neg)))


def f1_score(scores: np.ndarray, labels: np.ndarray, threshold: float = 0.5) -> float:
    predicted = scores >= threshold
    tp = float((predicted & (labels == 1)).sum())
    fp = float((predicted & (labels == 0)).sum())
    fn = float((~predicted & (labels == 1)).sum())
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def train_detector(images: np.ndarray, labels: np.ndarray, *, seed: int, steps: int = 300):
    """A small CNN (the oracle's architecture, 2 classes) trained with the world's augmentation.

    Returns a callable mapping images ``(N, H, W, 3)`` in [0, 1] to p(positive) ``(N,)``.
    """
    from ..world.judges import OracleNet, as_batch, augment
    from ..world.train import StageConfig, fit

    torch.manual_seed(seed)
    net = OracleNet(16, num_classes=2)
    x_all, y_all = as_batch(images, "train_detector"), torch.as_tensor(labels, dtype=torch.long)
    cfg = StageConfig(steps=steps, batch_size=min(64, len(x_all)), lr=1e-3, warmup=min(30, steps // 5), seed=seed)

    def loss(idx, gen):
        return F.cross_entropy(net(augment(x_all[idx], gen)), y_all[idx])

    net = fit(net, cfg, loss, len(x_all), log=lambda *_: None, name="detector")

    @torch.no_grad()
    def detect(batch: np.ndarray) -> np.ndarray:
        x = as_batch(batch, "detector")
        return torch.softmax(net(x), dim=1)[:, 1].numpy()

    return detect


def run_downstream(cfg: DownstreamConfig, lens: Lens, folder: Path, *, progress: bool = True,
                   overwrite: bool = False) -> xr.Dataset:
    """Run (or resume) every (arm, seed); returns AUC/F1 per arm with intervals over seeds.

    The folder is claimed for every setting but the training seeds and for the model's weights (more
    or other training seeds reuse the finished cells); with `overwrite`, a downstream folder of other
    settings is replaced (only what dit-lens wrote there)."""
    from ..world.procedural import render

    folder = Path(folder)
    with exclusive(folder):
        claimed_ = claim(folder, "downstream", identity=identity(cfg, lens), overwrite=overwrite,
                         what="the downstream folder")
        claimed_.record("downstream.json", "cells", SYNTHETIC, SYNTHETIC_RECORD)
        write_record(folder / "downstream.json", {"config": asdict(cfg), "model_fingerprint": lens.fingerprint})
    k = cfg.synthetic_per_class
    with exclusive(folder / ".locks" / SYNTHETIC):  # made once; others wait, then read it
        synthetic = _synthetic(folder, cfg, lens, progress=progress)
    n_real, n_test = cfg.real_per_class, cfg.test_per_class
    real = render([cfg.source] * n_real + [cfg.target] * n_real, list(range(500, 500 + n_real)) * 2).images
    real_y = np.array([1] * n_real + [0] * n_real)
    test, test_y, test_label = _test_set(cfg)
    arms = {"real": (real, real_y)}
    for arm in ARMS[1:]:  # real images, the method's originals (positives) and its counterfactuals (negatives)
        arms[arm] = (np.concatenate([real, *synthetic[arm]]), np.concatenate([real_y, [1] * k, [0] * k]))
    results: dict = {}
    for arm, (x, y) in arms.items():
        for seed in cfg.train_seeds:
            path = folder / "cells" / f"{arm}_seed{seed}.json"
            with exclusive(folder / ".locks" / path.name):  # one process per cell; the others reuse it
                if not path.exists():
                    _write_record(path, _train_and_test(x, y, seed, cfg, test, test_y, test_label))
                    if progress:
                        record = _read_record(path)
                        print(f"downstream {arm} seed {seed}: AUC {record['auc']:.4f} F1 {record['f1']:.4f}")
            results[(arm, seed)] = _read_record(path)
    data = {}
    for metric in ("auc", "f1"):
        per_seed = np.array([[results[(a, s)][metric] for s in cfg.train_seeds] for a in ARMS])
        est = [M.estimate(row) for row in per_seed]
        data[metric] = (("arm",), [e.value for e in est])
        data[f"{metric}_low"] = (("arm",), [e.low for e in est])
        data[f"{metric}_high"] = (("arm",), [e.high for e in est])
        data[f"{metric}_per_seed"] = (("arm", "train_seed"), per_seed)
    per_seed_auc = np.array([[results[(a, s)]["auc"] for s in cfg.train_seeds] for a in ARMS])
    for baseline in BASELINES:  # paired by training seed
        paired = M.estimate(per_seed_auc[ARMS.index("medsteer")] - per_seed_auc[ARMS.index(baseline)])
        data[f"auc_gain_medsteer_vs_{baseline}"] = ((), paired.value)
        data[f"auc_gain_medsteer_vs_{baseline}_low"] = ((), paired.low)
        data[f"auc_gain_medsteer_vs_{baseline}_high"] = ((), paired.high)
    by_negative = np.array([[np.mean([results[(a, s)]["auc_by_negative"][label] for s in cfg.train_seeds])
                             for label in cfg.test_negatives] for a in ARMS])
    data["auc_by_negative"] = (("arm", "negative"), by_negative)
    ds = xr.Dataset(data, coords={"arm": list(ARMS), "train_seed": list(cfg.train_seeds),
                                  "negative": list(cfg.test_negatives)})
    ds.attrs.update(lens.provenance())
    ds.attrs.update(config=typed(asdict(cfg)), folder=str(folder),
                    synthetic_per_class=k, real_per_class=n_real,
                    test=f"shifted split: {n_test * len(cfg.test_negatives)} {cfg.source}; {n_test} each of "
                    + ", ".join(cfg.test_negatives))
    return ds


def synthetic_pairs(cfg: DownstreamConfig, lens: Lens, *, arms: tuple[str, ...] | None = None,
                    progress: bool = False) -> dict[str, tuple]:
    """Each synthetic arm's pairs from its registered method: ``{arm: (originals, counterfactuals)}``,
    images ``(K, H, W, 3)``, for `arms` (default: every synthetic arm). MedSteer steers at the
    config's window, α and blend with the vector from ``vector_seeds`` seeds; re-prompting is
    unblended; PnP and h-Edit edit the source prompt's images at their default settings with
    ``inversion_steps`` DDIM steps."""
    from ..methods import MethodContext, Vectors, get
    from ..world.domain import endoscopy_pair

    pair = endoscopy_pair(cfg.source, cfg.target)
    seeds = [SYNTHETIC_SEED_BASE + i for i in range(cfg.synthetic_per_class)]
    vectors = Vectors(lens, seeds=cfg.vector_seeds, num_inference_steps=cfg.num_inference_steps,
                      guidance_scale=cfg.guidance_scale, batch_size=None)
    context = MethodContext(num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
                            batch_size=8, vectors=vectors, progress=progress)
    settings = {"reprompt": {"blend": 0.0},
                "pnp": {"inversion_steps": cfg.inversion_steps},
                "hedit": {"inversion_steps": cfg.inversion_steps},
                "medsteer": {"window": cfg.window, "alpha": cfg.alpha, "blend": cfg.blend,
                             "vector_seeds": cfg.vector_seeds}}
    unknown = [a for a in (arms or ()) if a not in ARMS[1:]]
    if unknown:
        raise ValueError(f"synthetic_pairs: unknown arms {unknown}; the synthetic arms are {list(ARMS[1:])}")
    synthetic = {}
    for arm in [a for a in ARMS[1:] if arms is None or a in arms]:
        out = get(arm).run(lens, pair, seeds, settings[arm], context=context)
        synthetic[arm] = tuple(out["image"].sel(branch=b).values[0] for b in ("original", "edited"))
    return synthetic


def _train_and_test(x, y, seed: int, cfg: DownstreamConfig, test, test_y, test_label) -> dict:
    """One (arm, seed) cell: train the detector, score the test set, AUC and F1 (overall and per negative)."""
    detector = train_detector(x, y, seed=seed, steps=cfg.detector_steps)
    scores = detector(test)
    return {"auc": roc_auc(scores, test_y), "f1": f1_score(scores, test_y),
            "auc_by_negative": {label: roc_auc(scores[(test_y == 1) | (test_label == label)],
                                               test_y[(test_y == 1) | (test_label == label)])
                                for label in cfg.test_negatives}}


def _write_record(path: Path, record: dict) -> None:
    """A sealed cell file, written atomically."""
    write_record(path, record)


def _read_record(path: Path) -> dict:
    """A cell file, checked against its digest."""
    return read_record(path, what="downstream cell", fix="delete that file to recompute the cell")


def _synthetic(folder: Path, cfg: DownstreamConfig, lens: Lens, *, progress: bool) -> dict[str, tuple]:
    """Every synthetic arm's pairs ``{arm: (unsteered, steered)}``: read back, or made and stored.

    The caller holds the set's lock. The record is written before the arrays, so a crash in between leaves a
    record without its arrays (made again) and never arrays without a record (refused as not this version's).
    """
    path, record_path = folder / SYNTHETIC, folder / SYNTHETIC_RECORD
    if path.exists():
        return _read_synthetic(folder, cfg)
    made = synthetic_pairs(cfg, lens, arms=ARMS[1:], progress=progress)
    arrays = {f"{arm}_{branch}": np.ascontiguousarray(images, dtype=np.float32)
              for arm, pair in made.items() for branch, images in zip(_BRANCHES, pair)}
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    write_record(record_path, {"arms": list(ARMS[1:]), "arrays_digest": digest({}, arrays)})
    write_atomic(path, buffer.getvalue())
    return _read_synthetic(folder, cfg)


_BRANCHES = ("unsteered", "steered")


def _read_synthetic(folder: Path, cfg: DownstreamConfig) -> dict[str, tuple]:
    """The stored synthetic set, checked against its record (arms, digest) and the config (pairs, shape)."""
    path, record_path = folder / SYNTHETIC, folder / SYNTHETIC_RECORD
    fix = f"delete {path} and {record_path.name} (and {path.name}.digest if there is one) to make the set again"
    if not record_path.exists():
        raise DamagedError(f"{path} has no record {record_path.name} beside it: an earlier dit-lens (or a hand) wrote "
                           f"it, and this version reads only the sets it sealed; {fix}. Nothing was changed.")
    record = read_record(record_path, what="the synthetic set's record", fix=fix)
    try:
        with np.load(path, allow_pickle=False) as stored:
            arrays = {name: stored[name] for name in stored.files}
    except (OSError, ValueError) as err:
        raise DamagedError(f"{path} is unreadable ({type(err).__name__}: {err}); {fix}") from None
    names = sorted(f"{arm}_{branch}" for arm in ARMS[1:] for branch in _BRANCHES)
    if record.get("arms") != list(ARMS[1:]) or sorted(arrays) != names:
        raise DamagedError(f"{path} holds {sorted(arrays)} for the arms {record.get('arms')}, not the arms "
                           f"{list(ARMS[1:])} this version compares; {fix}")
    if record.get("arrays_digest") != digest({}, arrays):
        raise DamagedError(f"{path} fails its digest (changed after dit-lens wrote it); {fix}")
    k = cfg.synthetic_per_class
    shapes = {name: arrays[name].shape for name in names}
    if len(set(shapes.values())) != 1 or any(len(s) != 4 or s[0] != k or s[-1] != 3 for s in shapes.values()):
        raise ValueError(f"{path}: the synthetic pairs have shapes {shapes}, not one shape ({k}, H, W, 3) as "
                         f"synthetic_per_class = {k} needs; {fix}")
    return {arm: tuple(arrays[f"{arm}_{branch}"] for branch in _BRANCHES) for arm in ARMS[1:]}


def _test_set(cfg: DownstreamConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The shifted-split test set: as many positives as negatives, `test_per_class` per negative label."""
    from ..world.procedural import render

    n, negatives = cfg.test_per_class, cfg.test_negatives
    labels = [cfg.source] * (n * len(negatives)) + [x for x in negatives for _ in range(n)]
    seeds = list(range(900_000, 900_000 + n * len(negatives))) + list(range(900_000, 900_000 + n)) * len(negatives)
    images = render(labels, seeds, split="shifted").images
    return images, (np.array(labels) == cfg.source).astype(int), np.array(labels)


def identity(cfg: DownstreamConfig, lens: Lens) -> dict:
    """What a downstream folder is claimed for: every setting but the training seeds, and the model's weights."""
    return {"config": cfg.context(), "model_fingerprint": lens.fingerprint}
