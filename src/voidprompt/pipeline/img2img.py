"""img2img and inpainting preparation (A1111's ``StableDiffusionProcessingImg2Img.init``).

:func:`prepare_img2img` does the image-space work once per request (A1111 does it once in ``init``
for every ``n_iter`` iteration): mask binarising, inverting and blurring, the "only masked" crop,
resizing, the "fill" masked content, the overlay for the final composite. The latent-space work
(VAE encode, latent mask, latent noise / nothing, inpainting-model conditioning) is done per batch
by the engine with the functions below.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from voidprompt.errors import InvalidRequestError
from voidprompt.models.components import Components
from voidprompt.models.vae_decode import vae_dtype
from voidprompt.pipeline import masking
from voidprompt.pipeline.images import flatten, pil_to_tensor, resize_image
from voidprompt.request import GenerationRequest

DEFAULT_DENOISING = 0.75  # A1111's img2img default
LATENT_RESIZE_MODE = 3  # "Just resize (latent upscale)"


@dataclass
class Img2ImgInputs:
    """The image-space result of A1111's img2img ``init``, shared by every batch of the request."""

    images: Tensor  # (batch, 3, H, W) in [0, 1]: what is VAE-encoded
    batch_size: int  # A1111 quirk: several init images set the batch size to their count
    image_mask: Image.Image | None = None  # blurred mask at the processing size (255 = regenerate)
    overlays: list[Image.Image] | None = None  # per image: the original with the masked area transparent
    paste_to: tuple[int, int, int, int] | None = None  # "only masked": (x, y, w, h) in the original

    @property
    def has_mask(self) -> bool:
        return self.image_mask is not None


def prepare_img2img(request: GenerationRequest) -> Img2ImgInputs:
    """Preprocess ``request.init_images`` and ``request.mask`` as A1111's img2img ``init`` does."""
    width, height = request.width, request.height
    image_mask: Image.Image | None = None
    mask_for_overlay: Image.Image | None = None
    crop_region: masking.CropRegion | None = None
    paste_to = None

    if request.mask is not None:
        image_mask = masking.create_binary_mask(request.mask, request.mask_round)
        if request.inpainting_mask_invert:
            image_mask = ImageOps.invert(image_mask)
        image_mask = masking.blur_mask(image_mask, request.mask_blur_x, request.mask_blur_y)
        if request.inpaint_full_res:
            mask_for_overlay = image_mask
            crop_region = masking.get_crop_region(image_mask, request.inpaint_full_res_padding)
            if crop_region is not None:
                crop_region = masking.expand_crop_region(
                    crop_region, width, height, image_mask.width, image_mask.height
                )
                x1, y1, x2, y2 = crop_region
                image_mask = resize_image(2, image_mask.crop(crop_region), width, height).convert("L")
                paste_to = (x1, y1, x2 - x1, y2 - y1)
            else:
                # A1111: an empty mask turns "only masked" into plain img2img.
                image_mask = mask_for_overlay = None
        else:
            image_mask = resize_image(request.resize_mode, image_mask, width, height).convert("L")
            # A1111 quirk: the overlay uses the mask doubled (clipped), so the generated pixels cover
            # the blur's outer half fully and fade out only over its inner half.
            doubled = np.clip(np.asarray(image_mask, dtype=np.float32) * 2, 0, 255).astype(np.uint8)
            mask_for_overlay = Image.fromarray(doubled, mode="L")

    processed: list[Image.Image] = []
    overlays: list[Image.Image] = []
    for init in request.init_images:
        if not isinstance(init, Image.Image):
            raise InvalidRequestError(
                f"init_images holds a {type(init).__name__}; pass PIL images (PIL.Image.open(path))"
            )
        image = flatten(init)
        if crop_region is None and request.resize_mode != LATENT_RESIZE_MODE:
            image = resize_image(request.resize_mode, image, width, height)
        if image_mask is not None and mask_for_overlay is not None:
            if mask_for_overlay.size != image.size:
                mask_for_overlay = resize_image(request.resize_mode, mask_for_overlay, *image.size).convert(
                    "L"
                )
            overlays.append(masking.overlay_image(image, mask_for_overlay))
        if crop_region is not None:
            image = resize_image(2, image.crop(crop_region), width, height)
        if image_mask is not None and request.inpainting_fill != 1:
            if image_mask.size != image.size:
                raise InvalidRequestError(
                    f"mask is {image_mask.size[0]}x{image_mask.size[1]} but the image to fill is "
                    f"{image.width}x{image.height}; with resize_mode=3 send an init image of width x height"
                )
            # A1111 runs "fill" for latent noise / latent nothing too (their latents then replace it).
            image = masking.fill(image, image_mask)
        processed.append(image)

    batch = request.batch_size
    if len(processed) == 1:
        processed = processed * batch
        overlays = overlays * batch
    elif len(processed) <= batch:
        batch = len(processed)
    else:
        raise InvalidRequestError(
            f"{len(processed)} init images for batch_size={request.batch_size}: send one image, "
            f"or at most batch_size images"
        )
    return Img2ImgInputs(
        images=pil_to_tensor(processed),
        batch_size=batch,
        image_mask=image_mask,
        overlays=overlays or None,
        paste_to=paste_to,
    )


@torch.no_grad()
def encode_images(components: Components, images: Tensor, seeds: Sequence[int]) -> Tensor:
    """VAE-encode (B, 3, H, W) images in [-1, 1] to latents times the scaling factor.

    A1111 samples the VAE posterior with the unseeded global torch RNG, so its img2img latents are
    not reproducible. We sample image i's posterior with a CPU generator seeded with ``seeds[i]``:
    deterministic, and a batch encodes exactly as its images would one by one.
    """
    if len(seeds) != images.shape[0]:
        raise InvalidRequestError(f"{images.shape[0]} images but {len(seeds)} seeds: need one seed per image")
    vae = components.vae
    dist = vae.encode(images.to(components.device, vae_dtype(vae))).latent_dist
    mean, std = dist.mean.float(), dist.std.float()
    noise = torch.stack(
        [torch.randn(mean.shape[1:], generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds]
    ).to(mean.device)
    return (mean + std * noise) * components.scaling_factor


def latent_masks(image_mask: Image.Image, latent: Tensor, round_mask: bool) -> tuple[Tensor, Tensor]:
    """(mask, nmask) shaped like one latent (C, h, w): ``mask`` = 1 keeps the original latent,
    ``nmask`` = 1 regenerates (A1111's ``p.mask`` / ``p.nmask``)."""
    regen = masking.latent_mask(image_mask, latent.shape[3], latent.shape[2], round_mask)
    tiled = torch.from_numpy(np.tile(regen[None], (latent.shape[1], 1, 1))).to(latent.device, latent.dtype)
    return 1.0 - tiled, tiled


@torch.no_grad()
def inpainting_conditioning(
    components: Components,
    source: Tensor,
    latent: Tensor,
    seeds: Sequence[int],
    *,
    image_mask: Image.Image | None = None,
    round_mask: bool = True,
    mask_weight: float = 1.0,
) -> Tensor:
    """The 5 extra input channels of a 9-channel inpainting UNet (A1111's
    ``inpainting_image_conditioning``): the mask at latent size (nearest), then the latent of the
    image with the masked area blanked, mixed back towards the full image by ``1 - mask_weight``.

    ``source`` is (B, 3, H, W) in [-1, 1]; without a mask the whole image counts as masked.
    """
    if image_mask is not None:
        values = np.asarray(image_mask.convert("L"), dtype=np.float32) / 255.0
        cond_mask = torch.from_numpy(values[None, None])
        if round_mask:
            cond_mask = torch.round(cond_mask)
    else:
        cond_mask = source.new_ones(1, 1, *source.shape[-2:])
    cond_mask = cond_mask.to(source.device, source.dtype)
    blanked = torch.lerp(source, source * (1.0 - cond_mask), mask_weight)
    cond_latent = encode_images(components, blanked, seeds)
    small = torch.nn.functional.interpolate(cond_mask, size=latent.shape[-2:])
    small = small.expand(cond_latent.shape[0], -1, -1, -1).to(cond_latent.device, cond_latent.dtype)
    return torch.cat([small, cond_latent], dim=1)


@torch.no_grad()
def txt2img_conditioning(components: Components, seeds: Sequence[int], height: int, width: int) -> Tensor:
    """An inpainting model's conditioning for txt2img (A1111's ``txt2img_image_conditioning``): the
    whole image masked, the masked image a mid-grey (0.5, i.e. 0 in [-1, 1]) canvas."""
    grey = torch.zeros(len(seeds), 3, height, width)
    cond_latent = encode_images(components, grey, seeds)
    return torch.nn.functional.pad(cond_latent, (0, 0, 0, 0, 1, 0), value=1.0)
