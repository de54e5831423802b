"""DeepDanbooru: A1111's layout on a full-size state dict (meta device), the loading path through
the restricted unpickler, a forward pass against a plain functional reading of A1111's graph, and
A1111's caption rules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from voidprompt.models.taggers import deepdanbooru as ddb
from voidprompt.models.taggers.result import TaggerError
from voidprompt.pipeline.interrogate import DeepDanbooruTagger, deepdanbooru_pixels
from voidprompt.testing.tiny_taggers import tiny_deepdanbooru, write_deepdanbooru

# Rows read off A1111's deepbooru_model.py: (index, in, out, kernel, stride).
A1111_ROWS = [
    (0, 3, 64, 7, 2),
    (1, 64, 256, 1, 1),
    (3, 64, 64, 3, 1),
    (11, 256, 512, 1, 2),
    (13, 128, 128, 3, 2),
    (35, 128, 512, 1, 1),
    (36, 512, 1024, 1, 2),
    (38, 256, 256, 3, 2),
    (97, 1024, 256, 1, 1),
    (98, 256, 256, 3, 2),
    (99, 256, 1024, 1, 1),
    (100, 1024, 1024, 1, 2),
    (157, 256, 1024, 1, 1),
    (158, 1024, 2048, 1, 2),
    (160, 512, 512, 3, 2),
    (168, 2048, 4096, 1, 2),
    (170, 1024, 1024, 3, 2),
    (177, 1024, 4096, 1, 1),
]
A1111_TAGS = 9176


def _reference_shapes(stem: int, tags: int) -> dict[str, tuple[int, ...]]:
    """A1111's graph written as its stages: (blocks, in, mid, out, stride, shortcut after the main
    path). Every block is 1x1 reduce, 3x3, 1x1 expand; an entry block has a 1x1 shortcut."""
    shapes: dict[str, tuple[int, ...]] = {"n_Conv_0.weight": (stem, 3, 7, 7), "n_Conv_0.bias": (stem,)}
    index = 1

    def conv(c_in: int, c_out: int, kernel: int) -> None:
        nonlocal index
        shapes[f"n_Conv_{index}.weight"] = (c_out, c_in, kernel, kernel)
        shapes[f"n_Conv_{index}.bias"] = (c_out,)
        index += 1

    s = stem
    for blocks, c_in, mid, out, shortcut_last in [
        (3, s, s, 4 * s, False),
        (8, 4 * s, 2 * s, 8 * s, False),
        (20, 8 * s, 4 * s, 16 * s, False),
        (20, 16 * s, 4 * s, 16 * s, True),
        (3, 16 * s, 8 * s, 32 * s, False),
        (3, 32 * s, 16 * s, 64 * s, False),
    ]:
        if not shortcut_last:
            conv(c_in, out, 1)
        conv(c_in, mid, 1)
        conv(mid, mid, 3)
        conv(mid, out, 1)
        if shortcut_last:
            conv(c_in, out, 1)
        for _ in range(blocks - 1):
            conv(out, mid, 1)
            conv(mid, mid, 3)
            conv(mid, out, 1)
    shapes[f"n_Conv_{index}.weight"] = (tags, 64 * s, 1, 1)
    return shapes


def test_the_full_size_layout_is_a1111s() -> None:
    shapes = _reference_shapes(64, A1111_TAGS)
    assert len(shapes) == 179 + 178  # every convolution has a bias except the last
    for index, c_in, c_out, kernel, _stride in A1111_ROWS:
        assert shapes[f"n_Conv_{index}.weight"] == (c_out, c_in, kernel, kernel)
    meta_state = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
    tags = [f"t{i}" for i in range(A1111_TAGS)]
    net = ddb.load_state(meta_state, tags)
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == shapes
    assert net.tags == tags
    for index, _c_in, _c_out, _kernel, stride in A1111_ROWS:
        assert getattr(net, f"n_Conv_{index}").stride == (stride, stride)
    assert sum(int(np.prod(v)) for v in shapes.values()) == sum(p.numel() for p in net.parameters())


def test_a_wrong_shape_names_the_key() -> None:
    shapes = _reference_shapes(64, 10)
    shapes["n_Conv_98.weight"] = (256, 256, 1, 1)
    meta_state = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
    with pytest.raises(TaggerError, match=r"n_Conv_98\.weight has shape \(256, 256, 1, 1\)"):
        ddb.load_state(meta_state, [f"t{i}" for i in range(10)])


def test_a_tag_count_that_differs_from_the_outputs_is_refused() -> None:
    meta_state = {k: torch.empty(v, device="meta") for k, v in _reference_shapes(64, 10).items()}
    with pytest.raises(TaggerError, match="10 outputs but 9 tags"):
        ddb.load_state(meta_state, [f"t{i}" for i in range(9)])


def _reference_forward(state: dict[str, torch.Tensor], pixels: torch.Tensor) -> torch.Tensor:
    """A1111's forward as a walk over its convolutions in index order."""

    def conv(i: int, x: torch.Tensor, stride: int = 1) -> torch.Tensor:
        return F.conv2d(x, state[f"n_Conv_{i}.weight"], state.get(f"n_Conv_{i}.bias"), stride=stride)

    x = pixels.permute(0, 3, 1, 2)
    x = F.relu(conv(0, F.pad(x, [2, 3, 2, 3]), 2))
    x = F.max_pool2d(F.pad(x, [0, 1, 0, 1], value=float("-inf")), 3, 2)
    i = 1
    for blocks, stride, shortcut_last in [(3, 1, False), (8, 2, False), (20, 2, False), (20, 2, True),
                                           (3, 2, False), (3, 2, False)]:  # fmt: skip
        for b in range(blocks):
            entry = b == 0
            if entry and not shortcut_last:
                shortcut, i = conv(i, x, stride), i + 1
            s = stride if entry else 1
            h = F.relu(conv(i, x))
            h = F.relu(conv(i + 1, F.pad(h, [0, 1, 0, 1] if s == 2 else [1, 1, 1, 1]), s))
            h = conv(i + 2, h)
            i += 3
            if entry and shortcut_last:
                shortcut, i = conv(i, x, stride), i + 1
            x = F.relu(h + (shortcut if entry else x))
    assert i == 178
    return torch.sigmoid(F.avg_pool2d(conv(178, x), kernel_size=x.shape[-2:]).flatten(1))


def test_forward_matches_a1111s_graph_on_a_narrow_network() -> None:
    net = tiny_deepdanbooru([f"t{i}" for i in range(6)], stem=4)
    pixels = torch.rand(2, 128, 128, 3, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = net(pixels)
        want = _reference_forward(net.state_dict(), pixels)
    assert got.shape == (2, 6)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_the_file_loads_through_the_restricted_unpickler(tmp_path: Path) -> None:
    tags = ["1girl", "solo", "rating:safe", "no_humans"]
    net = tiny_deepdanbooru(tags, stem=4, seed=2)
    path = write_deepdanbooru(tmp_path / "model-resnet_custom_v3.pt", net)
    loaded = ddb.load_deepdanbooru(path)
    assert loaded.tags == tags
    for key, value in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    pixels = torch.rand(1, 128, 128, 3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels), net(pixels))


def test_a_file_without_tags_is_refused(tmp_path: Path) -> None:
    net = tiny_deepdanbooru(["a"], stem=4)
    torch.save(net.state_dict(), tmp_path / "x.pt")
    with pytest.raises(TaggerError, match="no tag list under 'tags'"):
        ddb.load_deepdanbooru(tmp_path / "x.pt")


def test_a_missing_file_says_where_to_place_it(tmp_path: Path) -> None:
    with pytest.raises(TaggerError, match=r"model-resnet_custom_v3\.pt.*models/torch_deepdanbooru"):
        ddb.load_deepdanbooru(tmp_path / "nothing.pt")


PROBABILITIES = {
    "rating:safe": 0.99,
    "solo": 0.5,
    "1girl": 0.8,
    "open_mouth": 0.49,
    "hat_(object)": 0.9,
    "back\\slash": 0.6,
}


def _result() -> ddb.TagResult:
    return ddb.result_from_probabilities(list(PROBABILITIES), list(PROBABILITIES.values()))


def test_a1111_caption_defaults() -> None:
    result = _result()
    # 0.5 is kept (A1111 drops only what is below the threshold); the rating is reported apart.
    assert set(result.general) == {"solo", "1girl", "hat_(object)", "back\\slash"}
    assert result.rating == pytest.approx({"rating:safe": 0.99})
    # Alphabetical, underscores to spaces, backslash and round brackets escaped.
    assert ddb.caption(result) == r"1girl, back\\slash, hat \(object\), solo"


def test_a1111_caption_options() -> None:
    result = _result()
    options = ddb.DeepDanbooruOptions(sort_alpha=False, use_spaces=False, escape=False, filter_tags="solo, x")
    assert ddb.caption(result, options) == "hat_(object), 1girl, back\\slash"
    ranks = ddb.DeepDanbooruOptions(include_ranks=True, filter_tags="hat (object)")
    assert ddb.caption(result, ranks) == r"(1girl:0.800), (back\\slash:0.600), (solo:0.500)"


def test_deepdanbooru_sees_a_512_picture_scaled_to_one() -> None:
    pixels = deepdanbooru_pixels(Image.new("RGB", (300, 120), (255, 0, 51)))
    assert pixels.shape == (1, 512, 512, 3) and pixels.dtype == np.float32
    # Resize and fill: the bands above and below are the stretched edge rows, so a flat picture
    # stays flat everywhere.
    np.testing.assert_allclose(pixels[0, 0, 0], [1.0, 0.0, 0.2], atol=1e-6)
    np.testing.assert_allclose(pixels[0], np.broadcast_to([1.0, 0.0, 0.2], (512, 512, 3)), atol=1e-6)


def test_the_tagger_runs_the_network_on_those_pixels() -> None:
    tags = ["a", "b", "rating:safe"]
    net = tiny_deepdanbooru(tags, stem=4, seed=5)
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 70, 3), dtype=np.uint8))
    tagger = DeepDanbooruTagger(net, ddb.DeepDanbooruOptions(threshold=0.0))
    result = tagger.tag(picture)
    with torch.no_grad():
        want = _reference_forward(net.state_dict(), torch.from_numpy(deepdanbooru_pixels(picture)))[0]
    assert result.general == pytest.approx({"a": float(want[0]), "b": float(want[1])}, rel=1e-5)
    assert result.rating == pytest.approx({"rating:safe": float(want[2])}, rel=1e-5)
    assert tagger.caption(result) == "a, b"


@pytest.mark.slow
def test_the_full_size_network_runs_a1111s_512_input() -> None:
    # A1111's widths (160,956,544 parameters with 9176 tags) on its 512x512 input: the last stage
    # sees 4x4, and the graph matches the functional reading at full size too.
    net = tiny_deepdanbooru([f"t{i}" for i in range(A1111_TAGS)], stem=64, seed=3)
    assert sum(p.numel() for p in net.parameters()) == sum(
        int(np.prod(v)) for v in _reference_shapes(64, A1111_TAGS).values()
    )
    pixels = torch.rand(1, 512, 512, 3, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = net(pixels)
        want = _reference_forward(net.state_dict(), pixels)
    assert got.shape == (1, A1111_TAGS)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
