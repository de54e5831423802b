"""A1111's "Version" rules (infotext_versions.parse_version / backcompat), owned by infotext.versions.

Two independent references: expected values derived by hand from A1111 1.10's rules (keep the first
two '-'-separated parts when there are more, read the rest as PEP 440, compare with 1.6.0,
v1.7.0-225 and 1.8.0), and ``packaging.version``, the parser A1111 itself calls.
"""

from __future__ import annotations

import itertools
import random

import pytest

from voidprompt.errors import InfotextError
from voidprompt.infotext import (
    DEFAULT_VERSION,
    backcompat_flags,
    check_written_version,
    parse_generation_parameters,
    parse_version,
    request_fields_from_infotext,
    request_fields_from_params,
)
from voidprompt.infotext.versions import V160, V170_TSNR, V180, V180_HR_STYLES

packaging_version = pytest.importorskip("packaging.version")

OLD_TIMELINES = "Old prompt editing timelines"
PAD_V0 = "Pad conds v0"
DOWNCAST = "Downcast alphas_cumprod"
REFINER = "Refiner switch by sampling steps"
ALL_FOUR = {OLD_TIMELINES, PAD_V0, DOWNCAST, REFINER}


def a1111_reading(text: str) -> object | None:
    """What A1111's parse_version returns, with packaging doing the PEP 440 part (None = no switch)."""
    parts = text.split("-")
    if len(parts) >= 3 and parts[0] and parts[1]:
        text = f"{parts[0]}-{parts[1]}"
    try:
        return packaging_version.Version(text)
    except packaging_version.InvalidVersion:
        return None


def _flags_for(version: str) -> set[str]:
    # A prompt with '[', a DDIM sampler and a refiner: every switch whose version rule holds fires.
    got = backcompat_flags({"Version": version, "Prompt": "a [b:c:5]", "Sampler": "DDIM", "Refiner": "r"})
    assert all(value is True for value in got.values())
    return set(got)


# ------------------------------------------------------------------------------ the three named strings

@pytest.mark.parametrize(
    ("version", "normal_form", "flags"),
    [
        # A post-release (post 1, its dev 2) of 1.6.0: above 1.6.0, below v1.7.0-225 and 1.8.0.
        ("1.6.0.post1.dev2", "1.6.0.post1.dev2", {DOWNCAST, REFINER}),
        # Four dash parts: A1111 reads "v1.6.0-RC", the release candidate 0 of 1.6.0, below 1.6.0.
        ("v1.6.0-RC-12-gabc", "1.6.0rc0", ALL_FOUR),
        # Not PEP 440: A1111's parser refuses it, so nothing turns on.
        ("voidprompt-0.1.0", None, set()),
    ],
)
def test_named_versions_follow_a1111(version: str, normal_form: str | None, flags: set[str]) -> None:
    ours = parse_version(version)
    assert (str(ours) if ours is not None else None) == normal_form
    reference = a1111_reading(version)
    assert (str(reference) if reference is not None else None) == normal_form
    assert _flags_for(version) == flags


@pytest.mark.parametrize(
    ("version", "flags"),
    [
        ("1.5.2", ALL_FOUR),
        ("1.6.0rc1", ALL_FOUR),
        ("1.6.0.dev9", ALL_FOUR),
        ("1.5.2+local.7", ALL_FOUR),
        ("1.6", {DOWNCAST, REFINER}),
        ("1.6.0", {DOWNCAST, REFINER}),
        ("v1.6.0-1-gabc", {DOWNCAST, REFINER}),
        ("v1.7.0", {DOWNCAST, REFINER}),
        ("v1.7.0-224-gabcdef1", {DOWNCAST, REFINER}),
        ("v1.7.0-225.dev1", {DOWNCAST, REFINER}),
        ("v1.7.0-225-gabcdef1", {REFINER}),
        ("1.7.9", {REFINER}),
        ("1.8.0.dev5", {REFINER}),
        ("1.8.0rc1", {REFINER}),
        ("1.8.0", set()),
        ("v1.10.1", set()),
        ("1!0.1", set()),
        ("f2.0.1v1.10.1-previous-665-gae278f79", set()),
        ("", set()),
    ],
)
def test_threshold_boundaries(version: str, flags: set[str]) -> None:
    assert _flags_for(version) == flags
    # The same decisions from packaging's reading of the same text.
    reference = a1111_reading(version)
    expected = set()
    if reference is not None:
        if reference < packaging_version.Version("1.6.0"):
            expected |= {OLD_TIMELINES, PAD_V0}
        if reference < packaging_version.Version("1.7.0.post225"):
            expected.add(DOWNCAST)
        if reference < packaging_version.Version("1.8.0"):
            expected.add(REFINER)
    assert expected == flags


def test_threshold_constants_are_a1111s() -> None:
    assert (str(V160), str(V170_TSNR), str(V180), str(V180_HR_STYLES)) == (
        "1.6.0", "1.7.0.post225", "1.8.0", "1.8.0.post139",
    )


# -------------------------------------------------------------------------------------------- moved

def test_backcompat_flags_follow_a1111_thresholds() -> None:
    old = {"Version": "v1.5.2", "Prompt": "a [b:c:5]", "Sampler": "DDIM"}
    assert backcompat_flags(old) == {
        "Old prompt editing timelines": True, "Pad conds v0": True, "Downcast alphas_cumprod": True,
    }
    assert backcompat_flags({"Version": "v1.5.2", "Prompt": "plain", "Sampler": "Euler"}) == {
        "Downcast alphas_cumprod": True,
    }
    assert backcompat_flags({"Version": "v1.7.0-224-gabcdef1"}) == {"Downcast alphas_cumprod": True}
    assert backcompat_flags({"Version": "v1.7.0-225-gabcdef1"}) == {}
    assert backcompat_flags({"Version": "v1.7.0", "Refiner": "xl_refiner"}) == {
        "Downcast alphas_cumprod": True, "Refiner switch by sampling steps": True,
    }
    assert backcompat_flags({"Version": DEFAULT_VERSION, "Prompt": "[x]"}) == {}
    assert backcompat_flags({}) == {}


def test_parse_records_backcompat_flags() -> None:
    res = parse_generation_parameters("a [b:c:5]\nSteps: 20, Sampler: PLMS, Seed: 1, Version: v1.5.1")
    assert res["Old prompt editing timelines"] is True
    assert res["Pad conds v0"] is True
    assert res["Downcast alphas_cumprod"] is True
    fields = request_fields_from_params(res)
    assert fields["use_old_scheduling"] and fields["pad_cond_uncond_v0"]
    assert fields["use_downcasted_alpha_bar"]


@pytest.mark.parametrize(
    ("version", "prompt", "sampler", "want"),
    [
        (
            "v1.5.1",
            "a [b:c:5]",
            "DDIM",
            {"use_old_scheduling", "pad_cond_uncond_v0", "use_downcasted_alpha_bar"},
        ),
        ("v1.5.1", "plain", "Euler", {"use_downcasted_alpha_bar"}),
        ("v1.6.0", "a [b:c:5]", "PLMS", {"use_downcasted_alpha_bar"}),
        (
            "v1.6.0-RC-28-gdeadbee",
            "[x]",
            "PLMS",
            {"use_old_scheduling", "pad_cond_uncond_v0", "use_downcasted_alpha_bar"},
        ),
        ("v1.7.0-224-gabc", "x", "Euler", {"use_downcasted_alpha_bar"}),
        ("v1.7.0-225-gabc", "x", "Euler", set()),
        ("v1.10.1", "[x]", "DDIM", set()),
        ("voidprompt-0.1.0", "[x]", "DDIM", set()),
        ("voidprompt 0.1", "[x]", "DDIM", set()),
        ("f2.0.1v1.10.1-previous-665-gae278f79", "[x]", "DDIM", set()),
        (None, "[x]", "DDIM", set()),
    ],
)
def test_request_fields_switched_on_by_version(
    version: str | None, prompt: str, sampler: str, want: set[str]
) -> None:
    text = f"{prompt}\nSteps: 20, Sampler: {sampler}, Seed: 1" + (f", Version: {version}" if version else "")
    fields = request_fields_from_infotext(text)
    switches = ("use_old_scheduling", "pad_cond_uncond_v0", "use_downcasted_alpha_bar")
    assert {name for name in switches if fields.get(name)} == want
    assert all(fields[name] is True for name in want)


def test_version_order() -> None:
    p = parse_version
    a, b, c, d, e = p("1.6.0-RC"), p("1.6.0"), p("v1.6.0-1-gabc"), p("1.6.1"), p("1.10.0")
    assert a is not None and b is not None and c is not None and d is not None and e is not None
    assert a < b < c < d < e


def test_parse_version_orders_like_packaging() -> None:
    texts = ["1.5.2", "v1.6.0-RC", "1.6.0", "1.6", "v1.6.0-1-gabc", "1.7.0.dev3", "v1.7.0", "v1.7.0-225",
             "v1.7.0-225-g1234567", "1.8.0rc1", "1.8.0", "v1.10.1", "2.0.0.post1"]
    for a in texts:
        for b in texts:
            ours_a, ours_b = parse_version(a), parse_version(b)
            ref_a, ref_b = a1111_reading(a), a1111_reading(b)
            assert ours_a is not None and ours_b is not None
            assert ref_a is not None and ref_b is not None
            assert (ours_a < ours_b) == (ref_a < ref_b), (a, b)  # type: ignore[operator]
    for unparseable in ("voidprompt-0.1.0", "f2.0.1v1.10.1-previous-669-gdfdcbab6", "", "dev"):
        assert parse_version(unparseable) is None


# ------------------------------------------------------------------------------ PEP 440, held to packaging

def _grammar_samples() -> list[str]:
    pieces = [
        ["", "V", " "],
        ["", "1!"],
        ["1.6", "1.7.0", "01.6.00"],
        ["", "a1", "-beta2", "preview", "RC-1"],
        ["", "-3", "_r4", "post", "-post-1"],
        ["", ".dev", "-DEV1", "_dev_"],
        ["", "+abc", "+Ubuntu.5", "+1-x_2", "+"],
    ]
    return ["".join(combo) for combo in itertools.product(*pieces)]


def _fuzz_samples(count: int) -> list[str]:
    rng = random.Random(440)
    alphabet = "0123456789....--__+!vVabcdeilnoprstw "
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 14))) for _ in range(count)]


def test_pep440_reading_matches_packaging() -> None:
    samples = _grammar_samples() + _fuzz_samples(5000)
    readable = []
    for text in samples:
        ours, reference = parse_version(text), a1111_reading(text)
        assert (ours is None) == (reference is None), text
        if ours is not None:
            assert str(ours) == str(reference), text
            readable.append((text, ours, reference))
    assert len(readable) > 5000  # the fuzz and the grammar reach deep into the readable set
    rng = random.Random(7)
    for _ in range(20000):
        (ta, a, ra), (tb, b, rb) = rng.choice(readable), rng.choice(readable)
        assert (a < b, a == b) == (ra < rb, ra == rb), (ta, tb)  # type: ignore[operator]
    for text, ours, reference in readable:
        for threshold in (V160, V170_TSNR, V180, V180_HR_STYLES):
            assert (ours < threshold) == (reference < packaging_version.Version(str(threshold))), text


# ---------------------------------------------------------------------------------- what we write

def test_our_version_is_not_readable_by_a1111() -> None:
    assert parse_version(DEFAULT_VERSION) is None
    assert a1111_reading(DEFAULT_VERSION) is None
    check_written_version(DEFAULT_VERSION)


@pytest.mark.parametrize("version", ["1.5.0", "v1.7.0", "v1.7.0-224-gdeadbee", "0.1.0", "1.8.0-138"])
def test_written_version_below_a1111_thresholds_is_refused(version: str) -> None:
    with pytest.raises(InfotextError, match="compatibility"):
        check_written_version(version)


@pytest.mark.parametrize("version", ["1.8.0-139", "v1.10.1", None, "voidprompt-9"])
def test_written_version_at_or_above_thresholds_is_allowed(version: str | None) -> None:
    check_written_version(version)
