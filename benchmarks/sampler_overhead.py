"""Sampler loop overhead per step vs one SD1.5-size UNet call (CPU, fp32, 256x256, cond+uncond).

The samplers run with a zero-cost model (returns its input), so their time is the loop's own cost
(arithmetic on the latent, schedule bookkeeping, noise draws). The UNet is diffusers'
UNet2DConditionModel with the SD1 layout and random weights, called on a batch of 2 (cond + uncond)
32x32 latents. Prints overhead per step as a percentage of one UNet call; the target is < 1%.

    PYTHONPATH=src python benchmarks/sampler_overhead.py [--unet-calls 2] [--steps 20]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from voidprompt.conditioning import MultiCond, ScheduledCond
from voidprompt.sampling import samplers as S
from voidprompt.sampling import schedules
from voidprompt.sampling import timestep_samplers as T
from voidprompt.sampling.denoiser import BatchConds, CFGDenoiser, Guidance


def time_sampler(fn, steps: int, **kw) -> float:  # type: ignore[no-untyped-def]
    x = torch.randn(1, 4, 32, 32)
    sigmas = schedules.karras(steps, 0.0292, 14.6146)
    calls = 0

    def zero_cost(x: torch.Tensor, sigma: torch.Tensor, **_: object) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return x

    fn(zero_cost, x, sigmas, **kw)  # warm-up
    reps = 5
    t0 = time.perf_counter()
    for _ in range(reps):
        fn(zero_cost, x, sigmas, **kw)
    return (time.perf_counter() - t0) / reps / steps


def time_timestep_sampler(fn, steps: int) -> float:  # type: ignore[no-untyped-def]
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    ac = torch.cumprod(1 - betas, 0).float()
    ts = T.timesteps_for(steps)
    x = torch.randn(1, 4, 32, 32)
    eps0 = lambda x, t, **_: torch.zeros_like(x)  # noqa: E731
    fn(eps0, x, ts, alphas_cumprod=ac)
    reps = 5
    t0 = time.perf_counter()
    for _ in range(reps):
        fn(eps0, x, ts, alphas_cumprod=ac)
    return (time.perf_counter() - t0) / reps / steps


def time_cfg_wrapper(steps: int) -> float:
    c = (ScheduledCond(steps, torch.randn(77, 768)),)
    inner = lambda x, s, *, context, image_cond=None: x  # noqa: E731
    den = CFGDenoiser(inner, BatchConds([MultiCond(((c, 1.0),))], [c]), Guidance(7.0))
    x, sig = torch.randn(1, 4, 32, 32), torch.tensor([1.0])
    den(x, sig)
    t0 = time.perf_counter()
    for _ in range(steps):
        den(x, sig)
    return (time.perf_counter() - t0) / steps


def time_unet(calls: int) -> float:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(cross_attention_dim=768).eval()  # defaults are the SD1 layout
    x, t, ctx = torch.randn(2, 4, 32, 32), torch.tensor([500.0, 500.0]), torch.randn(2, 77, 768)
    with torch.no_grad():
        unet(x, t, encoder_hidden_states=ctx)  # warm-up
        t0 = time.perf_counter()
        for _ in range(calls):
            unet(x, t, encoder_hidden_states=ctx)
    return (time.perf_counter() - t0) / calls


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ap = argparse.ArgumentParser()
    ap.add_argument("--unet-calls", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    unet_s = time_unet(args.unet_calls)
    print(f"UNet call (SD1 layout, fp32, batch 2 x 4x32x32): {unet_s * 1000:.1f} ms")
    rows = [
        ("Euler", lambda n: time_sampler(S.sample_euler, n)),
        ("Euler a", lambda n: time_sampler(S.sample_euler_ancestral, n)),
        ("Heun", lambda n: time_sampler(S.sample_heun, n)),
        ("DPM2", lambda n: time_sampler(S.sample_dpm_2, n)),
        ("DPM2 a", lambda n: time_sampler(S.sample_dpm_2_ancestral, n)),
        ("LMS", lambda n: time_sampler(S.sample_lms, n)),
        ("DPM++ 2S a", lambda n: time_sampler(S.sample_dpmpp_2s_ancestral, n)),
        ("DPM++ 2M", lambda n: time_sampler(S.sample_dpmpp_2m, n)),
        ("DPM++ SDE", lambda n: time_sampler(S.sample_dpmpp_sde, n)),
        ("DPM++ 2M SDE", lambda n: time_sampler(S.sample_dpmpp_2m_sde, n)),
        ("DPM++ 3M SDE", lambda n: time_sampler(S.sample_dpmpp_3m_sde, n)),
        ("Restart", lambda n: time_sampler(S.sample_restart, n)),
        ("LCM", lambda n: time_sampler(S.sample_lcm, n)),
        ("DDIM", lambda n: time_timestep_sampler(T.sample_ddim, n)),
        ("PLMS", lambda n: time_timestep_sampler(T.sample_plms, n)),
        ("UniPC", lambda n: time_timestep_sampler(T.sample_unipc, n)),
        ("CFGDenoiser wrapper (per call)", time_cfg_wrapper),
    ]
    print(f"{'sampler':32s} {'overhead/step':>14s} {'vs UNet call':>12s}")
    for name, fn in rows:
        per_step = fn(args.steps)
        print(f"{name:32s} {per_step * 1e6:11.0f} us {per_step / unet_s * 100:11.3f}%")


if __name__ == "__main__":
    main()
