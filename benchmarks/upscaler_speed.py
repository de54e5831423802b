"""Model upscaler speed: voidprompt's RRDBNet against spandrel's (MIT; A1111 1.10 and ComfyUI load
their ESRGAN models through it) on the same full-size random weights.

A 4x ESRGAN of the usual size (64 features, 23 RRDB blocks, as 4x-UltraSharp and R-ESRGAN 4x+), the
same input tile (A1111's 192 px tile by default) through each network's forward, float32 on the CPU.
Both run in one process after an untimed warm-up, in alternating order; the best of ``--repeats``
wall times of each is kept and the ratio voidprompt / spandrel printed, with the largest output
difference. spandrel imports torchvision for two unrelated architectures; a stub stands in for it
here (torchvision does not load beside the CPU torch wheel).

    .venv/bin/python benchmarks/upscaler_speed.py [--tile 192] [--blocks 23] [--repeats 3] [--threads 0]
"""

from __future__ import annotations

import argparse
import sys
import time
import types
from collections.abc import Callable

import torch

from voidprompt.models.upscalers.rrdb import rrdb_from_state_dict
from voidprompt.testing.tiny_upscalers import rrdb_state_dict


def _unavailable(*_args: object, **_kwargs: object) -> None:
    raise NotImplementedError("torchvision stub")


def _stub_torchvision() -> None:
    functional = types.ModuleType("torchvision.transforms.functional")
    functional.InterpolationMode = type("InterpolationMode", (), {})  # type: ignore[attr-defined]
    functional.rotate = functional.normalize = _unavailable  # type: ignore[attr-defined]
    transforms = types.ModuleType("torchvision.transforms")
    transforms.functional = functional  # type: ignore[attr-defined]
    root = types.ModuleType("torchvision")
    root.transforms = transforms  # type: ignore[attr-defined]
    names = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")
    sys.modules.update(zip(names, (root, transforms, functional), strict=True))


def _best(run: Callable[[], torch.Tensor], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tile", type=int, default=192, help="input side in pixels (A1111's ESRGAN_tile)")
    parser.add_argument("--blocks", type=int, default=23, help="RRDB blocks (23 in the usual 4x models)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    _stub_torchvision()
    from spandrel import ModelLoader

    state = rrdb_state_dict("old", nf=64, nb=args.blocks, gc=32, ups=2, seed=1)
    ours = rrdb_from_state_dict(state).eval()
    theirs = ModelLoader().load_from_state_dict(state).model.eval()
    x = torch.rand(1, 3, args.tile, args.tile, generator=torch.Generator().manual_seed(0))

    with torch.no_grad():
        a, b = ours(x), theirs(x)  # warm-up, and the outputs compared
        times = {"voidprompt": [], "spandrel": []}
        for _ in range(args.repeats):
            times["voidprompt"].append(_best(lambda: ours(x), 1))
            times["spandrel"].append(_best(lambda: theirs(x), 1))
    mine, peer = min(times["voidprompt"]), min(times["spandrel"])
    print(
        f"4x RRDBNet nf=64 nb={args.blocks}, {args.tile}x{args.tile} input, {torch.get_num_threads()} threads"
    )
    print(f"  voidprompt {mine:.3f} s   spandrel {peer:.3f} s   ratio {mine / peer:.2f}x")
    print(f"  output {tuple(a.shape)}, largest difference {(a - b).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
