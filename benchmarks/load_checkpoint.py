"""Peak memory and time of loading a full-size checkpoint.

SD1 (the default): writes a random fp16 SD1.5-layout .safetensors (about 2 GB, into ``.bench/``,
kept for the next run), then in separate subprocesses, so that neither sees the other's memory:
  (a) voidprompt.models.load_model -> fp32 modules (meta device, tensor by tensor);
  (b) baseline: safetensors.torch.load_file + diffusers/transformers modules built the ordinary way
      (random init) + load_state_dict of the converted dicts.

SDXL (``--family sdxl``): writes a random fp16 SDXL-base-layout .safetensors (about 6.5 GiB, into a
temporary folder under ``--dir``, default the system's), loads it with load_model in fp16 and in fp32,
each in a fresh subprocess, and checks the peak against 1.2x the loaded model's size (parameters and
buffers at the load precision); the file is deleted at the end, whatever happened. Needs about 7 GiB
of free disk and, for the fp32 load, about 16 GiB of free memory.

Peak RSS is VmHWM minus the RSS right after the imports.
Run: python benchmarks/load_checkpoint.py [--family sdxl]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The SDXL loads' ceiling: peak RSS above the post-import base over the loaded model's bytes.
SDXL_PEAK_LIMIT = 1.2
DTYPES = ("fp16", "fp32")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def _child(mode: str, path: str, precision: str = "fp32") -> None:
    import torch  # imports are part of the baseline, not the measurement
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from voidprompt.models import load_model
    from voidprompt.models.arch import infer_arch
    from voidprompt.models.convert import compvis_to_modules

    base = _status_kib("VmRSS")
    # VmHWM only ever grows; reset it so the imports' own peak does not count.
    Path("/proc/self/clear_refs").write_text("5")
    t0 = time.perf_counter()
    model_bytes = 0
    if mode == "ours":
        dtype = {"fp16": torch.float16, "fp32": torch.float32}[precision]
        c = load_model(path, dtype=dtype, tokenizer=object())
        modules = [m for m in (c.unet, c.vae, c.text_encoder, c.text_encoder_2) if m is not None]
        params = sum(p.numel() for m in modules for p in m.parameters())
        tensors = [t for m in modules for t in (*m.parameters(), *m.buffers())]
        model_bytes = sum(t.numel() * t.element_size() for t in tensors)
    else:
        from safetensors.torch import load_file
        from transformers import CLIPTextConfig

        sd = load_file(path)
        arch = infer_arch({k: v.shape for k, v in sd.items()})
        unet = UNet2DConditionModel(**arch.unet_config())
        vae = AutoencoderKL(**arch.vae_config())
        te = CLIPTextModel(CLIPTextConfig(**arch.clip_config()))
        conv = compvis_to_modules(sd, unet, vae, te)
        del sd
        unet.load_state_dict(conv.unet)
        vae.load_state_dict(conv.vae)
        te.load_state_dict(conv.text_encoder)
        del conv
        params = sum(p.numel() for m in (unet, vae, te) for p in m.parameters())
    wall = time.perf_counter() - t0
    peak = _status_kib("VmHWM")
    print(
        json.dumps(
            {
                "mode": mode,
                "wall_s": wall,
                "peak_above_base_mib": (peak - base) / 1024,
                "params": params,
                "model_mib": model_bytes / 2**20,
            }
        )
    )


def _write_sdxl(path: str) -> None:
    from voidprompt.models.detect import ModelFamily
    from voidprompt.testing.fake_checkpoints import write_random_full_size

    write_random_full_size(path, ModelFamily.SDXL)
    print(json.dumps({"written": path}))


def _run(mode: str, path: Path, precision: str = "fp32") -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, __file__, "--child", mode, str(path), precision],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main_sd1() -> int:
    sys.path.insert(0, str(ROOT / "src"))
    from voidprompt.testing.fake_checkpoints import write_random_full_size_sd15

    bench = ROOT / ".bench"
    bench.mkdir(exist_ok=True)
    path = bench / "random-sd15-fp16.safetensors"
    if not path.exists():
        print(f"writing {path} ...", flush=True)
        write_random_full_size_sd15(path)
    ours = _run("ours", path)
    base = _run("baseline", path)
    fp32_mib = ours["params"] * 4 / 2**20
    print(f"file: {path.stat().st_size / 2**20:.0f} MiB fp16; model in fp32: {fp32_mib:.0f} MiB")
    print(f"{'':22}{'voidprompt':>12}{'baseline':>12}{'ratio':>8}")
    o_peak, b_peak = ours["peak_above_base_mib"], base["peak_above_base_mib"]
    print(f"{'peak RSS above base':22}{o_peak:>10.0f}Mi{b_peak:>10.0f}Mi{o_peak / b_peak:>8.2f}")
    o_wall, b_wall = ours["wall_s"], base["wall_s"]
    print(f"{'wall time':22}{o_wall:>11.1f}s{b_wall:>11.1f}s{o_wall / b_wall:>8.2f}")
    ok_model = ours["peak_above_base_mib"] <= 1.6 * fp32_mib
    ok_base = ours["peak_above_base_mib"] < base["peak_above_base_mib"]
    print(
        f"peak <= 1.6 x fp32 model size: {'PASS' if ok_model else 'FAIL'} "
        f"({ours['peak_above_base_mib'] / fp32_mib:.2f}x); below baseline: {'PASS' if ok_base else 'FAIL'}"
    )
    return 0 if ok_model and ok_base else 1


def main_sdxl(folder: Path) -> int:
    """Write the random SDXL file (in a subprocess, so that its memory is gone before the loads),
    load it in each precision in a fresh subprocess, delete it."""
    work = Path(tempfile.mkdtemp(prefix="load-sdxl-", dir=folder))
    path = work / "random-sdxl-fp16.safetensors"
    try:
        print(f"writing {path} ...", flush=True)
        t0 = time.perf_counter()
        _run("write-sdxl", path)
        print(
            f"file: {path.stat().st_size / 2**30:.2f} GiB fp16, written in {time.perf_counter() - t0:.0f} s"
        )
        runs = {}
        for precision in DTYPES:
            print(f"loading in {precision} ...", flush=True)
            runs[precision] = _run("ours", path, precision)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{'load precision':16}{'model':>11}{'peak RSS':>11}{'ratio':>8}{'wall':>9}")
    ok = True
    for precision, run in runs.items():
        ratio = run["peak_above_base_mib"] / run["model_mib"]
        ok = ok and ratio <= SDXL_PEAK_LIMIT
        print(
            f"{precision:16}{run['model_mib'] / 1024:>7.2f} GiB{run['peak_above_base_mib'] / 1024:>7.2f} GiB"
            f"{ratio:>7.2f}x{run['wall_s']:>8.1f}s"
        )
    params = runs["fp32"]["params"]
    print(f"parameters: {params / 1e9:.3f} B; the file was deleted")
    print(f"peak <= {SDXL_PEAK_LIMIT}x the model's size at its load precision: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--family", choices=("sd1", "sdxl"), default="sd1")
    parser.add_argument(
        "--dir", type=Path, default=Path(tempfile.gettempdir()), help="where the SDXL file is written"
    )
    args = parser.parse_args(argv)
    if args.family == "sdxl":
        return main_sdxl(args.dir)
    return main_sd1()


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "--child":
        if sys.argv[2] == "write-sdxl":
            _write_sdxl(sys.argv[3])
        else:
            _child(sys.argv[2], sys.argv[3], *sys.argv[4:5])
    else:
        raise SystemExit(main())
