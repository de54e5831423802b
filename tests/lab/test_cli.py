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
    # After a partial run the estimate covers the pending job only.
    out = capsys.readouterr().out
    assert "estimated time: 0h" in out and out.rstrip().endswith("s for the 1 pending job (1 done)")
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


def _check(tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str]) -> str:
    """``study check`` on ``text``, which must fail: its one-line error. Loading weights fails the test."""
    study = tmp_path / "c.toml"
    study.write_text(text)
    assert main(["check", str(study)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {study}"), err
    return err.strip()


@pytest.fixture
def no_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    import voidprompt.models.load

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("study check loaded weights")

    monkeypatch.setattr(voidprompt.models.load, "load_model", refuse)


def test_check_catches_a_sampler_typo_inside_an_axis(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], no_weights: None
) -> None:
    text = study_text(tiny_checkpoint, sizes="16x16", seeds="1")
    text = text.replace('sampler_name = "Euler a"\n', "").replace(
        'W = "1.0, 1.5"', 'W = "1.0, 1.5"\nsampler_name = "Euler a, DPM++ 2M Karas"'
    )
    err = _check(tmp_path, text, capsys)
    assert "sampler_name='DPM++ 2M Karas' is not known" in err and "did you mean 'DPM++ 2M" in err


def test_check_catches_an_unknown_labeler(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], no_weights: None
) -> None:
    text = study_text(tiny_checkpoint, sizes="16x16", seeds="1", labels='labeler = "detectr"')
    err = _check(tmp_path, text, capsys)
    assert "[labels] labeler = 'detectr' is not registered" in err
    assert err.endswith("; did you mean 'detector'?")


@pytest.mark.parametrize(
    ("labels", "missing"),
    [
        ('labeler = "wd14"\ntagger = "wd"', "wd/model.onnx"),
        ('labeler = "deepdanbooru"\ntagger = "ddb.pt"', "ddb.pt"),
    ],
)
def test_check_catches_a_missing_tagger_file(
    tiny_checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    no_weights: None,
    labels: str,
    missing: str,
) -> None:
    rules = '\nclasses = ["a", "b"]\nfallback = "b"\n[labels.rules]\na = ["x"]'
    text = study_text(tiny_checkpoint, sizes="16x16", seeds="1", labels=labels + rules)
    err = _check(tmp_path, text, capsys)
    assert f"{tmp_path / missing} is missing; place the" in err


def test_check_catches_a_missing_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_weights: None
) -> None:
    text = study_text(tmp_path / "gone.safetensors", sizes="16x16", seeds="1")
    err = _check(tmp_path, text, capsys)
    assert f"[model] checkpoint = '{tmp_path / 'gone.safetensors'}': no file at" in err


@pytest.mark.parametrize(
    ("report", "where", "column", "hint"),
    [
        ('grid = [{ x = "W", y = "sed" }]', "grid #1 y", "sed", "did you mean 'seed' or 'seeds'?"),
        ('plots = [{ x = "cfg" }]', "plots #1 x", "cfg", ""),
        ('outcomes_by = ["sise"]', "outcomes_by", "sise", "did you mean 'size'?"),
        ('grid = [{ x = "W", y = "seed", where = { sizes = "16x16" } }]', "grid #1 where", "sizes", "'size'"),
    ],
)
def test_check_catches_a_report_axis_that_does_not_exist(
    tiny_checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    no_weights: None,
    report: str,
    where: str,
    column: str,
    hint: str,
) -> None:
    text = study_text(tiny_checkpoint, sizes="16x16", seeds="1") + f"[report]\n{report}\n"
    err = _check(tmp_path, text, capsys)
    assert (
        f"[report] {where} = {column!r}: not an axis or measure of this study; choose one of size, W, seed"
        in err
    )
    assert hint in err
    if not hint:
        assert "did you mean" not in err


def test_check_accepts_report_columns_that_are_axes_or_measures(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = (
        '[report]\ngrid = [{ x = "W", y = "seed", where = { size = "16x16" } }]\n'
        'plots = [{ x = "area", split = "W", measures = ["luminance"] }]\noutcomes_by = ["size"]\n'
    )
    study = tmp_path / "ok.toml"
    study.write_text(study_text(tiny_checkpoint, sizes="16x16, 32x16", seeds="2 random") + report)
    assert main(["check", str(study)]) == 0
    out = capsys.readouterr().out
    # The expanded values of each axis.
    assert "  size: 16x16, 32x16\n  W: 1.0, 1.5\n  seed: " in out
