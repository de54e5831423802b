"""End to end on the miniature model (issue 8, "Must show"): fine-tune a copy on one colour, extract a
LoRA from the weight difference (SVD, ``extract_lora`` as ``voidprompt lora extract A B --rank R``),
apply it with ``<lora:red:M>`` through the Engine and measure with the detector.

Statistic: the share of detected shapes that the detector names "red", pooled over the pictures of one
multiplier (Wilson interval), and for the slow test the least-squares slope of the per-picture share
on the multiplier (lab.stats.linear_slope). Pictures are paired: every multiplier uses the same seeds,
so the multiplier is the only thing that changes.

Prompt: the empty prompt (with CFG 7 and the empty negative, the unconditional prediction). The
fine-tune keeps the world's captions, colour words included; a prompt naming a shape without a colour
("circle, white background") barely moves, because the fine-tune teaches "red" where the caption says
red, and CFG subtracts the part of the change the unconditional branch picked up. The empty prompt is
the neutral prompt that the fine-tune's caption dropout trains directly.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from voidprompt.demo.finetune import ColourSweep, finetune, lora_colour_sweep
from voidprompt.demo.miniature import miniature_model_path

PROMPT = ""


def _sweep(
    tmp: Path,
    *,
    steps: int = 300,
    batch: int = 8,
    lr: float = 3e-4,
    multipliers: tuple[float, ...],
    n: int,
    sample_steps: int,
) -> ColourSweep:
    tuned = finetune(
        miniature_model_path(),
        tmp / "red.safetensors",
        colour="red",
        steps=steps,
        batch_size=batch,
        lr=lr,
        caption_dropout=0.5,
        seed=7,
    )
    return lora_colour_sweep(
        miniature_model_path(),
        tuned,
        tmp,
        colour="red",
        prompt=PROMPT,
        multipliers=multipliers,
        n_images=n,
        steps=sample_steps,
        rank=8,
        conv_rank=8,
    )


def test_quick_finetune_keeps_the_base_layout_and_changes_only_the_unet(tmp_path: Path) -> None:
    """The fine-tune's contract, cheaply: same keys, dtypes, shapes and arch metadata as the base; the
    frozen text encoder and VAE byte-identical (fp16 -> fp32 -> fp16 is exact); the UNet changed."""
    import json

    import torch
    from safetensors.torch import load_file

    from voidprompt.models.load import open_checkpoint

    base_path = miniature_model_path()
    tuned_path = finetune(base_path, tmp_path / "red.safetensors", steps=3, n_images=8, batch_size=2, seed=7)
    base, tuned = load_file(str(base_path)), load_file(str(tuned_path))
    assert set(base) == set(tuned)
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    for k in base:
        assert base[k].dtype == tuned[k].dtype and base[k].shape == tuned[k].shape, k
    assert changed and all(k.startswith("model.diffusion_model.") for k in changed), sorted(changed)[:5]
    with open_checkpoint(base_path) as a, open_checkpoint(tuned_path) as b:
        assert a.metadata["voidprompt.arch"] == b.metadata["voidprompt.arch"]
        info = json.loads(b.metadata["voidprompt.training"])
    assert info["finetune"]["colour"] == "red" and info["finetune"]["steps"] == 3


# Measured on this CPU (issue-8 report): fine-tunes of 40-150 steps (lr 2e-4..1e-3, caption dropout
# 0.1..0.9) did not move the colour of unconditioned pictures, even with the full fine-tuned model.
# 300 steps at lr 3e-4, batch 8, caption dropout 0.5 (7 min on 2 contended cores) did: red share of
# detected shapes 0.235 / 0.400 / 0.478 / 0.522 at M 0 / 0.5 / 1 / 1.5 (16 pictures, 10 steps).

# The full-size sweep (64 pictures x 4 multipliers, 20 steps) is issue 8's must-show. It has not been
# run to completion yet (session 1 ran out of CPU time); it is a plain slow test so that its result,
# whichever it is, shows in `make test-all`.


@pytest.mark.slow
def test_lora_moves_colour_towards_red(tmp_path: Path) -> None:
    sweep = _sweep(tmp_path, multipliers=(0.0, 1.0), n=16, sample_steps=10)
    off, on = sweep.points
    print(sweep.table())
    assert off.shapes >= 8 and on.shapes >= 8, "the detector must see shapes at both multipliers"
    # Measured 8/34 -> 11/23 (0.235 -> 0.478); a loose margin below that difference.
    assert on.share >= off.share + 0.15, sweep.table()


@pytest.mark.slow
def test_lora_colour_is_monotone_in_the_multiplier(tmp_path: Path) -> None:
    sweep = _sweep(tmp_path, multipliers=(0.0, 0.5, 1.0, 1.5), n=64, sample_steps=20)
    print(sweep.table())
    shares = [p.share for p in sweep.points]
    assert all(p.shapes >= 32 for p in sweep.points), sweep.table()
    assert shares == sorted(shares) and shares[-1] > shares[0], sweep.table()
    fit = sweep.slope()
    assert fit.low > 0.0, f"slope {fit.slope:.3f} [{fit.low:.3f}, {fit.high:.3f}]\n{sweep.table()}"
