"""describe_checkpoint: counts, hashes and the VAE weights hash, derived independently."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from voidprompt.models.convert import POSITION_IDS_KEY
from voidprompt.models.detect import ModelFamily
from voidprompt.models.info import describe_checkpoint
from voidprompt.testing.fake_checkpoints import (
    tiny_sd1_state_dict,
    tiny_vae_state_dict,
    write_tiny_checkpoint,
)


def _expected_vae_hash(vae: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(vae):
        h.update(key.encode() + b"\0" + str(tuple(vae[key].shape)).encode() + b"\0")
        h.update(vae[key].half().numpy().tobytes())  # little-endian on every machine we run on
    return h.hexdigest()[:10]


def test_summary_of_tiny_checkpoint(tmp_path: Path) -> None:
    sd = tiny_sd1_state_dict(0)
    sd[POSITION_IDS_KEY] = sd[POSITION_IDS_KEY].float()
    path = write_tiny_checkpoint(tmp_path / "m.safetensors", state_dict=sd)
    s = describe_checkpoint(path)
    assert s.family is ModelFamily.SD1 and s.container == "safetensors"
    prefixes = {
        "unet": "model.diffusion_model.",
        "vae": "first_stage_model.",
        "text_encoder": "cond_stage_model.",
    }
    for part, prefix in prefixes.items():
        want = sum(
            v.numel() for k, v in sd.items() if k.startswith(prefix) and not k.endswith("position_ids")
        )
        assert s.parameters[part] == want
    data = path.read_bytes()
    assert s.sha256 == hashlib.sha256(data).hexdigest()
    assert s.position_ids_damage is not None and "float32" in s.position_ids_damage
    vae = {
        k.removeprefix("first_stage_model."): v for k, v in sd.items() if k.startswith("first_stage_model.")
    }
    assert s.vae_hash == _expected_vae_hash(vae)
    text = s.format()
    assert s.short_hash in text and "DAMAGED" in text and "SD1.x" in text


def test_vae_hash_same_for_fp16_copy_and_bare_vae_file(tmp_path: Path) -> None:
    vae = tiny_vae_state_dict(seed=3)
    torch.save({"state_dict": vae}, tmp_path / "a.vae.pt")
    from safetensors.torch import save_file

    save_file({k: v.half() for k, v in vae.items()}, str(tmp_path / "a.vae.safetensors"))
    a = describe_checkpoint(tmp_path / "a.vae.pt")
    b = describe_checkpoint(tmp_path / "a.vae.safetensors")
    assert a.family is None and "VAE file" in (a.family_error or "")
    assert a.vae_hash == b.vae_hash == _expected_vae_hash(vae)


def test_known_vae_file_is_named_by_its_published_sha256(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from voidprompt.models import info

    vae = tiny_vae_state_dict(seed=4)
    torch.save({"state_dict": vae}, tmp_path / "x.vae.pt")
    digest = hashlib.sha256((tmp_path / "x.vae.pt").read_bytes()).hexdigest()
    assert describe_checkpoint(tmp_path / "x.vae.pt").vae_name is None
    monkeypatch.setitem(info.KNOWN_VAE_FILES, digest, "test vae")
    assert describe_checkpoint(tmp_path / "x.vae.pt").vae_name == "test vae"
    # NovelAI's animevae.pt, as its publishers list it.
    assert info.KNOWN_VAE_FILES[
        "f921fb3f29891d2a77a6571e56b8b5052420d2884129517a333c60b1b4816cdf"
    ].startswith("animevae")


def test_summary_of_tiny_sdxl_files(tmp_path: Path) -> None:
    from voidprompt.testing.fake_checkpoints import tiny_sdxl_state_dict, write_tiny_sdxl_checkpoint

    prefixes = {
        "unet": "model.diffusion_model.",
        "vae": "first_stage_model.",
        "text_encoder": "conditioner.embedders.0.transformer.",
        "text_encoder_2": "conditioner.embedders.1.model.",
    }
    sd = tiny_sdxl_state_dict(0)
    sd["v_pred"] = torch.tensor([])
    s = describe_checkpoint(write_tiny_sdxl_checkpoint(tmp_path / "xl.safetensors", state_dict=sd))
    assert s.family is ModelFamily.SDXL and s.prediction == "v" and not s.zero_terminal_snr
    want = {
        part: sum(
            v.numel()
            for k, v in sd.items()
            if k.startswith(prefix) and not k.endswith(("position_ids", "logit_scale"))
        )
        for part, prefix in prefixes.items()
    }
    assert s.parameters == want
    assert s.position_ids_damage is None
    text = s.format()
    assert "family:        SDXL" in text and "prediction:    v-prediction" in text

    refiner = tiny_sdxl_state_dict(0, refiner=True)
    r = describe_checkpoint(write_tiny_sdxl_checkpoint(tmp_path / "refiner.safetensors", state_dict=refiner))
    assert r.family is ModelFamily.SDXL_REFINER and r.prediction == "eps"
    assert set(r.parameters) == {"unet", "vae", "text_encoder_2"}
    assert r.parameters["text_encoder_2"] == sum(
        v.numel()
        for k, v in refiner.items()
        if k.startswith("conditioner.embedders.0.model.") and not k.endswith("logit_scale")
    )
    assert "prediction" not in r.format()
