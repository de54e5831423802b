"""/voidprompt/v1 study routes over a study run through the API."""

from __future__ import annotations

import csv as csv_module
import io
import sys
from pathlib import Path

import httpx
import pytest

from voidprompt.lab.catalog import Catalog
from voidprompt.lab.run import run_study
from voidprompt.lab.study import load_study
from voidprompt.server.api import _status_for
from voidprompt.server.studies import ReportUnavailableError, StudyRegistry


def test_list_filter_label_measure(study_server) -> None:  # type: ignore[no-untyped-def]
    with httpx.Client(base_url=study_server.url, timeout=60) as http:
        study = http.get("/voidprompt/v1/studies/smoke").json()
        assert study["images"] == 12 and study["jobs"] == 12
        baseline = study["labeled"]  # the browser test may have labeled some already
        assert study["classes"] == ["Pattern", "Object or Scenery", "Malformed human", "Legit human"]
        assert study["axes"] == ["size", "W", "seed"]
        everything = http.get("/voidprompt/v1/studies/smoke/images").json()
        assert everything["total"] == 12 and everything["axes"]["W"] == [1.0, 1.5]
        only = http.get(
            "/voidprompt/v1/studies/smoke/images", params={"where": ["W=1.5", "size=64x32"]}
        ).json()
        assert only["total"] == 3
        assert all(
            im["axis_values"]["W"] == 1.5 and im["axis_values"]["size"] == "64x32" for im in only["images"]
        )
        first = only["images"][0]
        png = http.get(first["url"])
        assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
        detail = http.get(f"/voidprompt/v1/studies/smoke/images/{first['id']}").json()
        assert "Seed: " in detail["infotext"] and detail["measures"]
        measures = http.get("/voidprompt/v1/studies/smoke/measures").json()
        assert set(measures[str(first["id"])]) == set(detail["measures"])

        before = http.get("/voidprompt/v1/studies/smoke/images", params={"unlabeled": "true"}).json()
        first = before["images"][-1]
        r = http.put(f"/voidprompt/v1/studies/smoke/labels/{first['id']}", json={"label_class": "Pattern"})
        assert r.status_code == 200
        r = http.put(f"/voidprompt/v1/studies/smoke/labels/{first['id']}", json={"label_class": "Dragon"})
        assert r.status_code == 400 and "Legit human" in r.json()["detail"]
        assert (
            http.put("/voidprompt/v1/studies/smoke/labels/99999", json={"label_class": "Pattern"}).status_code
            == 404
        )
        labels = http.get("/voidprompt/v1/studies/smoke/labels").json()
        assert labels[str(first["id"])]["human"]["label_class"] == "Pattern"
        unlabeled = http.get("/voidprompt/v1/studies/smoke/images", params={"unlabeled": "true"}).json()
        assert unlabeled["total"] == before["total"] - 1 and unlabeled["labeled"] == baseline + 1
        by_label = http.get("/voidprompt/v1/studies/smoke/images", params={"label": "Pattern"}).json()
        assert first["id"] in [im["id"] for im in by_label["images"]]
        # Saved in the catalog itself, not only in the server.
        catalog_path = study_server.root / "studies" / "runs" / "smoke" / "catalog.sqlite"
        with Catalog.open(catalog_path, readonly=True) as catalog:
            assert catalog.labels(first["id"])["human"][0] == "Pattern"
        # Clearing (the UI's undo to "no label").
        http.put(f"/voidprompt/v1/studies/smoke/labels/{first['id']}", json={"label_class": None})
        assert http.get("/voidprompt/v1/studies/smoke").json()["labeled"] == baseline
        assert http.get("/voidprompt/v1/studies/smoke/images", params={"where": "nope=1"}).status_code == 400


def test_start_and_stop_a_run(study_server, tiny_checkpoint, study_writer, caplog) -> None:  # type: ignore[no-untyped-def]
    import logging
    import time

    caplog.set_level(logging.INFO, logger="voidprompt.server.studies")

    # 2400 images of 2 steps: far more than a fast machine makes in the 3 s before the stop (240 of 1
    # step once finished in time, and the test failed on a free machine).
    study_writer(study_server.root / "studies", tiny_checkpoint, name="long", seeds=600, steps=2)
    with httpx.Client(base_url=study_server.url, timeout=60) as http:
        assert http.post("/voidprompt/v1/studies/long/run").status_code == 200
        assert http.post("/voidprompt/v1/studies/long/run").status_code == 409  # already running
        # Stopped once it is generating (the interrupt that lands while it is still starting is
        # test_a_swallowed_interrupt_is_sent_again's).
        deadline = time.monotonic() + 60
        while http.get("/voidprompt/v1/studies/long").json().get("images", 0) == 0:
            assert time.monotonic() < deadline, "the run made no image in 60 s"
            time.sleep(0.2)
        stopped = http.post("/voidprompt/v1/studies/long/stop").json()
        assert stopped["running"] is False
        # Stopping is an ordinary end: one line from the run and one in the server's log, no traceback.
        assert stopped["returncode"] == 130
        assert "Traceback" not in stopped["log_tail"] and "KeyboardInterrupt" not in stopped["log_tail"]
        assert stopped["log_tail"].strip().splitlines()[-1] == "voidprompt: interrupted"
        stop_lines = [r.getMessage() for r in caplog.records if "run stopped" in r.getMessage()]
        assert stop_lines == ["study long: run stopped (exit code 130); its finished images are kept, run "
                              "it again to resume"]  # fmt: skip
        assert http.get("/voidprompt/v1/studies/long/run").json()["running"] is False
        study = http.get("/voidprompt/v1/studies/long").json()
        assert study["jobs"] in (0, 2400) and study["images"] < 2400
        assert http.post("/voidprompt/v1/studies/nope/run").status_code == 404


def test_a_swallowed_interrupt_is_sent_again() -> None:
    """A run that ignores its first SIGINT (a library's catch-all handler took it while the run was
    starting) is interrupted again, and stops with its own exit code, not a terminate."""
    import subprocess
    import time

    from voidprompt.server.studies import INTERRUPT_REPEAT_S, RunHandle, StudyEntry, StudyRegistry

    child = (
        "import signal, sys, time\n"
        "hits = []\n"
        "def on_int(*_):\n"
        "    hits.append(1)\n"
        "    if len(hits) == 2: sys.exit(130)\n"
        "signal.signal(signal.SIGINT, on_int)\n"
        "print('ready', flush=True)\n"
        "while True: time.sleep(0.05)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline().strip() == "ready"
    registry = StudyRegistry(None)
    registry.runs["s"] = RunHandle(process)
    started = time.monotonic()
    handle = registry.stop_run(StudyEntry("s", None, None), timeout=10)
    assert handle is not None and handle.process.returncode == 130
    # Stopped by the second SIGINT, one repeat after the first.
    assert INTERRUPT_REPEAT_S * 0.9 < time.monotonic() - started < INTERRUPT_REPEAT_S + 2


def _png_size(data: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.size


def test_report_built_served_and_rebuilt_when_out_of_date(study_server) -> None:  # type: ignore[no-untyped-def]
    base = "/voidprompt/v1/studies/smoke/report"
    report_dir = study_server.root / "studies" / "runs" / "smoke" / "report"
    with httpx.Client(base_url=study_server.url, timeout=300) as http:
        built = http.post(base)
        assert built.status_code == 200, built.text
        report = built.json()
        assert report["study"] == "smoke" and report["built"] is True
        names = [f["name"] for f in report["figures"]]
        assert names and all(n.endswith(".png") for n in names)
        # Exactly the PNG figures the lab wrote, in its folder.
        assert set(names) == {p.name for p in (report_dir / "figures").glob("*.png")}
        assert any(f["kind"] != "grid" for f in report["figures"])  # plots, not only grid pages
        for figure in report["figures"]:
            png = http.get(figure["url"])
            assert png.status_code == 200 and png.headers["content-type"] == "image/png"
            width, height = _png_size(png.content)
            assert width > 0 and height > 0
            assert png.content == (report_dir / "figures" / figure["name"]).read_bytes()
            if figure["svg_url"]:
                svg = http.get(figure["svg_url"])
                assert svg.status_code == 200 and b"<svg" in svg.content[:2000]
        page = http.get(report["html_url"])
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "<html" in page.text[:200]
        assert {f["name"] for f in report["files"]} >= {"report.html", "images.csv"}
        csv = http.get(next(f["url"] for f in report["files"] if f["name"] == "images.csv"))
        assert csv.status_code == 200
        assert len(list(csv_module.reader(io.StringIO(csv.text)))) == 13  # header + 12 images

        # Nothing changed: the same report comes back without being redrawn.
        again = http.get(base).json()
        assert again["built"] is False and again["generated"] == report["generated"]
        assert again["figures"] == report["figures"]

        _no_escape(http, study_server.root, base, report_dir)

        # A new label makes it out of date; the next visit rebuilds it.
        images = http.get("/voidprompt/v1/studies/smoke/images").json()["images"]
        target = images[0]
        previous = (target["labels"].get("human") or {}).get("label_class")
        choice = "Legit human" if previous != "Legit human" else "Pattern"
        url = f"/voidprompt/v1/studies/smoke/labels/{target['id']}"
        assert http.put(url, json={"label_class": choice}).is_success
        try:
            assert http.get(base).json()["built"] is True
            assert http.get(base).json()["built"] is False
        finally:
            http.put(url, json={"label_class": previous})


def _no_escape(http: httpx.Client, root: Path, base: str, report_dir: Path) -> None:
    """Report files cannot be used to read anything outside the report folder."""
    # A link placed in the figures folder that points out of it is not served.
    link = report_dir / "figures" / "outside.png"
    link.unlink(missing_ok=True)
    link.symlink_to(root / "studies" / "runs" / "smoke" / "catalog.sqlite")
    try:
        for path in (
            f"{base}/figures/outside.png",
            f"{base}/figures/..%2F..%2Fcatalog.sqlite",
            f"{base}/figures/%2E%2E",
            f"{base}/..%2Fcatalog.sqlite",
            f"{base}/%2e%2e%2f%2e%2e%2fsmoke.toml",
            f"{base}/.voidprompt-server-report.json",  # the server's own stamp stays private
            f"{base}/figures/nope.png",
            f"{base}/figures",
            "/voidprompt/v1/studies/nope/report",
            "/voidprompt/v1/studies/nope/report/report.html",
            "/voidprompt/v1/studies/..%2F..%2Fetc/report",
        ):
            r = http.get(path)
            assert r.status_code == 404, (path, r.status_code, r.text[:200])
            assert "SQLite" not in r.text and "[study]" not in r.text
    finally:
        link.unlink()
    assert http.get(f"{base}/report.html").status_code == 200


def test_report_of_a_study_without_images_is_a_clear_error(study_server, study_writer) -> None:  # type: ignore[no-untyped-def]
    study_writer(study_server.root / "studies", None, name="unrun", seeds=1)
    with httpx.Client(base_url=study_server.url, timeout=60) as http:
        assert http.get("/voidprompt/v1/studies").status_code == 200
        r = http.get("/voidprompt/v1/studies/unrun/report")
        assert r.status_code == 404 and "start a run first" in r.json()["detail"]


def test_report_without_matplotlib_is_a_501_naming_the_lab_extra(  # type: ignore[no-untyped-def]
    tmp_path: Path, tiny_checkpoint: Path, study_writer, monkeypatch: pytest.MonkeyPatch
) -> None:
    study = load_study(study_writer(tmp_path, tiny_checkpoint, seeds=1, steps=1))
    run_study(study, study.run.override(progress=False))
    registry = StudyRegistry(tmp_path)
    # As if the lab extra were not installed: the report imports matplotlib when it draws a plot.
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    missing = r"\(matplotlib is missing\).*voidprompt\[lab\]"
    with pytest.raises(ReportUnavailableError, match=missing) as caught:
        registry.report(registry.get("smoke"))
    assert _status_for(caught.value) == 501


def test_a_catalog_whose_run_has_not_made_its_tables_yet_has_no_images(  # type: ignore[no-untyped-def]
    tmp_path: Path, tiny_checkpoint: Path, study_writer
) -> None:
    import sqlite3

    from voidprompt.lab.catalog import catalog_path_beside

    study_file = study_writer(tmp_path, tiny_checkpoint, seeds=1, steps=1)
    catalog = catalog_path_beside(study_file)
    catalog.parent.mkdir(parents=True)
    # What a run that has just started leaves for a moment: the file, without its tables.
    sqlite3.connect(catalog).close()
    registry = StudyRegistry(tmp_path)
    summary = registry.summary(registry.get("smoke"))
    assert (summary["images"], summary["jobs"], summary["labeled"], summary["name"]) == (0, 0, 0, "smoke")
