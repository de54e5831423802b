"""The demo gallery: a dozen pictures from the miniature model, as PNGs with infotext and an index.html.

Every picture goes through the same :class:`voidprompt.pipeline.engine.Engine` as any checkpoint:
the model's native size (128x128 for the shipped model), Euler a, 20 steps, Clip skip 2 (the model's
native layer), CFG 7. Half the gallery asks for
``<colour> <shape>``; the rest is the study's pure negative prompt: an empty prompt with NovelAI's
negative list.
"""

from __future__ import annotations

import html
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from voidprompt.demo.miniature import miniature_model_path
from voidprompt.files import atomic_write_text
from voidprompt.imagemeta import save_numbered
from voidprompt.models.components import Components
from voidprompt.models.load import load_model
from voidprompt.pipeline.engine import Engine
from voidprompt.prompts.nai import NOVELAI_NEGATIVE
from voidprompt.request import GenerationRequest

__all__ = ["GALLERY", "GalleryItem", "demo_request", "load_engine", "native_size", "write_gallery"]


@dataclass(frozen=True)
class GalleryItem:
    prompt: str
    negative_prompt: str
    count: int  # pictures, seeds seed .. seed+count-1


GALLERY: tuple[GalleryItem, ...] = (
    GalleryItem("red circle", "", 2),
    GalleryItem("blue square", "", 2),
    GalleryItem("yellow star", "", 1),
    GalleryItem("green triangle", "", 1),
    GalleryItem("purple circle, white background", "", 1),
    GalleryItem("orange star, black background", "", 1),
    GalleryItem("", NOVELAI_NEGATIVE, 4),
)


def load_engine(model: Path | None = None, *, threads: int | None = None) -> Engine:
    """An Engine on ``model`` (default: the shipped miniature model), fp32 on the CPU."""
    if threads is not None:
        torch.set_num_threads(threads)
    components = load_model(model or miniature_model_path(), device="cpu", dtype=torch.float32)
    return Engine(components)


def native_size(components: Components) -> int:
    """The picture side a model was trained at: the ``vae_sample_size`` of its ``voidprompt.arch``
    metadata (128 for the shipped miniature model; SD1's 512 for a checkpoint without it). The
    miniature model paints its shapes at this pixel scale whatever size it is asked for, so the
    detector reads every picture at it."""
    return int(components.arch.constants.vae_sample_size)


def demo_request(
    prompt: str, negative_prompt: str = "", *, size: int = 64, **changes: Any
) -> GenerationRequest:
    """The miniature model's standard request: ``size`` square (its native size), Euler a, 20 steps,
    Clip skip 2, CFG 7."""
    base = GenerationRequest(
        prompt=prompt,
        negative_prompt=negative_prompt,
        sampler_name="Euler a",
        steps=20,
        cfg_scale=7.0,
        width=size,
        height=size,
        clip_skip=2,
        seed=1000,
    )
    return base.replace(**changes)


def write_gallery(
    out_dir: str | Path,
    *,
    model: Path | None = None,
    seed: int = 1000,
    threads: int | None = 2,
    items: tuple[GalleryItem, ...] = GALLERY,
) -> Path:
    """Generate the gallery into ``out_dir`` (numbered PNGs with infotext, index.html); returns the index."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    engine = load_engine(model, threads=threads)
    size = native_size(engine.components)
    cells = []
    next_seed = seed
    for item in items:
        request = demo_request(
            item.prompt, item.negative_prompt, size=size, seed=next_seed, batch_size=item.count
        )
        next_seed += item.count
        result = engine.generate(request)
        for image, infotext, image_seed in zip(result.images, result.infotexts, result.seeds, strict=True):
            path = save_numbered(image, out, str(image_seed), infotext)
            cells.append((path.name, item.prompt, item.negative_prompt, image_seed))
    seconds = time.perf_counter() - started
    rows = "\n".join(
        f'<figure><img src="{html.escape(name)}" width="128" height="128" alt="">'
        f"<figcaption><b>{html.escape(prompt) or '<i>(empty)</i>'}</b>"
        f"{'<br>negative: NovelAI list' if negative == NOVELAI_NEGATIVE else ''}"
        f"<br>seed {image_seed}</figcaption></figure>"
        for name, prompt, negative, image_seed in cells
    )
    page = (
        "<!doctype html><meta charset=utf-8><title>voidprompt miniature model</title>"
        "<style>body{font-family:sans-serif}main{display:flex;flex-wrap:wrap;gap:12px}"
        "figure{margin:0;width:140px;font-size:12px}img{image-rendering:pixelated}</style>"
        "<h1>voidprompt miniature model</h1>"
        f"<p>{len(cells)} pictures, {size}x{size}, Euler a, 20 steps, Clip skip 2, CFG 7, "
        f"in {seconds:.1f} s. "
        "Negative prompt of the pure-negative pictures: "
        f"<code>{html.escape(NOVELAI_NEGATIVE)}</code></p>"
        f"<main>\n{rows}\n</main>\n"
    )
    index = out / "index.html"
    return atomic_write_text(index, page)
