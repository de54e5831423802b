"""A short fine-tune of the miniature model on one colour, and the LoRA check built on it.

:func:`finetune` loads a copy of a trained miniature checkpoint, trains its UNet for a few hundred
steps on world pictures whose shapes all have one colour (captions exactly as the world writes them)
with the trainer's own loss (eps prediction, Min-SNR weighting, tags reshuffled, caption dropout) and
exports it with :func:`voidprompt.demo.train.export_model`, so the file has the base's layout and
``voidprompt.arch`` metadata. The text encoder stays frozen: the UNet alone carries the change, and
``extract_lora`` then leaves the text encoder out (kohya's min_diff rule), as for most real LoRAs.

:func:`lora_colour_sweep` is the end-to-end check of LoRA extraction: extract a LoRA from (base, fine-tuned),
generate paired-seed pictures with a neutral prompt at several multipliers and measure, with the
detector, how many pictures have a shape of the colour and what share of the detected shapes has it.
Measured figures: docs/networks.md.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import t as student_t

from voidprompt.demo.detector import DetectorConfig, detect
from voidprompt.demo.generate import demo_request, load_engine, native_size
from voidprompt.demo.train import CaptionBatcher, adamw, export_model, text_condition
from voidprompt.demo.world import WorldConfig, caption, render, sample_scene
from voidprompt.errors import VoidpromptError
from voidprompt.lab.stats import SlopeFit, linear_slope, wilson_interval
from voidprompt.models.load import load_model, open_checkpoint, sd1_alphas_cumprod
from voidprompt.models.networks.extract import extract_lora, kohya_targets
from voidprompt.pipeline.engine import Engine

__all__ = [
    "ColourSweep",
    "SweepPoint",
    "colour_scenes",
    "finetune",
    "lora_colour_sweep",
]


def colour_scenes(colour: str, n: int, seed: int, size: int = 64) -> tuple[torch.Tensor, list[str]]:
    """(n, 3, size, size) uint8 world pictures whose every shape is ``colour``, and their captions.

    Scenes and captions come from the same per-index generators as ``world.make_dataset``; scenes are
    drawn first and only the matching ones rendered (rendering is the expensive part, and roughly one
    scene in ten matches)."""
    config = WorldConfig(size=size)
    images: list[torch.Tensor] = []
    captions: list[str] = []
    i = 0
    while len(captions) < n:
        scene = sample_scene(np.random.default_rng([seed, i, 0]), config)
        if all(obj.colour == colour for obj in scene.objects):
            picture = render(scene, size, config.supersample).convert("RGB")
            images.append(torch.from_numpy(np.array(picture, dtype=np.uint8)).permute(2, 0, 1))
            captions.append(caption(scene, np.random.default_rng([seed, i, 1])))
        i += 1
        if i > 200 * max(n, 1):
            raise VoidpromptError(f"no world scenes with only {colour!r} shapes; is it a shape colour?")
    return torch.stack(images), captions


def finetune(
    base_model_path: str | Path,
    out_path: str | Path,
    *,
    colour: str = "red",
    steps: int = 300,
    n_images: int = 128,
    batch_size: int = 8,
    lr: float = 3e-4,
    caption_dropout: float = 0.5,  # trains the unconditional branch that neutral prompts lean on
    min_snr_gamma: float = 5.0,
    seed: int = 7,
    trainable: str = "unet",
    threads: int = 2,
    log_fn: Callable[[str], None] | None = None,
) -> Path:
    """Fine-tune the UNet of ``base_model_path`` on ``colour``-only world pictures; write ``out_path``.

    ``trainable``: ``"unet"`` trains every UNet parameter (the demonstration's recipe: the LoRA then
    carries what the low-rank part of the difference in its target layers can); ``"lora_targets"``
    trains only the weights of the layers a LoRA extracted with a conv rank can change (kohya's
    targets, ResNet convs included; no biases, norms, conv_in/conv_out or time embedding), so a
    full-rank extraction reproduces the fine-tuned UNet exactly (the quick CLI test's check).

    Plain weights at the end, no EMA: a few hundred steps are too few for an EMA to settle, and the
    LoRA is meant to carry exactly what the steps changed. Deterministic for a given seed on one
    machine (CPU, fixed thread count)."""
    if trainable not in ("unet", "lora_targets"):
        raise VoidpromptError(f"trainable={trainable!r}: use 'unet' or 'lora_targets'")

    torch.set_num_threads(threads)
    started = time.perf_counter()
    components = load_model(base_model_path, device="cpu", dtype=torch.float32)
    unet, vae, text_encoder = components.unet, components.vae, components.text_encoder
    scaling = float(components.scaling_factor)
    images, captions = colour_scenes(colour, n_images, seed, native_size(components))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae.eval()
        with torch.no_grad():
            posterior = vae.encode(images.float() / 127.5 - 1.0).latent_dist
            lat_mean, lat_std = posterior.mean, posterior.std

        captions_in = CaptionBatcher(captions)
        abar = sd1_alphas_cumprod()
        snr = abar / (1.0 - abar)
        loss_weight = torch.clamp(snr, max=min_snr_gamma) / snr

        text_encoder.eval()
        text_encoder.requires_grad_(False)
        unet.train()
        if trainable == "unet":
            unet.requires_grad_(True)
            params = list(unet.parameters())
        else:
            unet.requires_grad_(False)
            targets = kohya_targets(unet, text_encoder, conv=True)
            params = [m.weight for _, part, _, m in targets if part == "unet"]
            for param in params:
                param.requires_grad_(True)
        opt = adamw(params, lr)
        n = lat_mean.shape[0]
        losses: list[float] = []
        for step in range(steps):
            idx = torch.randint(0, n, (batch_size,))
            x0 = (lat_mean[idx] + lat_std[idx] * torch.randn_like(lat_mean[idx])) * scaling
            ids = captions_in.batch(idx.tolist(), caption_dropout)
            t = torch.randint(0, 1000, (batch_size,))
            eps = torch.randn_like(x0)
            a = abar[t].view(-1, 1, 1, 1)
            xt = a.sqrt() * x0 + (1.0 - a).sqrt() * eps
            with torch.no_grad():
                context = text_condition(text_encoder, ids)
            pred = unet(xt, t, encoder_hidden_states=context).sample
            per_sample = (pred - eps).square().mean(dim=(1, 2, 3))
            loss = (per_sample * loss_weight[t]).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(loss.item())
            if log_fn is not None and (step + 1) % 25 == 0:
                log_fn(f"finetune {step + 1}/{steps} loss {sum(losses[-25:]) / 25:.4f}")

    unet.eval()
    with open_checkpoint(base_model_path) as reader:
        base_info = json.loads(reader.metadata.get("voidprompt.training", "{}"))
    info = {
        "command": "voidprompt.demo.finetune.finetune",
        "base": Path(base_model_path).name,
        "base_training": base_info,
        "finetune": {
            "colour": colour,
            "steps": steps,
            "n_images": n_images,
            "batch_size": batch_size,
            "lr": lr,
            "caption_dropout": caption_dropout,
            "seed": seed,
            "trainable": trainable,
            "seconds": round(time.perf_counter() - started, 1),
            "final_loss": round(sum(losses[-25:]) / max(1, len(losses[-25:])), 4),
        },
    }
    path = Path(out_path)
    export_model(path, unet, vae, text_encoder, scaling, info, image_size=native_size(components))
    return path


@dataclass
class SweepPoint:
    multiplier: float
    shapes: int  # detected shapes over all pictures
    coloured: int  # of which the detector names ``colour``
    images_with_shapes: int
    per_image: list[float] = field(default_factory=list)  # coloured share per picture with shapes
    has_colour: list[bool] = field(default_factory=list)  # per picture, in seed order: a ``colour`` shape?

    @property
    def share(self) -> float:
        """Share of the detected shapes that are ``colour``, pooled over the pictures."""
        return self.coloured / self.shapes if self.shapes else 0.0

    def interval(self) -> tuple[float, float]:
        """Wilson interval of :attr:`share`. Shapes of one picture are not independent trials, so this
        interval is somewhat too narrow; :meth:`picture_interval` is the one to compare."""
        return wilson_interval(self.coloured, self.shapes)

    @property
    def pictures(self) -> int:
        return len(self.has_colour)

    @property
    def pictures_with_colour(self) -> int:
        return sum(self.has_colour)

    @property
    def picture_share(self) -> float:
        """Share of the pictures in which the detector finds at least one ``colour`` shape."""
        return self.pictures_with_colour / self.pictures if self.pictures else 0.0

    def picture_interval(self) -> tuple[float, float]:
        """Wilson interval of :attr:`picture_share` (pictures are independent: one seed each)."""
        return wilson_interval(self.pictures_with_colour, self.pictures)


@dataclass
class ColourSweep:
    colour: str
    prompt: str
    points: list[SweepPoint]
    extract_seconds: float
    generate_seconds: float
    lora_layers: int

    def slope(self) -> Any:
        """Least-squares slope of the per-picture coloured share on the multiplier (lab.stats), pooled
        over the pictures that have shapes (unpaired: ignores that the seeds repeat)."""
        xs = [p.multiplier for p in self.points for _ in p.per_image]
        ys = [y for p in self.points for y in p.per_image]
        return linear_slope(xs, ys)

    def paired_slope(self, confidence: float = 0.95) -> Any:
        """Slope of "the picture has a ``colour`` shape" (0/1) on the multiplier, paired by seed: the
        least-squares slope of each seed's pictures across the multipliers, then the mean of those
        slopes with a t interval (n_seeds - 1 dof). Seeds are independent, so this interval is honest;
        the seed's own effect (some seeds give red shapes at every multiplier) cancels out."""
        xs = np.array([p.multiplier for p in self.points], dtype=np.float64)
        ys = np.array([p.has_colour for p in self.points], dtype=np.float64)  # (multipliers, seeds)
        if ys.ndim != 2 or ys.shape[1] < 2 or len(set(xs.tolist())) < 2:
            raise VoidpromptError("a paired slope needs two or more multipliers and seeds")
        dx = xs - xs.mean()
        per_seed = (dx[:, None] * (ys - ys.mean(axis=0))).sum(axis=0) / float((dx * dx).sum())
        n = per_seed.shape[0]
        mean = float(per_seed.mean())
        stderr = float(per_seed.std(ddof=1)) / float(np.sqrt(n))
        half = float(student_t.ppf(1.0 - (1.0 - confidence) / 2.0, n - 1)) * stderr
        intercept = float(ys.mean()) - mean * float(xs.mean())
        return SlopeFit(mean, intercept, stderr, mean - half, mean + half, n)

    def table(self) -> str:
        """One Markdown table row per multiplier: pictures with a ``colour`` shape and the share of
        detected shapes that are ``colour``, each with its 95% Wilson interval."""
        rows = [
            f"colour {self.colour!r}, prompt {self.prompt!r}",
            f"| M | pictures with a {self.colour} shape | {self.colour} share of detected shapes |",
            "|---|---|---|",
        ]
        for p in self.points:
            plo, phi = p.picture_interval()
            lo, hi = p.interval()
            rows.append(
                f"| {p.multiplier:g} | {p.pictures_with_colour}/{p.pictures} = {p.picture_share:.3f} "
                f"[{plo:.3f}, {phi:.3f}] | {p.coloured}/{p.shapes} = {p.share:.3f} [{lo:.3f}, {hi:.3f}] |"
            )
        return "\n".join(rows)


def lora_colour_sweep(
    base_model_path: str | Path,
    tuned_model_path: str | Path,
    work_dir: str | Path,
    *,
    colour: str = "red",
    multipliers: Sequence[float] = (0.0, 0.5, 1.0, 1.5),
    n_images: int = 16,
    seed: int = 1000,
    prompt: str = "",
    steps: int = 20,
    rank: int = 8,
    conv_rank: int | None = 8,
    batch: int = 16,
    threads: int = 2,
) -> ColourSweep:
    """Extract a rank-``rank`` LoRA (tuned - base; ResNet convs too at ``conv_rank``, since colour
    lives largely in the UNet's convs and not only in its attention) into ``work_dir/lora``, then
    generate ``n_images`` pictures per multiplier with the same seeds (Euler a, CFG 7, Clip skip 2,
    the base's native size; multiplier 0 is the base model without the tag) and record, per picture,
    whether the detector finds a ``colour`` shape and the share of its detected shapes that are
    ``colour``.

    The default prompt is empty: with CFG 7 and an empty negative prompt that is the unconditional
    prediction, which the fine-tune's caption dropout trains directly. A prompt that names a shape
    without a colour moves much less (the fine-tune teaches "red" where the caption says red, and CFG
    subtracts what the unconditional branch picked up)."""
    lora_dir = Path(work_dir) / "lora"
    lora_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    extracted = extract_lora(
        base_model_path, tuned_model_path, lora_dir / f"{colour}.safetensors", rank=rank, conv_rank=conv_rank
    )
    extract_seconds = time.perf_counter() - t0

    base_engine = load_engine(Path(base_model_path), threads=threads)
    engine = Engine(base_engine.components, lora_dir=lora_dir, missing_networks="error")
    side = native_size(base_engine.components)
    detector = DetectorConfig(native_size=side)
    points = []
    t0 = time.perf_counter()
    for m in multipliers:
        text = f"{prompt} <lora:{colour}:{m:g}>".strip() if m else prompt
        point = SweepPoint(float(m), 0, 0, 0)
        for start in range(0, n_images, batch):
            count = min(batch, n_images - start)
            request = demo_request(text, size=side, seed=seed + start, batch_size=count, steps=steps)
            for image in engine.generate(request).images:
                shapes = detect(image, detector).shapes
                hits = sum(s.colour == colour for s in shapes)
                point.shapes += len(shapes)
                point.coloured += hits
                point.has_colour.append(hits > 0)
                if shapes:
                    point.images_with_shapes += 1
                    point.per_image.append(hits / len(shapes))
        points.append(point)
    return ColourSweep(colour, prompt, points, extract_seconds, time.perf_counter() - t0, extracted.layers)
