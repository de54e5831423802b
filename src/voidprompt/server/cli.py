"""``voidprompt serve``: the A1111-compatible API and the web UI on one uvicorn server."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from voidprompt.errors import VoidpromptError
from voidprompt.server.auth import parse_credentials
from voidprompt.server.limits import Limits

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="voidprompt serve", description="A1111-compatible HTTP API (/sdapi/v1) and web UI."
    )
    p.add_argument("--host", default=None, help="address to bind (default 127.0.0.1; --listen means 0.0.0.0)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--listen", action="store_true", help="bind 0.0.0.0 (needs --api-auth unless --insecure)")
    p.add_argument("--api-auth", help="HTTP Basic credentials user:pass[,user2:pass2]")
    p.add_argument(
        "--api-auth-file", type=Path, help="a file holding the --api-auth text (keeps it out of ps)"
    )
    p.add_argument("--insecure", action="store_true", help="allow listening beyond localhost without auth")
    p.add_argument("--cors-allow-origins", help="comma-separated origins allowed by CORS (default: CORS off)")
    p.add_argument("--cors-allow-origins-regex", help="a regex of allowed origins")
    p.add_argument(
        "--ckpt-dir",
        type=Path,
        action="append",
        help="checkpoint folder (repeatable; default models/Stable-diffusion)",
    )
    p.add_argument(
        "--vae-dir", type=Path, action="append", help="VAE folder (repeatable; default models/VAE)"
    )
    p.add_argument(
        "--styles-file",
        type=Path,
        action="append",
        help="A1111 styles csv (name,prompt,negative_prompt; repeatable; default ./styles.csv when present)",
    )
    p.add_argument(
        "--lora-dir", type=Path, default=Path("models/Lora"), help="LoRA folder (default models/Lora)"
    )
    p.add_argument(
        "--embeddings-dir",
        type=Path,
        default=Path("embeddings"),
        help="textual-inversion embeddings folder (default embeddings)",
    )
    p.add_argument(
        "--hypernetwork-dir",
        type=Path,
        default=Path("models/hypernetworks"),
        help="hypernetwork folder (default models/hypernetworks)",
    )
    p.add_argument(
        "--deepdanbooru-dir",
        type=Path,
        default=Path("models/torch_deepdanbooru"),
        help="folder of A1111's DeepDanbooru model-resnet_custom_v3.pt (default models/torch_deepdanbooru)",
    )
    p.add_argument(
        "--wd14-dir",
        type=Path,
        default=Path("models/wd14"),
        help="folder of WD14 taggers, one subfolder each with model.onnx and selected_tags.csv "
        "(default models/wd14)",
    )
    p.add_argument(
        "--upscaler-dir",
        type=Path,
        default=Path("models"),
        help="A1111's models folder for upscalers: ESRGAN files in its ESRGAN/, Real-ESRGAN files in its "
        "RealESRGAN/ (default models)",
    )
    p.add_argument(
        "--model", help="checkpoint to use first (title, file name or hash); default the miniature model"
    )
    p.add_argument("--no-miniature", action="store_true", help="do not offer the shipped miniature model")
    p.add_argument(
        "--studies-dir", type=Path, help="folder of study files and catalogs for /voidprompt/v1/studies"
    )
    p.add_argument(
        "--outdir",
        type=Path,
        help="where save_images=true writes images, in OUTDIR/txt2img-images/DATE/ and img2img-images "
        "(default outputs, as A1111)",
    )
    p.add_argument(
        "--device",
        help="cpu, cuda, cuda:N or mps (default cpu); study runs started from the web UI use it too "
        "(without it, each study's [run] device)",
    )
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "fp16", "bf16"],
        help="auto (default): fp16 under autocast on CUDA (A1111's), fp32 elsewhere; bf16 only when "
        "asked; study runs started from the web UI use it too (without it, each study's [run] precision)",
    )
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument(
        "--disable-nan-check",
        action="store_true",
        help="keep NaN output (a black picture) instead of failing, as A1111's flag; the VAE's fp32 "
        "fallback is off with it",
    )
    p.add_argument(
        "--explain-cache",
        type=int,
        default=32,
        help="explanations of generations kept in memory, the most recent (default 32, about 4.5 MB "
        "each at 512x512; 0: none)",
    )
    p.add_argument("--nowebui", action="store_true", help="API only, no web UI")
    p.add_argument("--max-pixels", type=int, help="max width*height per image")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--max-batch-size", type=int)
    p.add_argument("--max-body-bytes", type=int)
    p.add_argument("--max-queued", type=int, help="jobs allowed to wait (more get HTTP 503)")
    p.add_argument(
        "--max-connections", type=int, help="open connections at once (more are answered 503; default 256)"
    )
    p.add_argument(
        "--header-timeout",
        type=float,
        help="seconds a client has to send a request's head; slower ones are disconnected (default 10)",
    )
    p.add_argument("--log-level", default="info")
    return p


def build_config(args: argparse.Namespace) -> object:
    from voidprompt.models.placement import resolve_device, resolve_precision
    from voidprompt.server.checkpoints import DEFAULT_CKPT_DIR
    from voidprompt.server.state import DEFAULT_OUTDIR, DEFAULT_STYLES_FILE, ServerConfig

    # Refused here, before anything is read or bound: a device or precision this machine lacks.
    resolve_precision(args.precision or "auto", resolve_device(args.device or "cpu"))
    host = args.host or ("0.0.0.0" if args.listen else "127.0.0.1")
    auth_text = args.api_auth
    if args.api_auth_file is not None:
        auth_text = args.api_auth_file.read_text(encoding="utf-8").strip()
    credentials = parse_credentials(auth_text) if auth_text else {}
    if host not in LOCAL_HOSTS and not credentials and not args.insecure:
        raise VoidpromptError(
            f"--host {host} opens the server beyond this machine; give --api-auth user:password, "
            "or --insecure if the network is trusted"
        )
    extra: list[Path] = []
    if not args.no_miniature:
        try:
            from voidprompt.demo.miniature import miniature_model_path

            extra.append(miniature_model_path())
        except VoidpromptError:
            pass  # not built yet: the server runs with the checkpoint folders alone
    limits = Limits()
    changes = {
        "max_pixels": args.max_pixels,
        "max_steps": args.max_steps,
        "max_batch_size": args.max_batch_size,
        "max_body_bytes": args.max_body_bytes,
        "max_queued": args.max_queued,
        "max_connections": args.max_connections,
        "header_timeout": args.header_timeout,
    }
    if args.explain_cache < 0:
        raise VoidpromptError(f"--explain-cache {args.explain_cache}: give 0 (keep none) or more")
    positive = {"--max-connections": args.max_connections, "--header-timeout": args.header_timeout}
    for flag, value in positive.items():
        if value is not None and not value > 0:
            raise VoidpromptError(f"{flag} {value}: give a positive number")
    limits = replace(limits, **{k: v for k, v in changes.items() if v is not None})
    origins = [o.strip() for o in (args.cors_allow_origins or "").split(",") if o.strip()]
    default_model = args.model
    if default_model is None and extra:
        default_model = extra[0].name
    return ServerConfig(
        host=host,
        port=args.port,
        ckpt_dirs=args.ckpt_dir or [DEFAULT_CKPT_DIR],
        extra_checkpoints=extra,
        vae_dirs=args.vae_dir or [Path("models/VAE")],
        lora_dir=args.lora_dir,
        embeddings_dir=args.embeddings_dir,
        hypernetwork_dir=args.hypernetwork_dir,
        deepdanbooru_dir=args.deepdanbooru_dir,
        wd14_dir=args.wd14_dir,
        upscaler_dir=args.upscaler_dir,
        styles_files=args.styles_file or [DEFAULT_STYLES_FILE],
        default_model=default_model,
        studies_dir=args.studies_dir,
        outdir=args.outdir or DEFAULT_OUTDIR,
        credentials=credentials,
        cors_allow_origins=origins,
        cors_allow_origin_regex=args.cors_allow_origins_regex,
        limits=limits,
        device=args.device or "cpu",
        precision=args.precision or "auto",
        study_run_args=_study_run_args(args),
        threads=args.threads,
        disable_nan_check=args.disable_nan_check,
        explain_cache=args.explain_cache,
        ui=not args.nowebui,
    )


def _study_run_args(args: argparse.Namespace) -> tuple[str, ...]:
    """What the server passes on to the study runs it starts: the placement it was given explicitly."""
    out: list[str] = []
    if args.device is not None:
        out += ["--device", args.device]
    if args.precision is not None:
        out += ["--precision", args.precision]
    return tuple(out)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(list(argv) if argv is not None else None)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        import uvicorn

        from voidprompt.server.api import create_app
        from voidprompt.server.serving import uvicorn_config
        from voidprompt.server.state import ServerConfig

        config = build_config(args)
        assert isinstance(config, ServerConfig)
        app = create_app(config)
    except (VoidpromptError, OSError) as error:
        print(f"voidprompt serve: {error}", file=sys.stderr)
        return 2
    print(
        f"voidprompt: serving on http://{config.host}:{config.port}/ (API at /sdapi/v1, docs at /docs)",
        file=sys.stderr,
    )
    settings = uvicorn_config(
        app, host=config.host, port=config.port, limits=config.limits, log_level=args.log_level
    )
    server = uvicorn.Server(settings)
    with contextlib.suppress(KeyboardInterrupt):  # a second Ctrl-C while shutting down
        server.run()
    if not server.started:
        where = f"{config.host}:{config.port}"
        print(f"voidprompt serve: could not serve on {where} (see the error above)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
