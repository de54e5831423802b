"""Train the miniature model: a narrow SD1.x (CLIP text encoder, cross-attention UNet, KL VAE f=8).

One command, ``voidprompt demo train``, runs four phases and can stop and resume at any point:

1. ``vae``: the KL autoencoder on world pictures (L1 + L2 + a light edge term + a small KL). The
   pictures are drawn once by :func:`voidprompt.demo.world.draw_pixels` (on every core) and cached;
   the VAE trains on random crops (a convolutional VAE does not care about the crop size, and crops
   cost a quarter of the compute of whole 64 px pictures) and, for the last part, whole pictures.
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
4. ``decoder``: the VAE decoder alone is fine-tuned on the cached latents (the encoder, and so the
   latent space the UNet learnt, stay fixed - as Stability's ft-MSE VAE did for SD1). The joint VAE
   phase ends with a blurry decoder (shapes' corners lost); the latents carry far more than it shows
   (posterior std 0.08 against a latent std of 4.2). This phase has its own RNG and its own state
   file (``decoder.pt``) and depends only on phases 1-2, so its result does not depend on whether it
   runs before, after or beside phase 3. With ``threads >= 2`` it runs beside phase 3 in a second
   process; every phase computes on one thread, so the weights do not depend on the machine.

The final LayerNorm's bias is frozen at a vector with mean 0.5. A1111's emphasis ("Original") scales
the conditioning back to its old mean (``z * mean_before / mean_after``); an output whose mean is near
zero turns that into a division by ~0 (NaN or huge values). A fixed offset is harmless to the UNet (its
key/value projections absorb it) and keeps the mean well away from zero whatever the encoder learns.

Everything the run needs is in ``out_dir``: ``images.pt`` (the world pictures), ``latents.pt``,
``state.pt`` (modules, optimisers, EMA, RNG state, phase and step; loaded with
``torch.load(weights_only=True)``) and ``model.safetensors`` (the export, rewritten at every
checkpoint so a run cut short still leaves a usable model).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from voidprompt.errors import VoidpromptError
from voidprompt.models.arch import ArchConstants, ClipArch, SD1Arch, UNetArch, VaeArch, build_modules
from voidprompt.models.convert import modules_to_compvis
from voidprompt.models.load import sd1_alphas_cumprod

__all__ = [
    "MINIATURE_ARCH",
    "MINIATURE_CONSTANTS",
    "CaptionBatcher",
    "TrainConfig",
    "TrainError",
    "adamw",
    "atomic_save",
    "blind_padding",
    "encode_tokens",
    "export_model",
    "reconstruction_losses",
    "save_safetensors",
    "text_condition",
    "train",
]

log = logging.getLogger(__name__)


class TrainError(VoidpromptError):
    """A training run cannot start or resume (bad settings, a state file from another run, ...)."""


# Constants shapes cannot tell, written to the file's ``voidprompt.arch`` metadata. Frozen with the
# weights: UNet widths 32/64/128 need fewer than SD1's 32 GroupNorm groups to keep 4 channels a group,
# the CLIP width 64 needs head width 16 for 4 heads. ``scaling_factor`` is filled in after the VAE.
MINIATURE_CONSTANTS = ArchConstants(
    unet_heads=4,
    unet_norm_groups=8,
    unet_sample_size=8,
    vae_norm_groups=8,
    vae_sample_size=64,
    clip_head_dim=16,
)

MINIATURE_ARCH = SD1Arch(
    # SD1 puts attention at every level but the last; here 8x8 and 4x4 have it, 2x2 does not.
    unet=UNetArch(
        in_channels=4,
        out_channels=4,
        model_channels=32,
        channel_mult=(1, 2, 4),
        num_res_blocks=1,
        attention_levels=(True, True, False),
        transformer_depth=(1, 1, 1),
        context_dim=64,
        linear_projection=False,
    ),
    # Four levels: downscale 8, as every SD1 VAE.
    vae=VaeArch(in_channels=3, out_channels=3, channels=32, channel_mult=(1, 2, 4, 4), num_res_blocks=1,
                latent_channels=4),
    clip=ClipArch(hidden_size=64, intermediate_size=256, num_layers=4, vocab_size=49408, max_positions=77),
    constants=MINIATURE_CONSTANTS,
)

CONTEXT = 77
CLIP_SKIP = 2  # the layer the UNet is trained on: hidden_states[-2]
FINAL_LN_BIAS_MEAN = 0.5


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
    # trained at 64 px reads 128 px pictures nearly as well: model card, session 9). The decoder phase
    # and the exported model are native. None: every step at the native size.
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


# ----------------------------------------------------------------------------------- text conditioning


def _text_model(text_encoder: nn.Module) -> nn.Module:
    # transformers 5.x flattened CLIPTextModel; older versions keep the parts under ``.text_model``.
    inner = getattr(text_encoder, "text_model", None)
    return inner if isinstance(inner, nn.Module) else text_encoder


def text_condition(text_encoder: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The UNet's context exactly as A1111 computes it at Clip skip 2 (all weights 1): the penultimate
    hidden state through the final LayerNorm."""
    positions = torch.arange(ids.shape[1], dtype=torch.long, device=ids.device).expand(ids.shape[0], -1)
    out = text_encoder(input_ids=ids, position_ids=positions, output_hidden_states=True)
    final_layer_norm: nn.Module = getattr(_text_model(text_encoder), "final_layer_norm")  # noqa: B009
    return final_layer_norm(out.hidden_states[-CLIP_SKIP])


def encode_tokens(tag_tokens: list[list[int]], bos: int, eos: int, comma: int) -> list[int]:
    """``[BOS] tag, tag, ... [EOS]`` padded with EOS to 77, from pre-tokenised tags (the CLIP BPE works
    word by word and a comma is its own token, so this equals tokenising the joined caption)."""
    body: list[int] = []
    for i, tokens in enumerate(tag_tokens):
        if i:
            body.append(comma)
        body.extend(tokens)
    body = body[: CONTEXT - 2]
    return [bos, *body, eos] + [eos] * (CONTEXT - 2 - len(body))


def blind_padding(
    context: torch.Tensor, ids: torch.Tensor, empty_context: torch.Tensor, eos: int, rows: torch.Tensor
) -> torch.Tensor:
    """``context`` with, in the captions selected by the bool mask ``rows``, every position from the
    first EOS on replaced by ``empty_context`` (the empty caption's context, (1, 77, C))."""
    first_eos = (ids == eos).int().argmax(dim=1)
    positions = torch.arange(ids.shape[1], device=ids.device)
    blind = (positions[None, :] >= first_eos[:, None]) & rows[:, None]
    return torch.where(blind[..., None], empty_context.expand_as(context), context)


class CaptionBatcher:
    """Token ids of training captions: tags pre-tokenised once, reshuffled (and optionally thinned) per
    use, captions dropped to "" for CFG's unconditional prediction.

    Random draws come from torch's global generator in a fixed order (dropout mask, then per caption a
    permutation and, when thinning, a keep mask), so a resumed run replays the same stream."""

    def __init__(self, captions: list[str]) -> None:
        from voidprompt.models.tokenizer import load_clip_tokenizer

        tokenizer = load_clip_tokenizer()
        self._bos, self._eos = tokenizer.bos_id, tokenizer.eos_id
        self._comma = tokenizer.encode(",")[0]
        cache: dict[str, list[int]] = {}
        self._tags = [[cache.setdefault(t, tokenizer.encode(t)) for t in c.split(", ")] for c in captions]
        self._empty = encode_tokens([], self._bos, self._eos, self._comma)
        self._empty_ids = torch.tensor([self._empty])
        used = {tok for tokens in cache.values() for tok in tokens} | {self._bos, self._eos, self._comma}
        self._foreign = torch.tensor([t for t in range(tokenizer.vocab_size) if t not in used])

    @property
    def eos(self) -> int:
        return self._eos

    def empty(self) -> torch.Tensor:
        """(1, 77) ids of the empty caption."""
        return self._empty_ids

    def batch(
        self, indices: list[int], dropout: float, keep_prob: float | None = None,
        foreign_prob: float | None = None,
    ) -> torch.Tensor:
        """(len(indices), 77) ids; ``keep_prob`` keeps each tag with that probability (at least one);
        ``foreign_prob`` adds, with that probability, 1-3 one-token tags the world never uses at random
        places (draws only when given, so runs without it replay the same stream)."""
        drop = torch.rand(len(indices)) < dropout
        rows = []
        for j, i in enumerate(indices):
            if drop[j]:
                rows.append(self._empty)
                continue
            order = torch.randperm(len(self._tags[i])).tolist()
            if keep_prob is not None:
                keep = (torch.rand(len(order)) < keep_prob).tolist()
                order = [k for k, kept in zip(order, keep, strict=True) if kept] or order[:1]
            tags = [self._tags[i][k] for k in order]
            if foreign_prob is not None and float(torch.rand(())) < foreign_prob:
                for _ in range(int(torch.randint(1, 4, ()))):
                    word = [int(self._foreign[torch.randint(len(self._foreign), ())])]
                    tags.insert(int(torch.randint(len(tags) + 1, ())), word)
            rows.append(encode_tokens(tags, self._bos, self._eos, self._comma))
        return torch.tensor(rows, dtype=torch.long)


def reconstruction_losses(
    rec: torch.Tensor, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """L1, L2 and the L1 of image gradients (keeps edges sharp) between a decoded and a true picture.

    Built in this order on purpose: the graph's order sets the order in which backward sums
    gradients, and the shipped VAE phase was trained with this one. (The shipped decoder phase built
    L2 after the edge term, so a rerun of that phase differs from the shipped decoder by float
    rounding only; see MODEL_CARD.md.)"""
    l1 = (rec - x).abs().mean()
    l2 = (rec - x).square().mean()
    edge = (rec.diff(dim=-1) - x.diff(dim=-1)).abs().mean() + (rec.diff(dim=-2) - x.diff(dim=-2)).abs().mean()
    return l1, l2, edge


# ----------------------------------------------------------------------------------- modules and export


def _fresh_modules(seed: int) -> tuple[Any, Any, Any]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet, vae, text_encoder = build_modules(MINIATURE_ARCH, device="cpu")
        bias: torch.Tensor = getattr(_text_model(text_encoder), "final_layer_norm").bias  # noqa: B009
        with torch.no_grad():
            bias.copy_(FINAL_LN_BIAS_MEAN + 0.1 * torch.randn_like(bias))
        bias.requires_grad_(False)
    return unet, vae, text_encoder


def export_model(
    path: Path,
    unet: Any,
    vae: Any,
    text_encoder: Any,
    scaling_factor: float,
    info: dict[str, Any],
    *,
    image_size: int = 64,
) -> Path:
    """Write one fp16 CompVis-layout .safetensors with the ``voidprompt.arch`` metadata (atomically).

    ``image_size`` is the side the model was trained at; it is stored as ``vae_sample_size`` (and
    ``unet_sample_size`` = side / 8), which is how measurements and the gallery find a model's native
    size (:func:`voidprompt.demo.generate.native_size`)."""
    sd = modules_to_compvis(unet, vae, text_encoder, alphas_cumprod=sd1_alphas_cumprod())
    tensors = {
        k: (v.detach().to(torch.float16) if v.is_floating_point() and k != "alphas_cumprod" else v.detach())
        .cpu()
        .contiguous()
        .clone()
        for k, v in sd.items()
    }
    constants = replace(
        MINIATURE_CONSTANTS,
        scaling_factor=float(scaling_factor),
        unet_sample_size=image_size // 8,
        vae_sample_size=image_size,
    )
    metadata = {**constants.to_metadata(), "voidprompt.training": json.dumps(info, sort_keys=True)}
    return save_safetensors(tensors, metadata, path)


def save_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> Path:
    """Write a .safetensors file atomically (a reader never sees half a model), readable by all."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.chmod(0o644)  # safetensors writes 0600; the file is package data others must read
    tmp.replace(path)
    return path


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file, then rename: a stopped run never leaves half a state file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


# ----------------------------------------------------------------------------------- data


def _cores() -> int:
    """Cores this process may use: the world's pictures are drawn on all of them (the training itself
    keeps to ``TrainConfig.threads``)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity call outside Linux
        return os.cpu_count() or 1


def _load_init_weights(path: str, image_size: int, unet: Any, vae: Any, text_encoder: Any) -> float:
    """Copy the weights of the checkpoint at ``path`` (``--init-from``) into the fresh modules; returns
    its latent scaling factor."""
    from voidprompt.errors import ModelLoadError
    from voidprompt.models.load import load_model

    try:
        source = load_model(path, device="cpu", dtype=torch.float32)
    except ModelLoadError as error:
        raise TrainError(f"--init-from: {error}") from None
    native = int(source.arch.constants.vae_sample_size)
    if native != image_size:
        raise TrainError(
            f"--init-from {path} is a {native} px model, not {image_size}; pass --image-size {native}"
        )
    for name, module, loaded in (("UNet", unet, source.unet), ("VAE", vae, source.vae),
                                 ("text encoder", text_encoder, source.text_encoder)):
        try:
            module.load_state_dict(loaded.state_dict())
        except RuntimeError as error:
            first = str(error).strip().splitlines()[1:2] or [str(error)]
            raise TrainError(
                f"--init-from {path}: its {name} is not the miniature model's shape "
                f"({first[0].strip()}); start from a file `voidprompt demo train` wrote"
            ) from None
    return float(source.scaling_factor)


def _world_images(
    config: TrainConfig, log_fn: Callable[[str], None], *, upright: bool = False, half: bool = False
) -> tuple[torch.Tensor, list[str]]:
    """(N, 3, H, W) uint8 pictures and their captions, drawn once and cached in ``images.pt``
    (``images-upright.pt`` for the upright world: the same scenes and captions, shapes turned;
    ``images-half.pt`` for the same scenes at half the side, see ``TrainConfig.half_size_until``)."""
    from voidprompt.demo.world import WorldConfig, draw_pixels

    size = config.image_size // 2 if half else config.image_size
    path = config.out_dir / ("images-upright.pt" if upright else "images-half.pt" if half else "images.pt")
    if path.exists():
        cached = torch.load(path, weights_only=True)
        same_size = cached["images"].shape[-1] == size
        if cached["seed"] == config.seed and len(cached["captions"]) == config.n_images and same_size:
            return cached["images"], list(cached["captions"])
    t0 = time.perf_counter()
    world = WorldConfig(size=size, upright=upright)
    pixels, captions = draw_pixels(config.seed, config.n_images, world, workers=_cores())
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
    atomic_save({"seed": config.seed, "images": images, "captions": captions}, path)
    log_fn(f"drew {config.n_images} {'upright ' if upright else ''}{size} px world pictures in "
           f"{time.perf_counter() - t0:.0f} s")
    return images, captions


def _encode_posterior(vae: Any, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder's posterior mean and std of every picture (no randomness), on the CPU."""
    vae.eval()
    device = next(vae.parameters()).device
    means, stds = [], []
    with torch.no_grad():
        for start in range(0, images.shape[0], 64):
            posterior = vae.encode(_to_unit(images[start : start + 64].to(device))).latent_dist
            means.append(posterior.mean.cpu())
            stds.append(posterior.std.cpu())
    return torch.cat(means), torch.cat(stds)


def _cached_posterior(
    config: TrainConfig, vae: Any, name: str, draw: Callable[[], torch.Tensor], log_fn: Callable[[str], None]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior of another picture set of the same scenes (``draw`` makes it, called only when the
    cache misses), cached in ``latents-<name>.pt``. The encoder is frozen after phase 1 (the decoder
    phase touches only the decoder), so these latents share the native latents' space and scaling factor."""
    path = config.out_dir / f"latents-{name}.pt"
    if path.exists():
        cached = torch.load(path, weights_only=True)
        if cached.get("seed") == config.seed and cached["mean"].shape[0] == config.n_images:
            return cached["mean"], cached["std"]
    t0 = time.perf_counter()
    mean, std = _encode_posterior(vae, draw())
    atomic_save({"seed": config.seed, "mean": mean, "std": std}, path)
    log_fn(f"cached {mean.shape[0]} {name} latents in {time.perf_counter() - t0:.0f} s")
    return mean, std


def _upright_images(config: TrainConfig, captions: list[str], log_fn: Callable[[str], None]) -> torch.Tensor:
    """The same scenes with upright shapes (``images-upright.pt``); their captions must be the same."""
    images, upright_captions = _world_images(config, log_fn, upright=True)
    if upright_captions != captions:
        raise TrainError("the upright world's captions differ from the turned world's; the world "
                         "must draw the same scenes in both (see WorldConfig.upright)")
    return images


def _to_unit(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1.0


# ----------------------------------------------------------------------------------- state


@dataclass
class _State:
    phase: str = "vae"  # vae -> latents -> diffusion -> decoder -> done
    step: int = 0
    scaling_factor: float = 0.18215
    seconds: dict[str, float] = field(default_factory=dict)


def adamw(params: Iterable[torch.Tensor], lr: float) -> torch.optim.AdamW:
    """AdamW without weight decay, on torch's fused CPU kernel: one pass over the text encoder + UNet's
    6.5 M parameters takes 10 ms instead of the default per-tensor loop's 43 ms (measured on one
    core), which was a quarter of a batch-16 diffusion step."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)


def _on_cpu(obj: Any) -> Any:
    """``obj`` (nested dicts / lists of tensors, as state dicts are) with every tensor on the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _on_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_on_cpu(v) for v in obj)
    return obj


def _cpu_randn(like: torch.Tensor) -> torch.Tensor:
    """``torch.randn_like(like)`` drawn from the CPU generator and moved to ``like``'s device. It keeps
    ``like``'s memory layout, as randn_like does: the VAE's posterior comes out channels-last on the
    CPU, and a contiguous draw would put the same numbers at other positions than earlier runs did."""
    return torch.randn_like(like, device="cpu").to(like.device)


def _ema_update(ema: dict[str, torch.Tensor], module: nn.Module, decay: float) -> None:
    # Two multi-tensor kernels instead of two per tensor (hundreds of launches a step on a GPU); the
    # same arithmetic, so the same bits, as a per-tensor mul_ and add_.
    with torch.no_grad():
        state = module.state_dict()
        floats = [name for name, p in state.items() if p.is_floating_point()]
        averages, current = [ema[name] for name in floats], [state[name] for name in floats]
        torch._foreach_mul_(averages, decay)
        torch._foreach_add_(averages, current, alpha=1.0 - decay)
        for name, p in state.items():
            if not p.is_floating_point():  # integer buffers (position ids) are copied, not averaged
                ema[name].copy_(p)


@contextmanager
def _swapped(module: nn.Module, weights: dict[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily load ``weights`` (the EMA) into ``module``."""
    saved = {k: v.clone() for k, v in module.state_dict().items()}
    module.load_state_dict(weights)
    try:
        yield
    finally:
        module.load_state_dict(saved)


# ----------------------------------------------------------------------------------- the run


def train(config: TrainConfig, *, resume: bool = False, log_fn: Callable[[str], None] = print) -> Path:
    """Run (or resume) the four phases; returns the path of ``model.safetensors`` in ``out_dir``."""
    torch.set_num_threads(1)
    out = config.out_dir
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "state.pt"
    model_path = out / "model.safetensors"
    if state_path.exists() and not resume:
        raise TrainError(f"{state_path} exists: pass --resume to continue that run, or use another --out")
    if resume and not state_path.exists():
        raise TrainError(f"--resume: no {state_path} to resume from; start without --resume")

    started = time.perf_counter()
    deadline = started + config.minutes * 60.0 if config.minutes else math.inf

    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"--device {config.device}: this machine has no CUDA device; use --device cpu")
    unet, vae, text_encoder = (m.to(device) for m in _fresh_modules(config.seed))
    init_scaling = None
    if config.init_from is not None and not resume:
        init_scaling = _load_init_weights(config.init_from, config.image_size, unet, vae, text_encoder)
        log_fn(f"starting from {config.init_from} (scaling_factor {init_scaling:.5f}); no VAE phase")
    ema_unet = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    ema_te = {k: v.detach().clone() for k, v in text_encoder.state_dict().items()}
    te_params = [p for p in text_encoder.parameters() if p.requires_grad]
    vae_opt = adamw(vae.parameters(), config.vae_lr)
    # No weight decay: the 49408-row token embedding gets zero gradients for words the world never
    # uses, and decay would shrink those rows towards 0 for no reason.
    opt = adamw([*unet.parameters(), *te_params], config.lr)
    state = _State()
    torch.manual_seed(config.seed)

    if resume:
        saved = torch.load(state_path, weights_only=True, map_location="cpu")
        if saved["config"]["seed"] != config.seed:
            raise TrainError(
                f"{state_path} was trained with seed {saved['config']['seed']}, not {config.seed}; "
                "pass the same --seed to resume"
            )
        # Runs from before --image-size existed were all 64 px.
        saved_size = saved["config"].get("image_size", 64)
        if saved_size != config.image_size:
            raise TrainError(
                f"{state_path} was trained on {saved_size} px pictures, not {config.image_size}; pass "
                f"--image-size {saved_size} to resume (its VAE, latents and UNet are of that size)"
            )
        vae.load_state_dict(saved["vae"])
        unet.load_state_dict(saved["unet"])
        text_encoder.load_state_dict(saved["text_encoder"])
        ema_unet = {k: v.to(device) for k, v in saved["ema_unet"].items()}
        ema_te = {k: v.to(device) for k, v in saved["ema_te"].items()}
        vae_opt.load_state_dict(saved["vae_opt"])
        opt.load_state_dict(saved["opt"])
        torch.set_rng_state(saved["rng"].cpu())
        state = _State(saved["phase"], saved["step"], saved["scaling_factor"], dict(saved["seconds"]))
        log_fn(f"resumed {state_path}: phase {state.phase}, step {state.step}")
        if state.phase == "done" and state.step < config.diffusion_steps:
            state.phase = "diffusion"  # asked for more diffusion steps than the finished run had
    if init_scaling is not None:
        # The UNet learnt its latents at the file's scale: keep it rather than measure a new one.
        state = _State("latents", 0, init_scaling)

    def info() -> dict[str, Any]:
        return {
            "config": config.describe(),
            "phase": state.phase,
            "step": state.step,
            "seconds": {k: round(v) for k, v in state.seconds.items()},
            "command": "voidprompt demo train",
        }

    def checkpoint() -> None:
        atomic_save(_on_cpu(
            {
                "config": config.describe(),
                "phase": state.phase,
                "step": state.step,
                "scaling_factor": state.scaling_factor,
                "seconds": state.seconds,
                "vae": vae.state_dict(),
                "unet": unet.state_dict(),
                "text_encoder": text_encoder.state_dict(),
                "ema_unet": ema_unet,
                "ema_te": ema_te,
                "vae_opt": vae_opt.state_dict(),
                "opt": opt.state_dict(),
                "rng": torch.get_rng_state(),
            }),
            state_path,
        )
        with _swapped(unet, ema_unet), _swapped(text_encoder, ema_te):
            export_model(
                model_path, unet, vae, text_encoder, state.scaling_factor, info(),
                image_size=config.image_size,
            )
        log_fn(f"checkpoint: phase {state.phase} step {state.step} -> {state_path}, {model_path}")

    images, captions = _world_images(config, log_fn)
    half_images = None
    if config.half_size_until is not None:
        half_images, half_captions = _world_images(config, log_fn, half=True)
        if half_captions != captions:
            raise TrainError("the half-size world's captions differ from the native one's; the world must "
                             "draw the same scenes at any size (see world.make_dataset)")
    vae_images = images if half_images is None else half_images
    last_ckpt = time.perf_counter()

    def tick(phase: str, t0: float) -> bool:
        """Account time; checkpoint when due; True when this invocation must stop now."""
        nonlocal last_ckpt
        now = time.perf_counter()
        state.seconds[phase] = state.seconds.get(phase, 0.0) + (now - t0)
        if now >= deadline:
            checkpoint()
            log_fn(f"time cap of {config.minutes} min reached; continue with --resume")
            return True
        if now - last_ckpt >= config.checkpoint_minutes * 60.0:
            checkpoint()
            last_ckpt = time.perf_counter()
        return False

    # ------------------------------------------------------------------ phase 1: VAE
    if state.phase == "vae":
        vae.train()
        n = vae_images.shape[0]
        while state.step < config.vae_steps:
            t0 = time.perf_counter()
            idx = torch.randint(0, n, (config.vae_batch,))
            x = _to_unit(vae_images[idx]).to(device)
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
            vae_opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(vae.parameters(), config.grad_clip)
            vae_opt.step()
            state.step += 1
            if state.step % 25 == 0 or state.step == 1:
                log_fn(
                    f"vae {state.step}/{config.vae_steps} l1 {l1.item():.4f} edge {edge.item():.4f} "
                    f"kl {kl.item():.2f} ({time.perf_counter() - t0:.2f} s/step)"
                )
            if tick("vae", t0):
                return model_path
        state.phase, state.step = "latents", 0

    # ------------------------------------------------------------------ phase 2: latent cache
    latents_path = out / "latents.pt"
    if state.phase == "latents" or not latents_path.exists():
        t0 = time.perf_counter()
        mean, std = _encode_posterior(vae, images)
        sample = mean + std * torch.randn_like(mean)
        if config.init_from is None:
            state.scaling_factor = float(1.0 / sample.std())
        atomic_save({"mean": mean, "std": std, "scaling_factor": state.scaling_factor}, latents_path)
        state.seconds["latents"] = state.seconds.get("latents", 0.0) + time.perf_counter() - t0
        kept = " (--init-from's, kept)" if config.init_from is not None else ""
        log_fn(
            f"cached {mean.shape[0]} latents in {time.perf_counter() - t0:.0f} s; latent std "
            f"{float(sample.std()):.4f}; scaling_factor {state.scaling_factor:.5f}{kept}"
        )
        if state.phase == "latents":
            state.phase, state.step = "diffusion", 0
            checkpoint()
            last_ckpt = time.perf_counter()
    cache = torch.load(latents_path, weights_only=True)
    lat_mean, lat_std = cache["mean"], cache["std"]
    half_latents = None
    if half_images is not None:
        half_latents = _cached_posterior(config, vae, "half", lambda: half_images, log_fn)
    decoder_job = None
    if config.threads >= 2 and device.type == "cpu" and state.phase == "diffusion" and config.decoder_steps:
        decoder_job = _DecoderProcess(config, vae, images, lat_mean, lat_std, state.scaling_factor,
                                      deadline - time.perf_counter())

    # ------------------------------------------------------------------ phase 3: text encoder + UNet
    if state.phase == "diffusion":
        captions_in = CaptionBatcher(captions)
        abar = sd1_alphas_cumprod().to(device)
        snr = abar / (1.0 - abar)
        gamma = config.min_snr_gamma
        loss_weight = torch.ones_like(snr) if gamma is None else torch.clamp(snr, max=gamma) / snr
        unet.train()
        text_encoder.train()
        vae.eval()
        upright = None
        upright_from = config.upright_from if config.upright_from is not None else config.diffusion_steps
        if upright_from < config.diffusion_steps:
            upright = _cached_posterior(
                config, vae, "upright", lambda: _upright_images(config, captions, log_fn), log_fn
            )
        n = lat_mean.shape[0]
        while state.step < config.diffusion_steps:
            t0 = time.perf_counter()
            lr = config.diffusion_lr(state.step)
            for group in opt.param_groups:
                group["lr"] = lr
            if half_latents is not None and state.step < (config.half_size_until or 0):
                source_mean, source_std = half_latents
            elif upright is not None and state.step >= upright_from:
                source_mean, source_std = upright
            else:
                source_mean, source_std = lat_mean, lat_std
            idx = torch.randint(0, n, (config.batch_size,))
            x0 = source_mean[idx] + source_std[idx] * torch.randn_like(source_mean[idx])
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
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_([*unet.parameters(), *te_params], config.grad_clip)
            opt.step()
            state.step += 1
            # EMA warm-up (as in ldm): early averages would otherwise be dominated by the random init.
            decay = min(config.ema_decay, (1.0 + state.step) / (10.0 + state.step))
            _ema_update(ema_unet, unet, decay)
            _ema_update(ema_te, text_encoder, decay)
            if state.step % 25 == 0 or state.step == 1:
                log_fn(
                    f"diffusion {state.step}/{config.diffusion_steps} loss {loss.item():.4f} "
                    f"mse {per_sample.mean().item():.4f} lr {lr:.2e} ({time.perf_counter() - t0:.2f} s/step)"
                )
            if tick("diffusion", t0):
                if decoder_job is not None:
                    decoder_job.join()  # it stops at the same time cap, its state saved
                return model_path
        state.phase = "decoder"
        checkpoint()
    if decoder_job is not None:
        log_fn("waiting for the decoder phase running beside")
        decoder_job.join()

    # ------------------------------------------------------------------ phase 4: decoder fine-tune
    if state.phase in ("decoder", "done"):
        finished = _finetune_decoder(config, vae, images, lat_mean, lat_std, state.scaling_factor,
                                     deadline, log_fn)
        state.phase = "done" if finished else "decoder"
        checkpoint()
        if not finished:
            log_fn(f"time cap of {config.minutes} min reached; continue with --resume")
            return model_path
    log_fn(f"done: {model_path} ({model_path.stat().st_size / 1e6:.1f} MB)")
    return model_path


class _DecoderProcess:
    """Phase 4 in a second process (one thread), started when phase 3 starts. It writes the same
    ``decoder.pt`` as the phase run in line, which the main process then finishes from (loading the
    EMA), so a run with ``threads >= 2`` gives the weights of a run with ``threads=1``."""

    def __init__(
        self, config: TrainConfig, vae: Any, images: torch.Tensor, lat_mean: torch.Tensor,
        lat_std: torch.Tensor, scaling_factor: float, seconds_left: float,
    ) -> None:
        import multiprocessing

        # spawn, not fork: a forked child would inherit the parent's torch thread pools and locks.
        context = multiprocessing.get_context("spawn")
        vae_state = {k: v.detach().clone() for k, v in vae.state_dict().items()}
        self._process = context.Process(
            target=_decoder_process_main,
            args=(config, vae_state, images, lat_mean, lat_std, scaling_factor, seconds_left),
            name="voidprompt-decoder-phase",
            daemon=True,  # stopped with the main process if it dies before joining
        )
        self._process.start()

    def join(self) -> None:
        self._process.join()
        if self._process.exitcode != 0:
            raise TrainError(
                f"the decoder phase beside the diffusion phase failed (exit code {self._process.exitcode}; "
                "its error is printed above); rerun with --resume, or with --threads 1 to run it in line"
            )


def _decoder_process_main(
    config: TrainConfig, vae_state: dict[str, torch.Tensor], images: torch.Tensor, lat_mean: torch.Tensor,
    lat_std: torch.Tensor, scaling_factor: float, seconds_left: float,
) -> None:
    torch.set_num_threads(1)
    _, vae, _ = _fresh_modules(config.seed)
    vae.load_state_dict(vae_state)
    deadline = time.perf_counter() + seconds_left
    _finetune_decoder(config, vae, images, lat_mean, lat_std, scaling_factor, deadline,
                      lambda line: print(line, flush=True))


def _finetune_decoder(
    config: TrainConfig,
    vae: Any,
    images: torch.Tensor,
    lat_mean: torch.Tensor,
    lat_std: torch.Tensor,
    scaling_factor: float,
    deadline: float,
    log_fn: Callable[[str], None],
) -> bool:
    """Phase 4: fine-tune ``vae.decoder`` (and ``post_quant_conv``) on latents sampled from the cached
    posterior; loads its EMA into ``vae`` when done. Its state (weights, EMA, optimiser, generator,
    step) lives in ``decoder.pt``, separate from ``state.pt``, so the phase is independent of the
    diffusion phase. Returns False when the time cap stopped it first (``decoder.pt`` saved)."""
    path = config.out_dir / "decoder.pt"
    params = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    names = [n for n, _ in vae.named_parameters() if n.startswith(("decoder.", "post_quant_conv."))]
    opt = adamw(params, config.decoder_lr)
    gen = torch.Generator().manual_seed(config.seed + 4)
    step, seconds = 0, 0.0
    ema = {n: p.detach().clone() for n, p in zip(names, params, strict=True)}
    if path.exists():
        saved = torch.load(path, weights_only=True, map_location="cpu")
        with torch.no_grad():
            for p, n in zip(params, names, strict=True):
                p.copy_(saved["weights"][n])
        ema = {n: v.to(params[0].device) for n, v in saved["ema"].items()}
        opt.load_state_dict(saved["opt"])
        gen.set_state(saved["generator"])
        step, seconds = saved["step"], saved["seconds"]

    def save() -> None:
        weights = {n: p.detach().clone() for n, p in zip(names, params, strict=True)}
        atomic_save(_on_cpu({"step": step, "seconds": seconds, "weights": weights, "ema": ema,
                             "opt": opt.state_dict(), "generator": gen.get_state()}), path)

    n = images.shape[0]
    last_save = time.perf_counter()
    vae.train()
    for p in vae.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    try:
        while step < config.decoder_steps:
            t0 = time.perf_counter()
            idx = torch.randint(0, n, (config.decoder_batch,), generator=gen)
            x = _to_unit(images[idx]).to(params[0].device)
            noise = torch.randn(lat_mean[idx].shape, generator=gen)
            z = (lat_mean[idx] + lat_std[idx] * noise).to(params[0].device)
            rec = vae.decode(z).sample
            l1, l2, edge = reconstruction_losses(rec, x)
            loss = l1 + l2 + config.edge_weight * edge
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, config.grad_clip)
            opt.step()
            step += 1
            with torch.no_grad():
                decay = min(config.decoder_ema, (1.0 + step) / (10.0 + step))
                for p, name in zip(params, names, strict=True):
                    ema[name].mul_(decay).add_(p, alpha=1.0 - decay)
            seconds += time.perf_counter() - t0
            if step % 25 == 0 or step == 1:
                log_fn(f"decoder {step}/{config.decoder_steps} l1 {l1.item():.4f} edge {edge.item():.4f} "
                       f"({time.perf_counter() - t0:.2f} s/step)")
            now = time.perf_counter()
            if now >= deadline:
                save()
                return False
            if now - last_save >= config.checkpoint_minutes * 60.0:
                save()
                last_save = now
        if config.decoder_steps:
            save()
    finally:
        for p in vae.parameters():
            p.requires_grad_(True)
        vae.eval()
    if step:
        with torch.no_grad():
            for p, name in zip(params, names, strict=True):
                p.copy_(ema[name])
    log_fn(f"decoder: {step} fine-tune steps ({seconds:.0f} s)")
    return True
