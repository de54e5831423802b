"""Images/min of ``run_study`` against a naive per-image diffusers loop on the same weights.

The sweep: one size, W in 4 values x 16 seeds = 64 images, Euler a, empty prompt, the NovelAI
negative list weighted by W, clip skip 2. The naive side builds diffusers' StableDiffusionPipeline
from the loaded Components' modules (the same converted weights), a transformers CLIPTokenizer
made from our shipped BPE file, and EulerAncestralDiscreteScheduler(timestep_spacing="linspace"),
and calls it once per image. run_study does more per image (PNG with infotext, sha256, seven
measures, a catalog transaction) and still has to win by batching same-shape jobs.

    python benchmarks/study_throughput.py                       # the miniature model, 64x64, 20 steps
    python benchmarks/study_throughput.py --tiny --size 32 --steps 10

Target: ratio >= 1.5 on the 2-core CPU machines.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

NEGATIVE = (
    "lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, cropped, "
    "worst quality, low quality, normal quality, jpeg artifacts, signature, watermark, username, blurry, "
    "artist name"
)
W_VALUES = (0.9, 1.0, 1.1, 1.3)
SEEDS = 16


def hf_tokenizer(folder: Path) -> object:
    """transformers' CLIPTokenizer from vocab.json / merges.txt derived from our shipped gz."""
    import transformers

    from voidprompt.prompts.tokenizer import bytes_to_unicode, default_vocab_path

    with gzip.open(default_vocab_path(), "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    alphabet = list(bytes_to_unicode().values())
    vocab = alphabet + [a + "</w>" for a in alphabet] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), "utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return transformers.CLIPTokenizer.from_pretrained(
        str(folder), local_files_only=True, model_max_length=77, pad_token="<|endoftext|>"
    )


def naive_loop(checkpoint: Path, size: int, steps: int, folder: Path) -> float:
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline

    from voidprompt.lab.study import weight_tags
    from voidprompt.models.load import load_model

    components = load_model(checkpoint)
    scheduler = EulerAncestralDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        timestep_spacing="linspace",
    )  # fmt: skip
    pipe = StableDiffusionPipeline(
        vae=components.vae, text_encoder=components.text_encoder, tokenizer=hf_tokenizer(folder),
        unet=components.unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    started = time.perf_counter()
    count = 0
    for w in W_VALUES:
        for seed in range(SEEDS):
            # diffusers reads "(tag:W)" as plain text: the same token count, so the same cost. No
            # clip_skip: diffusers 0.42's clip-skip path needs CLIPTextModel.text_model, which
            # transformers 5.6 flattened away; the final layer costs one text-encoder layer.
            pipe(prompt="", negative_prompt=weight_tags(NEGATIVE, str(w)), num_inference_steps=steps,
                 guidance_scale=7.0, height=size, width=size,
                 generator=torch.Generator().manual_seed(seed))  # fmt: skip
            count += 1
    return 60.0 * count / (time.perf_counter() - started)


def lab_run(
    checkpoint: Path | None, size: int, steps: int, batch_size: int, folder: Path, pad: bool
) -> float:
    from voidprompt.lab.run import run_study
    from voidprompt.lab.study import parse_study

    model = f'[model]\ncheckpoint = "{checkpoint}"\n' if checkpoint else ""
    text = f"""[study]
name = "throughput"
master_seed = 1
{model}[settings]
sampler_name = "Euler a"
steps = {steps}
cfg_scale = 7.0
clip_skip = 2
pad_cond_uncond = {"true" if pad else "false"}
width = {size}
height = {size}
[prompt]
negative_step = {{ tags = "{NEGATIVE}", weight = "{{W}}" }}
[axes]
W = "{", ".join(str(w) for w in W_VALUES)}"
seed = "{SEEDS} random"
"""
    study = parse_study(text, folder / "throughput.toml")
    report = run_study(study, batch_size=batch_size, progress=False, labeler=None)
    assert report.generated == len(W_VALUES) * SEEDS
    # Whole run_study wall time: model load, encode, sampling, PNG, hashing, measures, catalog.
    return 60.0 * report.generated / report.seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny random checkpoint (VAE /2) instead")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both sides")
    # The 18-tag negative list is 2 chunks (154 tokens) against the empty prompt's 77, so A1111
    # runs cond and uncond as two UNet calls unless "pad prompt/negative prompt" is on; diffusers
    # truncates the negative to 77 tokens and always batches them. --no-pad shows A1111's default.
    parser.add_argument("--no-pad", action="store_true", help="leave pad_cond_uncond off (A1111 default)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if args.tiny:
            from voidprompt.testing.fake_checkpoints import write_tiny_checkpoint

            checkpoint: Path = write_tiny_checkpoint(folder / "tiny.safetensors")
        else:
            from voidprompt.lab.run import resolve_model
            from voidprompt.lab.study import ModelRef

            checkpoint, _ = resolve_model(ModelRef(), folder)
        lab = lab_run(checkpoint, args.size, args.steps, args.batch_size, folder, not args.no_pad)
        naive = naive_loop(checkpoint, args.size, args.steps, folder)
    name = "tiny random" if args.tiny else checkpoint.name
    print(f"model: {name}, {args.size}x{args.size}, {args.steps} steps Euler a, "
          f"{len(W_VALUES) * SEEDS} images, {args.threads} thread(s)")  # fmt: skip
    pad = "off" if args.no_pad else "on"
    print(f"voidprompt study run: {lab:.1f} images/min (batch size {args.batch_size}, pad cond/uncond {pad})")
    print(f"naive diffusers loop: {naive:.1f} images/min")
    print(f"ratio: {lab / naive:.2f}x (target >= 1.5x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
