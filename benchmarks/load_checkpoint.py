"""Peak memory and time of loading a full-size SD1.5 checkpoint: voidprompt vs the ordinary way.

Writes a random fp16 SD1.5-layout .safetensors (about 2 GB, into ``.bench/``), then in separate
subprocesses, so that neither sees the other's memory:
  (a) voidprompt.models.load_model -> fp32 modules (meta device, tensor by tensor);
  (b) baseline: safetensors.torch.load_file + diffusers/transformers modules built the ordinary way
      (random init) + load_state_dict of the converted dicts.
Peak RSS is VmHWM minus the RSS right after the imports. Run: python benchmarks/load_checkpoint.py
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


def _child(mode: str, path: str) -> None:
    import torch  # noqa: F401 - imports are part of the baseline, not the measurement
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from voidprompt.models import load_model
    from voidprompt.models.arch import infer_arch
    from voidprompt.models.convert import compvis_to_modules

    base = _status_kib("VmRSS")
    # VmHWM only ever grows; reset it so the imports' own peak does not count.
    Path("/proc/self/clear_refs").write_text("5")
    t0 = time.perf_counter()
    if mode == "ours":
        c = load_model(path, tokenizer=object())
        params = sum(p.numel() for m in (c.unet, c.vae, c.text_encoder) for p in m.parameters())
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
            {"mode": mode, "wall_s": wall, "peak_above_base_mib": (peak - base) / 1024, "params": params}
        )
    )


def _run(mode: str, path: Path) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, __file__, "--child", mode, str(path)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> int:
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


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit(main())
