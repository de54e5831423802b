"""End to end on the miniature model: fine-tune a copy on one colour, extract a
LoRA from the weight difference (SVD, ``voidprompt lora extract A B --rank R``), apply it with
``<lora:red:M>`` through the Engine and measure with the detector.

Quick tests (CI), on a miniature-layout checkpoint trained one step (``tiny_miniature``): the
fine-tune's file contract, and the user's command-line path: ``voidprompt lora extract`` writes a LoRA
that ``voidprompt txt2img --lora-dir`` applies with ``<lora:red:1>``; at full rank on a fine-tune of the
LoRA-targetable weights only, that reproduces the fine-tuned model's picture; the sweep runs each
multiplier on the same seeds, and its statistics are checked on hand-made points. None of them needs a
model that draws well.

Slow test (the must-show): one 300-step fine-tune on red-only world pictures, a rank-8 LoRA (ResNet
convs included), 64 paired seeds at each of M = 0, 0.5, 1, 1.5 (multiplier 0 = the base model, no
tag). Statistics, all from the detector:

- per picture, "the detector finds a red shape" (pictures are independent, one seed each, so its 95%
  Wilson interval is honest); the intervals at M 0 and 1.5 must not overlap;
- its slope on M paired by seed (each seed's least-squares slope, mean with a t interval): the interval
  must lie above 0, and the four shares must not decrease with M;
- reported too: the share of detected shapes that are red, pooled (Wilson on shapes, a little too
  narrow since shapes of one picture are not independent), and its unpaired slope over the pictures.

Prompt: the empty prompt (with CFG 7 and the empty negative, the unconditional prediction). The
fine-tune keeps the world's captions, colour words included; a prompt naming a shape without a colour
("circle, white background") barely moves, because the fine-tune teaches "red" where the caption says
red, and CFG subtracts the part of the change the unconditional branch picked up. The empty prompt is
the neutral prompt that the fine-tune's caption dropout trains directly.

Nothing here depends on the current miniature weights' numbers: the tests assert the direction and the
significance of the effect. Measured figures: docs/networks.md.
"""

from __future__ import annotations

import itertools
import re
import time
from pathlib import Path

import numpy as np
import pytest

from voidprompt.demo.finetune import ColourSweep, finetune, lora_colour_sweep
from voidprompt.demo.miniature import miniature_model_path

PROMPT = ""
MULTIPLIERS = (0.0, 0.5, 1.0, 1.5)


def test_quick_finetune_keeps_the_base_layout_and_changes_only_the_unet(
    tmp_path: Path, tiny_miniature: Path
) -> None:
    """The fine-tune's contract, cheaply: same keys, dtypes, shapes and arch metadata as the base; the
    frozen text encoder and VAE byte-identical (fp16 -> fp32 -> fp16 is exact); the UNet changed."""
    import json

    import torch
    from safetensors.torch import load_file

    from voidprompt.models.load import open_checkpoint

    base_path = tiny_miniature
    tuned_path = finetune(
        base_path, tmp_path / "red.safetensors", steps=3, n_images=8, batch_size=2, seed=7, threads=1
    )
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


def _run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    from voidprompt.cli import main

    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def test_quick_cli_extract_then_lora_tag_reproduces_the_finetune(
    tmp_path: Path, tiny_miniature: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``voidprompt lora extract BASE TUNED --rank R --conv-rank R --out DIR/red.safetensors``, then
    ``voidprompt txt2img --lora-dir DIR --prompt "<lora:red:1>"`` on the base model.

    The fine-tune trains only the weights a conv-rank LoRA targets, and the extraction is at full rank
    (the largest min(out, in x k x k) over those layers), so the LoRA at multiplier 1 adds exactly the
    fine-tune's difference: its picture must be the fine-tuned model's picture (up to
    float rounding in base + up @ down), while the base model's picture differs. The infotext must name
    the LoRA with the addnet hash of the extracted file."""
    import torch
    from PIL import Image
    from safetensors.torch import load_file

    from voidprompt.imagemeta import read_infotext
    from voidprompt.models.arch import ArchConstants, build_modules, infer_arch
    from voidprompt.models.convert import CheckpointKeyMap
    from voidprompt.models.hashes import addnet_hash_safetensors
    from voidprompt.models.load import open_checkpoint
    from voidprompt.models.networks.extract import kohya_targets
    from voidprompt.models.networks.lora import load_lora

    monkeypatch.setenv("VOIDPROMPT_CACHE_DIR", str(tmp_path / "cache"))
    base_path = tiny_miniature
    tuned_path = finetune(
        base_path,
        tmp_path / "tuned.safetensors",
        steps=16,
        n_images=8,
        batch_size=2,
        lr=2e-3,
        seed=7,
        trainable="lora_targets",
        threads=1,
    )
    # Only weights a LoRA can reach moved (CompVis keys of kohya's conv-rank targets, via the loader's
    # key map as extract_lora finds them).
    with open_checkpoint(base_path) as reader:
        arch = infer_arch(reader.shapes, ArchConstants.from_metadata(reader.metadata, source="base"))
    unet, vae, text_encoder = build_modules(arch, device="meta")
    keymap = CheckpointKeyMap(unet, vae, text_encoder)
    weights = {
        name: module.weight
        for _, part, name, module in kohya_targets(unet, text_encoder, conv=True)
        if part == "unet"
    }
    reachable = {keymap.reverse[("unet", name + ".weight")] for name in weights}
    full_rank = max(min(w.shape[0], w[0].numel()) for w in weights.values())
    base_sd, tuned_sd = load_file(str(base_path)), load_file(str(tuned_path))
    changed = {k for k in base_sd if not torch.equal(base_sd[k], tuned_sd[k])}
    assert changed and changed <= reachable, sorted(changed - reachable)[:5]

    lora_dir = tmp_path / "loras"
    lora_dir.mkdir()
    lora_file = lora_dir / "red.safetensors"
    out = _run_cli(
        [
            "lora",
            "extract",
            str(base_path),
            str(tuned_path),
            "--rank",
            str(full_rank),
            "--conv-rank",
            str(full_rank),
            "--out",
            str(lora_file),
        ],
        capsys,
    )
    assert lora_file.is_file(), out
    error = re.search(r"worst relative error ([0-9.eE+-]+)", out)
    assert error and float(error.group(1)) < 1e-5, out
    network = load_lora(lora_file)
    assert len(network.modules) == len(changed)  # one LoRA layer per changed weight, none for the rest

    def txt2img(model: Path, prompt: str, name: str) -> tuple[np.ndarray, str]:
        argv = ["txt2img", "--model", str(model), "--prompt", prompt, "--lora-dir", str(lora_dir),
                "--width", "32", "--height", "32", "--clip-skip", "2", "--steps", "10", "--seed", "4242",
                "--out", str(tmp_path / name)]  # fmt: skip
        printed = _run_cli(argv, capsys).strip().splitlines()[-1]
        with Image.open(printed) as image:
            infotext, _ = read_infotext(image)
            pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
        assert infotext is not None
        return pixels, infotext

    with_lora, lora_info = txt2img(base_path, "<lora:red:1>", "lora")
    tuned, _ = txt2img(tuned_path, "", "tuned")
    base, base_info = txt2img(base_path, "", "base")
    hash12 = addnet_hash_safetensors(lora_file)[:12]
    assert f'Lora hashes: "red: {hash12}"' in lora_info, lora_info
    assert "Lora hashes" not in base_info
    # Measured: 0 levels apart from the fine-tuned picture, 16 on average from the base picture.
    assert np.abs(base - tuned).mean() > 5.0, "the fine-tune must visibly change the picture"
    assert np.abs(with_lora - tuned).max() <= 1, np.abs(with_lora - tuned).max()


def test_quick_sweep_statistics_on_known_points() -> None:
    """The sweep's figures on hand-made points: pooled shares and Wilson intervals, the unpaired slope
    (scipy's linregress as the oracle) and the paired slope (each seed's least-squares slope, then a t
    interval over the seeds)."""
    from scipy import stats

    from voidprompt.demo.finetune import SweepPoint
    from voidprompt.errors import VoidpromptError
    from voidprompt.lab.stats import wilson_interval

    has = {0.0: [False, False, True, False], 1.0: [True, False, True, False], 2.0: [True, True, True, False]}
    per_image = {0.0: [0.0, 0.5], 1.0: [1.0, 0.5, 0.0], 2.0: [1.0, 1.0, 0.5]}
    points = [
        SweepPoint(m, shapes=6, coloured=k, images_with_shapes=len(per_image[m]), per_image=per_image[m],
                   has_colour=has[m])
        for m, k in ((0.0, 1), (1.0, 3), (2.0, 5))
    ]  # fmt: skip
    sweep = ColourSweep("red", "", points, 0.0, 0.0, 3)
    assert [p.share for p in points] == [1 / 6, 3 / 6, 5 / 6]
    assert [p.picture_share for p in points] == [0.25, 0.5, 0.75]
    assert points[1].picture_interval() == wilson_interval(2, 4) and points[2].interval() == wilson_interval(
        5, 6
    )
    fit = sweep.slope()
    oracle = stats.linregress(
        [m for m in per_image for _ in per_image[m]], [y for v in per_image.values() for y in v]
    )
    assert (
        fit.n == 8 and fit.slope == pytest.approx(oracle.slope) and fit.stderr == pytest.approx(oracle.stderr)
    )
    # Per seed, the 0/1 outcomes at M = 0, 1, 2: seed 0 (0, 1, 1) slope 0.5, seed 1 (0, 0, 1) 0.5,
    # seed 2 (1, 1, 1) 0, seed 3 (0, 0, 0) 0.
    per_seed = np.array([0.5, 0.5, 0.0, 0.0])
    paired = sweep.paired_slope()
    half = stats.t.ppf(0.975, 3) * per_seed.std(ddof=1) / 2.0
    assert paired.n == 4 and paired.slope == pytest.approx(0.25)
    assert (paired.low, paired.high) == pytest.approx((0.25 - half, 0.25 + half))
    assert "| 1 | 2/4 = 0.500" in sweep.table() and "3/6 = 0.500" in sweep.table()
    with pytest.raises(VoidpromptError, match="two or more multipliers and seeds"):
        ColourSweep("red", "", points[:1], 0.0, 0.0, 3).paired_slope()


def test_quick_sweep_generates_each_multiplier_on_the_same_seeds(
    tmp_path: Path, tiny_miniature: Path
) -> None:
    """``lora_colour_sweep`` on a one-step checkpoint: it extracts the LoRA, and at multiplier 0 the
    pictures are the base model's for the same seeds (no tag), read by the detector at the model's size."""
    from voidprompt.demo.detector import DetectorConfig, detect
    from voidprompt.demo.generate import demo_request, load_engine

    tuned = finetune(
        tiny_miniature, tmp_path / "red.safetensors", steps=2, n_images=4, batch_size=2, threads=1
    )
    sweep = lora_colour_sweep(
        tiny_miniature, tuned, tmp_path, multipliers=(0.0, 1.0), n_images=3, steps=2, rank=2, conv_rank=2,
        batch=2, threads=1,
    )  # fmt: skip
    assert (tmp_path / "lora" / "red.safetensors").is_file() and sweep.lora_layers > 0
    assert [p.multiplier for p in sweep.points] == [0.0, 1.0] and [p.pictures for p in sweep.points] == [3, 3]
    for point in sweep.points:
        assert point.coloured <= point.shapes and point.images_with_shapes == len(point.per_image)
    base = load_engine(tiny_miniature).generate(demo_request("", size=32, seed=1000, batch_size=3, steps=2))
    found = [detect(image, DetectorConfig(native_size=32)).shapes for image in base.images]
    assert sweep.points[0].has_colour == [any(s.colour == "red" for s in shapes) for shapes in found]
    assert sweep.points[0].shapes == sum(len(shapes) for shapes in found)


@pytest.fixture(scope="module")
def colour_sweep(tmp_path_factory: pytest.TempPathFactory) -> ColourSweep:
    tmp = tmp_path_factory.mktemp("lora_sweep")
    started = time.perf_counter()
    tuned = finetune(
        miniature_model_path(),
        tmp / "red.safetensors",
        colour="red",
        steps=300,
        batch_size=8,
        lr=3e-4,
        caption_dropout=0.5,
        seed=7,
    )
    finetune_seconds = time.perf_counter() - started
    sweep = lora_colour_sweep(
        miniature_model_path(),
        tuned,
        tmp,
        colour="red",
        prompt=PROMPT,
        multipliers=MULTIPLIERS,
        n_images=64,
        steps=20,
        rank=8,
        conv_rank=8,
    )
    fit, paired = sweep.slope(), sweep.paired_slope()
    print(
        f"\n{sweep.table()}\n"
        f"paired slope of P(red shape) per unit M: {paired.slope:.3f} [{paired.low:.3f}, {paired.high:.3f}] "
        f"({paired.n} seeds)\n"
        f"unpaired slope of the per-picture red share: {fit.slope:.3f} [{fit.low:.3f}, {fit.high:.3f}] "
        f"({fit.n} pictures)\n"
        f"fine-tune {finetune_seconds:.0f} s, extract {sweep.extract_seconds:.0f} s "
        f"({sweep.lora_layers} layers), generate + detect {sweep.generate_seconds:.0f} s"
    )
    return sweep


@pytest.mark.slow
def test_lora_moves_colour_towards_red(colour_sweep: ColourSweep) -> None:
    off, on = colour_sweep.points[0], colour_sweep.points[-1]
    assert off.multiplier == 0.0 and on.multiplier == max(MULTIPLIERS)
    assert off.shapes >= 32 and on.shapes >= 32, "the detector must see shapes at both ends"
    # Pictures with a red shape: the Wilson intervals separate.
    assert off.picture_interval()[1] < on.picture_interval()[0], colour_sweep.table()
    # And the share of detected shapes that are red moves the same way.
    assert on.share > off.share, colour_sweep.table()


@pytest.mark.slow
def test_lora_colour_is_monotone_in_the_multiplier(colour_sweep: ColourSweep) -> None:
    points = colour_sweep.points
    assert points[-1].picture_share > points[0].picture_share, colour_sweep.table()
    # Monotone up to sampling noise: near saturation (59/64 then 58/64) a picture more or less is
    # chance, so each step may not fall below the previous share's 95% interval.
    for before, after in itertools.pairwise(points):
        assert after.picture_share >= before.picture_interval()[0], colour_sweep.table()
    paired = colour_sweep.paired_slope()
    assert paired.low > 0.0, f"paired slope {paired.slope:.3f} [{paired.low:.3f}, {paired.high:.3f}]"
    fit = colour_sweep.slope()
    assert fit.low > 0.0, f"slope {fit.slope:.3f} [{fit.low:.3f}, {fit.high:.3f}]\n{colour_sweep.table()}"
