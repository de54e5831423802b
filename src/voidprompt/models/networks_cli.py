"""``voidprompt merge ...`` and ``voidprompt lora extract ...`` (dispatched here by ``voidprompt.cli``).

voidprompt merge --a A --b B [--c C] --method weighted_sum|add_difference|no_interpolation|block_weighted
                 [--multiplier M] [--weights "25 values" | --preset NAME] [--base-alpha X]
                 [--fp16] [--bake-vae FILE] [--discard REGEX] [--allow-missing] [--strict]
                 --out FILE.safetensors
voidprompt lora extract A B --rank R [--conv-rank R] [--min-diff D] [--clamp-quantile Q] [--fp16] --out FILE

Both write their output through a temporary file that becomes the output only when complete. An
error, Ctrl-C or SIGTERM removes it (SIGTERM is turned into a normal exit so that the cleanup runs);
a ``kill -9`` cannot, and the next merge or extraction into that folder sweeps it away. A full disk
is one line naming the file, not a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType

import torch

from voidprompt.errors import VoidpromptError
from voidprompt.helpformat import use_help_format
from voidprompt.models.merge import (
    BLOCK_PRESETS,
    MergeMethod,
    MergeOptions,
    merge_checkpoints,
    parse_block_weights,
)
from voidprompt.models.networks.extract import extract_lora

__all__ = ["main"]


def _merge_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="voidprompt merge",
        description="Merge checkpoints (A1111 checkpoint merger "
        "and block-weighted merge); writes .safetensors, streamed key by key.",
    )
    p.add_argument("--a", required=True, help="primary model A")
    p.add_argument("--b", help="secondary model B")
    p.add_argument("--c", help="tertiary model C (add_difference)")
    p.add_argument(
        "--method",
        default="weighted_sum",
        choices=["weighted_sum", "add_difference", "no_interpolation", "block_weighted"],
        help="weighted_sum: (1-M)A + MB; add_difference: A + M(B-C); no_interpolation: A alone (to bake a "
        "VAE, discard keys or save fp16); block_weighted: M per UNet block (--weights or --preset)",
    )
    p.add_argument("--multiplier", "-M", type=float, default=0.5, help="M (default 0.5)")
    p.add_argument("--weights", help="block_weighted: 25 comma-separated weights IN00..IN11,M00,OUT00..OUT11")
    p.add_argument("--preset", help="block_weighted: a preset name (GRAD_V, GRAD_A, FLAT_25, WRAP08, ...)")
    p.add_argument(
        "--base-alpha",
        type=float,
        default=0.0,
        help="block_weighted: alpha of the text encoder and VAE (0 = all A)",
    )
    p.add_argument("--fp16", action="store_true", help="write float32 model tensors as float16")
    p.add_argument("--bake-vae", help="VAE file whose weights replace the merged model's VAE")
    p.add_argument("--discard", help="regex: drop keys it matches from the output")
    p.add_argument(
        "--allow-missing",
        action="store_true",
        help="keep A's value for model keys missing from B/C (A1111's silent behaviour)",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="refuse inputs holding NaN or inf weights (by default the merge warns and names them)",
    )
    p.add_argument("--out", required=True, help="output .safetensors file")
    return use_help_format(p)


_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


@contextlib.contextmanager
def _disk_full_is_an_error(out: str) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        if exc.errno not in _DISK_FULL:
            raise
        raise VoidpromptError(
            f"disk full writing {out}; nothing was written. Free space and run again."
        ) from exc


def _merge(argv: list[str]) -> int:
    args = _merge_parser().parse_args(argv)
    method = MergeMethod(args.method)
    weights = None
    if method is MergeMethod.BLOCK_WEIGHTED:
        if bool(args.weights) == bool(args.preset):
            print(
                "error: block_weighted needs exactly one of --weights and --preset "
                f"(presets: {', '.join(BLOCK_PRESETS)})",
                file=sys.stderr,
            )
            return 2
        weights = parse_block_weights(args.weights or args.preset)
    elif args.weights or args.preset:
        print("error: --weights/--preset apply to --method block_weighted only", file=sys.stderr)
        return 2
    options = MergeOptions(
        method=method,
        multiplier=args.multiplier,
        block_weights=weights,
        base_alpha=args.base_alpha,
        fp16=args.fp16,
        discard=args.discard,
        allow_missing=args.allow_missing,
        strict=args.strict,
    )
    with _disk_full_is_an_error(args.out):
        result = merge_checkpoints(
            args.a, args.b, args.c, out=args.out, options=options, bake_vae=args.bake_vae
        )
    print(
        f"wrote {result.path}: {result.keys_written} tensors, {result.merged_keys} merged "
        f"({options.method.a1111_label}, M={options.multiplier})"
    )
    for note in result.notes:
        print(f"note: {note}")
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def _lora(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="voidprompt lora", description="LoRA tools")
    sub = p.add_subparsers(dest="command", required=True)
    ex = sub.add_parser(
        "extract", help="extract a LoRA from the difference B - A (kohya's extract_lora_from_models)"
    )
    ex.add_argument("a", help="original model A")
    ex.add_argument("b", help="tuned model B")
    ex.add_argument("--rank", type=int, required=True, help="LoRA rank (alpha = rank)")
    ex.add_argument("--conv-rank", type=int, help="also extract 3x3 convs (ResNet blocks) at this rank")
    ex.add_argument(
        "--min-diff",
        type=float,
        default=0.01,
        help="leave the text encoder out when its largest difference is below this (kohya: 0.01)",
    )
    ex.add_argument("--clamp-quantile", type=float, help="clamp factors to this quantile (kohya uses 0.99)")
    ex.add_argument("--fp16", action="store_true", help="save the LoRA in float16")
    ex.add_argument("--out", required=True, help="output .safetensors file")
    args = use_help_format(p).parse_args(argv)
    with _disk_full_is_an_error(args.out):
        result = extract_lora(
            args.a,
            args.b,
            args.out,
            rank=args.rank,
            conv_rank=args.conv_rank,
            min_diff=args.min_diff,
            clamp_quantile=args.clamp_quantile,
            dtype=torch.float16 if args.fp16 else torch.float32,
        )
    te = "included" if result.text_encoder_included else "unchanged, left out"
    print(
        f"wrote {result.path}: {result.layers} layers (text encoder {te}), "
        f"worst relative error {result.max_rel_error:.3g}"
    )
    return 0


def _exit_on_sigterm(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("merge", "lora"):
        print("usage: voidprompt merge ... | voidprompt lora extract ...", file=sys.stderr)
        return 2
    # Only the main thread may set handlers (a caller running main() in a thread keeps its own).
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if main_thread else None
    try:
        return _merge(argv[1:]) if argv[0] == "merge" else _lora(argv[1:])
    except VoidpromptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
