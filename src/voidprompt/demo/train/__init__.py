"""Train the miniature model: a narrow SD1.x (CLIP text encoder, cross-attention UNet, KL VAE f=8).

One command, ``voidprompt demo train``, runs four phases and can stop and resume at any point:
``vae`` (the autoencoder), ``latents`` (every picture encoded once, the latent scaling factor),
``diffusion`` (text encoder and UNet; :mod:`.phases`) and ``decoder`` (the VAE decoder fine-tuned on
the cached latents, possibly beside the diffusion phase; :mod:`.decoder`).

The package, by role:

- :mod:`.config`: ``TrainConfig``, every setting of a run and its validation;
- :mod:`.modules`: the architecture, fresh weights, the optimiser, the EMA, the losses;
- :mod:`.captions`: caption token ids and the Clip-skip-2 context the UNet learns from;
- :mod:`.data`: the world's pictures and the encoder's posterior of them, cached in ``out_dir``;
- :mod:`.checkpoint`: the exported model file, the state files, ``--init-from``;
- :mod:`.state`: the run in progress (modules, optimisers, EMA, phase, clock);
- :mod:`.phases` and :mod:`.decoder`: one function per phase;
- :mod:`.runner`: ``train``, the phases in order.
"""

from voidprompt.demo.train.captions import CaptionBatcher, blind_padding, encode_tokens, text_condition
from voidprompt.demo.train.checkpoint import atomic_save, export_model, save_safetensors
from voidprompt.demo.train.config import TrainConfig, TrainError
from voidprompt.demo.train.modules import (
    FINAL_LN_BIAS_MEAN,
    MINIATURE_ARCH,
    MINIATURE_CONSTANTS,
    adamw,
    fresh_modules,
    reconstruction_losses,
)
from voidprompt.demo.train.runner import train

__all__ = [
    "FINAL_LN_BIAS_MEAN",
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
    "fresh_modules",
    "reconstruction_losses",
    "save_safetensors",
    "text_condition",
    "train",
]
