"""A1111's model and settings routes: ``options``, ``cmd-flags``, the sampler, scheduler and upscaler
lists, checkpoints and VAEs."""

from __future__ import annotations

from enum import Enum
from typing import Any

from fastapi import APIRouter

from voidprompt.models.upscalers.registry import Upscalers
from voidprompt.pipeline.hires import LATENT_UPSCALE_MODES
from voidprompt.sampling.registry import SAMPLERS, SCHEDULERS
from voidprompt.server import models as m
from voidprompt.server.generation import Options
from voidprompt.server.routes import SDAPI
from voidprompt.server.state import App

__all__ = ["router"]


def router(state: App) -> APIRouter:
    router = APIRouter()
    prefix = SDAPI
    tags: list[str | Enum] = ["sdapi"]

    @router.get(f"{prefix}/options", tags=tags)
    def get_options() -> dict[str, Any]:
        return state.options_dict()

    @router.post(f"{prefix}/options", tags=tags)
    async def set_options(body: dict[str, Any]) -> None:
        normalised = Options.normalise(body)
        model = normalised.get("sd_model_checkpoint")
        vae = normalised.get("sd_vae")
        if model is not None:
            state.registry.find(model)  # 404 naming the titles before anything changes
        if vae is not None:
            state.registry.find_vae(vae)
        current = state.options.snapshot()
        tiles = (
            normalised.get("ESRGAN_tile", current["ESRGAN_tile"]),
            normalised.get("ESRGAN_tile_overlap", current["ESRGAN_tile_overlap"]),
        )
        Upscalers.check_tiles(*tiles)  # 400 before anything changes

        def apply() -> None:
            if model is not None:
                entry = state.host.select(model)
                # A1111 loads the new checkpoint right away; so does this (under the queue).
                state.host.ensure_loaded(entry, state.registry.find_vae(vae or state.host.selected_vae))
            if vae is not None:
                state.host.selected_vae = vae
            state.options.update(normalised)
            state.upscalers.set_tiles(*tiles)

        await state.queue.run("options", apply)
        return None

    @router.get(f"{prefix}/cmd-flags", tags=tags)
    def cmd_flags() -> dict[str, Any]:
        c = state.config
        return {
            "listen": c.host not in ("127.0.0.1", "localhost", "::1"),
            "port": c.port,
            "ckpt_dir": [str(p) for p in c.ckpt_dirs],
            "vae_dir": [str(p) for p in c.vae_dirs],
            "lora_dir": str(c.lora_dir) if c.lora_dir else None,
            "embeddings_dir": str(c.embeddings_dir) if c.embeddings_dir else None,
            "hypernetwork_dir": str(c.hypernetwork_dir) if c.hypernetwork_dir else None,
            "esrgan_models_path": str(c.upscaler_dir / "ESRGAN"),
            "realesrgan_models_path": str(c.upscaler_dir / "RealESRGAN"),
            "api": True,
            "nowebui": not c.ui,
            "api_auth": "***" if c.credentials else None,
            "cors_allow_origins": ",".join(c.cors_allow_origins) or None,
            "device": c.device,
            "studies_dir": str(c.studies_dir) if c.studies_dir else None,
        }

    @router.get(f"{prefix}/samplers", tags=tags, response_model=list[m.SamplerItem])
    def samplers() -> list[m.SamplerItem]:
        out = []
        for spec in SAMPLERS:
            options: dict[str, Any] = dict(spec.options)
            if spec.default_scheduler:
                options["scheduler"] = spec.default_scheduler
            for flag in ("second_order", "uses_ensd", "discard_next_to_last_sigma", "brownian_noise"):
                if getattr(spec, flag):
                    options[flag] = True
            out.append(m.SamplerItem(name=spec.label, aliases=list(spec.aliases), options=options))
        return out

    @router.get(f"{prefix}/schedulers", tags=tags, response_model=list[m.SchedulerItem])
    def schedulers() -> list[m.SchedulerItem]:
        return [
            m.SchedulerItem(
                name=s.name,
                label=s.label,
                aliases=list(s.aliases) or None,
                default_rho=s.default_rho if s.default_rho is not None else -1.0,
                need_inner_model=s.needs_model,
            )
            for s in SCHEDULERS
        ]

    @router.get(f"{prefix}/upscalers", tags=tags, response_model=list[m.UpscalerItem])
    def upscalers() -> list[m.UpscalerItem]:
        # A1111's fields: its UpscalerData reports scale 4 unless a Real-ESRGAN model says 2.
        return [
            m.UpscalerItem(name=e.name, model_name=e.model_name, model_path=e.model_path, scale=e.scale)
            for e in state.upscalers.entries()
        ]

    @router.get(f"{prefix}/latent-upscale-modes", tags=tags, response_model=list[m.LatentUpscalerModeItem])
    def latent_upscale_modes() -> list[m.LatentUpscalerModeItem]:
        return [m.LatentUpscalerModeItem(name=name) for name in LATENT_UPSCALE_MODES]

    @router.get(f"{prefix}/sd-models", tags=tags, response_model=list[m.SDModelItem])
    def sd_models() -> list[m.SDModelItem]:
        items = []
        for e in state.registry.checkpoints:
            facts = state.registry.facts(e)
            family = facts.family
            items.append(
                m.SDModelItem(
                    title=e.title,
                    model_name=e.model_name,
                    hash=e.shorthash,
                    sha256=e.sha256,
                    filename=str(e.path),
                    config=None,
                    family=family.value if family is not None else None,
                    native_size=facts.native_size,
                )
            )
        return items

    @router.get(f"{prefix}/sd-vae", tags=tags, response_model=list[m.SDVaeItem])
    def sd_vae() -> list[m.SDVaeItem]:
        return [m.SDVaeItem(model_name=e.name, filename=str(e.path)) for e in state.registry.vaes]

    @router.post(f"{prefix}/refresh-checkpoints", tags=tags)
    def refresh_checkpoints() -> None:
        state.registry.refresh()
        if state.host.selected is None and state.registry.checkpoints:
            state.host.selected = state.registry.checkpoints[0]

    @router.post(f"{prefix}/refresh-vae", tags=tags)
    def refresh_vae() -> None:
        state.registry.refresh_vaes()

    return router
