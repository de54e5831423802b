"""Explanations over HTTP: the server's memory of recent ones, their JSON description and their
pictures (tag heatmaps, trajectory previews, full-VAE previews).

An explanation reaches the routes from one of two places, both as an :class:`ExplanationSource`
(the captured :class:`~voidprompt.explain.record.Explanation` and its picture):

- a generation on voidprompt's own routes with ``explain`` set: kept in an :class:`ExplanationCache`
  under a random id, the ``capacity`` most recent ones (the oldest is dropped first; its id then
  answers 404 saying so). Each holds its maps at the latent size (float32) and its picture: about
  4.5 MB for a 512x512 picture with 40 tags and a preview at each of 20 steps (the web UI's
  choice; 2.6 MB maps, 1 MB previews, 0.8 MB picture), about 18 MB at 1024x1024, so the default
  32 hold about 145 MB and 570 MB;
- a study image's ``NAME.explain.npz`` beside its PNG, read with
  :func:`~voidprompt.explain.store.load_explanation` (whose maps come back at the stored size) and
  kept in a small cache of its own, keyed by the file's size and modification time.

Everything here is plain Python over numpy and Pillow (no FastAPI), so it is tested directly; the
measures, the colour ramp and the file format have their owners in :mod:`voidprompt.explain`.
"""

from __future__ import annotations

import io
import math
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
from PIL import Image

from voidprompt.errors import InvalidRequestError
from voidprompt.explain.measures import guidance_differences, tag_measures
from voidprompt.explain.record import WINDOW_ALL, ExplainOptions, Explanation
from voidprompt.explain.render import colorize, overlay
from voidprompt.explain.store import load_explanation
from voidprompt.server.checkpoints import NotFoundError

__all__ = [
    "DEFAULT_CACHE_SIZE",
    "PREVIEW_SUBJECTS",
    "ExplanationCache",
    "ExplanationSource",
    "StudyExplanations",
    "describe",
    "explain_options",
    "heatmap_png",
    "preview_png",
    "vae_png",
]

DEFAULT_CACHE_SIZE = 32
STUDY_CACHE_SIZE = 8
# A1111's live-preview subjects, and the map of |cond - uncond|.
PREVIEW_SUBJECTS = ("prompt", "negative", "combined", "difference")

K = TypeVar("K")
V = TypeVar("V")


class _Bounded(Generic[K, V]):
    """A thread-safe mapping that keeps the ``capacity`` most recently stored or read entries."""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be 0 or more, got {capacity}")
        self.capacity = capacity
        self._items: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, key: K, value: V) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def get(self, key: K) -> V | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


@dataclass(frozen=True)
class ExplanationSource:
    """An explanation and the picture it explains (opened only when an overlay needs it)."""

    explanation: Explanation
    picture: Callable[[], Image.Image]


class ExplanationCache:
    """The server's recent explanations by id: the ``capacity`` most recent (0 keeps none)."""

    def __init__(self, capacity: int = DEFAULT_CACHE_SIZE) -> None:
        self._entries: _Bounded[str, ExplanationSource] = _Bounded(capacity)

    @property
    def capacity(self) -> int:
        return self._entries.capacity

    def add(self, explanation: Explanation, picture: Image.Image) -> str:
        """Keep ``explanation`` of ``picture``; returns its new id (random, not guessable)."""
        key = secrets.token_hex(12)
        kept = picture.copy()
        self._entries.put(key, ExplanationSource(explanation, lambda: kept))
        return key

    def get(self, key: str) -> ExplanationSource:
        source = self._entries.get(key)
        if source is None:
            raise NotFoundError(
                f"no explanation {key!r}: this server keeps the {self.capacity} most recent ones in "
                "memory; generate again with explain set, or save images (--outdir) to keep their files"
            )
        return source

    def __len__(self) -> int:
        return len(self._entries)


class StudyExplanations:
    """Study images' explanation files, read once and kept while the file stays the same."""

    def __init__(self, capacity: int = STUDY_CACHE_SIZE) -> None:
        self._loaded: _Bounded[tuple[str, int, int], Explanation] = _Bounded(capacity)

    def source(self, image_path: Path, explanation_file: Path) -> ExplanationSource:
        """The explanation in ``explanation_file`` of the picture at ``image_path``; a file that is
        not an explanation raises :class:`~voidprompt.explain.store.ExplanationFileError`."""
        try:
            stat = explanation_file.stat()
        except OSError:
            raise NotFoundError(
                f"{image_path.name} has no explanation file; run the study with [explain] on to capture one"
            ) from None
        key = (str(explanation_file), stat.st_size, stat.st_mtime_ns)
        explanation = self._loaded.get(key)
        if explanation is None:
            explanation = load_explanation(explanation_file)
            self._loaded.put(key, explanation)

        def picture() -> Image.Image:
            with Image.open(image_path) as image:
                return image.convert("RGB")

        return ExplanationSource(explanation, picture)


def explain_options(per_token: bool, preview_every: int, vae_calls: list[int]) -> ExplainOptions:
    """The capture's options from an API body's ``explain`` (the field ranges are the schema's)."""
    return ExplainOptions(per_token=per_token, preview_every=preview_every, vae_calls=tuple(vae_calls))


# ------------------------------------------------------------------------------------ description


def _number(value: float | None) -> float | None:
    """JSON has no NaN: a value that is not finite (a branch that never ran) is null."""
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def describe(explanation: Explanation, base_url: str) -> dict[str, Any]:
    """The explanation as JSON: its windows and calls, each tag with its weight and measures per
    window, the guidance difference per window, the previews and the URLs of every picture."""
    measures: dict[str, dict[str, dict[str, float | None]]] = {}
    for m in tag_measures(explanation):
        measures.setdefault(m.tag, {})[m.window] = {
            "mass_share": _number(m.mass_share),
            "peak_y": _number(m.peak_y),
            "peak_x": _number(m.peak_x),
            "spread": _number(m.spread),
        }
    tags = [
        {
            "key": tag.key,
            "branch": tag.branch,
            "part": tag.part,
            "label": tag.label,
            "weight": tag.weight,
            "tokens": list(tag.tokens),
            "measures": measures.get(tag.key, {}),
        }
        for tag in explanation.tags
    ]
    calls = [
        {
            "index": i,
            "pass_name": c.pass_name,
            "call": c.call,
            "sigma": _number(c.sigma),
            "uncond": c.uncond,
            "guidance_difference": _number(c.guidance_difference),
        }
        for i, c in enumerate(explanation.calls)
    ]
    calls_known = len(explanation.calls)
    previews = []
    for i, p in enumerate(explanation.previews):
        subjects = ["prompt", "combined"]
        if p.negative is not None:
            subjects.insert(1, "negative")
        if p.difference is not None:
            subjects.append("difference")
        previews.append(
            {
                "index": i,
                "call": p.call,
                "pass_name": explanation.calls[p.call].pass_name if p.call < calls_known else None,
                "sigma": _number(explanation.calls[p.call].sigma) if p.call < calls_known else None,
                "subjects": {s: f"{base_url}/previews/{i}/{s}.png" for s in subjects},
            }
        )
    tokens = (
        [
            {
                "index": i,
                "branch": t.branch,
                "part": t.part,
                "entry": t.entry,
                "text": t.text,
                "weight": t.weight,
                "tag": t.tag,
            }
            for i, t in enumerate(explanation.tokens)
        ]
        if explanation.token_maps is not None
        else []
    )
    return {
        "latent_size": list(explanation.latent_size),
        "map_size": list(explanation.tag_maps.shape[2:]),
        "windows": list(explanation.windows),
        "window_calls": {k: list(v) for k, v in explanation.window_calls.items()},
        "tags": tags,
        "content_share": {
            branch: {w: _number(v) for w, v in shares.items()}
            for branch, shares in explanation.content_share.items()
        },
        "guidance_differences": {w: _number(v) for w, v in guidance_differences(explanation).items()},
        "calls": calls,
        "previews": previews,
        "tokens": tokens,
        "vae_previews": {str(c): f"{base_url}/vae/{c}.png" for c in sorted(explanation.vae_previews)},
        "heatmap_url": f"{base_url}/heatmap.png",
    }


# --------------------------------------------------------------------------------------- pictures


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _window(explanation: Explanation, window: str) -> int:
    try:
        return explanation.window_index(window)
    except KeyError:
        raise NotFoundError(
            f"window={window!r}: this explanation's windows are {', '.join(explanation.windows)}"
        ) from None


def heatmap_png(
    source: ExplanationSource,
    *,
    tag: str | None = None,
    token: int | None = None,
    window: str = WINDOW_ALL,
    over_picture: bool = True,
    alpha: float = 0.6,
) -> bytes:
    """A tag's (or, with per-token maps, a token's) attention in ``window`` as a PNG: blended over
    the picture at its size, or alone at the map's own size. Scaled to the map's own maximum."""
    explanation = source.explanation
    if (tag is None) == (token is None):
        raise InvalidRequestError(
            "give tag=KEY (one of the description's tags[].key) or token=INDEX, not both"
        )
    w = _window(explanation, window)
    if tag is not None:
        try:
            heat = explanation.tag_maps[explanation.tag_index(tag), w]
        except KeyError:
            keys = ", ".join(t.key for t in explanation.tags) or "(none)"
            raise NotFoundError(f"tag={tag!r}: this explanation's tags are {keys}") from None
    else:
        assert token is not None
        maps = explanation.token_maps
        if maps is None:
            raise NotFoundError(
                "this explanation has no per-token maps; generate with explain.per_token=true"
            )
        if not 0 <= token < maps.shape[0]:
            raise NotFoundError(f"token={token}: this explanation has tokens 0 to {maps.shape[0] - 1}")
        heat = maps[token, w]
    if np.isnan(heat).all():
        raise NotFoundError(
            f"{tag or f'token {token}'}: its prompt's branch never ran in window {window!r} (no map there)"
        )
    if not over_picture:
        return _png(Image.fromarray(colorize(heat)))
    return _png(overlay(source.picture(), heat, alpha=alpha))


def preview_png(source: ExplanationSource, index: int, subject: str) -> bytes:
    """Trajectory preview ``index``'s picture of ``subject`` (one of :data:`PREVIEW_SUBJECTS`) at
    latent resolution; the difference map in the heatmaps' colours, scaled to its own maximum."""
    previews = source.explanation.previews
    if subject not in PREVIEW_SUBJECTS:
        raise NotFoundError(f"preview subject {subject!r}: choose one of {', '.join(PREVIEW_SUBJECTS)}")
    if not 0 <= index < len(previews):
        if not previews:
            raise NotFoundError("this explanation has no previews; generate with explain.preview_every > 0")
        raise NotFoundError(f"preview {index}: this explanation has previews 0 to {len(previews) - 1}")
    preview = previews[index]
    if subject == "difference":
        if preview.difference is None:
            raise NotFoundError(
                f"preview {index} has no difference map: the negative prompt's pass was skipped"
            )
        return _png(Image.fromarray(colorize(preview.difference)))
    pixels = {"prompt": preview.prompt, "negative": preview.negative, "combined": preview.combined}[subject]
    if pixels is None:
        raise NotFoundError(
            f"preview {index} has no negative prompt picture: its pass was skipped at that step"
        )
    return _png(Image.fromarray(np.ascontiguousarray(pixels)))


def vae_png(source: ExplanationSource, call: int) -> bytes:
    """The full-VAE picture of denoiser call ``call``'s guided prediction."""
    pixels = source.explanation.vae_previews.get(call)
    if pixels is None:
        calls = ", ".join(str(c) for c in sorted(source.explanation.vae_previews)) or "none"
        raise NotFoundError(f"call {call} has no full-VAE preview; this explanation has: {calls}")
    return _png(Image.fromarray(np.ascontiguousarray(pixels)))
