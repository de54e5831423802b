"""Seeds and noise exactly as A1111 makes them (``modules/rng.py``, ``modules/processing.py``).

* :func:`fixed_seed` and :func:`batch_seeds` turn request seeds into per-image seeds.
* :class:`ImageRNG` gives the initial latent noise (subseed slerp, seed resize) and every later
  draw a sampler makes (:meth:`ImageRNG.next`, re-seeded by ENSD).
* Three sources, A1111's setting ``randn_source``:

  - ``"CPU"``: a ``torch.Generator('cpu')`` per image; the noise is moved to the device afterwards.
    The same numbers on every machine.
  - ``"GPU"``: a generator on the device itself. On CUDA this is CUDA's Philox stream; on a CPU
    device it is the CPU generator, i.e. identical to ``"CPU"`` (as in A1111 run with
    ``--use-cpu all``); on MPS A1111 forces the CPU generator, and so do we.
  - ``"NV"``: :class:`~voidprompt.sampling.philox.PhiloxGenerator`, CUDA's numbers on any machine.

A1111 also re-seeds torch's global generator while drawing subseed and seed-resize noise. Those
draws come from fresh generators seeded the same way, so we draw from fresh local generators and
leave global state alone; the numbers are the same.
"""

from __future__ import annotations

import numbers
import random
from collections.abc import Callable, Sequence
from typing import Literal, Protocol

import torch

from voidprompt.errors import InvalidRequestError
from voidprompt.sampling.philox import PhiloxGenerator

RandnSource = Literal["CPU", "GPU", "NV"]
RANDN_SOURCES: tuple[RandnSource, ...] = ("CPU", "GPU", "NV")

# (sigma, sigma_next) -> noise shaped like the latent batch; what the samplers call for randomness.
NoiseSampler = Callable[[float | torch.Tensor, float | torch.Tensor], torch.Tensor]

# A1111 draws random seeds from [0, 4294967294): 2**32 - 2 values, so -1 (2**32-1 as unsigned)
# and 4294967294 itself never come up.
RANDOM_SEED_RANGE = 4294967294
_SEED_MIN = -(1 << 63)
_SEED_MAX = (1 << 64) - 1
# A1111 hard-codes the SD1 VAE factor when it turns seed-resize pixels into latent cells.
LATENT_FACTOR = 8

_CPU = torch.device("cpu")


def fixed_seed(seed: int | str | float | None, *, rand: random.Random | None = None) -> int:
    """A1111's ``get_fixed_seed``: ``''``, None, -1 or a string that is no integer -> a random seed.

    ``rand`` is the source of that random seed (the ``random`` module's shared generator when
    None, as in A1111); pass a seeded ``random.Random`` for repeatable tests.
    """
    value: int
    if seed is None or seed == "":
        value = -1
    elif isinstance(seed, str):
        try:
            value = int(seed)
        except ValueError:
            # A1111 quirk: any unparsable text ("1.5", "abc") silently means "random".
            value = -1
    elif isinstance(seed, bool):
        raise InvalidRequestError(f"seed={seed!r}: must be a whole number, '' or None")
    elif isinstance(seed, float):
        if not seed.is_integer():
            raise InvalidRequestError(f"seed={seed!r}: must be a whole number, '' or None")
        value = int(seed)
    elif isinstance(seed, numbers.Integral):
        value = int(seed)
    else:
        raise InvalidRequestError(f"seed={seed!r}: must be a whole number, '' or None")
    if value == -1:
        randrange = rand.randrange if rand is not None else random.randrange
        return randrange(RANDOM_SEED_RANGE)
    check_seed(value, "seed")
    return value


def batch_seeds(seed: int, subseed: int, subseed_strength: float, count: int) -> tuple[list[int], list[int]]:
    """Per-image seeds and subseeds for ``count`` images (batch_size * n_iter), as A1111.

    Seeds are ``seed + i`` unless a subseed is mixed in, then every image keeps ``seed`` and only
    the subseeds (``subseed + i``) vary. Iteration ``n`` of a run takes ``[n*bs:(n+1)*bs]``.
    Call :func:`fixed_seed` on both first.
    """
    if count < 0:
        raise InvalidRequestError(f"count={count}: the number of images cannot be negative")
    # A1111 quirk: the test is ``subseed_strength == 0``, so any non-zero strength (even one the
    # UI would not allow) pins the seed.
    seed_step = 1 if subseed_strength == 0 else 0
    seeds = [int(seed) + seed_step * i for i in range(count)]
    subseeds = [int(subseed) + i for i in range(count)]
    return seeds, subseeds


def slerp(val: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """A1111's spherical interpolation between two noise tensors shaped (C, H, W).

    ``val`` 0 gives ``low``, 1 gives ``high``.
    """
    # A1111 quirk: norms and dot products run along dim 1, the rows, of a (C, H, W) tensor: one
    # interpolation angle per (channel, column), not one for the whole tensor.
    low_unit = low / torch.norm(low, dim=1, keepdim=True)
    high_unit = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_unit * high_unit).sum(1)
    if dot.mean() > 0.9995:
        # A1111 quirk: the near-parallel fallback weights the ends the other way round from the
        # slerp branch (val 0 gives ``high`` here).
        return low * val + high * (1 - val)
    omega = torch.acos(dot)
    sin_omega = torch.sin(omega)
    low_weight = (torch.sin((1.0 - val) * omega) / sin_omega).unsqueeze(1)
    high_weight = (torch.sin(val * omega) / sin_omega).unsqueeze(1)
    return low_weight * low + high_weight * high


class NoiseStream(Protocol):
    """One seeded stream of standard normals: each call continues where the last stopped."""

    def randn(self, shape: Sequence[int]) -> torch.Tensor: ...


class TorchNoiseStream:
    """A ``torch.Generator`` on ``generator_device``; results are moved to ``device``."""

    def __init__(self, seed: int, generator_device: torch.device, device: torch.device) -> None:
        self.generator_device = generator_device
        self.device = device
        self.generator = torch.Generator(generator_device).manual_seed(int(seed))

    def randn(self, shape: Sequence[int]) -> torch.Tensor:
        noise = torch.randn(
            tuple(shape), generator=self.generator, device=self.generator_device, dtype=torch.float32
        )
        return noise.to(self.device)


class PhiloxNoiseStream:
    """The NV source: CUDA's numbers from NumPy, placed on ``device``."""

    def __init__(self, seed: int, device: torch.device) -> None:
        self.device = device
        self.generator = PhiloxGenerator(seed)

    def randn(self, shape: Sequence[int]) -> torch.Tensor:
        return torch.from_numpy(self.generator.randn(tuple(shape))).to(self.device)


def generator_device(source: RandnSource, device: torch.device) -> torch.device:
    """Where a torch source draws: the CPU for ``"CPU"``; the device itself for ``"GPU"``, except
    MPS, which A1111 always sends to the CPU generator."""
    if source == "CPU" or device.type == "mps":
        return _CPU
    return device


def create_stream(seed: int, source: RandnSource = "CPU", device: torch.device = _CPU) -> NoiseStream:
    """A fresh stream seeded with ``seed`` (A1111's ``create_generator``)."""
    check_seed(seed, "seed")
    source = check_randn_source(source)
    if source == "NV":
        return PhiloxNoiseStream(seed, device)
    return TorchNoiseStream(seed, generator_device(source, device), device)


def randn_local(
    seed: int, shape: Sequence[int], source: RandnSource = "CPU", device: torch.device = _CPU
) -> torch.Tensor:
    """The first ``shape`` normals of ``seed``'s stream, touching no shared generator
    (A1111's ``randn_local``; also what it swaps in for torchsde's noise)."""
    return create_stream(seed, source, device).randn(shape)


class ImageRNG:
    """Per-image noise for one batch, A1111's ``ImageRNG``.

    ``shape`` is one image's latent shape (C, H, W). The first :meth:`next` (or :meth:`first`)
    returns the initial noise (B, C, H, W) float32 on ``device``; each later :meth:`next` continues
    every image's own stream, so image ``i`` of a batch gets the noise it would get alone.
    ``seed_resize_from_h/w`` are in pixels (A1111's fields); 0 or less turns seed resize off.
    ``eta_noise_seed_delta`` (ENSD) re-seeds the streams after the initial noise, so it changes
    the sampler's draws but never the starting latent.

    One ImageRNG serves one batch of one pass. A1111's hires pass builds a new one at the hires
    latent shape with the same seeds, subseeds, strength and seed-resize values.
    Unlike A1111, calling :meth:`first` directly also counts as the first draw (A1111 would give
    the initial noise again on the following :meth:`next`; it never calls ``first`` directly).
    """

    def __init__(
        self,
        shape: Sequence[int],
        seeds: Sequence[int],
        *,
        subseeds: Sequence[int] | None = None,
        subseed_strength: float = 0.0,
        seed_resize_from_h: int = 0,
        seed_resize_from_w: int = 0,
        source: RandnSource = "CPU",
        device: torch.device = _CPU,
        eta_noise_seed_delta: int = 0,
    ) -> None:
        dims = tuple(int(d) for d in shape)
        if len(dims) != 3 or any(d <= 0 for d in dims):
            raise InvalidRequestError(
                f"shape={tuple(shape)}: need one image's latent shape (C, H, W), all > 0"
            )
        if not seeds:
            raise InvalidRequestError("seeds=[]: need one seed per image in the batch")
        for seed in seeds:
            check_seed(seed, "seed")
        for subseed in subseeds or ():
            check_seed(subseed, "subseed")
        self.shape: tuple[int, int, int] = (dims[0], dims[1], dims[2])
        self.seeds = [int(s) for s in seeds]
        self.subseeds = None if subseeds is None else [int(s) for s in subseeds]
        self.subseed_strength = float(subseed_strength)
        self.seed_resize_from_h = int(seed_resize_from_h)
        self.seed_resize_from_w = int(seed_resize_from_w)
        self.source = check_randn_source(source)
        self.device = torch.device(device)
        self.eta_noise_seed_delta = int(eta_noise_seed_delta or 0)
        self.streams: list[NoiseStream] = [self._stream(seed) for seed in self.seeds]
        self.is_first = True

    @property
    def batch_size(self) -> int:
        return len(self.seeds)

    @property
    def noise_shape(self) -> tuple[int, int, int]:
        """The shape the seed noise is drawn at: the resize-from latent shape when both resize
        values are > 0, else the target."""
        if self.seed_resize_from_h <= 0 or self.seed_resize_from_w <= 0:
            return self.shape
        return (
            self.shape[0],
            self.seed_resize_from_h // LATENT_FACTOR,
            self.seed_resize_from_w // LATENT_FACTOR,
        )

    def first(self) -> torch.Tensor:
        """The initial noise (B, C, H, W); then, if ENSD is set, re-seed every stream."""
        self.is_first = False
        noise_shape = self.noise_shape
        images = []
        for index, (seed, stream) in enumerate(zip(self.seeds, self.streams, strict=True)):
            subnoise = None
            if self.subseeds is not None and self.subseed_strength != 0:
                # A1111 quirk: an image without a subseed of its own uses subseed 0.
                subseed = self.subseeds[index] if index < len(self.subseeds) else 0
                subnoise = self._stream(subseed).randn(noise_shape)

            if noise_shape != self.shape:
                # A fresh stream, not the image's: the image's stream still has to give the
                # full-size canvas below, starting from its first number.
                noise = self._stream(seed).randn(noise_shape)
            else:
                noise = stream.randn(self.shape)

            if subnoise is not None:
                noise = slerp(self.subseed_strength, noise, subnoise)

            if noise_shape != self.shape:
                canvas = stream.randn(self.shape)
                noise = paste_centred(noise, canvas)

            images.append(noise)

        if self.eta_noise_seed_delta:
            self.streams = [self._stream(seed + self.eta_noise_seed_delta) for seed in self.seeds]
        return torch.stack(images).to(self.device)

    def next(self) -> torch.Tensor:
        """The initial noise on the first call, then the next draw of every image's stream."""
        if self.is_first:
            return self.first()
        return torch.stack([stream.randn(self.shape) for stream in self.streams]).to(self.device)

    def noise_sampler(self) -> NoiseSampler:
        """A sampler's noise callback: every draw is :meth:`next` (A1111 routes k-diffusion's
        ``torch.randn_like`` to it), whatever the sigmas."""

        def sample_noise(sigma: float | torch.Tensor, sigma_next: float | torch.Tensor) -> torch.Tensor:
            return self.next()

        return sample_noise

    def _stream(self, seed: int) -> NoiseStream:
        return create_stream(seed, self.source, self.device)


def paste_centred(noise: torch.Tensor, canvas: torch.Tensor) -> torch.Tensor:
    """Seed resize: put ``noise`` (C, h, w) in the middle of ``canvas`` (C, H, W), cropping it
    where it is larger. Returns ``canvas`` (modified in place)."""
    canvas_h, canvas_w = canvas.shape[1], canvas.shape[2]
    noise_h, noise_w = noise.shape[1], noise.shape[2]
    # Offsets use floor division, so a negative odd difference rounds away from zero.
    dx = (canvas_w - noise_w) // 2
    dy = (canvas_h - noise_h) // 2
    # A1111 quirk: when cropping by an odd amount the copied span is ``size + 2*offset``, one
    # short of the canvas, so the canvas's own last row/column survives.
    width = noise_w if dx >= 0 else noise_w + 2 * dx
    height = noise_h if dy >= 0 else noise_h + 2 * dy
    target_x, target_y = max(dx, 0), max(dy, 0)
    source_x, source_y = max(-dx, 0), max(-dy, 0)
    canvas[:, target_y : target_y + height, target_x : target_x + width] = noise[
        :, source_y : source_y + height, source_x : source_x + width
    ]
    return canvas


def create_random_tensors(
    shape: Sequence[int],
    seeds: Sequence[int],
    *,
    subseeds: Sequence[int] | None = None,
    subseed_strength: float = 0.0,
    seed_resize_from_h: int = 0,
    seed_resize_from_w: int = 0,
    source: RandnSource = "CPU",
    device: torch.device = _CPU,
) -> torch.Tensor:
    """One-off initial noise for ``seeds`` (A1111's ``create_random_tensors``): what inpainting's
    "latent noise" fill uses, with ``seeds = all_seeds[:batch]``."""
    rng = ImageRNG(
        shape,
        seeds,
        subseeds=subseeds,
        subseed_strength=subseed_strength,
        seed_resize_from_h=seed_resize_from_h,
        seed_resize_from_w=seed_resize_from_w,
        source=source,
        device=device,
    )
    return rng.next()


def img2img_noise(rng: ImageRNG, initial_noise_multiplier: float = 1.0) -> torch.Tensor:
    """img2img's starting noise: the batch's next draw (its first, normally) times the
    "initial noise multiplier" (A1111's ``StableDiffusionProcessingImg2Img.sample``)."""
    noise = rng.next()
    if initial_noise_multiplier != 1.0:
        noise = noise * initial_noise_multiplier
    return noise


def check_seed(seed: object, name: str = "seed") -> None:
    """Raise InvalidRequestError unless ``seed`` is a whole number torch's generators accept."""
    # numbers.Integral admits NumPy integers too; bool is an int but never a seed.
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise InvalidRequestError(f"{name}={seed!r}: must be a whole number")
    if not _SEED_MIN <= int(seed) <= _SEED_MAX:
        raise InvalidRequestError(
            f"{name}={seed}: must lie within -2**63 .. 2**64-1 (the range torch generators accept)"
        )


def check_randn_source(source: str) -> RandnSource:
    """``source`` as a :data:`RandnSource`, or InvalidRequestError naming the choices."""
    for known in RANDN_SOURCES:
        if source == known:
            return known
    raise InvalidRequestError(f"randn_source={source!r}: choose one of {', '.join(RANDN_SOURCES)}")
