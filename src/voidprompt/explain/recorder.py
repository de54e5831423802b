"""The capture: a :class:`~voidprompt.sampling.denoiser.DenoiserObserver` that, with an
:class:`~voidprompt.explain.attention.AttentionProbe` feeding it, gathers one
:class:`~voidprompt.explain.record.Explanation` per image of a batch.

Per denoiser call it knows each UNet row's image, branch, AND sub-prompt and schedule entry (the
CFG denoiser says so), so every row's attention goes to that prompt's tokens and tags. Steps without
an uncond pass (NGMS, "Skip Early CFG") add nothing to the negative prompt's maps and no guidance
difference; each window averages over the calls where a branch ran. AND sub-prompts keep their own
tags (``positive#1:...``). With prompt editing, a tag's maps follow its label across schedule entries.
Windows: the first pass's calls split into early / middle / late thirds, the hires pass as ``hires``,
and ``all``; maps of a smaller pass are upsampled to the final latent size.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from voidprompt.explain.record import (
    FIRST_PASS_WINDOWS,
    HIRES_WINDOW,
    NEGATIVE,
    POSITIVE,
    WINDOW_ALL,
    CallInfo,
    ExplainOptions,
    Explanation,
    Preview,
    TagInfo,
    TokenInfo,
)
from voidprompt.explain.tags import PromptKey, PromptTokens
from voidprompt.sampling.denoiser import UNetRow

ToX0 = Callable[[Tensor, Tensor, Tensor], Tensor]
ToRGB = Callable[[Tensor], Tensor]
Decode = Callable[[Tensor], Tensor]


@dataclass
class _RowMaps:
    branch: str
    part: int
    entry: int
    tag_maps: Tensor  # (tags, H, W)
    token_maps: Tensor | None  # (tokens, H, W)
    content_share: Tensor  # scalar


@dataclass
class _Call:
    pass_index: int
    call: int
    sigma: float
    uncond: bool
    rows: list[_RowMaps]
    difference: Tensor | None  # scalar
    preview: tuple[Tensor, Tensor | None, Tensor, Tensor | None] | None


@dataclass
class _PassInfo:
    name: str
    prompts: Mapping[PromptKey, PromptTokens]
    to_x0: ToX0
    latent_size: tuple[int, int] = (0, 0)
    calls: int = 0
    projections: dict[tuple[PromptKey, int], tuple[Tensor, Tensor]] = field(default_factory=dict)


def layer_grid(queries: int, height: int, width: int) -> tuple[int, int]:
    """The (h, w) grid of a UNet level with ``queries`` positions for a latent of height x width:
    each level halves both sides, rounding up (stride-2 convolutions with padding 1)."""
    h, w = height, width
    while h * w > queries:
        h, w = (h + 1) // 2, (w + 1) // 2
    if h * w != queries:
        raise ValueError(f"cannot place {queries} attention queries on a {height}x{width} latent")
    return h, w


class ExplainRecorder:
    """Gathers the explanations of one batch (``batch_size`` images) over its sampler passes."""

    def __init__(
        self,
        batch_size: int,
        options: ExplainOptions,
        to_rgb: ToRGB,
        decode: Decode | None = None,
    ) -> None:
        self.batch_size = batch_size
        self.options = options
        self.to_rgb = to_rgb
        self.decode = decode
        self._passes: list[_PassInfo] = []
        self._calls: list[list[_Call]] = [[] for _ in range(batch_size)]
        self._total_calls = 0
        self._vae: dict[int, dict[int, Tensor]] = {}
        # The call in flight.
        self._rows: Sequence[UNetRow] = ()
        self._x: Tensor | None = None
        self._sigma: Tensor | None = None
        self._step = 0
        self._span = (0, 0)
        self._attention: dict[tuple[int, int], dict[int, Tensor]] = {}

    # -- passes ---------------------------------------------------------------------------------

    def begin_pass(self, name: str, prompts: Mapping[PromptKey, PromptTokens], to_x0: ToX0) -> None:
        """A sampler pass starts: ``prompts`` gives each (negative, part, entry)'s tokens; ``to_x0(x,
        output, sigma)`` turns the inner model's output into the predicted clean latent."""
        self._passes.append(_PassInfo(name, prompts, to_x0))

    # -- the attention probe's sink ---------------------------------------------------------------

    def add_probabilities(self, probs: Tensor) -> None:
        """One cross-attention layer's head-mean probabilities for the UNet rows now running."""
        by_grid = self._attention.setdefault(self._span, {})
        queries = probs.shape[1]
        if queries in by_grid:
            by_grid[queries] += probs
        else:
            by_grid[queries] = probs.clone()

    # -- the denoiser observer --------------------------------------------------------------------

    def begin_call(self, step: int, x: Tensor, sigma: Tensor, rows: Sequence[UNetRow]) -> None:
        self._step, self._x, self._sigma, self._rows = step, x, sigma, rows
        self._attention = {}
        self._span = (0, len(rows))

    def unet_rows(self, start: int, stop: int) -> None:
        self._span = (start, stop)

    def end_call(self, cond: Tensor, uncond: Tensor | None, guided: Tensor) -> None:
        current = self._passes[-1]
        assert self._x is not None and self._sigma is not None
        x, sigma = self._x, self._sigma
        height, width = x.shape[-2], x.shape[-1]
        current.latent_size = (height, width)
        row_maps = self._row_maps(current, height, width)
        cond_x0 = current.to_x0(x, cond, sigma).float()
        uncond_x0 = None if uncond is None else current.to_x0(x, uncond, sigma).float()
        guided_x0 = current.to_x0(x, guided, sigma).float()
        difference = None if uncond_x0 is None else (cond_x0 - uncond_x0).abs().mean(dim=1)
        every = self.options.preview_every
        keep_preview = every > 0
        call_index = current.calls
        pass_index = len(self._passes) - 1
        for image in range(self.batch_size):
            calls = self._calls[image]
            # Which call is a pass's last is known only when the next begins: the latest call keeps
            # its preview latents until the next replaces them, unless it is a k-th call.
            if calls and calls[-1].pass_index == pass_index and calls[-1].call % max(every, 1):
                calls[-1].preview = None
            preview = None
            if keep_preview:
                preview = (
                    cond_x0[image],
                    None if uncond_x0 is None else uncond_x0[image],
                    guided_x0[image],
                    None if difference is None else difference[image],
                )
            calls.append(
                _Call(
                    pass_index=pass_index,
                    call=call_index,
                    sigma=float(sigma[image]),
                    uncond=uncond is not None,
                    rows=row_maps.get(image, []),
                    difference=None if difference is None else difference[image].mean(),
                    preview=preview,
                )
            )
        if self._total_calls in self.options.vae_calls:
            self._vae[self._total_calls] = {i: guided_x0[i].clone() for i in range(self.batch_size)}
        current.calls += 1
        self._total_calls += 1
        self._attention = {}

    def _row_maps(self, current: _PassInfo, height: int, width: int) -> dict[int, list[_RowMaps]]:
        out: dict[int, list[_RowMaps]] = {}
        for (start, stop), by_grid in self._attention.items():
            full: Tensor | None = None
            for queries, probs in by_grid.items():
                h, w = layer_grid(queries, height, width)
                grid = probs.transpose(1, 2).reshape(probs.shape[0], probs.shape[2], h, w)
                if (h, w) != (height, width):
                    grid = F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)
                full = grid if full is None else full + grid
            if full is None:
                continue
            for offset, row in enumerate(self._rows[start:stop]):
                key = (row.negative, row.part, row.entry)
                maps = full[offset]
                to_tokens, to_tags = self._projection(current, key, maps)
                flat = maps.reshape(maps.shape[0], -1)
                token_maps = (to_tokens @ flat).reshape(to_tokens.shape[0], height, width)
                tag_maps = (to_tags @ flat).reshape(to_tags.shape[0], height, width)
                share = token_maps.sum() / maps.sum()
                out.setdefault(row.image, []).append(
                    _RowMaps(
                        NEGATIVE if row.negative else POSITIVE,
                        row.part,
                        row.entry,
                        tag_maps,
                        token_maps if self.options.per_token else None,
                        share,
                    )
                )
        return out

    def _projection(self, current: _PassInfo, key: PromptKey, maps: Tensor) -> tuple[Tensor, Tensor]:
        """The (tokens, context rows) and (tags, context rows) 0/1 matrices of a prompt: summing a
        row's maps into its tokens and tags is then two matrix products, built once per pass."""
        length = maps.shape[0]
        cached = current.projections.get((key, length))
        if cached is None:
            prompt = current.prompts[key]
            index = prompt.row_index(length)
            content = torch.nonzero(index >= 0).flatten()
            to_tokens = torch.zeros((len(prompt.texts), length), dtype=maps.dtype)
            to_tokens[index[content], content] = 1.0
            membership = torch.zeros((len(prompt.tags), len(prompt.texts)), dtype=maps.dtype)
            for t, tag in enumerate(prompt.tags):
                membership[t, list(tag.tokens)] = 1.0
            cached = (to_tokens.to(maps.device), (membership @ to_tokens).to(maps.device))
            current.projections[(key, length)] = cached
        return cached

    # -- the result -------------------------------------------------------------------------------

    def finish(self) -> list[Explanation]:
        """One explanation per image of the batch, on the CPU."""
        return [self._explain(image) for image in range(self.batch_size)]

    def _explain(self, image: int) -> Explanation:
        calls = self._calls[image]
        final = self._passes[-1].latent_size
        windows, window_calls = self._windows(calls)
        tags, tag_of = self._tags(calls)
        tokens, token_of = self._tokens(calls, tag_of) if self.options.per_token else ((), {})
        n_windows = len(windows)
        tag_sum = torch.zeros((len(tags), n_windows, *final), dtype=torch.float64)
        tag_count = torch.zeros((len(tags), n_windows), dtype=torch.float64)
        token_sum = torch.zeros((len(tokens), n_windows, *final), dtype=torch.float64)
        token_count = torch.zeros((len(tokens), n_windows), dtype=torch.float64)
        share_sum: dict[str, list[float]] = {}
        share_count: dict[str, list[int]] = {}
        for c, call in enumerate(calls):
            ws = [w for w, name in enumerate(windows) if c in window_calls[name]]
            for row in call.rows:
                prompt = self._prompt(call, row)
                # An empty prompt has no tags: the index must still be an integer tensor.
                ids = torch.tensor(
                    [tag_of[(row.branch, row.part, tag.label)] for tag in prompt.tags], dtype=torch.long
                )
                maps = _to_size(row.tag_maps, final).double().cpu()
                for w in ws:
                    tag_sum[:, w].index_add_(0, ids, maps)
                    tag_count[ids, w] += 1
                if row.token_maps is not None:
                    keys = range(row.token_maps.shape[0])
                    ids = torch.tensor(
                        [token_of[(row.branch, row.part, row.entry, k)] for k in keys], dtype=torch.long
                    )
                    token_maps = _to_size(row.token_maps, final).double().cpu()
                    for w in ws:
                        token_sum[:, w].index_add_(0, ids, token_maps)
                        token_count[ids, w] += 1
                key = _branch_key(row.branch, row.part)
                sums = share_sum.setdefault(key, [0.0] * n_windows)
                counts = share_count.setdefault(key, [0] * n_windows)
                share = float(row.content_share)
                for w in ws:
                    sums[w] += share
                    counts[w] += 1
        tag_maps = _mean(tag_sum, tag_count)
        mean_token_maps = _mean(token_sum, token_count) if self.options.per_token else None
        content_share = {
            key: {
                windows[w]: (sums[w] / share_count[key][w] if share_count[key][w] else float("nan"))
                for w in range(n_windows)
            }
            for key, sums in share_sum.items()
        }
        infos = tuple(
            CallInfo(
                self._passes[call.pass_index].name,
                call.call,
                call.sigma,
                call.uncond,
                None if call.difference is None else float(call.difference),
            )
            for call in calls
        )
        return Explanation(
            latent_size=final,
            windows=windows,
            window_calls=window_calls,
            tags=tags,
            tag_maps=tag_maps,
            content_share=content_share,
            calls=infos,
            previews=self._previews(calls),
            tokens=tokens,
            token_maps=mean_token_maps,
            vae_previews=self._vae_previews(image),
        )

    def _prompt(self, call: _Call, row: _RowMaps) -> PromptTokens:
        return self._passes[call.pass_index].prompts[(row.branch == NEGATIVE, row.part, row.entry)]

    def _windows(self, calls: Sequence[_Call]) -> tuple[tuple[str, ...], dict[str, tuple[int, ...]]]:
        first = [c for c, call in enumerate(calls) if call.pass_index == 0]
        later = [c for c, call in enumerate(calls) if call.pass_index > 0]
        window_calls: dict[str, tuple[int, ...]] = {WINDOW_ALL: tuple(range(len(calls)))}
        for name, part in zip(FIRST_PASS_WINDOWS, np.array_split(np.array(first, dtype=int), 3), strict=True):
            window_calls[name] = tuple(int(c) for c in part)
        if later:
            window_calls[HIRES_WINDOW] = tuple(later)
        return tuple(window_calls), window_calls

    def _tags(self, calls: Sequence[_Call]) -> tuple[tuple[TagInfo, ...], dict[tuple[str, int, str], int]]:
        tags: list[TagInfo] = []
        index: dict[tuple[str, int, str], int] = {}
        for call in calls:
            for row in call.rows:
                prompt = self._prompt(call, row)
                for tag in prompt.tags:
                    key = (row.branch, row.part, tag.label)
                    if key not in index:
                        index[key] = len(tags)
                        texts = tuple(prompt.texts[t] for t in tag.tokens)
                        tags.append(TagInfo(row.branch, row.part, tag.label, tag.weight, texts))
        return tuple(tags), index

    def _tokens(
        self, calls: Sequence[_Call], tag_of: Mapping[tuple[str, int, str], int]
    ) -> tuple[tuple[TokenInfo, ...], dict[tuple[str, int, int, int], int]]:
        tokens: list[TokenInfo] = []
        index: dict[tuple[str, int, int, int], int] = {}
        for call in calls:
            for row in call.rows:
                prompt = self._prompt(call, row)
                tag_at = {
                    t: tag_of[(row.branch, row.part, tag.label)] for tag in prompt.tags for t in tag.tokens
                }
                for k, text in enumerate(prompt.texts):
                    key = (row.branch, row.part, row.entry, k)
                    if key not in index:
                        index[key] = len(tokens)
                        weight, tag = prompt.weights[k], tag_at.get(k, -1)
                        tokens.append(TokenInfo(row.branch, row.part, row.entry, k, text, weight, tag))
        return tuple(tokens), index

    def _previews(self, calls: Sequence[_Call]) -> tuple[Preview, ...]:
        every = self.options.preview_every
        if every <= 0:
            return ()
        previews = []
        for c, call in enumerate(calls):
            if call.preview is None:
                continue
            cond, uncond, guided, difference = call.preview
            previews.append(
                Preview(
                    call=c,
                    prompt=self._rgb(cond),
                    negative=None if uncond is None else self._rgb(uncond),
                    combined=self._rgb(guided),
                    difference=None if difference is None else difference.float().cpu().numpy(),
                )
            )
        return tuple(previews)

    def _rgb(self, latent: Tensor) -> np.ndarray:
        return self.to_rgb(latent[None])[0].numpy()

    def _vae_previews(self, image: int) -> dict[int, np.ndarray]:
        if self.decode is None:
            return {}
        out = {}
        for call, latents in self._vae.items():
            pixels = self.decode(latents[image][None])[0]
            out[call] = (255.0 * pixels.permute(1, 2, 0).clamp(0, 1)).to(torch.uint8).numpy()
        return out


def _branch_key(branch: str, part: int) -> str:
    return f"{branch}#{part}" if part else branch


def _to_size(maps: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    if maps.shape[0] == 0:
        # No tags (an empty prompt): nothing to resize, but the shape must still be the target's.
        return maps.new_zeros((0, *size))
    return F.interpolate(maps[None].float(), size=size, mode="bilinear", align_corners=False)[0]


def _mean(total: Tensor, count: Tensor) -> np.ndarray:
    mean = total / count[..., None, None].clamp(min=1)
    mean[count == 0] = float("nan")
    return mean.float().numpy()
