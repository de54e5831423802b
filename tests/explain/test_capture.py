"""The explain capture on tiny models: the probe reads what the UNet computes without changing it,
the pictures are bit-identical with the capture on, and the recorder's maps, windows, previews and
skipped branches agree with an independent account of the same run.

The independent account (:class:`Reference`) hooks the UNet itself: per UNet call, per
cross-attention layer, softmax(q_h k_h^T / sqrt(d)) by an explicit loop over heads, averaged over
heads; rows of a one-chunk prompt are [start, its tokens..., end/padding], so token t sits in row
t + 1. Grids are square here (side = sqrt(queries)); each layer is upsampled bilinearly to the
latent size, summed over layers, and averaged over a window's calls - the recorder's documented
definition, recomputed apart from it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from voidprompt.explain.attention import AttentionProbe, cross_attention_modules, head_mean_probabilities
from voidprompt.explain.record import ExplainOptions, Explanation
from voidprompt.models import load_model
from voidprompt.models.latent_rgb import latent_rgb_for
from voidprompt.pipeline.engine import Engine, GenerationHooks, Progress
from voidprompt.request import GenerationRequest
from voidprompt.testing.fake_checkpoints import write_tiny_sdxl_checkpoint

SIZE = 32  # the tiny VAE halves: a 16x16 latent
BASE = GenerationRequest(
    prompt="red ball, blue cube", negative_prompt="lowres, blurry", seed=11, steps=3,
    width=SIZE, height=SIZE, sampler_name="Euler", cfg_scale=7.0,
)  # fmt: skip


def explain(
    engine: Engine, request: GenerationRequest, options: ExplainOptions | None = None
) -> list[Explanation]:
    """The capture's explanations, after checking the pictures are those of the capture off."""
    plain = engine.generate(request)
    captured = engine.generate(request, explain=options or ExplainOptions())
    assert len(captured.images) == len(plain.images) == request.batch_size * request.n_iter
    for a, b in zip(plain.images, captured.images, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert len(captured.explanations) == len(captured.images)
    return captured.explanations


# -- the probe ------------------------------------------------------------------------------------


def per_head_loop(attn: Any, hidden: Tensor, context: Tensor) -> Tensor:
    q, k = attn.to_q(hidden), attn.to_k(context)
    d = q.shape[-1] // attn.heads
    heads = [
        (q[..., h * d : (h + 1) * d] @ k[..., h * d : (h + 1) * d].transpose(-1, -2) / math.sqrt(d)).softmax(
            -1
        )
        for h in range(attn.heads)
    ]
    return torch.stack(heads).mean(0)


def test_probe_probabilities_equal_diffusers_and_a_per_head_loop(tiny_engine: Engine) -> None:
    unet = tiny_engine.components.unet
    modules = cross_attention_modules(unet)
    assert modules and all(m.is_cross_attention for m in modules)
    attn = modules[0]
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 64, attn.to_q.in_features, generator=gen)
    context = torch.randn(2, 77, attn.to_k.in_features, generator=gen)
    with torch.no_grad():
        probs = head_mean_probabilities(attn, hidden, context)
        query = attn.head_to_batch_dim(attn.to_q(hidden))
        key = attn.head_to_batch_dim(attn.to_k(context))
        scores = attn.get_attention_scores(query, key).reshape(2, attn.heads, 64, 77).mean(1)
        loop = per_head_loop(attn, hidden, context)
    assert probs.shape == (2, 64, 77) and probs.dtype == torch.float32
    torch.testing.assert_close(probs, scores, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(probs, loop, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 64))


def test_the_unet_output_is_the_same_with_the_probe(tiny_engine: Engine) -> None:
    unet = tiny_engine.components.unet
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=gen)
    context = torch.randn(2, 77, unet.config.cross_attention_dim, generator=gen)
    t = torch.tensor([500.0, 20.0])
    seen: list[Tensor] = []
    with torch.no_grad():
        plain = unet(x, t, encoder_hidden_states=context).sample
        with AttentionProbe(seen.append) as probe:
            probe.attach(unet)
            probed = unet(x, t, encoder_hidden_states=context).sample
        after = unet(x, t, encoder_hidden_states=context).sample
    assert torch.equal(plain, probed) and torch.equal(plain, after)
    assert len(seen) == len(cross_attention_modules(unet))
    for probs in seen:
        assert probs.shape[0] == 2 and probs.shape[2] == 77
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:2]))
    # Leaving the probe removed its hooks: nothing more arrives.
    with torch.no_grad():
        unet(x, t, encoder_hidden_states=context)
    assert len(seen) == len(cross_attention_modules(unet))


# -- the pictures stay the same -------------------------------------------------------------------


@pytest.mark.parametrize(
    "sampler", ["Euler a", "DPM++ 2M SDE", "DPM++ 2M", "Heun", "DDIM", "PLMS", "UniPC", "LCM"]
)
def test_pictures_are_bit_identical_for_every_sampler_family(tiny_engine: Engine, sampler: str) -> None:
    (ex,) = explain(tiny_engine, BASE.replace(sampler_name=sampler))
    assert ex.latent_size == (16, 16)
    assert [t.key for t in ex.tags] == [
        "positive:red ball", "positive:blue cube", "negative:lowres", "negative:blurry",
    ]  # fmt: skip
    assert np.isfinite(ex.tag_maps).all()
    assert len(ex.calls) == len(ex.window_calls["all"]) > 0


def test_pictures_are_bit_identical_with_hires_fix(tiny_engine: Engine) -> None:
    request = BASE.replace(
        steps=3,
        enable_hr=True,
        hr_scale=1.5,
        denoising_strength=0.6,
        hr_upscaler="Latent",
        hr_second_pass_steps=2,
    )
    (ex,) = explain(tiny_engine, request)
    assert ex.windows == ("all", "early", "middle", "late", "hires")
    assert ex.latent_size == (24, 24)
    first = [c for c, call in enumerate(ex.calls) if call.pass_name == "first"]
    hires = [c for c, call in enumerate(ex.calls) if call.pass_name == "hires"]
    assert first == [0, 1, 2] and ex.window_calls["hires"] == tuple(hires) and hires
    assert [ex.calls[c].call for c in hires] == list(range(len(hires)))
    assert ex.tag_maps.shape[-2:] == (24, 24) and np.isfinite(ex.tag_maps).all()


def test_pictures_are_bit_identical_for_img2img(tiny_engine: Engine) -> None:
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    (ex,) = explain(tiny_engine, BASE.replace(init_images=(init,), denoising_strength=0.5, steps=4))
    assert ex.windows == ("all", "early", "middle", "late")


def test_pictures_are_bit_identical_for_batches_and_iterations(tiny_engine: Engine) -> None:
    a, b = explain(tiny_engine, BASE.replace(batch_size=2, sampler_name="Euler a"))
    # Two seeds, two different sets of maps.
    assert a.tags == b.tags and not np.array_equal(a.tag_maps, b.tag_maps)
    two_iterations = explain(tiny_engine, BASE.replace(n_iter=2, steps=2))
    assert len(two_iterations) == 2


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    return Engine(
        load_model(write_tiny_sdxl_checkpoint(tmp_path_factory.mktemp("sdxl") / "base.safetensors"))
    )


def test_sdxl_capture(tiny_sdxl: Engine) -> None:
    request = BASE.replace(width=48, height=32, steps=3, sampler_name="Euler a")
    (ex,) = explain(tiny_sdxl, request)
    assert [t.key for t in ex.tags] == [
        "positive:red ball", "positive:blue cube", "negative:lowres", "negative:blurry",
    ]  # fmt: skip
    assert ex.latent_size == (16, 24)  # the tiny SDXL VAE halves each side
    assert np.isfinite(ex.tag_maps).all() and (ex.tag_maps >= 0).all()


# -- the recorder against an independent account --------------------------------------------------


class Reference:
    """Every UNet call's per-layer head-mean cross-attention probabilities, by a per-head loop."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.calls: list[list[Tensor]] = []
        self.handles = [unet.register_forward_pre_hook(lambda *_: self.calls.append([]))]
        for module in unet.modules():
            if getattr(module, "is_cross_attention", False):
                self.handles.append(module.register_forward_pre_hook(self._layer, with_kwargs=True))

    def _layer(self, attn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        with torch.no_grad():
            self.calls[-1].append(per_head_loop(attn, hidden, kwargs["encoder_hidden_states"]).double())

    def __enter__(self) -> Reference:
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()

    def row_maps(self, call: int, side: int) -> Tensor:
        """(UNet rows, context rows, side, side): the layers' probabilities upsampled and summed."""
        total = None
        for probs in self.calls[call]:
            grid = math.isqrt(probs.shape[1])
            maps = probs.transpose(1, 2).reshape(probs.shape[0], probs.shape[2], grid, grid)
            if grid != side:
                maps = F.interpolate(maps, size=(side, side), mode="bilinear", align_corners=False)
            total = maps if total is None else total + maps
        assert total is not None
        return total


def run_with_reference(
    engine: Engine, request: GenerationRequest, options: ExplainOptions
) -> tuple[Explanation, Reference]:
    with Reference(engine.components.unet) as reference:
        result = engine.generate(request, explain=options)
    return result.explanations[0], reference


def expected_map(
    reference: Reference, calls: list[tuple[int, int]], rows: list[int], side: int
) -> np.ndarray:
    """Mean over (UNet call, UNet row) of the context rows' summed maps."""
    maps = [reference.row_maps(c, side)[r, rows].sum(0) for c, r in calls]
    return torch.stack(maps).mean(0).numpy()


def test_tag_maps_windows_and_shares_match_the_reference(tiny_engine: Engine) -> None:
    request = BASE.replace(steps=4)
    ex, ref = run_with_reference(tiny_engine, request, ExplainOptions(per_token=True))
    # Euler: one denoiser call per step, one UNet call per denoiser call, rows [cond, uncond].
    assert len(ref.calls) == len(ex.calls) == 4
    # Windows: the first pass's calls in thirds, in order, together all of them.
    assert ex.window_calls == {"all": (0, 1, 2, 3), "early": (0, 1), "middle": (2,), "late": (3,)}
    # "red ball, blue cube": red 1, ball 2, comma 3, blue 4, cube 5; "lowres, blurry": low 1, res 2, blurry 4.
    tags = {"positive:red ball": (0, [1, 2]), "positive:blue cube": (0, [4, 5])}
    tags |= {"negative:lowres": (1, [1, 2]), "negative:blurry": (1, [4])}
    for window in ex.windows:
        w = ex.window_index(window)
        for key, (row, context_rows) in tags.items():
            calls = [(c, row) for c in ex.window_calls[window]]
            got = ex.tag_maps[ex.tag_index(key), w]
            np.testing.assert_allclose(got, expected_map(ref, calls, context_rows, 16), rtol=1e-4, atol=1e-7)
    # Content share: the prompt's own tokens' part of all attention (start, end, padding left out).
    for branch, row, content in (("positive", 0, [1, 2, 3, 4, 5]), ("negative", 1, [1, 2, 3, 4])):
        shares = [
            float(ref.row_maps(c, 16)[row, content].sum() / ref.row_maps(c, 16)[row].sum()) for c in range(4)
        ]
        assert ex.content_share[branch]["all"] == pytest.approx(np.mean(shares), rel=1e-5)
        assert ex.content_share[branch]["late"] == pytest.approx(shares[3], rel=1e-5)
    # Per-token maps summed over a tag's tokens give the tag's map.
    assert ex.token_maps is not None
    for i, tag in enumerate(ex.tags):
        mine = [k for k, token in enumerate(ex.tokens) if token.tag == i]
        assert [ex.tokens[k].text for k in mine] == list(tag.tokens)
        np.testing.assert_allclose(ex.token_maps[mine].sum(0), ex.tag_maps[i], rtol=1e-5, atol=1e-8)
    commas = [t for t in ex.tokens if t.tag == -1]
    assert [t.text for t in commas] == [",", ","]


def test_each_image_of_a_batch_gets_its_own_rows(tiny_engine: Engine) -> None:
    request = BASE.replace(steps=3, batch_size=2)
    with Reference(tiny_engine.components.unet) as ref:
        result = tiny_engine.generate(request, explain=ExplainOptions())
    # UNet rows: both images' prompts, then both images' negative prompts.
    assert [len(ref.row_maps(c, 16)) for c in range(3)] == [4, 4, 4]
    for image, ex in enumerate(result.explanations):
        for key, row, rows in (("positive:blue cube", image, [4, 5]), ("negative:blurry", 2 + image, [4])):
            np.testing.assert_allclose(
                ex.tag_maps[ex.tag_index(key), 0],
                expected_map(ref, [(c, row) for c in range(3)], rows, 16),
                rtol=1e-4,
                atol=1e-7,
            )


def test_ngms_skipped_calls_add_nothing_to_the_negative_maps(tiny_engine: Engine) -> None:
    # s_min_uncond above every sigma: every odd call skips the uncond pass (A1111's NGMS).
    request = BASE.replace(steps=4, s_min_uncond=100.0)
    ex, ref = run_with_reference(tiny_engine, request, ExplainOptions())
    assert [call.uncond for call in ex.calls] == [True, False, True, False]
    assert [len(ref.row_maps(c, 16)) for c in range(4)] == [2, 1, 2, 1]
    assert [call.guidance_difference is None for call in ex.calls] == [False, True, False, True]
    lowres = ex.tag_index("negative:lowres")
    # The late window is call 3 alone, which skipped: no negative map there, a positive one.
    assert np.isnan(ex.tag_maps[lowres, ex.window_index("late")]).all()
    assert np.isfinite(ex.tag_maps[ex.tag_index("positive:red ball"), ex.window_index("late")]).all()
    assert math.isnan(ex.content_share["negative"]["late"])
    # "all" averages the negative over calls 0 and 2 only; the positive over all four.
    np.testing.assert_allclose(
        ex.tag_maps[lowres, 0], expected_map(ref, [(0, 1), (2, 1)], [1, 2], 16), rtol=1e-4, atol=1e-7
    )
    red = ex.tag_index("positive:red ball")
    np.testing.assert_allclose(
        ex.tag_maps[red, 0], expected_map(ref, [(c, 0) for c in range(4)], [1, 2], 16), rtol=1e-4, atol=1e-7
    )


def test_and_sub_prompts_keep_their_own_tags(tiny_engine: Engine) -> None:
    request = BASE.replace(prompt="red ball AND blue cube :0.5", steps=2)
    ex, ref = run_with_reference(tiny_engine, request, ExplainOptions())
    assert [t.key for t in ex.tags] == [
        "positive:red ball",
        "positive#1:blue cube",
        "negative:lowres",
        "negative:blurry",
    ]
    # UNet rows: the image's two sub-prompts, then its negative prompt.
    assert [len(ref.row_maps(c, 16)) for c in range(2)] == [3, 3]
    np.testing.assert_allclose(
        ex.tag_maps[ex.tag_index("positive#1:blue cube"), 0],
        expected_map(ref, [(0, 1), (1, 1)], [1, 2], 16),
        rtol=1e-4,
        atol=1e-7,
    )
    assert set(ex.content_share) == {"positive", "positive#1", "negative"}


def test_prompt_editing_follows_each_tag_across_schedule_entries(tiny_engine: Engine) -> None:
    # [red:green:0.5] over 4 steps: the edit lands at step int(0.5 * 4) = 2, and A1111 keeps an
    # entry up to and including its end step: "red ball" for calls 0-2, "green ball" for call 3.
    request = BASE.replace(prompt="[red:green:0.5] ball, blue cube", steps=4)
    (ex,) = explain(tiny_engine, request, ExplainOptions())
    ex, ref = run_with_reference(tiny_engine, request, ExplainOptions())
    keys = [t.key for t in ex.tags]
    assert "positive:red ball" in keys and "positive:green ball" in keys and "positive:blue cube" in keys
    w_early, w_late = ex.window_index("early"), ex.window_index("late")
    red, green = ex.tag_index("positive:red ball"), ex.tag_index("positive:green ball")
    assert np.isfinite(ex.tag_maps[red, w_early]).all() and np.isnan(ex.tag_maps[red, w_late]).all()
    np.testing.assert_allclose(
        ex.tag_maps[green, 0], expected_map(ref, [(3, 0)], [1, 2], 16), rtol=1e-4, atol=1e-7
    )
    assert np.isnan(ex.tag_maps[green, w_early]).all() and np.isfinite(ex.tag_maps[green, w_late]).all()
    np.testing.assert_allclose(
        ex.tag_maps[red, 0], expected_map(ref, [(0, 0), (1, 0), (2, 0)], [1, 2], 16), rtol=1e-4, atol=1e-7
    )
    # "blue cube" is in both entries: its map averages all four calls.
    np.testing.assert_allclose(
        ex.tag_maps[ex.tag_index("positive:blue cube"), 0],
        expected_map(ref, [(c, 0) for c in range(4)], [4, 5], 16),
        rtol=1e-4,
        atol=1e-7,
    )


def test_pad_conds_rows_past_the_negative_text_hold_no_token(tiny_engine: Engine) -> None:
    # A two-chunk prompt against a one-chunk negative: "Pad conds" appends an empty chunk to the
    # negative's context, whose 77 rows belong to no token.
    long_prompt = ", ".join(["red ball"] * 30)
    request = BASE.replace(prompt=long_prompt, steps=2, pad_cond_uncond=True)
    ex, ref = run_with_reference(tiny_engine, request, ExplainOptions())
    assert ref.calls[0][0].shape[-1] == 154
    negative = ref.row_maps(0, 16)[1]
    share = float(negative[[1, 2, 3, 4]].sum() / negative.sum())
    assert [t.key for t in ex.tags][-2:] == ["negative:lowres", "negative:blurry"]
    second = ref.row_maps(1, 16)[1]
    share1 = float(second[[1, 2, 3, 4]].sum() / second.sum())
    assert ex.content_share["negative"]["all"] == pytest.approx((share + share1) / 2, rel=1e-5)


# -- guidance decomposition and previews ----------------------------------------------------------


def test_cfg_scale_1_combined_preview_is_the_prompt_preview(tiny_engine: Engine) -> None:
    (ex,) = explain(tiny_engine, BASE.replace(cfg_scale=1.0), ExplainOptions(preview_every=1))
    assert [p.call for p in ex.previews] == [0, 1, 2]
    for preview in ex.previews:
        # uncond + 1 * (cond - uncond) is cond up to float rounding: at most one level apart.
        diff = np.abs(preview.combined.astype(int) - preview.prompt.astype(int))
        assert diff.max() <= 1 and (diff == 0).mean() > 0.99
        assert preview.negative is not None and preview.difference is not None
        assert preview.prompt.shape == (16, 16, 3) and preview.difference.shape == (16, 16)
    # With CFG 7 they differ.
    (ex7,) = explain(tiny_engine, BASE, ExplainOptions(preview_every=1))
    assert any(not np.array_equal(p.combined, p.prompt) for p in ex7.previews)


def test_preview_every_k_keeps_every_kth_call_and_the_last(tiny_engine: Engine) -> None:
    (ex,) = explain(tiny_engine, BASE.replace(steps=6), ExplainOptions(preview_every=4, vae_calls=(2,)))
    assert [p.call for p in ex.previews] == [0, 4, 5]
    assert list(ex.vae_previews) == [2] and ex.vae_previews[2].shape == (SIZE, SIZE, 3)
    (none,) = explain(tiny_engine, BASE, ExplainOptions(preview_every=0))
    assert none.previews == ()


def test_ddim_previews_are_the_samplers_own_pred_x0(tiny_engine: Engine) -> None:
    denoised: list[Tensor] = []

    def progress(p: Progress) -> None:
        assert p.denoised is not None
        denoised.append(p.denoised.clone())

    request = BASE.replace(sampler_name="DDIM", steps=4)
    result = tiny_engine.generate(
        request, GenerationHooks(progress=progress), explain=ExplainOptions(preview_every=1)
    )
    ex = result.explanations[0]
    assert len(denoised) == len(ex.previews) == len(ex.calls)
    to_rgb = latent_rgb_for(tiny_engine.components).to_rgb
    for preview, x0 in zip(ex.previews, denoised, strict=True):
        mine = to_rgb(x0)[0].numpy()
        diff = np.abs(mine.astype(int) - preview.combined.astype(int))
        # The same formula, (x - sqrt(1 - abar) eps) / sqrt(abar), computed from the same table.
        assert diff.max() <= 1 and (diff == 0).mean() > 0.99
        assert not np.array_equal(mine, preview.prompt)


def test_guidance_difference_is_the_mean_gap_between_branch_predictions(tiny_engine: Engine) -> None:
    (ex,) = explain(tiny_engine, BASE, ExplainOptions(preview_every=1))
    for call, preview in zip(ex.calls, ex.previews, strict=True):
        assert call.guidance_difference is not None and preview.difference is not None
        assert call.guidance_difference == pytest.approx(float(preview.difference.mean()), rel=1e-5)
        assert call.guidance_difference > 0
