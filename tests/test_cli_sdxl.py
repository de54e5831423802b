"""`voidprompt txt2img` on an SDXL file, with an SDXL textual-inversion file (A1111's clip_l / clip_g pair)
in --embeddings-dir: each text encoder takes its own tensor and the infotext names the embedding."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file

from voidprompt.cli import main
from voidprompt.models.hashes import sha256_file
from voidprompt.testing.fake_checkpoints import write_tiny_sdxl_checkpoint


def test_txt2img_on_sdxl_with_an_sdxl_embedding(tmp_path: Path) -> None:
    model = write_tiny_sdxl_checkpoint(tmp_path / "tiny-sdxl.safetensors")
    embeddings = tmp_path / "embeddings"
    embeddings.mkdir()
    gen = torch.Generator().manual_seed(0)
    # The tiny model's CLIP-L and bigG are both 32 wide; two vectors each.
    pair = {"clip_l": torch.randn(2, 32, generator=gen), "clip_g": torch.randn(2, 32, generator=gen)}
    save_file(pair, str(embeddings / "shinyhat.safetensors"))
    out = tmp_path / "out"
    argv = [
        "txt2img", "--model", str(model), "--embeddings-dir", str(embeddings), "--prompt", "a shinyhat",
        "--width", "32", "--height", "32", "--steps", "2", "--seed", "3", "--out", str(out),
    ]
    assert main(argv) == 0
    (picture,) = sorted(out.glob("*.png"))
    infotext = Image.open(picture).info["parameters"]
    # A1111 wraps CLIP-L and bigG each in its own recording encoder, so one call records the name
    # twice (as in A1111's SDXL pictures: "negativeXL_D: fff5d51ab655, negativeXL_D: fff5d51ab655").
    item = f"shinyhat: {sha256_file(embeddings / 'shinyhat.safetensors')[:12]}"
    assert f'TI hashes: "{item}, {item}"' in infotext
    # Without the folder the word is plain text: another picture.
    plain = tmp_path / "plain"
    assert main([*argv[:3], *argv[5:-1], str(plain)]) == 0
    (other,) = sorted(plain.glob("*.png"))
    assert "TI hashes" not in Image.open(other).info["parameters"]
    assert Image.open(other).tobytes() != Image.open(picture).tobytes()
