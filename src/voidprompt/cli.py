"""The ``voidprompt`` command: argument parsing and printing only.

Generation goes through ``Engine``; subsystems with commands of their own (demo, study, merge,
lora, serve) own their argument parsing in their ``cli`` modules and are dispatched to here.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tqdm import tqdm

from voidprompt import __version__
from voidprompt.errors import NansError, VoidpromptError
from voidprompt.imagemeta import open_image_safely, save_numbered
from voidprompt.request import GenerationRequest

# Subcommands implemented by their subsystem: name -> "module:function" taking argv, returning an exit code.
DELEGATED: dict[str, str] = {
    "demo": "voidprompt.demo.cli:main",
    "study": "voidprompt.lab.cli:main",
    "merge": "voidprompt.models.networks_cli:main",
    "lora": "voidprompt.models.networks_cli:main",
    "serve": "voidprompt.server.cli:main",
}
# Delegated commands that want their own name as argv[0].
KEEP_NAME = {"merge", "lora"}


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint (.safetensors/.ckpt); default: the miniature model")
    p.add_argument("--vae", help="external VAE file (default: <model>.vae.pt etc. next to the model)")
    p.add_argument("--prompt", default="")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--style", action="append", default=[], help="style name from --styles-file (repeatable)")
    p.add_argument("--styles-file", help="A1111 styles.csv")
    p.add_argument("--embeddings-dir", help="folder of textual-inversion embeddings")
    p.add_argument("--lora-dir", help="folder searched for <lora:name:...> tags")
    p.add_argument("--hypernet-dir", help="folder searched for <hypernet:name:...> tags")
    p.add_argument("--seed", type=int, default=-1)
    p.add_argument("--subseed", type=int, default=-1)
    p.add_argument("--subseed-strength", type=float, default=0.0)
    p.add_argument("--sampler", default="Euler a", help="sampler name, e.g. 'Euler a', 'DPM++ 2M Karras'")
    p.add_argument("--scheduler", default="Automatic")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg-scale", type=float, default=7.0)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--n-iter", type=int, default=1)
    p.add_argument("--clip-skip", type=int, default=1)
    p.add_argument("--eta", type=float, default=None)
    p.add_argument("--ensd", type=int, default=0, help="eta noise seed delta (NovelAI used 31337)")
    p.add_argument(
        "--rng",
        default=None,
        choices=["CPU", "GPU", "NV"],
        help="noise source (default: GPU on a CUDA device, as A1111; CPU elsewhere)",
    )
    p.add_argument("--emphasis", default="Original", choices=["Original", "No norm", "Ignore", "None"])
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default cpu)")
    p.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "fp16", "bf16"],
        help="auto: fp16 under autocast on CUDA (A1111's), fp32 elsewhere; bf16 only when asked",
    )
    p.add_argument("--compile", action="store_true", help="run the UNet through torch.compile")
    p.add_argument(
        "--disable-nan-check",
        action="store_true",
        help="keep NaN output (a black picture) instead of failing, as A1111's flag; the VAE's fp32 "
        "fallback is off with it",
    )
    p.add_argument("--out", default="outputs/txt2img", help="output folder (files are never overwritten)")


def _placement(args: argparse.Namespace) -> tuple[Any, Any]:
    """The device and precision policy the flags name, refused (DeviceError) before anything runs."""
    from voidprompt.models.placement import resolve_device, resolve_precision

    device = resolve_device(args.device)
    return device, resolve_precision(args.precision, device)


def _request_fields(args: argparse.Namespace, device: Any) -> dict[str, Any]:
    from voidprompt.models.placement import default_randn_source

    return {
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "styles": tuple(args.style),
        "seed": args.seed,
        "subseed": args.subseed,
        "subseed_strength": args.subseed_strength,
        "sampler_name": args.sampler,
        "scheduler": args.scheduler,
        "steps": args.steps,
        "cfg_scale": args.cfg_scale,
        "width": args.width,
        "height": args.height,
        "batch_size": args.batch_size,
        "n_iter": args.n_iter,
        "clip_skip": args.clip_skip,
        "eta": args.eta,
        "eta_noise_seed_delta": args.ensd,
        "randn_source": args.rng or default_randn_source(device),
        "emphasis": args.emphasis,
    }


def _engine(args: argparse.Namespace, device: Any, precision: Any) -> Any:
    from voidprompt.demo.miniature import miniature_model_path
    from voidprompt.models.load import load_model
    from voidprompt.pipeline.engine import Engine
    from voidprompt.prompts.embeddings import EmbeddingDatabase
    from voidprompt.prompts.styles import StyleDatabase

    model = Path(args.model) if args.model else miniature_model_path()
    components = load_model(model, vae_path=args.vae, device=device, precision=precision)
    style_db = StyleDatabase.from_csv(args.styles_file) if args.styles_file else None
    engine = Engine(
        components,
        style_db=style_db,
        lora_dir=args.lora_dir,
        hypernet_dir=args.hypernet_dir,
        compile=args.compile,
        disable_nan_check=args.disable_nan_check,
    )
    if args.embeddings_dir:

        def database_for(width: int, sdxl_part: str | None) -> EmbeddingDatabase:
            database = EmbeddingDatabase(components.tokenizer, width=width, sdxl_part=sdxl_part)
            database.load_folder(args.embeddings_dir)
            return database

        engine.give_embeddings(database_for)
    return engine


def _generate_and_save(
    args: argparse.Namespace, request: GenerationRequest, device: Any, precision: Any
) -> int:
    from voidprompt.pipeline.engine import GenerationHooks

    engine = _engine(args, device, precision)
    bar = tqdm(total=request.steps * request.n_iter, unit="step", disable=None)

    def on_progress(p: Any) -> None:
        bar.update(1)

    try:
        result = engine.generate(request, GenerationHooks(progress=on_progress))
    finally:
        bar.close()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for image, infotext, seed in zip(result.images, result.infotexts, result.seeds, strict=True):
        path = save_numbered(image, out, str(seed), infotext)
        print(path)
    return 0


def cmd_txt2img(args: argparse.Namespace) -> int:
    device, precision = _placement(args)
    request = GenerationRequest(**_request_fields(args, device))
    request.validate()  # fail on bad sizes before loading a model
    return _generate_and_save(args, request, device, precision)


def cmd_img2img(args: argparse.Namespace) -> int:
    device, precision = _placement(args)
    fields = _request_fields(args, device)
    init = open_image_safely(args.init_image).convert("RGB")
    fields.update(
        init_images=(init,),
        denoising_strength=args.denoising_strength,
        resize_mode=args.resize_mode,
        initial_noise_multiplier=args.noise_multiplier,
    )
    if args.mask:
        fields.update(
            mask=open_image_safely(args.mask).convert("L"),
            mask_blur_x=args.mask_blur,
            mask_blur_y=args.mask_blur,
            inpainting_fill=args.inpainting_fill,
            inpaint_full_res=args.inpaint_full_res,
            inpaint_full_res_padding=args.inpaint_padding,
            inpainting_mask_invert=args.invert_mask,
        )
    request = GenerationRequest(**fields)
    request.validate()
    return _generate_and_save(args, request, device, precision)


def cmd_info(args: argparse.Namespace) -> int:
    from voidprompt.models.info import describe_checkpoint

    print(describe_checkpoint(args.file).format())
    return 0


def cmd_tokens(args: argparse.Namespace) -> int:
    from voidprompt.models.tokenizer import load_clip_tokenizer
    from voidprompt.prompts.chunks import token_report
    from voidprompt.prompts.embeddings import EmbeddingDatabase

    tokenizer = load_clip_tokenizer()
    embeddings = None
    if args.embeddings_dir:
        embeddings = EmbeddingDatabase(tokenizer, width=args.embedding_width)
        embeddings.load_folder(args.embeddings_dir)
    print(
        token_report(
            args.prompt,
            tokenizer,
            embeddings,
            emphasis=args.emphasis,
            comma_padding_backtrack=args.comma_backtrack,
        )
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="voidprompt", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument("--version", action="version", version=f"voidprompt {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("txt2img", help="generate images from a prompt")
    _add_generation_args(p)
    p.set_defaults(func=cmd_txt2img)

    p = sub.add_parser("img2img", help="generate from an init image (with --mask: inpaint)")
    _add_generation_args(p)
    p.set_defaults(out="outputs/img2img")
    p.add_argument("--init-image", required=True)
    p.add_argument("--denoising-strength", type=float, default=0.75)
    p.add_argument("--resize-mode", type=int, default=0, choices=[0, 1, 2, 3])
    p.add_argument("--noise-multiplier", type=float, default=1.0)
    p.add_argument("--mask", help="inpainting mask: white = repaint")
    p.add_argument("--mask-blur", type=int, default=4)
    p.add_argument(
        "--inpainting-fill",
        type=int,
        default=1,
        choices=[0, 1, 2, 3],
        help="0 fill, 1 original, 2 latent noise, 3 latent nothing",
    )
    p.add_argument("--inpaint-full-res", action="store_true", help="inpaint only the masked area")
    p.add_argument("--inpaint-padding", type=int, default=32)
    p.add_argument("--invert-mask", action="store_true")
    p.set_defaults(func=cmd_img2img)

    p = sub.add_parser("info", help="describe a checkpoint: family, dtypes, parameters, hashes")
    p.add_argument("file")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("tokens", help="show how a prompt is chunked and weighted")
    p.add_argument("prompt")
    p.add_argument("--emphasis", default="Original", choices=["Original", "No norm", "Ignore", "None"])
    p.add_argument("--comma-backtrack", type=int, default=20)
    p.add_argument("--embeddings-dir")
    p.add_argument("--embedding-width", type=int, default=768)
    p.set_defaults(func=cmd_tokens)

    for name, help_text in (
        ("demo", "the miniature model: the demo study (no arguments), `demo gallery`, `demo train`"),
        ("study", "studies: check, run, ls, show, report"),
        ("merge", "merge checkpoints"),
        ("lora", "LoRA tools (extract)"),
        ("serve", "A1111-compatible HTTP API and web UI"),
    ):
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _delegate(name: str, argv: Sequence[str]) -> int:
    module_name, func_name = DELEGATED[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise VoidpromptError(f"`voidprompt {name}` is not available in this build") from exc
        raise
    func: Callable[[list[str]], int] = getattr(module, func_name)
    return func(([name] if name in KEEP_NAME else []) + list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.INFO if "-v" in args_list or "--verbose" in args_list else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        if args_list and args_list[0] in DELEGATED:
            return _delegate(args_list[0], args_list[1:])
        parser = build_parser()
        args = parser.parse_args(args_list)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        return int(args.func(args))
    except VoidpromptError as exc:
        print(f"voidprompt: error: {exc}", file=sys.stderr)
        # A generation the model broke (nothing saved) exits 2, as `study`, `demo` and `serve` do on errors.
        return 2 if isinstance(exc, NansError) else 1
    except KeyboardInterrupt:
        print("voidprompt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
