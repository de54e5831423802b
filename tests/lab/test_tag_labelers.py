"""Tagger labelers: [labels] rules read and checked, tags mapped onto classes (first match wins,
then the fallback), and a tiny study pre-labeled by a WD14 tagger."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest
from lab_helpers import quiet, study_text
from PIL import Image

from voidprompt.errors import StudyError
from voidprompt.lab.catalog import Catalog
from voidprompt.lab.labels import label_scheme
from voidprompt.lab.plugins import Label, Plugins
from voidprompt.lab.run import run_study
from voidprompt.lab.schema import LabelOptions, TagRule
from voidprompt.lab.study import parse_study
from voidprompt.lab.tag_labelers import DeepDanbooruLabeler, WD14Labeler, label_from_tags
from voidprompt.models.taggers.result import TagResult
from voidprompt.models.taggers.wd14 import prepare_picture
from voidprompt.testing.tiny_taggers import write_identity_wd14

REPO = Path(__file__).resolve().parents[2]
CLASSES = '["Pattern", "Object or Scenery", "Malformed human", "Legit human"]'
RULES = """
[labels.rules]
Pattern = ["no_humans", "pattern"]
"Malformed human" = [["bad_anatomy"], ["extra_arms"]]
"Legit human" = [["1girl"], ["1boy"]]
"""


def _labels(tmp_path: Path, body: str) -> LabelOptions:
    text = study_text(tmp_path / "m.safetensors", labels=body)
    return parse_study(text, tmp_path / "studies" / "t.toml").labels


def test_rules_are_read_in_file_order(tmp_path: Path) -> None:
    body = f'labeler = "wd14"\ntagger = "wd/x"\nclasses = {CLASSES}\nfallback = "Object or Scenery"\n{RULES}'
    options = _labels(tmp_path, body)
    assert options.rules == (
        TagRule("Pattern", (("no_humans", "pattern"),)),
        TagRule("Malformed human", (("bad_anatomy",), ("extra_arms",))),
        TagRule("Legit human", (("1girl",), ("1boy",))),
    )
    assert options.fallback == "Object or Scenery"
    # Relative to the study file's folder.
    assert options.tagger == tmp_path / "studies" / "wd" / "x"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (f'labeler = "wd14"\nclasses = {CLASSES}\n[labels.rules]\nPatern = ["x"]',
         r"\[labels\] rules: 'Patern' is not one of \[labels\] classes .*did you mean 'Pattern'"),
        (f'labeler = "wd14"\nclasses = {CLASSES}\nfallback = "Other"', r"\[labels\] fallback: 'Other'"),
        ('labeler = "wd14"\n[labels.rules]\nPattern = "no_humans"',
         r"\[labels\] rules 'Pattern': 'no_humans' is not a list of tags"),
        ('labeler = "wd14"\n[labels.rules]\nPattern = [["a"], 3]', r"is not a list of tags"),
        ('labeler = "none"\nfallback = "Pattern"', r'\[labels\] fallback: is read by a tagger labeler'),
        ('labeler = "wd14"\nthreshold = 1.5', r"\[labels\] threshold: 1.5: write a probability from 0 to 1"),
    ],
)  # fmt: skip
def test_bad_rules_say_what_to_write(tmp_path: Path, body: str, message: str) -> None:
    with pytest.raises(StudyError, match=message):
        _labels(tmp_path, body)


def test_first_matching_rule_wins_then_the_fallback() -> None:
    options = LabelOptions(
        rules=(
            TagRule("Pattern", (("no_humans", "pattern"),)),
            TagRule("Legit human", (("1girl",), ("rating:general",))),
        ),
        fallback="Object or Scenery",
    )
    both = TagResult(
        general={"no_humans": 0.9, "pattern": 0.6, "1girl": 0.5}, rating={"general": 0.8, "explicit": 0.1}
    )
    label = label_from_tags(both, options, "wd14")
    assert label.label_class == "Pattern"
    assert label.tags == ("no_humans", "pattern", "1girl", "rating:general")
    assert label.measures == {"wd14_rating_general": 0.8, "wd14_rating_explicit": 0.1, "wd14_tags": 3.0}
    # Only one tag of the Pattern list: the next rule, here through the rating.
    one = TagResult(general={"no_humans": 0.9}, rating={"general": 0.7})
    assert label_from_tags(one, options, "wd14") == Label(
        "Legit human", ("no_humans", "rating:general"), {"wd14_rating_general": 0.7, "wd14_tags": 1.0}
    )
    nothing = label_from_tags(TagResult(general={"scenery": 0.9}), options, "wd14")
    assert nothing.label_class == "Object or Scenery"
    safe = TagResult(general={"1girl": 0.9}, rating={"rating:safe": 0.9})
    ddb = label_from_tags(safe, options, "deepdanbooru")
    assert ddb.tags == ("1girl", "rating:safe") and ddb.measures["deepdanbooru_rating_safe"] == 0.9


def test_classes_come_from_the_rules_without_a_classes_key() -> None:
    options = LabelOptions(
        labeler="wd14",
        tagger=Path("x"),
        rules=(TagRule("B", (("b",),)), TagRule("A", (("a",),))),
        fallback="C",
    )
    assert tuple(WD14Labeler(options).classes) == ("B", "A", "C")


def test_wd14_needs_its_tagger_and_deepdanbooru_has_a1111s_default(tmp_path: Path) -> None:
    with pytest.raises(StudyError, match='add tagger = "path/to/wd14-folder"'):
        WD14Labeler(LabelOptions(labeler="wd14"))
    assert DeepDanbooruLabeler().path == Path("models/torch_deepdanbooru/model-resnet_custom_v3.pt")
    with pytest.raises(StudyError, match="DeepDanbooru has no character tags"):
        DeepDanbooruLabeler(LabelOptions(labeler="deepdanbooru", character_threshold=0.9))


def test_a_labeler_that_reads_no_rules_refuses_them() -> None:
    class Plain:
        name, classes = "plain", ("x",)

        def label(self, image: Image.Image) -> Label:
            return Label("x")

    plugins = Plugins(labelers={"plain": Plain})
    with pytest.raises(StudyError, match=r"\[labels\] rules: the labeler 'plain' does not read it"):
        plugins.labeler("plain", LabelOptions(labeler="plain", rules=(TagRule("x", (("a",),)),)))


def test_the_entry_points_name_the_labelers() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    labelers = pyproject["project"]["entry-points"]["voidprompt.labelers"]
    assert labelers["wd14"] == "voidprompt.lab.tag_labelers:WD14Labeler"
    assert labelers["deepdanbooru"] == "voidprompt.lab.tag_labelers:DeepDanbooruLabeler"


def test_an_entry_point_labeler_gets_the_studys_labels() -> None:
    from importlib.metadata import EntryPoint

    from voidprompt.lab.plugins import _deferred

    entry = EntryPoint("wd14", "voidprompt.lab.tag_labelers:WD14Labeler", "voidprompt.labelers")
    plugins = Plugins(labelers={"wd14": _deferred(entry)})
    options = LabelOptions(labeler="wd14", tagger=Path("t"), rules=(TagRule("Pattern", (("a",),)),))
    labeler = plugins.labeler("wd14", options)
    assert isinstance(labeler, WD14Labeler) and labeler.options is options
    assert tuple(labeler.classes) == ("Pattern",)


def test_a_study_prelabeled_by_a_wd14_tagger(tiny_checkpoint: Path, tmp_path: Path) -> None:
    # A 1x1 tagger whose three "tags" are ratings: its probabilities are the picture's mean-ish
    # B, G and R over 255, so the top rating is its strongest channel.
    write_identity_wd14(tmp_path / "wd-tiny", 1, [9, 9, 9])
    labels = (
        'labeler = "wd14"\ntagger = "wd-tiny"\nfallback = "Other"\n'
        '[labels.rules]\nBlue = ["rating:tag_0"]\nGreenish = [["rating:tag_1"], ["rating:tag_2"]]\n'
    )
    study = parse_study(study_text(tiny_checkpoint, sizes="16x16", seeds="2 random", labels=labels),
                        tmp_path / "t.toml")  # fmt: skip
    plugins = Plugins(labelers={"wd14": WD14Labeler})
    assert label_scheme(study, plugins).classes == ("Blue", "Greenish", "Other")
    run_study(study, quiet(study), plugins)
    root = tmp_path / "runs" / "t"
    with Catalog.open(root / "catalog.sqlite", readonly=True) as catalog:
        images = catalog.images()
        assert len(images) == 4
        for image in images:
            label_class, tags = catalog.labels(image["id"])["wd14"]
            measures = catalog.measures(image["id"])
            bgr = prepare_picture(Image.open(root / image["path"]), 1)[0, 0, 0] / 255
            top = int(np.argmax(bgr))
            assert tags == [f"rating:tag_{top}"]
            assert label_class == ("Blue" if top == 0 else "Greenish")
            for i in range(3):
                assert measures[f"wd14_rating_tag_{i}"] == pytest.approx(bgr[i], abs=1e-6)


def test_the_shipped_anime_study_labels_into_the_briefs_classes() -> None:
    path = Path(__file__).resolve().parents[2] / "studies" / "pure-negative-anime.toml"
    study = parse_study(path.read_text(encoding="utf-8"), path)
    jobs = study.expand()
    # 21 design points (4 table sizes, 5 areas, 7 W, 5 CFG) x 64 seeds.
    assert len(jobs) == 21 * 64
    table = {(j.request.width, j.request.height) for j in jobs if j.axis_values["W"] == 0.9}
    assert table == {(512, 512), (576, 768), (1024, 576), (576, 1024)}
    options = study.labels
    assert options.labeler == "wd14"
    assert options.classes == ("Pattern", "Object or Scenery", "Malformed human", "Legit human")

    def label(*tags: str) -> str | None:
        result = TagResult(general={t: 0.9 for t in tags}, rating={"general": 0.8})
        return label_from_tags(result, options, "wd14").label_class

    # The first matching rule in file order wins; nothing matched is the fallback.
    assert label("no_humans", "abstract") == "Pattern"
    assert label("no_humans", "car", "scenery") == "Object or Scenery"
    assert label("1girl", "solo", "bad_hands") == "Malformed human"
    assert label("1girl", "solo", "smile") == "Legit human"
    assert label("flower") == "Object or Scenery"
