"""``voidprompt demo ...``: the demo study (no subcommand), the gallery and the training command.

``voidprompt demo [--out DIR] [--study FILE] [--threads N] [--workers N] [--batch-size N]`` runs the
demo study (``voidprompt/demo/pure-negative.toml``: the study brief's pure-negative-prompt study on the
miniature model, pre-labelled by its detector), resumably, then writes its report and prints where
it is (see :mod:`voidprompt.demo.study`). ``voidprompt demo gallery [--out DIR] [--model PATH]``
generates a small gallery on the miniature model. ``voidprompt demo train [--out DIR] [--resume]
[--minutes N] ...`` trains the miniature model (see :mod:`voidprompt.demo.train`); the model card
gives the options the shipped weights were trained with. ``voidprompt demo tune-decoder [--model
PATH] [--out DIR] [--steps N] ...`` continues a checkpoint's VAE decoder on fresh world pictures,
encoder frozen (see :mod:`voidprompt.demo.decoder_tune`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from voidprompt.errors import VoidpromptError
from voidprompt.helpformat import use_help_format

if TYPE_CHECKING:
    from voidprompt.demo.train import TrainConfig

__all__ = ["main"]


# TrainConfig fields `voidprompt demo train` sets, as --field-name flags, with a help text where the
# name is not enough. The flag's type follows the field: `int | None` fields also take "none".
_TRAIN_FLAGS: dict[str, str | None] = {
    "seed": None,
    "n_images": None,
    "image_size": "side of the world pictures the model learns from (a multiple of 8): its native size",
    "vae_steps": None,
    "vae_full_from": "share of --vae-steps after which the VAE trains on whole pictures instead of crops "
    "(1.0: crops only, cheaper at 128 px)",
    "diffusion_steps": None,
    "batch_size": None,
    "partial_captions_from": "diffusion step from which single tags are dropped from captions",
    "tag_keep_prob": None,
    "decoder_steps": "steps of the VAE-decoder fine-tune (encoder frozen) after the diffusion phase",
    "padding_blind_from": "diffusion step from which captions' EOS runs are sometimes replaced by the "
    "empty caption's",
    "padding_blind_prob": None,
    "foreign_tags_from": "diffusion step from which captions sometimes get tags of words the world "
    "never uses",
    "foreign_tag_prob": None,
    "upright_from": "diffusion step from which the UNet learns from the same scenes with upright shapes",
    "half_size_until": "diffusion steps before this one learn from the world at half the --image-size "
    "(cheaper; the VAE phase too); 'none': all at the native size",
    "lr": None,
    "ema_decay": "decay of the exported moving average of the text encoder and UNet weights",
    "min_snr_gamma": "cap of the Min-SNR loss weight; 'none': plain eps MSE, every timestep weighted alike",
    "lr_decay_from": "diffusion step from which the lr falls linearly to 0 at --diffusion-steps",
    "threads": "cores: 1 runs the phases one after another, 2 or more run the decoder phase in a second "
    "process beside the diffusion phase; each phase computes on one thread (same weights either way)",
    "device": "where the modules compute: cpu, cuda or cuda:N (same sample stream, not the same bits)",
    "checkpoint_minutes": None,
    "init_from": "start from this miniature checkpoint's weights (same widths and --image-size) instead "
    "of random ones; skips the VAE phase",
}


def _or_none(convert: Callable[[str], Any], error: str) -> Callable[[str], Any]:
    """An argparse type: 'none' (any case) gives None, anything else ``convert``; a bad value gets
    "'<value>' <error>"."""

    def parse(text: str) -> Any:
        if text.strip().lower() == "none":
            return None
        try:
            return convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} {error}") from None

    return parse


_step_or_none = _or_none(int, "is not a step: give a whole number or 'none'")
_number_or_none = _or_none(float, "is not a number: give one, or 'none'")
_text_or_none = _or_none(str, "")


def _train_parser() -> argparse.ArgumentParser:
    from voidprompt.demo.train import TrainConfig

    d = TrainConfig(out_dir=Path("."))
    annotations = {f.name: str(f.type) for f in fields(TrainConfig)}
    p = argparse.ArgumentParser(prog="voidprompt demo train", description="Train the miniature model.")
    p.add_argument("--out", type=Path, default=Path("outputs/miniature-train"), help="run directory")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument("--minutes", type=float, default=None, help="stop (and save) after this many minutes")
    for name, help_text in _TRAIN_FLAGS.items():
        default = getattr(d, name)
        optional = "None" in annotations[name]
        shown = f"default {default}" + ("; 'none': off" if optional else "")
        parse: Any = type(default)
        if optional:
            parse = {"float": _number_or_none, "int": _step_or_none, "str": _text_or_none}[
                next(t for t in ("float", "int", "str") if t in annotations[name])
            ]
        p.add_argument(
            "--" + name.replace("_", "-"),
            type=parse,
            default=default,
            help=f"{help_text} ({shown})" if help_text else shown,
        )
    return p


def train_config(argv: list[str]) -> tuple[TrainConfig, bool]:
    """The TrainConfig and the --resume flag of a `voidprompt demo train` command line."""
    from voidprompt.demo.train import TrainConfig

    args = use_help_format(_train_parser()).parse_args(argv)
    settings = {name: getattr(args, name) for name in _TRAIN_FLAGS}
    return TrainConfig(out_dir=args.out, minutes=args.minutes, **settings), args.resume


def _train(argv: list[str]) -> int:
    from voidprompt.demo.train import train

    config, resume = train_config(argv)
    path = train(config, resume=resume, log_fn=lambda s: print(s, flush=True))
    print(f"model: {path}")
    return 0


def tune_decoder_config(argv: list[str]) -> tuple[Any, bool]:
    """The DecoderTuneConfig and the --resume flag of a `voidprompt demo tune-decoder` command line."""
    from voidprompt.demo.decoder_tune import DecoderTuneConfig
    from voidprompt.demo.miniature import miniature_model_path

    d = DecoderTuneConfig(model=Path("."), out_dir=Path("."))
    p = argparse.ArgumentParser(
        prog="voidprompt demo tune-decoder",
        description="Continue a checkpoint's VAE decoder on fresh world pictures (encoder, UNet and text "
        "encoder untouched); writes DIR/model.safetensors.",
    )
    p.add_argument(
        "--model", type=Path, default=None, help="checkpoint to fine-tune (default: the miniature model)"
    )
    p.add_argument("--out", type=Path, default=Path("outputs/decoder-tune"), help="run directory")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument("--minutes", type=float, default=None, help="stop (and save) after this many minutes")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--ema", type=float, default=d.ema)
    p.add_argument("--edge-weight", type=float, default=d.edge_weight)
    p.add_argument("--world-seed", type=int, default=d.world_seed, help="seed of the fresh pictures' world")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--adversarial-weight", type=_number_or_none, default=d.adversarial_weight,
                   help="weight of the PatchGAN term (default none: pixel losses only)")
    p.add_argument("--adversarial-from", type=int, default=d.adversarial_from)
    p.add_argument("--checkpoint-minutes", type=float, default=d.checkpoint_minutes)
    args = use_help_format(p).parse_args(argv)
    config = DecoderTuneConfig(
        model=args.model or miniature_model_path(), out_dir=args.out, steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, ema=args.ema, edge_weight=args.edge_weight,
        world_seed=args.world_seed, seed=args.seed, adversarial_weight=args.adversarial_weight,
        adversarial_from=args.adversarial_from, checkpoint_minutes=args.checkpoint_minutes,
        minutes=args.minutes,
    )
    return config, args.resume


def _tune_decoder(argv: list[str]) -> int:
    from voidprompt.demo.decoder_tune import tune_decoder

    config, resume = tune_decoder_config(argv)
    path = tune_decoder(config, resume=resume, log_fn=lambda s: print(s, flush=True))
    print(f"model: {path}")
    return 0


def _gallery(argv: list[str]) -> int:
    from voidprompt.demo.generate import write_gallery

    p = argparse.ArgumentParser(
        prog="voidprompt demo gallery", description="A gallery from the miniature model."
    )
    p.add_argument("--out", type=Path, default=Path("outputs/demo"), help="output directory")
    p.add_argument("--model", type=Path, default=None, help="checkpoint (default: the miniature model)")
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    args = use_help_format(p).parse_args(argv)
    index = write_gallery(args.out, model=args.model, seed=args.seed, threads=args.threads)
    print(f"wrote the gallery to {index.parent} (open {index})")
    return 0


def _study(argv: list[str]) -> int:
    from voidprompt.demo.study import DEFAULT_OUT, run_demo
    from voidprompt.lab.schema import workers_arg
    from voidprompt.models.placement import PRECISIONS

    p = argparse.ArgumentParser(
        prog="voidprompt demo",
        description="Run the demo study (resumable) and write its report. Subcommands: gallery, train, "
        "tune-decoder.",
    )
    p.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="catalog, images and report (default %(default)s)"
    )
    p.add_argument(
        "--study",
        type=Path,
        default=None,
        help="study file (default: the shipped demo study, voidprompt/demo/pure-negative.toml)",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: the study's [run] threads)"
    )
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: the study's, else cpu)")
    p.add_argument(
        "--precision", choices=PRECISIONS, default=None, help="default: the study's, else auto (A1111's)"
    )
    p.add_argument(
        "--workers",
        type=workers_arg,
        default=None,
        help="worker processes, a number or auto: one per core (default: the study's [run] workers)",
    )
    p.add_argument(
        "--batch-size", type=int, default=None, help="images per sampler run (default: the study's)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = use_help_format(p).parse_args(argv)
    result = run_demo(
        args.study,
        args.out,
        batch_size=args.batch_size,
        threads=args.threads,
        workers=args.workers,
        device=args.device,
        precision=args.precision,
        progress=not args.no_progress,
    )
    print(result.format())
    return 0


def main(argv: list[str]) -> int:
    """Entry point for ``voidprompt demo``; returns the exit status."""
    try:
        if argv and argv[0] == "train":
            return _train(argv[1:])
        if argv and argv[0] == "gallery":
            return _gallery(argv[1:])
        if argv and argv[0] == "tune-decoder":
            return _tune_decoder(argv[1:])
        return _study(argv)
    except VoidpromptError as exc:
        print(f"voidprompt demo: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
