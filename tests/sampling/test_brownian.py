"""Brownian-tree noise: equal to k-diffusion's sampler with A1111's per-image seeds, NV numbers
derived from torchsde's seeding by hand, path consistency across step counts, batch independence."""

from __future__ import annotations

import importlib.util
import itertools
import sys
import types
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchsde

from voidprompt.errors import InvalidRequestError
from voidprompt.sampling.brownian import BrownianTreeNoiseSampler, brownian_noise_sampler_for_sigmas
from voidprompt.sampling.philox import PhiloxGenerator
from voidprompt.sampling.rng import ImageRNG

SHAPE = (4, 6, 5)
SIGMA_MIN, SIGMA_MAX = 0.5, 8.0  # exact in float32 and in torchsde's 6-digit time rounding


def tree_noise(
    x: torch.Tensor,
    seeds: list[int],
    source: Any = "CPU",
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
) -> BrownianTreeNoiseSampler:
    """The SDE samplers' noise as the Engine builds it: from a schedule whose positive sigmas span
    [sigma_min, sigma_max] and that ends at 0."""
    return brownian_noise_sampler_for_sigmas(x, torch.tensor([sigma_max, sigma_min, 0.0]), seeds, source)


@pytest.fixture(scope="module")
def kdiffusion_sampling() -> Iterator[Any]:
    """k-diffusion's sampling.py (the test-only oracle) loaded without its package, whose
    ``__init__`` needs torchvision and scikit-image."""
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("k-diffusion (test oracle) is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "sampling.py"
    package, utils = types.ModuleType("_kd_oracle"), types.ModuleType("_kd_oracle.utils")
    package.__path__ = []
    sys.modules.update({"_kd_oracle": package, "_kd_oracle.utils": utils})
    try:
        module_spec = importlib.util.spec_from_file_location("_kd_oracle.sampling", path)
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except ImportError as error:
            pytest.skip(f"k-diffusion's sampling.py cannot be loaded: {error}")
        yield module
    finally:
        for name in ("_kd_oracle", "_kd_oracle.utils", "_kd_oracle.sampling"):
            sys.modules.pop(name, None)


def test_cpu_source_equals_kdiffusion_with_seed_list(kdiffusion_sampling: Any) -> None:
    x = torch.zeros(3, *SHAPE)
    seeds = [11, 12, 13]
    sigmas = torch.tensor([8.0, 5.0, 2.5, 1.25, 0.5, 0.0])
    ours = brownian_noise_sampler_for_sigmas(x, sigmas, seeds, "CPU")
    oracle = kdiffusion_sampling.BrownianTreeNoiseSampler(x, SIGMA_MIN, SIGMA_MAX, seed=seeds)
    for sigma, sigma_next in [(8.0, 5.0), (5.0, 2.5), (3.1, 2.2), (2.5, 0.5), (0.5, 8.0)]:
        s, sn = torch.tensor(sigma), torch.tensor(sigma_next)
        torch.testing.assert_close(ours(s, sn), oracle(s, sn), rtol=0, atol=0)


def test_cpu_source_equals_hand_built_torchsde_trees() -> None:
    x = torch.zeros(2, *SHAPE)
    ours = tree_noise(x, [3, 4], "CPU")
    for i, seed in enumerate([3, 4]):
        tree = torchsde.BrownianTree(
            torch.tensor(SIGMA_MIN), torch.zeros(SHAPE), torch.tensor(SIGMA_MAX), entropy=seed
        )
        # Steps go down in sigma: W(sigma_next) - W(sigma) = -(W(6) - W(2)) over sqrt(4).
        expected = -tree(torch.tensor(2.0), torch.tensor(6.0)) / 2.0
        torch.testing.assert_close(ours(torch.tensor(6.0), torch.tensor(2.0))[i], expected, rtol=0, atol=1e-7)


def _top_level_normals(seed: int) -> int:
    # torchsde draws the whole interval's increment from the first of three SeedSequence words.
    return int(np.random.SeedSequence(entropy=seed, pool_size=24).generate_state(3)[0])


@pytest.mark.parametrize("seed", [0, 77])
def test_nv_source_draws_tree_noise_from_philox(seed: int) -> None:
    x = torch.zeros(1, *SHAPE)
    sampler = tree_noise(x, [seed], "NV")
    # The whole interval: W = randn(top seed) * sqrt(7.5); the step downwards negates it.
    expected = -torch.from_numpy(PhiloxGenerator(_top_level_normals(seed)).randn(SHAPE))
    got = sampler(torch.tensor(SIGMA_MAX), torch.tensor(SIGMA_MIN))[0]
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    cpu = tree_noise(x, [seed], "CPU")
    assert not torch.equal(cpu(torch.tensor(SIGMA_MAX), torch.tensor(SIGMA_MIN)), got[None])


def test_hook_leaves_other_torchsde_users_alone() -> None:
    def plain() -> torch.Tensor:
        tree = torchsde.BrownianTree(0.0, torch.zeros(3), 1.0, entropy=5)
        return tree(0.0, 1.0)

    before = plain()
    tree_noise(torch.zeros(1, 3), [5], "NV", 0.1, 1.0)(1.0, 0.1)
    assert torch.equal(plain(), before)
    gen = torch.Generator().manual_seed(_top_level_normals(5))
    assert torch.equal(before, torch.randn(3, generator=gen))


@pytest.mark.parametrize("source", ["CPU", "NV"])
def test_same_path_for_any_step_count(source: str) -> None:
    x = torch.zeros(2, *SHAPE)
    coarse_sigmas = [8.0, 6.0, 4.0, 2.0, 0.5]
    fine_sigmas = [8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.25, 0.5]
    coarse = tree_noise(x, [21, 22], source)
    fine = tree_noise(x, [21, 22], source)

    def increment(sampler: Any, a: float, b: float) -> torch.Tensor:
        # Undo the unit-variance scaling: W(b) - W(a).
        return sampler(torch.tensor(a), torch.tensor(b)) * abs(b - a) ** 0.5

    fine_steps = {(a, b): increment(fine, a, b) for a, b in itertools.pairwise(fine_sigmas)}
    for a, b in itertools.pairwise(coarse_sigmas):
        summed = sum(value for (s, t), value in fine_steps.items() if a >= s and t >= b)
        torch.testing.assert_close(increment(coarse, a, b), summed, rtol=0, atol=2e-5)


def test_noise_is_unit_variance_and_direction_flips_sign() -> None:
    x = torch.zeros(1, 4, 64, 64)
    sampler = tree_noise(x, [123], "CPU", 0.03, 14.6)
    down = sampler(torch.tensor(3.0), torch.tensor(2.0))
    assert abs(down.double().mean().item()) < 0.05 and abs(down.double().var().item() - 1) < 0.06
    torch.testing.assert_close(sampler(torch.tensor(2.0), torch.tensor(3.0)), -down)


@pytest.mark.parametrize("source", ["CPU", "NV"])
def test_batch_images_are_independent_and_match_single(source: str) -> None:
    x = torch.zeros(3, *SHAPE)
    seeds = [5, 6, 7]
    batch = tree_noise(x, seeds, source)
    noise = batch(torch.tensor(7.0), torch.tensor(3.0))
    for i, seed in enumerate(seeds):
        alone = tree_noise(x[:1], [seed], source)
        assert torch.equal(noise[i], alone(torch.tensor(7.0), torch.tensor(3.0))[0])
    flat = noise.reshape(3, -1).double()
    correlation = torch.corrcoef(flat)
    assert (correlation - torch.eye(3)).abs().max() < 0.35  # 120 values each: loose, but not equal


def test_ensd_plays_no_part() -> None:
    x = torch.zeros(1, *SHAPE)
    before = tree_noise(x, [40])(torch.tensor(8.0), torch.tensor(4.0))
    rng = ImageRNG(SHAPE, [40], eta_noise_seed_delta=31337)
    rng.next()
    rng.next()
    after = tree_noise(x, [40])(torch.tensor(8.0), torch.tensor(4.0))
    shifted = tree_noise(x, [40 + 31337])(torch.tensor(8.0), torch.tensor(4.0))
    assert torch.equal(before, after)
    assert not torch.equal(before, shifted)


def test_float_sigmas_and_sigma_schedule() -> None:
    x = torch.zeros(1, *SHAPE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # queries inside the interval must not warn
        a = tree_noise(x, [1])(6.0, 2.0)
        b = brownian_noise_sampler_for_sigmas(x, torch.tensor([8.0, 2.0, 0.5, 0.0]), [1])(6.0, 2.0)
    assert torch.equal(a, b)


def test_bad_arguments_raise() -> None:
    x = torch.zeros(2, *SHAPE)
    with pytest.raises(InvalidRequestError, match="one seed per image"):
        tree_noise(x, [1])
    with pytest.raises(InvalidRequestError, match="randn_source"):
        tree_noise(x, [1, 2], "TPU")
    with pytest.raises(InvalidRequestError, match="positive sigma"):
        brownian_noise_sampler_for_sigmas(x, torch.zeros(3), [1, 2])
