"""`invert`: DDIM inversion of images into the trajectory that regenerates them; `regenerate` runs it forward.
Families that sample by flow matching invert their Euler sampler the same way (`dit_lens.sampling.flow`).

Inversion encodes each image to the pipeline's latents z₀ and runs the deterministic DDIM step
backwards, level by level, to the starting noise z_T: step i of the sampler maps level i to level
i + 1 with the prediction ε̂(z_i, t_i); its inverse takes ε̂ at the known latent z_{i+1} instead of the
unknown z_i, the one approximation DDIM inversion makes. The trajectory keeps every level, labelled
by the sampler step whose *input* it is (step 0 is z_T, step T the clean latent), with its timestep
and ᾱ, so an editor can start from any step and replay the source branch level by level.

`regenerate` denoises a trajectory's starting noise through the pipeline's own (nnsight-hooked) loop
with the same DDIM sampler: with the inversion's prompt and guidance it reconstructs the images, and
how far the reconstruction lands from the input is the error every inversion-based editor carries.

A trajectory is sealed: its ``digest`` attribute covers its latents, coordinates and every attribute
(`dit_lens.storage.dataset_digest`), and `regenerate` and `edit` refuse one that changed after `invert`
made it (an edited setting, a removed model fingerprint, scaled or damaged latents). The seal survives
``to_zarr``/``open_zarr`` and ``to_netcdf``/``open_dataset``; to use part of a trajectory, invert
that part.

Examples:
    >>> from dit_lens import load
    >>> from dit_lens.testing import PixArtSpec, build_pixart
    >>> lens = load(build_pixart(PixArtSpec(num_layers=1)))
    >>> images = np.full((2, 16, 16, 3), 0.5, np.float32)
    >>> trajectory = invert(lens, images, "a polyp", num_inference_steps=3, progress=False)
    >>> dict(trajectory["latent"].sizes)
    {'item': 2, 'step': 4, 'channel': 4, 'latent_y': 8, 'latent_x': 8}
    >>> trajectory["timestep"].values.tolist()  # the clean level has no timestep: -1
    [666, 333, 0, -1]
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import xarray as xr
from tqdm.auto import tqdm

from ..model.lens import Lens
from ..storage import DIGEST, DamagedError, dataset_digest
from ..validate import NonFiniteError, check_guidance, check_int
from ..sampling.ddim import GuidedDenoiser, alpha_bars, ddim_move, inversion_scheduler
from ..sampling.flow import flow_move
from ..sampling.images import check_images, decode, encode

__all__ = ["invert", "regenerate", "trajectory_latents"]


def invert(
    lens: Lens,
    images: Any,
    prompt: str,
    *,
    latents: torch.Tensor | None = None,
    num_inference_steps: int = 50,
    guidance_scale: float = 1.0,
    scheduler: Any = None,
    refine: int = 0,
    batch_size: int = 8,
    progress: bool = True,
) -> xr.Dataset:
    """DDIM-invert `images` under `prompt` into the trajectory of latents that regenerates them.

    Args:
        lens: From `dit_lens.load`.
        images: ``(n, H, W, 3)`` (or one ``(H, W, 3)``) RGB at the model's size, float in [0, 1] or
            uint8 (`dit_lens.sampling.images.check_images`).
        prompt: The prompt the images are inverted under.
        latents: Invert these clean latents ``(n, C, h, w)`` (e.g. a run's own, from
            ``output_type="latent"``) instead of encoding images; pass ``images=None``. The VAE's
            encode is not the exact inverse of its decode, so this is the way to invert a generated
            run exactly.
        num_inference_steps: DDIM steps T.
        guidance_scale: Classifier-free guidance while inverting; 1 (the default, the usual choice)
            uses the conditional prediction alone.
        scheduler: A scheduler whose noise schedule to invert on (default: the pipeline's); stochastic
            samplers are refused with the reason (and, on a flow-matching family, any sampler but the
            flow-matching Euler one).
        refine: Fixed-point iterations per step (0: plain DDIM inversion, as the published editors use
            it). Each solves z_i = DDIM-inverse(z_{i+1}, ε̂(z_i)) more exactly, at one more model call.
        batch_size: Images per transformer call.
        progress: Show a progress bar over batches.

    Returns:
        Dataset with ``latent (item, step, channel, latent_y, latent_x)`` float32 (step 0: the
        starting noise z_T; step T: the encoded image z₀), ``input (item, y, x, rgb)`` (the images),
        coords ``timestep (step)`` (-1 for the clean level) and ``alpha_bar (step)`` (``sigma (step)`` for a
        flow-matching family); attrs hold the
        prompt, every setting and the model's provenance.
    """
    if latents is not None:
        if images is not None:
            raise ValueError("give images or latents, not both")
        z0 = _check_latents(latents, lens)
        images = decode(lens, z0)
    else:
        images = check_images(images, lens)
        z0 = None
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    T = check_int(num_inference_steps, "num_inference_steps", minimum=1)
    guidance = check_guidance(guidance_scale)
    batch_size = check_int(batch_size, "batch_size", minimum=1)
    refine = check_int(refine, "refine", minimum=0)
    flow = lens.family.sampling == "flow"
    sampler = inversion_scheduler(lens, T, scheduler)
    if flow:  # σ at each level; the step is Euler's along the predicted velocity
        levels, kind = sampler.sigmas.double(), "flow"
        denoiser = GuidedDenoiser(lens, [prompt])

        def move(z, t, frm, to, at):
            return flow_move(z, denoiser.guided(at, t, 0, guidance), frm, to)
    else:  # ᾱ at each level; the DDIM step along ε̂
        levels, kind = alpha_bars(sampler), sampler.config.prediction_type
        denoiser = GuidedDenoiser(lens, [prompt], kind)

        def move(z, t, frm, to, at):
            return ddim_move(z, denoiser.epsilon(at, t, 0, guidance, to), frm, to)
    z0 = encode(lens, images) if z0 is None else z0  # (n, C, h, w)
    out = np.zeros((len(images), T + 1, *z0.shape[1:]), np.float32)
    chunks = range(0, len(images), batch_size)
    for start in tqdm(chunks, desc="invert", unit="batch", disable=not progress):
        z = z0[start : start + batch_size].double()
        out[start : start + len(z), T] = z.float().numpy()
        for i in reversed(range(T)):  # level i + 1 -> level i, mirroring sampler step i
            t = sampler.timesteps[i] if flow else int(sampler.timesteps[i])
            frm, to = float(levels[i + 1]), float(levels[i])
            guess = move(z, t, frm, to, z)
            for _ in range(refine):  # fixed point of z_i = move(z_{i+1}, prediction(z_i, t_i)): the exact inverse
                guess = move(z, t, frm, to, guess)
            z = guess
            if not bool(torch.isfinite(z).all()):
                raise NonFiniteError(f"the inversion diverged (NaN or inf) at step {i} of {T}; the model or its "
                                     f"weights produce non-finite predictions")
            out[start : start + len(z), i] = z.float().numpy()
    timesteps = sampler.timesteps.numpy()
    timesteps = np.append(timesteps.astype(np.float64), -1)
    height, width = images.shape[1:3]
    ds = xr.Dataset(
        {"latent": (("item", "step", "channel", "latent_y", "latent_x"), out),
         "input": (("item", "y", "x", "rgb"), images)},
        # int32 indices: netCDF3 (xarray's writer without extra packages) keeps them as they are, so the seal holds
        coords={"item": np.arange(len(images), dtype=np.int32), "step": np.arange(T + 1, dtype=np.int32),
                "timestep": ("step", timesteps.astype(np.float64 if flow else np.int32)),
                ("sigma" if flow else "alpha_bar"): ("step", levels.numpy())},
    )
    ds.attrs.update(lens.provenance())
    ds.attrs.update(prompt=prompt, num_inference_steps=T, guidance_scale=guidance, refine=refine,
                    sampler="flow-matching Euler" if flow else "DDIM (eta 0, leading)",
                    prediction_type=kind, image_size=[int(height), int(width)])
    ds.attrs[DIGEST] = dataset_digest(ds)
    return ds


def _check_latents(latents: Any, lens: Lens) -> torch.Tensor:
    if not isinstance(latents, torch.Tensor):
        raise TypeError(f"latents must be a torch tensor (n, C, h, w), got {type(latents).__name__}")
    scale = lens.pipeline.vae_scale_factor
    shape = (lens.pipeline.vae.config.latent_channels, lens.pipeline_kwargs["height"] // scale,
             lens.pipeline_kwargs["width"] // scale)
    if latents.ndim != 4 or tuple(latents.shape[1:]) != shape or latents.shape[0] == 0:
        raise ValueError(f"latents must be (n, {', '.join(map(str, shape))}) with n >= 1, got {tuple(latents.shape)}")
    if not bool(torch.isfinite(latents).all()):
        raise ValueError("latents hold NaN or inf values")
    return latents.detach().float().cpu()


def trajectory_latents(trajectory: xr.Dataset, step: int = 0) -> torch.Tensor:
    """The trajectory's latents at `step` (default: the starting noise) as a tensor ``(item, C, h, w)``."""
    if not isinstance(trajectory, xr.Dataset) or "latent" not in trajectory or not (
            {"alpha_bar", "sigma"} & set(trajectory.coords)):
        raise TypeError("expected a trajectory from dit_lens.invert (a Dataset with 'latent' and 'alpha_bar' or 'sigma')")
    return torch.from_numpy(trajectory["latent"].isel(step=step).values.copy())


def regenerate(
    lens: Lens,
    trajectory: xr.Dataset,
    prompt: str | None = None,
    *,
    guidance_scale: float | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> np.ndarray:
    """Denoise a trajectory's starting noise with its DDIM sampler through the pipeline's loop.

    Args:
        lens: The lens the trajectory was inverted with.
        trajectory: From `invert`.
        prompt: The prompt to denoise under (default: the inversion's, giving the reconstruction).
        guidance_scale: Classifier-free guidance (default: the inversion's).
        batch_size: Images per pipeline call.
        progress: Show a progress bar over batches.

    Returns:
        Images ``(item, H, W, 3)`` float32 in [0, 1].
    """
    from ..interventions.plan import Plan

    check_trajectory(lens, trajectory)
    prompt = trajectory.attrs["prompt"] if prompt is None else prompt
    guidance = check_guidance(trajectory.attrs["guidance_scale"] if guidance_scale is None else guidance_scale)
    T = int(trajectory.attrs["num_inference_steps"])
    noise = trajectory_latents(trajectory)
    plan, ddim = Plan(lens, [], T, False), inversion_scheduler(lens, T)
    out = []
    chunks = range(0, len(noise), check_int(batch_size, "batch_size", minimum=1))
    for start in tqdm(chunks, desc="regenerate", unit="batch", disable=not progress):
        chunk = noise[start : start + batch_size]
        images, _ = plan.run([prompt] * len(chunk), [0] * len(chunk), [], guidance, latents=chunk,
                             scheduler=ddim, seeded=False)
        out.append(images)
    return np.concatenate(out)


def check_trajectory(lens: Lens, trajectory: Any) -> None:
    """Refuse a trajectory that is not from `invert`, changed after it was made, or was inverted with another model.

    Raises:
        TypeError: not a trajectory.
        dit_lens.storage.DamagedError: no seal, a seal its content fails (an edited setting, removed
            provenance, other latents), or NaN or inf latents.
        ValueError: it was inverted with another model.
    """
    if not isinstance(trajectory, xr.Dataset) or "latent" not in trajectory or "num_inference_steps" not in trajectory.attrs:
        raise TypeError("expected a trajectory from dit_lens.invert (a Dataset with 'latent' and its settings)")
    fix = "invert the images again with dit_lens.invert (nothing was run)"
    sealed = trajectory.attrs.get(DIGEST)
    if sealed is None:
        raise DamagedError(f"this trajectory has no digest, so its latents and settings cannot be trusted (made by "
                           f"an older dit-lens, or rebuilt by hand); {fix}")
    if "model_fingerprint" not in trajectory.attrs:
        raise DamagedError(f"this trajectory has no model_fingerprint, so the model it was inverted with is unknown; {fix}")
    if not bool(np.isfinite(trajectory["latent"].values).all()):
        raise DamagedError(f"this trajectory is damaged: its latents hold NaN or inf; {fix}")
    if sealed != dataset_digest(trajectory):
        raise DamagedError(f"this trajectory fails its digest: it is damaged, or its latents, coordinates or settings "
                           f"(e.g. num_inference_steps={trajectory.attrs['num_inference_steps']}) changed after "
                           f"invert made it, or it is a part of one; {fix}")
    if trajectory.attrs["model_fingerprint"] != lens.fingerprint:
        raise ValueError("this trajectory was inverted with another model (its model_fingerprint differs from the "
                         "lens's); invert the images again with this lens")
