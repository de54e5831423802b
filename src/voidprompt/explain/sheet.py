"""The explanation of one picture as a single HTML page, every image inline (base64 PNG).

The page shows, in order: the picture; each tag's attention over it (positive prompt first, then
the negative prompt), large for the whole generation and small per step window; the guidance
decomposition of a few steps (A1111's live-preview subjects "Prompt", "Negative prompt",
"Combined" and the map of |cond - uncond|); the trajectory of the combined previews (and the full-VAE
pictures when they were captured); the mean guidance difference and the prompt tokens' attention
share per window. It needs no engine and no network: a picture and an explanation are enough.

Every text from the prompt or the infotext is escaped: prompts are user input.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from voidprompt.explain.measures import guidance_differences, tag_measures
from voidprompt.explain.record import NEGATIVE, POSITIVE, WINDOW_ALL, CallInfo, Explanation, Preview
from voidprompt.explain.render import colorize, overlay, upscale
from voidprompt.explain.store import SUFFIX as EXPLANATION_SUFFIX
from voidprompt.files import atomic_write_text

SUFFIX = ".explain.html"
# Long side of each kind of image on the page: big enough to read, small enough that a sheet of
# forty tags stays a few megabytes.
PICTURE_SIDE = 384
TAG_SIDE = 192
WINDOW_SIDE = 96
PREVIEW_SIDE = 128
TOKEN_SIDE = 96
# Steps shown in the guidance decomposition (evenly spread over the stored previews).
DECOMPOSITION_STEPS = 4

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; background: #fafafa; }
h1 { font-size: 1.3em; } h2 { font-size: 1.1em; margin-top: 1.6em; border-bottom: 1px solid #ccc; }
h3 { font-size: 1em; }
pre { white-space: pre-wrap; background: #f0f0f0; padding: .6em; font-size: .85em; }
.row { display: flex; flex-wrap: wrap; gap: .8em; align-items: flex-start; }
figure { margin: 0; } figcaption { font-size: .8em; max-width: 24em; }
.windows { display: flex; gap: 2px; margin-top: 2px; }
.windows figcaption { font-size: .7em; }
.tagbox { background: #fff; padding: .4em; border: 1px solid #ddd; }
.missing { display: inline-block; background: #eee; color: #777; font-size: .75em; text-align: center; }
table { border-collapse: collapse; font-size: .85em; } td, th { border: 1px solid #ccc; padding: .2em .6em; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.note { color: #666; font-size: .85em; }
"""


def sheet_path(image_path: str | os.PathLike[str]) -> Path:
    """Where the sheet of the picture at ``image_path`` lives: ``NAME.explain.html`` beside it."""
    path = Path(image_path)
    stem = path.name[: -len(EXPLANATION_SUFFIX)] if path.name.endswith(EXPLANATION_SUFFIX) else path.stem
    return path.with_name(stem + SUFFIX)


def write_sheet(
    path: str | os.PathLike[str],
    picture: Image.Image,
    explanation: Explanation,
    *,
    title: str = "",
    infotext: str | None = None,
    notes: Sequence[str] = (),
) -> Path:
    """Write the sheet (atomically) to ``path``; returns the path."""
    return atomic_write_text(
        path, explanation_sheet(picture, explanation, title=title, infotext=infotext, notes=notes)
    )


def explanation_sheet(
    picture: Image.Image,
    explanation: Explanation,
    *,
    title: str = "",
    infotext: str | None = None,
    notes: Sequence[str] = (),
) -> str:
    """The sheet as HTML text. ``infotext`` is shown under the picture; ``notes`` are lines shown
    above it (for example how the regenerated picture compares with the file)."""
    picture = picture.convert("RGB")
    heading = title or "Explanation"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(heading)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{_e(heading)}</h1>",
    ]
    parts.extend(f'<p class="note">{_e(note)}</p>' for note in notes)
    parts.append(_img(_fit(picture, PICTURE_SIDE), "the picture", "picture"))
    if infotext:
        parts.append(f"<pre>{_e(infotext)}</pre>")
    parts.extend(_tag_section(picture, explanation))
    parts.extend(_decomposition_section(explanation))
    parts.extend(_trajectory_section(explanation))
    parts.extend(_numbers_section(explanation))
    parts.extend(_token_section(picture, explanation))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# ------------------------------------------------------------------------------------------ tags


def _tag_section(picture: Image.Image, explanation: Explanation) -> list[str]:
    out = ["<h2>Attention per tag</h2>"]
    if not explanation.tags:
        out.append('<p class="note">The prompts have no tags.</p>')
        return out
    out.append(
        '<p class="note">Each large map is the tag\'s cross-attention over the whole generation, scaled '
        "to its own maximum; the small ones below it are its step windows, on one scale per tag "
        "(dark: the branch never ran in that window). Share: the tag's part of the attention its "
        "prompt's tags get (start, end, padding and comma tokens left out).</p>"
    )
    shares = {m.tag: m.mass_share for m in tag_measures(explanation, (WINDOW_ALL,))}
    base = _fit(picture, TAG_SIDE)
    small = _fit(picture, WINDOW_SIDE)
    all_index = explanation.window_index(WINDOW_ALL)
    windows = [w for w in explanation.windows if w != WINDOW_ALL]
    for branch, heading in ((POSITIVE, "Prompt"), (NEGATIVE, "Negative prompt")):
        indices = [i for i, tag in enumerate(explanation.tags) if tag.branch == branch]
        if not indices:
            continue
        out.append(f"<h3>{heading}</h3>")
        out.append('<div class="row">')
        for i in indices:
            tag = explanation.tags[i]
            heat = explanation.tag_maps[i, all_index]
            part = f" (sub-prompt {tag.part + 1})" if tag.part else ""
            share = shares.get(tag.key)
            caption = f"<b>{_e(tag.label)}</b>{_e(part)}<br>weight {tag.weight:g}, share {_percent(share)}"
            out.append('<figure class="tagbox">')
            if _missing(heat):
                out.append(_placeholder(base.size, "branch never ran", "tag"))
            else:
                out.append(_img(overlay(base, heat), f"attention of {tag.label}", "tag"))
            out.append(f"<figcaption>{caption}</figcaption>")
            out.append(_window_row(small, explanation, explanation.tag_maps[i], windows))
            out.append("</figure>")
        out.append("</div>")
    return out


def _window_row(picture: Image.Image, explanation: Explanation, maps: np.ndarray, windows: list[str]) -> str:
    present = [maps[explanation.window_index(w)] for w in windows]
    vmax = _shared_max(present)
    cells = []
    for window, heat in zip(windows, present, strict=True):
        if _missing(heat):
            image = _placeholder(picture.size, "-", "tag-window")
        else:
            image = _img(overlay(picture, heat, vmax=vmax), f"{window} window", "tag-window")
        cells.append(f"<figure>{image}<figcaption>{_e(window)}</figcaption></figure>")
    return f'<div class="windows">{"".join(cells)}</div>'


# ------------------------------------------------------------------------------ previews


def _decomposition_section(explanation: Explanation) -> list[str]:
    previews = explanation.previews
    if not previews:
        return []
    chosen = [previews[i] for i in _spread_indices(len(previews), DECOMPOSITION_STEPS)]
    vmax = _shared_max(p.difference for p in chosen if p.difference is not None)
    out = [
        "<h2>Guidance decomposition</h2>",
        '<p class="note">The clean picture each branch predicts at a step, decoded cheaply from the '
        "latent: the prompt's (cond), the negative prompt's (uncond), the guided combination, and "
        "where the two branches disagree (|cond - uncond|, one scale for the rows shown).</p>",
        "<table><tr><th>step</th><th>Prompt</th><th>Negative prompt</th><th>Combined</th>"
        "<th>|cond - uncond|</th></tr>",
    ]
    for preview in chosen:
        size = _preview_size(preview.combined.shape, PREVIEW_SIDE)
        negative = (
            _img(upscale(preview.negative, size), "negative prompt", "preview")
            if preview.negative is not None
            else _placeholder(size, "no uncond pass", "preview")
        )
        difference = (
            _img(upscale(colorize(preview.difference, vmax=vmax), size), "difference", "preview")
            if preview.difference is not None
            else _placeholder(size, "no uncond pass", "preview")
        )
        out.append(
            f"<tr><td>{_e(_call_label(explanation.calls[preview.call]))}</td>"
            f"<td>{_img(upscale(preview.prompt, size), 'prompt', 'preview')}</td>"
            f"<td>{negative}</td>"
            f"<td>{_img(upscale(preview.combined, size), 'combined', 'preview')}</td>"
            f"<td>{difference}</td></tr>"
        )
    out.append("</table>")
    return out


def _trajectory_section(explanation: Explanation) -> list[str]:
    if not explanation.previews and not explanation.vae_previews:
        return []
    out = ["<h2>Trajectory</h2>"]
    if explanation.previews:
        out.append('<p class="note">The guided prediction of the clean picture at every stored step.</p>')
        out.append('<div class="row">')
        for preview in explanation.previews:
            out.append(_preview_figure(preview, explanation.calls[preview.call]))
        out.append("</div>")
    if explanation.vae_previews:
        out.append('<p class="note">The same prediction decoded by the full VAE.</p>')
        out.append('<div class="row">')
        for call in sorted(explanation.vae_previews):
            image = _fit(Image.fromarray(explanation.vae_previews[call]), PICTURE_SIDE // 2)
            label = _call_label(explanation.calls[call]) if call < len(explanation.calls) else f"call {call}"
            figure = _img(image, "full VAE", "vae")
            out.append(f"<figure>{figure}<figcaption>{_e(label)}</figcaption></figure>")
        out.append("</div>")
    return out


def _preview_figure(preview: Preview, call: CallInfo) -> str:
    size = _preview_size(preview.combined.shape, PREVIEW_SIDE)
    image = _img(upscale(preview.combined, size), "combined", "trajectory")
    return f"<figure>{image}<figcaption>{_e(_call_label(call))}</figcaption></figure>"


# ------------------------------------------------------------------------------- numbers


def _numbers_section(explanation: Explanation) -> list[str]:
    differences = guidance_differences(explanation)
    order = {POSITIVE: 0, NEGATIVE: 1}
    branches = sorted(explanation.content_share, key=lambda b: (order.get(b, 2), b))
    header = "".join(f"<th>{_e(b)} prompt tokens' share</th>" for b in branches)
    out = [
        "<h2>Per window</h2>",
        '<p class="note">Guidance difference: the mean |cond - uncond| of the predicted clean latent '
        "over the window's calls that ran both branches. Prompt tokens' share: the part of the "
        "attention the prompt's own tokens get (the start token takes most of the rest).</p>",
        f"<table><tr><th>window</th><th>calls</th><th>guidance difference</th>{header}</tr>",
    ]
    for window in explanation.windows:
        shares = "".join(
            f'<td class="num">{_percent(explanation.content_share[b].get(window))}</td>' for b in branches
        )
        out.append(
            f'<tr><td>{_e(window)}</td><td class="num">{len(explanation.window_calls[window])}</td>'
            f'<td class="num">{_number(differences.get(window))}</td>{shares}</tr>'
        )
    out.append("</table>")
    return out


def _token_section(picture: Image.Image, explanation: Explanation) -> list[str]:
    if explanation.token_maps is None or not explanation.tokens:
        return []
    base = _fit(picture, TOKEN_SIDE)
    all_index = explanation.window_index(WINDOW_ALL)
    out = ["<details><summary>Attention per token</summary>", '<div class="row">']
    for i, token in enumerate(explanation.tokens):
        heat = explanation.token_maps[i, all_index]
        image = (
            _placeholder(base.size, "-", "token")
            if _missing(heat)
            else _img(overlay(base, heat), f"attention of {token.text}", "token")
        )
        part = f"#{token.part}" if token.part else ""
        caption = f"{token.branch}{part} {token.text} ({token.weight:g})"
        out.append(f"<figure>{image}<figcaption>{_e(caption)}</figcaption></figure>")
    out.append("</div></details>")
    return out


# ------------------------------------------------------------------------------- helpers


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _img(image: Image.Image, alt: str, css_class: str) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return (
        f'<img class="{css_class}" width="{image.width}" height="{image.height}" '
        f'alt="{_e(alt)}" src="data:image/png;base64,{data}">'
    )


def _placeholder(size: tuple[int, int], text: str, css_class: str) -> str:
    width, height = size
    return (
        f'<span class="missing {css_class}-missing" style="width:{width}px;height:{height}px;'
        f'line-height:{height}px">{_e(text)}</span>'
    )


def _fit(image: Image.Image, side: int) -> Image.Image:
    """``image`` scaled so that its long side is ``side`` pixels (never up)."""
    scale = side / max(image.size)
    if scale >= 1:
        return image.convert("RGB")
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.convert("RGB").resize(size, Image.Resampling.LANCZOS)


def _preview_size(shape: tuple[int, ...], side: int) -> tuple[int, int]:
    """(width, height) for a (h, w, ...) preview shown with its long side ``side`` (whole cells)."""
    height, width = shape[:2]
    factor = max(1, side // max(height, width))
    return width * factor, height * factor


def _spread_indices(count: int, wanted: int) -> list[int]:
    """Up to ``wanted`` indices from 0 to count - 1, evenly spread, first and last included."""
    if count <= wanted:
        return list(range(count))
    return sorted({round(k * (count - 1) / (wanted - 1)) for k in range(wanted)})


def _missing(heat: np.ndarray) -> bool:
    return bool(np.isnan(heat).all()) if heat.size else True


def _shared_max(maps: Iterable[np.ndarray]) -> float | None:
    tops = [float(np.nanmax(m)) for m in maps if m.size and not np.isnan(m).all()]
    return max(tops) if tops else None


def _call_label(call: CallInfo) -> str:
    prefix = "hires " if call.pass_name != "first" else ""
    return f"{prefix}call {call.call + 1}, sigma {call.sigma:.3g}"


def _percent(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{100 * value:.1f}%"


def _number(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.4g}"
