"""The half-precision NaN fallback decode (A1111's auto_vae_precision) and that it sticks, then
A1111's NaN check on each decoded image."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch

from voidprompt.errors import NansError
from voidprompt.models.vae_decode import decode_with_nan_fallback, vae_dtype
from voidprompt.testing.fake_checkpoints import tiny_sd1_modules


def overflowing_vae() -> Any:
    """The tiny VAE with its decoder's first conv blown up: weights up to 20000 (fine in fp16), and
    for latents of unit size activations around 3e5 - past fp16's 65504, harmless in float32 (the
    group norm after it rescales them). Latents a tenth that size stay inside fp16's range."""
    _, vae, _ = tiny_sd1_modules(0)
    with torch.no_grad():
        w = vae.decoder.conv_in.weight
        w.copy_(w / w.abs().max() * 20000)
    return vae


def _latents() -> torch.Tensor:
    return torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))


def test_an_overflowing_fp16_decode_is_redone_in_fp32_and_the_vae_stays_fp32(
    caplog: pytest.LogCaptureFixture,
) -> None:
    vae = overflowing_vae()
    z = _latents()[:1] * 4
    with torch.no_grad():
        assert torch.isfinite(vae.decode(z).sample).all()
        vae.half()
        fp16_weights = {k: v.clone() for k, v in vae.state_dict().items()}
        assert not torch.isfinite(vae.decode(z.half()).sample).all()  # the plain half decode is broken
    with caplog.at_level(logging.WARNING):
        res = decode_with_nan_fallback(vae, z)
    assert res.upcast and res.first_redone == 0 and res.message and "float32" in res.message
    assert [r.message for r in caplog.records] == [res.message]
    assert torch.isfinite(res.sample).all() and res.sample.dtype == torch.float32
    # Sticky: the VAE is float32 now, holding exactly its fp16 values.
    assert vae_dtype(vae) == torch.float32
    assert all(torch.equal(v, fp16_weights[k].float()) for k, v in vae.state_dict().items())
    with torch.no_grad():
        expect = vae.decode(z).sample
    torch.testing.assert_close(res.sample, expect, rtol=0, atol=0)
    # The next decode goes straight to float32: no second warning, no second decode.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        again = decode_with_nan_fallback(vae, z)
    assert not again.upcast and caplog.records == []
    assert torch.equal(again.sample, expect)


def test_a_batch_switches_at_its_first_failing_image_as_a1111s_per_image_loop() -> None:
    # Image 0 and 2 fit fp16, image 1 overflows: A1111 decodes one image at a time, keeps image 0's
    # fp16 decode and decodes images 1 and 2 in float32, having converted the VAE on image 1.
    vae = overflowing_vae().half()
    z = _latents() * torch.tensor([0.1, 1.0, 0.1]).view(3, 1, 1, 1)
    with torch.no_grad():
        half = [vae.decode(z[i : i + 1].half()).sample for i in range(3)]
    assert [bool(torch.isfinite(h).all()) for h in half] == [True, False, True]
    res = decode_with_nan_fallback(vae, z)
    assert res.upcast and res.first_redone == 1 and "image 1" in str(res.message)
    with torch.no_grad():
        full = [vae.decode(z[i : i + 1]).sample for i in (1, 2)]
    assert torch.equal(res.sample[0:1], half[0].float())
    assert torch.equal(res.sample[1:2], full[0]) and torch.equal(res.sample[2:3], full[1])
    # The fp16 and fp32 decodes of the image that fitted differ: the switch point is visible.
    assert not torch.equal(half[2].float(), res.sample[2:3])


def test_each_image_is_decoded_alone_as_a1111s_decode_latent_batch() -> None:
    _, vae, _ = tiny_sd1_modules(0)
    z = _latents()
    with torch.no_grad():
        alone = torch.cat([vae.decode(z[i : i + 1]).sample for i in range(3)])
    batches: list[int] = []
    vae.decoder.register_forward_pre_hook(lambda _, args: batches.append(args[0].shape[0]))
    res = decode_with_nan_fallback(vae, z)
    assert batches == [1, 1, 1]
    assert torch.equal(res.sample, alone) and not res.upcast


def test_every_value_is_tested_not_only_the_first() -> None:
    # A1111 tests x[0, 0, 0] of each image. An overflow in the decoder's last conv spoils only the
    # pixels where the output passes 65504: here the first value stays about 30000, others reach 5e5.
    _, vae, _ = tiny_sd1_modules(0)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        scale = 30000 / float(vae.decode(z).sample[0, 0, 0, 0].abs())
        vae.decoder.conv_out.weight.mul_(scale)
        vae.decoder.conv_out.bias.mul_(scale)
        vae.half()
        raw = vae.decode(z.half()).sample
    assert torch.isfinite(raw[0, 0, 0, 0]) and not torch.isfinite(raw).all()
    res = decode_with_nan_fallback(vae, z)
    assert res.upcast and torch.isfinite(res.sample).all()


def test_no_fallback_when_fp16_is_fine() -> None:
    _, vae, _ = tiny_sd1_modules(0)
    vae.half()
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    res = decode_with_nan_fallback(vae, z)
    assert not res.upcast and res.sample.dtype == torch.float32 and torch.isfinite(res.sample).all()
    assert vae_dtype(vae) == torch.float16


def test_the_decode_runs_in_the_vae_dtype_even_under_autocast() -> None:
    # A1111 decodes under without_autocast: a float32 VAE inside a bf16 autocast block stays float32.
    _, vae, _ = tiny_sd1_modules(0)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = vae.decode(z).sample
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cast = vae.decode(z).sample
            res = decode_with_nan_fallback(vae, z)
    assert not torch.equal(cast.float(), plain)  # autocast would have changed it
    assert torch.equal(res.sample, plain)


def _nan_vae() -> Any:
    _, vae, _ = tiny_sd1_modules(0)
    with torch.no_grad():
        vae.decoder.conv_in.weight[0, 0, 0, 0] = float("nan")
    return vae


def test_a_vae_that_decodes_nan_fails_with_a1111s_message() -> None:
    with pytest.raises(NansError) as error:
        decode_with_nan_fallback(_nan_vae(), _latents())
    message = str(error.value)
    assert message.startswith("A tensor with NaNs was produced in VAE. It decoded in fp32")
    assert "\n" not in message and message.endswith("Use --disable-nan-check to turn this check off.")


def test_a_half_vae_that_decodes_nan_falls_back_first_then_fails(caplog: pytest.LogCaptureFixture) -> None:
    # A1111's order: the float32 fallback first. A1111 keeps the image it redid without testing it
    # (one black picture); here the redone image is tested too and the generation fails.
    vae = _nan_vae().half()
    with caplog.at_level(logging.WARNING), pytest.raises(NansError, match=r"in VAE\. It decoded in fp32"):
        decode_with_nan_fallback(vae, _latents())
    assert vae_dtype(vae) == torch.float32
    assert ["VAE decode in float16" in r.message for r in caplog.records] == [True]


def test_without_the_nan_check_there_is_no_fallback_either() -> None:
    # A1111 quirk: its fallback starts from the NaN check's exception, so --disable-nan-check keeps
    # the half-precision decode that overflowed, and a NaN VAE's output is returned as it is.
    vae = overflowing_vae().half()
    z = _latents()[:1] * 4
    with torch.no_grad():
        expect = vae.decode(z.half()).sample.float()
    res = decode_with_nan_fallback(vae, z, nan_check=False)
    assert not res.upcast and vae_dtype(vae) == torch.float16
    assert not torch.isfinite(res.sample).all()
    torch.testing.assert_close(res.sample, expect, rtol=0, atol=0, equal_nan=True)
    assert decode_with_nan_fallback(_nan_vae(), _latents(), nan_check=False).sample.isnan().all()
