"""A run in progress: its modules, optimisers and EMA, where it stands, and its clock.

Everything the run needs is in ``out_dir``: ``images.pt`` (the world pictures), ``latents.pt``,
``state.pt`` (modules, optimisers, EMA, RNG state, phase and step) and ``model.safetensors`` (the
export, rewritten at every checkpoint so a run cut short still leaves a usable model).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from voidprompt.demo.train.checkpoint import atomic_save, export_model, load_init_weights, load_state, on_cpu
from voidprompt.demo.train.config import TrainConfig, TrainError
from voidprompt.demo.train.modules import adamw, fresh_modules, swapped

__all__ = ["Run", "TrainState", "start"]


@dataclass
class TrainState:
    phase: str = "vae"  # vae -> latents -> diffusion -> decoder -> done
    step: int = 0
    scaling_factor: float = 0.18215
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class Run:
    """The live run the phases advance; :meth:`checkpoint` saves it, :meth:`tick` keeps its clock."""

    config: TrainConfig
    device: torch.device
    unet: Any
    vae: Any
    text_encoder: Any
    ema_unet: dict[str, torch.Tensor]
    ema_te: dict[str, torch.Tensor]
    vae_opt: torch.optim.Optimizer
    opt: torch.optim.Optimizer
    state: TrainState
    log: Callable[[str], None]
    deadline: float
    last_checkpoint: float = 0.0

    @property
    def state_path(self) -> Path:
        return self.config.out_dir / "state.pt"

    @property
    def model_path(self) -> Path:
        return self.config.out_dir / "model.safetensors"

    def text_params(self) -> list[torch.Tensor]:
        """The text encoder's trained parameters (the final LayerNorm's bias stays frozen)."""
        return [p for p in self.text_encoder.parameters() if p.requires_grad]

    def checkpoint(self) -> None:
        """Save ``state.pt`` and export the EMA weights to ``model.safetensors``."""
        state = self.state
        atomic_save(on_cpu(
            {
                "config": self.config.describe(),
                "phase": state.phase,
                "step": state.step,
                "scaling_factor": state.scaling_factor,
                "seconds": state.seconds,
                "vae": self.vae.state_dict(),
                "unet": self.unet.state_dict(),
                "text_encoder": self.text_encoder.state_dict(),
                "ema_unet": self.ema_unet,
                "ema_te": self.ema_te,
                "vae_opt": self.vae_opt.state_dict(),
                "opt": self.opt.state_dict(),
                "rng": torch.get_rng_state(),
            }),
            self.state_path,
        )
        info = {
            "config": self.config.describe(),
            "phase": state.phase,
            "step": state.step,
            "seconds": {k: round(v) for k, v in state.seconds.items()},
            "command": "voidprompt demo train",
        }
        with swapped(self.unet, self.ema_unet), swapped(self.text_encoder, self.ema_te):
            export_model(
                self.model_path, self.unet, self.vae, self.text_encoder, state.scaling_factor, info,
                image_size=self.config.image_size,
            )
        self.log(f"checkpoint: phase {state.phase} step {state.step} -> {self.state_path}, {self.model_path}")

    def tick(self, phase: str, t0: float) -> bool:
        """Account the time since ``t0`` to ``phase``; checkpoint when due; True when this invocation
        must stop now (the time cap; the run is saved)."""
        now = time.perf_counter()
        self.state.seconds[phase] = self.state.seconds.get(phase, 0.0) + (now - t0)
        if now >= self.deadline:
            self.checkpoint()
            self.log(f"time cap of {self.config.minutes} min reached; continue with --resume")
            return True
        if now - self.last_checkpoint >= self.config.checkpoint_minutes * 60.0:
            self.checkpoint()
            self.last_checkpoint = time.perf_counter()
        return False


def start(config: TrainConfig, *, resume: bool, log_fn: Callable[[str], None]) -> Run:
    """A fresh run of ``config`` (from ``--init-from``'s weights when given), or the one saved in its
    ``out_dir`` when ``resume``. Seeds torch's global generator, or restores it on resume."""
    out = config.out_dir
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "state.pt"
    if state_path.exists() and not resume:
        raise TrainError(f"{state_path} exists: pass --resume to continue that run, or use another --out")
    if resume and not state_path.exists():
        raise TrainError(f"--resume: no {state_path} to resume from; start without --resume")

    started = time.perf_counter()
    deadline = started + config.minutes * 60.0 if config.minutes else math.inf

    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"--device {config.device}: this machine has no CUDA device; use --device cpu")
    unet, vae, text_encoder = (m.to(device) for m in fresh_modules(config.seed))
    init_scaling = None
    if config.init_from is not None and not resume:
        init_scaling = load_init_weights(config.init_from, config.image_size, unet, vae, text_encoder)
        log_fn(f"starting from {config.init_from} (scaling_factor {init_scaling:.5f}); no VAE phase")
    ema_unet = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    ema_te = {k: v.detach().clone() for k, v in text_encoder.state_dict().items()}
    te_params = [p for p in text_encoder.parameters() if p.requires_grad]
    vae_opt = adamw(vae.parameters(), config.vae_lr)
    # No weight decay: the 49408-row token embedding gets zero gradients for words the world never
    # uses, and decay would shrink those rows towards 0 for no reason.
    opt = adamw([*unet.parameters(), *te_params], config.lr)
    state = TrainState()
    torch.manual_seed(config.seed)

    if resume:
        saved = load_state(state_path, config)
        vae.load_state_dict(saved["vae"])
        unet.load_state_dict(saved["unet"])
        text_encoder.load_state_dict(saved["text_encoder"])
        ema_unet = {k: v.to(device) for k, v in saved["ema_unet"].items()}
        ema_te = {k: v.to(device) for k, v in saved["ema_te"].items()}
        vae_opt.load_state_dict(saved["vae_opt"])
        opt.load_state_dict(saved["opt"])
        torch.set_rng_state(saved["rng"].cpu())
        state = TrainState(saved["phase"], saved["step"], saved["scaling_factor"], dict(saved["seconds"]))
        log_fn(f"resumed {state_path}: phase {state.phase}, step {state.step}")
        if state.phase == "done" and state.step < config.diffusion_steps:
            state.phase = "diffusion"  # asked for more diffusion steps than the finished run had
    if init_scaling is not None:
        # The UNet learnt its latents at the file's scale: keep it rather than measure a new one.
        state = TrainState("latents", 0, init_scaling)
    return Run(config, device, unet, vae, text_encoder, ema_unet, ema_te, vae_opt, opt, state, log_fn,
                   deadline)
