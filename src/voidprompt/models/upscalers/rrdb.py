"""The ESRGAN family's network (RRDBNet, Wang et al. 2018, "ESRGAN: Enhanced Super-Resolution
Generative Adversarial Networks", arXiv:1809.00219), built from a state dict's key names and shapes.

Two key layouts are in use and both load here:

- the original ESRGAN one, a flat ``nn.Sequential``: ``model.0`` (first conv),
  ``model.1.sub.N.RDBj.convk.0`` (the trunk), ``model.1.sub.<nb>`` (the trunk's last conv), then one
  conv every third index per x2 up-step (``model.3``, ``model.6``, ...), the HR conv and the last conv
  (4x-UltraSharp and most community models);
- BasicSR's named one (``conv_first``, ``body.N.rdbj.convk``, ``conv_body``, ``conv_upK``,
  ``conv_hr``, ``conv_last``; Real-ESRGAN's files keep it under ``params_ema`` or ``params``), and its
  older spelling (``RRDB_trunk``, ``trunk_conv``, ``upconvK``, ``HRconv``).

Real-ESRGAN's x2 and x1 models feed the network a pixel-unshuffled picture (factor 2 or 4): their
first conv takes 4x or 16x the output channels. The picture is padded (reflected) on the right and
bottom to a multiple of the factor first, and the result cropped back, as spandrel (A1111's loader
since 1.8) does.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from voidprompt.errors import UnsupportedModelError

__all__ = ["RRDBNet", "RRDBShape", "canonical_rrdb_keys", "rrdb_from_state_dict", "rrdb_shape"]

_SLOPE = 0.2  # every activation of the family is LeakyReLU(0.2)
_RESIDUAL = 0.2  # dense blocks and RRDBs add their output scaled by 0.2


class _DenseBlock(nn.Module):
    """Five 3x3 convs, each seeing the block input and every earlier output (channel concat)."""

    def __init__(self, nf: int, gc: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(nf, gc, 3, padding=1)
        self.conv2 = nn.Conv2d(nf + gc, gc, 3, padding=1)
        self.conv3 = nn.Conv2d(nf + 2 * gc, gc, 3, padding=1)
        self.conv4 = nn.Conv2d(nf + 3 * gc, gc, 3, padding=1)
        self.conv5 = nn.Conv2d(nf + 4 * gc, nf, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        feats = [x]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            feats.append(F.leaky_relu(conv(torch.cat(feats, 1)), _SLOPE))
        return self.conv5(torch.cat(feats, 1)) * _RESIDUAL + x


class _RRDB(nn.Module):
    def __init__(self, nf: int, gc: int) -> None:
        super().__init__()
        self.rdb1 = _DenseBlock(nf, gc)
        self.rdb2 = _DenseBlock(nf, gc)
        self.rdb3 = _DenseBlock(nf, gc)

    def forward(self, x: Tensor) -> Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * _RESIDUAL + x


class RRDBShape:
    """Hyper-parameters read from a state dict: channels in and out of the picture, feature width
    ``nf``, growth ``gc``, blocks ``nb``, x2 up-steps, and the pixel-unshuffle factor (1 = none)."""

    def __init__(
        self, *, in_nc: int, out_nc: int, nf: int, gc: int, nb: int, ups: int, unshuffle: int
    ) -> None:
        self.in_nc, self.out_nc, self.nf, self.gc, self.nb = in_nc, out_nc, nf, gc, nb
        self.ups, self.unshuffle = ups, unshuffle

    @property
    def scale(self) -> int:
        """How many times larger the output picture is than the input picture."""
        return 2**self.ups // self.unshuffle

    def __repr__(self) -> str:
        return (
            f"RRDBShape(in_nc={self.in_nc}, out_nc={self.out_nc}, nf={self.nf}, gc={self.gc}, "
            f"nb={self.nb}, ups={self.ups}, unshuffle={self.unshuffle}, scale={self.scale})"
        )


class RRDBNet(nn.Module):
    """ESRGAN's generator in BasicSR's naming; :func:`canonical_rrdb_keys` maps other layouts onto it."""

    def __init__(self, shape: RRDBShape) -> None:
        super().__init__()
        self.shape = shape
        nf = shape.nf
        self.conv_first = nn.Conv2d(shape.in_nc * shape.unshuffle**2, nf, 3, padding=1)
        self.body = nn.Sequential(*(_RRDB(nf, shape.gc) for _ in range(shape.nb)))
        self.conv_body = nn.Conv2d(nf, nf, 3, padding=1)
        self.ups = nn.ModuleList(nn.Conv2d(nf, nf, 3, padding=1) for _ in range(shape.ups))
        self.conv_hr = nn.Conv2d(nf, nf, 3, padding=1)
        self.conv_last = nn.Conv2d(nf, shape.out_nc, 3, padding=1)

    @property
    def scale(self) -> int:
        return self.shape.scale

    def forward(self, x: Tensor) -> Tensor:
        factor = self.shape.unshuffle
        h, w = x.shape[2], x.shape[3]
        if factor > 1:
            pad_h, pad_w = -h % factor, -w % factor
            if pad_h or pad_w:
                x = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect")
            x = F.pixel_unshuffle(x, factor)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        for conv in self.ups:
            feat = F.leaky_relu(conv(F.interpolate(feat, scale_factor=2.0, mode="nearest")), _SLOPE)
        out = self.conv_last(F.leaky_relu(self.conv_hr(feat), _SLOPE))
        if factor > 1:
            out = out[:, :, : h * self.scale, : w * self.scale]
        return out


def _rename_up(key: str) -> str:
    # ModuleList children are named by position: conv_upK (K from 1) is ups.(K-1).
    m = re.fullmatch(r"(?:conv_up|upconv)(\d+)\.(weight|bias)", key)
    if m is None:
        return key
    return f"ups.{int(m.group(1)) - 1}.{m.group(2)}"


def _from_old_layout(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``model.N...`` keys -> this module's names. The up-step convs sit at 3, 6, 9, ...; the HR and
    last convs at 3 * ups + 2 and 3 * ups + 4."""
    top = sorted({int(m.group(1)) for k in state if (m := re.fullmatch(r"model\.(\d+)\.weight", k))})
    if not top or top[0] != 0 or len(top) < 3 or (top[-1] - 4) % 3:
        raise UnsupportedModelError(
            f"an ESRGAN file's top-level layers are model.{top}, which is no RRDBNet layout known here"
        )
    ups = (top[-1] - 4) // 3
    trunk = [int(m.group(1)) for k in state if (m := re.fullmatch(r"model\.1\.sub\.(\d+)\.weight", k))]
    if len(trunk) != 1:
        raise UnsupportedModelError("an ESRGAN file without one trunk conv (model.1.sub.<nb>.weight)")
    nb = trunk[0]
    names = {"model.0": "conv_first", f"model.1.sub.{nb}": "conv_body"}
    names.update({f"model.{3 * (u + 1)}": f"ups.{u}" for u in range(ups)})
    names[f"model.{3 * ups + 2}"] = "conv_hr"
    names[f"model.{3 * ups + 4}"] = "conv_last"
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        m = re.fullmatch(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)", key)
        if m is not None:
            out[f"body.{m.group(1)}.rdb{m.group(2)}.conv{m.group(3)}.{m.group(4)}"] = value
            continue
        prefix, _, kind = key.rpartition(".")
        if prefix not in names:
            raise UnsupportedModelError(f"an ESRGAN file holds {key!r}, which RRDBNet has no place for")
        out[f"{names[prefix]}.{kind}"] = value
    return out


def canonical_rrdb_keys(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Any supported layout -> :class:`RRDBNet`'s own key names. Raises UnsupportedModelError for a
    state dict of another architecture (naming what it found)."""
    if any(".conv1x1." in k for k in state):
        raise UnsupportedModelError(
            "this is an ESRGAN+ file (its dense blocks have conv1x1 layers); voidprompt runs plain "
            "ESRGAN / Real-ESRGAN RRDBNet files only"
        )
    if "model.0.weight" in state and any(k.startswith("model.1.sub.0.RDB1.") for k in state):
        return _from_old_layout(state)
    if "conv_first.weight" in state and ("conv_body.weight" in state or "trunk_conv.weight" in state):
        out: dict[str, Tensor] = {}
        for key, value in state.items():
            key = re.sub(r"^RRDB_trunk\.(\d+)\.RDB(\d)\.", r"body.\1.rdb\2.", key)
            key = {"trunk_conv.weight": "conv_body.weight", "trunk_conv.bias": "conv_body.bias"}.get(key, key)
            key = {"HRconv.weight": "conv_hr.weight", "HRconv.bias": "conv_hr.bias"}.get(key, key)
            out[_rename_up(key)] = value
        return out
    sample = ", ".join(sorted(state)[:4])
    raise UnsupportedModelError(
        f"not an ESRGAN / Real-ESRGAN (RRDBNet) state dict (keys start {sample}); other upscaler "
        "architectures (SwinIR, DAT, SRVGGNet, ...) are not supported"
    )


def rrdb_shape(state: Mapping[str, Tensor]) -> RRDBShape:
    """Hyper-parameters of a state dict already in :class:`RRDBNet`'s names."""
    try:
        first = state["conv_first.weight"].shape
        last = state["conv_last.weight"].shape
        gc = state["body.0.rdb1.conv1.weight"].shape[0]
    except KeyError as exc:
        raise UnsupportedModelError(f"an RRDBNet state dict without {exc.args[0]!r}") from None
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"body\.(\d+)\.", k))}
    ups = {int(m.group(1)) for k in state if (m := re.fullmatch(r"ups\.(\d+)\.weight", k))}
    if blocks != set(range(len(blocks))) or ups != set(range(len(ups))):
        raise UnsupportedModelError("an RRDBNet state dict with gaps in its block or up-step numbers")
    in_nc, out_nc = int(first[1]), int(last[0])
    unshuffle = 1
    for factor in (2, 4):
        if in_nc == out_nc * factor * factor:
            unshuffle, in_nc = factor, out_nc
    if 2 ** len(ups) < unshuffle:
        raise UnsupportedModelError(
            f"an RRDBNet that unshuffles by {unshuffle} but upsamples only {2 ** len(ups)}x"
        )
    return RRDBShape(
        in_nc=in_nc,
        out_nc=out_nc,
        nf=int(first[0]),
        gc=int(gc),
        nb=len(blocks),
        ups=len(ups),
        unshuffle=unshuffle,
    )


def rrdb_from_state_dict(state: Mapping[str, Tensor]) -> RRDBNet:
    """Build and load an :class:`RRDBNet` (float32, CPU, eval mode) from a state dict in any
    supported layout."""
    canonical = canonical_rrdb_keys(state)
    shape = rrdb_shape(canonical)
    with torch.device("meta"):
        net = RRDBNet(shape)
    expected = set(net.state_dict())
    if set(canonical) != expected:
        missing = sorted(expected - set(canonical))[:3]
        extra = sorted(set(canonical) - expected)[:3]
        raise UnsupportedModelError(
            f"an RRDBNet state dict ({shape}) that does not fit the network: missing {missing}, "
            f"unexpected {extra}"
        )
    try:
        net.load_state_dict({k: v.float() for k, v in canonical.items()}, assign=True)
    except RuntimeError as exc:
        first_line = str(exc).strip().splitlines()[-1].strip()
        raise UnsupportedModelError(f"an RRDBNet state dict with mismatched shapes ({first_line})") from None
    return net.eval().requires_grad_(False)
