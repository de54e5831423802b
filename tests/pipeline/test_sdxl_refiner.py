"""A1111's refiner switch on the tiny SDXL base and refiner files.

The switch point is derived here from the sigma table on its own (A1111: the fraction done is
(999 - t) / 1000, t the table index nearest the call's sigma); the two ends are checked against plain
generations: at 1.0 the refiner never takes over (the fraction tops out at 0.999), at 0.0 it takes the
very first call, so the picture is the refiner's own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from voidprompt.errors import InvalidRequestError, ModelLoadError
from voidprompt.models import load_model
from voidprompt.models.components import Components
from voidprompt.pipeline.engine import Engine
from voidprompt.request import GenerationRequest
from voidprompt.sampling.denoiser import DiscreteEpsDenoiser
from voidprompt.testing.fake_checkpoints import write_tiny_sdxl_checkpoint

STEPS = 6
BASE = GenerationRequest(
    prompt="a red circle", negative_prompt="blurry", seed=21, steps=STEPS, width=32, height=32,
    sampler_name="Euler", refiner_checkpoint="tiny-refiner",
)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("refiner")
    return {
        "base": write_tiny_sdxl_checkpoint(folder / "tiny-base.safetensors"),
        "tiny-refiner": write_tiny_sdxl_checkpoint(folder / "tiny-refiner.safetensors", refiner=True, seed=1),
    }


@pytest.fixture(scope="module")
def refiner_components(files: dict[str, Path]) -> Components:
    return load_model(files["tiny-refiner"])


@pytest.fixture(scope="module")
def engine(files: dict[str, Path], refiner_components: Components) -> Engine:
    def loader(name: str) -> Components:
        if name != "tiny-refiner":
            raise ModelLoadError(f"no checkpoint named {name!r}")
        return refiner_components

    return Engine(load_model(files["base"]), refiner_loader=loader)


def _count_calls(module: torch.nn.Module, calls: list[str], label: str) -> Any:
    return module.register_forward_pre_hook(lambda *_: calls.append(label))


def _calls(engine: Engine, refiner: Components, request: GenerationRequest) -> tuple[list[str], Any]:
    calls: list[str] = []
    handles = [
        _count_calls(engine.components.unet, calls, "base"),
        _count_calls(refiner.unet, calls, "refiner"),
    ]
    try:
        result = engine.generate(request)
    finally:
        for handle in handles:
            handle.remove()
    return calls, result


def _expected_base_calls(engine: Engine, switch_at: float) -> int:
    table = DiscreteEpsDenoiser(lambda *a: a[0], engine.components.alphas_cumprod)
    sigmas = table.get_sigmas(STEPS)[:-1]  # Euler: one call per step, at each step's sigma
    done = [(999 - int(torch.argmin((table.sigmas - s).abs()))) / 1000 for s in sigmas]
    return next(i for i, fraction in enumerate(done) if fraction >= switch_at)


def test_the_refiner_takes_over_where_a1111_would(engine: Engine, refiner_components: Components) -> None:
    calls, result = _calls(engine, refiner_components, BASE.replace(refiner_switch_at=0.5))
    base_calls = _expected_base_calls(engine, 0.5)
    assert 0 < base_calls < STEPS
    assert calls == ["base"] * base_calls + ["refiner"] * (STEPS - base_calls)
    short_hash = refiner_components.checkpoint.short_hash
    assert f"Refiner: tiny-refiner [{short_hash}], Refiner switch at: 0.5" in result.infotexts[0]


def test_each_iteration_starts_on_the_main_model(engine: Engine, refiner_components: Components) -> None:
    calls, result = _calls(engine, refiner_components, BASE.replace(refiner_switch_at=0.5, n_iter=2))
    base_calls = _expected_base_calls(engine, 0.5)
    one = ["base"] * base_calls + ["refiner"] * (STEPS - base_calls)
    assert calls == one + one
    assert all("Refiner: tiny-refiner" in text for text in result.infotexts)


def test_the_two_ends(engine: Engine, refiner_components: Components) -> None:
    plain = BASE.replace(refiner_checkpoint=None)
    never = engine.generate(BASE.replace(refiner_switch_at=1.0))
    assert never.images[0].tobytes() == engine.generate(plain).images[0].tobytes()
    assert "Refiner" not in never.infotexts[0]
    at_once = engine.generate(BASE.replace(refiner_switch_at=0.0))
    alone = Engine(refiner_components).generate(plain)
    assert at_once.images[0].tobytes() == alone.images[0].tobytes()
    # A1111 quirk: no switch point at all switches at the first call too.
    unset = engine.generate(BASE.replace(refiner_switch_at=None))
    assert unset.images[0].tobytes() == alone.images[0].tobytes()


def test_hires_switches_in_the_second_pass_by_default(engine: Engine, refiner_components: Components) -> None:
    request = BASE.replace(
        refiner_switch_at=0.0, enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", denoising_strength=0.5
    )
    calls, result = _calls(engine, refiner_components, request)
    first = [c for c in calls[:STEPS]]
    assert first == ["base"] * STEPS and set(calls[STEPS:]) == {"refiner"}
    assert "Hires refiner" not in result.infotexts[0]
    calls, result = _calls(engine, refiner_components, request.replace(hires_fix_refiner_pass="first pass"))
    # Switched in the first pass, the refiner stays for the hires pass (A1111 reloads per iteration only).
    assert set(calls) == {"refiner"}
    assert "Hires refiner: first pass" in result.infotexts[0]


def test_refusals_and_the_steps_quirk(files: dict[str, Path], engine: Engine) -> None:
    with pytest.raises(ModelLoadError, match="no checkpoint named 'missing'"):
        engine.generate(BASE.replace(refiner_checkpoint="missing"))
    bare = Engine(load_model(files["base"]))
    with pytest.raises(InvalidRequestError, match="cannot load a refiner"):
        bare.generate(BASE)
    # A1111 quirk: the setting is written whether or not a refiner is set.
    result = bare.generate(BASE.replace(refiner_checkpoint="None", refiner_switch_by_sample_steps=True))
    assert "Refiner switch by sampling steps: True" in result.infotexts[0]


def test_the_refiner_gets_its_embedding_database(
    files: dict[str, Path], refiner_components: Components
) -> None:
    from voidprompt.prompts.embeddings import EmbeddingDatabase

    engine = Engine(load_model(files["base"]), refiner_loader=lambda name: refiner_components)
    asked: list[tuple[int, str | None]] = []

    def database_for(width: int, part: str | None) -> EmbeddingDatabase:
        asked.append((width, part))
        return EmbeddingDatabase(engine.components.tokenizer, width=width, sdxl_part=part)

    engine.give_embeddings(database_for)
    assert asked == [(32, "clip_l"), (32, "clip_g")]
    engine.generate(BASE.replace(refiner_switch_at=0.5))
    # The refiner (bigG alone) asked for its clip_g database when it was first loaded.
    assert asked == [(32, "clip_l"), (32, "clip_g"), (32, "clip_g")]
    assert engine._refiners["tiny-refiner"].encoder.embeddings_g is not None
