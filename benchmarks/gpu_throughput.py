"""GPU throughput: ``voidprompt study run`` against diffusers' pipelines, side by side.

One process, one GPU, the same weights on every side: a full-size SD1.5-layout checkpoint of small
random numbers (:func:`voidprompt.testing.fake_checkpoints.write_random_full_size_sd15`, written on
the machine that runs this; its activations stay below about 15, far from fp16's 65504), or
``--checkpoint`` for a real file. Every side: Euler a, 20 steps, CFG 7, Clip skip 1, the empty prompt
and the NovelAI negative list, seeds 1, 2, ..., one precision policy (``--precision``, default fp16:
voidprompt's :func:`voidprompt.models.placement.resolve_precision` - fp16 weights, the UNet and the
text encoder under ``torch.autocast``, the VAE in fp16 without it).

Sides, per shape (``--shapes``; 512x512 first, then 768x512 and 1408x512):

- ``diffusers loop``: StableDiffusionPipeline called once per image (the loop users write), 8
  images (``--loop-images``), each saved as a PNG; its rate extrapolates to any count.
- ``diffusers batched``: one call with ``num_images_per_prompt`` = 64 (``--images``), every image
  saved as a PNG; out of GPU memory halves the call (the table says so).
- ``voidprompt``: :func:`voidprompt.lab.run.run_study` on a study file written for the shape, as
  ``voidprompt study run`` calls it: batching, PNG with infotext, sha256, measures, the catalog; a
  labeler only with ``--labeler``. Its time leaves out the model load (timed and printed apart), as
  the diffusers sides' pipeline is built before their clock starts.
- ``voidprompt lean`` (first shape only): the same with the measures and the labeler off.
- ``--compile`` (first shape only, after the other shapes): voidprompt with ``[run] compile = true``
  and diffusers batched with ``torch.compile(pipe.unet)``, each twice: the first includes compiling.

The diffusers pipeline is built from voidprompt's own loaded modules (``load_model``, the same
file) with diffusers' defaults put back (contiguous memory, its SDPA attention processor) and
EulerAncestralDiscreteScheduler configured like SD1 (scaled-linear betas, "linspace" timesteps:
A1111's Euler a sigmas). Nothing comes from a model hub.

FLOPs: :class:`torch.utils.flop_counter.FlopCounterMode` counts one UNet call on a batch of 2 (one
image's cond and uncond) at each shape; an image costs that times the steps. Each side's "UNet
TFLOP/s" is its images' UNet FLOPs over its wall time (everything else it does counts against it);
the "UNet alone" rows time bare UNet calls at 2 rows and at the batched side's rows. Shares are of
the card's dense fp16/bf16 tensor peak (:data:`CARD_PEAKS`, or ``--peak-tflops``).

No side may hit a NaN fallback: diffusers' images are checked for NaN/inf before they become PNGs,
voidprompt's warnings (its VAE logs the fp16 fallback) are watched; a hit makes the exit status 1.

Budget: ``--budget-s`` (default 300). Before each step its cost is estimated from what was already
measured; a step that would not fit is skipped and recorded as such. Results go to ``--out`` as
they come: ``results.jsonl`` (one JSON object per record) and ``results.md`` (the tables).

    python benchmarks/gpu_throughput.py --out outputs/gpu-throughput               # on a GPU
    python benchmarks/gpu_throughput.py --out outputs/gpu-throughput --compile --budget-s 420
    python benchmarks/gpu_throughput.py --smoke --out /tmp/gpu-smoke              # CPU, tiny model

SDXL (``--family sdxl``): the checkpoint is a full-size SDXL-base-layout file of random numbers
(:func:`voidprompt.testing.fake_checkpoints.write_random_full_size`, about 6.5 GiB in fp16, written
on the machine), the diffusers sides run StableDiffusionXLPipeline over the same loaded modules (its
second tokenizer pads with "!" as bigG's does; the size numbers are its defaults, which are A1111's:
original = target = the picture's size, crop 0, 0; its VAE stays in the policy's precision instead
of diffusers' float32 upcast, as on the other sides), one 1024x1024 shape, 16 images on the batched
and voidprompt sides. The per-image loop is off by default for SDXL (``--loop-images 8`` turns it on:
its 8 images at 1024x1024, one a call, do not fit the default budget beside the other sides); the
table says it was skipped.

``--smoke`` runs every side on the CPU in float32 with the tiny test checkpoint (the tiny SDXL one
with ``--family sdxl``), one 32x32 shape, 2 images per side and 3 steps: it checks the script, not
the speed. benchmarks/README.md has the command that runs this on the GPU machine (wheels:
benchmarks/gpu_wheels.txt).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import json
import logging
import platform
import shutil
import sqlite3
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import voidprompt
from voidprompt.models.placement import PrecisionPolicy, resolve_device, resolve_precision
from voidprompt.prompts.nai import NOVELAI_NEGATIVE

NEGATIVE = NOVELAI_NEGATIVE
CFG_SCALE = 7.0
SHAPES = ((512, 512), (768, 512), (1408, 512))  # width x height
SDXL_SHAPES = ((1024, 1024),)
FAMILIES = ("sd1", "sdxl")

# Dense (no structured sparsity) fp16/bf16 tensor-core peaks in TFLOP/s, NVIDIA's datasheet figures
# (their headline numbers are twice these, with 2:4 sparsity). Matched against
# torch.cuda.get_device_name() in order, case-insensitively: the specific names come first, as the
# SXM H100 calls itself "NVIDIA H100 80GB HBM3".
CARD_PEAKS: tuple[tuple[str, str, float], ...] = (
    ("h100 pcie", "H100 PCIe", 756.0),
    ("h100 nvl", "H100 NVL", 835.0),
    ("h200 nvl", "H200 NVL", 835.0),
    ("h100", "H100 SXM", 989.0),
    ("h200", "H200 SXM", 989.0),
    ("a100", "A100", 312.0),
)

# Planning figures for steps nothing has measured yet (seconds).
COMPILE_GUESS_S = 90.0  # torch.compile of the SD1 UNet, first call
UNET_TIMING_GUESS_S = 4.0  # seven bare UNet calls at 512x512, batched rows
# A planned step runs only if its estimate times this fits in what is left of the budget.
ESTIMATE_MARGIN = 1.15


class BenchmarkError(RuntimeError):
    """A side could not run as asked (the message says why); recorded, and the run goes on."""


# ----------------------------------------------------------------------------------- set-up


@dataclass(frozen=True)
class Config:
    device: torch.device
    policy: PrecisionPolicy
    shapes: tuple[tuple[int, int], ...]
    images: int  # per batched / voidprompt side
    loop_images: int  # per-image diffusers loop
    steps: int
    compile: bool
    labeler: str | None
    batch_size: int | None  # voidprompt's [run] batch_size; None: the lab's own choice
    smoke: bool
    family: str = "sd1"  # "sd1" or "sdxl"


def card_peak(name: str) -> tuple[str, float] | None:
    """(the peak's name, dense fp16/bf16 TFLOP/s) for a CUDA device name; None when not in the table."""
    lowered = name.lower()
    for key, label, tflops in CARD_PEAKS:
        if key in lowered:
            return label, tflops
    return None


def parse_shapes(text: str) -> tuple[tuple[int, int], ...]:
    shapes = []
    for part in text.split(","):
        width, _, height = part.strip().lower().partition("x")
        if not (width.isdigit() and height.isdigit()) or int(width) % 8 or int(height) % 8:
            raise SystemExit(
                f"--shapes {text!r}: write WIDTHxHEIGHT pairs, multiples of 8, e.g. 512x512,768x512"
            )
        shapes.append((int(width), int(height)))
    return tuple(shapes)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def under_policy(policy: PrecisionPolicy, forward: Callable[..., Any]) -> Callable[..., Any]:
    """``forward`` under the policy's autocast, as voidprompt's Engine calls its UNet and CLIP."""

    @functools.wraps(forward)
    def call(*args: Any, **kwargs: Any) -> Any:
        with policy.autocast_context():
            return forward(*args, **kwargs)

    return call


def write_checkpoint(folder: Path, smoke: bool, family: str = "sd1") -> Path:
    from voidprompt.models.detect import ModelFamily
    from voidprompt.testing.fake_checkpoints import (
        write_random_full_size,
        write_random_full_size_sd15,
        write_tiny_checkpoint,
        write_tiny_sdxl_checkpoint,
    )

    if family == "sdxl":
        if smoke:
            return write_tiny_sdxl_checkpoint(folder / "tiny-sdxl.safetensors")
        return write_random_full_size(folder / "random-sdxl.safetensors", ModelFamily.SDXL)
    if smoke:
        return write_tiny_checkpoint(folder / "tiny.safetensors")
    return write_random_full_size_sd15(folder / "random-sd15.safetensors")


def diffusers_pipeline(checkpoint: Path, cfg: Config, folder: Path) -> Any:
    """StableDiffusionPipeline (StableDiffusionXLPipeline for SDXL) over modules voidprompt's loader
    made from ``checkpoint``."""
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline
    from diffusers.models.attention_processor import AttnProcessor2_0

    from voidprompt.models.load import load_model
    from voidprompt.testing.hf_tokenizer import hf_clip_tokenizer

    components = load_model(checkpoint, device=cfg.device, precision=cfg.policy)
    _ = components.checkpoint.short_hash  # the sha256, cached for the voidprompt sides' loads
    if components.family.is_sdxl != (cfg.family == "sdxl"):
        raise SystemExit(
            f"--checkpoint {checkpoint}: a {components.family.label} file, but --family is {cfg.family}"
        )
    for module in (components.unet, components.vae):
        # diffusers' own defaults, whatever voidprompt's loader prefers for its Engine.
        module.to(memory_format=torch.contiguous_format)
        module.set_attn_processor(AttnProcessor2_0())
    for module in (components.unet, components.text_encoder, components.text_encoder_2):
        if module is not None:
            module.forward = under_policy(cfg.policy, module.forward)
    # steps_offset is unused by "linspace" spacing; 1 only silences diffusers' config warning.
    scheduler = EulerAncestralDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        timestep_spacing="linspace", steps_offset=1,
    )  # fmt: skip
    if cfg.family == "sdxl":
        return _sdxl_pipeline(components, scheduler, folder)
    pipe = StableDiffusionPipeline(
        vae=components.vae, text_encoder=components.text_encoder,
        tokenizer=hf_clip_tokenizer(folder / "tokenizer"), unet=components.unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)  # type: ignore[attr-defined]
    return pipe


def _sdxl_pipeline(components: Any, scheduler: Any, folder: Path) -> Any:
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    from voidprompt.testing.hf_tokenizer import hf_clip_tokenizer, write_hf_clip_tokenizer_files

    # bigG's tokenizer pads with id 0, "!" in the CLIP vocabulary; CLIP-L's pads with its end token.
    tokenizer_2 = CLIPTokenizer.from_pretrained(
        str(write_hf_clip_tokenizer_files(folder / "tokenizer_2")), local_files_only=True,
        pad_token="!", model_max_length=77,
    )  # fmt: skip
    # diffusers decodes an fp16 SDXL VAE in float32 when force_upcast is set (its default, for the
    # original SDXL VAE's overflow); every side here decodes in the policy's VAE precision instead,
    # and a NaN on any side fails the run.
    components.vae.register_to_config(force_upcast=False)
    pipe = StableDiffusionXLPipeline(
        vae=components.vae, text_encoder=components.text_encoder, text_encoder_2=components.text_encoder_2,
        tokenizer=hf_clip_tokenizer(folder / "tokenizer"), tokenizer_2=tokenizer_2, unet=components.unet,
        scheduler=scheduler, add_watermarker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)  # type: ignore[attr-defined]
    return pipe


def latent_factor(pipe: Any) -> int:
    return int(2 ** (len(pipe.vae.config.block_out_channels) - 1))


# ---------------------------------------------------------------------------------- results


class Results:
    """Records appended to ``results.jsonl`` as they come, and ``results.md`` redrawn after each."""

    def __init__(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.jsonl = out / "results.jsonl"
        self.markdown = out / "results.md"
        self.jsonl.write_text("")
        self.records: list[dict[str, Any]] = []

    def add(self, record: dict[str, Any]) -> dict[str, Any]:
        self.records.append(record)
        with self.jsonl.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
        self.markdown.write_text(render_markdown(self.records), encoding="utf-8")
        return record

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r["kind"] == kind]


def shape_name(shape: tuple[int, int]) -> str:
    return f"{shape[0]}x{shape[1]}"


def _number(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render_markdown(records: Sequence[dict[str, Any]]) -> str:
    env = next((r for r in records if r["kind"] == "env"), {})
    lines = ["# GPU throughput: voidprompt against diffusers, same weights", ""]
    if env:
        peak = env.get("peak_tflops")
        peak_text = f"{env.get('peak_name')} {peak:.0f} TFLOP/s dense fp16/bf16" if peak else "unknown"
        lines += [
            f"- device: {env['device_name']} ({env['device']}), peak used: {peak_text}",
            f"- precision: {env['precision']}; {env['steps']} steps Euler a, CFG {CFG_SCALE:g}, "
            "empty prompt, NovelAI negative list",
            f"- checkpoint: {env['checkpoint']}; diffusers sides: {env.get('pipeline', '-')}",
            f"- torch {env['torch']} (CUDA {env['cuda']}), diffusers {env['diffusers']}, "
            f"transformers {env['transformers']}, voidprompt {env['voidprompt']}, Python {env['python']}",
            "",
        ]
    sides = [r for r in records if r["kind"] in ("side", "skip", "error")]
    if sides:
        lines += [
            "| shape | side | images | seconds | images/s | batch | UNet TFLOP/s | share of peak | note |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in sides:
            if r["kind"] == "side":
                batch = r.get("batch")
                lines.append(
                    f"| {r['shape']} | {r['side']} | {r['images']} | {r['seconds']:.2f} | "
                    f"{r['images_per_s']:.3f} | {'-' if batch is None else batch} | "
                    f"{_number(r.get('unet_tflops'), 1)} | {_percent(r.get('peak_share'))} | "
                    f"{r.get('note', '')} |"
                )
            else:
                why = r.get("reason") or r.get("error", "")
                lines.append(f"| {r['shape']} | {r['side']} | - | - | - | - | - | - | {r['kind']}: {why} |")
        lines.append("")
    ratios = [r for r in records if r["kind"] == "ratio"]
    if ratios:
        lines += ["| shape | ratio | value | target |", "|---|---|---|---|"]
        for r in ratios:
            lines.append(f"| {r['shape']} | {r['name']} | {r['value']:.2f}x | {r.get('target', '')} |")
        lines.append("")
    unet = [r for r in records if r["kind"] == "unet"]
    if unet:
        lines += [
            "| shape | UNet alone | rows | GFLOP per call | ms per call | TFLOP/s | share of peak |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in unet:
            lines.append(
                f"| {r['shape']} | {r['what']} | {r['rows']} | {r['flops'] / 1e9:.1f} | "
                f"{_number(r.get('ms'), 1)} | {_number(r.get('tflops'), 1)} | "
                f"{_percent(r.get('peak_share'))} |"
            )
        lines.append("")
    failures = [r for r in records if r["kind"] == "side" and r.get("nan")]
    if failures:
        lines.append(
            "**NaN fallback hit by: " + ", ".join(f"{r['side']} at {r['shape']}" for r in failures) + "**"
        )
    return "\n".join(lines) + "\n"


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{100.0 * share:.1f}%"


# ------------------------------------------------------------------------------------ budget


class Budget:
    """Seconds left for the run, and estimates of each step from what was measured so far."""

    def __init__(self, seconds: float, started: float) -> None:
        self.seconds = seconds
        self.started = started
        self.per_pixel: dict[str, float] = {}  # side -> seconds per image per pixel
        self.fixed: dict[str, float] = {}  # side -> seconds per run whatever its size (model load)

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.started)

    def learn(
        self, side: str, seconds: float, images: int, shape: tuple[int, int], fixed: float = 0.0
    ) -> None:
        self.per_pixel[side] = seconds / (images * shape[0] * shape[1])
        self.fixed[side] = fixed

    def estimate(self, side: str, images: int, shape: tuple[int, int]) -> float | None:
        if side not in self.per_pixel:
            return None
        return self.per_pixel[side] * images * shape[0] * shape[1] + self.fixed[side]

    def refusal(self, estimate: float | None) -> str | None:
        """Why a step of this estimate may not start now; None when it may."""
        left = self.left()
        if left <= 0:
            return f"budget spent ({self.seconds:.0f} s)"
        if estimate is not None and estimate * ESTIMATE_MARGIN > left:
            return f"estimated {estimate:.0f} s, {left:.0f} s of the {self.seconds:.0f} s budget left"
        return None


# ------------------------------------------------------------------------------------- sides


@dataclass
class SideRun:
    images: int
    seconds: float
    batch: int | str | None = None
    nan: bool = False
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def run_diffusers(
    pipe: Any, cfg: Config, shape: tuple[int, int], seeds: Sequence[int], per_call: int, folder: Path
) -> SideRun:
    """Images for ``seeds`` in calls of ``per_call``, each saved as a PNG; timed from the first call
    to the last file. Out of GPU memory halves ``per_call`` and starts the clock again."""
    folder.mkdir(parents=True, exist_ok=True)
    notes = []
    while True:
        try:
            run = _diffusers_calls(pipe, cfg, shape, seeds, per_call, folder)
        except torch.cuda.OutOfMemoryError:
            free_memory(cfg.device)
            if per_call == 1:
                raise
            notes.append(f"out of memory at {per_call} per call")
            per_call //= 2
            continue
        run.notes = notes + run.notes
        return run


def _diffusers_calls(
    pipe: Any, cfg: Config, shape: tuple[int, int], seeds: Sequence[int], per_call: int, folder: Path
) -> SideRun:
    width, height = shape
    nan = False
    sync(cfg.device)
    started = time.perf_counter()
    for start in range(0, len(seeds), per_call):
        chunk = seeds[start : start + per_call]
        generators = [torch.Generator(cfg.device).manual_seed(seed) for seed in chunk]
        output = pipe(
            prompt="", negative_prompt=NEGATIVE, num_inference_steps=cfg.steps, guidance_scale=CFG_SCALE,
            width=width, height=height, num_images_per_prompt=len(chunk),
            generator=generators if len(generators) > 1 else generators[0], output_type="np",
        )  # fmt: skip
        pixels = output.images
        # diffusers has no fallback: a half-precision overflow shows as NaN/inf pixels here.
        nan = nan or not bool(np.isfinite(pixels).all())
        for seed, image in zip(chunk, pipe.numpy_to_pil(pixels), strict=True):
            image.save(folder / f"{seed:05d}.png")
    seconds = time.perf_counter() - started
    return SideRun(len(seeds), seconds, batch=per_call, nan=nan)


class WarningWatch(logging.Handler):
    """voidprompt's warnings during one side (its VAE's fp16 NaN fallback logs one)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    @property
    def nan(self) -> bool:
        return any("NaN" in message for message in self.messages)

    def __enter__(self) -> WarningWatch:
        logging.getLogger("voidprompt").addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("voidprompt").removeHandler(self)


@contextlib.contextmanager
def replaced_in_lab(name: str, original: Any, replacement: Any) -> Iterator[int]:
    """Every ``voidprompt.lab`` module's global ``name`` bound to ``original`` bound to ``replacement``
    while inside; yields how many modules had it (0: the lab calls it from somewhere else)."""
    modules = [
        module
        for key, module in list(sys.modules.items())
        if key.startswith("voidprompt.lab") and getattr(module, name, None) is original
    ]
    for module in modules:
        setattr(module, name, replacement)
    try:
        yield len(modules)
    finally:
        for module in modules:
            setattr(module, name, original)


def study_text(
    cfg: Config, shape: tuple[int, int], checkpoint: Path, images: int, *, labeler: str | None, compile: bool
) -> str:
    """The study file of one voidprompt side: one job per seed 1..images."""
    from voidprompt.lab.schema import RunOptions

    run: dict[str, Any] = {}
    if cfg.batch_size is not None:
        run["batch_size"] = cfg.batch_size
    wanted = {"device": str(cfg.device), "precision": cfg.policy.name, "compile": compile}
    known = {f.name for f in dataclasses.fields(RunOptions)}
    for key, value in wanted.items():
        if key in known:
            run[key] = value
        elif (key, value) not in (("device", "cpu"), ("precision", "fp32"), ("compile", False)):
            raise BenchmarkError(f"this voidprompt's study files have no [run] {key}; it cannot run {value}")
    lines = [
        "[study]",
        f'name = "gpu-throughput-{shape_name(shape)}"',
        "master_seed = 1",
        "[model]",
        f"checkpoint = {json.dumps(str(checkpoint))}",
        "[settings]",
        'sampler_name = "Euler a"',
        f"steps = {cfg.steps}",
        f"cfg_scale = {CFG_SCALE}",
        "clip_skip = 1",
        f"width = {shape[0]}",
        f"height = {shape[1]}",
        "[prompt]",
        'positive = ""',
        f"negative = {json.dumps(NEGATIVE)}",
        "[axes]",
        f'seed = "1-{images}"',
        "[run]",
        *(f"{key} = {json.dumps(value)}" for key, value in run.items()),
        "[labels]",
        f"labeler = {json.dumps(labeler or 'none')}",
    ]
    return "\n".join(lines) + "\n"


def run_voidprompt(
    cfg: Config,
    shape: tuple[int, int],
    checkpoint: Path,
    folder: Path,
    images: int,
    *,
    measures: bool,
    labeler: str | None,
    compile: bool = False,
) -> SideRun:
    """``run_study`` on a study written into ``folder``; the model load inside it is timed apart."""
    from voidprompt.lab.catalog import Catalog
    from voidprompt.lab.measures import measure_image
    from voidprompt.lab.plugins import Plugins
    from voidprompt.lab.run import run_study
    from voidprompt.lab.study import parse_study
    from voidprompt.models.load import load_model

    folder.mkdir(parents=True, exist_ok=True)
    text = study_text(cfg, shape, checkpoint, images, labeler=labeler, compile=compile)
    path = folder / "study.toml"
    path.write_text(text, encoding="utf-8")
    study = parse_study(text, path)
    plugins = Plugins(labelers={"detector": _detector})
    loads: list[float] = []

    def timed_load(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return load_model(*args, **kwargs)
        finally:
            sync(cfg.device)
            loads.append(time.perf_counter() - started)

    measured: list[int] = []

    def no_measures(image: Any) -> dict[str, float]:
        measured.append(1)
        return {}

    notes = []
    with contextlib.ExitStack() as stack:
        watch = stack.enter_context(WarningWatch())
        if not stack.enter_context(replaced_in_lab("load_model", load_model, timed_load)):
            notes.append("model load not separated: the lab loads through another function")
        if not measures and not stack.enter_context(
            replaced_in_lab("measure_image", measure_image, no_measures)
        ):
            raise BenchmarkError("cannot switch the measures off: the lab measures through another function")
        report = run_study(study, study.run.override(progress=False), plugins)
    free_memory(cfg.device)
    if report.failed:
        job, reason = next(iter(report.failed.items()))
        raise BenchmarkError(f"{len(report.failed)} jobs failed; first ({job}): {reason}")
    if report.generated != images:
        raise BenchmarkError(f"run_study made {report.generated} images of {images}")
    if not measures and not measured:
        notes.append("measures were not switched off (computed outside this process)")
    load_s = sum(loads)
    with Catalog.open(report.catalog_path, readonly=True) as catalog:
        rows = catalog.images()
    # The sampler runs' sizes, as the catalog records them (a column, or in older catalogs the timings).
    sizes = sorted({int(row.get("batch_size") or row["timings"].get("batch_size", 0)) for row in rows})
    batch = "/".join(str(s) for s in sizes) if sizes else None
    placements = catalog_runs(report.catalog_path)
    if placements:
        notes.append("ran on " + "; ".join(placements))
    if placements and cfg.device.type == "cuda" and not all(p.startswith("cuda") for p in placements):
        raise BenchmarkError(f"voidprompt ran on {', '.join(placements)}, not on {cfg.device}")
    return SideRun(
        images,
        report.seconds - load_s,
        batch=batch,
        nan=watch.nan,
        notes=notes,
        extra={"load_s": round(load_s, 3), "run_study_s": round(report.seconds, 3), "ran_on": placements},
    )


def catalog_runs(path: Path) -> list[str]:
    """ "device precision (GPU)" of each run the catalog recorded; empty for a catalog without them."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        try:
            rows = db.execute("SELECT device, precision, gpu_name FROM runs").fetchall()
        except sqlite3.OperationalError:  # a catalog from before provenance was recorded
            return []
    return [f"{device} {precision}" + (f" ({gpu})" if gpu else "") for device, precision, gpu in rows]


def _detector() -> Any:
    from voidprompt.demo.labeler import DetectorLabeler

    return DetectorLabeler()


# -------------------------------------------------------------------------------------- UNet


def unet_inputs(
    pipe: Any, cfg: Config, shape: tuple[int, int], rows: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor] | None]:
    """A UNet call's latents, timesteps and context, and SDXL's added conditions (None for SD1):
    bigG's pooled vector and the six size numbers (original size, crop 0, 0, target size)."""
    factor = latent_factor(pipe)
    generator = torch.Generator(cfg.device).manual_seed(0)
    unet = pipe.unet
    x = torch.randn(
        rows,
        unet.config.in_channels,
        shape[1] // factor,
        shape[0] // factor,
        generator=generator,
        device=cfg.device,
    ).to(cfg.policy.weights)
    t = torch.full((rows,), 999.0, device=cfg.device)
    context = torch.randn(rows, 77, unet.config.cross_attention_dim, generator=generator, device=cfg.device)
    added = None
    if unet.config.addition_embed_type == "text_time":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        text_embeds = torch.randn(rows, pooled, generator=generator, device=cfg.device)
        height, width = shape[1], shape[0]
        time_ids = torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32, device=cfg.device)
        added = {
            "text_embeds": text_embeds.to(cfg.policy.weights),
            "time_ids": time_ids.repeat(rows, 1).to(cfg.policy.weights),
        }
    return x, t, context.to(cfg.policy.weights), added


@torch.no_grad()
def count_unet_flops(pipe: Any, cfg: Config, shape: tuple[int, int]) -> tuple[int, bool]:
    """FLOPs of one UNet call on 2 rows (one image's cond and uncond), and whether its output was finite."""
    x, t, context, added = unet_inputs(pipe, cfg, shape, 2)
    # Attention through the math backend: its two matrix products are counted on every device
    # (the CPU's fused kernel has no FLOP formula), the same 4*b*h*n*n*d as the CUDA kernels' formulas.
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        out = pipe.unet(x, t, encoder_hidden_states=context, added_cond_kwargs=added).sample
    return int(counter.get_total_flops()), bool(torch.isfinite(out).all())


@torch.no_grad()
def time_unet(pipe: Any, cfg: Config, shape: tuple[int, int], rows: int, repeats: int) -> float:
    """Seconds per bare UNet call on ``rows`` rows (after two untimed calls)."""
    x, t, context, added = unet_inputs(pipe, cfg, shape, rows)
    for _ in range(2):
        pipe.unet(x, t, encoder_hidden_states=context, added_cond_kwargs=added)
    sync(cfg.device)
    started = time.perf_counter()
    for _ in range(repeats):
        pipe.unet(x, t, encoder_hidden_states=context, added_cond_kwargs=added)
    sync(cfg.device)
    return (time.perf_counter() - started) / repeats


# -------------------------------------------------------------------------------------- main


class Bench:
    """One run: the configuration, the pipeline, the budget and the records."""

    def __init__(
        self,
        cfg: Config,
        pipe: Any,
        checkpoint: Path,
        work: Path,
        results: Results,
        budget: Budget,
        peak_tflops: float | None,
    ) -> None:
        self.cfg = cfg
        self.pipe = pipe
        self.checkpoint = checkpoint
        self.work = work
        self.results = results
        self.budget = budget
        self.peak = peak_tflops
        self.flops: dict[tuple[int, int], int] = {}  # shape -> FLOPs of one image's UNet call (2 rows)
        self.rates: dict[tuple[str, tuple[int, int]], float] = {}  # (side, shape) -> images/s

    # -- one side

    def side(
        self,
        name: str,
        shape: tuple[int, int],
        images: int,
        run: Callable[[], SideRun],
        *,
        learn_as: str | None = None,
        extra_estimate: float = 0.0,
    ) -> SideRun | None:
        """Run one side if the budget allows, and record it (or why it did not run). ``learn_as``
        names the measured side whose rate estimates this one (default: itself)."""
        learn_as = learn_as or name
        estimate = self.budget.estimate(learn_as, images, shape)
        refusal = self.budget.refusal(None if estimate is None else estimate + extra_estimate)
        base = {"side": name, "shape": shape_name(shape)}
        if refusal is not None:
            print(f"skip {name} at {shape_name(shape)}: {refusal}", flush=True)
            self.results.add({"kind": "skip", **base, "reason": refusal})
            return None
        print(f"{name} at {shape_name(shape)}: {images} images ...", flush=True)
        if self.cfg.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.cfg.device)
        try:
            result = run()
        except Exception as error:  # recorded and reported; the other sides still run
            free_memory(self.cfg.device)
            traceback.print_exc()
            self.results.add({"kind": "error", **base, "error": f"{type(error).__name__}: {error}"})
            return None
        rate = result.images / result.seconds
        self.rates[(name, shape)] = rate
        if name == learn_as:
            fixed = float(result.extra.get("load_s", 0.0))
            self.budget.learn(name, result.seconds, result.images, shape, fixed=fixed)
        unet_tflops = None
        if shape in self.flops:
            unet_tflops = self.flops[shape] * self.cfg.steps * rate / 1e12
        record = {
            "kind": "side",
            **base,
            "images": result.images,
            "seconds": round(result.seconds, 4),
            "images_per_s": rate,
            "batch": result.batch,
            "nan": result.nan,
            "unet_tflops": unet_tflops,
            "peak_share": None if unet_tflops is None or self.peak is None else unet_tflops / self.peak,
            "note": "; ".join(result.notes),
            **result.extra,
        }
        if self.cfg.device.type == "cuda":
            record["peak_gib"] = round(torch.cuda.max_memory_allocated(self.cfg.device) / 2**30, 2)
        self.results.add(record)
        tflops_text = "" if unet_tflops is None else f", UNet {unet_tflops:.1f} TFLOP/s"
        nan_text = " NaN FALLBACK" if result.nan else ""
        print(f"  {rate:.3f} images/s ({result.seconds:.2f} s, batch {result.batch}){tflops_text}{nan_text}")
        return result

    def folder(self, name: str, shape: tuple[int, int]) -> Path:
        return self.work / shape_name(shape) / name.replace(", ", "-").replace(" ", "-")

    def diffusers(
        self, name: str, shape: tuple[int, int], images: int, per_call: int, **how: Any
    ) -> SideRun | None:
        seeds = list(range(1, images + 1))
        folder = self.folder(name, shape)
        return self.side(
            name,
            shape,
            images,
            lambda: run_diffusers(self.pipe, self.cfg, shape, seeds, per_call, folder),
            **how,
        )

    def voidprompt(
        self,
        name: str,
        shape: tuple[int, int],
        *,
        measures: bool,
        labeler: str | None,
        compile: bool = False,
        **how: Any,
    ) -> SideRun | None:
        cfg = self.cfg
        folder = self.folder(name, shape)

        def run() -> SideRun:
            return run_voidprompt(
                cfg,
                shape,
                self.checkpoint,
                folder,
                cfg.images,
                measures=measures,
                labeler=labeler,
                compile=compile,
            )

        return self.side(name, shape, cfg.images, run, **how)

    def ratio(self, shape: tuple[int, int], ours: str, theirs: str, target: str = "") -> None:
        a, b = self.rates.get((ours, shape)), self.rates.get((theirs, shape))
        if a is not None and b is not None:
            name = f"{ours} / {theirs}"
            self.results.add(
                {"kind": "ratio", "shape": shape_name(shape), "name": name, "value": a / b, "target": target}
            )

    # -- one shape

    def shape(self, shape: tuple[int, int], first: bool) -> None:
        cfg = self.cfg
        refusal = self.budget.refusal(None)
        if refusal is not None:
            print(f"skip {shape_name(shape)}: {refusal}", flush=True)
            self.results.add(
                {"kind": "skip", "side": "every side", "shape": shape_name(shape), "reason": refusal}
            )
            return
        flops, finite = count_unet_flops(self.pipe, cfg, shape)
        self.flops[shape] = flops
        what = "FLOP count (FlopCounterMode)"
        self.results.add(
            {"kind": "unet", "shape": shape_name(shape), "what": what, "rows": 2, "flops": flops}
        )
        per_image = flops * cfg.steps / 1e12
        print(f"{shape_name(shape)}: UNet on 2 rows {flops / 1e9:.1f} GFLOP, an image {per_image:.2f} TFLOP")
        if not finite:
            error = "the UNet gave NaN/inf on random inputs"
            self.results.add({"kind": "error", "side": "UNet", "shape": shape_name(shape), "error": error})
        # Untimed: the first call at a shape pays for kernel selection and lazy initialisation.
        self.pipe(
            prompt="", negative_prompt=NEGATIVE, num_inference_steps=2, guidance_scale=CFG_SCALE,
            width=shape[0], height=shape[1], output_type="np",
        )  # fmt: skip
        loop = None
        if cfg.loop_images:
            loop = self.diffusers("diffusers loop", shape, cfg.loop_images, 1)
        else:
            reason = "off (--loop-images 0)"
            if cfg.family == "sdxl":
                reason = "off by default for SDXL, to fit the budget (--loop-images 8 runs it)"
            print(f"skip diffusers loop at {shape_name(shape)}: {reason}", flush=True)
            self.results.add(
                {"kind": "skip", "side": "diffusers loop", "shape": shape_name(shape), "reason": reason}
            )
        if loop is not None:
            extrapolated = cfg.images * loop.seconds / loop.images
            print(f"  the loop would take {extrapolated:.1f} s for {cfg.images} images")
        batched = self.diffusers("diffusers batched", shape, cfg.images, cfg.images)
        self.voidprompt("voidprompt", shape, measures=True, labeler=cfg.labeler)
        if first:
            self.voidprompt("voidprompt lean", shape, measures=False, labeler=None, learn_as="voidprompt")
        target = shape == (512, 512) and cfg.family == "sd1"
        self.ratio(shape, "voidprompt", "diffusers loop", ">= 2x" if target else "")
        self.ratio(shape, "voidprompt", "diffusers batched", ">= 1.0x" if target else "")
        self.ratio(shape, "voidprompt lean", "diffusers loop")
        self.ratio(shape, "voidprompt lean", "diffusers batched")
        self.ratio(shape, "voidprompt lean", "voidprompt")
        self.ratio(shape, "diffusers batched", "diffusers loop")
        per_call = batched.batch if batched is not None and isinstance(batched.batch, int) else cfg.images
        for what, rows in (("one image (2 rows)", 2), (f"batched ({2 * per_call} rows)", 2 * per_call)):
            self.unet_alone(shape, what, rows)

    def unet_alone(self, shape: tuple[int, int], what: str, rows: int) -> None:
        if self.budget.refusal(UNET_TIMING_GUESS_S * shape[0] * shape[1] / 512**2) is not None:
            return
        flops = self.flops[shape] * rows // 2
        record: dict[str, Any] = {
            "kind": "unet",
            "shape": shape_name(shape),
            "what": what,
            "rows": rows,
            "flops": flops,
        }
        try:
            seconds = time_unet(self.pipe, self.cfg, shape, rows, repeats=2 if self.cfg.smoke else 5)
        except torch.cuda.OutOfMemoryError:
            free_memory(self.cfg.device)
            record["what"] += ": out of memory"
        else:
            tflops = flops / seconds / 1e12
            share = None if self.peak is None else tflops / self.peak
            record.update(ms=1000 * seconds, tflops=tflops, peak_share=share)
        self.results.add(record)

    # -- torch.compile

    def compiled(self, shape: tuple[int, int]) -> None:
        cfg = self.cfg
        for attempt, extra in (("first run", COMPILE_GUESS_S), ("second run", 0.0)):
            self.voidprompt(
                f"voidprompt compiled, {attempt}", shape, measures=True, labeler=cfg.labeler, compile=True,
                learn_as="voidprompt", extra_estimate=extra,
            )  # fmt: skip
        original = self.pipe.unet
        self.pipe.unet = torch.compile(original)
        try:
            for attempt, extra in (("first call", COMPILE_GUESS_S), ("second call", 0.0)):
                name = f"diffusers batched compiled, {attempt}"
                self.diffusers(
                    name, shape, cfg.images, cfg.images, learn_as="diffusers batched", extra_estimate=extra
                )
        finally:
            self.pipe.unet = original
        self.ratio(shape, "voidprompt compiled, second run", "voidprompt")
        self.ratio(shape, "diffusers batched compiled, second call", "diffusers batched")
        self.ratio(shape, "voidprompt compiled, second run", "diffusers batched compiled, second call")


def make_config(args: argparse.Namespace) -> Config:
    if args.smoke and args.compile:
        raise SystemExit("--compile is not part of --smoke (compiling on the CPU takes minutes)")
    device = resolve_device(args.device or ("cpu" if args.smoke else "cuda"))
    policy = resolve_precision(args.precision or ("fp32" if args.smoke else "fp16"), device)
    sdxl = args.family == "sdxl"
    if args.shapes:
        shapes = parse_shapes(args.shapes)
    else:
        shapes = ((32, 32),) if args.smoke else SDXL_SHAPES if sdxl else SHAPES
    # SDXL's loop is off unless asked for: one image a call at 1024x1024 does not fit the default
    # budget beside the batched and voidprompt sides and the 6.5 GiB checkpoint's set-up.
    default_loop = 0 if sdxl else 2 if args.smoke else 8
    loop_images = default_loop if args.loop_images is None else args.loop_images
    return Config(
        device=device,
        policy=policy,
        shapes=shapes,
        images=args.images or (2 if args.smoke else 16 if sdxl else 64),
        loop_images=loop_images,
        steps=args.steps or (3 if args.smoke else 20),
        compile=args.compile,
        labeler=args.labeler,
        batch_size=args.batch_size,
        smoke=args.smoke,
        family=args.family,
    )


def environment(cfg: Config, checkpoint: str, peak: tuple[str, float] | None) -> dict[str, Any]:
    import diffusers
    import transformers

    name = (
        torch.cuda.get_device_name(cfg.device) if cfg.device.type == "cuda" else platform.processor() or "CPU"
    )
    return {
        "kind": "env",
        "device": str(cfg.device),
        "device_name": name,
        "peak_name": None if peak is None else peak[0],
        "peak_tflops": None if peak is None else peak[1],
        "precision": f"{cfg.policy.name} (weights {cfg.policy.weights}, autocast {cfg.policy.autocast}, "
        f"VAE {cfg.policy.vae})",
        "steps": cfg.steps,
        "checkpoint": checkpoint,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "voidprompt": voidprompt.__version__,
        "python": platform.python_version(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/gpu-throughput"), help="results folder")
    parser.add_argument("--budget-s", type=float, default=300.0, help="stop starting steps past this (s)")
    parser.add_argument(
        "--smoke", action="store_true", help="CPU, tiny checkpoint, one shape, 2 images a side"
    )
    parser.add_argument("--family", choices=FAMILIES, default="sd1", help="model family (default sd1)")
    parser.add_argument("--compile", action="store_true", help="also torch.compile at the first shape")
    parser.add_argument(
        "--shapes", help="WIDTHxHEIGHT list (default 512x512,768x512,1408x512; SDXL: 1024x1024)"
    )
    parser.add_argument(
        "--images", type=int, help="images per batched and voidprompt side (default 64; SDXL: 16)"
    )
    parser.add_argument(
        "--loop-images", type=int, help="images of the per-image loop, 0 skips it (default 8; SDXL: 0)"
    )
    parser.add_argument("--steps", type=int, help="sampling steps (default 20)")
    parser.add_argument("--device", help="default cuda (cpu with --smoke)")
    parser.add_argument("--precision", help="auto, fp32, fp16, bf16 (default fp16; fp32 with --smoke)")
    parser.add_argument(
        "--checkpoint", type=Path, help="a checkpoint of --family's instead of random weights"
    )
    parser.add_argument("--labeler", help="a registered labeler for the voidprompt side (default none)")
    parser.add_argument("--batch-size", type=int, help="voidprompt's [run] batch_size (default: its own)")
    parser.add_argument("--peak-tflops", type=float, help="the card's dense fp16 peak, if not in the table")
    parser.add_argument("--work", type=Path, help="where images and studies go (default: a temporary folder)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    cfg = make_config(args)
    results = Results(args.out)
    budget = Budget(args.budget_s, started)
    peak: tuple[str, float] | None = None
    if args.peak_tflops:
        peak = ("--peak-tflops", args.peak_tflops)
    elif cfg.device.type == "cuda":
        peak = card_peak(torch.cuda.get_device_name(cfg.device))
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu-throughput-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        checkpoint = args.checkpoint or write_checkpoint(work, cfg.smoke, cfg.family)
        written = time.perf_counter() - t0
        pipe = diffusers_pipeline(checkpoint, cfg, work)
        if args.checkpoint:
            described = str(args.checkpoint)
        elif cfg.smoke:
            described = f"tiny {'SDXL ' if cfg.family == 'sdxl' else ''}test checkpoint (random)"
        elif cfg.family == "sdxl":
            described = "full-size SDXL base layout, random weights (std 0.02)"
        else:
            described = "full-size SD1.5 layout, random weights (std 0.02)"
        env = environment(cfg, described, peak)
        env["pipeline"] = type(pipe).__name__
        env["checkpoint_write_s"] = round(written, 2)
        env["setup_s"] = round(time.perf_counter() - started, 2)
        results.add(env)
        print(
            f"{env['device_name']}: peak {env['peak_name'] or 'unknown'} {env['peak_tflops'] or ''}; "
            f"{env['precision']}; set-up {env['setup_s']} s (checkpoint {written:.1f} s)",
            flush=True,
        )
        bench = Bench(cfg, pipe, checkpoint, work, results, budget, None if peak is None else peak[1])
        for index, shape in enumerate(cfg.shapes):
            bench.shape(shape, first=index == 0)
        if cfg.compile:
            bench.compiled(cfg.shapes[0])
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    nan = [r for r in results.of("side") if r["nan"]]
    errors = results.of("error")
    print(f"\nresults: {results.jsonl} and {results.markdown} ({time.perf_counter() - started:.0f} s)\n")
    print(results.markdown.read_text(encoding="utf-8"))
    if nan:
        print("FAILED: a NaN fallback was hit by " + ", ".join(f"{r['side']} at {r['shape']}" for r in nan))
    if errors:
        print(f"{len(errors)} step(s) failed: see the table")
    return 1 if nan or errors else 0


if __name__ == "__main__":
    sys.exit(main())
