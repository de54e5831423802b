"""``voidprompt demo ...``: the demo study (no subcommand), the gallery and the training command.

``voidprompt demo [--out DIR] [--study FILE] [--threads N] [--batch-size N]`` runs the demo study
(``studies/pure-negative.toml``: the seed's pure-negative-prompt study on the miniature model, pre-labelled
by its detector), resumably, then writes its report and prints where it is (see
:mod:`voidprompt.lab.demo`). ``voidprompt demo gallery [--out DIR] [--model PATH]`` generates a small
gallery on the miniature model. ``voidprompt demo train [--out DIR] [--resume] [--minutes N] ...``
trains the miniature model (see :mod:`voidprompt.demo.train`); the defaults reproduce the committed
weights.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from voidprompt.errors import VoidpromptError

__all__ = ["main"]


def _train_parser() -> argparse.ArgumentParser:
    from voidprompt.demo.train import TrainConfig

    d = TrainConfig(out_dir=Path("."))
    p = argparse.ArgumentParser(prog="voidprompt demo train", description="Train the miniature model.")
    p.add_argument("--out", type=Path, default=Path("outputs/miniature-train"), help="run directory")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    p.add_argument("--minutes", type=float, default=None, help="stop (and save) after this many minutes")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--n-images", type=int, default=d.n_images)
    p.add_argument("--vae-steps", type=int, default=d.vae_steps)
    p.add_argument("--diffusion-steps", type=int, default=d.diffusion_steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument(
        "--partial-captions-from",
        type=int,
        default=d.partial_captions_from,
        help="diffusion step from which single tags are dropped from captions",
    )
    p.add_argument("--tag-keep-prob", type=float, default=d.tag_keep_prob)
    p.add_argument(
        "--decoder-steps",
        type=int,
        default=d.decoder_steps,
        help="steps of the VAE-decoder fine-tune (encoder frozen) after the diffusion phase",
    )
    p.add_argument(
        "--padding-blind-from",
        type=int,
        default=d.padding_blind_from,
        help="diffusion step from which captions' EOS runs are sometimes replaced by the empty caption's",
    )
    p.add_argument("--padding-blind-prob", type=float, default=d.padding_blind_prob)
    p.add_argument(
        "--foreign-tags-from",
        type=int,
        default=d.foreign_tags_from,
        help="diffusion step from which captions sometimes get tags of words the world never uses",
    )
    p.add_argument("--foreign-tag-prob", type=float, default=d.foreign_tag_prob)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument(
        "--lr-decay-from",
        type=int,
        default=d.lr_decay_from,
        help="diffusion step from which the lr falls linearly to 0 at --diffusion-steps (default: constant)",
    )
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--checkpoint-minutes", type=float, default=d.checkpoint_minutes)
    return p


def _train(argv: list[str]) -> int:
    from voidprompt.demo.train import TrainConfig, train

    args = _train_parser().parse_args(argv)
    config = TrainConfig(
        out_dir=args.out,
        seed=args.seed,
        n_images=args.n_images,
        vae_steps=args.vae_steps,
        diffusion_steps=args.diffusion_steps,
        batch_size=args.batch_size,
        partial_captions_from=args.partial_captions_from,
        tag_keep_prob=args.tag_keep_prob,
        decoder_steps=args.decoder_steps,
        padding_blind_from=args.padding_blind_from,
        padding_blind_prob=args.padding_blind_prob,
        foreign_tags_from=args.foreign_tags_from,
        foreign_tag_prob=args.foreign_tag_prob,
        lr=args.lr,
        lr_decay_from=args.lr_decay_from,
        threads=args.threads,
        checkpoint_minutes=args.checkpoint_minutes,
        minutes=args.minutes,
    )
    path = train(config, resume=args.resume, log_fn=lambda s: print(s, flush=True))
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
    args = p.parse_args(argv)
    index = write_gallery(args.out, model=args.model, seed=args.seed, threads=args.threads)
    print(f"wrote the gallery to {index.parent} (open {index})")
    return 0


def _study(argv: list[str]) -> int:
    from voidprompt.lab.demo import DEFAULT_OUT, run_demo

    p = argparse.ArgumentParser(
        prog="voidprompt demo",
        description="Run the demo study (resumable) and write its report. Subcommands: gallery, train.",
    )
    p.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="catalog, images and report (default %(default)s)"
    )
    p.add_argument(
        "--study", type=Path, default=None, help="study file (default: studies/pure-negative.toml)"
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: the study's [run] threads)"
    )
    p.add_argument(
        "--batch-size", type=int, default=None, help="images per sampler run (default: the study's)"
    )
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    result = run_demo(
        args.study, args.out, batch_size=args.batch_size, threads=args.threads, progress=not args.no_progress
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
        return _study(argv)
    except VoidpromptError as exc:
        print(f"voidprompt demo: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
