"""PhiloxGenerator: the Philox core against Random123's known answers, the normals against a
plain-Python second implementation and CUDA's published numbers, and the offset semantics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from voidprompt.errors import InvalidRequestError
from voidprompt.sampling.philox import PhiloxGenerator, philox4x32

# Random123 tests/kat_vectors, the philox4x32 lines: rounds, counter[4], key[2] -> output[4].
KAT_VECTORS = [
    (7, [0, 0, 0, 0], [0, 0], [0x5F6FB709, 0x0D893F64, 0x4F121F81, 0x4F730A48]),
    (7, [0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x5207DDC2, 0x45165E59, 0x4D8EE751, 0x8C52F662]),
    (
        7,
        [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344],
        [0xA4093822, 0x299F31D0],
        [0x4DFCCABA, 0x190A87F0, 0xC47362BA, 0xB6B5242A],
    ),
    (10, [0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
    (10, [0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
    (
        10,
        [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344],
        [0xA4093822, 0x299F31D0],
        [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1],
    ),
]

# torch.randn(3, 4, device="cuda") after torch.manual_seed(0), as published with A1111's NV
# generator. Printed to 8 digits from a float32 computation, so they agree with A1111's float64
# Box-Muller to within a couple of float32 ulps, not bit for bit.
CUDA_SEED0_3X4 = [
    [-0.92466259, -0.42534415, -2.6438457, 0.14518388],
    [-0.12086647, -0.57972564, -0.62285122, -0.32838709],
    [-1.07454231, -0.36314407, -1.67105067, 2.26550497],
]


@pytest.mark.parametrize(("rounds", "counter", "key", "expected"), KAT_VECTORS)
def test_philox_known_answers(rounds: int, counter: list[int], key: list[int], expected: list[int]) -> None:
    out = philox4x32(np.array(counter, dtype=np.uint32).reshape(4, 1), np.array(key, dtype=np.uint32), rounds)
    assert out[:, 0].tolist() == expected


def test_philox_vectorised_equals_one_at_a_time() -> None:
    counters = np.array([[0, 1, 0xFFFFFFFF], [0, 0, 7], [5, 6, 0], [0, 0, 0xFFFFFFFF]], dtype=np.uint32)
    keys = np.array([[0, 1, 2], [3, 0xFFFFFFFF, 0]], dtype=np.uint32)
    together = philox4x32(counters, keys)
    for i in range(3):
        alone = philox4x32(counters[:, i : i + 1], keys[:, i])
        assert together[:, i].tolist() == alone[:, 0].tolist()


# A second implementation with Python integers and the math module, written from the Philox
# paper and curand's Box-Muller, to check the NumPy one.
def _philox_py(counter: list[int], key: list[int], rounds: int = 10) -> list[int]:
    c, k = list(counter), list(key)
    mask = 0xFFFFFFFF
    for r in range(rounds):
        if r:
            k = [(k[0] + 0x9E3779B9) & mask, (k[1] + 0xBB67AE85) & mask]
        p0, p1 = c[0] * 0xD2511F53, c[2] * 0xCD9E8D57
        c = [(p1 >> 32) ^ c[1] ^ k[0], p1 & mask, (p0 >> 32) ^ c[3] ^ k[1], p0 & mask]
    return c


def _randn_py(seed: int, offset: int, index: int) -> float:
    seed &= (1 << 64) - 1
    x, y, _, _ = _philox_py([offset, 0, index, 0], [seed & 0xFFFFFFFF, seed >> 32])
    inv = 2.0**-32  # 2.3283064e-10f is exactly 2**-32
    inv_2pi = float(np.float32(2.3283064e-10) * np.float32(6.2831855))
    u = x * inv + inv / 2
    v = y * inv_2pi + inv_2pi / 2
    return float(np.float32(math.sqrt(-2.0 * math.log(u)) * math.sin(v)))


@pytest.mark.parametrize("seed", [0, 1, 12345, 4294967293, 2**40 + 3, -7])
def test_randn_matches_plain_python(seed: int) -> None:
    gen = PhiloxGenerator(seed)
    first = gen.randn((2, 5))
    second = gen.randn(7)
    np.testing.assert_allclose(first.ravel(), [_randn_py(seed, 0, i) for i in range(10)], rtol=0, atol=1e-7)
    np.testing.assert_allclose(second, [_randn_py(seed, 1, i) for i in range(7)], rtol=0, atol=1e-7)


def test_seed0_matches_published_cuda_numbers() -> None:
    out = PhiloxGenerator(0).randn((3, 4))
    assert out.dtype == np.float32 and out.shape == (3, 4)
    np.testing.assert_allclose(out, CUDA_SEED0_3X4, rtol=0, atol=4e-7)


def test_offset_counts_calls_not_elements() -> None:
    gen = PhiloxGenerator(99)
    a, b = gen.randn(6), gen.randn(4)
    assert gen.offset == 2
    # Each call restarts the element index under the next offset ...
    np.testing.assert_array_equal(b, PhiloxGenerator(99, offset=1).randn(4))
    # ... so the prefix of a bigger call at the same offset is the smaller call ...
    combined = PhiloxGenerator(99).randn(10)
    np.testing.assert_array_equal(combined[:6], a)
    # ... but two calls are not one call of the combined size.
    assert not np.array_equal(combined[6:], b)


def test_negative_seed_is_twos_complement() -> None:
    np.testing.assert_array_equal(PhiloxGenerator(-1).randn(8), PhiloxGenerator(2**64 - 1).randn(8))


def test_high_seed_bits_matter() -> None:
    assert not np.array_equal(PhiloxGenerator(5).randn(8), PhiloxGenerator(5 + 2**32).randn(8))


def test_distribution_is_standard_normal_and_calls_independent() -> None:
    gen = PhiloxGenerator(2024)
    a = gen.randn(200_000).astype(np.float64)
    b = gen.randn(200_000).astype(np.float64)
    # Standard errors: mean 1/sqrt(n) ~ 0.0022, variance sqrt(2/n) ~ 0.0032; bounds at ~5 sigma.
    for x in (a, b):
        assert abs(x.mean()) < 0.012
        assert abs(x.var() - 1.0) < 0.016
        assert abs(np.mean(np.abs(x) > 1.959964) - 0.05) < 0.0025
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.012
    assert abs(np.corrcoef(a[:-1], a[1:])[0, 1]) < 0.012


def test_bad_inputs_raise() -> None:
    with pytest.raises(InvalidRequestError, match="seed"):
        PhiloxGenerator(2**64)
    with pytest.raises(InvalidRequestError, match="shape"):
        PhiloxGenerator(0).randn((2, -1))
    with pytest.raises(InvalidRequestError, match="uint32"):
        philox4x32(np.zeros((4, 1), dtype=np.int64), np.zeros(2, dtype=np.uint32))
