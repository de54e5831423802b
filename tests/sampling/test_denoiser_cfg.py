"""A1111's CFGDenoiser semantics on a fake inner model whose output encodes its inputs."""

from __future__ import annotations

import torch
from sd_fixtures import sd1_alphas_cumprod

from voidprompt.conditioning import MultiCond, ScheduledCond
from voidprompt.sampling.denoiser import (
    BatchConds,
    CFGDenoiser,
    DiscreteEpsDenoiser,
    Guidance,
    LatentBlend,
    stack_conds,
)

W = 4  # token width


def cond(value: float, tokens: int = 77) -> torch.Tensor:
    return torch.full((tokens, W), value)


def sched(*entries: tuple[int, torch.Tensor]) -> tuple[ScheduledCond, ...]:
    return tuple(ScheduledCond(end, c) for end, c in entries)


class Recorder:
    """out = x + mean(context) + 100 * sigma, per row; records every call."""

    def __init__(self) -> None:
        self.calls: list[dict[str, torch.Tensor | None]] = []

    def __call__(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        *,
        context: torch.Tensor,
        image_cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self.calls.append({"x": x, "sigma": sigma, "context": context, "image_cond": image_cond})
        return x + context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1) + 100 * sigma.reshape(-1, 1, 1, 1)


X = torch.zeros(2, 1, 2, 2)
SIG = torch.tensor([1.0, 1.0])


def test_combine_formula_with_and_weights() -> None:
    inner = Recorder()
    conds = [
        MultiCond(((sched((20, cond(1.0))), 1.0), (sched((20, cond(3.0))), 0.5))),
        MultiCond(((sched((20, cond(2.0))), 1.0),)),
    ]
    unconds = [sched((20, cond(-1.0))), sched((20, cond(-2.0)))]
    out = CFGDenoiser(inner, BatchConds(conds, unconds), Guidance(7.0))(X, SIG)
    assert len(inner.calls) == 1 and inner.calls[0]["x"].shape[0] == 5  # 3 sub-prompts + 2 unconds
    # image 0: u=-1+100, conds 1+100 (w 1) and 3+100 (w .5): u + 7*(2) + 7*.5*(4)
    assert torch.allclose(out[0], torch.full_like(out[0], 99 + 7 * 2 + 3.5 * 4))
    assert torch.allclose(out[1], torch.full_like(out[1], 98 + 7 * 4))


def test_step_selection_is_inclusive_of_end_step() -> None:
    inner = Recorder()
    c = [MultiCond(((sched((1, cond(1.0)), (3, cond(5.0))), 1.0),))]
    u = [sched((0, cond(0.0)), (3, cond(-1.0)))]
    den = CFGDenoiser(inner, BatchConds(c, u), Guidance(1.0))
    seen = []
    for _ in range(5):
        den(X[:1], SIG[:1])
        ctx = inner.calls[-1]["context"]
        assert ctx is not None
        seen.append((float(ctx[0].mean()), float(ctx[1].mean())))
    # cond A serves calls 0..1, B 2..3; the uncond changes after call 0; past the end: last entry.
    assert seen == [(1, 0), (1, -1), (5, -1), (5, -1), (5, -1)]
    assert den.step == 5


def test_separate_calls_for_different_lengths_give_the_batched_result() -> None:
    long_c = torch.cat([cond(1.0), cond(3.0)])  # 154 tokens, mean 2
    c = [MultiCond(((sched((20, long_c)), 1.0),))]
    u = [sched((20, cond(-1.0)))]
    inner = Recorder()
    out_sep = CFGDenoiser(inner, BatchConds(c, u), Guidance(5.0))(X[:1], SIG[:1])
    assert len(inner.calls) == 2  # cond and uncond separately
    inner2 = Recorder()
    out_nb = CFGDenoiser(inner2, BatchConds(c, u), Guidance(5.0, batch_cond_uncond=False))(X[:1], SIG[:1])
    same_len = [MultiCond(((sched((20, cond(2.0))), 1.0),))]
    out_bat = CFGDenoiser(Recorder(), BatchConds(same_len, u), Guidance(5.0))(X[:1], SIG[:1])
    torch.testing.assert_close(out_sep, out_bat)
    torch.testing.assert_close(out_nb, out_bat)


def test_pad_conds_appends_empty_prompt_and_batches() -> None:
    long_c = torch.cat([cond(1.0), cond(3.0)])
    inner = Recorder()
    den = CFGDenoiser(
        inner,
        BatchConds(
            [MultiCond(((sched((20, long_c)), 1.0),))], [sched((20, cond(-1.0)))], empty_cond=cond(7.0)
        ),
        Guidance(5.0, pad_cond_uncond=True),
    )
    den(X[:1], SIG[:1])
    assert len(inner.calls) == 1 and den.padded_cond_uncond
    ctx = inner.calls[0]["context"]
    assert ctx is not None and ctx.shape == (2, 154, W)
    assert torch.equal(ctx[1, 77:], cond(7.0))


def test_pad_conds_v0_repeats_last_uncond_vector() -> None:
    long_c = torch.cat([cond(1.0), cond(3.0)])
    u = torch.cat([cond(0.0)[:76], torch.full((1, W), 9.0)])
    inner = Recorder()
    den = CFGDenoiser(
        inner,
        BatchConds([MultiCond(((sched((20, long_c)), 1.0),))], [sched((20, u))]),
        Guidance(5.0, pad_cond_uncond_v0=True),
    )
    den(X[:1], SIG[:1])
    ctx = inner.calls[0]["context"]
    assert (
        ctx is not None and den.padded_cond_uncond_v0 and torch.equal(ctx[1, 76:], torch.full((78, W), 9.0))
    )


def test_and_subprompts_of_different_lengths_repeat_last_vector() -> None:
    a, b = cond(1.0), torch.cat([cond(2.0), cond(4.0)])
    stacked = stack_conds([a, b])
    assert stacked.shape == (2, 154, W) and torch.equal(stacked[0, 77:], cond(1.0))


def test_ngms_skips_uncond_on_odd_calls_below_threshold() -> None:
    inner = Recorder()
    c = [MultiCond(((sched((20, cond(1.0))), 1.0),))]
    u = [sched((20, cond(-1.0)))]
    den = CFGDenoiser(inner, BatchConds(c, u), Guidance(7.0, s_min_uncond=5.0))
    low = torch.tensor([2.0])
    even = den(X[:1], low)
    odd = den(X[:1], low)
    high_odd = (den(X[:1], low), den(X[:1], torch.tensor([6.0])))[1]
    assert inner.calls[0]["x"].shape[0] == 2 and inner.calls[1]["x"].shape[0] == 1
    assert torch.allclose(even, torch.full_like(even, 199 + 7 * 2))
    assert torch.allclose(odd, torch.full_like(odd, 201))  # cond result, scale 1
    assert inner.calls[3]["x"].shape[0] == 2 and not den.used_ngms and torch.isfinite(high_odd).all()


def test_mask_blends_after_denoising_and_image_cond_is_passed() -> None:
    inner = Recorder()
    mask = torch.zeros(1, 1, 2, 2)
    mask[..., 0, 0] = 1
    init = torch.full((1, 1, 2, 2), -50.0)
    ic = torch.ones(1, 5, 2, 2)
    den = CFGDenoiser(
        inner,
        BatchConds([MultiCond(((sched((20, cond(1.0))), 1.0),))], [sched((20, cond(0.0)))]),
        Guidance(1.0),
        image_cond=ic,
        blend=LatentBlend(mask=mask, init_latent=init),
    )
    out = den(X[:1], SIG[:1])
    assert out[0, 0, 0, 0] == -50 and out[0, 0, 1, 1] == 101
    assert inner.calls[0]["image_cond"] is not None and inner.calls[0]["image_cond"].shape == (2, 5, 2, 2)


def test_discrete_denoiser_formula_and_image_cond() -> None:
    ac = sd1_alphas_cumprod()
    seen = {}

    def unet(x_in: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        seen["x_in"], seen["t"] = x_in, t
        return torch.ones_like(x_in[:, :4])

    den = DiscreteEpsDenoiser(unet, ac)
    x = torch.full((1, 4, 2, 2), 2.0)
    sigma = den.sigmas[500:501]
    out = den(x, sigma, context=torch.zeros(1, 77, W), image_cond=torch.zeros(1, 5, 2, 2))
    assert seen["x_in"].shape[1] == 9 and abs(float(seen["t"]) - 500) < 1e-3
    s = float(sigma)
    torch.testing.assert_close(seen["x_in"][:, :4], x / (s**2 + 1) ** 0.5)
    torch.testing.assert_close(out, x - s)
    down = DiscreteEpsDenoiser(unet, ac, downcast_alphas=True)
    assert torch.equal(down.alphas_cumprod, ac.half().float()) and not torch.equal(down.sigmas, den.sigmas)
