"""Images/min of ``voidprompt study run`` against a naive per-image diffusers loop on the same weights.

The sweep: the miniature model at 64x64 (``--size``; the shipped model's native size is 128), Euler a,
20 steps, CFG 7, Clip skip 2, empty prompt, the NovelAI negative list weighted by W; W in 4 values x
16 seeds = 64 images.

- voidprompt: ``run_study`` exactly as ``voidprompt study run`` calls it (default batch size, the
  detector pre-labels every image because the study is on the miniature model), timed from the
  start of ``run_study`` to its end: model load, prompt encoding, sampling, VAE decode, PNG with
  infotext, sha256, seven measures, the detector, one catalog transaction per image.
- naive: diffusers' StableDiffusionPipeline built from the loaded Components' modules (the same
  converted weights), a transformers CLIPTokenizer made from our shipped BPE file and
  EulerAncestralDiscreteScheduler(timestep_spacing="linspace") (A1111's "Euler a" sigmas), called
  once per image (its CFG runs cond and uncond as one batch of 2); timed from the model load to the
  last image, images kept in memory only. diffusers does not parse A1111's ``(tag:W)`` emphasis, so
  it gets the same tags plainly (48 tokens either way, one 77-token chunk). No clip skip: diffusers
  0.42's clip-skip path needs CLIPTextModel.text_model, which transformers 5.6 flattened away; the
  final layer costs one more text-encoder layer per prompt (4 small layers here).

Both sides run in this one process with the same torch thread count, after one untimed model load
that imports everything either side needs (diffusers imports its model classes lazily, seconds of
work that would otherwise land on whichever side runs first). Each repeat runs both sides, in
alternating order, and prints wall-clock and CPU-time images/min; the CPU-time ratio is the one to
trust on a machine whose cores other jobs share.

    python benchmarks/study_throughput.py                  # 2 repeats, 1 thread
    python benchmarks/study_throughput.py --repeats 3 --threads 2
    python benchmarks/study_throughput.py --tiny --size 32 --steps 10   # a tiny random checkpoint

Target: ratio >= 1.5 on the 2-core CPU machines.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

NEGATIVE = (
    "lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, cropped, "
    "worst quality, low quality, normal quality, jpeg artifacts, signature, watermark, username, blurry, "
    "artist name"
)
W_VALUES = (0.9, 1.0, 1.1, 1.3)
SEEDS = 16


@dataclass
class Timing:
    images: int
    wall: float
    cpu: float

    @property
    def per_minute(self) -> float:
        return 60.0 * self.images / self.wall

    @property
    def per_cpu_minute(self) -> float:
        return 60.0 * self.images / self.cpu


def hf_tokenizer(folder: Path) -> object:
    """transformers' CLIPTokenizer from vocab.json / merges.txt derived from our shipped gz."""
    import transformers

    from voidprompt.models.tokenizer import bytes_to_unicode, default_vocab_path

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


def naive_loop(checkpoint: Path, size: int, steps: int, tokenizer: object) -> Timing:
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline

    from voidprompt.models.load import load_model

    wall, cpu = time.perf_counter(), time.process_time()
    components = load_model(checkpoint)
    # steps_offset is unused by "linspace" spacing; 1 only silences diffusers' config warning.
    scheduler = EulerAncestralDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        timestep_spacing="linspace", steps_offset=1,
    )  # fmt: skip
    pipe = StableDiffusionPipeline(
        vae=components.vae, text_encoder=components.text_encoder, tokenizer=tokenizer,
        unet=components.unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    count = 0
    for _w in W_VALUES:
        for seed in range(SEEDS):
            pipe(prompt="", negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=7.0,
                 height=size, width=size, generator=torch.Generator().manual_seed(seed))  # fmt: skip
            count += 1
    return Timing(count, time.perf_counter() - wall, time.process_time() - cpu)


def lab_run(checkpoint: Path | None, size: int, steps: int, batch_size: int | None, folder: Path) -> Timing:
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
width = {size}
height = {size}
[prompt]
negative_step = {{ tags = "{NEGATIVE}", weight = "{{W}}" }}
[axes]
W = "{", ".join(str(w) for w in W_VALUES)}"
seed = "{SEEDS} random"
"""
    study = parse_study(text, folder / "throughput.toml")
    options = study.run.override(batch_size=batch_size, progress=False)
    cpu = time.process_time()
    # The study's own labeler, as `voidprompt study run` does (the detector on the miniature model).
    report = run_study(study, options)
    cpu = time.process_time() - cpu
    assert report.generated == len(W_VALUES) * SEEDS
    # run_study's own wall time: from its start (model load) to the last catalog commit.
    return Timing(report.generated, report.seconds, cpu)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny random checkpoint (VAE /2) instead")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=None, help="default: study run's default")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both sides")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if args.tiny:
            from voidprompt.testing.fake_checkpoints import write_tiny_checkpoint

            checkpoint: Path = write_tiny_checkpoint(folder / "tiny.safetensors")
            study_model: Path | None = checkpoint
        else:
            from voidprompt.lab.plugins import installed_plugins
            from voidprompt.lab.schema import ModelRef

            checkpoint = installed_plugins().resolve_model(ModelRef(), folder).checkpoint
            study_model = None  # the study's default model: the miniature one, as in the demo
        # Untimed warm-up: every import either side needs (diffusers loads model classes lazily).
        import diffusers  # noqa: F401
        from diffusers import StableDiffusionPipeline  # noqa: F401

        from voidprompt.demo.detector import detect  # noqa: F401
        from voidprompt.models.load import load_model

        load_model(checkpoint)
        tokenizer = hf_tokenizer(folder)
        name = "tiny random" if args.tiny else checkpoint.name
        print(f"model: {name}, {args.size}x{args.size}, {args.steps} steps Euler a, CFG 7, "
              f"{len(W_VALUES) * SEEDS} images per side, {args.threads} torch thread(s)")  # fmt: skip
        wall_ratios, cpu_ratios = [], []
        for repeat in range(args.repeats):
            run_folder = folder / f"run{repeat}"
            run_folder.mkdir()
            sides = ["lab", "naive"] if repeat % 2 == 0 else ["naive", "lab"]
            timings: dict[str, Timing] = {}
            for side in sides:
                if side == "lab":
                    timings[side] = lab_run(study_model, args.size, args.steps, args.batch_size, run_folder)
                else:
                    timings[side] = naive_loop(checkpoint, args.size, args.steps, tokenizer)
            lab, naive = timings["lab"], timings["naive"]
            wall_ratios.append(lab.per_minute / naive.per_minute)
            cpu_ratios.append(lab.per_cpu_minute / naive.per_cpu_minute)
            print(
                f"repeat {repeat + 1} ({' then '.join(sides)}): voidprompt study run {lab.per_minute:.1f} "
                f"images/min ({lab.per_cpu_minute:.1f} per CPU-minute), naive diffusers loop "
                f"{naive.per_minute:.1f} images/min ({naive.per_cpu_minute:.1f} per CPU-minute); "
                f"ratio {wall_ratios[-1]:.2f}x wall, {cpu_ratios[-1]:.2f}x CPU",
                flush=True,
            )
    print(
        f"ratio (median of {args.repeats}): {statistics.median(wall_ratios):.2f}x wall clock, "
        f"{statistics.median(cpu_ratios):.2f}x CPU time (target >= 1.5x)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
