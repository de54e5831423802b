"""The keys A1111 1.10 writes only when something happened, and their order.

Each expected text is derived by hand from A1111's code path, named in a comment:
``processing.create_infotext`` (the fixed head, then ``p.extra_generation_params`` in insertion
order), ``KDiffusionSampler.get_sigmas`` / ``sample`` / ``Sampler.initialize`` (the sampler keys),
``CFGDenoiser.forward`` (NGMS), ``Sampler.add_infotext`` (Pad conds), ``get_conds_with_caching``
(Old prompt editing timelines) and the CLIP wrapper's record (TI hashes, Emphasis).
"""

from __future__ import annotations

import pytest

from voidprompt.infotext import (
    DEFAULT_VERSION,
    ImageFacts,
    PassFacts,
    RunFacts,
    create_infotext,
    eta_key,
    generation_params,
    request_fields_from_infotext,
    ti_hashes_text,
)
from voidprompt.prompts.prepare import prepare_prompts
from voidprompt.request import GenerationRequest
from voidprompt.sampling.registry import resolve

# SD1's discrete sigma range: sqrt((1 - abar) / abar) at t = 0 and t = 999.
SD1_RANGE = (0.0292, 14.6146)


def _request(**changes: object) -> GenerationRequest:
    base = GenerationRequest(prompt="a cat", negative_prompt="dog", seed=10, steps=20, cfg_scale=7.0)
    return base.replace(**changes)


def _pass(sampler: str, scheduler: str = "Automatic", **facts: object) -> PassFacts:
    spec, schedule = resolve(sampler, scheduler)
    return PassFacts(spec, schedule, **facts)  # type: ignore[arg-type]


def _line(request: GenerationRequest, run: RunFacts) -> str:
    params = generation_params(request, ImageFacts(10, 0), run=run, version=None)
    return create_infotext("p", "", params).split("\n")[-1]


HEAD = (
    "Steps: 20, Sampler: {sampler}, Schedule type: {schedule}, CFG scale: 7, Seed: 10, Size: 512x512,"
    " RNG: CPU"
)


# -------------------------------------------------------------------------- 1. Hires schedule type


@pytest.mark.parametrize(
    ("sampler", "scheduler", "hr_scheduler", "expected"),
    [
        # DPM++ 2M's Automatic resolves to Karras in both passes: the hires label equals the
        # recorded "Schedule type", so nothing is written (A1111 never writes "Automatic" here).
        ("DPM++ 2M", "Automatic", "Automatic", None),
        ("DPM++ 2M", "Automatic", None, None),
        # Euler has no default schedule: both passes use the model's sigmas, no get_sigmas key.
        ("Euler", "Automatic", "Automatic", None),
        # A schedule function that differs from the first pass's is written ...
        ("DPM++ 2M", "Automatic", "Exponential", "Exponential"),
        # ... and so is any one after a first pass that recorded none.
        ("Euler", "Automatic", "Karras", "Karras"),
        # The same schedule named explicitly: nothing.
        ("Euler", "Karras", "Karras", None),
    ],
)
def test_hires_schedule_type_only_when_a1111_records_it(
    sampler: str, scheduler: str, hr_scheduler: str | None, expected: str | None
) -> None:
    request = _request(
        sampler_name=sampler, scheduler=scheduler, enable_hr=True, denoising_strength=0.5,
        hr_scheduler=hr_scheduler,
    )
    params = generation_params(request, ImageFacts(10, 0))
    assert params.get("Hires schedule type") == expected


def test_hires_schedule_type_keeps_the_place_init_reserved() -> None:
    # txt2img's init reserves "Hires schedule type" (value None) after the hires prompts, before
    # calculate_target_resolution's "Hires upscale"; the hires pass's get_sigmas fills it in later.
    request = _request(
        sampler_name="Euler a", enable_hr=True, denoising_strength=0.5, hr_scheduler="Karras",
        eta=0.5, s_min_uncond=0.3,
    )
    run = RunFacts(passes=(_pass("Euler a", ngms=True), _pass("Euler a", "Karras", from_image=True)))
    line = _line(request, run)
    assert line == (
        "Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 10, Size: 512x512,"
        " Denoising strength: 0.5, RNG: CPU, Hires schedule type: Karras, Hires upscale: 2,"
        " Hires upscaler: Latent, Eta: 0.5, NGMS: 0.3"
    )


# ------------------------------------------------------------------------------ 2. NGMS, Pad conds


def test_ngms_and_pad_conds_only_when_they_happened() -> None:
    request = _request(s_min_uncond=0.3, pad_cond_uncond=True)
    quiet = RunFacts(passes=(_pass("Euler"),))
    assert _line(request, quiet) == HEAD.format(sampler="Euler", schedule="Automatic")
    happened = RunFacts(passes=(_pass("Euler", ngms=True, padded_conds=True),))
    assert _line(request, happened) == HEAD.format(sampler="Euler", schedule="Automatic") + (
        ", NGMS: 0.3, Pad conds: True"
    )


def test_pad_conds_from_the_hires_pass_alone() -> None:
    # Only the hires prompt is longer than its negative: the hires pass's add_infotext records it.
    request = _request(enable_hr=True, denoising_strength=0.5, pad_cond_uncond=True)
    run = RunFacts(passes=(_pass("Euler"), _pass("Euler", from_image=True, padded_conds=True)))
    assert generation_params(request, ImageFacts(10, 0), run=run)["Pad conds"] is True


# --------------------------------------------------------------------- 3. schedule overrides, rho


@pytest.mark.parametrize(
    ("scheduler", "changes", "written"),
    [
        # rho: only schedules with a default rho (Karras 7, Polyexponential 1), only off it.
        ("Karras", {"rho": 7.0}, {}),
        ("Karras", {"rho": 5.0}, {"Schedule rho": 5.0}),
        ("Polyexponential", {"rho": 1.0}, {}),
        ("Polyexponential", {"rho": 2.0}, {"Schedule rho": 2.0}),
        ("Exponential", {"rho": 5.0}, {}),
        ("Beta", {"rho": 5.0}, {"Beta schedule alpha": 0.6, "Beta schedule beta": 0.6}),
        # min / max sigma: for any schedule function, when not the model's own.
        ("Exponential", {"sigma_min": 0.0292, "sigma_max": 10.0}, {"Schedule max sigma": 10.0}),
        ("Uniform", {"sigma_min": 0.1}, {"Schedule min sigma": 0.1}),
        # Automatic on Euler runs the model's sigmas: get_sigmas records nothing.
        ("Automatic", {"sigma_min": 0.1, "rho": 5.0}, {}),
    ],
)
def test_schedule_overrides_as_get_sigmas_records_them(
    scheduler: str, changes: dict[str, float], written: dict[str, float]
) -> None:
    keys = ("Schedule min sigma", "Schedule max sigma", "Schedule rho", "Beta schedule alpha",
            "Beta schedule beta")
    request = _request(scheduler=scheduler, **changes)
    run = RunFacts(passes=(_pass("Euler", scheduler),), model_sigma_range=SD1_RANGE)
    params = generation_params(request, ImageFacts(10, 0), run=run)
    assert {key: params[key] for key in keys if key in params} == written


def test_timestep_samplers_record_no_schedule_keys() -> None:
    request = _request(sampler_name="DDIM", scheduler="Karras", rho=5.0, sigma_min=0.1)
    params = generation_params(request, ImageFacts(10, 0), run=RunFacts(passes=(_pass("DDIM", "Karras"),)))
    assert not any(key.startswith("Schedule ") and key != "Schedule type" for key in params)


# ------------------------------------------------------------------------------- 4. Beta schedule


def test_beta_schedule_shape_written_and_read_back() -> None:
    request = _request(scheduler="Beta", beta_dist_alpha=0.5, beta_dist_beta=0.7)
    run = RunFacts(passes=(_pass("Euler", "Beta"),), model_sigma_range=SD1_RANGE)
    line = _line(request, run)
    assert line == HEAD.format(sampler="Euler", schedule="Beta") + (
        ", Beta schedule alpha: 0.5, Beta schedule beta: 0.7"
    )
    fields = request_fields_from_infotext(f"p\n{line}")
    assert (fields["beta_dist_alpha"], fields["beta_dist_beta"]) == (0.5, 0.7)


def test_beta_shape_must_be_positive() -> None:
    from voidprompt.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match=r"beta_dist_alpha=0\.0"):
        _request(beta_dist_alpha=0.0).validate()


# ---------------------------------------------------------------------------------- 5. Emphasis


def test_emphasis_decided_on_the_encoded_texts() -> None:
    # "[cat:dog:10]" is prompt editing: the encoder reads "cat" and "dog", no bracket left.
    edited = prepare_prompts("[cat:dog:10]", "", steps=20)
    assert edited.encoded_texts() == ("", "cat", "dog")
    request = _request(prompt="[cat:dog:10]", negative_prompt="", emphasis="No norm")
    run = RunFacts(passes=(_pass("Euler"),), encoded_texts=edited.encoded_texts())
    assert "Emphasis" not in generation_params(request, ImageFacts(10, 0), run=run)
    # A style adds the bracket the request's own text lacks.
    styled = RunFacts(passes=(_pass("Euler"),), encoded_texts=("a cat, (masterpiece)", "dog"))
    params = generation_params(request.replace(prompt="a cat"), ImageFacts(10, 0), run=styled)
    assert params["Emphasis"] == "No norm"
    # A bracket that weighs nothing still counts; "Original" is never written.
    plain = RunFacts(passes=(_pass("Euler"),), encoded_texts=("a [(cat)]", ""))
    assert generation_params(request, ImageFacts(10, 0), run=plain)["Emphasis"] == "No norm"
    original = request.replace(emphasis="Original")
    assert "Emphasis" not in generation_params(original, ImageFacts(10, 0), run=plain)


# ------------------------------------------------------------------------------ 6. Hires prompts


def test_styled_hires_prompts() -> None:
    # A1111 compares all_hr_prompts[i] (styled) with all_prompts[i] (styled) and writes the former.
    request = _request(enable_hr=True, denoising_strength=0.5, hr_prompt="a dog")
    run = RunFacts(
        passes=(_pass("Euler"), _pass("Euler", from_image=True)),
        prompts=("a cat, best", "dog, worst"),
        hires_prompts=("a dog, best", "dog, worst"),
    )
    params = generation_params(request, ImageFacts(10, 0), run=run)
    assert params["Hires prompt"] == "a dog, best"
    assert "Hires negative prompt" not in params
    # An empty hires prompt is the styled prompt itself: nothing written.
    same = RunFacts(passes=run.passes, prompts=run.prompts, hires_prompts=run.prompts)
    params = generation_params(request.replace(hr_prompt=""), ImageFacts(10, 0), run=same)
    assert "Hires prompt" not in params and "Hires negative prompt" not in params


# ---------------------------------------------------------------- 7. Old prompt editing timelines


@pytest.mark.parametrize(
    ("prompt", "negative", "differ"),
    [
        # "1.0" is a fraction (step 20) under the current rule and step 1 under the old one.
        ("x [b:c:1.0]", "n", True),
        ("x", "[b:c:1.0]", True),
        # "0.5" means step 10 under both.
        ("x [b:c:0.5]", "n", False),
        ("plain", "n", False),
    ],
)
def test_old_prompt_editing_timelines_only_when_schedules_differ(
    prompt: str, negative: str, differ: bool
) -> None:
    prepared = prepare_prompts(prompt, negative, steps=20, use_old_scheduling=True)
    assert prepared.old_timelines_differ is differ
    assert prepare_prompts(prompt, negative, steps=20).old_timelines_differ is False
    request = _request(prompt=prompt, negative_prompt=negative, use_old_scheduling=True)
    run = RunFacts(passes=(_pass("Euler"),), old_timelines_differ=prepared.old_timelines_differ)
    params = generation_params(request, ImageFacts(10, 0), run=run)
    assert ("Old prompt editing timelines" in params) is differ


# ------------------------------------------------------------------------------------ key order


def test_key_order_as_a1111_inserts_them() -> None:
    # Per batch: extra_networks.activate (Lora hashes), setup_conds (Old prompt editing
    # timelines), the CLIP wrapper's record (TI hashes, Emphasis), apply_alpha_schedule_override
    # (Downcast alphas_cumprod); then the sampler: get_sigmas (Discard penultimate sigma, the
    # overrides), sample (SGM noise multiplier), initialize (Eta, Sigma noise), the denoiser (NGMS),
    # add_infotext (Pad conds). Version last.
    request = _request(
        prompt="a (cat)", sampler_name="DPM++ 2S a", scheduler="Karras",
        always_discard_next_to_last_sigma=True, sgm_noise_multiplier=True, sigma_max=10.0, rho=5.0,
        eta=0.5, s_noise=0.9, s_min_uncond=0.3,
        pad_cond_uncond=True, use_old_scheduling=True, emphasis="No norm", use_downcasted_alpha_bar=True,
    )
    run = RunFacts(
        schedule_type="Karras",
        passes=(_pass("DPM++ 2S a", "Karras", ngms=True, padded_conds=True),),
        model_sigma_range=SD1_RANGE,
        encoded_texts=("dog", "a (cat)"),
        old_timelines_differ=True,
        networks={"Lora hashes": "x: 0123456789ab"},
        ti_hashes="emb: abcdef012345",
    )
    params = generation_params(request, ImageFacts(10, 0), run=run)
    assert create_infotext("a (cat)", "dog", params) == (
        "a (cat)\nNegative prompt: dog\n"
        + HEAD.format(sampler="DPM++ 2S a", schedule="Karras")
        + ', Lora hashes: "x: 0123456789ab", Old prompt editing timelines: True,'
        ' TI hashes: "emb: abcdef012345", Emphasis: No norm, Downcast alphas_cumprod: True,'
        " Discard penultimate sigma: True, Schedule max sigma: 10.0, Schedule rho: 5.0,"
        " SGM noise multiplier: True, Eta: 0.5, Sigma noise: 0.9, NGMS: 0.3, Pad conds: True,"
        f" Version: {DEFAULT_VERSION}"
    )


def test_sampler_own_discard_and_img2img_sgm_are_not_written() -> None:
    # DPM2 discards the penultimate sigma itself (no key); sample_img2img never applies SGM.
    request = _request(sampler_name="DPM2", always_discard_next_to_last_sigma=True, sgm_noise_multiplier=True)
    run = RunFacts(passes=(_pass("DPM2", from_image=True),))
    params = generation_params(request, ImageFacts(10, 0), run=run)
    assert "Discard penultimate sigma" not in params and "SGM noise multiplier" not in params
    # Eta: only for samplers that take it (Euler does not).
    euler = generation_params(_request(eta=0.5), ImageFacts(10, 0), run=RunFacts(passes=(_pass("Euler"),)))
    assert "Eta" not in euler and "Eta DDIM" not in euler


def test_old_timelines_from_the_hires_conditioning_alone() -> None:
    # calculate_hr_conds runs in sample_hr_pass, after the first pass's sampler keys: the key lands
    # there when only the hires schedules change.
    request = _request(
        enable_hr=True, denoising_strength=0.5, use_old_scheduling=True, eta=0.5, sampler_name="Euler a",
    )
    run = RunFacts(
        passes=(_pass("Euler a"), _pass("Euler a", from_image=True, old_timelines_differ=True)),
        old_timelines_differ=False,
    )
    assert _line(request, run).endswith(
        "Hires upscale: 2, Hires upscaler: Latent, Eta: 0.5, Old prompt editing timelines: True"
    )


@pytest.mark.parametrize(
    ("sampler", "key"),
    [
        # initialize writes the eta only when the sampler function takes one; its setting's name
        # follows the family (eta_ddim for the timestep samplers, eta_ancestral otherwise).
        ("DDIM", "Eta DDIM"),
        ("DDIM CFG++", "Eta DDIM"),
        ("PLMS", None),
        ("UniPC", None),
        ("Euler a", "Eta"),
        ("DPM++ 2M SDE", "Eta"),
        ("Euler", None),
        ("DPM++ 2M", None),
        # Read from another program's infotext, an unknown sampler's eta is the generic one.
        ("Some Extension Sampler", "Eta"),
    ],
)
def test_eta_key_by_sampler(sampler: str, key: str | None) -> None:
    assert eta_key(sampler) == key


@pytest.mark.parametrize(
    ("sampler", "written"), [("DDIM", {"Eta DDIM": 0.25}), ("PLMS", {}), ("Euler a", {"Eta": 0.25})]
)
def test_eta_written_under_its_key(sampler: str, written: dict[str, float]) -> None:
    request = _request(sampler_name=sampler, eta=0.25)
    params = generation_params(request, ImageFacts(10, 0), run=RunFacts(passes=(_pass(sampler),)))
    assert {k: params[k] for k in ("Eta", "Eta DDIM") if k in params} == written


def test_ti_hashes_value_from_the_encoder_calls() -> None:
    # A1111's CLIP wrapper: each call's "name: hash" items go in front of the value so far, names
    # lose their colons and commas, embeddings without a hash are left out.
    calls = [{"neg": "111111111111"}, {}, {"a": "222222222222", "b:c,d": "333333333333", "nohash": ""}]
    assert ti_hashes_text(calls) == "a: 222222222222, bcd: 333333333333, neg: 111111111111"
    twice = [{"e": "444444444444"}, {"e": "444444444444"}]
    assert ti_hashes_text(twice) == "e: 444444444444, e: 444444444444"
    assert ti_hashes_text([{}, {"x": ""}]) is None
