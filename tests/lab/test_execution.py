"""Executors' placement, batch sizing and provenance: device and precision from [run] and the flags,
out-of-memory halving (simulated on the CPU), sizing from free memory, deterministic runs, and what
the catalog records of each image and run."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from lab_helpers import quiet, study_text
from PIL import Image

from voidprompt.errors import DeviceError
from voidprompt.lab.catalog import Catalog, Provenance
from voidprompt.lab.cli import main
from voidprompt.lab.execution import MEMORY_SHARE, Batch, BatchSizer, Placement, run_sized, size_key
from voidprompt.lab.run import plan_batches, run_study
from voidprompt.lab.schema import DEFAULT_BATCH_SIZE, GPU_BATCH_CAP, ModelRef
from voidprompt.lab.study import Study, parse_study
from voidprompt.models import load_model
from voidprompt.pipeline.engine import Engine
from voidprompt.request import GenerationRequest


def _study(checkpoint: Path, folder: Path, *, seeds: str = "8 random", run: str = "") -> Study:
    text = study_text(checkpoint, sizes="16x16", seeds=seeds).replace("[labels]", f"[run]\n{run}\n[labels]")
    return parse_study(text, folder / "t.toml")


def _images(folder: Path) -> dict[str, tuple[str, int | None, int | None]]:
    """job id -> (sha256, batch size, run id) as the catalog records them."""
    with Catalog.open(folder / "runs" / "t" / "catalog.sqlite", readonly=True) as catalog:
        return {i["job_id"]: (i["sha256"], i["batch_size"], i["run_id"]) for i in catalog.images()}


def _out_of_memory_above(limit: int, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Engine.generate raises CUDA's out-of-memory error for more than ``limit`` images at once, as
    a GPU with room for ``limit`` would; returns the batch sizes it was asked for, in order."""
    asked: list[int] = []
    generate = Engine.generate

    def limited(self: Engine, request: GenerationRequest, *args: Any, **kwargs: Any) -> Any:
        asked.append(len(kwargs["seeds"]))
        if len(kwargs["seeds"]) > limit:
            raise torch.cuda.OutOfMemoryError(
                f"CUDA out of memory (simulated: {len(kwargs['seeds'])} > {limit})"
            )
        return generate(self, request, *args, **kwargs)

    monkeypatch.setattr(Engine, "generate", limited)
    return asked


def test_out_of_memory_halves_the_batch_and_loses_nothing(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The reference: the same study planned at batch size 2 from the start.
    reference = _study(tiny_checkpoint, tmp_path / "reference")
    run_study(reference, quiet(reference, batch_size=2))
    expected = _images(tmp_path / "reference")

    asked = _out_of_memory_above(3, monkeypatch)
    study = _study(tiny_checkpoint, tmp_path / "halved")
    report = run_study(study, quiet(study, batch_size=8))
    # Two groups of 8 seeds (W = 1.0, 1.5), each 8 -> 4 -> 2 the first time; the second group
    # is the same shape, so it starts at the size that fitted.
    assert asked == [8, 4, 2, 2, 2, 2, 2, 2, 2, 2]
    assert (report.generated, len(report.failed), report.batches) == (16, 0, 8)
    got = _images(tmp_path / "halved")
    assert {j: (sha, size) for j, (sha, size, _) in got.items()} == {
        j: (sha, 2) for j, (sha, size, _) in expected.items()
    }  # every job once, the same pixels as a planned batch of 2, and 2 recorded as its batch size


def test_a_single_image_that_does_not_fit_fails_its_jobs_only(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _out_of_memory_above(0, monkeypatch)
    study = _study(tiny_checkpoint, tmp_path, seeds="1")
    report = run_study(study, quiet(study, batch_size=4))
    assert (report.generated, len(report.failed)) == (0, 2)
    assert set(report.failed.values()) == {
        "16x16: out of GPU memory for a single image; use a smaller size, --precision fp16, or a GPU with "
        "more free memory"
    }


def test_a_deterministic_run_keeps_its_batch_size(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[bool] = []
    asked = _out_of_memory_above(3, monkeypatch)
    generate = Engine.generate  # the limited one

    def watching(self: Engine, *args: Any, **kwargs: Any) -> Any:
        seen.append(torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark)
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "generate", watching)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)  # as A1111 leaves it on a GTX 16xx
    study = _study(tiny_checkpoint, tmp_path, seeds="4 random", run="deterministic = true")
    assert study.run.deterministic
    report = run_study(study, quiet(study, batch_size=4))
    assert asked == [4, 4]  # no halving: each group of 4 fails whole
    assert (report.generated, len(report.failed)) == (0, 8)
    assert next(iter(report.failed.values())).startswith(
        "16x16: out of GPU memory at batch size 4; a deterministic run keeps its batch size, so lower"
    )
    assert seen == [True, True]
    assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark  # restored
    report = run_study(study, quiet(study, batch_size=2))  # what the message says to do
    assert (report.generated, len(report.failed)) == (8, 0)
    assert {size for _, size, _ in _images(tmp_path).values()} == {2}


class FakeMemory:
    """A GPU's memory as the sizer sees it: ``free`` bytes, and ``per_image`` bytes at a run's peak."""

    def __init__(self, free: int, per_image: int) -> None:
        self.free, self.per_image, self.released = free, per_image, 0
        self.running = 0

    def available(self) -> int:
        return self.free

    def start(self) -> int:
        return 1000  # the weights

    def peak(self) -> int:
        return 1000 + self.running * self.per_image

    def release(self) -> None:
        self.released += 1


def test_the_sizer_fits_runs_to_free_memory() -> None:
    memory = FakeMemory(free=10_000, per_image=1_000)
    sizer = BatchSizer(memory)
    key = ("model", 64, 64, None)
    assert sizer.size(key, 64) == 1  # the first run of a shape measures one image
    memory.running = 1
    with sizer.measure(key, 1):
        pass
    fits = int(MEMORY_SHARE * 10_000 / 1_000)
    assert sizer.size(key, 64) == fits == 8
    assert sizer.size(key, 3) == 3  # never more than the batch holds
    assert sizer.size(("model", 128, 64, None), 64) == 1  # another shape is measured on its own
    memory.free = 2_500  # something else took memory
    assert sizer.size(key, 64) == 2
    memory.free = 100_000
    sizer.out_of_memory(key, 16, "64x64")  # the estimate was wrong: that shape stays at 8 from now on
    assert sizer.size(key, 64) == 8 and memory.released == 1
    fixed = BatchSizer(memory, fixed=True)
    assert fixed.size(key, 16) == 16 and fixed.memory is None  # deterministic: the planned size


def test_run_sized_yields_each_sampler_run(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from voidprompt.lab.execution import load_engine
    from voidprompt.lab.plugins import ModelFiles

    loaded = load_engine(ModelFiles(tiny_checkpoint, None), Placement())
    jobs = tuple(_study(tiny_checkpoint, tmp_path, seeds="5 random").expand()[:5])
    batch = Batch(ModelRef(), jobs[0].request, jobs)
    memory = FakeMemory(free=3_000, per_image=1_000)
    generate = loaded.engine.generate

    def counting(*args: Any, **kwargs: Any) -> Any:
        memory.running = len(kwargs["seeds"])  # the run's peak grows with its images
        return generate(*args, **kwargs)

    loaded.engine.generate = counting  # type: ignore[method-assign]
    results = list(run_sized(loaded.engine, batch, BatchSizer(memory)))
    # One image measured, then as many as 85% of 3000 bytes hold at 1000 each: 2, and 2 again.
    assert [len(r.batch.jobs) for r in results] == [1, 2, 2]
    assert [g.batch_size for r in results for g in r.generated] == [1, 2, 2, 2, 2]
    assert [j.job_id for r in results for j in r.batch.jobs] == [j.job_id for j in jobs]
    assert size_key(batch) == (ModelRef(), 16, 16, None)
    assert {g.provenance for r in results for g in r.generated} == {None}


def test_planned_batches_follow_the_device() -> None:
    study = parse_study("[study]", "s.toml")
    assert study.run.batch_size is None
    assert study.run.batch_cap(on_gpu=False) == DEFAULT_BATCH_SIZE
    assert study.run.batch_cap(on_gpu=True) == GPU_BATCH_CAP  # free memory sizes the sampler runs
    assert study.run.override(deterministic=True).batch_cap(on_gpu=True) == DEFAULT_BATCH_SIZE
    assert study.run.override(batch_size=24).batch_cap(on_gpu=True) == 24  # a cap from the file


def test_the_catalog_records_each_images_batch_size_and_its_run(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    study = _study(tiny_checkpoint, tmp_path, seeds="3 random", run='precision = "bf16"')
    run_study(study, quiet(study, batch_size=2))
    images = _images(tmp_path)
    # Groups of 3 seeds cut at 2: batches of 2 and 1.
    assert sorted(size or 0 for _, size, _ in images.values()) == [1, 1, 2, 2, 2, 2]
    with Catalog.open(tmp_path / "runs" / "t" / "catalog.sqlite", readonly=True) as catalog:
        runs = catalog.runs()
        rows = catalog.images()
    assert list(runs) == [1] and {run_id for _, _, run_id in images.values()} == {1}
    run = runs[1]
    assert (run["device"], run["precision"], run["executor"]) == ("cpu", "bf16", "local")
    assert (run["gpu_name"], run["cuda_version"]) == (None, torch.version.cuda)
    assert (run["torch_version"], run["compile"], run["deterministic"]) == (torch.__version__, False, False)
    # The infotext stays A1111's: no provenance in it.
    assert all("bf16" not in row["infotext"] and "Batch size" not in row["infotext"] for row in rows)
    # A resumed run on other settings adds a run row; the earlier images keep theirs.
    study = _study(tiny_checkpoint, tmp_path, seeds="4 random", run='precision = "bf16"')
    run_study(study, quiet(study, batch_size=2, precision="fp32"))
    with Catalog.open(tmp_path / "runs" / "t" / "catalog.sqlite", readonly=True) as catalog:
        assert [r["precision"] for r in catalog.runs().values()] == ["bf16", "fp32"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--device", "cuda"],
            r"--device 'cuda': this torch \(.*\) is a CPU-only build; .*Available here: cpu",
        ),
        (["--device", "cuda:3"], r"--device 'cuda:3': "),
        (["--device", "tpu"], r"--device 'tpu': "),
        (["--precision", "fp16"], r"--precision fp16 on the CPU: refused"),
    ],
)
def test_a_device_or_precision_this_machine_lacks_is_one_line_and_writes_nothing(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    study = tmp_path / "t.toml"
    study.write_text(study_text(tiny_checkpoint, sizes="16x16", seeds="1"))
    assert main(["run", str(study), "--no-progress", *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "runs").exists()


def test_device_keys_and_flags(tmp_path: Path) -> None:
    text = '[run]\ndevice = "cuda:1"\nprecision = "bf16"\ncompile = true\ndeterministic = true\n'
    study = parse_study(text, tmp_path / "s.toml")
    run = study.run
    assert (run.device, run.precision, run.compile, run.deterministic) == ("cuda:1", "bf16", True, True)
    assert Placement.from_options(run) == Placement("cuda:1", "bf16", True, True)
    # Flags left out keep the file's values; given ones win.
    over = run.override(device=None, precision="fp32", compile=False, deterministic=None)
    assert (over.device, over.precision, over.compile, over.deterministic) == ("cuda:1", "fp32", False, True)
    assert Placement.from_options(parse_study("[study]", tmp_path / "e.toml").run).device_name == "cpu"
    for bad, pattern in [
        ('precision = "half"', r"\[run\] precision: 'half': choose auto or fp32 or fp16 or bf16"),
        ("compile = 1", r"\[run\] compile: 1: write true or false, e\.g\. compile = true"),
        ('device = ""', r'\[run\] device: write a torch device name, e\.g\. device = "cuda"'),
    ]:
        with pytest.raises(Exception, match=pattern):
            parse_study(f"[run]\n{bad}\n", tmp_path / "s.toml")


def test_plan_batches_cuts_at_the_cap(tiny_checkpoint: Path, tmp_path: Path) -> None:
    jobs = _study(tiny_checkpoint, tmp_path, seeds="8 random").expand()
    assert [len(b.jobs) for b in plan_batches(jobs, GPU_BATCH_CAP)] == [8, 8]


# The catalog layout before runs were recorded: what an existing study's catalog looks like.
OLD_IMAGES_TABLE = """
CREATE TABLE images_old (
    id INTEGER PRIMARY KEY,
    job_id TEXT NOT NULL UNIQUE REFERENCES jobs(job_id),
    path TEXT NOT NULL UNIQUE,
    sha256 TEXT NOT NULL,
    infotext TEXT NOT NULL,
    settings TEXT NOT NULL,
    seed INTEGER NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    model_hash TEXT,
    timings TEXT NOT NULL,
    created TEXT NOT NULL
);
"""


def _make_old(path: Path) -> None:
    """Turn a catalog into the old layout: images without batch_size and run_id, no runs table."""
    db = sqlite3.connect(path)
    db.executescript(
        "PRAGMA foreign_keys = OFF;" + OLD_IMAGES_TABLE +
        "INSERT INTO images_old SELECT id, job_id, path, sha256, infotext, settings, seed, width, height, "
        "model_hash, timings, created FROM images; DROP TABLE images; DROP TABLE runs; "
        "ALTER TABLE images_old RENAME TO images;"
    )  # fmt: skip
    assert [r[1] for r in db.execute("PRAGMA table_info(images)")][-2:] == ["timings", "created"]
    db.close()


def test_an_old_catalog_opens_and_resumes(tiny_checkpoint: Path, tmp_path: Path) -> None:
    study = _study(tiny_checkpoint, tmp_path, seeds="2 random")
    run_study(study, quiet(study, batch_size=2, max_jobs=2))
    path = tmp_path / "runs" / "t" / "catalog.sqlite"
    _make_old(path)
    with Catalog.open(path, readonly=True) as catalog:  # a reader takes it as it is
        assert catalog.runs() == {}
        assert [("batch_size" in i, i["job_id"]) for i in catalog.images()] == [
            (False, j.job_id) for j in study.expand()[:2]
        ]
    report = run_study(study, quiet(study, batch_size=2))  # the writer adds the columns and resumes
    assert (report.skipped, report.generated) == (2, 2)
    images = _images(tmp_path)
    done_first = {j.job_id for j in study.expand()[:2]}
    assert {j: (size, run) for j, (_, size, run) in images.items() if j in done_first} == {
        j: (None, None) for j in done_first
    }
    assert {(size, run) for j, (_, size, run) in images.items() if j not in done_first} == {(2, 1)}


def test_show_prints_the_images_run(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    study = _study(tiny_checkpoint, tmp_path, seeds="1")
    (tmp_path / "t.toml").write_text(study.toml_text)
    run_study(study, quiet(study))
    capsys.readouterr()
    assert main(["show", str(tmp_path / "t.toml"), "1"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["batch_size"] == 1 and shown["run"]["device"] == "cpu"
    assert Provenance("cpu", "fp32", torch.__version__, torch.version.cuda) == Provenance(
        shown["run"]["device"], shown["run"]["precision"], shown["run"]["torch_version"],
        shown["run"]["cuda_version"],
    )  # fmt: skip


def test_a_missing_device_is_refused_before_loading(tmp_path: Path) -> None:
    with pytest.raises(DeviceError, match="--device 'cuda'"):
        Placement("cuda").resolve()


@pytest.mark.slow  # torch.compile builds C++ kernels for the CPU: about 30 s
def test_a_compiled_run_gives_the_eager_runs_pictures(tiny_checkpoint: Path, tmp_path: Path) -> None:
    eager = _study(tiny_checkpoint, tmp_path / "eager", seeds="4 random")
    run_study(eager, quiet(eager, batch_size=2))
    study = _study(tiny_checkpoint, tmp_path / "compiled", seeds="4 random", run="compile = true")
    report = run_study(study, quiet(study, batch_size=2))
    assert (report.generated, report.failed) == (8, {})
    root = tmp_path / "compiled" / "runs" / "t"
    with Catalog.open(root / "catalog.sqlite", readonly=True) as catalog:
        (run,) = catalog.runs().values()
        compiled = {
            i["job_id"]: np.asarray(Image.open(root / i["path"]), dtype=int) for i in catalog.images()
        }
    assert run["compile"] is True
    with Catalog.open(tmp_path / "eager" / "runs" / "t" / "catalog.sqlite", readonly=True) as catalog:
        base = tmp_path / "eager" / "runs" / "t"
        for image in catalog.images():
            pixels = np.asarray(Image.open(base / image["path"]), dtype=int)
            # Inductor may fuse and reorder float sums: a level out of 255 at most.
            assert int(np.abs(pixels - compiled[image["job_id"]]).max()) <= 1


def test_channels_last_is_a_study_choice_recorded_with_its_run(tiny_checkpoint: Path, tmp_path: Path) -> None:
    study = _study(tiny_checkpoint, tmp_path, seeds="2 random", run="channels_last = true")
    assert study.run.channels_last is True
    run_study(study, quiet(study, batch_size=2))
    with Catalog.open(tmp_path / "runs" / "t" / "catalog.sqlite", readonly=True) as catalog:
        (run,) = catalog.runs().values()
        rows = catalog.images()
    assert run["channels_last"] is True
    # The same jobs in the plain layout: the same pictures up to the last bit of a channel.
    plain = _study(tiny_checkpoint, tmp_path / "plain", seeds="2 random")
    run_study(plain, quiet(plain, batch_size=2))
    with Catalog.open(tmp_path / "plain" / "runs" / "t" / "catalog.sqlite", readonly=True) as catalog:
        (plain_run,) = catalog.runs().values()
        plain_rows = catalog.images()
    assert plain_run["channels_last"] is False
    by_job = sorted(rows, key=lambda r: r["job_id"]), sorted(plain_rows, key=lambda r: r["job_id"])
    for a, b in zip(*by_job, strict=True):
        assert a["job_id"] == b["job_id"]
        pixels_a = np.asarray(Image.open(tmp_path / "runs" / "t" / a["path"]), dtype=int)
        pixels_b = np.asarray(Image.open(tmp_path / "plain" / "runs" / "t" / b["path"]), dtype=int)
        assert np.abs(pixels_a - pixels_b).max() <= 1


def test_load_model_channels_last_stores_the_unet_and_the_vae_so(tiny_checkpoint: Path) -> None:
    components = load_model(tiny_checkpoint, channels_last=True)
    for module in (components.unet, components.vae.decoder):
        weight = module.conv_in.weight
        assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    plain = load_model(tiny_checkpoint)
    assert plain.unet.conv_in.weight.is_contiguous() and plain.vae.decoder.conv_in.weight.is_contiguous()
