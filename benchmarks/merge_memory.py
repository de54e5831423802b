"""Peak memory of a streamed weighted-sum merge of two full-size SD1.5 fp16 files.

Writes two random fp16 SD1.5-layout .safetensors files (about 2 GB each, into ``.bench/``; the first
is shared with ``load_checkpoint.py``), then merges them (M = 0.5, safetensors output, recipe
metadata with both inputs' sha256) in a subprocess and reports its peak RSS (VmHWM, the whole process
including the interpreter and torch) against one input file's size. Target: <= 1.5x.
Run (niced, it takes minutes): nice python benchmarks/merge_memory.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def _child(a: str, b: str, out: str) -> None:
    import torch  # noqa: F401 - imports are part of the base, not of the merge

    from voidprompt.models.merge import MergeMethod, MergeOptions, merge_checkpoints

    base = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the imports' peak does not count
    t0 = time.perf_counter()
    res = merge_checkpoints(a, b, out=out, options=MergeOptions(MergeMethod.WEIGHTED_SUM, multiplier=0.5))
    wall = time.perf_counter() - t0
    peak = _status_kib("VmHWM")
    print(
        json.dumps(
            {"wall_s": wall, "base_mib": base / 1024, "peak_mib": peak / 1024, "keys": res.keys_written}
        )
    )


def main() -> int:
    sys.path.insert(0, str(ROOT / "src"))
    from voidprompt.testing.fake_checkpoints import write_random_full_size_sd15

    bench = ROOT / ".bench"
    bench.mkdir(exist_ok=True)
    a, b = bench / "random-sd15-fp16.safetensors", bench / "random-sd15-fp16-b.safetensors"
    for path, seed in ((a, 0), (b, 1)):
        if not path.exists():
            print(f"writing {path} ...", flush=True)
            write_random_full_size_sd15(path, seed=seed)
    out = bench / "merged.safetensors"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "VOIDPROMPT_CACHE_DIR": str(bench / "cache")}
    proc = subprocess.run(
        [sys.executable, __file__, "--child", str(a), str(b), str(out)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    size_mib = a.stat().st_size / 2**20
    ratio = r["peak_mib"] / size_mib
    print(
        f"input file: {size_mib:.0f} MiB (fp16); output {out.stat().st_size / 2**20:.0f} MiB, "
        f"{r['keys']} tensors"
    )
    print(f"merge wall time: {r['wall_s']:.1f} s (includes sha256 of both inputs)")
    print(
        f"peak RSS: {r['peak_mib']:.0f} MiB total, {r['peak_mib'] - r['base_mib']:.0f} MiB above the "
        f"{r['base_mib']:.0f} MiB after imports"
    )
    print(f"peak / file size: {ratio:.2f}x  (target <= 1.5x: {'PASS' if ratio <= 1.5 else 'FAIL'})")
    out.unlink(missing_ok=True)
    return 0 if ratio <= 1.5 else 1


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        raise SystemExit(main())
