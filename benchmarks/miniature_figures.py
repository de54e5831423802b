"""Measure the miniature model's figures for its MODEL_CARD.md and print them as markdown.

    python benchmarks/miniature_figures.py [--model PATH] [--n 200] [--per-prompt 25] [--json OUT]

Paired seeds across the conditions of each figure; the model's native size (128x128 for the shipped
model, read from its ``voidprompt.arch`` metadata), Euler a, 20 steps, Clip skip 2, CFG 7 unless
stated; world pictures are drawn, and every picture read, at that size. Takes tens of minutes on two
CPU cores at the default sizes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch


def main() -> None:
    from voidprompt.demo.detector import evaluate_detector
    from voidprompt.demo.generate import load_engine, native_size
    from voidprompt.demo.measure import (
        count_ratio,
        emphasis_slope,
        kind_survival_by_size,
        negative_prompt_effect,
        prompt_adherence,
        prompt_adherence_ceiling,
        vae_round_trip,
    )
    from voidprompt.demo.world import WorldConfig

    p = argparse.ArgumentParser()
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--n", type=int, default=200, help="pictures per condition")
    p.add_argument("--per-prompt", type=int, default=25, help="pictures per adherence prompt (8 prompts)")
    p.add_argument("--emphasis-n", type=int, default=100, help="pictures per emphasis weight")
    p.add_argument("--emphasis-tag", default="cropped", help="the defect the model draws most")
    p.add_argument("--detector-n", type=int, default=300)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", default="detector,size,ceiling,adherence,negative,count,emphasis")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    engine = load_engine(args.model, threads=args.threads)
    side = native_size(engine.components)
    only = set(args.only.split(","))
    figures: dict[str, Any] = {}
    lines: list[str] = []

    def timed(name: str, started: float) -> None:
        figures.setdefault("seconds", {})[name] = round(time.perf_counter() - started)
        print(f"[{name}: {time.perf_counter() - started:.0f} s]", flush=True)

    if "detector" in only:
        t0 = time.perf_counter()
        round_trip = vae_round_trip(engine.components)
        upright = WorldConfig(size=side, upright=True)
        held_out = {"n": args.detector_n, "seed": 20240607, "size": side}
        reports = {
            "world": evaluate_detector(**held_out),
            "vae_round_trip": evaluate_detector(**held_out, transform=round_trip),
            "upright_world": evaluate_detector(**held_out, world=upright),
            "upright_vae_round_trip": evaluate_detector(**held_out, transform=round_trip, world=upright),
        }
        figures["detector"] = {
            name: {**r.__dict__, "kind_confusion": {f"{a}->{b}": c for (a, b), c in r.kind_confusion.items()}}
            for name, r in reports.items()
        }
        lines += ["## Detector (held-out world pictures, seed 20240607)", ""]
        for name, report in reports.items():
            lines += [f"### {name.replace('_', ' ')}", "", report.summary(), ""]
        timed("detector", t0)
        print("\n".join(lines), flush=True)
    if "size" in only:
        t0 = time.perf_counter()
        radii = (0.12, 0.15, 0.18, 0.22, 0.26, 0.30)
        survival = kind_survival_by_size(vae_round_trip(engine.components), radii, 20, seed=0, size=side)
        figures["kind_survival_by_size"] = {
            k: {str(r): [p.k, p.n] for r, p in v.items()} for k, v in survival.items()
        }
        lines += [
            "## Shape kind after a VAE round trip, by circumradius (single shapes on white, 20 each)",
            "",
            "| kind | " + " | ".join(f"{r:g}" for r in radii) + " |",
            "|---|" + "---|" * len(radii),
            *[f"| {k} | " + " | ".join(str(p.k) for p in v.values()) + " |" for k, v in survival.items()],
            "",
        ]
        timed("size", t0)
        print("\n".join(lines[-5:]), flush=True)
    if "ceiling" in only:
        t0 = time.perf_counter()
        ceiling = prompt_adherence_ceiling(
            vae_round_trip(engine.components), args.per_prompt, seed=500000, size=side
        )
        figures["adherence_ceiling"] = {
            "world": [ceiling.world.k, ceiling.world.n],
            "vae_round_trip": [ceiling.transformed.k, ceiling.transformed.n],
            "per_prompt": {k: [w.k, t.k, w.n] for k, (w, t) in ceiling.per_prompt.items()},
        }
        block = [
            "## Adherence ceiling (world pictures of each prompt's tag, seed 500000)",
            "",
            "| prompt | world pictures | after the VAE |",
            "|---|---|---|",
            *[f"| {k} | {w.k}/{w.n} | {t.k}/{t.n} |" for k, (w, t) in ceiling.per_prompt.items()],
            f"| all | {ceiling.world} | {ceiling.transformed} |",
            "",
        ]
        lines += block
        timed("ceiling", t0)
        print("\n".join(block), flush=True)
    if "adherence" in only:
        t0 = time.perf_counter()
        rows = []
        for cfg in (7.0, 1.0):
            overall, per = prompt_adherence(engine, args.per_prompt, seed=100000, cfg_scale=cfg)
            figures[f"adherence_cfg{cfg:g}"] = {
                "k": overall.k,
                "n": overall.n,
                "per_prompt": {k: [v.k, v.n] for k, v in per.items()},
            }
            rows.append(
                f"| CFG {cfg:g} | {overall} | " + ", ".join(f"{k} {v.p:.2f}" for k, v in per.items()) + " |"
            )
        lines += [
            "## Prompt adherence",
            "",
            "| condition | share with the asked coloured shape | per prompt |",
            "|---|---|---|",
            *rows,
            "",
        ]
        timed("adherence", t0)
        print("\n".join(rows), flush=True)
    if "colour" in only:
        t0 = time.perf_counter()
        from voidprompt.demo.measure import colour_adherence

        for cfg in (7.0, 1.0):
            share = colour_adherence(engine, args.per_prompt, seed=100000, cfg_scale=cfg)
            figures[f"colour_cfg{cfg:g}"] = {"k": share.k, "n": share.n}
            lines.append(f"asked colour present (any kind), CFG {cfg:g}: {share}")
        timed("colour", t0)
        print("\n".join(lines[-2:]), flush=True)
    if "negative" in only:
        t0 = time.perf_counter()
        effect = negative_prompt_effect(engine, args.n, seed=200000)
        figures["negative"] = {
            k: {"any": [v[0].k, v[0].n], "per_defect": {d: [x.k, x.n] for d, x in v[1].items()}}
            for k, v in effect.items()
        }
        rows = [
            f"| {k} | {v[0]} | " + ", ".join(f"{d} {x.k}" for d, x in v[1].items()) + " |"
            for k, v in effect.items()
        ]
        ratio = effect["negative"][0].p / effect["none"][0].p if effect["none"][0].p else float("nan")
        lines += [
            "## Negative prompt (empty prompt; NovelAI negative list vs none)",
            "",
            "| negative prompt | pictures with any detected defect | per defect (count) |",
            "|---|---|---|",
            *rows,
            "",
            f"ratio with/without: {ratio:.2f}",
            "",
        ]
        figures["negative"]["ratio"] = ratio
        timed("negative", t0)
        print("\n".join(rows), ratio, flush=True)
    if "count" in only:
        t0 = time.perf_counter()
        counts = count_ratio(engine, args.n, seed=300000)
        figures["count"] = counts
        lines += [
            "## Area -> objects (empty prompt, no negative)",
            "",
            f"{side}x{side}: {counts['mean_native']:.2f} +- {counts['sem_native']:.2f} objects; "
            f"{2 * side}x{2 * side}: {counts['mean_4x']:.2f} +- {counts['sem_4x']:.2f}; "
            f"ratio {counts['ratio']:.2f}",
            "",
        ]
        timed("count", t0)
        print(counts, flush=True)
    if "emphasis" in only:
        t0 = time.perf_counter()
        tag = args.emphasis_tag
        # The floor's measurement (positive prompt = the tag, so the rate can fall), then the study's
        # own setting (empty prompt), where one negative tag already removes the defect at any W.
        for key, prompt in (("emphasis", tag), ("emphasis_empty_prompt", "")):
            fit, rates = emphasis_slope(engine, tag, args.emphasis_n, seed=400000, prompt=prompt)
            figures[key] = {
                "tag": tag,
                "prompt": prompt,
                "rates": {str(w): [r.k, r.n] for w, r in rates.items()},
                "slope": fit.slope,
                "low": fit.low,
                "high": fit.high,
            }
            lines += [
                f"## Emphasis: prompt `{prompt}`, negative prompt `({tag}:W)`",
                "",
                "| W | rate |",
                "|---|---|",
                *[f"| {w:g} | {r} |" for w, r in rates.items()],
                "",
                f"slope {fit.slope:.3f} per unit W (95% CI {fit.low:.3f} .. {fit.high:.3f})",
                "",
            ]
            print(lines[-2], flush=True)
        timed("emphasis", t0)
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1, default=str))


if __name__ == "__main__":
    main()
