"""Bg-LPIPS: the optional perceptual background metric, computed only when its packages and backbone
weights are on this machine (nothing is downloaded); otherwise NaN with a status naming what is missing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

from .pairs import LPIPS_UNAVAILABLE, _pairwise

__all__ = ["LPIPS_BACKBONES", "MetricUnavailableError", "background_lpips", "lpips_unavailable"]

#: The torchvision backbone weights each LPIPS net loads (the ``lpips`` package ships only its linear
#: layers); they must already be in ``$TORCH_HOME/hub/checkpoints/`` (``torch.hub.get_dir()``).
LPIPS_BACKBONES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth",
                   "squeeze": "squeezenet1_1-b8a52dc0.pth"}


def lpips_unavailable(net: str = "alex") -> str | None:
    """Why LPIPS with `net` cannot run here (a text starting with "unavailable"), or None when it can.

    Nothing is downloaded: the packages and the backbone file must be on this machine already."""
    from importlib.util import find_spec

    if net not in LPIPS_BACKBONES:
        raise ValueError(f"LPIPS net must be one of {list(LPIPS_BACKBONES)}, got {net!r}")
    missing = [m for m in ("lpips", "torchvision") if find_spec(m) is None]
    if missing:
        return (f"unavailable: the {' and '.join(missing)} package{'s are' if len(missing) > 1 else ' is'} not "
                f"installed (pip install lpips torchvision)")
    import torch

    weights = Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_BACKBONES[net]
    if not weights.is_file():
        return f"{LPIPS_UNAVAILABLE}: {weights} (torchvision's {net} backbone) is missing; copy it there to enable LPIPS"
    return None


class MetricUnavailableError(RuntimeError):
    """A metric cannot be computed on this machine; the message says what is missing."""


def background_lpips(out: xr.Dataset, background: xr.DataArray, *, net: str = "alex",
                     unavailable: str = "raise") -> xr.DataArray:
    """Spatial LPIPS between the pair averaged over background pixels ``(prompt, seed)``.

    Needs the ``lpips`` and ``torchvision`` packages and the backbone's weights already on disk
    (`lpips_unavailable` names the file). When they are not available it raises
    `MetricUnavailableError` saying why; with ``unavailable="nan"`` (what studies and the demo use, and
    print the reason) it returns NaN everywhere with ``attrs["status"]`` saying why. Never a substitute
    number under the LPIPS name.
    """
    if unavailable not in ("raise", "nan"):
        raise ValueError(f"unavailable must be 'raise' or 'nan', got {unavailable!r}")
    cells = {k: out[k].values for k in ("prompt", "seed")}
    reason = lpips_unavailable(net)
    if reason is None:
        try:
            import lpips
            import torch

            model = lpips.LPIPS(net=net, spatial=True, verbose=False).eval()
        except Exception as err:  # a damaged weights file, an incompatible torchvision
            reason = f"unavailable: LPIPS failed to load ({type(err).__name__}: {err})"
    if reason is not None and unavailable == "raise":
        raise MetricUnavailableError(f"Bg-LPIPS is {reason}; or pass unavailable='nan' for NaN with this reason "
                                     f"in attrs['status']")
    if reason is not None:
        empty = np.full((len(cells["prompt"]), len(cells["seed"])), np.nan)
        da = xr.DataArray(empty, dims=("prompt", "seed"), coords=cells, name="bg_lpips")
        da.attrs["status"] = reason
        return da

    def one(a: np.ndarray, b: np.ndarray, keep: np.ndarray) -> float:
        if not keep.any():
            return float("nan")
        to = lambda x: torch.from_numpy(x).permute(2, 0, 1)[None].float() * 2 - 1  # noqa: E731
        with torch.no_grad():
            dist = model(to(a), to(b))[0, 0].numpy()  # (H, W)
        return float(dist[keep].mean())

    da = _pairwise(out, background, one, "bg_lpips")
    da.attrs["status"] = f"lpips {net}"
    return da
