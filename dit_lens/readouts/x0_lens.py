"""`x0_lens`: what the model would predict if the denoiser stopped at block l of step t.

For each run (prompt, seed) and each requested step t and layer l, the residual stream after block l (the
``"block"`` site) goes through the denoiser's own output head (`dit_lens.model.head`: final norm modulated
by step t's timestep embedding, output projection, unpatchify), the guidance branches are mixed as the
pipeline mixes them (``uncond + g·(cond − uncond)``; guidance-distilled Flux has one branch), and the
prediction becomes the clean latent x̂₀ by the sampler's own parameterisation, which the VAE decodes:

- noise schedule, ε-prediction: ``x̂₀ = (x_t − √(1−ᾱ_t)·ε) / √ᾱ_t`` (PixArt's learned-sigma output:
  its first channels, as the pipeline takes them);
- noise schedule, v-prediction: ``x̂₀ = √ᾱ_t·x_t − √(1−ᾱ_t)·v``;
- flow matching: ``x̂₀ = x_t − σ_t·v``.

Beside it, ``image_final`` is the same x̂₀ of the denoiser's real output at each step (what the sampler
itself predicts): at the last block the lens equals it, and at the last step it is the image the run
returns (both samplers' last step lands on x̂₀). With an `intervention`, the lens reads the edited run:
its hooks run after the edits at every site. With ``source=`` another prompt, the unedited twin an edit reads
runs that prompt: ``intervention=Inject("attn2", layers=(2,))`` then gives the lens of an activation-patched
run (the clean prompt's ``attn2`` output put into block 2 of each prompt's run, as `dit_lens.patching` with
``direction="denoise"`` makes it).

Examples:
    >>> from dit_lens import load
    >>> from dit_lens.testing import PixArtSpec, build_pixart
    >>> lens = load(build_pixart(PixArtSpec(num_layers=2)))
    >>> ds = x0_lens(lens, ["a polyp"], seeds=[0], num_inference_steps=2, progress=False)
    >>> ds.image.dims
    ('prompt', 'seed', 'step', 'layer', 'y', 'x', 'rgb')
    >>> ds.image.shape, ds.image_final.dims
    ((1, 1, 2, 2, 16, 16, 3), ('prompt', 'seed', 'step', 'y', 'x', 'rgb'))
    >>> bool(abs(ds.image.isel(layer=-1) - ds.image_final).max() < 1e-5)  # the last block is the output
    True
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np
import torch
import xarray as xr
from tqdm.auto import tqdm

from ..interventions.base import Intervention
from ..interventions.plan import Plan, as_edits
from ..model.head import HeadInputs, apply_head, head_of
from ..sampling.images import decode
from ..model.lens import Lens
from ..trace.attrs import typed
from ..trace.capture import CaptureSettings
from ..trace.runner import Hook, scheduler_timesteps
from ..validate import check_int, check_prompts, check_seeds
from .attention_maps import _check_steps

__all__ = ["IMAGE_DIMS", "predicted_x0", "prediction_of", "x0_lens"]

IMAGE_DIMS = ("prompt", "seed", "step", "layer", "y", "x", "rgb")
#: Runs per pipeline call when not told otherwise.
DEFAULT_RUNS = 4


def x0_lens(
    lens: Lens,
    prompts: str | Iterable[str],
    *,
    seeds: Iterable[int],
    layers: Iterable[int] | None = None,
    steps: Iterable[int] | None = None,
    num_inference_steps: int = 20,
    guidance_scale: float = 4.5,
    intervention: Intervention | Sequence[Intervention] | None = None,
    source: str | None = None,
    batch_size: int | None = None,
    decode_batch: int = 16,
    progress: bool = True,
) -> xr.Dataset:
    """The decoded clean-image prediction x̂₀ after each requested block, at each requested step.

    Args:
        lens: A `dit_lens.Lens` whose pipeline has a VAE.
        prompts: Prompt strings (unique); one string is one prompt.
        seeds: Generator seeds (unique non-negative integers).
        layers: Block indices (default: all; Flux numbers its single-stream blocks after the double-stream ones).
        steps: Denoising steps to read (default: all); the run always makes all T.
        num_inference_steps: Denoising steps T.
        guidance_scale: Classifier-free guidance scale (a guidance-distilled model takes it as an input).
        intervention: An intervention (`Steer`, `Reweight`, `Blend`, ...) or a list of them; the lens then
            reads the edited run (each run alone, or beside its unedited twin when an edit reads it).
        source: The prompt of that unedited twin (default: the run's own prompt); with `Inject`, the lens of a
            patched run whose activations at the injected cells come from `source`'s run of the same seed.
        batch_size: Runs per pipeline call (default 4); changes values only by float rounding.
        decode_batch: Latents per VAE decode.
        progress: Show a progress bar over batches.

    Returns:
        Dataset with ``image (prompt, seed, step, layer, y, x, rgb)`` float32 in [0, 1], the lens;
        ``image_final (prompt, seed, step, y, x, rgb)``, the sampler's own x̂₀ of the denoiser's output at
        each step (the lens after the last block, computed from the real output); ``generated (prompt,
        seed, y, x, rgb)``, the image the run returns; coordinate ``timestep`` per step. Attrs hold
        provenance, every setting, ``prediction`` (``"epsilon"``, ``"v_prediction"``, ``"sample"`` or
        ``"flow"``) and ``edits`` (each intervention's settings). The lens takes prompts × seeds × steps
        × layers × H × W × 3 × 4 B (one 512-px run of 20 steps × 28 layers: 1.8 GB); pass `layers` or
        `steps` to keep fewer.

    Raises:
        ValueError: a bad argument (a layer or step out of range, a sampler whose x̂₀ is not known, a
            pipeline without a VAE); the message names it.
    """
    prompts, seeds = check_prompts(prompts), check_seeds(seeds)
    if isinstance(layers, (int, np.integer)):
        raise ValueError(f"layers must be a list of block indices; pass layers=[{layers}]")
    settings = CaptureSettings(  # validates steps, guidance and layers as capture does
        num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
        layers=None if layers is None else tuple(layers), site="block",
    ).resolve(lens, "x0_lens")
    T = settings.num_inference_steps
    recorded = _check_steps(steps, T)
    if getattr(lens.pipeline, "vae", None) is None:
        raise ValueError(f"x0_lens decodes predictions with the pipeline's VAE; this {type(lens.pipeline).__name__} "
                         f"has none (vae=None): load the pipeline with its VAE")
    head_of(lens)  # a clear error for a family without a known head
    prediction = prediction_of(lens)
    edits = as_edits(intervention, None, 0.0)
    for edit in edits:
        edit.check(lens, T)
    if source is not None:
        check_prompts([source])
        if not any(e.reads_original for e in edits):
            raise ValueError("source= is the prompt of the unedited twin that an edit reads (Inject, Blend, Confine); "
                             "none of the given edits reads it: add e.g. intervention=Inject('attn2', layers=(2,)) "
                             "or leave source out")
    runs = DEFAULT_RUNS if batch_size is None else check_int(batch_size, "batch_size", minimum=1)
    decode_batch = check_int(decode_batch, "decode_batch", minimum=1)

    height, width = lens.pipeline_kwargs["height"], lens.pipeline_kwargs["width"]
    n_steps, n_layers = len(recorded), len(settings.layers)
    images = np.zeros((len(prompts), len(seeds), n_steps, n_layers, height, width, 3), np.float32)
    finals = np.zeros((len(prompts), len(seeds), n_steps, height, width, 3), np.float32)
    generated = np.zeros((len(prompts), len(seeds), height, width, 3), np.float32)
    cells = [(p, s) for p in range(len(prompts)) for s in range(len(seeds))]
    batches = [cells[i : i + runs] for i in range(0, len(cells), runs)]
    for batch in tqdm(batches, desc="x0 lens", unit="batch", disable=not progress):
        lens_x0, final_x0, made = _run_batch(lens, [(prompts[p], seeds[s]) for p, s in batch], settings, recorded,
                                             edits, prediction, source)
        per_run = n_steps * n_layers
        _decode_into(lens, lens_x0.flatten(0, 2), images, decode_batch,  # (runs · steps · layers, C, h, w)
                     lambda k: (*batch[k // per_run], (k % per_run) // n_layers, k % n_layers))
        _decode_into(lens, final_x0.flatten(0, 1), finals, decode_batch,  # (runs · steps, C, h, w)
                     lambda k: (*batch[k // n_steps], k % n_steps))
        for row, (p, s) in enumerate(batch):
            generated[p, s] = made[row]

    steps_kept = np.array(recorded, dtype=np.int64)
    coords = {
        "prompt": prompts,
        "seed": seeds,
        "step": steps_kept,
        "timestep": ("step", scheduler_timesteps(lens, T).astype(np.float64)[steps_kept]),
        "layer": np.array(settings.layers, dtype=np.int64),
    }
    ds = xr.Dataset(
        {
            "image": (IMAGE_DIMS, images),
            "image_final": (("prompt", "seed", "step", "y", "x", "rgb"), finals),
            "generated": (("prompt", "seed", "y", "x", "rgb"), generated),
        },
        coords=coords,
    )
    ds["image"].attrs["description"] = (
        f"x0 predicted from the residual stream after each block through the model's own output head, guidance "
        f"mixed, {prediction} parameterisation, decoded by the VAE")
    ds["image_final"].attrs["description"] = "x0 predicted from the denoiser's output at each step, decoded"
    ds.attrs.update(lens.provenance())
    ds.attrs.update(
        readout="x0_lens",
        site="block",
        num_inference_steps=T,
        guidance_scale=settings.guidance_scale,
        seeds=typed(seeds),
        batch_size=int(runs),
        decode_batch=int(decode_batch),
        token_grid=list(lens.token_grid),
        prediction=prediction,
        scheduler=type(lens.pipeline.scheduler).__name__,
        edits=typed([e.settings() for e in edits]),
        source="" if source is None else source,
    )
    return ds


def _decode_into(lens: Lens, latents: torch.Tensor, out: np.ndarray, decode_batch: int, where: Any) -> None:
    """Decode `latents` ``(n, C, h, w)`` `decode_batch` at a time, image k into ``out[where(k)]`` (never all
    n images at once)."""
    for start in range(0, latents.shape[0], decode_batch):
        for k, image in enumerate(decode(lens, latents[start : start + decode_batch], decode_batch), start):
            out[where(k)] = image


def prediction_of(lens: Lens) -> str:
    """What the pipeline's sampler reads the denoiser's output as: ``"flow"`` (a velocity, flow matching),
    or for a noise-schedule sampler its ``prediction_type`` (``"epsilon"``, ``"v_prediction"``, ``"sample"``).

    Raises:
        ValueError: a sampler whose clean-latent formula is not the one of `predicted_x0`.
    """
    scheduler = lens.pipeline.scheduler
    prediction = scheduler.config.get("prediction_type")
    name = type(scheduler).__name__
    if lens.family.sampling == "flow" or prediction == "flow_prediction":
        if not hasattr(scheduler, "sigmas"):
            raise ValueError(f"x0_lens reads flow matching's noise level σ_t from the sampler's sigmas; {name} has "
                             f"none: use FlowMatchEulerDiscreteScheduler")
        return "flow"
    if not hasattr(scheduler, "alphas_cumprod") or float(getattr(scheduler, "init_noise_sigma", 1.0)) != 1.0:
        raise ValueError(f"x0_lens needs a noise-schedule sampler whose input is x_t itself (DDIM, DDPM, "
                         f"DPMSolverMultistep); {name} scales the model input: swap the pipeline's scheduler")
    if prediction not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"{name} has prediction_type={prediction!r}; x0_lens knows 'epsilon', 'v_prediction', "
                         f"'sample' and flow matching")
    return prediction


def predicted_x0(prediction: str, scheduler: Any, step: int, latents: torch.Tensor,
                 output: torch.Tensor) -> torch.Tensor:
    """The clean latent x̂₀ ``(rows, C, h, w)`` float32 from the loop's `latents` x_t and the (guidance-mixed)
    denoiser `output` at `step` of a run, by the sampler's parameterisation `prediction` (`prediction_of`),
    with the noise level the running `scheduler` holds for that step."""
    x, out = latents.float(), output.float()
    if prediction == "flow":
        sigma = scheduler.sigmas[step].to(x.device, torch.float32)
        return x - sigma * out
    alpha_bar = scheduler.alphas_cumprod[int(scheduler.timesteps[step])].to(x.device, torch.float32)
    alpha, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    if prediction == "epsilon":
        return (x - sigma * out) / alpha
    if prediction == "v_prediction":
        return alpha * x - sigma * out
    return out


def _run_batch(lens: Lens, runs: list[tuple[str, int]], settings: CaptureSettings, recorded: list[int],
               edits: list[Intervention], prediction: str,
               source: str | None = None) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """One pipeline call for `runs`: x̂₀ of the lens ``(runs, step, layer, C, h, w)`` and of the denoiser's
    output ``(runs, step, C, h, w)``, and the images the run returns ``(runs, H, W, 3)``. The unedited twins
    run `source` (default: their run's prompt)."""
    paired = any(e.reads_original for e in edits)  # the edited runs need their unedited twins in the batch
    copies = 2 if paired else 1
    row_prompts = [(source or prompt) if paired and k == 0 else prompt for prompt, _ in runs for k in range(copies)]
    row_seeds = [seed for _, seed in runs for _ in range(copies)]
    read = [i * copies + copies - 1 for i in range(len(runs))]  # the rows the lens reads: the edited ones
    edited = read if edits else []
    n_rows, guided, g = len(row_prompts), lens.guided(settings.guidance_scale), settings.guidance_scale
    rows = torch.tensor(read, dtype=torch.long)
    step_index = {t: i for i, t in enumerate(recorded)}
    layer_index = {l: j for j, l in enumerate(settings.layers)}
    scheduler = lens.pipeline.scheduler
    found: dict[str, torch.Tensor] = {}
    seen = {"call": -1, "step": -1}  # the denoiser call and step the lens last read (a traced call)

    def clean(output: torch.Tensor, latents: torch.Tensor, step: int) -> torch.Tensor:
        """x̂₀ of the read rows from the denoiser's output over every row (both guidance halves)."""
        output = output.float()
        if guided:  # unconditional rows first, as the pipeline chunks them
            uncond, cond = output[:n_rows], output[n_rows:]
            output = uncond + g * (cond - uncond)
        channels = latents.shape[1]
        if output.shape[1] == 2 * channels:  # a learned variance in the second half (PixArt)
            output = output[:, :channels]
        at = rows.to(output.device)
        return predicted_x0(prediction, scheduler, step, latents[-n_rows:][at], output[at]).cpu()

    def store(name: str, shape: tuple, index: tuple, value: torch.Tensor) -> None:
        if name not in found:
            found[name] = torch.zeros((len(read), *shape, *value.shape[1:]), dtype=torch.float32)
        found[name][(slice(None), *index)] = value

    def visit(step: int, layer: int, hidden: torch.Tensor) -> None:  # hidden (rows, tokens, C)
        seen.update(call=inputs.calls, step=step)
        output = apply_head(lens, hidden, inputs.embedding)  # (rows, C', h, w)
        store("lens", (len(recorded), len(settings.layers)), (step_index[step], layer_index[layer]),
              clean(output, inputs.latents, step))

    def after(output: torch.Tensor) -> None:  # every call of the denoiser; keep only the traced run's
        if seen["call"] == inputs.calls:
            store("final", (len(recorded),), (step_index[seen["step"]],), clean(output, inputs.latents, seen["step"]))

    plan = Plan(lens, edits, settings.num_inference_steps, False)
    hook = Hook("block", settings.layers, visit, frozenset(recorded))
    with HeadInputs(lens, after=after) as inputs:
        made, _ = plan.run(row_prompts, row_seeds, edited, settings.guidance_scale,
                           twin_rows=None if paired else edited, hooks=[hook])
    return found["lens"], found["final"], made[read]
