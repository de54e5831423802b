"""``voidprompt study ...``: check, run, ls, show, report, labels import/export."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from voidprompt.errors import VoidpromptError, require_extra
from voidprompt.helpformat import use_help_format
from voidprompt.lab.catalog import Catalog, default_catalog_path
from voidprompt.lab.check import check_study
from voidprompt.lab.labels import export_labels, import_labels, label_scheme
from voidprompt.lab.plugins import installed_plugins
from voidprompt.lab.report import build_report
from voidprompt.lab.run import run_study
from voidprompt.lab.schema import GPU_BATCH_CAP, workers_arg
from voidprompt.lab.study import load_study
from voidprompt.models.placement import PRECISIONS


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="voidprompt study", description="Run and report studies.")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_catalog(p: argparse.ArgumentParser) -> None:
        p.add_argument("file", type=Path, help="the study file (TOML)")
        p.add_argument(
            "--catalog",
            type=Path,
            help="catalog file (default: runs/<study file name>/catalog.sqlite in the study file's folder)",
        )

    check = sub.add_parser("check", help="validate a study; print jobs, shapes and an estimated time")
    with_catalog(check)

    run = sub.add_parser("run", help="generate every pending job (resumable)")
    with_catalog(run)
    run.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="most images per sampler run (default: [run] batch_size, else 16 on the CPU and what free "
        f"memory holds, up to {GPU_BATCH_CAP}, on a GPU)",
    )
    run.add_argument(
        "--device", help="where the model runs: cpu, cuda, cuda:N, mps (default: [run] device, else cpu)"
    )
    run.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="auto (fp16 under autocast on CUDA, fp32 on the CPU), fp32, fp16 or bf16 "
        "(default: [run] precision, else auto)",
    )
    run.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the UNet, once per shape (default: [run] compile, else off)",
    )
    run.add_argument(
        "--deterministic",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fixed batch size and deterministic algorithms: reruns reproduce bit for bit",
    )
    run.add_argument(
        "--disable-nan-check",
        action="store_true",
        default=None,
        help="keep pictures whose UNet or VAE output is NaN (A1111's flag; they come out black)",
    )
    run.add_argument(
        "--executor",
        choices=("local", "ray"),
        default="local",
        help="local: this machine's processes; ray: a Ray cluster (the ray extra)",
    )
    run.add_argument("--address", help="Ray cluster address (e.g. auto); default: start a local one")
    run.add_argument(
        "--gpus-per-worker",
        type=float,
        help="Ray: GPUs each worker holds (default: 1 when the cluster has GPUs, else 0)",
    )
    run.add_argument(
        "--threads",
        type=int,
        help="torch threads per process/worker (default: [run] threads; pins float order)",
    )
    run.add_argument(
        "--workers",
        type=workers_arg,
        help="worker processes: local: N > 1 runs N processes on the CPU (auto: one per core); "
        "Ray: how many workers (default: [run] workers, else 1 locally)",
    )
    run.add_argument("--max-jobs", type=int, help="stop after this many images")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")

    ls = sub.add_parser("ls", help="summary and the images of a run")
    with_catalog(ls)
    ls.add_argument("--limit", type=int, default=20, help="most images listed")

    show = sub.add_parser("show", help="one image: settings, infotext, measures, labels")
    with_catalog(show)
    show.add_argument("image", help="image id or job id")

    report = sub.add_parser("report", help="HTML report, figures and CSV/Parquet exports")
    with_catalog(report)
    report.add_argument("--out", type=Path, help="output folder (default: report/ beside the catalog)")

    labels = sub.add_parser("labels", help="import or export labels as CSV")
    labels_sub = labels.add_subparsers(dest="labels_command", required=True)
    imp = labels_sub.add_parser("import", help="read labels (job_id or path, label_class, tags, source)")
    with_catalog(imp)
    imp.add_argument("csv", type=Path)
    imp.add_argument("--source", default="human", help="source for rows without one (default human)")
    exp = labels_sub.add_parser("export", help="write every label as CSV")
    with_catalog(exp)
    exp.add_argument("csv", type=Path)
    exp.add_argument("--source", help="only this source's labels")
    return use_help_format(parser)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        return _dispatch(args)
    except VoidpromptError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    study = load_study(args.file)
    plugins = installed_plugins()
    catalog_path = args.catalog or default_catalog_path(study)
    if args.command == "check":
        summary = check_study(study, catalog_path, plugins)
        print(summary.format())
        if summary.estimated_seconds is None:
            print("estimated time: unknown until some images are generated (run with --max-jobs 8)")
        return 0
    if args.command == "run":
        options = study.run.override(
            batch_size=args.batch_size,
            threads=args.threads,
            workers=args.workers,
            device=args.device,
            precision=args.precision,
            compile=args.compile,
            deterministic=args.deterministic,
            disable_nan_check=args.disable_nan_check,
            executor=args.executor,
            address=args.address,
            gpus_per_worker=args.gpus_per_worker,
            max_jobs=args.max_jobs,
            catalog=catalog_path,
            progress=not args.no_progress,
        )
        report = run_study(study, options, plugins)
        print(report.format())
        return 1 if report.failed else 0
    if args.command == "report":
        require_extra("matplotlib", "lab", "voidprompt study report")
        result = build_report(study, catalog_path=catalog_path, out_dir=args.out, plugins=plugins)
        print(
            f"report: {result.html}\nfigures: {len(result.figures)} files in {result.html.parent / 'figures'}"
        )
        return 0
    if args.command == "labels":
        if args.labels_command == "export":
            with Catalog.open(catalog_path, readonly=True) as catalog:
                count = export_labels(catalog, args.csv, args.source)
            print(f"{count} labels written to {args.csv}")
        else:
            with Catalog.open(catalog_path) as catalog:
                count = import_labels(catalog, args.csv, label_scheme(study, plugins).classes, args.source)
            print(f"{count} labels imported from {args.csv}")
        return 0
    with Catalog.open(catalog_path, readonly=True) as catalog:
        if args.command == "ls":
            print(catalog.summary().format())
            for row in catalog.images()[: args.limit]:
                lum = catalog.measures(row["id"]).get("luminance", float("nan"))
                labels = catalog.labels(row["id"])
                label = ", ".join(f"{s}: {c}" for s, (c, _) in labels.items()) or "-"
                axes = " ".join(f"{k}={v}" for k, v in row["axis_values"].items() if not k.endswith("_spec"))
                print(f"{row['id']:>5} {row['path']}  {axes}  luminance={lum:.3f}  [{label}]")
            return 0
        # show
        key = args.image
        image_id = int(key) if key.isdigit() else catalog.image_id_for(job_id=key)
        image: dict[str, Any] | None = next((i for i in catalog.images() if i["id"] == image_id), None)
        if image is None:
            print(f"error: no image {key!r} in {catalog_path}; see `voidprompt study ls`", file=sys.stderr)
            return 2
        details = {
            **image,
            "measures": catalog.measures(image["id"]),
            "labels": catalog.labels(image["id"]),
            "run": catalog.runs().get(image.get("run_id") or 0),  # device, precision, GPU, versions
            # With an explanation (its file is the row's "explanation"): per tag and step window.
            "tag_measures": [t for t in catalog.all_tag_measures() if t["image_id"] == image["id"]],
        }
        print(json.dumps(details, indent=2, default=str))
        return 0


