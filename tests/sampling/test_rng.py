"""Seeds and ImageRNG against A1111's behaviour, with expected noise built in the tests from plain
torch generators (CPU) or PhiloxGenerator (NV) and hand-derived offsets."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from voidprompt.errors import InvalidRequestError
from voidprompt.sampling.philox import PhiloxGenerator
from voidprompt.sampling.rng import (
    ImageRNG,
    batch_seeds,
    create_random_tensors,
    fixed_seed,
    img2img_noise,
    randn_local,
    slerp,
)

SHAPE = (4, 6, 5)


def cpu_draws(seed: int, *shapes: tuple[int, ...]) -> list[torch.Tensor]:
    """Successive torch.randn draws from one CPU generator seeded with ``seed``."""
    gen = torch.Generator("cpu").manual_seed(seed)
    return [torch.randn(shape, generator=gen) for shape in shapes]


# --- seeds -----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", ["", None, -1, "-1", "abc", "1.5", -1.0])
def test_fixed_seed_random_cases(seed: object) -> None:
    expected = random.Random(7).randrange(4294967294)
    assert fixed_seed(seed, rand=random.Random(7)) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(("seed", "expected"), [(42, 42), ("42", 42), (" 9 ", 9), (3.0, 3), (0, 0), (-5, -5)])
def test_fixed_seed_keeps_given_seeds(seed: object, expected: int) -> None:
    assert fixed_seed(seed, rand=random.Random(0)) == expected  # type: ignore[arg-type]


def test_fixed_seed_random_range_excludes_top() -> None:
    class Top(random.Random):
        def randrange(self, *args: object, **kwargs: object) -> int:
            # A1111 asks for randrange(4294967294); record that bound.
            assert args == (4294967294,)
            return 4294967293

    assert fixed_seed(None, rand=Top()) == 4294967293


@pytest.mark.parametrize("seed", [2.5, True, [1]])
def test_fixed_seed_rejects_non_integers(seed: object) -> None:
    with pytest.raises(InvalidRequestError, match="seed"):
        fixed_seed(seed)  # type: ignore[arg-type]


def test_batch_seeds_plain_and_with_subseed() -> None:
    assert batch_seeds(10, 20, 0.0, 3) == ([10, 11, 12], [20, 21, 22])
    assert batch_seeds(10, 20, 0.5, 3) == ([10, 10, 10], [20, 21, 22])
    assert batch_seeds(10, 20, 0.0, 0) == ([], [])


# --- sources -----------------------------------------------------------------------------------


def test_cpu_source_is_a_seeded_cpu_generator() -> None:
    rng = ImageRNG(SHAPE, [7, 8])
    first, second, third = rng.next(), rng.next(), rng.next()
    for i, seed in enumerate([7, 8]):
        a, b, c = cpu_draws(seed, SHAPE, SHAPE, SHAPE)
        assert torch.equal(first[i], a)
        assert torch.equal(second[i], b)
        assert torch.equal(third[i], c)
    assert first.shape == (2, *SHAPE) and first.dtype == torch.float32 and first.device.type == "cpu"


def test_gpu_source_on_cpu_device_equals_cpu_source() -> None:
    cpu = ImageRNG(SHAPE, [3, 4], source="CPU")
    gpu = ImageRNG(SHAPE, [3, 4], source="GPU", device=torch.device("cpu"))
    for _ in range(2):
        assert torch.equal(cpu.next(), gpu.next())


def test_nv_source_is_philox_with_one_offset_per_draw() -> None:
    rng = ImageRNG(SHAPE, [11, 12], source="NV")
    first, second = rng.next(), rng.next()
    for i, seed in enumerate([11, 12]):
        gen = PhiloxGenerator(seed)
        assert torch.equal(first[i], torch.from_numpy(gen.randn(SHAPE)))
        assert torch.equal(second[i], torch.from_numpy(gen.randn(SHAPE)))


def test_randn_local_is_a_fresh_first_draw() -> None:
    assert torch.equal(randn_local(5, SHAPE), cpu_draws(5, SHAPE)[0])
    assert torch.equal(randn_local(5, SHAPE, "NV"), torch.from_numpy(PhiloxGenerator(5).randn(SHAPE)))


# --- batch == single image ---------------------------------------------------------------------


@pytest.mark.parametrize("source", ["CPU", "GPU", "NV"])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"subseed_strength": 0.4},
        {"seed_resize_from_h": 64, "seed_resize_from_w": 24},
        {"subseed_strength": 0.7, "seed_resize_from_h": 24, "seed_resize_from_w": 56},
        {"eta_noise_seed_delta": 31337},
    ],
)
def test_image_in_batch_equals_image_alone(source: str, options: dict[str, float]) -> None:
    seeds, subseeds = [100, 200, 300], [5, 6, 7]
    batch = ImageRNG(SHAPE, seeds, subseeds=subseeds, source=source, **options)  # type: ignore[arg-type]
    batch_draws = [batch.next() for _ in range(3)]
    for i in range(3):
        alone = ImageRNG(SHAPE, [seeds[i]], subseeds=[subseeds[i]], source=source, **options)  # type: ignore[arg-type]
        for draw in batch_draws:
            assert torch.equal(draw[i], alone.next()[0])


def test_missing_subseed_means_subseed_zero() -> None:
    # A1111 quirk: with more seeds than subseeds, the extra images use subseed 0.
    short = ImageRNG(SHAPE, [1, 2], subseeds=[9], subseed_strength=0.5).first()
    explicit = ImageRNG(SHAPE, [1, 2], subseeds=[9, 0], subseed_strength=0.5).first()
    assert torch.equal(short, explicit)


# --- subseeds and slerp ------------------------------------------------------------------------


def test_subseed_strength_zero_is_plain_noise() -> None:
    mixed = ImageRNG(SHAPE, [1], subseeds=[99], subseed_strength=0.0).first()
    assert torch.equal(mixed[0], cpu_draws(1, SHAPE)[0])


def test_subseed_strength_one_is_subseed_noise() -> None:
    mixed = ImageRNG(SHAPE, [1], subseeds=[99], subseed_strength=1.0).first()
    torch.testing.assert_close(mixed[0], cpu_draws(99, SHAPE)[0], rtol=0, atol=1e-6)


def test_subseed_does_not_touch_the_image_stream() -> None:
    rng = ImageRNG(SHAPE, [1], subseeds=[99], subseed_strength=0.3)
    rng.first()
    assert torch.equal(rng.next()[0], cpu_draws(1, SHAPE, SHAPE)[1])


def test_slerp_angle_per_channel_and_column() -> None:
    # One channel, two rows, two columns. Column 0: orthogonal unit vectors (angle 90 deg);
    # column 1: unit vectors 60 deg apart. At val=0.5 slerp lands halfway along each arc:
    # column 0 -> (cos 45, sin 45); column 1 -> (cos 30, sin 30). A norm over the whole tensor
    # would not give these.
    low = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    high = torch.tensor([[[0.0, 0.5], [1.0, math.sqrt(3) / 2]]])
    expected = torch.tensor([[[math.sqrt(0.5), math.sqrt(3) / 2], [math.sqrt(0.5), 0.5]]])
    torch.testing.assert_close(slerp(0.5, low, high), expected, rtol=0, atol=1e-6)


def test_slerp_endpoints() -> None:
    low, high = cpu_draws(1, SHAPE)[0], cpu_draws(2, SHAPE)[0]
    torch.testing.assert_close(slerp(0.0, low, high), low, rtol=0, atol=1e-6)
    torch.testing.assert_close(slerp(1.0, low, high), high, rtol=0, atol=1e-6)


def test_slerp_near_parallel_fallback_is_mirrored() -> None:
    # dot.mean() > 0.9995 -> A1111's linear fallback low*val + high*(1-val): val=0 gives HIGH.
    low = cpu_draws(1, SHAPE)[0]
    high = low * 1.5 + 1e-4 * cpu_draws(2, SHAPE)[0]
    torch.testing.assert_close(slerp(0.25, low, high), 0.25 * low + 0.75 * high)
    torch.testing.assert_close(slerp(0.0, low, high), high)


# --- seed resize -------------------------------------------------------------------------------


def test_seed_resize_pastes_smaller_noise_in_the_centre() -> None:
    # Target (1, 4, 6); resize-from 16x16 px -> (1, 2, 2). dy = (4-2)//2 = 1, dx = (6-2)//2 = 2.
    out = ImageRNG((1, 4, 6), [5], seed_resize_from_h=16, seed_resize_from_w=16).first()[0]
    small = cpu_draws(5, (1, 2, 2))[0]
    canvas = cpu_draws(5, (1, 4, 6))[0]
    expected = canvas.clone()
    expected[:, 1:3, 2:4] = small
    assert torch.equal(out, expected)


def test_seed_resize_odd_margin_pastes_right_of_centre() -> None:
    # Target (1, 5, 4); from (1, 2, 1): dy = 3//2 = 1, dx = 3//2 = 1 -> rows 1..2, column 1.
    out = ImageRNG((1, 5, 4), [6], seed_resize_from_h=16, seed_resize_from_w=8).first()[0]
    expected = cpu_draws(6, (1, 5, 4))[0].clone()
    expected[:, 1:3, 1:2] = cpu_draws(6, (1, 2, 1))[0]
    assert torch.equal(out, expected)


def test_seed_resize_crops_larger_noise() -> None:
    # Target (1, 2, 2); from 32x32 px -> (1, 4, 4): dy = dx = -1 -> span 4-2 = 2, source from 1.
    out = ImageRNG((1, 2, 2), [8], seed_resize_from_h=32, seed_resize_from_w=32).first()[0]
    big = cpu_draws(8, (1, 4, 4))[0]
    assert torch.equal(out, big[:, 1:3, 1:3])


def test_seed_resize_odd_crop_leaves_last_row_and_column() -> None:
    # Target (1, 3, 5); from 48x64 px -> (1, 6, 8). dy = (3-6)//2 = -2, dx = (5-8)//2 = -2 (floor),
    # so the copied span is 6-4 = 2 rows and 8-4 = 4 columns from (2, 2): A1111 quirk, row 2 and
    # column 4 of the target keep the full-size draw.
    out = ImageRNG((1, 3, 5), [9], seed_resize_from_h=48, seed_resize_from_w=64).first()[0]
    big = cpu_draws(9, (1, 6, 8))[0]
    canvas = cpu_draws(9, (1, 3, 5))[0]
    expected = canvas.clone()
    expected[:, 0:2, 0:4] = big[:, 2:4, 2:6]
    assert torch.equal(out, expected)
    assert torch.equal(out[:, 2, :], canvas[:, 2, :])


def test_seed_resize_needs_both_sides_and_continues_the_stream() -> None:
    one_side = ImageRNG(SHAPE, [4], seed_resize_from_h=64, seed_resize_from_w=0).first()
    assert torch.equal(one_side[0], cpu_draws(4, SHAPE)[0])
    rng = ImageRNG(SHAPE, [4], seed_resize_from_h=64, seed_resize_from_w=64)
    rng.first()
    # The image stream gave the full-size canvas once; the next draw is its second.
    assert torch.equal(rng.next()[0], cpu_draws(4, SHAPE, SHAPE)[1])


# --- ENSD --------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["CPU", "NV"])
def test_ensd_changes_later_draws_only(source: str) -> None:
    plain = ImageRNG(SHAPE, [50, 51], source=source)  # type: ignore[arg-type]
    ensd = ImageRNG(SHAPE, [50, 51], source=source, eta_noise_seed_delta=31337)  # type: ignore[arg-type]
    assert torch.equal(plain.next(), ensd.next())
    later = [ensd.next(), ensd.next()]
    for i, seed in enumerate([50, 51]):
        # Re-seeded with seed + ENSD: the first and second draws of that new stream.
        if source == "CPU":
            expected = cpu_draws(seed + 31337, SHAPE, SHAPE)
        else:
            gen = PhiloxGenerator(seed + 31337)
            expected = [torch.from_numpy(gen.randn(SHAPE)) for _ in range(2)]
        assert torch.equal(later[0][i], expected[0])
        assert torch.equal(later[1][i], expected[1])
    assert not torch.equal(plain.next(), later[0])


def test_noise_sampler_draws_next() -> None:
    rng = ImageRNG(SHAPE, [1])
    rng.first()
    sample = rng.noise_sampler()
    assert torch.equal(sample(14.6, 10.0)[0], cpu_draws(1, SHAPE, SHAPE)[1])
    assert torch.equal(sample(torch.tensor(10.0), torch.tensor(0.0))[0], cpu_draws(1, SHAPE, SHAPE, SHAPE)[2])


# --- helpers -----------------------------------------------------------------------------------


def test_create_random_tensors_is_first_noise() -> None:
    out = create_random_tensors(SHAPE, [3, 4], subseeds=[1, 2], subseed_strength=0.2)
    expected = ImageRNG(SHAPE, [3, 4], subseeds=[1, 2], subseed_strength=0.2).first()
    assert torch.equal(out, expected)
    plain = create_random_tensors(SHAPE, [3])
    assert torch.equal(plain[0], cpu_draws(3, SHAPE)[0])


def test_img2img_noise_scales_the_first_draw() -> None:
    assert torch.equal(img2img_noise(ImageRNG(SHAPE, [2])), cpu_draws(2, SHAPE)[0][None])
    scaled = img2img_noise(ImageRNG(SHAPE, [2]), initial_noise_multiplier=0.5)
    assert torch.equal(scaled, cpu_draws(2, SHAPE)[0][None] * 0.5)


def test_noise_is_standard_normal() -> None:
    x = ImageRNG((4, 64, 64), [1, 2], source="NV").first().double()
    assert abs(x.mean().item()) < 0.03 and abs(x.var().item() - 1) < 0.04
    assert np.isfinite(x.numpy()).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"shape": (4, 8), "seeds": [1]}, "shape"),
        ({"shape": (4, 0, 8), "seeds": [1]}, "shape"),
        ({"shape": SHAPE, "seeds": []}, "seeds"),
        ({"shape": SHAPE, "seeds": [2**64]}, "seed"),
        ({"shape": SHAPE, "seeds": [1.5]}, "seed"),
        ({"shape": SHAPE, "seeds": [1], "source": "TPU"}, "randn_source"),
    ],
)
def test_bad_arguments_raise(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(InvalidRequestError, match=match):
        ImageRNG(**kwargs)  # type: ignore[arg-type]
