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
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tqdm import tqdm

from voidprompt import __version__
from voidprompt.errors import (
    InfotextError,
    InvalidRequestError,
    NansError,
    VoidpromptError,
    require_extra,
)
from voidprompt.helpformat import use_help_format
from voidprompt.imagemeta import open_image_safely, save_numbered
from voidprompt.request import EMPHASIS_MODES, GenerationRequest

DESCRIPTION = (
    "A Stable Diffusion workbench (SD1 and SDXL) faithful to AUTOMATIC1111: the same prompt language, "
    "seeds, samplers and infotext, so a picture made here is the one A1111 makes from the same settings. "
    "On top of it, a lab runs studies (TOML files) into a catalog and reports them. Without --model, "
    "commands use the miniature model shipped in the package (128x128, quick on a CPU). "
    "`voidprompt COMMAND --help` describes each command."
)

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
# Optional packages a delegated command cannot start without: (module, the extra that installs it).
NEEDS_EXTRA: dict[str, tuple[tuple[str, str], ...]] = {
    "serve": (("fastapi", "server"), ("uvicorn", "server")),
}


def _add_upscaler_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--upscaler-dir",
        type=Path,
        default=Path("models"),
        help="A1111's models folder for model upscalers (a hires fix's Hires upscaler, upscale): ESRGAN "
        "files in its ESRGAN/, Real-ESRGAN files in its RealESRGAN/ (default models)",
    )


def _add_model_args(p: argparse.ArgumentParser, model_help: str) -> None:
    """The model, its networks and where it runs: what builds the Engine."""
    p.add_argument("--model", help=model_help)
    p.add_argument("--vae", help="external VAE file (default: <model>.vae.pt etc. next to the model)")
    p.add_argument("--embeddings-dir", help="folder of textual-inversion embeddings")
    p.add_argument("--lora-dir", help="folder searched for <lora:name:...> tags")
    p.add_argument("--hypernet-dir", help="folder searched for <hypernet:name:...> tags")
    _add_upscaler_dir_arg(p)
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


def _previews_every(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of steps, 0 for no previews")
    return value


def _add_explain_args(
    p: argparse.ArgumentParser, *, tokens_flag: str, previews_flag: str, turns_on: bool
) -> None:
    also = "; turns the capture on" if turns_on else ""
    p.add_argument(
        tokens_flag,
        dest="explain_tokens",
        action="store_true",
        help=f"keep an attention map per prompt token too{also}",
    )
    p.add_argument(
        previews_flag,
        dest="explain_previews",
        type=_previews_every,
        default=None,
        metavar="K",
        help=f"store the trajectory previews of every K-th step (default 4; 0: none{also})",
    )


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    _add_model_args(p, "checkpoint (.safetensors/.ckpt); default: the miniature model")
    p.add_argument("--prompt", default="", help="what to draw, in A1111's prompt language")
    p.add_argument("--negative-prompt", default="", help="what to steer away from")
    p.add_argument("--style", action="append", default=[], help="style name from --styles-file (repeatable)")
    p.add_argument(
        "--styles-file",
        action="append",
        default=[],
        help="A1111 styles.csv (name,prompt,negative_prompt) defining --style names; repeatable, a later "
        "file's style replacing an earlier one of the same name",
    )
    p.add_argument("--seed", type=int, default=-1, help="-1 draws a random seed")
    p.add_argument("--subseed", type=int, default=-1, help="variation seed; -1 draws a random one")
    p.add_argument(
        "--subseed-strength", type=float, default=0.0, help="how far toward the variation seed, 0 to 1"
    )
    p.add_argument(
        "--sampler", default="Euler a", help="sampler name, e.g. 'Euler a', 'DPM++ 2M' (A1111's names)"
    )
    p.add_argument("--scheduler", default="Automatic", help="schedule type, e.g. Karras, Exponential")
    p.add_argument("--steps", type=int, default=20, help="sampling steps")
    p.add_argument("--cfg-scale", type=float, default=7.0, help="classifier-free guidance scale")
    p.add_argument("--width", type=int, default=None, help="picture width (default: the model's native size)")
    p.add_argument(
        "--height", type=int, default=None, help="picture height (default: the model's native size)"
    )
    p.add_argument("--batch-size", type=int, default=1, help="pictures per sampler run")
    p.add_argument("--n-iter", type=int, default=1, help="sampler runs, one after another")
    p.add_argument("--clip-skip", type=int, default=1, help="stop the text encoder this many layers early")
    p.add_argument("--eta", type=float, default=None, help="ancestral noise (default: the sampler's)")
    p.add_argument("--ensd", type=int, default=0, help="eta noise seed delta (NovelAI used 31337)")
    p.add_argument(
        "--rng",
        default=None,
        choices=["CPU", "GPU", "NV"],
        help="noise source (default: GPU on a CUDA device, as A1111; CPU elsewhere)",
    )
    p.add_argument(
        "--emphasis",
        default="Original",
        choices=EMPHASIS_MODES,
        help="how (word:1.2) weights apply (A1111's Emphasis setting)",
    )
    p.add_argument(
        "--tiling",
        action="store_true",
        help="seamless tiles: circular padding in the UNet's and VAE's convolutions (A1111's Tiling)",
    )
    p.add_argument("--out", default="outputs/txt2img", help="output folder (files are never overwritten)")
    p.add_argument(
        "--explain",
        action="store_true",
        help="capture what the model attends to and how the picture forms: NAME.explain.npz and the "
        "sheet NAME.explain.html beside each picture (the pictures are the same)",
    )
    _add_explain_args(p, tokens_flag="--explain-tokens", previews_flag="--explain-previews", turns_on=True)


# The hires fix's options: the request field each sets, and what its flag's help says.
HIRES_FIELDS = ("hr_scale", "hr_upscaler", "hr_second_pass_steps", "hr_resize_x", "hr_resize_y")


def _add_hires_args(p: argparse.ArgumentParser) -> None:
    """txt2img's hires fix, named as the API's request fields (A1111's Hires. fix section)."""
    g = p.add_argument_group("hires fix", "a second pass at a larger size (A1111's Hires. fix)")
    g.add_argument("--enable-hr", action="store_true", help="turn the hires fix on")
    g.add_argument("--hr-scale", type=float, default=None, help="upscale by this factor (default 2)")
    g.add_argument(
        "--hr-upscaler",
        default=None,
        help="Latent (default), another latent mode, Lanczos, Nearest or a model upscaler's name "
        "(from --upscaler-dir)",
    )
    g.add_argument(
        "--hr-second-pass-steps", type=int, default=None, help="the second pass's steps (default 0: --steps)"
    )
    g.add_argument(
        "--denoising-strength",
        type=float,
        default=None,
        help="how much the second pass changes, 0 to 1 (default 0.7, A1111's)",
    )
    g.add_argument(
        "--hr-resize-x", type=int, default=None, help="upscale to this width, not by --hr-scale (default 0)"
    )
    g.add_argument(
        "--hr-resize-y", type=int, default=None, help="upscale to this height, not by --hr-scale (default 0)"
    )


def _hires_fields(args: argparse.Namespace) -> dict[str, Any]:
    given = {name: getattr(args, name) for name in HIRES_FIELDS if getattr(args, name) is not None}
    if args.denoising_strength is not None:
        given["denoising_strength"] = args.denoising_strength
    if given and not args.enable_hr:
        flag = "--" + next(iter(given)).replace("_", "-")
        raise InvalidRequestError(f"{flag} sets the hires fix, which is off; add --enable-hr")
    return {"enable_hr": True, **given} if args.enable_hr else {}


def _checked_out_folder(out: str | os.PathLike[str], flag: str = "--out") -> Path:
    """``out`` as a folder pictures can be saved into, refused before anything is loaded or made."""
    folder = Path(out)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        where = "is a file" if existing == folder else f"cannot be made: {existing} is a file"
        raise InvalidRequestError(f"{flag} {folder}: {where}; give a folder (the pictures are saved into it)")
    if existing.exists() and not os.access(existing, os.W_OK | os.X_OK):
        raise InvalidRequestError(f"{flag} {folder}: {existing} is not writable; give another folder")
    return folder


def _placement(args: argparse.Namespace) -> tuple[Any, Any]:
    """The device and precision policy the flags name, refused (DeviceError) before anything runs."""
    from voidprompt.models.placement import resolve_device, resolve_precision

    device = resolve_device(args.device)
    return device, resolve_precision(args.precision, device)


def _request_fields(args: argparse.Namespace, device: Any) -> dict[str, Any]:
    from voidprompt.models.placement import default_randn_source

    if args.style and not args.styles_file:
        # Before a model loads: a style name means nothing without the file that defines it.
        raise InvalidRequestError(
            f"--style {args.style[0]!r}: no styles file; add --styles-file FILE (an A1111 styles.csv)"
        )
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
        "width": args.width,  # None: the model's native size, filled in by _preflight
        "height": args.height,
        "batch_size": args.batch_size,
        "n_iter": args.n_iter,
        "clip_skip": args.clip_skip,
        "eta": args.eta,
        "eta_noise_seed_delta": args.ensd,
        "randn_source": args.rng or default_randn_source(device),
        "emphasis": args.emphasis,
        "tiling": args.tiling,
    }


def _engine(args: argparse.Namespace, device: Any, precision: Any) -> Any:
    from voidprompt.demo.miniature import miniature_model_path
    from voidprompt.models.load import load_model
    from voidprompt.models.upscalers.registry import Upscalers
    from voidprompt.pipeline.engine import Engine
    from voidprompt.prompts.embeddings import EmbeddingDatabase
    from voidprompt.prompts.styles import StyleDatabase

    model = Path(args.model) if args.model else miniature_model_path()
    _say(f"loading {model} on {device} ...")
    started = time.perf_counter()
    components = load_model(model, vae_path=args.vae, device=device, precision=precision)
    _say(f"model loaded in {time.perf_counter() - started:.1f} s")
    styles_files = getattr(args, "styles_file", None)
    style_db = StyleDatabase.from_csv_files(styles_files) if styles_files else None
    engine = Engine(
        components,
        style_db=style_db,
        lora_dir=args.lora_dir,
        hypernet_dir=args.hypernet_dir,
        compile=args.compile,
        disable_nan_check=args.disable_nan_check,
        upscalers=Upscalers.in_models_dir(args.upscaler_dir, device=device),
    )
    if args.embeddings_dir:

        def database_for(width: int, sdxl_part: str | None) -> EmbeddingDatabase:
            database = EmbeddingDatabase(components.tokenizer, width=width, sdxl_part=sdxl_part)
            database.load_folder(args.embeddings_dir)
            return database

        engine.give_embeddings(database_for)
    return engine


def _explain_options(args: argparse.Namespace, *, on: bool) -> Any:
    """The capture the flags ask for (None: off); naming its tokens or previews turns it on too."""
    from voidprompt.explain.record import ExplainOptions

    if not (on or args.explain_tokens or args.explain_previews is not None):
        return None
    every = 4 if args.explain_previews is None else args.explain_previews
    return ExplainOptions(per_token=args.explain_tokens, preview_every=every)


def _say(line: str) -> None:
    print(f"voidprompt: {line}", file=sys.stderr, flush=True)


def _sampler_steps(request: GenerationRequest) -> int:
    """The sampler steps one iteration runs: img2img runs only its denoised part of the schedule
    (13 of 20 at strength 0.6), the hires fix adds its second pass."""
    from voidprompt.pipeline.img2img import DEFAULT_DENOISING
    from voidprompt.pipeline.run_sampler import Img2ImgStart

    if request.init_images:
        strength = DEFAULT_DENOISING if request.denoising_strength is None else request.denoising_strength
        start = Img2ImgStart.for_strength(request.steps, strength, fixed_steps=request.img2img_fix_steps)
        return start.t_enc + 1
    if request.enable_hr:
        return request.steps + (request.hr_second_pass_steps or request.steps)
    return request.steps


class StepProgress:
    """Sampler steps on stderr: a bar on a terminal; on a pipe or a log, where a bar's redraws would
    be noise, a plain line each tenth of the run."""

    def __init__(self, total: int, stream: Any = None) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.total = max(total, 1)
        self.done = 0
        self.reported = 0  # tenths already printed
        isatty = getattr(self.stream, "isatty", None)
        self.bar = tqdm(total=self.total, unit="step", file=self.stream) if isatty and isatty() else None

    def step(self, _progress: Any = None) -> None:
        self.done = min(self.done + 1, self.total)
        if self.bar is not None:
            self.bar.update(1)
            return
        tenths = self.done * 10 // self.total
        if tenths > self.reported:
            self.reported = tenths
            print(f"voidprompt: step {self.done}/{self.total} ({self.done * 100 // self.total}%)",
                  file=self.stream, flush=True)  # fmt: skip

    def finish(self) -> None:
        """The run ended well: a sampler that reports fewer steps (DPM adaptive) still ends at 100%."""
        while self.done < self.total:
            self.step()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _run(engine: Any, request: GenerationRequest, explain: Any) -> Any:
    from voidprompt.pipeline.engine import GenerationHooks

    progress = StepProgress(_sampler_steps(request) * request.n_iter)
    try:
        result = engine.generate(request, GenerationHooks(progress=progress.step), explain=explain)
        progress.finish()
        return result
    finally:
        progress.close()


def _save_explanation(
    image_path: Path, picture: Any, explanation: Any, infotext: str, notes: Sequence[str] = ()
) -> list[Path]:
    """``NAME.explain.npz`` and the sheet ``NAME.explain.html`` for the picture at ``image_path``."""
    from voidprompt.explain.sheet import sheet_path, write_sheet
    from voidprompt.explain.store import explanation_path, save_explanation

    data = save_explanation(explanation_path(image_path), explanation)
    sheet = write_sheet(
        sheet_path(image_path), picture, explanation, title=image_path.name, infotext=infotext, notes=notes
    )
    return [data, sheet]


def _preflight(args: argparse.Namespace, fields: dict[str, Any]) -> GenerationRequest:
    """The request, checked as far as it can be without weights: sizes, names, the output folder.
    With no --width/--height the size is the model's native one, read from the file's header."""
    from voidprompt.demo.miniature import miniature_model_path
    from voidprompt.models.info import checkpoint_native_size
    from voidprompt.models.upscalers.registry import Upscalers
    from voidprompt.pipeline.hires import check_hr_upscaler, hires_target
    from voidprompt.prompts.styles import StyleDatabase
    from voidprompt.sampling.registry import resolve

    _checked_out_folder(args.out)
    if args.vae and not Path(args.vae).is_file():
        raise InvalidRequestError(f"--vae {args.vae}: no such file; give the VAE file's path")
    for flag, folder in (
        ("--embeddings-dir", args.embeddings_dir),
        ("--lora-dir", args.lora_dir),
        ("--hypernet-dir", args.hypernet_dir),
    ):
        if folder and not Path(folder).is_dir():
            raise InvalidRequestError(f"{flag} {folder}: no such folder; check the path")
    if args.width is None or args.height is None:
        native = checkpoint_native_size(Path(args.model) if args.model else miniature_model_path())
        fields.update(width=args.width or native, height=args.height or native)
    request = GenerationRequest(**fields)
    request.validate()
    if request.styles and args.styles_file:
        styles = StyleDatabase.from_csv_files(args.styles_file)
        for name in request.styles:
            styles.get(name)  # an unknown name is a typo: refused here, not after the model loads
    resolve(request.sampler_name, request.scheduler)
    if request.enable_hr:
        resolve(request.hr_sampler_name or request.sampler_name, request.hr_scheduler or request.scheduler)
        hires_target(request)
        check_hr_upscaler(request.hr_upscaler, Upscalers.in_models_dir(args.upscaler_dir))
    return request


def _generate_and_save(
    args: argparse.Namespace, request: GenerationRequest, device: Any, precision: Any
) -> int:
    explain = _explain_options(args, on=args.explain)
    result = _run(_engine(args, device, precision), request, explain)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    explanations = result.explanations if explain is not None else [None] * len(result.images)
    for image, infotext, seed, explanation in zip(
        result.images, result.infotexts, result.seeds, explanations, strict=True
    ):
        path = save_numbered(image, out, str(seed), infotext)
        print(path)
        if explanation is not None:
            for written in _save_explanation(path, image, explanation, infotext):
                print(written)
    return 0


def cmd_txt2img(args: argparse.Namespace) -> int:
    device, precision = _placement(args)
    fields = _request_fields(args, device)
    fields.update(_hires_fields(args))
    request = _preflight(args, fields)  # fails on bad sizes, names or --out before loading a model
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
    request = _preflight(args, fields)
    return _generate_and_save(args, request, device, precision)


def _model_for(params: dict[str, Any], image: Path, folders: Sequence[Path] | None) -> Path:
    """The checkpoint whose hash the infotext names, from ``folders`` and the miniature model."""
    from voidprompt.demo.miniature import miniature_model_path
    from voidprompt.errors import ModelLoadError
    from voidprompt.server.checkpoints import DEFAULT_CKPT_DIR, ModelRegistry, NotFoundError

    folders = folders or [DEFAULT_CKPT_DIR]
    wanted = str(params.get("Model hash") or "").strip().lower()
    if not wanted:
        raise InfotextError(
            f"{image}: the infotext names no model hash; give the checkpoint with --model PATH"
        )
    try:
        extra = [miniature_model_path()]
    except ModelLoadError:
        extra = []
    registry = ModelRegistry(folders, extra)
    registry.refresh()
    named = str(params.get("Model") or "").strip()
    namesake = None
    if named:
        # The file the infotext names is hashed first: hashing a whole folder of big checkpoints is slow.
        try:
            namesake = registry.find(named)
        except NotFoundError:
            pass
        else:
            if wanted in (namesake.shorthash, namesake.sha256, namesake.old_hash):
                return namesake.path
    try:
        return registry.find(wanted).path
    except NotFoundError:
        searched = ", ".join(str(f) for f in [*folders, *extra]) or "(none)"
        # A retrained or re-saved file keeps its name and changes its hash: say so.
        other = f" ({namesake.path} has the hash {namesake.shorthash})" if namesake is not None else ""
        raise NotFoundError(
            f"{image}: no checkpoint with the model hash {wanted} in {searched}{other}; give it with "
            f"--model PATH or its folder with --ckpt-dir"
        ) from None


def _largest_difference(picture: Any, regenerated: Any) -> int | None:
    """The largest per-channel difference (0-255) between two pictures; None when their sizes differ."""
    import numpy as np

    a = np.asarray(picture.convert("RGB"), dtype=np.int16)
    b = np.asarray(regenerated.convert("RGB"), dtype=np.int16)
    if a.shape != b.shape:
        return None
    return int(np.abs(a - b).max()) if a.size else 0


def cmd_explain(args: argparse.Namespace) -> int:
    from voidprompt.imagemeta import read_infotext
    from voidprompt.infotext import parse_generation_parameters, request_fields_from_params

    image = Path(args.image)
    picture = open_image_safely(image)
    infotext, _items = read_infotext(picture)
    if not infotext:
        raise InfotextError(
            f"{image}: no generation parameters (infotext) in the file; explain needs a picture saved "
            f"with them (voidprompt and A1111 write them into the PNG)"
        )
    params = parse_generation_parameters(infotext)
    fields = request_fields_from_params(params)
    if fields.get("denoising_strength") is not None and not fields.get("enable_hr"):
        raise InfotextError(
            f"{image}: an img2img picture cannot be regenerated from its infotext (the init image is not "
            f"in it); run `voidprompt img2img --explain` with the init image instead"
        )
    device, precision = _placement(args)
    request = GenerationRequest(**fields)
    request.validate()
    if args.out:
        _checked_out_folder(args.out)
    if not args.model:
        args.model = str(_model_for(params, image, args.ckpt_dir))
    explain = _explain_options(args, on=True)
    result = _run(_engine(args, device, precision), request, explain)
    regenerated, new_infotext, explanation = result.images[0], result.infotexts[0], result.explanations[0]

    difference = _largest_difference(picture, regenerated)
    notes = []
    if difference is None:
        summary = (
            f"the regenerated picture is {regenerated.width}x{regenerated.height}, the file's "
            f"{picture.width}x{picture.height}; the maps explain the regenerated one"
        )
    else:
        summary = f"largest pixel difference from {image.name}: {difference}"
    print(f"{image}: {summary}")
    notes.append(summary)
    if difference != 0:
        warning = (
            f"{image}: the regenerated picture is not the file's (made in a batch, or with another "
            f"device, precision, model or version?); the maps explain the regenerated picture"
        )
        print(f"voidprompt: warning: {warning}", file=sys.stderr)
        notes.append(warning)
    written_hash = str(params.get("Model hash") or "").lower()
    new_hash = str(parse_generation_parameters(new_infotext).get("Model hash") or "").lower()
    # An old infotext's 8-digit hash is another hash of the file (A1111's old one): not comparable.
    if written_hash and len(written_hash) == len(new_hash) and written_hash != new_hash:
        warning = f"{image}: the model's hash is {new_hash}, the infotext's {written_hash}"
        print(f"voidprompt: warning: {warning}", file=sys.stderr)
        notes.append(warning)

    out = Path(args.out) if args.out else image.parent
    out.mkdir(parents=True, exist_ok=True)
    for written in _save_explanation(out / image.name, regenerated, explanation, infotext, notes):
        print(written)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from voidprompt.demo.miniature import miniature_model_path
    from voidprompt.models.info import describe_checkpoint

    print(describe_checkpoint(args.file or miniature_model_path()).format())
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


def cmd_tag(args: argparse.Namespace) -> int:
    import json

    from voidprompt.models.placement import resolve_device
    from voidprompt.pipeline.interrogate import open_tagger

    tagger = open_tagger(
        args.tagger,
        device=resolve_device(args.device or "cpu"),
        threshold=args.threshold,
        character_threshold=args.character_threshold,
    )
    for image_path in args.images:
        result = tagger.tag(open_image_safely(image_path))
        if args.json:
            record = {"image": image_path, "tagger": tagger.name, "caption": tagger.caption(result)}
            record.update(rating=dict(result.rating), character=dict(result.character))
            record["general"] = dict(result.general)
            print(json.dumps(record))
        else:
            caption = tagger.caption(result)
            print(f"{image_path}: {caption}" if len(args.images) > 1 else caption)
    return 0


def cmd_upscale(args: argparse.Namespace) -> int:
    from voidprompt.imagemeta import read_infotext, save_png, unique_path
    from voidprompt.models.placement import resolve_device
    from voidprompt.models.upscalers.extras import ExtrasUpscale, extras_infotext, extras_upscale
    from voidprompt.models.upscalers.registry import Upscalers

    device = resolve_device(args.device)
    upscalers = Upscalers.in_models_dir(
        args.upscaler_dir, device=device, tile=args.tile, tile_overlap=args.tile_overlap
    )
    if args.list:
        for entry in upscalers.entries():
            print(entry.name if entry.path is None else f"{entry.name}\t{entry.path}")
        return 0
    if not args.images:
        raise VoidpromptError("upscale: name at least one IMAGE (or --list to see the upscalers)")
    to_size = args.width is not None or args.height is not None
    if to_size and (args.width is None or args.height is None):
        raise VoidpromptError("upscale: --width and --height go together (scale to a size); or use --scale")
    settings = ExtrasUpscale(
        mode=1 if to_size else 0,
        upscale_by=args.scale,
        to_width=args.width or 0,
        to_height=args.height or 0,
        crop=not args.no_crop,
        upscaler_1=args.upscaler,
        upscaler_2=args.upscaler_2,
        upscaler_2_visibility=args.visibility,
    )
    settings.check(upscalers)
    out_dir = _checked_out_folder(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for image_path in args.images:
        source = open_image_safely(image_path)
        parameters, _ = read_infotext(source)
        result, info = extras_upscale(source, settings, upscalers)
        target = unique_path(out_dir, Path(image_path).stem)
        save_png(result, target, parameters, extra_text={"postprocessing": extras_infotext(info)})
        print(target)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="voidprompt", description=DESCRIPTION)
    parser.add_argument(
        "--version", action="version", version=f"voidprompt {__version__}", help="print the version"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("txt2img", help="generate images from a prompt")
    _add_generation_args(p)
    _add_hires_args(p)
    p.set_defaults(func=cmd_txt2img)

    p = sub.add_parser("img2img", help="generate from an init image (with --mask: inpaint)")
    _add_generation_args(p)
    p.set_defaults(out="outputs/img2img")
    p.add_argument("--init-image", required=True, help="the picture to start from")
    p.add_argument(
        "--denoising-strength", type=float, default=0.75, help="how much to change it, 0 (nothing) to 1"
    )
    p.add_argument(
        "--resize-mode",
        type=int,
        default=0,
        choices=[0, 1, 2, 3],
        help="to another size: 0 just resize, 1 crop and resize, 2 resize and fill, 3 latent upscale",
    )
    p.add_argument(
        "--noise-multiplier", type=float, default=1.0, help="scale of the noise added to the init image"
    )
    p.add_argument("--mask", help="inpainting mask: white = repaint")
    p.add_argument("--mask-blur", type=int, default=4, help="mask blur radius in pixels")
    p.add_argument(
        "--inpainting-fill",
        type=int,
        default=1,
        choices=[0, 1, 2, 3],
        help="0 fill, 1 original, 2 latent noise, 3 latent nothing",
    )
    p.add_argument("--inpaint-full-res", action="store_true", help="inpaint only the masked area")
    p.add_argument(
        "--inpaint-padding", type=int, default=32, help="with --inpaint-full-res: pixels around the area"
    )
    p.add_argument("--invert-mask", action="store_true", help="repaint the black part of the mask instead")
    p.set_defaults(func=cmd_img2img)

    p = sub.add_parser(
        "explain",
        help="regenerate a picture from its infotext with the capture on and write its explanation sheet",
    )
    p.add_argument("image", help="a PNG with its generation parameters (voidprompt's or A1111's)")
    _add_model_args(p, "the checkpoint (default: the one whose hash the infotext names, from --ckpt-dir)")
    p.add_argument(
        "--ckpt-dir",
        type=Path,
        action="append",
        help="folder searched for the model by its hash (repeatable; default models/Stable-diffusion; "
        "the miniature model is always searched)",
    )
    p.add_argument("--out", help="folder for NAME.explain.npz and NAME.explain.html (default: the picture's)")
    _add_explain_args(p, tokens_flag="--tokens", previews_flag="--previews", turns_on=False)
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("info", help="describe a checkpoint: family, native size, dtypes, parameters, hashes")
    p.add_argument("file", nargs="?", help="the checkpoint (default: the miniature model, txt2img's default)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("tokens", help="show how a prompt is chunked and weighted")
    p.add_argument("prompt", help="the prompt, in A1111's prompt language")
    p.add_argument(
        "--emphasis",
        default="Original",
        choices=EMPHASIS_MODES,
        help="how (word:1.2) weights apply (A1111's Emphasis setting)",
    )
    p.add_argument(
        "--comma-backtrack",
        type=int,
        default=20,
        help="a chunk ending within this many tokens of a comma breaks at the comma (A1111's setting)",
    )
    p.add_argument("--embeddings-dir", help="folder of textual-inversion embeddings")
    p.add_argument(
        "--embedding-width", type=int, default=768, help="text encoder width the embeddings are for"
    )
    p.set_defaults(func=cmd_tokens)

    p = sub.add_parser(
        "tag", help="tag pictures with A1111's DeepDanbooru or a WD14 tagger (the interrogate API's caption)"
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="pictures to tag")
    p.add_argument(
        "--tagger",
        type=Path,
        default=Path("models/torch_deepdanbooru/model-resnet_custom_v3.pt"),
        help="A1111's DeepDanbooru file, or a WD14 tagger folder (model.onnx + selected_tags.csv); "
        "default models/torch_deepdanbooru/model-resnet_custom_v3.pt",
    )
    p.add_argument(
        "--threshold", type=float, help="general tags' threshold (DeepDanbooru 0.5, WD14 0.35 unless set)"
    )
    p.add_argument("--character-threshold", type=float, help="WD14 character tags' threshold (default 0.85)")
    p.add_argument("--device", help="cpu (default), cuda, cuda:N or mps")
    p.add_argument("--json", action="store_true", help="one JSON line per picture, with probabilities")
    p.set_defaults(func=cmd_tag)

    p = sub.add_parser(
        "upscale", help="upscale pictures as A1111's Extras tab does (ESRGAN files, Lanczos, ...)"
    )
    p.add_argument("images", nargs="*", metavar="IMAGE", help="pictures to upscale")
    p.add_argument("--upscaler", default="R-ESRGAN 4x+", help="upscaler name (default R-ESRGAN 4x+; --list)")
    p.add_argument("--scale", type=float, default=2.0, help="scale by this factor (default 2, A1111's API)")
    p.add_argument("--width", type=int, help="scale to this width (with --height) instead of --scale")
    p.add_argument("--height", type=int, help="scale to this height (with --width)")
    p.add_argument("--no-crop", action="store_true", help="with --width/--height: do not crop to the size")
    p.add_argument("--upscaler-2", default="None", help="a second upscaler blended over the first")
    p.add_argument("--visibility", type=float, default=0.0, help="the second upscaler's weight, 0 to 1")
    p.add_argument(
        "--tile", type=int, default=192, help="tile side for model upscalers, 0 = none (A1111's 192)"
    )
    p.add_argument("--tile-overlap", type=int, default=8, help="tile overlap in pixels (A1111's 8)")
    _add_upscaler_dir_arg(p)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default cpu)")
    p.add_argument(
        "--out", default="outputs/extras-images", help="output folder (default outputs/extras-images)"
    )
    p.add_argument("--list", action="store_true", help="list the upscaler names and exit")
    p.set_defaults(func=cmd_upscale)

    for name, help_text in (
        ("demo", "the miniature model: the demo study (no arguments), `demo gallery`, `demo train`"),
        ("study", "studies: check, run, ls, show, report"),
        ("merge", "merge checkpoints"),
        ("lora", "LoRA tools (extract)"),
        ("serve", "A1111-compatible HTTP API and web UI"),
    ):
        sub.add_parser(name, help=help_text, add_help=False)
    return use_help_format(parser)


def _delegate(name: str, argv: Sequence[str]) -> int:
    module_name, func_name = DELEGATED[name].split(":")
    for needed, extra in NEEDS_EXTRA.get(name, ()):
        require_extra(needed, extra, f"voidprompt {name}")
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
