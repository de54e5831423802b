"""What the miniature model does, measured with the detector on fixed seed sets (the model card's figures).

Every condition of one figure uses the same seeds (paired), the model's native size (128x128 for the
shipped model, :func:`voidprompt.demo.generate.native_size`), Euler a, 20 steps, Clip skip 2 and CFG 7
unless a figure changes one of them (:func:`voidprompt.demo.generate.demo_request`). Pictures of any
size are read with the detector at the model's native size, because the model paints at its own pixel
scale. Proportions come with Wilson intervals, slopes with t intervals (:mod:`voidprompt.lab.stats`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from voidprompt.demo.detector import Detection, DetectorConfig, detect
from voidprompt.demo.generate import demo_request, native_size
from voidprompt.demo.world import DEFECTS, Background, Scene, ShapeObject, make_dataset, render
from voidprompt.lab.stats import SlopeFit, linear_slope, wilson_interval
from voidprompt.pipeline.engine import GenerationHooks, decode_latents, to_pil_images
from voidprompt.prompts.nai import NOVELAI_NEGATIVE

__all__ = [
    "ADHERENCE_PROMPTS",
    "EMPHASIS_WEIGHTS",
    "AdherenceCeiling",
    "Proportion",
    "colour_adherence",
    "count_ratio",
    "defect_rates",
    "detect_all",
    "emphasis_slope",
    "generate_images",
    "kind_survival_by_size",
    "latent_spectrum",
    "prompt_adherence",
    "prompt_adherence_ceiling",
    "vae_round_trip",
]

# Chromatic colours only: a white or black shape on the equally likely white or black background
# would be invisible for reasons that have nothing to do with the prompt.
ADHERENCE_PROMPTS: tuple[str, ...] = (
    "red circle",
    "orange square",
    "yellow triangle",
    "green star",
    "blue circle",
    "purple triangle",
    "red square",
    "blue star",
)
EMPHASIS_WEIGHTS: tuple[float, ...] = (0.8, 0.9, 1.0, 1.1, 1.2, 1.3)


@dataclass(frozen=True)
class Proportion:
    k: int
    n: int

    @property
    def p(self) -> float:
        return self.k / self.n if self.n else math.nan

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.k, self.n)

    def __str__(self) -> str:
        low, high = self.interval
        return f"{self.p:.3f} ({self.k}/{self.n}; 95% CI {low:.3f}-{high:.3f})"


def generate_images(
    engine: Any, prompt: str, negative_prompt: str, n: int, seed: int, *, batch: int = 25, **changes: Any
) -> list[Image.Image]:
    """n pictures for seeds seed .. seed+n-1 (the Engine numbers a batch's seeds consecutively), at the
    model's native size unless ``changes`` set width and height."""
    images: list[Image.Image] = []
    side = native_size(engine.components)
    while len(images) < n:
        count = min(batch, n - len(images))
        request = demo_request(
            prompt, negative_prompt, size=side, seed=seed + len(images), batch_size=count, **changes
        )
        images.extend(engine.generate(request).images)
    return images


def denoising_trajectory(
    engine: Any, prompt: str, negative_prompt: str, seed: int, at_steps: Sequence[int], **changes: Any
) -> tuple[list[list[Image.Image]], list[Image.Image]]:
    """The sampler's clean-picture estimate (``denoised``, decoded) after each of ``at_steps`` (1-based),
    one row of ``batch_size`` pictures per step, and the finished pictures.

    Shows when a picture's layout is decided: on the miniature model a square is laid down as a
    round blob in the first few high-noise steps and the later steps never sharpen it."""
    request = demo_request(prompt, negative_prompt, size=native_size(engine.components), seed=seed, **changes)
    if request.n_iter != 1:
        raise ValueError(f"n_iter={request.n_iter}: one batch per trajectory; use batch_size instead")
    wanted = set(at_steps)
    if not wanted or min(wanted) < 1 or max(wanted) > request.steps:
        raise ValueError(f"at_steps {sorted(wanted)} must lie within 1..{request.steps}, the request's steps")
    estimates: dict[int, torch.Tensor] = {}

    def keep(progress: Any) -> None:
        if progress.step in wanted and progress.denoised is not None:
            estimates[progress.step] = progress.denoised.detach().clone()

    result = engine.generate(request, GenerationHooks(progress=keep))
    if set(estimates) != wanted:
        raise ValueError(
            f"sampler {request.sampler_name!r} reports no clean-latent estimate; "
            "use one that does (Euler a, Euler)"
        )
    rows = [to_pil_images(decode_latents(engine.components, estimates[step])) for step in at_steps]
    return rows, list(result.images)


def detect_all(images: Sequence[Image.Image], native: int = 64) -> list[Detection]:
    """The detector on each picture, its thresholds scaled to a model (or world) of side ``native``."""
    config = DetectorConfig(native_size=native)
    return [detect(image, config) for image in images]


def _generate_and_detect(
    engine: Any, prompt: str, negative_prompt: str, n: int, seed: int, **changes: Any
) -> list[Detection]:
    images = generate_images(engine, prompt, negative_prompt, n, seed, **changes)
    return detect_all(images, native_size(engine.components))


def _has(detection: Detection, colour: str, kind: str) -> bool:
    return any(s.colour == colour and s.kind == kind for s in detection.shapes)


def prompt_adherence(
    engine: Any, n_per_prompt: int, seed: int, *, cfg_scale: float = 7.0,
    prompts: Sequence[str] = ADHERENCE_PROMPTS,
) -> tuple[Proportion, dict[str, Proportion]]:
    """Share of ``<colour> <shape>`` pictures that contain that coloured shape (overall, per prompt)."""
    per: dict[str, Proportion] = {}
    for prompt in prompts:
        colour, kind = prompt.split()
        found = _generate_and_detect(engine, prompt, "", n_per_prompt, seed, cfg_scale=cfg_scale)
        per[prompt] = Proportion(sum(_has(d, colour, kind) for d in found), len(found))
    return Proportion(sum(p.k for p in per.values()), sum(p.n for p in per.values())), per


@dataclass(frozen=True)
class AdherenceCeiling:
    """What :func:`prompt_adherence` would measure on a model that drew its training world exactly:
    ``world`` reads the world's own pictures (the detector's ceiling), ``transformed`` the same pictures
    after the transform (with a VAE round trip: the ceiling that VAE puts on any UNet)."""

    world: Proportion
    transformed: Proportion
    per_prompt: dict[str, tuple[Proportion, Proportion]]  # prompt -> (world, transformed)


def prompt_adherence_ceiling(
    transform: Callable[[Image.Image], Image.Image],
    n_per_prompt: int,
    seed: int,
    *,
    prompts: Sequence[str] = ADHERENCE_PROMPTS,
    max_pictures: int = 20000,
    size: int = 64,
) -> AdherenceCeiling:
    """The ceiling a VAE puts on prompt adherence, on the figure's own terms: for each prompt, the
    first ``n_per_prompt`` world pictures (``make_dataset(..., seed)``, defects and neighbours as the
    model learnt them) whose caption carries the prompt's tag, read by the detector as drawn and after
    ``transform`` (:func:`vae_round_trip`). A UNet that drew exactly the world's pictures for a bare
    ``<colour> <shape>`` prompt would score the transformed share; no UNet scores more with this VAE.
    ``size``: the side the world is drawn (and read) at, the model's native size."""
    wanted: dict[str, list[Image.Image]] = {prompt: [] for prompt in prompts}
    for image, text, _ in make_dataset(max_pictures, seed, size):
        tags = set(text.split(", "))
        for prompt, found in wanted.items():
            if prompt in tags and len(found) < n_per_prompt:
                found.append(image)
        if all(len(found) == n_per_prompt for found in wanted.values()):
            break
    short = {prompt: len(found) for prompt, found in wanted.items() if len(found) < n_per_prompt}
    if short:
        raise ValueError(
            f"only {short} of {n_per_prompt} pictures per prompt among the first {max_pictures} world "
            "pictures; raise max_pictures or ask for fewer"
        )
    per: dict[str, tuple[Proportion, Proportion]] = {}
    for prompt, found in wanted.items():
        colour, kind = prompt.split()
        as_drawn = sum(_has(d, colour, kind) for d in detect_all(found, size))
        transformed = sum(_has(d, colour, kind) for d in detect_all([transform(im) for im in found], size))
        per[prompt] = (Proportion(as_drawn, len(found)), Proportion(transformed, len(found)))
    total = sum(w.n for w, _ in per.values())
    return AdherenceCeiling(
        world=Proportion(sum(w.k for w, _ in per.values()), total),
        transformed=Proportion(sum(t.k for _, t in per.values()), total),
        per_prompt=per,
    )


def colour_adherence(
    engine: Any, n_per_prompt: int, seed: int, *, cfg_scale: float = 7.0,
    prompts: Sequence[str] = ADHERENCE_PROMPTS,
) -> Proportion:
    """Share of ``<colour> <shape>`` pictures with a shape of the asked colour, of any kind.

    The kind is the part an f=8 VAE at 64 px loses first (docs/miniature-history.md), so
    this separates "the prompt's colour reached the picture" from "the shape survived the decoder".
    """
    k = n = 0
    for prompt in prompts:
        colour = prompt.split()[0]
        found = _generate_and_detect(engine, prompt, "", n_per_prompt, seed, cfg_scale=cfg_scale)
        k += sum(any(s.colour == colour for s in d.shapes) for d in found)
        n += len(found)
    return Proportion(k, n)


def defect_rates(
    detections: Sequence[Detection],
) -> tuple[Proportion, dict[str, Proportion]]:
    """Share of pictures with any defect flag, and per defect."""
    n = len(detections)
    any_defect = Proportion(sum(bool(d.defect_flags) for d in detections), n)
    return any_defect, {x: Proportion(sum(x in d.defect_flags for d in detections), n) for x in DEFECTS}


def negative_prompt_effect(
    engine: Any, n: int, seed: int, *, negative_prompt: str = NOVELAI_NEGATIVE
) -> dict[str, tuple[Proportion, dict[str, Proportion]]]:
    """Defect rates of the empty prompt without and with the negative prompt (paired seeds)."""
    return {
        "none": defect_rates(_generate_and_detect(engine, "", "", n, seed)),
        "negative": defect_rates(_generate_and_detect(engine, "", negative_prompt, n, seed)),
    }


def count_ratio(engine: Any, n: int, seed: int, *, prompt: str = "") -> dict[str, float]:
    """Mean detected objects per picture at the model's native size and at twice its side (4x the
    trained area), paired seeds: ``mean_native``, ``sem_native``, ``mean_4x``, ``sem_4x``, ``ratio``
    and ``side`` (the native side)."""
    side = native_size(engine.components)
    out: dict[str, float] = {"side": float(side)}
    for name, width in (("native", side), ("4x", 2 * side)):
        found = _generate_and_detect(engine, prompt, "", n, seed, width=width, height=width)
        counts = np.array([d.count for d in found], dtype=float)
        out[f"mean_{name}"] = float(counts.mean())
        sem = counts.std(ddof=1) / math.sqrt(len(counts)) if len(counts) > 1 else math.nan
        out[f"sem_{name}"] = float(sem)
    out["ratio"] = out["mean_4x"] / out["mean_native"] if out["mean_native"] else math.inf
    return out


def emphasis_slope(
    engine: Any, tag: str, n: int, seed: int, *, weights: Sequence[float] = EMPHASIS_WEIGHTS,
    prompt: str = "", base_negative: str = "", **changes: Any,
) -> tuple[SlopeFit, dict[float, Proportion]]:
    """Rate of the ``tag`` defect against the weight W of ``(tag:W)`` in the negative prompt, with
    ``prompt`` as the positive prompt (``changes``: other request fields, e.g. ``cfg_scale``).

    With ``prompt=tag`` the rate can move both ways: at W = 1 the two conditionings are identical (CFG
    does nothing), below 1 guidance pushes towards the defect, above 1 away from it - the change is
    emphasis alone. With the empty prompt one negative tag at any W already removes a rare defect on
    the miniature model (a floor effect, see its MODEL_CARD.md).

    The slope is fitted on the per-picture 0/1 outcomes (n x len(weights) points), so its interval
    reflects the binomial noise of each rate.
    """
    rates: dict[float, Proportion] = {}
    xs: list[float] = []
    ys: list[float] = []
    for w in weights:
        negative = f"{base_negative + ', ' if base_negative else ''}({tag}:{w:g})"
        detections = _generate_and_detect(engine, prompt, negative, n, seed, **changes)
        found = [tag in d.defect_flags for d in detections]
        rates[w] = Proportion(sum(found), len(found))
        xs += [w] * len(found)
        ys += [float(f) for f in found]
    return linear_slope(xs, ys), rates


def kind_survival_by_size(
    transform: Callable[[Image.Image], Image.Image],
    radii: Sequence[float],
    n: int,
    seed: int,
    *,
    kinds: Sequence[str] = ("square", "triangle", "star"),
    size: int = 64,
) -> dict[str, dict[float, Proportion]]:
    """How often one red shape of each kind and circumradius (a fraction of the side), turned and placed
    at random on white, is still read as that kind after ``transform`` (a VAE round trip): the size
    below which the VAE rounds a kind away, i.e. the ceiling it puts on prompt adherence. ``size``:
    the picture side, the model's native size."""
    rng = np.random.default_rng(seed)
    detector = DetectorConfig(native_size=size)
    out: dict[str, dict[float, Proportion]] = {}
    for kind in kinds:
        out[kind] = {}
        for r in radii:
            hits = 0
            for _ in range(n):
                centre = (float(rng.uniform(r + 0.05, 0.95 - r)), float(rng.uniform(r + 0.05, 0.95 - r)))
                shape = ShapeObject(kind, "red", centre, r, float(rng.uniform(0.0, 360.0)))
                picture = render(Scene((shape,), Background("solid", ("white",))), size)
                hits += any(s.kind == kind for s in detect(transform(picture), detector).shapes)
            out[kind][r] = Proportion(hits, n)
    return out


def vae_round_trip(components: Any) -> Callable[[Image.Image], Image.Image]:
    """Encode (posterior mean) and decode a picture with the model's VAE, as the detector evaluation's
    ``transform``."""
    vae = components.vae

    def transform(image: Image.Image) -> Image.Image:
        x = torch.from_numpy(np.array(image.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)[None]
        with torch.no_grad():
            mean = vae.encode((x / 127.5 - 1.0).to(components.dtype)).latent_dist.mean
        return to_pil_images(decode_latents(components, mean * components.scaling_factor))[0]

    return transform


def latent_spectrum(vae: Any, images: torch.Tensor) -> tuple[list[float], float]:
    """How many of its latent channels a VAE uses: the standard deviations of the principal components
    of the per-pixel channel vectors of its posterior means over ``images`` ((N, 3, H, W) in [-1, 1]),
    strongest first, and the mean posterior std - both in unit-variance latents (divided by the std of
    all the means). A component no larger than the posterior std carries only noise: the 64 px
    miniature model's VAE's four channels give 1.69 / 0.78 / 0.13 / 0.016 against 0.014 (see
    docs/miniature-history.md)."""
    with torch.no_grad():
        posterior = vae.encode(images.float()).latent_dist
    mean = posterior.mean.double()
    scale = mean.std()
    vectors = (mean / scale).permute(0, 2, 3, 1).reshape(-1, mean.shape[1])
    variances = torch.linalg.eigvalsh(torch.cov(vectors.T)).clamp(min=0.0)
    stds = sorted((float(v) for v in variances.sqrt()), reverse=True)
    return stds, float((posterior.std.double() / scale).mean())
