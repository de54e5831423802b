"""Denoisers: an eps-predicting UNet turned into D(x, sigma), and A1111's CFG denoiser around it.

``DiscreteEpsDenoiser`` is k-diffusion's DiscreteSchedule + DiscreteEpsDDPMDenoiser (CompVisDenoiser):
sigma_i = sqrt((1 - abar_i) / abar_i) over the 1000 training steps, sigma <-> t by linear
interpolation in log sigma, and D(x, sigma) = x - sigma * eps(x / sqrt(sigma^2 + 1), t(sigma)).
``EpsTimestepModel`` is the same UNet seen by the timestep samplers (eps at a training timestep).
``CFGDenoiser`` reproduces A1111's ``CFGDenoiser.forward`` (``sd_samplers_cfg_denoiser.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from voidprompt.conditioning import CondSchedule, MultiCond, ScheduledCond, entry_at_step, entry_index_at_step
from voidprompt.errors import InvalidRequestError

UNetFn = Callable[..., Tensor]
"""``unet_fn(x_in, t, context) -> eps``; x_in already scaled and, for inpainting models, 9-channel.
SDXL's vector conditioning comes as a fourth argument, ``unet_fn(x_in, t, context, y)``; a model
without one is called with three."""


def _unet(unet_fn: UNetFn, x_in: Tensor, t: Tensor, context: Tensor, y: Tensor | None) -> Tensor:
    return unet_fn(x_in, t, context) if y is None else unet_fn(x_in, t, context, y)


def _bcast(v: Tensor, x: Tensor) -> Tensor:
    return v[(...,) + (None,) * (x.ndim - v.ndim)]


def downcast_alphas_cumprod(alphas_cumprod: Tensor) -> Tensor:
    """A1111's "Downcast alphas_cumprod": the table as an fp16 model held it before v1.7.0-225."""
    return alphas_cumprod.to(torch.float16).to(alphas_cumprod.dtype)


# A1111's stand-in for abar at the last timestep, which zero terminal SNR would make exactly 0 (an
# infinite sigma); sqrt((1 - a) / a) of it is a sigma_max of about 4519.
ZERO_TERMINAL_SNR_LAST_ABAR = 4.8973451890853435e-08


def zero_terminal_snr_alphas_cumprod(alphas_cumprod: Tensor) -> Tensor:
    """A1111's "Zero Terminal SNR" noise schedule (``rescale_zero_terminal_snr_abar``; Lin et al.
    2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", algorithm 1): sqrt(abar)
    shifted so that its last entry is 0 and scaled so that its first is unchanged, squared, with the
    last entry then set to :data:`ZERO_TERMINAL_SNR_LAST_ABAR`."""
    root = alphas_cumprod.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    out = root**2
    out[-1] = ZERO_TERMINAL_SNR_LAST_ABAR
    return out


class DiscreteEpsDenoiser:
    """D(x, sigma) for an eps-prediction UNet trained on discrete timesteps (SD1)."""

    def __init__(
        self,
        unet_fn: UNetFn,
        alphas_cumprod: Tensor,
        *,
        quantize: bool = False,
        downcast_alphas: bool = False,
    ) -> None:
        if alphas_cumprod.ndim != 1 or len(alphas_cumprod) < 2:
            raise InvalidRequestError(
                f"alphas_cumprod has shape {tuple(alphas_cumprod.shape)}: need a 1-D table of >= 2 entries"
            )
        if downcast_alphas:
            alphas_cumprod = downcast_alphas_cumprod(alphas_cumprod)
        self.unet_fn = unet_fn
        self.alphas_cumprod = alphas_cumprod
        self.sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        self.log_sigmas = self.sigmas.log()
        self.quantize = quantize
        self.sigma_data = 1.0

    @property
    def sigma_min(self) -> Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> Tensor:
        return self.sigmas[-1]

    def get_sigmas(self, n: int) -> Tensor:
        """A1111 "Uniform": t = linspace(999, 0, n) mapped to sigma, then 0 appended."""
        t = torch.linspace(len(self.sigmas) - 1, 0, n, device=self.sigmas.device)
        sig = self.t_to_sigma(t)
        return torch.cat([sig, sig.new_zeros([1])])

    def sigma_to_t(self, sigma: Tensor, quantize: bool | None = None) -> Tensor:
        """Fractional timestep by linear interpolation of log sigma between the bracketing indices."""
        quantize = self.quantize if quantize is None else quantize
        log_sigma = sigma.log()
        dists = log_sigma - self.log_sigmas[:, None]
        if quantize:
            return dists.abs().argmin(dim=0).view(sigma.shape)
        # Index of the last table entry <= log_sigma, kept one below the end so high_idx exists.
        low_idx = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=self.log_sigmas.shape[0] - 2)
        high_idx = low_idx + 1
        low, high = self.log_sigmas[low_idx], self.log_sigmas[high_idx]
        w = ((low - log_sigma) / (low - high)).clamp(0, 1)
        return ((1 - w) * low_idx + w * high_idx).view(sigma.shape)

    def t_to_sigma(self, t: Tensor) -> Tensor:
        t = t.float()
        low_idx, high_idx, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[low_idx] + w * self.log_sigmas[high_idx]).exp()

    def pred_x0(self, x: Tensor, output: Tensor, sigma: Tensor) -> Tensor:
        """The clean latent this model's ``output`` at (x, sigma) predicts: the output itself."""
        return output

    def get_scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor]:
        return -sigma, 1 / (sigma**2 + self.sigma_data**2) ** 0.5

    def __call__(
        self,
        x: Tensor,
        sigma: Tensor,
        *,
        context: Tensor,
        image_cond: Tensor | None = None,
        y: Tensor | None = None,
    ) -> Tensor:
        c_out, c_in = (_bcast(v, x) for v in self.get_scalings(sigma))
        eps = self._model_output(x * c_in, sigma, context, image_cond, y)
        return x + eps * c_out

    def _model_output(
        self, x_in: Tensor, sigma: Tensor, context: Tensor, image_cond: Tensor | None, y: Tensor | None
    ) -> Tensor:
        """The UNet on the scaled input at t(sigma)."""
        if image_cond is not None:
            # Inpainting UNets take the masked image latents as extra (unscaled) input channels.
            x_in = torch.cat([x_in, image_cond], dim=1)
        return _unet(self.unet_fn, x_in, self.sigma_to_t(sigma), context, y)


class DiscreteVDenoiser(DiscreteEpsDenoiser):
    """D(x, sigma) for a v-prediction UNet (k-diffusion's CompVisVDenoiser, which A1111 uses for
    v-prediction models): with s = sigma_data = 1, c_in = 1 / sqrt(sigma^2 + 1),
    c_out = -sigma / sqrt(sigma^2 + 1), c_skip = 1 / (sigma^2 + 1), and
    D = x * c_skip + v(x * c_in, t(sigma)) * c_out."""

    def get_scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError("v-prediction has three scalings; see v_scalings")

    def v_scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        s2 = sigma**2 + self.sigma_data**2
        return self.sigma_data**2 / s2, -sigma * self.sigma_data / s2**0.5, 1 / s2**0.5

    def __call__(
        self,
        x: Tensor,
        sigma: Tensor,
        *,
        context: Tensor,
        image_cond: Tensor | None = None,
        y: Tensor | None = None,
    ) -> Tensor:
        c_skip, c_out, c_in = (_bcast(v, x) for v in self.v_scalings(sigma))
        v = self._model_output(x * c_in, sigma, context, image_cond, y)
        return v * c_out + x * c_skip


class LCMDenoiser(DiscreteEpsDenoiser):
    """A1111's LCMCompVisDenoiser: 50 "original" timesteps 19, 39, ..., 999 and the consistency-model
    boundary scalings (sigma_data 0.5, timestep scaled by 10). Luo et al. (2023), Latent Consistency Models.
    """

    def __init__(self, unet_fn: UNetFn, alphas_cumprod: Tensor, *, original_steps: int = 50) -> None:
        total = len(alphas_cumprod)
        self.skip_steps = total // original_steps
        valid = torch.stack([alphas_cumprod[total - 1 - k * self.skip_steps] for k in range(original_steps)])
        super().__init__(unet_fn, valid.flip(0))

    def get_sigmas(self, n: int) -> Tensor:
        start = self.sigma_to_t(self.sigma_max)
        end = self.sigma_to_t(self.sigma_min)
        sig = self.t_to_sigma(torch.linspace(float(start), float(end), n))
        return torch.cat([sig, sig.new_zeros([1])])

    def sigma_to_t(self, sigma: Tensor, quantize: bool | None = None) -> Tensor:
        dists = sigma.log() - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape) * self.skip_steps + (self.skip_steps - 1)

    def t_to_sigma(self, t: Tensor) -> Tensor:
        t = torch.clamp(((t - (self.skip_steps - 1)) / self.skip_steps).float(), 0, len(self.sigmas) - 1)
        return super().t_to_sigma(t)

    def __call__(
        self,
        x: Tensor,
        sigma: Tensor,
        *,
        context: Tensor,
        image_cond: Tensor | None = None,
        y: Tensor | None = None,
    ) -> Tensor:
        c_out, c_in = (_bcast(v, x) for v in self.get_scalings(sigma))
        eps = self._model_output(x * c_in, sigma, context, image_cond, y)
        sigma_data = 0.5
        scaled_t = _bcast(self.sigma_to_t(sigma), x) * 10.0
        c_skip = sigma_data**2 / (scaled_t**2 + sigma_data**2)
        c_out_lcm = scaled_t / (scaled_t**2 + sigma_data**2) ** 0.5
        return c_out_lcm * (x + eps * c_out) + c_skip * x


class EpsTimestepModel:
    """The UNet as the timestep samplers see it: eps at training timestep t (A1111's
    CompVisTimestepsDenoiser). Carries ``alphas_cumprod`` for ``get_pred_x0``."""

    def __init__(self, unet_fn: UNetFn, alphas_cumprod: Tensor, *, downcast_alphas: bool = False) -> None:
        self.unet_fn = unet_fn
        self.alphas_cumprod = downcast_alphas_cumprod(alphas_cumprod) if downcast_alphas else alphas_cumprod

    def __call__(
        self,
        x: Tensor,
        t: Tensor,
        *,
        context: Tensor,
        image_cond: Tensor | None = None,
        y: Tensor | None = None,
    ) -> Tensor:
        x_in = x if image_cond is None else torch.cat([x, image_cond], dim=1)
        return _unet(self.unet_fn, x_in, t, context, y)

    def pred_x0(self, x: Tensor, output: Tensor, t: Tensor) -> Tensor:
        """The clean latent eps ``output`` at timestep t predicts, (x - sqrt(1 - abar) eps) / sqrt(abar)
        (the timestep samplers' own ``pred_x0``)."""
        abar = self.alphas_cumprod.to(x.device)[t.to(torch.int)].to(x.dtype)
        return (x - _bcast((1 - abar).sqrt(), x) * output) / _bcast(abar.sqrt(), x)


class VTimestepModel(EpsTimestepModel):
    """A v-prediction UNet as the timestep samplers see it (A1111's CompVisTimestepsVDenoiser): its v
    turned into eps at training timestep t, eps = sqrt(abar_t) * v + sqrt(1 - abar_t) * x."""

    def __call__(
        self,
        x: Tensor,
        t: Tensor,
        *,
        context: Tensor,
        image_cond: Tensor | None = None,
        y: Tensor | None = None,
    ) -> Tensor:
        v = super().__call__(x, t, context=context, image_cond=image_cond, y=y)
        abar = self.alphas_cumprod.to(x.device)[t.to(torch.int)]
        return _bcast(abar.sqrt(), x) * v + _bcast((1 - abar).sqrt(), x) * x


InnerModel = Callable[..., Tensor]


def stack_conds(tensors: Sequence[Tensor]) -> Tensor:
    """Stack (tokens, width) tensors, padding shorter ones by repeating their last token vector.

    A1111's ``prompt_parser.stack_conds``: AND sub-prompts of different lengths end up in one batch.
    """
    count = max(t.shape[0] for t in tensors)
    padded = [
        t if t.shape[0] == count else torch.vstack([t, t[-1:].repeat(count - t.shape[0], 1)]) for t in tensors
    ]
    return torch.stack(padded)


def stack_vectors(entries: Sequence[ScheduledCond]) -> Tensor | None:
    """The rows' vector conditionings (SDXL's ``y``) stacked, or None when the model takes none."""
    vectors = [e.pooled for e in entries]
    if all(v is None for v in vectors):
        return None
    if any(v is None for v in vectors):
        raise InvalidRequestError(
            "conditionings mix SDXL (with a pooled vector) and SD1 (without) in one batch"
        )
    return torch.stack([v for v in vectors if v is not None])


@dataclass(frozen=True)
class BatchConds:
    """The conditioning of one batch: ``conds[i]`` / ``unconds[i]`` belong to image i.

    ``empty_cond`` is the encoded empty prompt, which "Pad conds" appends (A1111's
    ``cond_stage_model_empty_prompt``); needed only with ``Guidance.pad_cond_uncond``."""

    conds: Sequence[MultiCond]
    unconds: Sequence[CondSchedule]
    empty_cond: Tensor | None = None


@dataclass(frozen=True)
class Guidance:
    """How the cond and uncond predictions are computed and combined (A1111's CFG settings).

    ``s_min_uncond`` is NGMS (skip the uncond pass on odd calls below that sigma; every call with
    ``s_min_uncond_all``); ``skip_early_cond`` skips it for that fraction of the ``total_steps`` calls.
    ``pad_cond_uncond`` / ``pad_cond_uncond_v0`` are "Pad conds" and its pre-1.6 variant."""

    cfg_scale: float
    s_min_uncond: float = 0.0
    s_min_uncond_all: bool = False
    skip_early_cond: float = 0.0
    total_steps: int | None = None
    batch_cond_uncond: bool = True
    pad_cond_uncond: bool = False
    pad_cond_uncond_v0: bool = False


@dataclass(frozen=True)
class LatentBlend:
    """A1111's inpainting blend in latent space: ``mask`` 1 keeps ``init_latent``, 0 takes the sample
    (``nmask`` defaults to ``1 - mask``). After denoising (k-diffusion samplers) or, with
    ``before_denoising``, on x before the UNet (timestep samplers)."""

    mask: Tensor
    init_latent: Tensor
    nmask: Tensor | None = None
    before_denoising: bool = False

    def apply(self, latent: Tensor) -> Tensor:
        nmask = 1 - self.mask if self.nmask is None else self.nmask
        return latent * nmask + self.init_latent * self.mask


@dataclass(frozen=True)
class UNetRow:
    """What one row of a CFG denoiser call's UNet batch computes: image ``image``'s prediction for
    its AND sub-prompt ``part`` (``negative`` False) or for its negative prompt, with the prompt
    schedule's entry ``entry`` at this call."""

    image: int
    negative: bool
    part: int
    entry: int


class DenoiserObserver(Protocol):
    """Watches a CFG denoiser's calls without changing them (the explain capture): the rows of
    each call, which rows each UNet call runs, and the branch predictions the call combined."""

    def begin_call(self, step: int, x: Tensor, sigma: Tensor, rows: Sequence[UNetRow]) -> None: ...

    def unet_rows(self, start: int, stop: int) -> None: ...

    def end_call(self, cond: Tensor, uncond: Tensor | None, guided: Tensor) -> None:
        """``cond`` / ``uncond``: per image, the inner model's output for its first sub-prompt and
        for its negative prompt (None when the call skipped the uncond pass); ``guided`` what the
        call returns. Outputs are what the inner model returns (x0, or eps for timestep models)."""


class CFGDenoiser:
    """A1111's classifier-free guidance denoiser (``CFGDenoiser.forward``), as a plain class.

    Each call picks the conditioning of call index ``self.step`` (incremented once per call, so
    second-order samplers advance it twice a step), runs the UNet on every AND sub-prompt of every
    image followed by the uncond batch, and combines ``uncond + sum_i w_i * cfg_scale * (cond_i - uncond)``.
    ``image_cond`` is the inpainting models' extra input (masked-image latents and mask).
    """

    def __init__(
        self,
        inner: InnerModel,
        batch: BatchConds,
        guidance: Guidance,
        *,
        image_cond: Tensor | None = None,
        blend: LatentBlend | None = None,
        switch: Callable[[Tensor], tuple[InnerModel, BatchConds] | None] | None = None,
        observer: DenoiserObserver | None = None,
    ) -> None:
        """``switch(sigma)``, asked before every call, may hand over another inner model and its
        conditioning mid-run (A1111's refiner switch, ``apply_refiner``); None keeps the current.
        ``observer`` hears every call (:class:`DenoiserObserver`)."""
        if len(batch.conds) != len(batch.unconds):
            raise InvalidRequestError(
                f"{len(batch.conds)} positive and {len(batch.unconds)} negative conditionings: "
                "need one of each per image"
            )
        if not batch.conds or any(not c.parts for c in batch.conds):
            raise InvalidRequestError("conds: every image needs at least one (sub-)prompt")
        if guidance.pad_cond_uncond and batch.empty_cond is None and not guidance.pad_cond_uncond_v0:
            raise InvalidRequestError("pad_cond_uncond=True needs empty_cond (the encoded empty prompt)")
        if guidance.skip_early_cond and not guidance.total_steps:
            raise InvalidRequestError("skip_early_cond needs total_steps (the expected number of calls)")
        self.inner = inner
        self.conds = list(batch.conds)
        self.unconds = list(batch.unconds)
        self.empty_cond = batch.empty_cond
        self.guidance = guidance
        self.image_cond = image_cond
        self.blend = blend
        self.switch = switch
        self.observer = observer
        self.step = 0
        # DDIM CFG++ hooks (A1111's cond_scale_miltiplier / need_last_noise_uncond).
        self.cond_scale_multiplier = 1.0
        self.need_last_noise_uncond = False
        self.last_noise_uncond: Tensor | None = None
        # What the last call did, for the infotext ("Pad conds", "NGMS", "Skip Early CFG").
        self.padded_cond_uncond = False
        self.padded_cond_uncond_v0 = False
        self.used_ngms = False
        self.used_skip_early_cond = False
        # Whether NGMS skipped the uncond pass on any call so far (A1111 records "NGMS" then).
        self.ngms_triggered = False

    # -- conditioning for one call --------------------------------------------------------------

    def multicond_batch(self, step: int) -> tuple[list[list[tuple[int, float]]], Tensor]:
        """A1111's reconstruct_multicond_batch: per image, (row index, weight) of each sub-prompt."""
        conds_list, entries = self._multicond_entries(step)
        return conds_list, stack_conds([e.cond for e in entries])

    def _multicond_entries(self, step: int) -> tuple[list[list[tuple[int, float]]], list[ScheduledCond]]:
        entries: list[ScheduledCond] = []
        conds_list: list[list[tuple[int, float]]] = []
        for multi in self.conds:
            rows = []
            for schedule, weight in multi.parts:
                rows.append((len(entries), weight))
                entries.append(entry_at_step(schedule, step))
            conds_list.append(rows)
        return conds_list, entries

    def uncond_batch(self, step: int) -> Tensor:
        # A1111 requires equal shapes here (its encoder pads a batch to one chunk count); repeating
        # the last vector, as for AND sub-prompts, keeps a mixed batch usable.
        return stack_conds([e.cond for e in self._uncond_entries(step)])

    def _uncond_entries(self, step: int) -> list[ScheduledCond]:
        return [entry_at_step(schedule, step) for schedule in self.unconds]

    def _pad(self, cond: Tensor, uncond: Tensor) -> tuple[Tensor, Tensor]:
        if self.guidance.pad_cond_uncond_v0:
            # A1111 quirk ("Pad conds v0", DDIM/PLMS before 1.6): repeat uncond's last vector, or cut it.
            if uncond.shape[1] < cond.shape[1]:
                last = uncond[:, -1:].repeat(1, cond.shape[1] - uncond.shape[1], 1)
                uncond = torch.hstack([uncond, last])
            else:
                uncond = uncond[:, : cond.shape[1]]
            self.padded_cond_uncond_v0 = True
            return cond, uncond
        assert self.empty_cond is not None
        empty = self.empty_cond if self.empty_cond.ndim == 3 else self.empty_cond[None]
        repeats = (cond.shape[1] - uncond.shape[1]) // empty.shape[1]
        if repeats < 0:
            cond = torch.cat([cond, empty.repeat(cond.shape[0], -repeats, 1)], dim=1)
            self.padded_cond_uncond = True
        elif repeats > 0:
            uncond = torch.cat([uncond, empty.repeat(uncond.shape[0], repeats, 1)], dim=1)
            self.padded_cond_uncond = True
        return cond, uncond

    # -- the call ---------------------------------------------------------------------------------

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        if self.switch is not None:
            handed_over = self.switch(sigma)
            if handed_over is not None:
                self.inner, batch = handed_over
                self.conds, self.unconds = list(batch.conds), list(batch.unconds)
                self.empty_cond = batch.empty_cond
        step = self.step
        conds_list, cond_entries = self._multicond_entries(step)
        uncond_entries = self._uncond_entries(step)
        tensor = stack_conds([e.cond for e in cond_entries])
        uncond = stack_conds([e.cond for e in uncond_entries])
        # SDXL's vector conditioning: one row per UNet row, never padded (A1111 pads crossattn only).
        y_cond, y_uncond = stack_vectors(cond_entries), stack_vectors(uncond_entries)
        guidance = self.guidance
        if self.blend is not None and self.blend.before_denoising:
            x = self.blend.apply(x)

        batch_size = len(conds_list)
        if x.shape[0] != batch_size:
            raise InvalidRequestError(f"x has batch {x.shape[0]} but {batch_size} conditionings were given")
        repeats = [len(c) for c in conds_list]
        rows = torch.tensor([i for i, n in enumerate(repeats) for _ in range(n)], device=x.device)
        x_in = torch.cat([x[rows], x])
        sigma_in = torch.cat([sigma[rows], sigma])
        image_cond_in = (
            None if self.image_cond is None else torch.cat([self.image_cond[rows], self.image_cond])
        )

        skip_uncond = False
        self.used_ngms = self.used_skip_early_cond = False
        if (
            guidance.skip_early_cond
            and guidance.total_steps
            and step / guidance.total_steps <= guidance.skip_early_cond
        ):
            skip_uncond = self.used_skip_early_cond = True
        elif (
            (step % 2 or guidance.s_min_uncond_all)
            and guidance.s_min_uncond > 0
            and sigma[0] < guidance.s_min_uncond
        ):
            # NGMS (A1111's s_min_uncond): on odd calls below the threshold, skip the uncond pass.
            skip_uncond = self.used_ngms = self.ngms_triggered = True
        if skip_uncond:
            x_in, sigma_in = x_in[:-batch_size], sigma_in[:-batch_size]
            if image_cond_in is not None:
                image_cond_in = image_cond_in[:-batch_size]

        self.padded_cond_uncond = self.padded_cond_uncond_v0 = False
        if tensor.shape[1] != uncond.shape[1] and (guidance.pad_cond_uncond_v0 or guidance.pad_cond_uncond):
            tensor, uncond = self._pad(tensor, uncond)

        if (y_cond is None) != (y_uncond is None):
            raise InvalidRequestError(
                "the positive and negative conditionings come from different model families"
            )
        y_in = None
        if y_cond is not None and y_uncond is not None:
            y_in = y_cond if skip_uncond else torch.cat([y_cond, y_uncond])
        observer = self.observer
        if observer is not None:
            observer.begin_call(step, x, sigma, self._rows(step, skip_uncond))

        def run(a: int, b: int, context: Tensor) -> Tensor:
            if observer is not None:
                observer.unet_rows(a, b)
            ic = None if image_cond_in is None else image_cond_in[a:b]
            extra = {} if y_in is None else {"y": y_in[a:b]}
            return self.inner(x_in[a:b], sigma_in[a:b], context=context, image_cond=ic, **extra)

        n_in = x_in.shape[0]
        if tensor.shape[1] == uncond.shape[1] or skip_uncond:
            cond_in = tensor if skip_uncond else torch.cat([tensor, uncond])
            if guidance.batch_cond_uncond:
                x_out = run(0, n_in, cond_in)
            else:
                x_out = torch.zeros_like(x_in)
                for a in range(0, n_in, batch_size):
                    x_out[a : a + batch_size] = run(a, a + batch_size, cond_in[a : a + batch_size])
        else:
            # Token lengths differ and no padding: conds and uncond go through separate UNet calls.
            x_out = torch.zeros_like(x_in)
            chunk = batch_size * 2 if guidance.batch_cond_uncond else batch_size
            for a in range(0, tensor.shape[0], chunk):
                b = min(a + chunk, tensor.shape[0])
                x_out[a:b] = run(a, b, tensor[a:b])
            x_out[-uncond.shape[0] :] = run(n_in - uncond.shape[0], n_in, uncond)

        first = [c[0][0] for c in conds_list]
        uncond_out = None if skip_uncond else x_out[-batch_size:]
        if skip_uncond:
            # The first sub-prompt's result stands in for the uncond, and the scale becomes 1.
            x_out = torch.cat([x_out, x_out[first]])
        if self.need_last_noise_uncond:
            self.last_noise_uncond = x_out[-batch_size:].clone()

        scale = 1.0 if skip_uncond else guidance.cfg_scale * self.cond_scale_multiplier
        denoised = combine_denoised(x_out, conds_list, batch_size, scale)
        if self.blend is not None and not self.blend.before_denoising:
            denoised = self.blend.apply(denoised)
        if observer is not None:
            observer.end_call(x_out[first], uncond_out, denoised)
        self.step += 1
        return denoised

    def _rows(self, step: int, skip_uncond: bool) -> list[UNetRow]:
        """The UNet rows of call ``step`` in batch order: every image's sub-prompts, then (unless
        skipped) every image's negative prompt."""
        rows = [
            UNetRow(image, False, part, entry_index_at_step(schedule, step))
            for image, multi in enumerate(self.conds)
            for part, (schedule, _) in enumerate(multi.parts)
        ]
        if not skip_uncond:
            rows += [
                UNetRow(image, True, 0, entry_index_at_step(schedule, step))
                for image, schedule in enumerate(self.unconds)
            ]
        return rows


def combine_denoised(
    x_out: Tensor, conds_list: list[list[tuple[int, float]]], batch_size: int, cond_scale: float
) -> Tensor:
    """uncond + sum_i (cond_i - uncond) * w_i * cond_scale, per image (A1111's combine_denoised)."""
    denoised_uncond = x_out[-batch_size:]
    denoised = denoised_uncond.clone()
    for i, conds in enumerate(conds_list):
        for cond_index, weight in conds:
            denoised[i] += (x_out[cond_index] - denoised_uncond[i]) * (weight * cond_scale)
    return denoised
