"""`voidprompt txt2img/img2img --explain` and `voidprompt explain IMAGE.png` on the tiny checkpoint:
the explanation file and the sheet beside each picture, the same pictures as without the capture, a
picture regenerated from its own infotext with no pixel difference, and one line for each bad input."""

from __future__ import annotations

import hashlib
import html
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from voidprompt.cli import main
from voidprompt.explain.record import ExplainOptions
from voidprompt.explain.store import load_explanation
from voidprompt.imagemeta import read_infotext, save_image
from voidprompt.pipeline.engine import Engine
from voidprompt.request import GenerationRequest

PROMPT = "a red <ball>, (blue cube:1.2)"
NEGATIVE = "lowres & blurry"


def _txt2img(tiny_checkpoint: Path, out: Path, *extra: str) -> list[str]:
    argv = [
        "txt2img", "--model", str(tiny_checkpoint), "--prompt", PROMPT, "--negative-prompt", NEGATIVE,
        "--width", "32", "--height", "32", "--steps", "3", "--seed", "11", "--out", str(out), *extra,
    ]  # fmt: skip
    assert main(argv) == 0
    return argv


def _one_error_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 1
    assert "Traceback" not in captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("voidprompt: error: ")
    return lines[0]


@pytest.fixture(scope="module")
def explained(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A picture made with --explain --explain-tokens --explain-previews 1, its two files beside it."""
    # A module fixture runs before the per-test autouse fixture that pins torch to one thread; the
    # maps' float sums depend on the thread count, and the regeneration test compares them exactly.
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("explained")
    _txt2img(tiny_checkpoint, out, "--explain", "--explain-tokens", "--explain-previews", "1")
    (picture,) = out.glob("*.png")
    return picture


def test_txt2img_explain_writes_the_file_and_the_sheet(
    explained: Path, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    data = explained.with_name(explained.stem + ".explain.npz")
    sheet = explained.with_name(explained.stem + ".explain.html")
    assert data.is_file() and sheet.is_file()
    explanation = load_explanation(data)
    keys = [tag.key for tag in explanation.tags]
    assert keys == [
        "positive:a red < ball >",
        "positive:blue cube",
        "negative:lowres & blurry",
    ]
    assert [tag.weight for tag in explanation.tags] == pytest.approx([1.0, 1.2, 1.0])
    assert explanation.token_maps is not None and len(explanation.tokens) > 0  # --explain-tokens
    # --explain-previews 1: a preview of every call of Euler a's three steps.
    assert [p.call for p in explanation.previews] == [0, 1, 2]
    page = sheet.read_text(encoding="utf-8")
    for tag in explanation.tags:
        assert html.escape(tag.label) in page
    assert "<ball>" not in page and page.count('<img class="tag" ') == len(explanation.tags)
    # The capture does not change the picture.
    plain = tmp_path / "plain"
    _txt2img(tiny_checkpoint, plain)
    (again,) = plain.glob("*.png")
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(explained)))
    assert sorted(p.name for p in plain.iterdir()) == [again.name]  # no explanation without --explain


def test_img2img_explain(tiny_checkpoint: Path, explained: Path, tmp_path: Path) -> None:
    out = tmp_path / "i2i"
    argv = [
        "img2img", "--model", str(tiny_checkpoint), "--init-image", str(explained), "--prompt", "a cube",
        "--width", "32", "--height", "32", "--steps", "4", "--denoising-strength", "0.5", "--seed", "3",
        "--out", str(out), "--explain-previews", "2",
    ]  # fmt: skip
    assert main(argv) == 0
    (picture,) = out.glob("*.png")
    explanation = load_explanation(out / f"{picture.stem}.explain.npz")
    # Strength 0.5 of 4 steps runs int(0.5 * 4) + 1 = 3 steps (A1111's t_enc + 1); every 2nd call and
    # the last are stored.
    assert len(explanation.calls) == 3 and [p.call for p in explanation.previews] == [0, 2]
    assert (out / f"{picture.stem}.explain.html").is_file()


def test_explain_regenerates_the_picture_found_by_its_hash(
    explained: Path, tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Another file name than the infotext's "Model": only the hash can find it.
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(tiny_checkpoint, models / "renamed.safetensors")
    work = tmp_path / "work"
    work.mkdir()
    picture = Path(shutil.copy(explained, work / explained.name))
    capsys.readouterr()
    assert main(["explain", str(picture), "--ckpt-dir", str(models), "--previews", "1", "--tokens"]) == 0
    captured = capsys.readouterr()
    assert "warning" not in captured.err  # progress lines only
    assert f"{picture}: largest pixel difference from {picture.name}: 0" in captured.out.splitlines()
    data = work / f"{picture.stem}.explain.npz"
    sheet = work / f"{picture.stem}.explain.html"
    assert captured.out.splitlines()[-2:] == [str(data), str(sheet)]
    # The same capture as the one made with the picture.
    first = load_explanation(explained.with_name(explained.stem + ".explain.npz"))
    again = load_explanation(data)
    assert [t.key for t in again.tags] == [t.key for t in first.tags]
    assert np.array_equal(again.tag_maps, first.tag_maps, equal_nan=True)
    assert again.token_maps is not None and first.token_maps is not None
    assert np.array_equal(again.token_maps, first.token_maps, equal_nan=True)
    assert [p.call for p in again.previews] == [p.call for p in first.previews]
    pairs = zip(again.previews, first.previews, strict=True)
    assert all(np.array_equal(a.combined, b.combined) for a, b in pairs)
    page = sheet.read_text(encoding="utf-8")
    assert page.count('<img class="tag" ') == len(first.tags)
    assert html.escape(read_infotext(picture)[0] or "") in page


def test_explain_reports_a_picture_that_differs_and_another_model(
    explained: Path, tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    infotext, _ = read_infotext(explained)
    pixels = np.asarray(Image.open(explained).convert("RGB")).copy()
    pixels[5, 7, 1] = (int(pixels[5, 7, 1]) + 9) % 256 if pixels[5, 7, 1] < 200 else pixels[5, 7, 1] - 9
    its_hash = hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()[:10]
    assert f"Model hash: {its_hash}," in (infotext or "")
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", (infotext or "").replace(its_hash, "0123456789"))
    changed = tmp_path / "changed.png"
    Image.fromarray(pixels).save(changed, pnginfo=info)
    out = tmp_path / "sheets"
    capsys.readouterr()
    assert main(["explain", str(changed), "--model", str(tiny_checkpoint), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert f"{changed}: largest pixel difference from changed.png: 9" in captured.out.splitlines()
    differs, other_model = [line for line in captured.err.splitlines() if "warning" in line]
    assert differs.startswith("voidprompt: warning: ") and "not the file's" in differs
    assert (
        other_model
        == f"voidprompt: warning: {changed}: the model's hash is {its_hash}, the infotext's 0123456789"
    )
    assert sorted(p.name for p in out.iterdir()) == ["changed.explain.html", "changed.explain.npz"]
    assert load_explanation(out / "changed.explain.npz").token_maps is None  # no --tokens


def _png_with(path: Path, infotext: str | None) -> Path:
    info = PngImagePlugin.PngInfo()
    if infotext is not None:
        info.add_text("parameters", infotext)
    Image.new("RGB", (32, 32), "gray").save(path, pnginfo=info)
    return path


def test_explain_errors_are_one_line(
    tmp_path: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    params = "Steps: 3, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 32x32"
    empty = tmp_path / "empty"
    empty.mkdir()

    line = _one_error_line(capsys, ["explain", str(_png_with(tmp_path / "bare.png", None))])
    assert "bare.png: no generation parameters" in line

    line = _one_error_line(
        capsys,
        ["explain", str(_png_with(tmp_path / "nohash.png", f"a cat\n{params}")), "--ckpt-dir", str(empty)],
    )
    assert "names no model hash" in line and "--model" in line

    hashed = _png_with(tmp_path / "hashed.png", f"a cat\n{params}, Model hash: 0123abcdef, Model: gone")
    line = _one_error_line(capsys, ["explain", str(hashed), "--ckpt-dir", str(empty)])
    assert "0123abcdef" in line and str(empty) in line and "--model" in line

    # A file of the infotext's model name but another hash (retrained, re-saved) is named in the line.
    models = tmp_path / "models"
    models.mkdir()
    namesake = Path(shutil.copy(tiny_checkpoint, models / "gone.safetensors"))
    line = _one_error_line(capsys, ["explain", str(hashed), "--ckpt-dir", str(models)])
    its_hash = hashlib.sha256(namesake.read_bytes()).hexdigest()[:10]
    assert f"0123abcdef in {models}, " in line and f"({namesake} has the hash {its_hash})" in line

    img2img = _png_with(tmp_path / "i2i.png", f"a cat\n{params}, Denoising strength: 0.5")
    line = _one_error_line(capsys, ["explain", str(img2img), "--model", str(tiny_checkpoint)])
    assert "img2img picture cannot be regenerated" in line

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    line = _one_error_line(capsys, ["explain", str(broken)])
    assert "broken.png" in line

    line = _one_error_line(capsys, ["explain", str(tmp_path / "missing.png")])
    assert "missing.png" in line
    # Nothing was written for any of them.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["bare.png", "nohash.png", "hashed.png", "i2i.png", "broken.png", "empty", "models"]
    )


def test_a_negative_preview_interval_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["txt2img", "--explain-previews", "-1"])
    assert exit_info.value.code == 2
    assert "give a whole number of steps" in capsys.readouterr().err


def test_explain_regenerates_a_hires_fix_picture(
    tiny_engine: Engine, tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    request = GenerationRequest(
        prompt="a cube, (red:1.3)", seed=4, steps=3, width=32, height=32, enable_hr=True, hr_scale=2,
        hr_upscaler="Latent", hr_second_pass_steps=2, denoising_strength=0.5,
    )  # fmt: skip
    made = tiny_engine.generate(request)
    picture = save_image(made.images[0], tmp_path / "hires.png", made.infotexts[0])
    assert "Hires upscale: 2" in made.infotexts[0]
    capsys.readouterr()
    assert main(["explain", str(picture), "--model", str(tiny_checkpoint), "--previews", "1"]) == 0
    captured = capsys.readouterr()
    assert f"{picture}: largest pixel difference from hires.png: 0" in captured.out.splitlines()
    explanation = load_explanation(tmp_path / "hires.explain.npz")
    assert explanation.windows == ("all", "early", "middle", "late", "hires")
    assert [c.pass_name for c in explanation.calls] == ["first"] * 3 + ["hires"] * 2
    page = (tmp_path / "hires.explain.html").read_text(encoding="utf-8")
    # Each tag's small maps: its three first-pass windows and the hires pass.
    assert page.count('<img class="tag-window" ') == 4 * len(explanation.tags)
    assert "<tr><td>hires</td>" in page and "hires call 2" in page
    # The first pass's previews are stored at the hires latent size, each cell repeated (nearest).
    captured_first = tiny_engine.generate(request, explain=ExplainOptions(preview_every=1)).explanations[0]
    assert [p.call for p in explanation.previews] == [0, 1, 2, 3, 4]
    assert {p.combined.shape for p in explanation.previews} == {(32, 32, 3)}
    small = captured_first.previews[0].combined
    assert small.shape == (16, 16, 3)
    assert np.array_equal(explanation.previews[0].combined, small.repeat(2, axis=0).repeat(2, axis=1))
    assert np.array_equal(explanation.previews[4].combined, captured_first.previews[4].combined)
