"""Brownian-tree noise for the SDE samplers (DPM++ SDE, DPM++ 2M/3M SDE), as A1111 makes it.

A1111 (``Sampler.create_noise_sampler``) builds k-diffusion's ``BrownianTreeNoiseSampler`` with
one ``torchsde.BrownianTree`` per image, each seeded (torchsde's ``entropy``) with that image's
seed, over [smallest positive sigma, largest sigma], with time = sigma itself. The noise for a
step is the path's increment scaled to unit variance:

    noise(sigma, sigma_next) = (W(sigma_next) - W(sigma)) / sqrt(|sigma_next - sigma|)

Because the path is a function of the seed alone, a 10-step and a 40-step run see the same path,
and image ``i`` of a batch sees the path it would see alone. ENSD plays no part: the trees take
the image seeds, not :class:`~voidprompt.sampling.rng.ImageRNG`'s streams.

torchsde draws each tree node's normals from a fresh generator seeded by a NumPy SeedSequence
value. A1111 replaces that draw (``brownian_interval._randn``) with its ``randn_local``, so the
request's RNG source decides it: for "CPU" the numbers come from a CPU generator and are moved to
the latent's device (the same numbers torchsde itself gives on a CPU, float32); for "NV" they
come from the Philox port; for "GPU" from a generator on the device.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torchsde
from torchsde._brownian import brownian_interval

from voidprompt.errors import InvalidRequestError
from voidprompt.sampling.rng import RandnSource, check_randn_source, check_seed, randn_local

# The RNG source of the tree being built or queried in this thread / task. None: torchsde's own
# behaviour, so other users of torchsde in the process are unaffected.
_ACTIVE_SOURCE: contextvars.ContextVar[RandnSource | None] = contextvars.ContextVar(
    "voidprompt_brownian_source", default=None
)
_HOOK_MARK = "_voidprompt_hook"


def _install_randn_hook() -> None:
    """Route torchsde's node noise through our sources while a context names one.

    torchsde looks ``_randn`` up as a module global at every draw and offers no other way in, so
    (like A1111) we replace it; unlike A1111, the replacement defers to the original whenever no
    voidprompt sampler is active. Idempotent.
    """
    current = brownian_interval._randn
    if getattr(current, _HOOK_MARK, False):
        return
    original = current

    def _randn(size: Sequence[int], dtype: torch.dtype, device: Any, seed: int) -> torch.Tensor:
        source = _ACTIVE_SOURCE.get()
        if source is None:
            return original(size, dtype, device, seed)
        target = torch.device(device)
        return randn_local(int(seed), tuple(size), source, target).to(device=target, dtype=dtype)

    setattr(_randn, _HOOK_MARK, True)
    brownian_interval._randn = _randn


@contextlib.contextmanager
def _source_active(source: RandnSource) -> Iterator[None]:
    _install_randn_hook()
    token = _ACTIVE_SOURCE.set(source)
    try:
        yield
    finally:
        _ACTIVE_SOURCE.reset(token)


class BrownianTreeNoiseSampler:
    """Noise ``(sigma, sigma_next) -> Tensor`` shaped like ``x``, one Brownian tree per image.

    Mirrors k-diffusion's ``BrownianTreeNoiseSampler`` with a list of seeds (identity transform,
    trees on ``x``'s device and dtype) plus A1111's replacement of torchsde's noise.
    """

    def __init__(
        self,
        x: torch.Tensor,
        sigma_min: float | torch.Tensor,
        sigma_max: float | torch.Tensor,
        seeds: Sequence[int],
        source: RandnSource = "CPU",
    ) -> None:
        if x.ndim < 1 or len(seeds) != x.shape[0]:
            raise InvalidRequestError(
                f"{len(seeds)} seeds for a latent batch shaped {tuple(x.shape)}: need one seed per image"
            )
        for seed in seeds:
            check_seed(seed, "seed")
        self.source = check_randn_source(source)
        self.seeds = [int(s) for s in seeds]
        t0, t1 = torch.as_tensor(sigma_min), torch.as_tensor(sigma_max)
        t0, t1, self.sign = _sort(t0, t1)
        w0 = torch.zeros_like(x[0])
        with _source_active(self.source):
            self.trees = [torchsde.BrownianTree(t0, w0, t1, entropy=seed) for seed in self.seeds]

    def __call__(self, sigma: float | torch.Tensor, sigma_next: float | torch.Tensor) -> torch.Tensor:
        t0, t1 = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        lo, hi, sign = _sort(t0, t1)
        with _source_active(self.source):
            increments = torch.stack([tree(lo, hi) for tree in self.trees])
        # W(hi) - W(lo), turned into W(sigma_next) - W(sigma) when the step goes downwards.
        return increments * (self.sign * sign) / (t1 - t0).abs().sqrt()


def _sort(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    return (a, b, 1) if a < b else (b, a, -1)


def brownian_noise_sampler_for_sigmas(
    x: torch.Tensor, sigmas: torch.Tensor, seeds: Sequence[int], source: RandnSource = "CPU"
) -> BrownianTreeNoiseSampler:
    """As A1111 calls it: the interval is [smallest positive sigma, largest sigma] of the schedule."""
    positive = sigmas[sigmas > 0]
    if positive.numel() == 0:
        raise InvalidRequestError(f"sigmas={sigmas.tolist()}: need at least one positive sigma")
    return BrownianTreeNoiseSampler(x, positive.min(), sigmas.max(), seeds, source)
