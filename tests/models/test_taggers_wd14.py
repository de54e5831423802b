"""WD14 taggers: the tensor handed to onnxruntime, the tag list, thresholds and categories."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from voidprompt.models.taggers.result import TaggerError, TagResult
from voidprompt.models.taggers.wd14 import WD14Tagger, prepare_picture
from voidprompt.testing.tiny_taggers import write_identity_wd14

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def _tagger(tmp_path: Path, side: int = 2, categories: list[int] | None = None) -> WD14Tagger:
    categories = categories or [0] * (side * side * 3)
    return WD14Tagger(write_identity_wd14(tmp_path / "wd-tiny", side, categories), threads=1)


def test_a_wide_picture_is_padded_on_white_below_and_reversed_to_bgr(tmp_path: Path) -> None:
    picture = Image.new("RGB", (2, 1))
    picture.putpixel((0, 0), RED)
    picture.putpixel((1, 0), BLUE)
    tagger = _tagger(tmp_path)
    # Square side 2: the picture's one row at the top ((2 - 1) // 2 = 0), a white row below; BGR.
    expected = np.array([[[0, 0, 255], [255, 0, 0]], [[255, 255, 255], [255, 255, 255]]], dtype=np.float32)
    handed = tagger.predict(prepare_picture(picture, tagger.side))[0] * 255
    np.testing.assert_allclose(handed.reshape(2, 2, 3), expected, atol=1e-4)


def test_a_tall_picture_is_centred_between_white_columns(tmp_path: Path) -> None:
    picture = Image.new("RGB", (1, 3), RED)
    pixels = prepare_picture(picture, 3)
    assert pixels.shape == (1, 3, 3, 3) and pixels.dtype == np.float32
    assert pixels[0, :, 1].tolist() == [[0, 0, 255]] * 3
    assert pixels[0, :, 0].tolist() == [[255, 255, 255]] * 3 == pixels[0, :, 2].tolist()


def test_the_square_is_resized_bicubic_to_the_model_side(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    picture = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    tagger = _tagger(tmp_path)
    expected = np.asarray(picture.resize((2, 2), Image.Resampling.BICUBIC), dtype=np.float32)[:, :, ::-1]
    handed = tagger.predict(prepare_picture(picture, tagger.side))[0] * 255
    np.testing.assert_allclose(handed.reshape(2, 2, 3), expected, atol=1e-3)


def test_transparency_is_flattened_on_white() -> None:
    picture = Image.new("RGBA", (2, 2), (10, 20, 30, 255))
    picture.putpixel((1, 1), (10, 20, 30, 0))
    pixels = prepare_picture(picture, 2)
    assert pixels[0, 0, 0].tolist() == [30, 20, 10]
    assert pixels[0, 1, 1].tolist() == [255, 255, 255]


def test_categories_and_thresholds(tmp_path: Path) -> None:
    categories = [9, 9, 4, 4, 0, 0, 0, 0, 0, 0, 0, 0]
    tagger = _tagger(tmp_path, categories=categories)
    probabilities = np.array([0.7, 0.1, 0.86, 0.85, 0.36, 0.35, 0.9, 0.0, 0.0, 0.0, 0.0, 0.0])
    result = tagger.result(probabilities)
    # Ratings all reported; characters strictly above 0.85, general strictly above 0.35.
    assert result.rating == pytest.approx({"tag_0": 0.7, "tag_1": 0.1})
    assert result.character == pytest.approx({"tag_2": 0.86})
    assert result.general == pytest.approx({"tag_4": 0.36, "tag_6": 0.9})
    assert result.tags() == ("tag_2", "tag_6", "tag_4")
    assert result.rating_tag() == "tag_0"
    lower = tagger.result(probabilities, general_threshold=0.3, character_threshold=0.8)
    assert set(lower.general) == {"tag_4", "tag_5", "tag_6"} and set(lower.character) == {"tag_2", "tag_3"}


def test_tag_runs_the_whole_path(tmp_path: Path) -> None:
    tagger = _tagger(tmp_path)
    # A white picture: every input value is 255, so every probability is 1.
    result = tagger.tag(Image.new("RGB", (5, 3), WHITE))
    assert len(result.general) == 12 and all(p == pytest.approx(1.0) for p in result.general.values())


def test_caption_spaces_escapes_and_keeps_emoticons() -> None:
    result = TagResult(general={"open_mouth": 0.9, "^_^": 0.8, "hat_(object)": 0.7}, character={"miku": 0.95})
    assert result.caption() == r"miku, open mouth, ^_^, hat \(object\)"


def test_a_tag_list_of_another_length_is_refused(tmp_path: Path) -> None:
    folder = write_identity_wd14(tmp_path / "wd", 2, [0] * 12)
    (folder / "selected_tags.csv").write_text("tag_id,name,category,count\n0,a,0,1\n", encoding="utf-8")
    with pytest.raises(TaggerError, match="1 tags"):
        WD14Tagger(folder)


def test_a_folder_without_the_model_names_both_files(tmp_path: Path) -> None:
    with pytest.raises(TaggerError, match=r"model\.onnx and selected_tags\.csv"):
        WD14Tagger(tmp_path)
