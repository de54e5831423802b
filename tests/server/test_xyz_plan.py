"""The X/Y/Z plot's cells as planned before anything runs: seeds, settings, prompts, sizes, limits.

Each expected value follows A1111 1.10's run(): fix_seed, vary_seeds, the axes applied in X, Y, Z
order to a copy of the request, the axis's override_settings.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from voidprompt.sampling.rng import RANDOM_SEED_RANGE
from voidprompt.server.checkpoints import ModelRegistry, NotFoundError
from voidprompt.server.generation import Options
from voidprompt.server.limits import LimitError, Limits
from voidprompt.server.models import Txt2ImgRequest
from voidprompt.server.xyz import PlotPlan, ScriptArgsError, plan_plot, script_args

pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> ModelRegistry:
    folder = tmp_path_factory.mktemp("xyz-models")
    shutil.copy(tiny_checkpoint, folder / "tiny.safetensors")
    registry = ModelRegistry([folder], [], [folder / "VAE"])
    registry.refresh()
    return registry


def plan(registry: ModelRegistry, body: dict[str, Any] | None = None, **changes: Any) -> PlotPlan:
    request = Txt2ImgRequest(
        **{"prompt": "a red ball", "seed": 100, "steps": 2, "width": 64, "height": 64, **(body or {})},
        script_name="x/y/z plot",
        script_args=script_args(**changes),
    )
    return plan_plot(request, Options(), Limits(), registry)


def test_vary_seeds_moves_each_cell_by_its_position(registry: ModelRegistry) -> None:
    steps_by_cfg = dict(x_type=4, x_values="1,2", y_type=6, y_values="3,7")
    fixed = plan(registry, **steps_by_cfg)
    assert [c.built.request.seed for c in fixed.cells] == [100] * 4
    varied = plan(registry, **steps_by_cfg, vary_seeds_x=True, vary_seeds_y=True)
    assert [c.built.request.seed for c in varied.cells] == [100, 101, 102, 103]
    only_y = plan(registry, **steps_by_cfg, vary_seeds_y=True)
    assert [c.built.request.seed for c in only_y.cells] == [100, 100, 101, 101]
    # A1111 adds the offset after the Seed axis set its value.
    seeds = plan(registry, x_type=1, x_values="10, 20", vary_seeds_x=True)
    assert [c.built.request.seed for c in seeds.cells] == [10, 21]


def test_a_random_seed_is_drawn_once_for_the_plot_unless_kept(registry: ModelRegistry) -> None:
    drawn = plan(registry, {"seed": -1, "subseed": -1}, x_type=4, x_values="1,2")
    seeds = {c.built.request.seed for c in drawn.cells}
    subseeds = {c.built.request.subseed for c in drawn.cells}
    assert len(seeds) == 1 and len(subseeds) == 1 and 0 <= seeds.pop() < RANDOM_SEED_RANGE
    kept = plan(registry, {"seed": -1}, x_type=4, x_values="1,2", no_fixed_seeds=True)
    assert [c.built.request.seed for c in kept.cells] == [-1, -1]
    fixed_axis = plan(registry, x_type=1, x_values="-1, 7")
    assert fixed_axis.grid_extra(with_z=True)["Fixed X Values"] == f"{fixed_axis.x.values[0]}, 7"
    assert "Fixed X Values" not in plan(registry, x_type=1, x_values="7", no_fixed_seeds=True).grid_extra(
        True
    )


def test_axes_apply_in_order_to_prompts_styles_and_size(registry: ModelRegistry) -> None:
    sr = plan(
        registry, {"negative_prompt": "red"}, x_type=7, x_values="red, blue", y_type=7, y_values="ball,cube"
    )
    assert [(c.built.request.prompt, c.built.request.negative_prompt) for c in sr.cells] == [
        ("a red ball", "red"), ("a blue ball", "blue"), ("a red cube", "red"), ("a blue cube", "blue"),
    ]  # fmt: skip
    order = plan(registry, {"prompt": "red, ball, shiny"}, x_type=8, x_values="ball, shiny")
    assert [c.built.request.prompt for c in order.cells] == ["red, ball, shiny", "red, shiny, ball"]
    with pytest.raises(ScriptArgsError, match="Prompt order did not find 'cube'"):
        plan(registry, x_type=8, x_values="ball, cube")
    styles = plan(registry, {"styles": ["base"]}, x_type=30, x_values_dropdown=["one, two"])
    assert styles.cells[0].built.request.styles == ("base", "one", " two")
    sizes = plan(registry, x_type=41, x_values="64x32, 32 x 64")
    assert [(c.built.request.width, c.built.request.height) for c in sizes.cells] == [(64, 32), (32, 64)]
    with pytest.raises(ScriptArgsError, match="Size value '64X32' is not WIDTHxHEIGHT"):
        plan(registry, x_type=41, x_values="64X32")


def test_setting_axes_override_for_their_cell_only(registry: ModelRegistry) -> None:
    body = {
        "override_settings": {"eta_noise_seed_delta": 31337},
        "override_settings_restore_afterwards": False,
    }
    clip = plan(registry, body, x_type=24, x_values="1, 2", y_type=36, y_values_dropdown=["True"])
    requests = [c.built.request for c in clip.cells]
    assert [r.clip_skip for r in requests] == [1, 2]
    assert all(r.sgm_noise_multiplier and r.eta_noise_seed_delta == 31337 for r in requests)
    beta = plan(registry, x_type=21, x_values="0.5, 0.7", y_type=22, y_values="0.9")
    assert [(c.built.request.beta_dist_alpha, c.built.request.beta_dist_beta) for c in beta.cells] == [
        (0.5, 0.9), (0.7, 0.9),
    ]  # fmt: skip
    # The client's own override is kept afterwards, as it asked; the axes' settings are not.
    assert all(c.built.persist == {"eta_noise_seed_delta": 31337} for c in clip.cells)


def test_checkpoint_axis_names_models_and_runs_outermost(registry: ModelRegistry) -> None:
    models = plan(
        registry, x_type=11, x_values_dropdown=["tiny", "tiny.safetensors"], y_type=4, y_values="1,2"
    )
    assert [c.built.model for c in models.cells] == ["tiny", "tiny.safetensors"] * 2
    assert models.x.labels == ["tiny", "tiny.safetensors"]
    assert models.order == [0, 2, 1, 3]  # each model's cells together
    with pytest.raises(NotFoundError, match="model 'nope' not found"):
        plan(registry, x_type=11, x_values_dropdown=["nope"])


def test_the_plot_is_bounded_by_the_server_limits(registry: ModelRegistry) -> None:
    with pytest.raises(LimitError, match="101x1x1 cells of 1 images each is over"):
        plan(registry, x_type=1, x_values="1-101")
    with pytest.raises(LimitError, match="steps=151"):
        plan(registry, x_type=4, x_values="2, 151")


def test_hires_upscaler_axis_accepts_the_servers_model_upscalers(
    registry: ModelRegistry, tmp_path: Path
) -> None:
    from voidprompt.models.upscalers.registry import Upscalers
    from voidprompt.server.xyz import axis_options
    from voidprompt.testing.tiny_upscalers import write_tiny_rrdb

    write_tiny_rrdb(tmp_path / "ESRGAN" / "4x-Tiny.pth", "old", nf=4, gc=4)
    x_type = [o.label for o in axis_options(False)].index("Hires upscaler")
    request = Txt2ImgRequest(
        prompt="a red ball", seed=100, steps=2, width=64, height=64, enable_hr=True,
        script_name="x/y/z plot",
        script_args=script_args(x_type=x_type, x_values_dropdown=["Latent", "4x-Tiny"]),
    )  # fmt: skip
    planned = plan_plot(request, Options(), Limits(), registry, upscalers=Upscalers.in_models_dir(tmp_path))
    assert [c.built.request.hr_upscaler for c in planned.cells] == ["Latent", "4x-Tiny"]
    # Without the server's folders the same name is not an upscaler this server has.
    with pytest.raises(Exception, match="4x-Tiny"):
        plan_plot(request, Options(), Limits(), registry)
