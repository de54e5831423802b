"""The explanation file: round trip, the 8-bit bound, NaN maps, refused files, the size budget."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from voidprompt.errors import VoidpromptError
from voidprompt.explain.record import CallInfo, Explanation, Preview, TagInfo, TokenInfo
from voidprompt.explain.store import (
    ExplanationFileError,
    explanation_path,
    load_explanation,
    save_explanation,
)

WINDOWS = ("all", "early", "middle", "late")


def block_mean(maps: np.ndarray, factor: int) -> np.ndarray:
    """Area average over factor x factor blocks: the map as stored below the latent size."""
    *lead, h, w = maps.shape
    return maps.reshape(*lead, h // factor, factor, w // factor, factor).mean(axis=(-3, -1))


def made(latent: tuple[int, int] = (32, 16), n_tags: int = 3, n_calls: int = 6, seed: int = 0) -> Explanation:
    rng = np.random.default_rng(seed)
    h, w = latent
    tags = tuple(
        TagInfo("negative" if i % 3 == 2 else "positive", i % 2, f"tag {i}", 1.0 + 0.1 * i, ("tag", f"{i}"))
        for i in range(n_tags)
    )
    tag_maps = rng.random((n_tags, len(WINDOWS), h, w)).astype(np.float32) * 0.05
    calls = tuple(
        CallInfo("first", c, 14.6 / (c + 1), c != 1, None if c == 1 else float(rng.random()))
        for c in range(n_calls)
    )
    previews = tuple(
        Preview(
            call=c,
            prompt=rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
            negative=None if c == 1 else rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
            combined=rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
            difference=None if c == 1 else rng.random((h, w)).astype(np.float32) * 2.0,
        )
        for c in (0, 1, n_calls - 1)
    )
    tokens = tuple(
        TokenInfo(t.branch, t.part, 0, k, t.tokens[k], t.weight, i)
        for i, t in enumerate(tags)
        for k in (0, 1)
    )
    token_maps = rng.random((len(tokens), len(WINDOWS), h, w)).astype(np.float32)
    return Explanation(
        latent_size=latent,
        windows=WINDOWS,
        window_calls={"all": tuple(range(n_calls)), "early": (0, 1), "middle": (2, 3), "late": (4, 5)},
        tags=tags,
        tag_maps=tag_maps,
        content_share={
            "positive": {w: 0.1 for w in WINDOWS},
            "negative#1": {w: float("nan") for w in WINDOWS},
        },
        calls=calls,
        previews=previews,
        tokens=tokens,
        token_maps=token_maps,
        vae_previews={3: rng.integers(0, 256, (2 * h, 2 * w, 3), dtype=np.uint8)},
    )


def within_quantization(stored: np.ndarray, exact: np.ndarray) -> None:
    """Each map is stored as round(255 * value / its maximum): off by at most half a step of max/255."""
    scale = np.nanmax(np.abs(exact.reshape(*exact.shape[:-2], -1)), axis=-1)[..., None, None]
    bound = scale / 255.0 / 2.0 + 1e-6 * scale
    assert (np.abs(stored - exact) <= bound).all()
    assert (np.abs(stored - exact) > 0).any()  # the bound is not vacuous: 8 bits do lose something


def test_path_is_beside_the_picture() -> None:
    assert explanation_path("out/00001-123.png") == Path("out/00001-123.explain.npz")


def test_round_trip_at_the_latent_size(tmp_path: Path) -> None:
    ex = made()
    ex.tag_maps[1, 2] = np.nan  # a branch that never ran in that window
    path = save_explanation(tmp_path / "a.explain.npz", ex, map_side=32)
    got = load_explanation(path)
    assert got.latent_size == ex.latent_size
    assert got.windows == ex.windows and got.window_calls == ex.window_calls
    assert got.tags == ex.tags and got.tokens == ex.tokens and got.calls == ex.calls
    assert got.content_share["positive"] == ex.content_share["positive"]
    assert all(np.isnan(v) for v in got.content_share["negative#1"].values())
    assert got.tag_maps.shape == ex.tag_maps.shape
    assert np.isnan(got.tag_maps[1, 2]).all()
    finite = np.ones(ex.tag_maps.shape[:2], dtype=bool)
    finite[1, 2] = False
    within_quantization(got.tag_maps[finite], ex.tag_maps[finite])
    assert got.token_maps is not None and ex.token_maps is not None
    within_quantization(got.token_maps, ex.token_maps)
    assert [p.call for p in got.previews] == [p.call for p in ex.previews]
    for a, b in zip(got.previews, ex.previews, strict=True):
        assert np.array_equal(a.prompt, b.prompt) and np.array_equal(a.combined, b.combined)
        assert (a.negative is None) == (b.negative is None)
        assert (a.difference is None) == (b.difference is None)
        if b.negative is not None:
            assert a.negative is not None and np.array_equal(a.negative, b.negative)
    differences = [p.difference for p in ex.previews if p.difference is not None]
    stored = [p.difference for p in got.previews if p.difference is not None]
    within_quantization(np.stack(stored), np.stack(differences))  # type: ignore[arg-type]
    assert list(got.vae_previews) == [3] and np.array_equal(got.vae_previews[3], ex.vae_previews[3])


def test_maps_are_area_averaged_to_map_side(tmp_path: Path) -> None:
    ex = made(latent=(32, 16))
    got = load_explanation(save_explanation(tmp_path / "a.explain.npz", ex, map_side=8))
    assert got.latent_size == (32, 16)
    assert got.tag_maps.shape == (3, 4, 8, 4)
    within_quantization(got.tag_maps, block_mean(ex.tag_maps, 4))
    with pytest.raises(ValueError, match="map_side"):
        save_explanation(tmp_path / "b.explain.npz", ex, map_side=0)


def test_without_previews_tokens_or_vae(tmp_path: Path) -> None:
    ex = made()
    ex.previews, ex.tokens, ex.token_maps, ex.vae_previews = (), (), None, {}
    got = load_explanation(save_explanation(tmp_path / "a.explain.npz", ex))
    assert got.previews == () and got.tokens == () and got.token_maps is None and got.vae_previews == {}


def refused(path: Path) -> ExplanationFileError:
    with pytest.raises(ExplanationFileError) as info:
        load_explanation(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert isinstance(info.value, VoidpromptError)
    return info.value


def test_truncated_and_foreign_files_are_refused(tmp_path: Path) -> None:
    good = save_explanation(tmp_path / "good.explain.npz", made())
    data = good.read_bytes()
    truncated = tmp_path / "truncated.explain.npz"
    truncated.write_bytes(data[: len(data) // 2])
    refused(truncated)
    text = tmp_path / "text.explain.npz"
    text.write_text("not a zip file\n")
    refused(text)
    assert "cannot read" in str(refused(tmp_path / "missing.explain.npz"))
    # A zip of the right entries with a meta that is not this format.
    other = tmp_path / "other.explain.npz"
    np.savez(other, meta=np.frombuffer(b'{"version": 99}', dtype=np.uint8))
    assert "version" in str(refused(other))


class _Trap:
    """Unpickling this opens (creates) a marker file: proof that code from the file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return open, (str(self.marker), "w")


def test_a_pickle_in_the_file_is_refused_and_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    good = save_explanation(tmp_path / "good.explain.npz", made())
    with np.load(good) as data:
        arrays = {name: data[name] for name in data.files}
    trap = np.empty(1, dtype=object)
    trap[0] = _Trap(marker)
    for entry in ("tag_maps", "meta"):
        bad = tmp_path / f"{entry}.explain.npz"
        np.savez(bad, **{**arrays, entry: trap})
        with zipfile.ZipFile(bad) as z:
            assert f"{entry}.npy" in z.namelist()
        refused(bad)
        assert not marker.exists()


def test_a_512px_explanation_is_within_the_stated_size(tmp_path: Path) -> None:
    # store.py's figures: a 512x512 SD1 picture (64x64 latent), 40 tags, 20 calls, the defaults (maps at
    # 24 cells, a preview every 5th call and the last). Random maps and previews do not compress: the
    # worst case is 40 tags x 4 windows x 24 x 24 bytes of maps plus 5 x (3 x 64 x 64 x 3 + 64 x 64)
    # bytes of previews, about 297 kB.
    side, n_tags, n_calls = 64, 40, 20
    ex = made(latent=(side, side), n_tags=n_tags, n_calls=n_calls, seed=2)
    rng = np.random.default_rng(3)
    ex.tokens, ex.token_maps, ex.vae_previews = (), None, {}
    ex.window_calls = {
        "all": tuple(range(20)), "early": tuple(range(7)), "middle": tuple(range(7, 14)),
        "late": tuple(range(14, 20)),
    }  # fmt: skip
    ex.previews = tuple(
        Preview(
            c,
            rng.integers(0, 256, (side, side, 3), dtype=np.uint8),
            rng.integers(0, 256, (side, side, 3), dtype=np.uint8),
            rng.integers(0, 256, (side, side, 3), dtype=np.uint8),
            rng.random((side, side)).astype(np.float32),
        )
        for c in (0, 5, 10, 15, 19)
    )
    path = save_explanation(tmp_path / "a.explain.npz", ex)
    size = path.stat().st_size
    assert size <= 40 * 4 * 24 * 24 + 5 * (3 * 64 * 64 * 3 + 64 * 64) + 8_000, size
    assert load_explanation(path).tag_maps.shape == (n_tags, 4, 24, 24)


@pytest.mark.slow
def test_the_miniature_models_512px_file_is_within_the_stated_size(tmp_path: Path) -> None:
    # The real thing behind store.py's figure: a captured 512x512 picture, 38 tags, 20 Euler a calls.
    from voidprompt.demo.miniature import miniature_model_path
    from voidprompt.explain.record import ExplainOptions
    from voidprompt.models.load import load_model
    from voidprompt.pipeline.engine import Engine
    from voidprompt.request import GenerationRequest

    positive = (
        "red circle, blue background, masterpiece, best quality, simple, centered, flat colour, clean "
        "lines, sharp, bright, vivid, high contrast, geometric, minimal, smooth, solid, round, large, "
        "single object, plain"
    )
    negative = (
        "lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, "
        "cropped, worst quality, low quality, normal quality, jpeg artifacts, signature, watermark, "
        "username, blurry, artist name"
    )
    request = GenerationRequest(
        prompt=positive, negative_prompt=negative, seed=3, steps=20, width=512, height=512,
        cfg_scale=7.0, sampler_name="Euler a",
    )  # fmt: skip
    (ex,) = (
        Engine(load_model(miniature_model_path())).generate(request, explain=ExplainOptions()).explanations
    )
    assert ex.latent_size == (64, 64) and len(ex.tags) == 38 and len(ex.calls) == 20
    size = save_explanation(tmp_path / "a.explain.npz", ex).stat().st_size
    # store.py states 256 kB for this picture (2 kB per tag, 36 kB per preview step).
    assert size <= 270_000, size


def test_the_same_explanation_gives_the_same_bytes(tmp_path: Path) -> None:
    ex = made()
    first = save_explanation(tmp_path / "a.explain.npz", ex).read_bytes()
    second = save_explanation(tmp_path / "b.explain.npz", ex).read_bytes()
    assert first == second
    with zipfile.ZipFile(tmp_path / "b.explain.npz") as archive:
        assert {info.date_time for info in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}
