"""The HTML sheet from a hand-made explanation: every label escaped, one heatmap per tag placed where
its map is high, the shares and guidance differences it prints, and the preview strips."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import numpy as np
from PIL import Image

from voidprompt.explain.record import CallInfo, Explanation, Preview, TagInfo
from voidprompt.explain.sheet import explanation_sheet, sheet_path, write_sheet

WINDOWS = ("all", "early", "middle", "late")
H, W = 8, 12


def _tag(branch: str, label: str, weight: float = 1.0, part: int = 0) -> TagInfo:
    return TagInfo(branch=branch, part=part, label=label, weight=weight, tokens=(label,))


def _explanation(*, negative_ran: bool = True) -> Explanation:
    tags = (
        _tag("positive", "<script>alert(1)</script>"),
        _tag("positive", 'a "red" & blue', weight=1.21),
        _tag("negative", "low'res"),
    )
    maps = np.zeros((3, len(WINDOWS), H, W), dtype=np.float32)
    # Tag 0: all in its top-left quarter, mass 4 * 24 cells = 96; tag 1: uniform, mass 96 cells / 3
    # = 32, so their shares are 75% and 25%.
    maps[0, :, : H // 2, : W // 2] = 4.0
    maps[1] = 1.0 / 3.0
    maps[2, :, H // 2 :, :] = 2.0
    if not negative_ran:
        maps[2] = np.nan
    calls = (
        CallInfo("first", 0, 14.6, True, 0.1),
        CallInfo("first", 1, 7.0, negative_ran, 0.3 if negative_ran else None),
        CallInfo("first", 2, 2.0, True, 0.5),
        CallInfo("first", 3, 0.5, True, 0.7),
    )
    rgb = np.zeros((H, W, 3), dtype=np.uint8)
    previews = tuple(
        Preview(
            call=c,
            prompt=rgb + 10 * c,
            negative=rgb + 20 * c if calls[c].uncond else None,
            combined=rgb + 30 * c,
            difference=np.full((H, W), float(c), dtype=np.float32) if calls[c].uncond else None,
        )
        for c in range(4)
    )
    return Explanation(
        latent_size=(H, W),
        windows=WINDOWS,
        window_calls={"all": (0, 1, 2, 3), "early": (0, 1), "middle": (2,), "late": (3,)},
        tags=tags,
        tag_maps=maps,
        content_share={"positive": dict.fromkeys(WINDOWS, 0.125), "negative": dict.fromkeys(WINDOWS, 0.5)},
        calls=calls,
        previews=previews,
        vae_previews={3: np.full((2 * H, 2 * W, 3), 200, dtype=np.uint8)},
    )


def _picture() -> Image.Image:
    return Image.new("RGB", (8 * W, 8 * H), (128, 128, 128))


def _images(page: str, css_class: str) -> list[Image.Image]:
    found = re.findall(rf'<img class="{css_class}"[^>]* src="data:image/png;base64,([^"]+)"', page)
    return [Image.open(io.BytesIO(base64.b64decode(data))) for data in found]


def test_every_label_is_escaped_and_each_tag_has_one_heatmap() -> None:
    explanation = _explanation()
    page = explanation_sheet(_picture(), explanation, title="<b>t</b>", infotext='x <y> & "z"')
    assert "<script>" not in page and "<b>t</b>" not in page
    for escaped in (
        "&lt;script&gt;alert(1)&lt;/script&gt;",
        "a &quot;red&quot; &amp; blue",
        "low&#x27;res",
        "&lt;b&gt;t&lt;/b&gt;",
        "x &lt;y&gt; &amp; &quot;z&quot;",
    ):
        assert escaped in page
    assert len(_images(page, "tag")) == len(explanation.tags) == 3
    # Three small step windows under each tag.
    assert len(_images(page, "tag-window")) == 3 * 3
    assert "weight 1.21" in page


def test_the_shares_and_guidance_differences_are_the_measured_ones() -> None:
    page = explanation_sheet(_picture(), _explanation())
    # Tag 0 has three times tag 1's mass; the negative prompt's one tag has it all.
    assert "share 75.0%" in page and "share 25.0%" in page and "share 100.0%" in page
    # Mean |cond - uncond| per window: all (0.1+0.3+0.5+0.7)/4, early (0.1+0.3)/2, middle, late.
    rows = dict(
        re.findall(r"<tr><td>(\w+)</td><td class=\"num\">\d+</td><td class=\"num\">([^<]+)</td>", page)
    )
    assert rows == {"all": "0.4", "early": "0.2", "middle": "0.5", "late": "0.7"}
    # The prompt tokens' share per branch, the positive prompt's column first.
    assert page.index("positive prompt tokens") < page.index("negative prompt tokens")
    assert re.search(r'<tr><td>late</td>.*<td class="num">12\.5%</td><td class="num">50\.0%</td></tr>', page)


def test_a_heatmap_is_bright_where_its_map_is_high() -> None:
    picture = _picture()
    page = explanation_sheet(picture, _explanation())
    first, _, negative = _images(page, "tag")
    assert first.size == picture.size  # never upscaled past the picture; 96x64 fits the tag size
    top_left = np.asarray(first)[: first.height // 2 - 4, : first.width // 2 - 4].mean()
    bottom_right = np.asarray(first)[first.height // 2 + 4 :, first.width // 2 + 4 :].mean()
    assert top_left > bottom_right + 40
    bottom = np.asarray(negative)[negative.height // 2 + 4 :].mean()
    top = np.asarray(negative)[: negative.height // 2 - 4].mean()
    assert bottom > top + 40


def test_a_branch_that_never_ran_shows_a_placeholder() -> None:
    page = explanation_sheet(_picture(), _explanation(negative_ran=False))
    assert len(_images(page, "tag")) == 2
    assert page.count('class="missing tag-missing"') == 1
    assert page.count('class="missing tag-window-missing"') == 3
    # The step without an uncond pass has no negative preview and no difference map.
    assert page.count('class="missing preview-missing"') == 2


def test_the_preview_strips() -> None:
    explanation = _explanation()
    page = explanation_sheet(_picture(), explanation)
    # Four stored steps: all four in the decomposition (4 images each) and in the trajectory.
    previews = _images(page, "preview")
    assert len(previews) == 4 * 4
    trajectory = _images(page, "trajectory")
    assert len(trajectory) == 4
    # Nearest-neighbour upscaling keeps each stored colour; the last step's combined preview is 90.
    assert set(np.asarray(trajectory[-1]).ravel().tolist()) == {90}
    assert trajectory[-1].width % W == 0 and trajectory[-1].width // W == trajectory[-1].height // H
    (vae,) = _images(page, "vae")
    assert np.asarray(vae).min() == 200
    assert "call 4, sigma 0.5" in page


def test_sheet_path_and_write(tmp_path: Path) -> None:
    assert sheet_path(tmp_path / "00001-6.png") == tmp_path / "00001-6.explain.html"
    assert sheet_path(tmp_path / "00001-6.explain.npz") == tmp_path / "00001-6.explain.html"
    written = write_sheet(tmp_path / "a.explain.html", _picture(), _explanation(), title="a.png")
    text = written.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    assert "http://" not in text and "https://" not in text  # self-contained
