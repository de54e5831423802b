"""A1111's DeepDanbooru tagger: the TorchDeepDanbooru port of ``model-resnet_custom_v3``.

The network is a bottleneck ResNet with TensorFlow's padding (stride-2 convolutions pad one row and
column on the bottom and right only; the stem pads 2 before and 3 after) and six stages of
1x1 -> 3x3 -> 1x1 blocks whose widths reach 4096 channels, then a bias-free 1x1 convolution to one
logit per tag, a global mean and a sigmoid. Its parameters are named ``n_Conv_<i>`` (i = 0..178)
as in A1111's file, and the file is a state dict that also holds the tag list under ``tags``.

Input: a batch of RGB pictures as NHWC float in [0, 1] (A1111 resizes to 512x512 "resize and fill"
first; :mod:`voidprompt.pipeline.interrogate` does that).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from voidprompt.models.safe_pickle import LazyTensor, load_pickle_checkpoint
from voidprompt.models.taggers.result import TaggerError, TagResult, format_tag

__all__ = [
    "DEFAULT_FILE",
    "INPUT_SIZE",
    "DeepDanbooruNet",
    "DeepDanbooruOptions",
    "build_from_shapes",
    "caption",
    "load_deepdanbooru",
    "load_state",
    "result_from_probabilities",
]

# A1111's folder and file name (``models/torch_deepdanbooru``; it downloads the file there).
DEFAULT_FILE = Path("models/torch_deepdanbooru/model-resnet_custom_v3.pt")
INPUT_SIZE = 512
RATING_PREFIX = "rating:"
HEAD = 178  # the last convolution's index: one output channel per tag


@dataclass(frozen=True)
class _Block:
    reduce: int  # 1x1 in -> mid
    spatial: int  # 3x3 mid -> mid, carries the stride
    expand: int  # 1x1 mid -> out
    shortcut: int | None  # 1x1 in -> out with the stride; None: the input is added as it is
    stride: int


# (first index, in, mid, out as multiples of the stem width, stride, blocks, shortcut numbered last).
# The fourth stage repeats the third's width with a second stride-2 entry block, whose shortcut the
# original graph numbers after its main path.
_STAGES = (
    (1, 1, 1, 4, 1, 3, False),
    (11, 4, 2, 8, 2, 8, False),
    (36, 8, 4, 16, 2, 20, False),
    (97, 16, 4, 16, 2, 20, True),
    (158, 16, 8, 32, 2, 3, False),
    (168, 32, 16, 64, 2, 3, False),
)


def _layout(stem: int) -> tuple[list[tuple[int, int, int, int, int]], list[_Block]]:
    """Every convolution as (index, in, out, kernel, stride), and the blocks that use them."""
    convs = [(0, 3, stem, 7, 2)]
    blocks = []
    for first, c_in, c_mid, c_out, stride, count, shortcut_last in _STAGES:
        c_in, c_mid, c_out = c_in * stem, c_mid * stem, c_out * stem
        i = first
        for b in range(count):
            entry = b == 0
            if entry and not shortcut_last:
                shortcut: int | None = i
                reduce = i + 1
            else:
                shortcut = i + 3 if entry else None
                reduce = i
            s = stride if entry else 1
            width_in = c_in if entry else c_out
            convs += [
                (reduce, width_in, c_mid, 1, 1),
                (reduce + 1, c_mid, c_mid, 3, s),
                (reduce + 2, c_mid, c_out, 1, 1),
            ]
            if shortcut is not None:
                convs.append((shortcut, width_in, c_out, 1, s))
            blocks.append(_Block(reduce, reduce + 1, reduce + 2, shortcut, s))
            i += 4 if entry else 3
    return sorted(convs), blocks


class DeepDanbooruNet(nn.Module):
    """The network, at any stem width (A1111's file: 64) and tag count (its file: 9176).

    A narrower stem scales every stage alike, which is what the tests build; the real file is read
    at its own width from the shape of ``n_Conv_0``.
    """

    def __init__(self, num_tags: int, stem: int = 64) -> None:
        super().__init__()
        self.tags: list[str] = []
        convs, self._blocks = _layout(stem)
        for index, c_in, c_out, kernel, stride in convs:
            self.add_module(f"n_Conv_{index}", nn.Conv2d(c_in, c_out, kernel, stride=stride))
        self.add_module(f"n_Conv_{HEAD}", nn.Conv2d(64 * stem, num_tags, 1, bias=False))

    def _conv(self, index: int) -> nn.Conv2d:
        conv = getattr(self, f"n_Conv_{index}")
        assert isinstance(conv, nn.Conv2d)
        return conv

    def forward(self, pixels: Tensor) -> Tensor:
        """NHWC RGB in [0, 1] -> (batch, tags) probabilities."""
        stem = self._conv(0)
        x = pixels.permute(0, 3, 1, 2).to(stem.weight.dtype)
        x = F.relu(stem(F.pad(x, [2, 3, 2, 3])))
        # TensorFlow's SAME max pool: the padded row and column never win.
        x = F.max_pool2d(F.pad(x, [0, 1, 0, 1], value=float("-inf")), kernel_size=3, stride=2)
        for block in self._blocks:
            shortcut = x if block.shortcut is None else self._conv(block.shortcut)(x)
            h = F.relu(self._conv(block.reduce)(x))
            h = F.pad(h, [0, 1, 0, 1] if block.stride == 2 else [1, 1, 1, 1])
            h = F.relu(self._conv(block.spatial)(h))
            x = F.relu(self._conv(block.expand)(h) + shortcut)
        logits = self._conv(HEAD)(x).mean(dim=(2, 3))
        return torch.sigmoid(logits)


@dataclass(frozen=True)
class DeepDanbooruOptions:
    """A1111 1.10's interrogation options and their defaults (``shared_options.py``)."""

    threshold: float = 0.5  # interrogate_deepbooru_score_threshold
    sort_alpha: bool = True  # deepbooru_sort_alpha; else by falling probability
    use_spaces: bool = True  # deepbooru_use_spaces
    escape: bool = True  # deepbooru_escape
    filter_tags: str = ""  # deepbooru_filter_tags: comma-separated tags left out
    include_ranks: bool = False  # interrogate_return_ranks: "(tag:0.987)"


def result_from_probabilities(
    tags: Sequence[str], probabilities: Iterable[float], threshold: float = 0.5
) -> TagResult:
    """Tags at or above ``threshold`` (A1111 drops only those below it); ratings reported apart."""
    general = {}
    rating = {}
    for tag, p in zip(tags, probabilities, strict=True):
        if tag.startswith(RATING_PREFIX):
            rating[tag] = float(p)
        elif p >= threshold:
            general[tag] = float(p)
    return TagResult(general=general, rating=rating)


def caption(result: TagResult, options: DeepDanbooruOptions | None = None) -> str:
    """A1111's ``tag_multi`` text: rating tags never appear, filtered tags are left out, and each
    tag is written with its options."""
    options = options or DeepDanbooruOptions()
    probabilities = result.general
    if options.sort_alpha:
        ordered = sorted(probabilities)
    else:
        # A1111 quirk: a stable sort on the probability alone, so ties keep the model's tag order.
        ordered = sorted(probabilities, key=lambda t: -probabilities[t])
    left_out = {t.strip().replace(" ", "_") for t in options.filter_tags.split(",")}
    out = []
    for tag in ordered:
        if tag in left_out:
            continue
        # A1111's own rule for spaces: every underscore, emoticons included.
        text = tag.replace("_", " ") if options.use_spaces else tag
        text = format_tag(text, use_spaces=False, escape=options.escape)
        if options.include_ranks:
            text = f"({text}:{probabilities[tag]:.3f})"
        out.append(text)
    return ", ".join(out)


def _tags_of(obj: Mapping[str, Any], path: Path) -> list[str]:
    tags = obj.get("tags")
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise TaggerError(
            f"{path}: no tag list under 'tags'; a DeepDanbooru file is A1111's "
            "model-resnet_custom_v3.pt (a state dict with its tags)"
        )
    return tags


def build_from_shapes(shapes: Mapping[str, torch.Size], tags: Sequence[str], source: str) -> DeepDanbooruNet:
    """The network on the meta device, checked key by key against the file's shapes."""
    stem_weight = shapes.get("n_Conv_0.weight")
    head = shapes.get(f"n_Conv_{HEAD}.weight")
    if stem_weight is None or head is None:
        raise TaggerError(
            f"{source}: not a DeepDanbooru state dict (no n_Conv_0 / n_Conv_{HEAD} weights); "
            "expected A1111's model-resnet_custom_v3.pt"
        )
    if head[0] != len(tags):
        raise TaggerError(f"{source}: {head[0]} outputs but {len(tags)} tags; the file is damaged")
    with torch.device("meta"):
        net = DeepDanbooruNet(num_tags=len(tags), stem=int(stem_weight[0]))
    expected = {k: v.shape for k, v in net.state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    if missing or unexpected:
        raise TaggerError(
            f"{source}: not the DeepDanbooru layout A1111 uses: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    for key, shape in expected.items():
        if tuple(shapes[key]) != tuple(shape):
            raise TaggerError(f"{source}: {key} has shape {tuple(shapes[key])}, expected {tuple(shape)}")
    net.tags = list(tags)
    return net


def load_state(
    state: Mapping[str, Tensor], tags: Sequence[str], source: str = "state dict"
) -> DeepDanbooruNet:
    """A network holding ``state``'s tensors (assigned, not copied)."""
    net = build_from_shapes({k: v.shape for k, v in state.items()}, tags, source)
    net.load_state_dict(dict(state), assign=True)
    return net.eval()


def load_deepdanbooru(
    path: str | Path = DEFAULT_FILE, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> DeepDanbooruNet:
    """A1111's DeepDanbooru file, read through the restricted unpickler (nothing in it runs)."""
    p = Path(path)
    if not p.is_file():
        raise TaggerError(
            f"{p}: no DeepDanbooru model there; place A1111's model-resnet_custom_v3.pt "
            f"(from AUTOMATIC1111/TorchDeepDanbooru's releases) at {DEFAULT_FILE}"
        )
    with load_pickle_checkpoint(p) as checkpoint:
        obj = checkpoint.obj
        if not isinstance(obj, dict):
            raise TaggerError(f"{p}: holds a {type(obj).__name__}, not a state dict with tags")
        tags = _tags_of(obj, p)
        lazies = {k: v for k, v in obj.items() if isinstance(v, LazyTensor)}
        net = build_from_shapes({k: v.shape for k, v in lazies.items()}, tags, str(p))
        state = {k: checkpoint.materialize(v).to(device=device, dtype=dtype) for k, v in lazies.items()}
    net.load_state_dict(state, assign=True)
    return net.eval()
