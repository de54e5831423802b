"""The captured maps mean something: on the shipped miniature model, the one model here whose
pictures an independent reader (the world's detector) can check, a ``<colour> <shape>`` prompt's
attention lands on the shape it drew, and the guidance difference is larger on that shape than
around it; with two shapes prompted, each tag's attention lands on its own shape, not the other.

One set of pictures serves the first checks: the model card's eight chromatic ``<colour> <shape>``
prompts x 32 seeds at its standard request (128 px, Euler a, 20 steps, Clip skip 2, CFG 7, no
negative prompt), captured in batches of 16. A picture counts when the detector finds the prompted
colour and kind in it (the shape's pixels are its mask; several such shapes are one mask). Each
claim is a paired difference per picture with a 95% Student-t interval
(:func:`voidprompt.lab.report.data.mean_ci`); the control of a picture is the next counted picture of
the same prompt (another seed). The two-shape check has pictures of its own.
``pytest -m slow tests/explain/test_meaning_slow.py -s`` prints the numbers docs/explain.md quotes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from explain_meaning import inside_minus_outside, iou, partners, prompted_mask, to_picture, top_cells

from voidprompt.demo.detector import DetectorConfig
from voidprompt.demo.generate import demo_request, load_engine, native_size
from voidprompt.demo.measure import ADHERENCE_PROMPTS
from voidprompt.explain.record import ExplainOptions
from voidprompt.lab.report.data import mean_ci
from voidprompt.pipeline.engine import Engine

pytestmark = pytest.mark.slow

SEEDS = tuple(range(610000, 610032))
BATCH = 16
MIN_PICTURES = 200
WINDOWS = ("all", "early", "middle", "late")
# Two prompted shapes of different colours and kinds, with the count tag the captions use.
TWO_SHAPE_PROMPTS = (
    ("red circle", "blue triangle"),
    ("green star", "yellow circle"),
    ("purple triangle", "orange star"),
    ("blue circle", "red star"),
)
TWO_SHAPE_SEEDS = tuple(range(620000, 620016))
MIN_TWO_SHAPE_PICTURES = 30


@dataclass(frozen=True)
class Sample:
    prompt: str
    seed: int
    mask: np.ndarray  # the prompted shape's pixels
    heat: dict[str, np.ndarray]  # the shape tag's map per window, at picture size
    difference: np.ndarray  # mean over the calls of |cond - uncond| x0, at picture size
    content_share: float  # the prompt's own tokens' share of the positive branch's attention


@pytest.fixture(scope="module")
def engine() -> Engine:
    torch.set_num_threads(1)  # module fixtures run before the per-test thread pin
    return load_engine()


@pytest.fixture(scope="module")
def samples(engine: Engine) -> list[Sample]:
    side = native_size(engine.components)
    config = DetectorConfig(native_size=side)
    out = []
    for prompt in ADHERENCE_PROMPTS:
        colour, kind = prompt.split()
        for start in range(0, len(SEEDS), BATCH):
            seeds = SEEDS[start : start + BATCH]
            request = demo_request(prompt, "", size=side, seed=seeds[0], batch_size=len(seeds))
            result = engine.generate(request, seeds=seeds, explain=ExplainOptions(preview_every=1))
            for seed, image, explanation in zip(seeds, result.images, result.explanations, strict=True):
                mask = prompted_mask(image, config, colour, kind)
                if mask is None:
                    continue
                tag = explanation.tag_index(f"positive:{prompt}")
                heat = {
                    w: to_picture(explanation.tag_maps[tag, explanation.window_index(w)], mask.shape)
                    for w in WINDOWS
                }
                differences = [p.difference for p in explanation.previews if p.difference is not None]
                # Every call ran the uncond branch (CFG 7, no NGMS): one difference map per call.
                assert len(differences) == len(explanation.calls) == request.steps
                difference = to_picture(np.mean(differences, axis=0), mask.shape)
                share = explanation.content_share["positive"]["all"]
                out.append(Sample(prompt, seed, mask, heat, difference, share))
    counts = ", ".join(f"{p} {sum(s.prompt == p for s in out)}" for p in ADHERENCE_PROMPTS)
    total = len(ADHERENCE_PROMPTS) * len(SEEDS)
    print(f"\n{len(out)} of {total} pictures show the prompted shape ({counts})")
    return out


def _report(name: str, values: list[float]) -> tuple[float, float, float, int]:
    mean, low, high, n = mean_ci(values)
    print(f"{name}: mean {mean:.4f}, 95% CI {low:.4f} .. {high:.4f}, n {n}")
    return mean, low, high, n


def test_enough_pictures_show_the_prompted_shape(samples: list[Sample]) -> None:
    assert len(samples) >= MIN_PICTURES
    # Every prompt keeps at least two pictures, so every picture has a control of its own prompt.
    assert {s.prompt for s in samples} == set(ADHERENCE_PROMPTS)
    # Why mass shares leave out the start, end and padding rows: they take most of the attention.
    shares = [s.content_share for s in samples]
    mean, _, high, _ = _report("content share of the positive prompt, window all", shares)
    assert mean > 0 and high < 0.5


def test_attention_lands_where_the_object_is(samples: list[Sample]) -> None:
    """IoU of the shape tag's top 10% pixels with the shape's mask, minus the same IoU with the map
    of another seed's picture of the same prompt: above 0 over the pictures."""
    other = partners([s.prompt for s in samples])
    lows = {}
    for window in WINDOWS:
        own = [iou(top_cells(s.heat[window]), s.mask) for s in samples]
        control = [
            iou(top_cells(samples[j].heat[window]), s.mask) for s, j in zip(samples, other, strict=True)
        ]
        _report(f"IoU top 10% / mask, window {window}: own map", own)
        _report(f"IoU top 10% / mask, window {window}: another seed's map", control)
        _, low, _, n = _report(
            f"IoU top 10% / mask, window {window}: paired difference",
            [a - b for a, b in zip(own, control, strict=True)],
        )
        lows[window] = low
        assert n == len(samples)
    assert lows["all"] > 0


def test_guidance_difference_is_larger_inside_the_object(samples: list[Sample]) -> None:
    """The mean |cond - uncond| map over the shape's pixels minus over the rest of the picture, per
    picture: above 0. And more so than for another seed's map over this picture's shape: the map
    follows this picture's object, not where shapes usually sit."""
    other = partners([s.prompt for s in samples])
    own = [inside_minus_outside(s.difference, s.mask) for s in samples]
    control = [
        inside_minus_outside(samples[j].difference, s.mask) for s, j in zip(samples, other, strict=True)
    ]
    _report("guidance difference, inside minus outside the shape: own map", own)
    _report("guidance difference, inside minus outside the shape: another seed's map", control)
    outside = [float(s.difference[~s.mask].mean()) for s in samples]
    _report("guidance difference outside the shape (scale)", outside)
    _report("guidance difference inside the shape", [float(s.difference[s.mask].mean()) for s in samples])
    _, low_own, _, _ = mean_ci(own)
    _, low_paired, _, _ = _report(
        "guidance difference, inside minus outside: own minus another seed's",
        [a - b for a, b in zip(own, control, strict=True)],
    )
    assert low_own > 0
    assert low_paired > 0


def test_each_tag_lands_on_its_own_shape(engine: Engine) -> None:
    """With ``2shapes, <colour> <shape>, <colour> <shape>``, a tag's top 10% pixels overlap its own
    shape more than the other prompted shape: the maps tell the tags apart, they do not just mark
    where objects are. Per picture, the mean over its two tags of IoU(own shape) - IoU(other shape)."""
    side = native_size(engine.components)
    config = DetectorConfig(native_size=side)
    differences = []
    own_ious, other_ious = [], []
    for tags in TWO_SHAPE_PROMPTS:
        prompt = ", ".join(("2shapes", *tags))
        request = demo_request(
            prompt, "", size=side, seed=TWO_SHAPE_SEEDS[0], batch_size=len(TWO_SHAPE_SEEDS)
        )
        result = engine.generate(request, seeds=TWO_SHAPE_SEEDS, explain=ExplainOptions(preview_every=0))
        for image, explanation in zip(result.images, result.explanations, strict=True):
            masks = [prompted_mask(image, config, *tag.split()) for tag in tags]
            if masks[0] is None or masks[1] is None:
                continue
            all_calls = explanation.window_index("all")
            tops = [
                top_cells(
                    to_picture(
                        explanation.tag_maps[explanation.tag_index(f"positive:{tag}"), all_calls],
                        (side, side),
                    )
                )
                for tag in tags
            ]
            own = [iou(tops[k], masks[k]) for k in (0, 1)]
            other = [iou(tops[k], masks[1 - k]) for k in (0, 1)]
            own_ious.append(float(np.mean(own)))
            other_ious.append(float(np.mean(other)))
            differences.append(own_ious[-1] - other_ious[-1])
    total = len(TWO_SHAPE_PROMPTS) * len(TWO_SHAPE_SEEDS)
    print(f"\n{len(differences)} of {total} two-shape pictures show both prompted shapes")
    _report("two shapes, IoU of a tag's top 10% with its own shape", own_ious)
    _report("two shapes, IoU of a tag's top 10% with the other prompted shape", other_ious)
    _, low, _, n = _report("two shapes, own minus other, per picture", differences)
    assert n >= MIN_TWO_SHAPE_PICTURES
    assert low > 0
