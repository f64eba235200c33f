"""Procedural Kvasir-like endoscopy images: 8 classes, each with lesion and anatomy masks.

Every image is a pure function of (label, seed, split). Three anatomies carry the classes:
colon (cecum, polyps, dyed lifted polyps, dyed resection margins, ulcerative colitis), stomach
(pylorus) and oesophagus (z-line, esophagitis). Lighting, texture, viewpoint and lesion placement
vary with the seed; the ``"shifted"`` split draws lighting and texture from other ranges, as an
out-of-distribution test set.

Examples:
    >>> s = render(["polyps", "normal cecum"], [0, 0])
    >>> s.images.shape, s.lesion.shape, bool(s.lesion[0].any()), bool(s.lesion[1].any())
    ((2, 64, 64, 3), (2, 64, 64), True, False)
    >>> bool((render(["polyps"], [3]).images == render(["polyps"], [3]).images).all())
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

__all__ = ["LABELS", "SPLITS", "CONTEXTS", "Samples", "render", "caption"]

#: The 8 Kvasir v3 classes, in the oracle's output order.
LABELS = (
    "normal cecum",
    "normal pylorus",
    "normal z-line",
    "polyps",
    "dyed lifted polyps",
    "dyed resection margins",
    "esophagitis",
    "ulcerative colitis",
)
SPLITS = ("train", "shifted")
#: Caption phrasings used in training ("{}" is the label); the first is the canonical caption.
CONTEXTS = (
    "An endoscopic image of {}",
    "A colonoscopy photograph of {}",
    "An endoscopy frame showing {}",
    "A medical endoscopic view of {}",
)
SIZE = 64
_ANATOMY = {"normal pylorus": "stomach", "normal z-line": "oesophagus", "esophagitis": "oesophagus"}


def caption(label: str, context: int = 0) -> str:
    return CONTEXTS[context].format(label)


@dataclass(frozen=True)
class Samples:
    """A batch of world samples.

    Attributes:
        images: ``(N, H, W, 3)`` float32 in [0, 1].
        lesion: ``(N, H, W)`` bool, pathology pixels (empty for the normal classes).
        anatomy: ``(N, H, W)`` bool, the class's anatomical landmark (lumen, ring or z-line).
        labels: the N labels.
        captions: the N canonical captions.
    """

    images: np.ndarray
    lesion: np.ndarray
    anatomy: np.ndarray
    labels: tuple[str, ...]
    captions: tuple[str, ...]


def render(labels, seeds, *, split: str = "train", size: int = SIZE) -> Samples:
    """Render one sample per (label, seed) pair."""
    labels, seeds = list(labels), [int(s) for s in seeds]
    if len(labels) != len(seeds):
        raise ValueError(f"render() needs one seed per label, got {len(labels)} labels, {len(seeds)} seeds")
    for label in labels:
        if label not in LABELS:
            raise ValueError(f"unknown label {label!r}; expected one of {LABELS}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    out = [_one(label, seed, split, size) for label, seed in zip(labels, seeds)]
    return Samples(
        images=np.stack([o[0] for o in out]).astype(np.float32),
        lesion=np.stack([o[1] for o in out]),
        anatomy=np.stack([o[2] for o in out]),
        labels=tuple(labels),
        captions=tuple(caption(label) for label in labels),
    )


def _noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    field = gaussian_filter(rng.standard_normal((size, size)), sigma, mode="wrap")
    return field / (field.std() + 1e-8)


def _blob(rng, yy, xx, cy, cx, ry, rx, angle, rough: float = 0.0, noise=None) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    u = ((xx - cx) * c + (yy - cy) * s) / rx
    v = (-(xx - cx) * s + (yy - cy) * c) / ry
    d = np.sqrt(u**2 + v**2)
    if rough and noise is not None:
        d = d + rough * noise
    return d


def _one(label: str, seed: int, split: str, size: int):
    index = LABELS.index(label)
    rng = np.random.default_rng([seed, index, SPLITS.index(split)])
    shifted = split == "shifted"
    ax = np.linspace(-1, 1, size)
    yy, xx = np.meshgrid(ax, ax, indexing="ij")
    anatomy_kind = _ANATOMY.get(label, "colon")
    lesion = np.zeros((size, size), bool)

    # viewpoint: lumen position and rotation
    ly, lx = rng.uniform(-0.45, 0.45, 2)
    theta = rng.uniform(0, 2 * np.pi)
    dl = np.sqrt((yy - ly) ** 2 + (xx - lx) ** 2)
    ang = np.arctan2(yy - ly, xx - lx)
    tex = _noise(rng, size, rng.uniform(3.5, 6.0) if shifted else rng.uniform(1.5, 3.0))
    fine = _noise(rng, size, 0.8)

    if anatomy_kind == "colon":
        base = np.array([0.86, 0.52, 0.44]) + rng.normal(0, 0.03, 3)
        folds = 0.5 + 0.5 * np.cos(rng.uniform(9, 13) * dl + 0.6 * np.sin(2 * ang + theta))
        img = base[None, None] * (0.82 + 0.18 * folds[..., None])
        vessels = np.abs(_noise(rng, size, 1.2)) < 0.12
        img = img * np.where(vessels[..., None], np.array([0.88, 0.8, 0.85]), 1.0)
        lumen = np.exp(-(dl / rng.uniform(0.22, 0.3)) ** 2)
        anatomy = dl < 0.25
        if label == "normal cecum":  # appendiceal orifice: a dark crescent beside the lumen
            oa = theta
            oy, ox = ly + 0.5 * np.sin(oa), lx + 0.5 * np.cos(oa)
            od = _blob(rng, yy, xx, oy, ox, 0.05, 0.16, oa + np.pi / 2)
            img = img * (1 - 0.55 * np.exp(-(od**2) * 3))[..., None]
            anatomy = anatomy | (od < 1)
    elif anatomy_kind == "stomach":
        base = np.array([0.9, 0.62, 0.4]) + rng.normal(0, 0.03, 3)
        radial = 0.5 + 0.5 * np.cos(rng.integers(7, 11) * ang + 2.0 * dl)
        ring = np.exp(-((dl - 0.28) / 0.08) ** 2)
        img = base[None, None] * (0.78 + 0.14 * radial[..., None] * (dl < 0.7)[..., None] + 0.2 * ring[..., None])
        lumen = np.exp(-(dl / 0.13) ** 2)
        anatomy = dl < 0.36
    else:  # oesophagus: pale squamous mucosa above a wavy z-line, red gastric mucosa below
        c, s = np.cos(theta * 0.25), np.sin(theta * 0.25)
        along = (xx - lx) * c + (yy - ly) * s
        across = -(xx - lx) * s + (yy - ly) * c
        wave = 0.12 * np.sin(rng.uniform(5, 8) * along + rng.uniform(0, 6)) + 0.05 * tex
        z = across - 0.3 - wave
        t = 1 / (1 + np.exp(-z * 25))
        pale = np.array([0.88, 0.76, 0.72]) + rng.normal(0, 0.02, 3)
        red = np.array([0.78, 0.3, 0.26]) + rng.normal(0, 0.02, 3)
        img = pale[None, None] * (1 - t[..., None]) + red[None, None] * t[..., None]
        lumen = np.exp(-(dl / 0.2) ** 2)
        anatomy = np.abs(z) < 0.08
        if label == "esophagitis":  # red streaks running from the z-line into the pale mucosa
            streaks = np.zeros((size, size))
            for _ in range(rng.integers(3, 6)):
                a0 = rng.uniform(-0.8, 0.8)
                width = rng.uniform(0.05, 0.09)
                length = rng.uniform(0.35, 0.6)
                sd = np.exp(-(((along - a0) / width) ** 2)) * ((across < 0.3) & (across > 0.3 - length))
                streaks = np.maximum(streaks, sd)
            streaks = streaks * (1 - t)
            img = img * (1 - 0.9 * streaks[..., None]) + np.array([0.85, 0.15, 0.12]) * 0.9 * streaks[..., None]
            lesion = streaks > 0.4

    img = img * (1 + 0.05 * tex[..., None] + 0.025 * fine[..., None])
    img = img * (1 - 0.85 * lumen[..., None])

    if label in ("polyps", "dyed lifted polyps"):
        pa = rng.uniform(0, 2 * np.pi)
        pr = rng.uniform(0.5, 0.7)
        py, px = ly + pr * np.sin(pa), lx + pr * np.cos(pa)
        py, px = np.clip(py, -0.55, 0.55), np.clip(px, -0.55, 0.55)
        ry, rx = rng.uniform(0.2, 0.32, 2)
        d = _blob(rng, yy, xx, py, px, ry, rx, rng.uniform(0, np.pi), 0.08, _noise(rng, size, 3))
        dome = np.sqrt(np.clip(1 - d**2, 0, 1))
        inside = d < 1
        shade = 0.75 + 0.35 * dome - 0.2 * ((yy - py) / ry).clip(-1, 1) * inside
        colour = np.array([0.82, 0.36, 0.34])  # the same polyp with or without dye: separable concepts
        if label == "dyed lifted polyps":  # lifted on an indigo-stained submucosal cushion
            halo = _blob(rng, yy, xx, py, px, ry * 1.7, rx * 1.7, 0, 0.25, _noise(rng, size, 2.5)) < 1
            stain = np.array([0.3, 0.38, 0.78])
            img = np.where((halo & ~inside)[..., None], img * 0.35 + stain * 0.65, img)
            lesion = lesion | halo
        img = np.where(inside[..., None], colour * shade[..., None] * (1 + 0.04 * fine[..., None]), img)
        hy, hx = py - 0.4 * ry, px - 0.3 * rx
        spec = np.exp(-(((yy - hy) ** 2 + (xx - hx) ** 2) / (0.3 * min(ry, rx)) ** 2))
        img = img + 0.7 * spec[..., None] * inside[..., None]
        lesion = lesion | inside
    elif label == "dyed resection margins":
        pa = rng.uniform(0, 2 * np.pi)
        py, px = np.clip(ly + 0.5 * np.sin(pa), -0.5, 0.5), np.clip(lx + 0.5 * np.cos(pa), -0.5, 0.5)
        ry, rx = rng.uniform(0.3, 0.42, 2)
        d = _blob(rng, yy, xx, py, px, ry, rx, rng.uniform(0, np.pi), 0.3, _noise(rng, size, 2))
        stained = d < 1
        wound = d < 0.45
        stain = np.array([0.28, 0.35, 0.76]) * (0.9 + 0.1 * tex[..., None])
        img = np.where(stained[..., None], img * 0.3 + stain * 0.7, img)
        img = np.where(wound[..., None], np.array([0.85, 0.82, 0.8]) * (0.9 + 0.08 * fine[..., None]), img)
        lesion = stained
    elif label == "ulcerative colitis":
        patches = _noise(rng, size, 3.5) > rng.uniform(0.0, 0.4)
        inflamed = np.array([0.82, 0.22, 0.2])
        img = np.where(patches[..., None], img * 0.4 + inflamed * 0.6 * (1 + 0.15 * fine[..., None]), img)
        spots = (_noise(rng, size, 1.0) > 1.9) & patches
        img = np.where(spots[..., None], np.array([0.95, 0.93, 0.85]), img)
        lesion = patches

    # lighting: vignette, colour temperature, brightness
    if shifted:
        gain = np.array([1.0, 0.95, 1.12]) * rng.uniform(0.75, 0.95)
        vignette = rng.uniform(0.45, 0.7)
        gamma = rng.uniform(1.15, 1.4)
    else:
        gain = np.array([1.05, 1.0, 0.96]) * rng.uniform(0.92, 1.1)
        vignette = rng.uniform(0.15, 0.35)
        gamma = rng.uniform(0.9, 1.1)
    cy, cx = rng.uniform(-0.2, 0.2, 2)
    light = 1 - vignette * ((yy - cy) ** 2 + (xx - cx) ** 2) / 2
    img = np.clip(img * light[..., None] * gain, 0, 1) ** gamma
    return img, lesion, anatomy
