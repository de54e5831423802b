"""The first three training phases, one function each; each advances the run's state to the next
phase when it finishes (phase 4, the decoder fine-tune, is in :mod:`voidprompt.demo.train.decoder`).

1. ``vae``: the KL autoencoder on world pictures (L1 + L2 + a light edge term + a small KL). It trains
   on random crops (a convolutional VAE does not care about the crop size, and crops cost a quarter
   of the compute of whole 64 px pictures) and, for the last part, whole pictures.
2. ``latents``: every picture is encoded once; the posterior mean and std are cached. The latent
   scaling factor is 1 / std of the sampled latents and goes into the ``voidprompt.arch`` metadata
   (``scaling_factor``), so the diffusion model sees unit-variance latents as SD1's does with 0.18215.
3. ``diffusion``: text encoder and UNet together, eps prediction on SD1's scaled-linear schedule
   (1000 steps), latents sampled from the cached posterior, tags reshuffled every step (Danbooru
   order is arbitrary), 10 % of captions dropped to "" so CFG has its unconditional prediction.
   The UNet is conditioned on the *penultimate* text-encoder layer through the final LayerNorm, as
   NovelAI did: Clip skip 2 is this model's native setting. An EMA of both is what gets exported.
   From ``partial_captions_from`` on, every tag of a caption is kept with probability
   ``tag_keep_prob`` (at least one is kept): with whole captions only, the model never sees a short
   prompt such as ``red circle`` and follows one poorly (measured: 19 % adherence at CFG 7).

Every random draw comes from torch's CPU generator, in the order a resumed run replays.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from voidprompt.demo.train.captions import CaptionBatcher, blind_padding, text_condition
from voidprompt.demo.train.checkpoint import atomic_save
from voidprompt.demo.train.data import Latents, cached_posterior, encode_posterior, to_unit, upright_images
from voidprompt.demo.train.modules import ema_update, reconstruction_losses
from voidprompt.demo.train.state import Run
from voidprompt.models.load import sd1_alphas_cumprod

__all__ = ["diffusion_phase", "latent_phase", "vae_phase"]


def _cpu_randn(like: torch.Tensor) -> torch.Tensor:
    """``torch.randn_like(like)`` drawn from the CPU generator and moved to ``like``'s device. It keeps
    ``like``'s memory layout, as randn_like does: the VAE's posterior comes out channels-last on the
    CPU, and a contiguous draw would put the same numbers at other positions than earlier runs did."""
    return torch.randn_like(like, device="cpu").to(like.device)


def vae_phase(run: Run, images: torch.Tensor) -> bool:
    """Phase 1 on ``images`` (uint8, (N, 3, H, W)); True when the time cap stopped it (run saved)."""
    config, state, vae = run.config, run.state, run.vae
    vae.train()
    n = images.shape[0]
    while state.step < config.vae_steps:
        t0 = time.perf_counter()
        idx = torch.randint(0, n, (config.vae_batch,))
        x = to_unit(images[idx]).to(run.device)
        if state.step < config.vae_full_from * config.vae_steps:
            c = config.vae_crop
            oy, ox = (int(v) for v in torch.randint(0, x.shape[-1] - c + 1, (2,)))
            x = x[:, :, oy : oy + c, ox : ox + c]
        if torch.rand(()) < 0.5:
            x = x.flip(-1)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * _cpu_randn(posterior.mean)
        rec = vae.decode(z).sample
        l1, l2, edge = reconstruction_losses(rec, x)
        kl = 0.5 * (posterior.mean.square() + posterior.var - 1.0 - posterior.logvar).mean()
        loss = l1 + l2 + config.edge_weight * edge + config.kl_weight * kl
        run.vae_opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(vae.parameters(), config.grad_clip)
        run.vae_opt.step()
        state.step += 1
        if state.step % 25 == 0 or state.step == 1:
            run.log(
                f"vae {state.step}/{config.vae_steps} l1 {l1.item():.4f} edge {edge.item():.4f} "
                f"kl {kl.item():.2f} ({time.perf_counter() - t0:.2f} s/step)"
            )
        if run.tick("vae", t0):
            return True
    state.phase, state.step = "latents", 0
    return False


def latent_phase(run: Run, images: torch.Tensor) -> Latents:
    """Phase 2: the posterior of ``images`` (the native pictures), cached in ``latents.pt``; computed
    in this phase, or whenever the cache is missing. Sets the scaling factor unless ``--init-from``
    gave one."""
    config, state = run.config, run.state
    latents_path = config.out_dir / "latents.pt"
    if state.phase == "latents" or not latents_path.exists():
        t0 = time.perf_counter()
        mean, std = encode_posterior(run.vae, images)
        sample = mean + std * torch.randn_like(mean)
        if config.init_from is None:
            state.scaling_factor = float(1.0 / sample.std())
        atomic_save({"mean": mean, "std": std, "scaling_factor": state.scaling_factor}, latents_path)
        state.seconds["latents"] = state.seconds.get("latents", 0.0) + time.perf_counter() - t0
        kept = " (--init-from's, kept)" if config.init_from is not None else ""
        run.log(
            f"cached {mean.shape[0]} latents in {time.perf_counter() - t0:.0f} s; latent std "
            f"{float(sample.std()):.4f}; scaling_factor {state.scaling_factor:.5f}{kept}"
        )
        if state.phase == "latents":
            state.phase, state.step = "diffusion", 0
            run.checkpoint()
            run.last_checkpoint = time.perf_counter()
    cache = torch.load(latents_path, weights_only=True)
    return Latents(cache["mean"], cache["std"])


def diffusion_phase(
    run: Run, captions: list[str], latents: Latents, half_latents: Latents | None
) -> bool:
    """Phase 3: text encoder and UNet on the cached ``latents`` of the pictures ``captions`` describe
    (``half_latents``: the same scenes at half the side, for the first ``half_size_until`` steps);
    True when the time cap stopped it (run saved)."""
    config, state, device = run.config, run.state, run.device
    unet, text_encoder = run.unet, run.text_encoder
    captions_in = CaptionBatcher(captions)
    abar = sd1_alphas_cumprod().to(device)
    snr = abar / (1.0 - abar)
    gamma = config.min_snr_gamma
    loss_weight = torch.ones_like(snr) if gamma is None else torch.clamp(snr, max=gamma) / snr
    unet.train()
    text_encoder.train()
    run.vae.eval()
    te_params = run.text_params()
    upright = None
    upright_from = config.upright_from if config.upright_from is not None else config.diffusion_steps
    if upright_from < config.diffusion_steps:
        upright = cached_posterior(
            config, run.vae, "upright", lambda: upright_images(config, captions, run.log), run.log
        )
    n = latents.mean.shape[0]
    while state.step < config.diffusion_steps:
        t0 = time.perf_counter()
        lr = config.diffusion_lr(state.step)
        for group in run.opt.param_groups:
            group["lr"] = lr
        if half_latents is not None and state.step < (config.half_size_until or 0):
            source = half_latents
        elif upright is not None and state.step >= upright_from:
            source = upright
        else:
            source = latents
        idx = torch.randint(0, n, (config.batch_size,))
        x0 = source.mean[idx] + source.std[idx] * torch.randn_like(source.mean[idx])
        x0 = (x0 * state.scaling_factor).to(device)
        partial = state.step >= config.partial_captions_from
        foreign = config.foreign_tags_from is not None and state.step >= config.foreign_tags_from
        ids = captions_in.batch(idx.tolist(), config.caption_dropout,
                                config.tag_keep_prob if partial else None,
                                config.foreign_tag_prob if foreign else None).to(device)
        t = torch.randint(0, 1000, (config.batch_size,)).to(device)
        eps = _cpu_randn(x0)
        a = abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1.0 - a).sqrt() * eps
        context = text_condition(text_encoder, ids)
        if config.padding_blind_from is not None and state.step >= config.padding_blind_from:
            rows = (torch.rand(config.batch_size) < config.padding_blind_prob).to(device)
            empty_context = text_condition(text_encoder, captions_in.empty().to(device))
            context = blind_padding(context, ids, empty_context, captions_in.eos, rows)
        pred = unet(xt, t, encoder_hidden_states=context).sample
        per_sample = (pred - eps).square().mean(dim=(1, 2, 3))
        loss = (per_sample * loss_weight[t]).mean()
        run.opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_([*unet.parameters(), *te_params], config.grad_clip)
        run.opt.step()
        state.step += 1
        # EMA warm-up (as in ldm): early averages would otherwise be dominated by the random init.
        decay = min(config.ema_decay, (1.0 + state.step) / (10.0 + state.step))
        ema_update(run.ema_unet, unet, decay)
        ema_update(run.ema_te, text_encoder, decay)
        if state.step % 25 == 0 or state.step == 1:
            run.log(
                f"diffusion {state.step}/{config.diffusion_steps} loss {loss.item():.4f} "
                f"mse {per_sample.mean().item():.4f} lr {lr:.2e} ({time.perf_counter() - t0:.2f} s/step)"
            )
        if run.tick("diffusion", t0):
            return True
    state.phase = "decoder"
    run.checkpoint()
    return False
