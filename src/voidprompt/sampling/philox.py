"""CUDA's ``torch.randn`` on any machine: Philox4x32-10 plus Box-Muller in NumPy.

A1111's "NV" random source (setting ``randn_source``) uses such a generator so that CPU and AMD/Apple
users get the noise an NVIDIA card would give for a seed. This module reproduces A1111's NV source
exactly, which in turn reproduces torch's CUDA kernel as follows.

How torch's CUDA ``randn`` (float32) uses curand's Philox4x32-10:

* Each thread ``i`` of the launch calls ``curand_init(seed, subsequence=i, offset, &state)``. That
  sets the Philox key to the seed's two 32-bit halves (low word first), the 128-bit counter to
  ``(offset // 4, 0, i_low, i_high)`` (the subsequence occupies the two upper counter words), and
  skips ``offset % 4`` outputs.
* The generator's offset starts at 0 after ``manual_seed`` and grows by 4 per ``randn`` call for
  any tensor that fits in one grid-stride pass, so call ``k`` uses counter word 0 equal to ``k``.
* ``curand_normal4`` turns one Philox output block ``(x0, x1, x2, x3)`` into four normals by two
  Box-Muller transforms; the element with linear index ``i`` is the first of them,
  ``sqrt(-2 ln u) * sin(v)`` with ``u`` from ``x0`` and ``v`` from ``x1``.

That mapping (element ``i`` <- thread ``i``'s first normal) holds while the tensor has no more
elements than the launch has threads (multiprocessor count x resident threads per multiprocessor:
about 200k-270k on current cards; an SD latent at 512x512 has 16k). Larger tensors wrap the grid
stride on a real GPU and are not reproduced - neither does A1111.

Precision: A1111 evaluates Box-Muller in float64 with curand's float32 constants (NumPy promotes
uint32 x float32 to float64) and rounds the result to float32. CUDA evaluates it in float32, so
the two can differ in the last bit or two of some values; A1111 is what voidprompt matches.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from voidprompt.errors import InvalidRequestError

# Philox4x32 multipliers and Weyl key increments (Salmon et al., "Parallel random numbers: as easy
# as 1, 2, 3", SC'11; the Random123 library and curand use the same constants).
PHILOX_M0 = np.uint64(0xD2511F53)
PHILOX_M1 = np.uint64(0xCD9E8D57)
PHILOX_W0 = np.uint32(0x9E3779B9)
PHILOX_W1 = np.uint32(0xBB67AE85)

# curand's Box-Muller constants, both float32: CURAND_2POW32_INV = 2.3283064e-10f (exactly 2**-32
# once rounded) and CURAND_2POW32_INV_2PI = 2.3283064e-10f * 6.2831855f (the product rounds to the
# same float32 whether formed in float32, as CUDA does, or in float64, as A1111 does).
TWO_POW32_INV = np.float32(2.3283064e-10)
TWO_POW32_INV_2PI = np.float32(2.3283064e-10 * 6.2831855)

_U64_MASK = (1 << 64) - 1
_U32_MASK = (1 << 32) - 1
_SEED_MIN = -(1 << 63)

UInt32Array = npt.NDArray[np.uint32]
Float32Array = npt.NDArray[np.float32]


def philox4x32(counter: UInt32Array, key: UInt32Array, rounds: int = 10) -> UInt32Array:
    """Philox4x32-R on many counters at once.

    ``counter`` is ``(4, N)`` uint32 (word 0 first); ``key`` is ``(2, N)``, or ``(2,)`` for one key
    shared by all counters, uint32.
    Returns a new ``(4, N)`` uint32 array; the inputs are not modified.
    """
    if counter.dtype != np.uint32 or key.dtype != np.uint32:
        raise InvalidRequestError(
            f"philox4x32 needs uint32 arrays, got counter {counter.dtype} and key {key.dtype}"
        )
    if counter.shape[0] != 4 or key.shape[0] != 2:
        raise InvalidRequestError(
            "philox4x32 needs counter shaped (4, N) and key shaped (2, N) or (2,), "
            f"got {counter.shape} and {key.shape}"
        )
    c0, c1, c2, c3 = (counter[i].copy() for i in range(4))
    # A (2,) key becomes (2, 1) arrays so it broadcasts without NumPy's scalar-overflow warnings.
    keys = key.reshape(2, -1)
    k0, k1 = keys[0].copy(), keys[1].copy()
    for round_index in range(rounds):
        if round_index:
            # The key schedule is bumped between rounds, never before the first.
            k0 = k0 + PHILOX_W0
            k1 = k1 + PHILOX_W1
        p0 = c0.astype(np.uint64) * PHILOX_M0
        p1 = c2.astype(np.uint64) * PHILOX_M1
        hi0, lo0 = (p0 >> np.uint64(32)).astype(np.uint32), p0.astype(np.uint32)
        hi1, lo1 = (p1 >> np.uint64(32)).astype(np.uint32), p1.astype(np.uint32)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return np.stack([c0, c1, c2, c3])


def box_muller_first(x: UInt32Array, y: UInt32Array) -> Float32Array:
    """The first of curand's two Box-Muller normals, ``sqrt(-2 ln u) * sin(v)``, as A1111 computes it.

    ``u`` lies in (0, 1] and ``v`` in (0, 2*pi]: each uint32 maps to the centre of its 2**-32 bucket,
    so ``ln u`` never sees 0.
    """
    # float64 on purpose: see the module docstring (A1111's NumPy promotion, not CUDA's float32).
    u = x.astype(np.float64) * np.float64(TWO_POW32_INV) + np.float64(TWO_POW32_INV / np.float32(2))
    v = y.astype(np.float64) * np.float64(TWO_POW32_INV_2PI) + np.float64(TWO_POW32_INV_2PI / np.float32(2))
    radius = np.sqrt(-2.0 * np.log(u))
    return (radius * np.sin(v)).astype(np.float32)


def seed_key(seed: int) -> tuple[int, int]:
    """The Philox key words for a seed: its low and high 32 bits, negative seeds in two's complement.

    torch maps a negative seed ``s`` to ``2**64 + s`` the same way, so a seed means the same
    stream here and in ``torch.Generator('cuda').manual_seed``.
    """
    if not isinstance(seed, int | np.integer) or isinstance(seed, bool):
        raise InvalidRequestError(f"seed={seed!r}: must be a whole number")
    seed = int(seed)
    if not _SEED_MIN <= seed <= _U64_MASK:
        raise InvalidRequestError(f"seed={seed}: must lie within -2**63 .. 2**64-1 (what torch accepts)")
    wrapped = seed & _U64_MASK
    return wrapped & _U32_MASK, wrapped >> 32


class PhiloxGenerator:
    """A seeded stream of CUDA-identical normals (A1111's ``rng_philox.Generator``).

    Each :meth:`randn` call uses the next Philox counter (``offset``), as the CUDA generator's
    offset advances by one counter block per ``torch.randn`` call. Consequently two calls are NOT
    one call of the combined size: every call restarts the element index at 0 under a new
    offset. What does hold: a call's first ``n`` values equal a call of size ``n`` at the same
    offset.
    """

    def __init__(self, seed: int, offset: int = 0) -> None:
        self.key = seed_key(seed)
        self.seed = int(seed)
        if offset < 0:
            raise InvalidRequestError(f"offset={offset}: must be 0 or more")
        self.offset = offset

    def randn(self, shape: Sequence[int] | int) -> Float32Array:
        """Standard normals shaped ``shape`` (float32), then advance the offset by one."""
        dims = (shape,) if isinstance(shape, int) else tuple(int(d) for d in shape)
        if any(d < 0 for d in dims):
            raise InvalidRequestError(f"shape={dims}: dimensions must be 0 or more")
        count = int(np.prod(dims, dtype=np.int64))
        if count > _U32_MASK + 1:
            raise InvalidRequestError(
                f"shape={dims} has {count} elements; one call can draw at most 2**32 "
                "(the element index fills one counter word, as in A1111)"
            )
        raw = self.random_bits(count)
        return box_muller_first(raw[0], raw[1]).reshape(dims)

    def random_bits(self, count: int) -> UInt32Array:
        """The ``(4, count)`` Philox output blocks for element indices ``0..count-1`` at the
        current offset; advances the offset by one."""
        counter = np.zeros((4, count), dtype=np.uint32)
        counter[0] = self.offset & _U32_MASK
        counter[1] = (self.offset >> 32) & _U32_MASK
        counter[2] = np.arange(count, dtype=np.uint64).astype(np.uint32)
        key = np.array(self.key, dtype=np.uint32)
        self.offset += 1
        return philox4x32(counter, key)
