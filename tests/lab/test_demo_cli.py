"""`voidprompt demo`: the demo study end to end (run, pre-labels, report), resumable; the gallery stays."""

from pathlib import Path

import pytest
from lab_helpers import study_text

import voidprompt.demo
from voidprompt.demo.cli import main
from voidprompt.demo.study import default_demo_study
from voidprompt.lab.catalog import Catalog


def test_demo_runs_the_study_then_reports_and_resumes(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    study = tmp_path / "t.toml"
    text = study_text(tiny_checkpoint, sizes="32x32", seeds="3 random", labels='labeler = "detector"')
    study.write_text(text + "[run]\nbatch_size = 2\nthreads = 1\n")
    # A relative output folder, as `make demo` gives (outputs/pure-negative).
    monkeypatch.chdir(tmp_path)
    out = Path("out").absolute()
    assert main(["--study", str(study), "--out", "out", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "6 jobs, 6 images in the catalog (6 generated now, 0 already done)" in printed
    assert "6 images in 4 batches" in printed  # 2 W values x 3 seeds, batches of at most 2
    assert "report: out/report/report.html" in printed
    assert (out / "report" / "report.html").is_file()
    with Catalog.open(out / "catalog.sqlite", readonly=True) as catalog:
        images = catalog.images()
        labels = catalog.all_labels()
    assert len(images) == 6 and {src for per in labels.values() for src in per} == {"detector"}
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "catalog-images").iterdir()}
    # A rerun generates nothing and rewrites no image; the report is built again.
    assert main(["--study", str(study), "--out", "out", "--no-progress"]) == 0
    assert "(0 generated now, 6 already done)" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in (out / "catalog-images").iterdir()} == stamps


def test_demo_errors_and_subcommands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(study_text(tmp_path / "none.safetensors") + "[run]\nbatch_sise = 4\n")
    assert main(["--study", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "[run] batch_sise: unknown key" in capsys.readouterr().err
    # A device this machine lacks, or a worker count that is no number, is refused before anything
    # is written, in one line.
    good = tmp_path / "good.toml"
    good.write_text(study_text(tmp_path / "none.safetensors"))
    for flags, says in (
        (["--device", "cuda:7"], "--device 'cuda:7': "),
        (["--workers", "many"], "workers='many': write a whole number of at least 1, or 'auto'"),
    ):
        assert main(["--study", str(good), "--out", str(tmp_path / "o"), *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"voidprompt demo: {says}") and err.count("\n") == 1
    assert not (tmp_path / "o").exists()
    # The gallery and the trainer keep their own subcommands.
    for sub in ("gallery", "train"):
        with pytest.raises(SystemExit) as exit_info:
            main([sub, "--help"])
        assert exit_info.value.code == 0
        assert f"voidprompt demo {sub}" in capsys.readouterr().out
    assert default_demo_study() == Path(voidprompt.demo.__file__).resolve().parent / "pure-negative.toml"
