"""The trainer's settings: every knob of a run, validated when the config is made."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from voidprompt.errors import VoidpromptError

__all__ = ["TrainConfig", "TrainError"]


class TrainError(VoidpromptError):
    """A training run cannot start or resume (bad settings, a state file from another run, ...)."""


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a run; the defaults are the committed model's."""

    out_dir: Path
    seed: int = 20241122
    n_images: int = 3000
    image_size: int = 64
    # VAE phase.
    vae_steps: int = 1200
    vae_batch: int = 16
    vae_crop: int = 32
    vae_full_from: float = 0.95  # fraction of vae_steps after which whole pictures are used
    vae_lr: float = 5e-4
    kl_weight: float = 1e-4  # on the per-element KL; light: the scaling factor fixes the scale
    edge_weight: float = 0.5
    # Diffusion phase.
    diffusion_steps: int = 28876
    batch_size: int = 16
    lr: float = 6e-4
    warmup_steps: int = 50
    # Warmup-stable-decay: constant lr until this step, then linear to 0 at `diffusion_steps`; the
    # annealing removes the gradient noise of batch 16 that a constant lr leaves in the weights.
    # None keeps the lr constant to the end.
    lr_decay_from: int | None = None
    ema_decay: float = 0.995
    # Min-SNR loss weighting (Hang et al. 2023): min(SNR, gamma) / SNR on the eps MSE; None weights
    # every timestep alike (SD1's own loss).
    min_snr_gamma: float | None = 5.0
    caption_dropout: float = 0.1
    partial_captions_from: int = 6318  # diffusion step from which tags are dropped one by one
    tag_keep_prob: float = 0.5
    # From this diffusion step on, a share `padding_blind_prob` of the captions have their EOS run
    # (the first EOS and the padding after it) replaced by the empty caption's. Causal attention
    # makes those 70-odd positions a summary of the whole caption, and a jointly trained UNet learns
    # to read the caption there (85% of its cross-attention) instead of at the tag tokens - which
    # inverts A1111 emphasis: `(tag:W)` scales only the tag's own position, so a higher W moves
    # attention off the summary and weakens the tag. Blinding the summary makes the tag tokens carry
    # the caption. None: never. (The shipped model: the last 6000 steps, with foreign tags.)
    padding_blind_from: int | None = 22876
    padding_blind_prob: float = 0.5
    # From this diffusion step on, a share `foreign_tag_prob` of the captions get 1-3 extra tags made
    # of random vocabulary tokens the world never uses. The world has ~60 words; real prompts carry
    # others (the NovelAI list's `bad hands`, `missing fingers`), whose embeddings stay at their random
    # init. A UNet that reads tag tokens (see padding_blind_*) must learn that such words mean nothing,
    # or CFG amplifies them into off-world pictures. None: never.
    foreign_tags_from: int | None = 22876
    foreign_tag_prob: float = 0.5
    # From this diffusion step on, the UNet learns from the same scenes drawn upright (WorldConfig
    # .upright: squares axis-aligned, triangles and stars pointing up), encoded by the same frozen
    # encoder with the same scaling factor. With random turns the model paints squares and stars as
    # round blobs at 8x8 latents. The VAE and decoder phases keep the turned pictures. None: never.
    upright_from: int | None = None
    # Progressive resolution (as SD1 itself went from 256 to 512 px): diffusion steps before this one
    # learn from the same scenes drawn at half the side (8x8 latents for a 128 px model), which cost
    # about 40% of a native step on CPU; a convolutional UNet and text encoder carry what they learnt
    # there over to the native size. The VAE phase then trains on the half-size pictures too (a VAE
    # trained at 64 px reads 128 px pictures nearly as well; see docs/miniature-history.md, "128 px:
    # past the VAE's limit"). The decoder phase and the exported model are native. None: every step
    # at the native size.
    half_size_until: int | None = None
    grad_clip: float = 1.0
    # Decoder fine-tune phase (encoder frozen, on the cached latents, whole pictures).
    decoder_steps: int = 2999
    decoder_batch: int = 16
    decoder_lr: float = 2e-4
    decoder_ema: float = 0.998
    # Run control. Cores to use: 1 runs the phases one after another; 2 or more run the decoder
    # phase in a second process beside the diffusion phase (it depends only on phases 1-2). Every
    # phase computes on one thread: these models are too small to gain from more, and a fixed thread
    # count makes the weights independent of the machine (float sums depend on how work is split).
    threads: int = 2
    # Where the modules compute: "cpu", or "cuda" / "cuda:N" for a GPU. Every random draw (pictures,
    # timesteps, noise, captions) stays on the CPU generator and is moved over, so a GPU run learns from
    # the same stream of samples as a CPU run (its float sums differ, so not the same bits). State
    # files hold CPU tensors either way: a run started on a GPU resumes on a CPU and back. On a GPU the
    # decoder phase runs in line (`threads` then only sets the CPU threads, which stay at 1).
    device: str = "cpu"
    # Start from this miniature checkpoint's weights (UNet, text encoder, VAE and latent scaling
    # factor) instead of random ones: the VAE phase is skipped and the diffusion phase continues the
    # file with a fresh optimizer and an EMA started at its weights. The file must have this run's
    # widths and native size (--image-size). On --resume the state file wins; the path is recorded.
    init_from: str | None = None
    checkpoint_minutes: float = 4.0
    minutes: float | None = None  # wall-clock cap for this invocation; the run saves and can resume

    def __post_init__(self) -> None:
        if self.n_images < self.batch_size or self.n_images < self.vae_batch:
            raise TrainError(f"n_images={self.n_images} must be at least one batch ({self.batch_size})")
        if self.image_size % 8 or self.vae_crop % 8 or self.vae_crop > self.image_size:
            raise TrainError(
                f"image_size={self.image_size} and vae_crop={self.vae_crop} must be multiples of 8, "
                "crop <= size"
            )
        if self.half_size_until is not None:
            half = self.image_size // 2
            if half % 8 or self.vae_crop > half:
                raise TrainError(
                    f"half_size_until needs half the image size ({self.image_size} / 2) to be a multiple of "
                    f"8 and at least vae_crop={self.vae_crop}; use an --image-size that is a multiple of 16"
                )
            if self.upright_from is not None and self.upright_from < self.half_size_until:
                raise TrainError(
                    f"upright_from={self.upright_from} falls inside the half-size steps (before "
                    f"{self.half_size_until}); the upright pictures exist only at the native size"
                )
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise TrainError(f"device={self.device!r}: use 'cpu', 'cuda' or 'cuda:N'")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise TrainError(f"caption_dropout={self.caption_dropout}: must be within 0..1")
        if not 0.0 < self.tag_keep_prob <= 1.0:
            raise TrainError(f"tag_keep_prob={self.tag_keep_prob}: must be within (0, 1]")
        if not 0.0 <= self.foreign_tag_prob <= 1.0:
            raise TrainError(f"foreign_tag_prob={self.foreign_tag_prob}: must be within 0..1")
        if self.min_snr_gamma is not None and self.min_snr_gamma <= 0.0:
            raise TrainError(
                f"min_snr_gamma={self.min_snr_gamma}: must be above 0 (a cap of 0 weights every step by 0); "
                "use None for plain eps MSE"
            )
        if not 0.0 <= self.padding_blind_prob <= 1.0:
            raise TrainError(f"padding_blind_prob={self.padding_blind_prob}: must be within 0..1")
        if self.lr_decay_from is not None and not 0 <= self.lr_decay_from < self.diffusion_steps:
            raise TrainError(
                f"lr_decay_from={self.lr_decay_from} must lie in 0..diffusion_steps-1 "
                f"({self.diffusion_steps - 1}); leave it unset for a constant lr"
            )

    def diffusion_lr(self, step: int) -> float:
        """The lr of diffusion step `step` (0-based): linear warm-up, constant, optional linear decay."""
        lr = self.lr * min(1.0, (step + 1) / self.warmup_steps)
        if self.lr_decay_from is not None and step >= self.lr_decay_from:
            lr *= (self.diffusion_steps - step) / (self.diffusion_steps - self.lr_decay_from)
        return lr

    def describe(self) -> dict[str, Any]:
        d = asdict(self)
        d["out_dir"] = str(self.out_dir)
        return d
