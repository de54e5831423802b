"""``voidprompt tag IMAGE``: the interrogate API's caption on the command line, or every tag as JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from voidprompt.cli import main
from voidprompt.models.taggers import deepdanbooru as ddb
from voidprompt.pipeline.interrogate import DeepDanbooruTagger
from voidprompt.testing.tiny_taggers import tiny_deepdanbooru, write_deepdanbooru, write_identity_wd14


def test_a_wd14_tagger_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = write_identity_wd14(tmp_path / "wd-tiny", 1, [0, 0, 4])
    picture = tmp_path / "p.png"
    Image.new("RGB", (1, 1), (255, 230, 0)).save(picture)
    # The tagger reads (B, G, R) / 255 = (0, 0.902, 1): tag_2 a character above 0.85, tag_1 general.
    assert main(["tag", str(picture), "--tagger", str(folder)]) == 0
    assert capsys.readouterr().out == "tag 2, tag 1\n"
    assert main(["tag", str(picture), "--tagger", str(folder), "--threshold", "0.95", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["caption"] == "tag 2" and record["general"] == {}
    assert record["character"] == pytest.approx({"tag_2": 1.0})


def test_deepdanbooru_file_and_several_pictures(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tags = ["1girl", "hat_(object)", "rating:safe", "solo"]
    net = tiny_deepdanbooru(tags, stem=4, seed=7)
    model = write_deepdanbooru(tmp_path / "model-resnet_custom_v3.pt", net)
    paths = []
    for i, colour in enumerate([(200, 30, 90), (10, 240, 20)]):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (50, 30), colour).save(paths[-1])
    assert main(["tag", *map(str, paths), "--tagger", str(model)]) == 0
    tagger = DeepDanbooruTagger(net)
    expected = [f"{p}: {ddb.caption(tagger.tag(Image.open(p)))}" for p in paths]
    assert capsys.readouterr().out.splitlines() == expected


def test_a_missing_tagger_says_where_to_place_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    picture = tmp_path / "p.png"
    Image.new("RGB", (4, 4)).save(picture)
    assert main(["tag", str(picture), "--tagger", str(tmp_path / "none.pt")]) == 1
    assert "model-resnet_custom_v3.pt" in capsys.readouterr().err


def test_the_onnx_file_stands_for_its_folder_and_a_wrong_path_names_both_kinds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = write_identity_wd14(tmp_path / "wd-tiny", 1, [0, 0, 4])
    picture = tmp_path / "p.png"
    Image.new("RGB", (1, 1), (255, 230, 0)).save(picture)
    assert main(["tag", str(picture), "--tagger", str(folder / "model.onnx")]) == 0
    assert capsys.readouterr().out == "tag 2, tag 1\n"
    assert main(["tag", str(picture), "--tagger", str(tmp_path / "wd-missing")]) == 1
    err = capsys.readouterr().err
    assert "no tagger there" in err and "model.onnx and selected_tags.csv" in err


def test_a_threshold_outside_0_1_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = write_identity_wd14(tmp_path / "wd-tiny", 1, [0, 0, 4])
    picture = tmp_path / "p.png"
    Image.new("RGB", (1, 1)).save(picture)
    assert main(["tag", str(picture), "--tagger", str(folder), "--threshold", "35"]) == 1
    assert "threshold 35.0: give a probability from 0 to 1" in capsys.readouterr().err
