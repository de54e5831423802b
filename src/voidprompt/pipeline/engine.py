"""The one Engine: a GenerationRequest in, images with their A1111 infotext out.

The order of operations is A1111's ``process_images_inner``: fixed seeds, prompt pipeline,
conditioning (once per distinct prompt, cached), then per iteration of ``n_iter``: an ImageRNG over
that iteration's seeds, the sampler over a CFG denoiser, the VAE decode, 8-bit conversion and the
infotext of each image.

Precision (the components' :class:`~voidprompt.models.placement.PrecisionPolicy`): prompt encoding
and sampling (UNet calls, and the VAE encodes of img2img and hires fix) run under the policy's
autocast, as A1111's ``devices.autocast()`` blocks; the final VAE decode runs outside it in the
VAE's own dtype, with A1111's float32 fallback (:func:`decode_latents`). As in A1111, NaN in the
sampled latents or in a decoded image stops the request with :class:`~voidprompt.errors.NansError`
unless ``disable_nan_check``. On CUDA the UNet is fed
channels-last when its weights are stored so; ``Engine(..., compile=True)`` runs it through
``torch.compile`` (graphs are cached per input shape, so same-shape batches reuse them).

img2img / inpainting (``request.init_images``): the image-space preparation runs once
(:mod:`voidprompt.pipeline.img2img`), then per batch the VAE encode, the latent mask, the img2img
start part-way down the schedule, and the final composite over the original. Hires fix
(``request.enable_hr``, txt2img only) adds a second img2img pass at the upscaled size
(:mod:`voidprompt.pipeline.hires`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from voidprompt.conditioning import CondSchedule, MultiCond
from voidprompt.errors import InvalidRequestError, VoidpromptError
from voidprompt.explain.attention import AttentionProbe
from voidprompt.explain.record import ExplainOptions
from voidprompt.explain.recorder import ExplainRecorder
from voidprompt.explain.tags import PassPrompts, pass_prompts
from voidprompt.infotext import (
    ImageFacts,
    ModelFacts,
    PassFacts,
    RunFacts,
    create_infotext,
    generation_params,
    ti_hashes_text,
)
from voidprompt.models.components import Components
from voidprompt.models.latent_rgb import latent_rgb_for
from voidprompt.models.nans import check_for_nans
from voidprompt.models.networks.manager import AppliedNetworks, NetworkManager
from voidprompt.models.tiling import circular_padding
from voidprompt.models.upscalers.registry import Upscalers
from voidprompt.models.vae_decode import decode_with_nan_fallback
from voidprompt.pipeline import hires as hires_fix
from voidprompt.pipeline.images import pil_to_tensor, resize_image
from voidprompt.pipeline.img2img import (
    DEFAULT_DENOISING,
    LATENT_RESIZE_MODE,
    Img2ImgInputs,
    encode_images,
    inpainting_conditioning,
    latent_masks,
    prepare_img2img,
    txt2img_conditioning,
)
from voidprompt.pipeline.masking import apply_overlay
from voidprompt.pipeline.refiner import completed_ratio, pass_takes_refiner, refiner_infotext, refiner_name
from voidprompt.pipeline.result import Result
from voidprompt.pipeline.run_sampler import (
    Img2ImgStart,
    SamplerPass,
    SamplerStart,
    SamplingModel,
    run_sampler,
    uses_ensd,
)
from voidprompt.pipeline.sdxl_vector import (
    SizeConditioning,
    size_numbers,
    split_vector,
    with_numbers,
    with_numbers_multi,
)
from voidprompt.prompts.chunks import TokenizedLine
from voidprompt.prompts.embeddings import EmbeddingDatabase
from voidprompt.prompts.encode import PromptEncoder
from voidprompt.prompts.encode_sdxl import SDXLPromptEncoder
from voidprompt.prompts.prepare import PreparedPrompts, prepare_prompts
from voidprompt.prompts.styles import StyleDatabase
from voidprompt.request import GenerationRequest
from voidprompt.sampling.denoiser import (
    BatchConds,
    CFGDenoiser,
    DiscreteEpsDenoiser,
    DiscreteVDenoiser,
    EpsTimestepModel,
    Guidance,
    LatentBlend,
    LCMDenoiser,
    VTimestepModel,
    zero_terminal_snr_alphas_cumprod,
)
from voidprompt.sampling.registry import SamplerSpec, SchedulerSpec, infotext_names, resolve
from voidprompt.sampling.rng import ImageRNG, batch_seeds, create_random_tensors, fixed_seed, img2img_noise

LATENT_CHANNELS = 4

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Progress:
    """One sampler step done: ``iteration`` of ``n_iter``, ``step`` of ``steps`` in it."""

    iteration: int
    n_iter: int
    step: int
    steps: int
    latent: Tensor
    # The sampler's estimate of the clean latent at this step (k-diffusion's ``denoised``: A1111's live
    # preview "Approx / Full" shows it), None for a sampler that reports none.
    denoised: Tensor | None = None


ProgressCallback = Callable[[Progress], None]


class Interrupted(VoidpromptError):
    """Raised inside sampling when the caller's ``should_stop`` says so; the batch is abandoned."""


@dataclass
class _Conditioning:
    prepared: PreparedPrompts
    cond: MultiCond
    uncond: CondSchedule
    # Per text encoder wrapper call, in A1111's call order: {embedding name: short hash} it used.
    ti_calls: tuple[dict[str, str], ...]
    networks: AppliedNetworks


class Engine:
    """Generates images for requests on one loaded model."""

    def __init__(
        self,
        components: Components,
        *,
        embeddings: EmbeddingDatabase | None = None,
        style_db: StyleDatabase | None = None,
        lora_dir: str | Path | None = None,
        hypernet_dir: str | Path | None = None,
        lora_functional: bool = False,
        missing_networks: str = "warn",
        compile: bool = False,
        disable_nan_check: bool = False,
        refiner_loader: Callable[[str], Components] | None = None,
        upscalers: Upscalers | None = None,
    ) -> None:
        """``lora_dir`` / ``hypernet_dir`` are where ``<lora:name:...>`` / ``<hypernet:name:...>``
        tags are looked up. ``lora_functional`` applies LoRAs as forward hooks instead of merging
        them into the weights. ``missing_networks="warn"`` is A1111's behaviour for a tag whose file
        is not found (generate without it); ``"error"`` refuses the request instead. ``compile``
        runs the UNet through ``torch.compile`` (off by default: the first batch of each shape
        pays for compiling it). ``disable_nan_check`` is A1111's ``--disable-nan-check``: NaN outputs
        are kept (black pictures), and the VAE's float32 fallback is off with the check.
        ``refiner_loader(name)`` loads the checkpoint a request names as ``refiner_checkpoint``
        (:mod:`voidprompt.pipeline.refiner`); without it such a request is refused. ``upscalers``
        is where hires fix finds model upscalers (``hr_upscaler``); without it only the built-in
        and latent upscalers are known."""
        self.components = components
        self.style_db = style_db
        self.encoder: Any
        # SDXL: two text encoders, and the UNet takes a vector (pooled text + size numbers) too.
        self._size: SizeConditioning | None = None
        # v-prediction checkpoints (marked by a ``v_pred`` key) go through the v denoisers.
        self._v_prediction = getattr(components, "prediction", "eps") == "v"
        text_encoder_2 = getattr(components, "text_encoder_2", None)
        if text_encoder_2 is not None:
            self.encoder = SDXLPromptEncoder(
                components.text_encoder, text_encoder_2, components.tokenizer, embeddings
            )
            self._size = SizeConditioning(components.unet, int(text_encoder_2.config.projection_dim))
        else:
            self.encoder = PromptEncoder(components.text_encoder, components.tokenizer, embeddings)
        self.networks = NetworkManager()
        self.lora_dir = lora_dir
        self.hypernet_dir = hypernet_dir
        self.lora_functional = lora_functional
        self.missing_networks = missing_networks
        self.compile = compile
        self.disable_nan_check = disable_nan_check
        self.refiner_loader = refiner_loader
        self.upscalers = upscalers
        self._refiners: dict[str, Engine] = {}
        self._database_for: Callable[[int, str | None], EmbeddingDatabase] | None = None
        # The engine sampling now: this one, or a refiner it handed the pass to (for the rest of the
        # iteration), with the infotext keys of that switch.
        self._active: Engine = self
        self._switch_facts: dict[str, Any] = {}
        self._compiled_unet: Any = None
        # The UNet module the current sampler pass calls (eager or compiled), chosen in _run.
        self._pass_unet: Any = components.unet
        # The loader stores the UNet channels-last on CUDA; its input then goes in the same layout.
        weight = components.unet.conv_in.weight
        self._channels_last = not weight.is_contiguous() and weight.is_contiguous(
            memory_format=torch.channels_last
        )

    # ------------------------------------------------------------------ public

    @property
    def device(self) -> torch.device:
        return self.components.device

    def give_embeddings(self, database_for: Callable[[int, str | None], EmbeddingDatabase]) -> None:
        """Give each text encoder its textual-inversion database, ``database_for(width, sdxl_part)``:
        SD1's one encoder takes a file's one tensor (``sdxl_part`` None); SDXL's CLIP-L and bigG each
        take their own tensor of an SDXL embedding file (A1111's ``clip_l`` / ``clip_g``), and the
        refiner has bigG alone. Refiners this engine hands passes to get theirs the same way."""
        self._database_for = database_for
        for refiner in self._refiners.values():
            refiner.give_embeddings(database_for)
        components, encoder = self.components, self.encoder
        text_encoder_2 = getattr(components, "text_encoder_2", None)
        if text_encoder_2 is None:
            encoder.embeddings = database_for(int(components.text_encoder.config.hidden_size), None)
            return
        if components.text_encoder is not None:
            encoder.embeddings = database_for(int(components.text_encoder.config.hidden_size), "clip_l")
        encoder.embeddings_g = database_for(int(text_encoder_2.config.hidden_size), "clip_g")

    def generate(
        self,
        request: GenerationRequest,
        hooks: GenerationHooks | None = None,
        *,
        seeds: Sequence[int] | None = None,
        subseeds: Sequence[int] | None = None,
        explain: ExplainOptions | None = None,
    ) -> Result:
        """Run ``request`` (txt2img, with hires fix when ``enable_hr``; img2img / inpainting when it
        carries init images), all ``n_iter`` iterations of it; ``hooks`` watch and steer the run.

        ``seeds`` / ``subseeds`` give every image its own seed (A1111 accepts a seed list in place of
        ``seed + i``); one per image of the request. The lab uses this to batch jobs that differ only
        in their seed. ``explain`` turns the capture on (:mod:`voidprompt.explain`): one
        ``Result.explanations`` entry per image, the same pictures; the UNet then runs uncompiled.
        """
        hooks = hooks or GenerationHooks()
        started = time.perf_counter()
        plan = self._plan(request, hooks, explain)
        request = plan.request
        all_seeds, all_subseeds = batch_seeds(
            request.seed, request.subseed, request.subseed_strength, request.total_images
        )
        for name, explicit in (("seeds", seeds), ("subseeds", subseeds)):
            if explicit is not None and len(explicit) != request.total_images:
                raise InvalidRequestError(
                    f"{name}: {len(explicit)} given for {request.total_images} images "
                    f"(batch_size {request.batch_size} x n_iter {request.n_iter}); give one per image"
                )
        if seeds is not None:
            all_seeds = [fixed_seed(s) for s in seeds]
        if subseeds is not None:
            all_subseeds = [fixed_seed(s) for s in subseeds]
        timings = {"encode": time.perf_counter() - started, "sample": 0.0, "decode": 0.0}

        result = Result([], [], [], [], [], [], [], request=request)
        with self._tiling(request):
            self._iterations(plan, result, all_seeds, all_subseeds, timings, explain)
        timings["total"] = time.perf_counter() - started
        result.timings = timings
        return result

    def _iterations(
        self,
        plan: _Plan,
        result: Result,
        all_seeds: Sequence[int],
        all_subseeds: Sequence[int],
        timings: dict[str, float],
        explain: ExplainOptions | None,
    ) -> None:
        """The ``n_iter`` loop: sample, decode and add each iteration's images to ``result``."""
        request, hooks = plan.request, plan.hooks
        for n in range(request.n_iter):
            if not hooks.proceed(n):
                result.interrupted = True
                break
            batch = slice(n * request.batch_size, (n + 1) * request.batch_size)
            # A1111 quirk: the inpainting fill noise of every iteration is drawn with the FIRST
            # iteration's seeds (all_seeds[0:batch], in its init()).
            iteration = _Iteration(n, all_seeds[batch], all_subseeds[batch], all_seeds[: request.batch_size])
            # Every iteration starts on the main model (A1111 reloads it at the top of its loop).
            self._active, self._switch_facts = self, {}
            t0 = time.perf_counter()
            if explain is not None:
                iteration.recorder = self._recorder(plan, explain)
            try:
                with self.components.precision.autocast_context(), self._probe(plan, iteration):
                    latents = self._sample(plan, iteration)
            except Interrupted:
                # The iteration is abandoned; proceed() decides whether the next one runs.
                timings["sample"] += time.perf_counter() - t0
                continue
            t1 = time.perf_counter()
            # After a refiner switch the refiner's VAE decodes, as the model loaded at that point in A1111.
            decoder = self._active.components
            pixels = decode_latents(decoder, latents, nan_check=not self.disable_nan_check)
            timings["sample"] += t1 - t0
            timings["decode"] += time.perf_counter() - t1
            self._add_images(result, plan, iteration, to_pil_images(pixels))
            if iteration.recorder is not None:
                result.explanations.extend(iteration.recorder.finish())

    def _tiling(self, request: GenerationRequest) -> contextlib.AbstractContextManager[None]:
        """A1111's tiling switch over every network that samples, encodes or decodes this request's
        pictures: this model's UNet and VAE, and a refiner's, which A1111 loses at the switch (loading
        a model resets its padding) but a request for seamless tiles wants kept."""
        if not request.tiling:
            return contextlib.nullcontext()
        modules: list[torch.nn.Module] = [self.components.unet, self.components.vae]
        name = refiner_name(request)
        if name is not None:
            refiner = self._refiner(name).components
            modules += [refiner.unet, refiner.vae]
        return circular_padding(*modules)

    # ------------------------------------------------------------------ steps

    def _plan(
        self, request: GenerationRequest, hooks: GenerationHooks, explain: ExplainOptions | None = None
    ) -> _Plan:
        """Everything the iterations share: the request as it runs (canonical sampler names, fixed
        seeds, img2img defaults), the prepared img2img inputs, the conditioning, the hires pass."""
        request.validate()
        spec, scheduler = resolve(request.sampler_name, request.scheduler)
        # Record the canonical names, as A1111 does after resolving legacy ones.
        request = request.replace(
            sampler_name=spec.label,
            scheduler=scheduler.label,
            seed=fixed_seed(request.seed),
            subseed=fixed_seed(request.subseed),
        )
        if getattr(self.components, "zero_terminal_snr", False):
            # A file marked ztsnr runs the Zero Terminal SNR schedule whatever the setting, and the
            # request as it ran (and its infotext) says so.
            request = request.replace(sd_noise_schedule="Zero Terminal SNR")
        if self._v_prediction:
            for name in (request.sampler_name, request.hr_sampler_name):
                if name is not None and resolve(name, "Automatic")[0].label == "LCM":
                    raise InvalidRequestError(
                        "the LCM sampler needs an eps-prediction model; this checkpoint predicts v"
                    )
        inputs: Img2ImgInputs | None = None
        hires: _Hires | None = None
        if request.is_img2img:
            if request.denoising_strength is None:
                request = request.replace(denoising_strength=DEFAULT_DENOISING)
            inputs = prepare_img2img(request)
            if inputs.batch_size != request.batch_size:
                request = request.replace(batch_size=inputs.batch_size)
        elif request.enable_hr:
            if request.denoising_strength is None:
                request = request.replace(denoising_strength=hires_fix.DEFAULT_HIRES_DENOISING)
            hires = self._hires_setup(request, spec)
        conditioning = self._conditioning(request, spec)

        def recondition(engine: Engine) -> _Conditioning:
            return engine._conditioning(request, spec)

        first = _Pass(spec, scheduler, request.steps, conditioning, recondition)
        name = refiner_name(request)
        if name is not None:
            self._refiner(name)  # loaded now: a name that does not resolve fails before sampling
        return _Plan(request, first, hooks, inputs, hires, explain)

    # ------------------------------------------------------------------ explain capture

    def _recorder(self, plan: _Plan, options: ExplainOptions) -> ExplainRecorder:
        components = self.components
        nan_check = not self.disable_nan_check

        def decode(latents: Tensor) -> Tensor:
            return decode_latents(self._active.components, latents, nan_check=nan_check)

        return ExplainRecorder(plan.request.batch_size, options, latent_rgb_for(components).to_rgb, decode)

    def _probe(self, plan: _Plan, iteration: _Iteration) -> AttentionProbe | contextlib.nullcontext[None]:
        """The attention probe over every UNet this iteration may run (the refiner's too)."""
        recorder = iteration.recorder
        if recorder is None:
            return contextlib.nullcontext()
        probe = AttentionProbe(recorder.add_probabilities)
        probe.attach(self.components.unet)
        name = refiner_name(plan.request)
        if name is not None:
            probe.attach(self._refiner(name).components.unet)
        return probe

    def _pass_prompts(self, request: GenerationRequest, conditioning: _Conditioning) -> PassPrompts:
        """Each (negative, sub-prompt, schedule entry)'s tokens and tags, as this model chunks them."""

        def tokenize(text: str) -> TokenizedLine:
            return self.encoder.tokenize(
                text, emphasis=request.emphasis, comma_padding_backtrack=request.comma_padding_backtrack
            )

        prepared, comma = conditioning.prepared, self.components.tokenizer.comma_id
        return pass_prompts(tokenize, comma, prepared.positive, prepared.negative)

    def _sample(self, plan: _Plan, iteration: _Iteration) -> Tensor:
        if plan.inputs is not None:
            return self._sample_img2img(plan, iteration, plan.inputs)
        latents = self._sample_txt2img(plan, iteration)
        if plan.hires is not None:
            latents = self._sample_hires(plan, iteration, plan.hires, latents)
        return latents

    def _add_images(
        self, result: Result, plan: _Plan, iteration: _Iteration, images: list[Image.Image]
    ) -> None:
        inputs = plan.inputs
        if inputs is not None and inputs.overlays is not None:
            # The final composite: outside the (blurred) mask the original pixels come back exactly.
            images = [
                apply_overlay(image, inputs.paste_to, inputs.overlays[i]) for i, image in enumerate(images)
            ]
        prepared = plan.first.conditioning.prepared
        for index, image in enumerate(images):
            seed, subseed = iteration.seeds[index], iteration.subseeds[index]
            params = self._params(plan, seed, subseed, iteration.index)
            result.images.append(image)
            result.params.append(params)
            result.infotexts.append(
                create_infotext(prepared.prompt_for_infotext, prepared.negative_for_infotext, params)
            )
            result.seeds.append(seed)
            result.subseeds.append(subseed)
            result.prompts.append(prepared.prompt_for_infotext)
            result.negative_prompts.append(prepared.negative_for_infotext)

    def _conditioning(
        self,
        request: GenerationRequest,
        spec: SamplerSpec,
        *,
        size: tuple[int, int] | None = None,
        hires_spec: SamplerSpec | None = None,
        hires_steps: int | None = None,
    ) -> _Conditioning:
        """The first pass's conditioning, or with ``hires_spec`` the hires pass's: hr prompts (empty =
        the first pass's), scheduled over A1111's first-pass and hires sampler totals. ``size``
        (height, width; default the request's) is the pass's picture size, which SDXL's vector
        conditioning carries."""
        if hires_spec is None:
            prepared = prepare_prompts(
                request.prompt,
                request.negative_prompt,
                steps=request.steps,
                styles=request.styles,
                style_db=self.style_db,
                use_old_scheduling=request.use_old_scheduling,
                second_order=spec.second_order,
            )
            context: tuple[Any, ...] = (prepared.schedule_steps, request.use_old_scheduling)
        else:
            assert hires_steps is not None
            # Each pass doubles its own count for second-order samplers (A1111's firstpass_steps and
            # the hires sampler's total_steps), so the totals are passed in already doubled.
            prepared = prepare_prompts(
                request.hr_prompt or request.prompt,
                request.hr_negative_prompt or request.negative_prompt,
                steps=spec.total_steps(request.steps),
                hires_steps=hires_spec.total_steps(hires_steps),
                styles=request.styles,
                style_db=self.style_db,
                use_old_scheduling=request.use_old_scheduling,
                second_order=False,
            )
            context = (
                "hires",
                spec.total_steps(request.steps),
                prepared.schedule_steps,
                request.use_old_scheduling,
            )
        # A1111 takes the batch's extra networks from its (first) positive prompt, before encoding:
        # a LoRA on the text encoder changes the conditioning, so its key goes into the cache key.
        networks = self.networks.apply(
            self.components,
            prepared.extra_networks,
            lora_dir=self.lora_dir,
            hypernet_dir=self.hypernet_dir,
            functional=self.lora_functional,
            missing=self.missing_networks,
        )
        options: dict[str, Any] = {
            "clip_skip": request.clip_skip,
            "emphasis": request.emphasis,
            "comma_padding_backtrack": request.comma_padding_backtrack,
            "model_key": networks.model_key or self.components.checkpoint.short_hash,
            "context": context,
        }
        negative_options: dict[str, Any] = {}
        if self._size is not None:
            options["sdxl_clip_l_skip"] = request.sdxl_clip_l_skip
            negative_options["negative"] = True  # A1111 zeroes an empty negative prompt on SDXL
        with self.components.precision.autocast_context():
            cond = self.encoder.encode_multicond(prepared.positive, **options)
            uncond = self.encoder.encode_schedule(prepared.negative, **options, **negative_options)
        if self._size is not None:
            height, width = size or (request.height, request.width)
            numbers = {
                negative: size_numbers(self._size, request, height=height, width=width, negative=negative)
                for negative in (False, True)
            }
            cond = with_numbers_multi(cond, numbers[False])
            uncond = with_numbers(uncond, numbers[True])
        ti_calls = tuple(
            record
            for call in prepared.encoder_calls()
            for record in self.encoder.ti_records(
                call, emphasis=request.emphasis, comma_padding_backtrack=request.comma_padding_backtrack
            )
        )
        return _Conditioning(prepared, cond, uncond, ti_calls, networks)

    def _empty_prompt_cond(self, request: GenerationRequest, conditioning: _Conditioning) -> Tensor:
        # "Pad conds" pads with the encoded empty prompt (A1111's cond_stage_model_empty_prompt).
        # Through the cache, keyed like the prompts: once per model state, not once per batch.
        options: dict[str, Any] = {}
        if self._size is not None:
            options["sdxl_clip_l_skip"] = request.sdxl_clip_l_skip
        with self.components.precision.autocast_context():
            schedule = self.encoder.encode_schedule(
                [(1, "")],
                clip_skip=request.clip_skip,
                model_key=conditioning.networks.model_key or self.components.checkpoint.short_hash,
                **options,
            )
        return schedule[0].cond

    def _unet_eps(self, x: Tensor, t: Tensor, context: Tensor, y: Tensor | None = None) -> Tensor:
        dtype = self.components.dtype
        sample = x.to(dtype)
        if self._channels_last:
            sample = sample.contiguous(memory_format=torch.channels_last)
        extra: dict[str, Any] = {}
        if y is not None:
            assert self._size is not None
            text_embeds, time_ids = split_vector(y, self._size.pooled_width)
            extra["added_cond_kwargs"] = {"text_embeds": text_embeds.to(dtype), "time_ids": time_ids}
        out = self._pass_unet(
            sample, t.to(x.device), encoder_hidden_states=context.to(dtype), **extra
        ).sample
        return out.to(x.dtype)

    def _unet_for_pass(self) -> Any:
        """The UNet module this sampler pass calls: the compiled one when ``compile`` is on, except
        while networks hang hooks on it (functional LoRAs, hypernetworks). Dynamo does not guard on
        module hooks, so a graph traced with hooks would keep them after they are removed, and one
        traced without them would ignore hooks added later: such passes run eagerly."""
        unet = self.components.unet
        if not self.compile:
            return unet
        if _has_hooks(unet):
            log.info("torch.compile: this pass has hook-based networks; the UNet runs uncompiled")
            return unet
        if self._compiled_unet is None:
            # dynamic=False: one static graph per input shape, reused by every later batch of that shape.
            self._compiled_unet = torch.compile(unet, dynamic=False)
        return self._compiled_unet

    def _sample_txt2img(self, plan: _Plan, iteration: _Iteration) -> Tensor:
        request = plan.request
        factor = latent_factor(self.components)
        shape = (LATENT_CHANNELS, request.height // factor, request.width // factor)
        rng = self._image_rng(request, shape, iteration)
        start = SamplerStart(rng.next(), rng, iteration.seeds)
        image_cond = None
        if self.components.is_inpainting:
            image_cond = txt2img_conditioning(self.components, iteration.seeds, request.height, request.width)
        return self._run(plan, iteration, plan.first, start, image_cond=image_cond)

    def _image_rng(self, request: GenerationRequest, shape: Sequence[int], iteration: _Iteration) -> ImageRNG:
        return ImageRNG(
            shape,
            iteration.seeds,
            subseeds=iteration.subseeds,
            subseed_strength=request.subseed_strength,
            seed_resize_from_h=request.seed_resize_from_h,
            seed_resize_from_w=request.seed_resize_from_w,
            source=request.randn_source,  # type: ignore[arg-type]
            device=self.device,
            eta_noise_seed_delta=request.eta_noise_seed_delta,
        )

    def _sample_img2img(self, plan: _Plan, iteration: _Iteration, inputs: Img2ImgInputs) -> Tensor:
        """A1111's img2img ``init`` (latent part) and ``sample`` for one batch."""
        request = plan.request
        components = self.components
        seeds = iteration.seeds
        source = (inputs.images * 2.0 - 1.0).to(self.device)
        init_latent = encode_images(components, source, seeds)
        if request.resize_mode == LATENT_RESIZE_MODE:
            factor = latent_factor(components)
            size = (request.height // factor, request.width // factor)
            init_latent = torch.nn.functional.interpolate(init_latent, size=size, mode="bilinear")
        blend = None
        if inputs.image_mask is not None:
            mask, nmask = latent_masks(inputs.image_mask, init_latent, request.mask_round)
            if request.inpainting_fill == 2:
                fill_noise = create_random_tensors(
                    init_latent.shape[1:],
                    iteration.first_seeds,
                    source=request.randn_source,  # type: ignore[arg-type]
                    device=self.device,
                )
                init_latent = init_latent * mask + fill_noise * nmask
            elif request.inpainting_fill == 3:
                init_latent = init_latent * mask
            blend = LatentBlend(
                mask, init_latent, nmask, before_denoising=plan.first.spec.is_timestep_sampler
            )
        image_cond = None
        if components.is_inpainting:
            image_cond = inpainting_conditioning(
                components,
                source,
                init_latent,
                seeds,
                image_mask=inputs.image_mask,
                round_mask=request.mask_round,
                mask_weight=request.inpainting_mask_weight,
            )
        rng = self._image_rng(request, init_latent.shape[1:], iteration)
        noise = img2img_noise(rng, request.initial_noise_multiplier)
        assert request.denoising_strength is not None
        img2img = Img2ImgStart.for_strength(
            request.steps, request.denoising_strength, fixed_steps=request.img2img_fix_steps
        )
        start = SamplerStart(noise, rng, seeds, init_latent, img2img)
        samples = self._run(plan, iteration, plan.first, start, image_cond=image_cond, blend=blend)
        if blend is not None:
            samples = blend.apply(samples)
        return samples

    def _hires_setup(self, request: GenerationRequest, spec: SamplerSpec) -> _Hires:
        hires_fix.check_hr_upscaler(request.hr_upscaler, self.upscalers)
        assert request.denoising_strength is not None
        if request.denoising_strength <= 0:
            raise InvalidRequestError(
                "denoising_strength=0 with enable_hr: the hires pass would have no schedule; "
                "use a strength above 0 or turn hires fix off"
            )
        hr_spec, hr_scheduler = resolve(
            request.hr_sampler_name or request.sampler_name, request.hr_scheduler or request.scheduler
        )
        steps = request.hr_second_pass_steps or request.steps
        target = hires_fix.hires_target(request, latent_factor(self.components))
        # SDXL's size numbers in the second pass are the upscaled size (A1111's hr_upscale_to_x/y).
        def recondition(engine: Engine) -> _Conditioning:
            size = (target.upscale_height, target.upscale_width)
            return engine._conditioning(request, spec, size=size, hires_spec=hr_spec, hires_steps=steps)

        return _Hires(
            target=target, run=_Pass(hr_spec, hr_scheduler, steps, recondition(self), recondition)
        )

    def _sample_hires(self, plan: _Plan, iteration: _Iteration, hires: _Hires, latents: Tensor) -> Tensor:
        """A1111's ``sample_hr_pass``: upscale, new noise at the hires shape, img2img over exactly
        the hires steps."""
        request = plan.request
        components = self.components
        seeds = iteration.seeds
        factor = latent_factor(components)
        target = hires.target
        pixels: Tensor | None = None
        if request.hr_upscaler in hires_fix.LATENT_UPSCALE_MODES:
            samples = hires_fix.upscale_latent(
                latents, request.hr_upscaler, target.upscale_height // factor, target.upscale_width // factor
            )
        else:
            lowres = to_pil_images(decode_latents(components, latents, nan_check=not self.disable_nan_check))
            upscaled = [
                resize_image(
                    0,
                    im,
                    target.upscale_width,
                    target.upscale_height,
                    upscaler=request.hr_upscaler,
                    upscalers=self.upscalers,
                )
                for im in lowres
            ]
            pixels = pil_to_tensor(upscaled).to(self.device)
            samples = encode_images(components, pixels * 2.0 - 1.0, seeds)
        samples = hires_fix.truncate_latent(samples, target.truncate_x, target.truncate_y)

        image_cond = None
        if components.is_inpainting:
            # A1111 builds this before truncating (its shapes then disagree when truncating); we build
            # it for the truncated latent.
            h, w = samples.shape[2] * factor, samples.shape[3] * factor
            if pixels is not None:
                top, left = target.truncate_y // 2 * factor, target.truncate_x // 2 * factor
                # A1111 quirk: the pixel path passes the [0, 1] upscaled image where [-1, 1] is expected.
                source = pixels[:, :, top : top + h, left : left + w]
                image_cond = inpainting_conditioning(
                    components, source, samples, seeds, mask_weight=request.inpainting_mask_weight
                )
            elif request.inpainting_mask_weight < 1.0:
                nan_check = not self.disable_nan_check
                source = decode_latents(components, samples, nan_check=nan_check).to(self.device) * 2.0 - 1.0
                image_cond = inpainting_conditioning(
                    components, source, samples, seeds, mask_weight=request.inpainting_mask_weight
                )
            else:
                image_cond = txt2img_conditioning(components, seeds, h, w)

        rng = self._image_rng(request, samples.shape[1:], iteration)
        assert request.denoising_strength is not None
        img2img = Img2ImgStart.for_strength(hires.run.steps, request.denoising_strength, fixed_steps=True)
        start = SamplerStart(rng.next(), rng, seeds, samples, img2img)
        return self._run(plan, iteration, hires.run, start, image_cond=image_cond)

    def _run(
        self,
        plan: _Plan,
        iteration: _Iteration,
        run: _Pass,
        start: SamplerStart,
        *,
        image_cond: Tensor | None = None,
        blend: LatentBlend | None = None,
    ) -> Tensor:
        """One sampler pass over one batch: the denoiser stack, the sampler, progress and stops. After
        a refiner switch earlier in the iteration the refiner runs the whole pass."""
        request = plan.request
        spec = run.spec
        engine = self._active
        conditioning = run.conditioning if engine is self else run.recondition(engine)
        schedule_model, inner, table = engine._denoisers(request, spec)
        batch = start.noise.shape[0]
        conds = engine._batch_conds(request, conditioning, batch)
        guidance = Guidance(
            request.cfg_scale,
            s_min_uncond=request.s_min_uncond,
            batch_cond_uncond=request.batch_cond_uncond,
            pad_cond_uncond=request.pad_cond_uncond,
            pad_cond_uncond_v0=request.pad_cond_uncond_v0,
        )
        hooks = plan.hooks
        switch = None
        if engine is self:
            switch = self._refiner_switch(plan, run, schedule_model, batch)
        recorder = iteration.recorder
        if recorder is not None:
            prompts = self._pass_prompts(request, run.conditioning)
            recorder.begin_pass(self._pass_name(plan, run), prompts, inner.pred_x0)
        cfg = CFGDenoiser(
            _Interruptible(inner, hooks.should_stop),
            conds,
            guidance,
            image_cond=image_cond,
            blend=blend,
            switch=switch,
            observer=recorder,
        )
        if switch is not None:
            switch.cfg = cfg

        def on_step(info: dict[str, Any]) -> None:
            if hooks.progress is not None:
                step = int(info["i"]) + 1
                latent, denoised = info["x"], info.get("denoised")
                hooks.progress(Progress(iteration.index, request.n_iter, step, run.steps, latent, denoised))

        model = SamplingModel(cfg, schedule_model, table)
        samples = run_sampler(SamplerPass(spec, run.scheduler, run.steps), model, start, request, on_step)
        # What A1111 records as it happens, kept over the iterations as its processing object keeps it.
        record = plan.records.setdefault(self._pass_name(plan, run), _PassRecord())
        record.ngms |= cfg.ngms_triggered
        record.padded_conds |= cfg.padded_cond_uncond
        record.padded_conds_v0 |= cfg.padded_cond_uncond_v0
        if record.model_sigma_range is None:
            sigmas = schedule_model.sigmas
            record.model_sigma_range = (float(sigmas[0]), float(sigmas[-1]))
        return samples

    @staticmethod
    def _pass_name(plan: _Plan, run: _Pass) -> str:
        return "hires" if plan.hires is not None and run is plan.hires.run else "first"

    def _denoisers(self, request: GenerationRequest, spec: SamplerSpec) -> tuple[Any, Any, Tensor]:
        """(the sigma-schedule model, the inner model the CFG denoiser calls, the abar table) of this
        engine's UNet for one pass; readies the UNet module the pass calls."""
        components = self.components
        # A graph traced with zero padding must not serve a tiling pass, nor the reverse: tiling runs
        # the UNet uncompiled rather than counting on dynamo to guard on each layer's padding mode.
        self._pass_unet = components.unet if request.tiling else self._unet_for_pass()
        table = components.alphas_cumprod
        downcast = request.use_downcasted_alpha_bar
        if request.sd_noise_schedule == "Zero Terminal SNR":
            # A1111's order: the downcast first (the table then stays float16, so the rescale runs in
            # float16 too), then the rescale, into the one table every sampler uses.
            half = table.to(torch.float16) if downcast else table
            table = zero_terminal_snr_alphas_cumprod(half).to(table.dtype)
            downcast = False
        alphas_cumprod = table.to(self.device)
        schedule_model: DiscreteEpsDenoiser
        if spec.label == "LCM":
            # LCM samples over its own 50 "original" timesteps (A1111's LCMCompVisDenoiser).
            schedule_model = LCMDenoiser(self._unet_eps, alphas_cumprod)
        else:
            sigma_model = DiscreteVDenoiser if self._v_prediction else DiscreteEpsDenoiser
            schedule_model = sigma_model(self._unet_eps, alphas_cumprod, downcast_alphas=downcast)
        timestep_model = VTimestepModel if self._v_prediction else EpsTimestepModel
        inner: Any = (
            timestep_model(self._unet_eps, table, downcast_alphas=downcast)
            if spec.is_timestep_sampler
            else schedule_model
        )
        return schedule_model, inner, table

    def _batch_conds(self, request: GenerationRequest, conditioning: _Conditioning, batch: int) -> BatchConds:
        return BatchConds(
            [conditioning.cond] * batch,
            [conditioning.uncond] * batch,
            self._empty_prompt_cond(request, conditioning) if request.pad_cond_uncond else None,
        )

    def _refiner(self, name: str) -> Engine:
        """The engine over the refiner checkpoint ``name``, loaded once and kept beside this one."""
        if name not in self._refiners:
            if self.refiner_loader is None:
                raise InvalidRequestError(
                    f"refiner_checkpoint={name!r}: this front end cannot load a refiner; leave it empty"
                )
            self._refiners[name] = Engine(
                self.refiner_loader(name),
                style_db=self.style_db,
                lora_dir=self.lora_dir,
                hypernet_dir=self.hypernet_dir,
                lora_functional=self.lora_functional,
                missing_networks=self.missing_networks,
                compile=self.compile,
                disable_nan_check=self.disable_nan_check,
            )
            if self._database_for is not None:
                self._refiners[name].give_embeddings(self._database_for)
        return self._refiners[name]

    def _refiner_switch(
        self, plan: _Plan, run: _Pass, schedule_model: Any, batch: int
    ) -> _RefinerSwitch | None:
        request = plan.request
        name = refiner_name(request)
        hires = plan.hires is not None
        second_pass = plan.hires is not None and run is plan.hires.run
        if name is None or not pass_takes_refiner(request, hires=hires, second_pass=second_pass):
            return None
        return _RefinerSwitch(self, self._refiner(name), plan, run, schedule_model, batch)

    def _params(self, plan: _Plan, seed: int, subseed: int, iteration: int = 0) -> dict[str, Any]:
        request, spec, scheduler = plan.request, plan.first.spec, plan.first.scheduler
        conditioning, hires, records = plan.first.conditioning, plan.hires, plan.records
        components = self.components
        names = infotext_names(request.sampler_name, request.scheduler)
        prepared = conditioning.prepared
        networks = dict(conditioning.networks.infotext)
        # A1111 copies its text encoder's record (TI hashes, Emphasis) into an iteration's parameters
        # before it samples; the hires pass encodes after that copy in the first iteration and from
        # its cache afterwards, so from the second iteration on the record holds the hires calls too.
        encoder_calls = list(conditioning.ti_calls)
        encoded_texts = prepared.encoded_texts()
        if iteration > 0 and hires is not None:
            encoder_calls += hires.run.conditioning.ti_calls
            encoded_texts += hires.run.conditioning.prepared.encoded_texts()
        extra: dict[str, Any] = {}
        if request.refiner_switch_by_sample_steps:
            # A1111 quirk: recorded at every denoiser call, before it looks for a refiner at all.
            extra["Refiner switch by sampling steps"] = True
        extra.update(self._switch_facts)
        vae = components.vae_info
        model = ModelFacts(
            hash=components.checkpoint.short_hash,
            name=components.checkpoint.name,
            vae_name=vae.name if vae is not None else None,
            vae_hash=vae.short_hash if vae is not None else None,
            inpainting=components.is_inpainting,
        )
        first = records.get("first", _PassRecord())
        passes = [first.facts(spec, scheduler, from_image=request.is_img2img)]
        hires_prompts = None
        if hires is not None:
            hr = hires.run
            hr_prepared = hr.conditioning.prepared
            record = records.get("hires", _PassRecord())
            differ = hr_prepared.old_timelines_differ
            passes.append(record.facts(hr.spec, hr.scheduler, from_image=True, old_timelines_differ=differ))
            hires_prompts = (hr_prepared.prompt_for_infotext, hr_prepared.negative_for_infotext)
        run = RunFacts(
            schedule_type=names["Schedule type"],
            uses_ensd=uses_ensd(spec, request),
            extra=extra,
            passes=tuple(passes),
            model_sigma_range=first.model_sigma_range,
            encoded_texts=encoded_texts,
            old_timelines_differ=prepared.old_timelines_differ,
            prompts=(prepared.prompt_for_infotext, prepared.negative_for_infotext),
            hires_prompts=hires_prompts,
            networks=networks,
            ti_hashes=ti_hashes_text(encoder_calls),
        )
        return generation_params(request, ImageFacts(seed, subseed), model, run)


@dataclass(frozen=True)
class GenerationHooks:
    """How a caller watches and steers a run.

    ``progress`` hears every sampler step. ``should_stop`` is polled between UNet calls: when it
    says True the current iteration is abandoned (its images are dropped). Before each iteration of
    ``n_iter`` the engine asks ``before_iteration(n)`` (when given), then ``should_stop``: either one
    ending the loop marks the result interrupted. A1111's "skip" (abandon this iteration, go on) is a
    ``before_iteration`` that clears the caller's skip flag; its "interrupt" keeps ``should_stop`` True.
    """

    progress: ProgressCallback | None = None
    should_stop: Callable[[], bool] | None = None
    before_iteration: Callable[[int], bool] | None = None

    def proceed(self, iteration: int) -> bool:
        if self.before_iteration is not None and not self.before_iteration(iteration):
            return False
        return self.should_stop is None or not self.should_stop()


@dataclass(frozen=True)
class _Pass:
    """One sampler pass of a request: the first pass or the hires pass. ``recondition(engine)``
    computes the pass's conditioning with another engine's model (the refiner's)."""

    spec: SamplerSpec
    scheduler: SchedulerSpec
    steps: int
    conditioning: _Conditioning
    recondition: Callable[[Engine], _Conditioning]


class _RefinerSwitch:
    """The CFG denoiser's ``switch``: hands one pass over to the refiner once it has come far enough
    (:mod:`voidprompt.pipeline.refiner`)."""

    def __init__(
        self, main: Engine, refiner: Engine, plan: _Plan, run: _Pass, schedule_model: Any, batch: int
    ) -> None:
        self.main, self.refiner, self.plan, self.run = main, refiner, plan, run
        self.sigmas = None if run.spec.is_timestep_sampler else schedule_model.sigmas
        self.batch = batch
        self.cfg: CFGDenoiser | None = None

    def __call__(self, sigma: Tensor) -> tuple[Any, BatchConds] | None:
        main, request = self.main, self.plan.request
        if main._active is not main or self.cfg is None:
            return None
        ratio = completed_ratio(
            sigma,
            sigmas=self.sigmas,
            step=self.cfg.step,
            total_steps=self.run.spec.total_steps(self.run.steps),
            by_steps=request.refiner_switch_by_sample_steps,
        )
        if request.refiner_switch_at is not None and ratio < request.refiner_switch_at:
            return None
        refiner = self.refiner
        checkpoint = refiner.components.checkpoint
        main._active = refiner
        main._switch_facts = refiner_infotext(
            request, f"{checkpoint.name} [{checkpoint.short_hash}]", hires=self.plan.hires is not None
        )
        conditioning = self.run.recondition(refiner)
        _, inner, _ = refiner._denoisers(request, self.run.spec)
        conds = refiner._batch_conds(request, conditioning, self.batch)
        return _Interruptible(inner, self.plan.hooks.should_stop), conds


@dataclass(frozen=True)
class _Hires:
    """The hires pass of a request: its target size and its sampler pass."""

    target: hires_fix.HiresTarget
    run: _Pass


@dataclass(frozen=True)
class _Plan:
    """One request as it runs: what all its iterations share."""

    request: GenerationRequest
    first: _Pass
    hooks: GenerationHooks
    inputs: Img2ImgInputs | None = None
    hires: _Hires | None = None
    explain: ExplainOptions | None = None
    # Per pass ("first", "hires"): what its sampler recorded so far.
    records: dict[str, _PassRecord] = field(default_factory=dict)


@dataclass
class _PassRecord:
    """What one pass's sampler did over the iterations so far: NGMS skipped an uncond pass, "Pad
    conds" (v0) padded a pass's last call; and the model's sigma range it sampled over."""

    ngms: bool = False
    padded_conds: bool = False
    padded_conds_v0: bool = False
    model_sigma_range: tuple[float, float] | None = None

    def facts(
        self,
        sampler: SamplerSpec,
        scheduler: SchedulerSpec,
        *,
        from_image: bool,
        old_timelines_differ: bool = False,
    ) -> PassFacts:
        return PassFacts(
            sampler,
            scheduler,
            from_image=from_image,
            ngms=self.ngms,
            padded_conds=self.padded_conds,
            padded_conds_v0=self.padded_conds_v0,
            old_timelines_differ=old_timelines_differ,
        )


@dataclass
class _Iteration:
    """Iteration ``index`` of ``n_iter``: its images' seeds, the first iteration's seeds, and the
    explain capture's recorder when it is on."""

    index: int
    seeds: Sequence[int]
    subseeds: Sequence[int]
    first_seeds: Sequence[int]
    recorder: ExplainRecorder | None = None


class _Interruptible:
    """Wraps the inner model so a long sampling run stops between UNet calls when asked."""

    def __init__(self, inner: Any, should_stop: Callable[[], bool] | None) -> None:
        self.inner = inner
        self.should_stop = should_stop

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        if self.should_stop is not None and self.should_stop():
            raise Interrupted("generation interrupted")
        return self.inner(*args, **kwargs)


def latent_factor(components: Components) -> int:
    """Pixels per latent cell: 8 for every SD1 VAE (A1111's opt_f); narrower test VAEs may differ."""
    return int(2 ** (len(components.vae.config.block_out_channels) - 1))


@torch.no_grad()
def decode_latents(components: Components, latents: Tensor, *, nan_check: bool = True) -> Tensor:
    """VAE decode to pixels in [0, 1], (B, 3, H, W) float32 on the CPU (A1111's decode + clamp).

    With ``nan_check`` (A1111's ``test_for_nans(samples, "unet")`` after sampling and its
    ``decode_latent_batch(..., check_for_nans=True)``), NaN latents fail with A1111's Unet
    :class:`~voidprompt.errors.NansError`, which no VAE can fix; then a VAE decode that overflows
    half precision is redone in float32 and the VAE stays float32 from then on
    (``components.precision`` records it), and a NaN decoded image fails with the VAE one. Without
    it, the latents decode as they are.
    """
    policy = components.precision
    if nan_check:
        check_for_nans(latents, "unet", dtype=policy.weights)
    z = latents / components.scaling_factor
    decoded = decode_with_nan_fallback(components.vae, z, nan_check=nan_check)
    if decoded.upcast and policy.vae != torch.float32:
        components.precision = policy.with_vae(torch.float32)
    return torch.clamp((decoded.sample + 1.0) / 2.0, min=0.0, max=1.0).cpu()


def _has_hooks(module: torch.nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


def to_pil_images(pixels: Tensor) -> list[Image.Image]:
    """8-bit images exactly as A1111 makes them: x255 then truncation (not rounding). NaN (kept
    only with the NaN check off) becomes 0, what A1111's cast gives on x86, on every platform."""
    arrays = (255.0 * torch.nan_to_num(pixels, nan=0.0).permute(0, 2, 3, 1).numpy()).astype(np.uint8)
    return [Image.fromarray(a, mode="RGB") for a in arrays]
