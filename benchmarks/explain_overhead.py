"""What the explain capture costs: the same generation with the capture off and on (its defaults).

The shipped miniature model at 128x128, Euler a, 20 steps, CFG 7, a ``<colour> <shape>`` prompt and
the NovelAI negative list, batch sizes 1 and 8, on the CPU with one torch thread and with torch's
default thread count. Both modes run in one process after an untimed warm-up each, in alternating
order; the best of ``--repeats`` wall times (and CPU times) of each is kept and the ratio on / off
printed. The capture's aim is at most 1.30x.

    .venv/bin/python benchmarks/explain_overhead.py [--repeats 3] [--batch-sizes 1,8] [--threads 1,0]
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from voidprompt.demo.miniature import miniature_model_path
from voidprompt.explain.record import ExplainOptions
from voidprompt.models.load import load_model
from voidprompt.pipeline.engine import Engine
from voidprompt.request import GenerationRequest

NEGATIVE = (
    "lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, cropped, "
    "worst quality, low quality, normal quality, jpeg artifacts, signature, watermark, username, blurry, "
    "artist name"
)


@dataclass
class Best:
    wall: float = float("inf")
    cpu: float = float("inf")

    def add(self, wall: float, cpu: float) -> None:
        self.wall, self.cpu = min(self.wall, wall), min(self.cpu, cpu)


def timed(engine: Engine, request: GenerationRequest, explain: ExplainOptions | None) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = engine.generate(request, explain=explain)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert len(result.explanations) == (0 if explain is None else request.batch_size)
    return wall, cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--threads", default="1,0", help="torch threads to try; 0: torch's default")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    default_threads = torch.get_num_threads()
    engine = Engine(load_model(miniature_model_path()))
    options = ExplainOptions()
    print(f"miniature model, {args.size}x{args.size}, Euler a, {args.steps} steps; capture {options}")
    print(f"{'threads':>7} {'batch':>5} {'off s':>8} {'on s':>8} {'wall x':>7} {'cpu x':>7}")
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads or default_threads)
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            request = GenerationRequest(
                prompt="red circle", negative_prompt=NEGATIVE, seed=1, steps=args.steps,
                width=args.size, height=args.size, cfg_scale=7.0, sampler_name="Euler a",
                batch_size=batch,
            )  # fmt: skip
            off, on = Best(), Best()
            timed(engine, request, None)
            timed(engine, request, options)
            for _ in range(args.repeats):
                off.add(*timed(engine, request, None))
                on.add(*timed(engine, request, options))
            print(
                f"{torch.get_num_threads():>7} {batch:>5} {off.wall:>8.2f} {on.wall:>8.2f} "
                f"{on.wall / off.wall:>6.2f}x {on.cpu / off.cpu:>6.2f}x",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
