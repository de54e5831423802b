"""`voidprompt study` subcommands through voidprompt.lab.cli.main."""

from pathlib import Path

import pytest
from lab_helpers import study_text

from voidprompt.lab.cli import main


def test_cli_check_run_ls_show_report_labels(tiny_checkpoint: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    study = tmp_path / "t.toml"
    study.write_text(study_text(tiny_checkpoint, sizes="16x16", seeds="1", labels='labeler = "detector"'))
    assert main(["check", str(study)]) == 0
    out = capsys.readouterr().out
    assert "study t: 2 jobs" in out and "16x16: 2 jobs" in out and "unknown until" in out
    assert main(["run", str(study), "--no-progress", "--max-jobs", "1"]) == 0
    assert "1 images in 1 batches" in capsys.readouterr().out
    assert main(["check", str(study)]) == 0
    assert "estimated time: 0h" in capsys.readouterr().out
    assert main(["run", str(study), "--no-progress"]) == 0
    assert "1 were already done" in capsys.readouterr().out
    assert main(["ls", str(study)]) == 0
    assert "jobs: 2 (2 done, 0 pending, 0 failed)" in capsys.readouterr().out
    assert main(["show", str(study), "1"]) == 0
    assert '"luminance"' in capsys.readouterr().out
    assert main(["labels", "export", str(study), str(tmp_path / "l.csv")]) == 0
    assert (tmp_path / "l.csv").read_text().count("\n") == 3
    assert main(["report", str(study), "--out", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "report.html").is_file()
    assert main(["show", str(study), "nope"]) == 2


def test_cli_reports_study_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[axes]\ncfg = 'x-y'\n")
    assert main(["check", str(bad)]) == 2
    assert "bad.toml" in capsys.readouterr().err


def test_run_flags_win_over_the_study_files_run_table(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from voidprompt.lab import cli
    from voidprompt.lab.run import RunReport
    from voidprompt.lab.schema import RunOptions

    seen: list[RunOptions] = []

    def capture(study: object, options: RunOptions, plugins: object) -> RunReport:
        seen.append(options)
        return RunReport(tmp_path / "c.sqlite", 0, 0, 0, 0, 0.0)

    monkeypatch.setattr(cli, "run_study", capture)
    study = tmp_path / "t.toml"
    run_table = '[run]\ndevice = "cuda"\nprecision = "fp16"\ncompile = true\ndeterministic = true\n[labels]'
    study.write_text(study_text(tiny_checkpoint, sizes="16x16", seeds="1").replace("[labels]", run_table))
    assert main(["run", str(study), "--no-progress"]) == 0
    assert main(["run", str(study), "--no-progress", "--device", "cpu", "--precision", "bf16", "--no-compile",
                 "--no-deterministic", "--executor", "ray", "--gpus-per-worker", "0.5"]) == 0  # fmt: skip
    file, flags = ((o.device, o.precision, o.compile, o.deterministic) for o in seen)
    assert file == ("cuda", "fp16", True, True)
    assert flags == ("cpu", "bf16", False, False)
    assert (seen[1].executor, seen[1].gpus_per_worker) == ("ray", 0.5)
