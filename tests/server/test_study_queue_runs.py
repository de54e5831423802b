"""The study queue with real study runs (child processes on the tiny checkpoint, 64 px, 1 step):
one at a time in the queue's order, pause and resume with nothing lost or made twice, cancel, live
progress over server-sent events, and a server restarted in the middle of a study."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from voidprompt.server.study_queue import QUEUE_FILE

pytestmark = pytest.mark.slow

Q = "/voidprompt/v1/queue"


def save_study(http: httpx.Client, root: Path, name: str, seeds: int) -> None:
    body = {
        "name": name,
        "overwrite": True,
        "form": {
            "fields": {"prompt": "a ball", "steps": 1, "width": 64, "height": 64, "sampler_name": "Euler"},
            "axes": {"seed": f"{seeds} random"},
            "model": {"checkpoint": str(root / "models" / "Stable-diffusion" / "tiny.safetensors")},
        },
    }
    r = http.post("/voidprompt/v1/design/save", json=body)
    assert r.status_code == 200, r.text


def item(http: httpx.Client, name: str) -> dict[str, Any]:
    return next(i for i in http.get(Q).json()["items"] if i["study"] == name)


def wait_for(what: Callable[[], Any], message: str, timeout: float = 180) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = what()
        if value:
            return value
        assert time.monotonic() < deadline, message
        time.sleep(0.2)


def catalog_counts(root: Path, name: str) -> tuple[int, int, int]:
    """(image rows, distinct job ids among them, image files on disk) of a study's catalog."""
    path = root / "studies" / "runs" / name / "catalog.sqlite"
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        rows, jobs = db.execute("SELECT COUNT(*), COUNT(DISTINCT job_id) FROM images").fetchone()
    files = [p for p in (path.parent / "catalog-images").rglob("*") if p.is_file() and p.suffix == ".png"]
    return rows, jobs, len(files)


def test_one_at_a_time_pause_resume_cancel_reorder_and_events(server) -> None:  # type: ignore[no-untyped-def]
    root = server.root
    events: list[dict[str, Any]] = []
    with httpx.Client(base_url=server.url, timeout=60) as http:
        save_study(http, root, "run-a", 60)
        save_study(http, root, "run-b", 3)
        save_study(http, root, "run-c", 3)
        save_study(http, root, "run-d", 3)

        def listen() -> None:
            with (
                httpx.Client(base_url=server.url, timeout=None) as sse,
                sse.stream("GET", f"{Q}/events") as stream,
            ):
                for line in stream.iter_lines():
                    if line.startswith("data: "):
                        events.append(json.loads(line[len("data: ") :]))
                    if events and any(
                        i["study"] == "run-a" and i["state"] == "done" for i in events[-1]["items"]
                    ):
                        return

        listener = threading.Thread(target=listen, daemon=True)
        listener.start()
        assert http.post(Q, json={"study": "run-a"}).status_code == 200
        assert http.post(Q, json={"study": "run-b"}).status_code == 200
        wait_for(lambda: item(http, "run-a")["done"] >= 3, "run-a made no image")
        snapshot = http.get(Q).json()
        assert snapshot["running"] == "run-a"
        assert item(http, "run-b")["state"] == "queued"  # one study at a time

        paused = http.post(f"{Q}/run-a/pause").json()
        assert paused["state"] == "paused" and 3 <= paused["done"] < 60
        # The next one starts once the first has stopped; run-c and run-d wait behind it, d first.
        assert http.post(Q, json={"study": "run-c"}).status_code == 200
        assert http.post(Q, json={"study": "run-d"}).status_code == 200
        assert http.post(f"{Q}/run-d/move", json={"position": 0}).json()[0] == "run-d"
        wait_for(lambda: item(http, "run-b")["state"] == "done", "run-b did not finish")
        assert item(http, "run-b")["done"] == 3
        wait_for(lambda: item(http, "run-d")["state"] in ("running", "done"), "run-d did not start")
        assert item(http, "run-c")["state"] == "queued"  # reordered: d before c
        wait_for(lambda: item(http, "run-c")["state"] == "running", "run-c did not start")
        cancelled = http.post(f"{Q}/run-c/cancel").json()
        assert cancelled["state"] == "cancelled"
        assert not any(i["state"] == "running" for i in http.get(Q).json()["items"])

        resumed = http.post(f"{Q}/run-a/resume").json()
        assert resumed["state"] == "queued"
        # Resumed again while a pause is still stopping its run: it waits for that run to end.
        before = item(http, "run-a")["done"]
        wait_for(lambda: item(http, "run-a")["done"] > before, "run-a did not resume")
        pausing = threading.Thread(target=lambda: httpx.post(f"{server.url}{Q}/run-a/pause", timeout=60))
        pausing.start()
        wait_for(lambda: item(http, "run-a")["state"] == "paused", "run-a did not pause")
        again = http.post(f"{Q}/run-a/resume")
        assert again.status_code == 200 and again.json()["state"] == "queued", again.text
        pausing.join(60)
        wait_for(lambda: item(http, "run-a")["state"] == "done", "run-a did not finish", timeout=300)
        assert item(http, "run-a")["done"] == 60
        listener.join(30)
    # Paused once and resumed: every job once, each with its file.
    assert catalog_counts(root, "run-a") == (60, 60, 60)
    assert catalog_counts(root, "run-d") == (3, 3, 3)
    # Live progress: the stream carried run-a running with a rate and an ETA, and its end.
    running = [i for e in events for i in e["items"] if i["study"] == "run-a" and i["state"] == "running"]
    assert any(i["images_per_minute"] and i["eta_seconds"] is not None for i in running)
    versions = [e["version"] for e in events]
    assert versions == sorted(versions) and len(set(versions)) == len(versions)


def test_a_restarted_server_resumes_the_study_with_nothing_lost_or_twice(  # type: ignore[no-untyped-def]
    tmp_path: Path, tiny_checkpoint, server_tools
) -> None:
    make_config, start_server = server_tools
    (tmp_path / "studies").mkdir()
    config = make_config(tmp_path, tiny_checkpoint)
    first = start_server(config)
    running = next(first)
    with httpx.Client(base_url=running.url, timeout=60) as http:
        save_study(http, tmp_path, "long", 40)
        assert http.post(Q, json={"study": "long"}).status_code == 200
        wait_for(lambda: item(http, "long")["done"] >= 2, "no image made")
    next(first, None)  # the server stops (its shutdown stops the run)
    saved = json.loads((tmp_path / "studies" / QUEUE_FILE).read_text(encoding="utf-8"))
    assert [(i["study"], i["state"]) for i in saved["items"]] == [("long", "running")]
    made, _jobs, _files = catalog_counts(tmp_path, "long")
    assert 2 <= made < 40

    config.port = server_tools[0](tmp_path, tiny_checkpoint).port
    second = start_server(config)
    running = next(second)
    try:
        with httpx.Client(base_url=running.url, timeout=60) as http:
            after = item(http, "long")
            # Where it stopped: the catalog's images, and in line to resume.
            assert after["done"] == made and after["state"] in ("queued", "running")
            wait_for(lambda: item(http, "long")["state"] == "done", "the study did not finish", timeout=300)
            assert item(http, "long")["done"] == 40
    finally:
        next(second, None)
    assert catalog_counts(tmp_path, "long") == (40, 40, 40)
