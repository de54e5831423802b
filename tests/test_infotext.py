"""A1111 infotext: writing, parsing, defaults and generation_params.

Expected values are derived by hand from A1111's behaviour (``processing.create_infotext``,
``infotext_utils.parse_generation_parameters``), not by running our own writer, except in the
round-trip tests whose point is the round trip. Versions: test_infotext_versions.py; the request
mapping: test_infotext_to_request.py.
"""

from __future__ import annotations

import pytest

from voidprompt.errors import InfotextError
from voidprompt.infotext import (
    DEFAULT_VERSION,
    KEY_ORDER,
    ImageFacts,
    ModelFacts,
    RunFacts,
    create_infotext,
    generation_params,
    old_hires_fix_first_pass_dimensions,
    parse_generation_parameters,
    prompt_uses_emphasis,
    quote,
    request_fields_from_infotext,
)
from voidprompt.request import GenerationRequest

A1111_DOCSTRING = (
    "girl with an artist's beret, determined, blue eyes, desert scene, computer monitors, heavy makeup, "
    "by Alphonse Mucha and Charlie Bowater, ((eyeshadow)), (coquettish), detailed, intricate\n"
    "Negative prompt: ugly, fat, obese, chubby, (((deformed))), [blurry], bad anatomy, disfigured, "
    "poorly drawn face, mutation, mutated, (extra_limb), (ugly), (poorly drawn hands), messy drawing\n"
    "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b"
)

# Every default A1111 1.10 fills in when a key is absent, with A1111's own types.
DEFAULTS = {
    "Clip skip": "1",
    "Hires resize-1": 0,
    "Hires resize-2": 0,
    "Hires sampler": "Use same sampler",
    "Hires schedule type": "Use same scheduler",
    "Hires checkpoint": "Use same checkpoint",
    "Hires prompt": "",
    "Hires negative prompt": "",
    "Mask mode": "Inpaint masked",
    "Masked content": "original",
    "Inpaint area": "Whole picture",
    "Masked area padding": 32,
    "RNG": "GPU",
    "Schedule type": "Automatic",
    "Schedule max sigma": 0,
    "Schedule min sigma": 0,
    "Schedule rho": 0,
    "VAE Encoder": "Full",
    "VAE Decoder": "Full",
    "FP8 weight": "Disable",
    "Refiner switch by sampling steps": False,
}


def test_a1111_docstring_example_parses_to_hand_derived_values() -> None:
    expected = {
        "Prompt": (
            "girl with an artist's beret, determined, blue eyes, desert scene, computer monitors, "
            "heavy makeup, by Alphonse Mucha and Charlie Bowater, ((eyeshadow)), (coquettish), detailed, "
            "intricate"
        ),
        "Negative prompt": (
            "ugly, fat, obese, chubby, (((deformed))), [blurry], bad anatomy, disfigured, poorly drawn "
            "face, mutation, mutated, (extra_limb), (ugly), (poorly drawn hands), messy drawing"
        ),
        "Steps": "20",
        "Sampler": "Euler a",
        "CFG scale": "7",
        "Seed": "965400086",
        "Size-1": "512",
        "Size-2": "512",
        "Model hash": "45dee52b",
        **DEFAULTS,
        # ((eyeshadow)) carries weight 1.21, so 1.10 fills Emphasis in.
        "Emphasis": "Original",
    }
    assert parse_generation_parameters(A1111_DOCSTRING) == expected


def test_docstring_example_maps_onto_request_fields() -> None:
    fields = request_fields_from_infotext(A1111_DOCSTRING)
    assert fields["steps"] == 20
    assert fields["sampler_name"] == "Euler a"
    assert fields["scheduler"] == "Automatic"
    assert fields["cfg_scale"] == 7.0
    assert fields["seed"] == 965400086
    assert (fields["width"], fields["height"]) == (512, 512)
    assert fields["clip_skip"] == 1
    assert fields["randn_source"] == "GPU"
    assert fields["emphasis"] == "Original"
    assert fields["sigma_min"] is None and fields["sigma_max"] is None and fields["rho"] is None
    assert "enable_hr" not in fields
    GenerationRequest(**fields).validate()


# ---------------------------------------------------------------------------------------------- writing

def test_layout_with_and_without_negative_prompt() -> None:
    params = {"Steps": 20, "Sampler": "Euler", "Seed": 1}
    assert create_infotext("a cat", "a dog", params) == (
        "a cat\nNegative prompt: a dog\nSteps: 20, Sampler: Euler, Seed: 1"
    )
    assert create_infotext("a cat", "", params) == "a cat\nSteps: 20, Sampler: Euler, Seed: 1"


def test_key_order_follows_a1111_then_insertion_then_version_user() -> None:
    params = {
        "User": "me",
        "Lora hashes": "x",
        "Version": "voidprompt-9",
        "Seed": 5,
        "Emphasis": "No norm",
        "Steps": 3,
        "RNG": "CPU",
        "Size": "64x64",
        "Sampler": "Euler a",
        "Clip skip": 2,
        "Empty": None,
    }
    line = create_infotext("p", "", params).split("\n")[-1]
    assert line == (
        "Steps: 3, Sampler: Euler a, Seed: 5, Size: 64x64, Clip skip: 2, RNG: CPU, Lora hashes: x, "
        "Emphasis: No norm, Version: voidprompt-9, User: me"
    )
    assert KEY_ORDER.index("Seed") < KEY_ORDER.index("Size") < KEY_ORDER.index("Clip skip")


@pytest.mark.parametrize(
    ("value", "written"),
    [
        ("plain", "plain"),
        ("a, b", '"a, b"'),
        ("a: b", '"a: b"'),
        ("two\nlines", '"two\\nlines"'),
        ('say "hi", ok', '"say \\"hi\\", ok"'),
        ("héllo, 世界", '"héllo, 世界"'),  # ensure_ascii=False
        ('a"b', 'a"b'),  # a quote alone does not trigger quoting in A1111
        (7, 7),
    ],
)
def test_quote_rule(value: object, written: object) -> None:
    assert quote(value) == written


def test_quote_dumps_non_string_objects_as_json() -> None:
    assert quote(["a", "b:c"]) == '["a", "b:c"]'


def test_key_equal_to_value_is_written_bare() -> None:
    assert create_infotext("p", "", {"Steps": 1, "Tiled": "Tiled", "Seed": 2}).endswith(
        "Steps: 1, Seed: 2, Tiled"
    )


def test_bad_key_is_refused() -> None:
    with pytest.raises(InfotextError, match="separator"):
        create_infotext("p", "", {"Steps": 1, "a, b": 2})


# ---------------------------------------------------------------------------------------------- parsing

def test_last_line_with_fewer_than_three_pairs_stays_in_prompt() -> None:
    res = parse_generation_parameters("a cat\nSteps: 20, Seed: 1")
    assert res["Prompt"] == "a cat\nSteps: 20, Seed: 1"
    assert "Steps" not in res and "Seed" not in res


def test_multi_line_prompt_and_negative() -> None:
    text = "line one\n  line two  \nNegative prompt: neg one\nneg two\nSteps: 1, Seed: 2, Sampler: Euler"
    res = parse_generation_parameters(text)
    assert res["Prompt"] == "line one\nline two"  # each line is stripped
    assert res["Negative prompt"] == "neg one\nneg two"
    assert (res["Steps"], res["Seed"], res["Sampler"]) == ("1", "2", "Euler")


def test_values_stay_strings_and_sizes_split() -> None:
    res = parse_generation_parameters(
        "p\nSteps: 20, CFG scale: 7.5, Seed: 3, Seed resize from: 640x448, Hires resize: 1024x768"
    )
    assert res["CFG scale"] == "7.5"
    assert (res["Seed resize from-1"], res["Seed resize from-2"]) == ("640", "448")
    assert (res["Hires resize-1"], res["Hires resize-2"]) == ("1024", "768")
    assert "Seed resize from" not in res


def test_bare_quoted_value_is_decoded_a1111_quirk() -> None:
    # Written bare by A1111 (no , : or newline), yet read back without its quotes.
    text = create_infotext("p", "", {"Steps": 1, "Seed": 2, "Note": '"x"'})
    assert text.endswith('Note: "x"')
    assert parse_generation_parameters(text)["Note"] == "x"
    # The explicit lossless variant quotes it, and A1111's reader gets it back exactly.
    text = create_infotext("p", "", {"Steps": 1, "Seed": 2, "Note": '"x"'}, quote_quotes=True)
    assert parse_generation_parameters(text)["Note"] == '"x"'


def test_hypernet_legacy_becomes_prompt_tag() -> None:
    res = parse_generation_parameters("a cat\nSteps: 20, Seed: 1, Hypernet: anime, Hypernet strength: 0.5")
    assert res["Prompt"] == "a cat<hypernet:anime:0.5>"
    res = parse_generation_parameters("a cat\nSteps: 20, Seed: 1, Hypernet: anime")
    assert res["Prompt"] == "a cat<hypernet:anime:1.0>"


def test_old_first_pass_size_is_converted() -> None:
    # Explicit first pass: Size becomes the first pass, the old Size the hires target.
    res = parse_generation_parameters("p\nSteps: 20, Seed: 1, Size: 1280x768, First pass size: 640x384")
    sizes = (res["Size-1"], res["Size-2"], res["Hires resize-1"], res["Hires resize-2"])
    assert sizes == (640, 384, 1280, 768)
    # 0x0 = automatic: sqrt(512*512 / (768*512)) = 0.8165; ceil(0.8165*768/64)*64 = 640,
    # ceil(0.8165*512/64)*64 = 448.
    res = parse_generation_parameters("p\nSteps: 20, Seed: 1, Size: 768x512, First pass size: 0x0")
    sizes = (res["Size-1"], res["Size-2"], res["Hires resize-1"], res["Hires resize-2"])
    assert sizes == (640, 448, 768, 512)
    assert old_hires_fix_first_pass_dimensions(1024, 1024) == (512, 512)


def test_use_old_hires_fix_width_height_option() -> None:
    text = "p\nSteps: 20, Seed: 1, Size: 512x512, Hires resize: 1024x768"
    res = parse_generation_parameters(text, use_old_hires_fix_width_height=True)
    assert (res["Size-1"], res["Size-2"]) == (1024, 768)


def test_existing_values_are_not_overwritten_by_defaults() -> None:
    res = parse_generation_parameters(
        "p\nSteps: 20, Seed: 1, Clip skip: 2, RNG: CPU, Schedule type: Karras, FP8 weight: Enable for SDXL"
    )
    assert (res["Clip skip"], res["RNG"], res["Schedule type"]) == ("2", "CPU", "Karras")
    assert res["Cache FP16 weight for LoRA"] is False


def test_skip_fields() -> None:
    res = parse_generation_parameters(A1111_DOCSTRING, skip_fields=["Seed", "Model hash"])
    assert "Seed" not in res and "Model hash" not in res


def test_crlf_text_keeps_carriage_return_like_a1111() -> None:
    # A1111 splits on "\n" only: prompt lines are stripped, the last value keeps its "\r".
    res = parse_generation_parameters("a cat\r\nSteps: 20, Seed: 1, Sampler: Euler\r\n")
    assert res["Prompt"] == "a cat"
    assert res["Sampler"] == "Euler"  # the whole text is stripped first


@pytest.mark.parametrize(
    ("prompt", "uses"),
    [
        ("a cat", False),
        ("a (cat)", True),
        ("a [cat]", True),
        (r"a \(cat\)", False),  # escaped brackets are text
        ("a (cat:1.0)", False),
        ("a (cat:1.3)", True),
        ("a (cat", True),  # unclosed ( still weighs 1.1
        ("a ()", False),  # brackets around nothing weigh nothing
        ("a cat) dog]", False),  # unmatched closers are text
        ("a BREAK b", False),
        ("a :1.2) b", False),  # weight closer without an open bracket is text
        ("", False),
    ],
)
def test_prompt_uses_emphasis(prompt: str, uses: bool) -> None:
    assert prompt_uses_emphasis(prompt) is uses


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5])
def test_emphasis_float_order_quirk(depth: int) -> None:
    # Inner ( close first (x1.1 each), then each ] multiplies by 1/1.1; whether that lands exactly
    # on 1.0 depends on binary rounding, and A1111 compares exactly.
    weight = 1.0
    for _ in range(depth):
        weight *= 1.1
    for _ in range(depth):
        weight *= 1 / 1.1
    prompt = "[" * depth + "(" * depth + "x" + ")" * depth + "]" * depth
    assert prompt_uses_emphasis(prompt) is (weight != 1.0)


def test_emphasis_weight_inside_brackets() -> None:
    # (x:0.5) then ( ) around it: 0.5 * 1.1 = 0.55
    assert prompt_uses_emphasis("((x:0.5))") is True


def test_emphasis_default_only_when_prompt_is_weighted() -> None:
    assert "Emphasis" not in parse_generation_parameters("a cat\nSteps: 20, Seed: 1, Sampler: Euler")
    weighted = parse_generation_parameters(
        "a cat\nNegative prompt: (dog)\nSteps: 20, Seed: 1, Sampler: Euler"
    )
    assert weighted["Emphasis"] == "Original"
    explicit = parse_generation_parameters("(a cat)\nSteps: 20, Seed: 1, Emphasis: No norm")
    assert explicit["Emphasis"] == "No norm"


# ------------------------------------------------------------------------------------------ round trips

ROUND_TRIP_CASES = [
    ("a cat", "", {"Steps": 20, "Sampler": "Euler a", "CFG scale": 7, "Seed": 1, "Size": "512x512"}),
    ("line one\nline two", "neg one\nneg two", {"Steps": 5, "Sampler": "DPM++ 2M", "Seed": 2}),
    ("p", "n", {"Steps": 1, "Seed": 3, "Lora hashes": "a: 0123456789ab, b: ba9876543210"}),
    ("p", "", {"Steps": 1, "Seed": 3, "TI hashes": 'x: "y", z', "Note": "colon: here"}),
    ("p", "", {"Steps": 1, "Seed": 3, "Multi": "first\nsecond, third", "Backslash": "c:\\path\\x"}),
    ("p", "", {"Steps": 1, "Seed": 3, "Quote": 'he said "hi"', "Unicode": "日本語, テスト"}),
    ("(weighted:1.2), [x:y:0.5]", "bad, (ugly)", {"Steps": 30, "Sampler": "Heun", "Seed": 4, "Model": "m"}),
    ("p", "", {"Steps": 1, "Seed": 3, "Sampler": "Euler", "Spaces": "a b  c"}),
]


def test_empty_value_reads_as_absent_a1111_quirk() -> None:
    # A1111's reader indexes the value's first character; on "" that fails and the pair is
    # skipped, so the key is absent and its default (where it has one) fills in.
    text = "p\nSteps: 20, Refiner: , Seed: 3, RNG: , Schedule type: , Empty:   , Size: 512x512"
    res = parse_generation_parameters(text)
    assert "Refiner" not in res and "Empty" not in res
    assert res["RNG"] == "GPU" and res["Schedule type"] == "Automatic"
    assert (res["Steps"], res["Seed"], res["Size-1"]) == ("20", "3", "512")
    # Written empty, a value is skipped on reading too.
    written = create_infotext("p", "", {"Steps": 1, "Seed": 3, "Sampler": "Euler", "Empty": ""})
    assert written == "p\nSteps: 1, Sampler: Euler, Seed: 3, Empty:"  # the whole text is stripped
    assert "Empty" not in parse_generation_parameters(written)


@pytest.mark.parametrize(
    ("text", "prompt", "negative"),
    [
        # A1111 joins a line with "\n" only once the text so far is non-empty: the leading newline
        # of a negative prompt ("Negative prompt: " then "bad hands") is lost ...
        ("a cat\nNegative prompt: \nbad hands\nSteps: 20, Seed: 1, Size: 512x512", "a cat", "bad hands"),
        # ... so are several, and leading empty prompt lines ...
        ("\n\na cat\nNegative prompt: \n\nbad\nSteps: 20, Seed: 1, Size: 512x512", "a cat", "bad"),
        # ... while an empty line after some text stays.
        ("a\n\ncat\nNegative prompt: x\n\ny\nSteps: 20, Seed: 1, Size: 512x512", "a\n\ncat", "x\n\ny"),
    ],
)
def test_leading_newlines_read_as_a1111_reads_them(text: str, prompt: str, negative: str) -> None:
    res = parse_generation_parameters(text)
    assert (res["Prompt"], res["Negative prompt"]) == (prompt, negative)


def test_negative_prompt_with_leading_newline_round_trip() -> None:
    # create_infotext writes "Negative prompt: " + "\nbad"; reading drops the newline as A1111 does.
    text = create_infotext("a cat", "\nbad", {"Steps": 20, "Seed": 1, "Size": "512x512"})
    assert text.startswith("a cat\nNegative prompt: \nbad\nSteps: 20")
    assert parse_generation_parameters(text)["Negative prompt"] == "bad"


@pytest.mark.parametrize(("prompt", "negative", "params"), ROUND_TRIP_CASES)
def test_round_trip(prompt: str, negative: str, params: dict[str, object]) -> None:
    res = parse_generation_parameters(create_infotext(prompt, negative, params))
    assert res["Prompt"] == prompt
    assert res["Negative prompt"] == negative
    for key, value in params.items():
        if key == "Size":
            width, height = str(value).split("x")
            assert (res["Size-1"], res["Size-2"]) == (width, height)
        else:
            assert res[key] == str(value), key


def test_value_with_escapes_round_trips_through_json() -> None:
    value = 'tab\tquote" back\\slash, end'
    res = parse_generation_parameters(create_infotext("p", "", {"Steps": 1, "Seed": 2, "Val": value}))
    assert res["Val"] == value


def test_single_character_key_is_not_read_a1111_quirk() -> None:
    # A1111's key pattern needs two characters; a one-letter key is silently dropped.
    res = parse_generation_parameters(create_infotext("p", "", {"Steps": 1, "Seed": 2, "V": "x"}))
    assert "V" not in res


# ------------------------------------------------------------------------------------ generation_params

def _request(**changes: object) -> GenerationRequest:
    base = GenerationRequest(prompt="a cat", negative_prompt="a dog", seed=10, steps=20, cfg_scale=7.0)
    return base.replace(**changes)


def test_generation_params_minimal() -> None:
    params = generation_params(_request(), ImageFacts(10, 99), ModelFacts(hash="31e35c80fc", name="sd15"))
    assert params == {
        "Steps": 20,
        "Sampler": "Euler",
        "Schedule type": "Automatic",
        "CFG scale": 7,
        "Seed": 10,
        "Size": "512x512",
        "Model hash": "31e35c80fc",
        "Model": "sd15",
        "RNG": "CPU",
        "Version": DEFAULT_VERSION,
    }
    assert create_infotext("a cat", "a dog", params) == (
        "a cat\nNegative prompt: a dog\nSteps: 20, Sampler: Euler, Schedule type: Automatic, CFG scale: 7, "
        f"Seed: 10, Size: 512x512, Model hash: 31e35c80fc, Model: sd15, RNG: CPU, Version: {DEFAULT_VERSION}"
    )


def test_generation_params_conditional_keys() -> None:
    request = _request(
        subseed_strength=0.25, seed_resize_from_w=640, seed_resize_from_h=448, clip_skip=2,
        eta_noise_seed_delta=31337, randn_source="GPU", emphasis="No norm", prompt="(a cat)",
        sampler_name="Euler a", eta=0.5, s_noise=0.9, use_old_scheduling=True,
        extra_generation_params={"Lora hashes": "a: 1"},
    )
    run = RunFacts(schedule_type="Karras", uses_ensd=True)
    params = generation_params(request, ImageFacts(10, 99), run=run, version=None)
    assert params["Variation seed"] == 99 and params["Variation seed strength"] == 0.25
    assert params["Seed resize from"] == "640x448"
    assert params["Clip skip"] == 2
    assert params["ENSD"] == 31337
    assert params["Schedule type"] == "Karras"
    assert "RNG" not in params and "Version" not in params and "Model" not in params
    assert params["Emphasis"] == "No norm"
    # A1111's sampler_extra_params has no entry for sample_euler_ancestral: s_noise is never passed
    # to Euler a, so it is not written either.
    assert params["Eta"] == 0.5 and "Sigma noise" not in params
    assert params["Old prompt editing timelines"] is True
    assert list(params)[-1] == "Lora hashes"


def test_generation_params_omits_defaults() -> None:
    request = _request(eta_noise_seed_delta=31337, emphasis="No norm", eta=1.0)
    params = generation_params(request, ImageFacts(1, 2), run=RunFacts(uses_ensd=False))
    for key in ("ENSD", "Emphasis", "Eta", "Variation seed", "Clip skip", "Denoising strength"):
        assert key not in params, key
    ddim = generation_params(_request(sampler_name="DDIM", eta=0.0), ImageFacts(1, 2))
    assert "Eta DDIM" not in ddim and "Eta" not in ddim


def test_generation_params_hires() -> None:
    request = _request(enable_hr=True, hr_scale=2.0, hr_second_pass_steps=10, hr_upscaler="Latent",
                       denoising_strength=0.6, hr_sampler_name="Euler a")
    params = generation_params(request, ImageFacts(1, 2))
    assert params["Denoising strength"] == 0.6
    assert (params["Hires upscale"], params["Hires steps"], params["Hires upscaler"]) == (2, 10, "Latent")
    assert params["Hires sampler"] == "Euler a"
    fields = request_fields_from_infotext(create_infotext("a cat", "", params))
    assert fields["enable_hr"] is True and fields["hr_scale"] == 2.0 and fields["hr_second_pass_steps"] == 10
    assert fields["hr_sampler_name"] == "Euler a" and "hr_scheduler" not in fields


@pytest.mark.parametrize("version", ["1.5.0", "v1.7.0", "v1.7.0-224-gdeadbee", "0.1.0"])
def test_numeric_version_below_a1111_thresholds_is_refused(version: str) -> None:
    with pytest.raises(InfotextError, match="compatibility"):
        generation_params(_request(), ImageFacts(1, 2), version=version)


def test_modern_a1111_version_is_allowed() -> None:
    params = generation_params(_request(), ImageFacts(1, 2), version="v1.10.1")
    assert params["Version"] == "v1.10.1"


def test_infotext_alone_regenerates_the_request() -> None:
    request = _request(
        prompt="a (red:1.2) cat,\nsecond line", negative_prompt="blurry, bad: hands",
        sampler_name="Euler", scheduler="Karras", steps=28, cfg_scale=6.5, width=640, height=448,
        seed=1234, subseed=77, subseed_strength=0.3, seed_resize_from_w=512, seed_resize_from_h=512,
        clip_skip=2, eta_noise_seed_delta=31337, randn_source="NV", emphasis="No norm",
        s_churn=0.5, s_tmin=0.1, sigma_min=0.03, sigma_max=14.6, rho=5.0, pad_cond_uncond=True,
        use_downcasted_alpha_bar=True, s_min_uncond=0.2,
    )
    params = generation_params(request, ImageFacts(1234, 77), ModelFacts(hash="abcdef0123", name="m"),
                               RunFacts(uses_ensd=True))
    fields = request_fields_from_infotext(create_infotext(request.prompt, request.negative_prompt, params))
    rebuilt = GenerationRequest(**fields)
    for name in ("prompt", "negative_prompt", "sampler_name", "scheduler", "steps", "cfg_scale", "width",
                 "height", "seed", "subseed", "subseed_strength", "seed_resize_from_w", "seed_resize_from_h",
                 "clip_skip", "eta_noise_seed_delta", "randn_source", "emphasis", "s_churn", "s_tmin",
                 "sigma_min", "sigma_max", "rho", "pad_cond_uncond", "use_downcasted_alpha_bar",
                 "s_min_uncond"):
        assert getattr(rebuilt, name) == getattr(request, name), name


def test_empty_text() -> None:
    assert create_infotext("", "", {}) == ""
    res = parse_generation_parameters("")
    assert (res["Prompt"], res["Negative prompt"]) == ("", "")
