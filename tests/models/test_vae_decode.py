"""The fp16 NaN fallback decode."""

from __future__ import annotations

import logging

import pytest
import torch

from voidprompt.models.vae_decode import decode_with_nan_fallback
from voidprompt.testing.fake_checkpoints import tiny_sd1_modules


def test_nan_fallback_on_a_vae_that_overflows_fp16(caplog: pytest.LogCaptureFixture) -> None:
    _, vae, _ = tiny_sd1_modules(0)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, 8, 8, generator=g) * 4
    with torch.no_grad():
        # Blow the decoder's first conv up: weights up to 20000 (fine in fp16), activations around
        # 3e5 - past fp16's 65504, harmless in float32 (the group norm after it rescales them).
        w = vae.decoder.conv_in.weight
        w.copy_(w / w.abs().max() * 20000)
        ref = vae.decode(z).sample
    assert torch.isfinite(ref).all()
    vae.half()
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    with torch.no_grad():
        raw = vae.decode(z.half()).sample
    assert not torch.isfinite(raw).all()  # the plain half decode is broken
    with caplog.at_level(logging.WARNING):
        res = decode_with_nan_fallback(vae, z)
    assert res.upcast and res.message and "float32" in res.message
    assert any("NaN/inf" in r.message for r in caplog.records)
    assert torch.isfinite(res.sample).all()
    # the retry is a float32 decode of the fp16 weights
    expect = vae.float().decode(z).sample
    vae.half()
    torch.testing.assert_close(res.sample, expect)
    assert all(torch.equal(v, before[k]) for k, v in vae.state_dict().items())  # back in fp16, same bits
    assert next(vae.parameters()).dtype == torch.float16


def test_no_fallback_when_fp16_is_fine() -> None:
    _, vae, _ = tiny_sd1_modules(0)
    vae.half()
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    res = decode_with_nan_fallback(vae, z)
    assert not res.upcast and res.sample.dtype == torch.float32 and torch.isfinite(res.sample).all()
