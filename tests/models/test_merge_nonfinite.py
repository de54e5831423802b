"""Merging inputs that hold NaN or inf: a warning naming the tensors (the first few and the count),
or with ``strict`` / ``--strict`` a one-line refusal and no file."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from voidprompt.files import TEMP_PREFIX
from voidprompt.models.merge import MergeError, MergeMethod, MergeOptions, merge_checkpoints
from voidprompt.models.networks_cli import main as cli_main
from voidprompt.testing.fake_checkpoints import tiny_sd1_state_dict

CONV = "model.diffusion_model.input_blocks.0.0.weight"  # 32x4x3x3 = 1152 values
TIME = "model.diffusion_model.time_embed.0.bias"  # 128 values


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VOIDPROMPT_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def sds() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    return tiny_sd1_state_dict(0), tiny_sd1_state_dict(1)


def _write(path: Path, sd: dict[str, torch.Tensor], **changes: torch.Tensor) -> Path:
    save_file({k: changes.get(k, v) for k, v in sd.items()}, str(path))
    return path


def _poisoned(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    conv = sd[CONV].clone()
    conv[0, 0, 0, 0] = float("nan")
    time = sd[TIME].clone()
    time[3], time[4] = float("inf"), float("-inf")
    return {CONV: conv, TIME: time}


def test_nan_and_inf_weights_warn_and_name_the_tensors(tmp_path: Path, sds, caplog) -> None:  # type: ignore[no-untyped-def]
    a = _write(tmp_path / "a.safetensors", sds[0], **_poisoned(sds[0]))
    b = _write(tmp_path / "b.safetensors", sds[1])
    out = tmp_path / "out.safetensors"
    with caplog.at_level(logging.WARNING, logger="voidprompt.models.merge"):
        result = merge_checkpoints(a, b, out=out, options=MergeOptions(MergeMethod.WEIGHTED_SUM))
    assert len(result.warnings) == 1
    warning = result.warnings[0]
    assert warning.startswith("2 tensors hold NaN or inf values: ")
    assert f"A '{CONV}' (1 of 1152 values)" in warning and f"A '{TIME}' (2 of 128 values)" in warning
    assert "output" not in warning  # the merged copies of the same tensors are not counted twice
    assert warning in caplog.text
    merged = load_file(str(out))  # written anyway: the user was told
    assert torch.isnan(merged[CONV][0, 0, 0, 0]) and not bool(torch.isfinite(merged[TIME][3:5]).any())


def test_the_warning_shows_five_tensors_and_the_count(tmp_path: Path, sds) -> None:  # type: ignore[no-untyped-def]
    keys = [k for k in sds[1] if k.startswith("model.diffusion_model.") and sds[1][k].is_floating_point()][:7]
    bad = {k: torch.full_like(sds[1][k], float("nan")) for k in keys}
    a = _write(tmp_path / "a.safetensors", sds[0])
    b = _write(tmp_path / "b.safetensors", sds[1], **bad)
    result = merge_checkpoints(a, b, out=tmp_path / "o.safetensors", options=MergeOptions(multiplier=0.0))
    (warning,) = result.warnings
    assert warning.startswith("7 tensors hold NaN or inf values: ") and " and 2 more;" in warning
    assert warning.count("B '") == 5


def test_float16_overflow_of_finite_inputs_is_named(tmp_path: Path, sds) -> None:  # type: ignore[no-untyped-def]
    big = torch.full_like(sds[0][TIME], 1e5)  # finite in float32, inf in float16 (max 65504)
    a = _write(tmp_path / "a.safetensors", sds[0], **{TIME: big})
    b = _write(tmp_path / "b.safetensors", sds[1], **{TIME: big})
    result = merge_checkpoints(
        a, b, out=tmp_path / "o.safetensors", options=MergeOptions(multiplier=0.5, fp16=True)
    )
    assert result.warnings == [
        f"1 tensor holds NaN or inf values: output '{TIME}' (128 of 128 values); a model with them "
        "makes black images (--strict refuses to write it)."
    ]


def test_strict_refuses_and_writes_nothing(tmp_path: Path, sds, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    a = _write(tmp_path / "a.safetensors", sds[0], **_poisoned(sds[0]))
    b = _write(tmp_path / "b.safetensors", sds[1])
    out = tmp_path / "out.safetensors"
    with pytest.raises(MergeError, match="--strict refuses non-finite weights and nothing was written"):
        merge_checkpoints(a, b, out=out, options=MergeOptions(strict=True))
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(TEMP_PREFIX)]

    rc = cli_main(["merge", "--a", str(a), "--b", str(b), "--strict", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and err.startswith("error: A '")
    assert "is NaN or inf; --strict refuses" in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(TEMP_PREFIX)]

    rc = cli_main(["merge", "--a", str(a), "--b", str(b), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 0 and out.exists()
    assert err.startswith("warning: 2 tensors hold NaN or inf values: ")
