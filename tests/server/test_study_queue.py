"""The lab's HTTP routes without a study run: designing (check, save, infotext), the queue's
refusals, order and file, and comparing two images of a catalog made in-process."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from voidprompt.lab.catalog import catalog_path_beside
from voidprompt.lab.design import DesignForm, form_to_toml
from voidprompt.server.limits import Limits
from voidprompt.server.studies import StudyRegistry
from voidprompt.server.study_queue import QUEUE_FILE, StudyQueue


@pytest.fixture
def lab_server(server):  # type: ignore[no-untyped-def]
    """The session's tiny-checkpoint server (its limits: 512x512 pixels, 20 steps)."""
    return server


def form(**axes: object) -> dict[str, object]:
    return {
        "fields": {"prompt": "a red ball", "negative_prompt": "", "steps": 1, "width": 64, "height": 64,
                   "sampler_name": "Euler", "seed": 5, "batch_size": 1},
        "axes": axes,
    }  # fmt: skip


def model_of(server) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {"checkpoint": str(server.root / "models" / "Stable-diffusion" / "tiny.safetensors")}


def test_check_a_form_answers_jobs_axes_and_shapes(lab_server) -> None:  # type: ignore[no-untyped-def]
    body = form(cfg_scale="3, 5, 7", seed="2 random", size="64x64, 64x32")
    body["model"] = model_of(lab_server)
    with httpx.Client(base_url=lab_server.url, timeout=60) as http:
        r = http.post("/voidprompt/v1/design/check", json={"name": "cfg", "form": body})
    assert r.status_code == 200, r.text
    check = r.json()
    assert check["valid"] is True and check["error"] is None
    assert check["jobs"] == 3 * 2 * 2
    assert check["axes"]["cfg_scale"] == [3, 5, 7]
    assert len(check["axes"]["seed"]) == 2 and all(isinstance(s, int) for s in check["axes"]["seed"])
    assert check["shapes"] == [{"width": 64, "height": 32, "jobs": 6}, {"width": 64, "height": 64, "jobs": 6}]
    assert check["estimated_seconds"] is None  # nothing measured yet: no catalog
    # The form's fixed seed and size give way to the axes of the same name; prompt goes to [prompt].
    assert "seed = 5" not in check["toml"] and 'positive = "a red ball"' in check["toml"]
    assert "batch_size" not in check["toml"]


def test_an_invalid_axis_is_reported_at_its_field_with_study_checks_message(  # type: ignore[no-untyped-def]
    lab_server, tmp_path: Path, capsys
) -> None:
    from voidprompt.lab.cli import main

    body = form(cfg_scale="3, 5, x")
    body["model"] = model_of(lab_server)
    with httpx.Client(base_url=lab_server.url, timeout=60) as http:
        check = http.post("/voidprompt/v1/design/check", json={"name": "bad", "form": body}).json()
        assert check["valid"] is False and check["field"] == "[axes] cfg_scale"
        # The same words `voidprompt study check` prints for the same file.
        path = tmp_path / "bad.toml"
        path.write_text(check["toml"], encoding="utf-8")
        assert main(["check", str(path)]) == 2
        assert capsys.readouterr().err.strip() == f"error: {path}: {check['error']}"
        # Neither toml nor form, or both: the request itself is wrong.
        assert http.post("/voidprompt/v1/design/check", json={"name": "x"}).status_code == 400
        unknown = http.post("/voidprompt/v1/design/check", json={"name": "x", "toml": "[study]\nnmae = 1\n"})
        assert unknown.json()["field"] == "[study] nmae" and "name" in unknown.json()["error"]


def test_save_writes_the_study_once_and_refuses_bad_names(lab_server) -> None:  # type: ignore[no-untyped-def]
    body = form(cfg_scale="3, 7")
    body["model"] = model_of(lab_server)
    with httpx.Client(base_url=lab_server.url, timeout=60) as http:
        saved = http.post("/voidprompt/v1/design/save", json={"name": "saved-one", "form": body})
        assert saved.status_code == 200, saved.text
        assert saved.json()["study"] == "saved-one" and saved.json()["jobs"] == 2
        path = lab_server.root / "studies" / "saved-one.toml"
        first = path.read_text(encoding="utf-8")
        assert (
            first
            == http.post("/voidprompt/v1/design/check", json={"name": "saved-one", "form": body}).json()[
                "toml"
            ]
        )
        assert "saved-one" in [s["id"] for s in http.get("/voidprompt/v1/studies").json()]
        body["axes"] = {"cfg_scale": "3, 5, 7"}
        again = http.post("/voidprompt/v1/design/save", json={"name": "saved-one", "form": body})
        assert again.status_code == 409 and "overwrite=true" in again.json()["detail"]
        assert path.read_text(encoding="utf-8") == first
        replaced = http.post(
            "/voidprompt/v1/design/save", json={"name": "saved-one", "form": body, "overwrite": True}
        )
        assert replaced.status_code == 200 and replaced.json()["jobs"] == 3
        for name in ("../escape", "a/b", ".hidden", ""):
            r = http.post("/voidprompt/v1/design/save", json={"name": name, "form": body})
            assert r.status_code == 400 and "letters, digits" in r.json()["detail"], name
        assert not (lab_server.root / "escape.toml").exists()
        invalid = http.post("/voidprompt/v1/design/save", json={"name": "broken", "form": form(W="1, 2")})
        assert invalid.status_code == 400 and "[axes] W" in invalid.json()["detail"]
        assert not (lab_server.root / "studies" / "broken.toml").exists()


def test_fields_from_an_infotext(lab_server) -> None:  # type: ignore[no-untyped-def]
    infotext = (
        "a red ball, <lora:x:0.5>\nNegative prompt: lowres\n"
        "Steps: 3, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 4.5, Seed: 77, Size: 64x32, "
        "Clip skip: 2"
    )
    with httpx.Client(base_url=lab_server.url, timeout=60) as http:
        fields = http.post("/voidprompt/v1/design/from-infotext", json={"infotext": infotext}).json()[
            "fields"
        ]
        assert fields["prompt"] == "a red ball, <lora:x:0.5>" and fields["negative_prompt"] == "lowres"
        assert (fields["steps"], fields["cfg_scale"], fields["seed"]) == (3, 4.5, 77)
        assert (fields["width"], fields["height"], fields["clip_skip"]) == (64, 32, 2)
        assert (fields["sampler_name"], fields["scheduler"]) == ("DPM++ 2M", "Karras")
        # What A1111's reader fills in for img2img, at the request's defaults, is left out.
        assert "inpainting_fill" not in fields and "inpaint_full_res" not in fields
        bad = http.post(
            "/voidprompt/v1/design/from-infotext",
            json={"infotext": "x\nSteps: many, Sampler: Euler, Seed: 1"},
        )
        assert bad.status_code == 400 and "Steps" in bad.json()["detail"]


def write_form_study(server, name: str, **axes: object) -> None:  # type: ignore[no-untyped-def]
    body = form(**axes)
    body["model"] = model_of(server)
    with httpx.Client(base_url=server.url, timeout=60) as http:
        r = http.post("/voidprompt/v1/design/save", json={"name": name, "form": body, "overwrite": True})
        assert r.status_code == 200, r.text


def test_queue_order_limits_and_one_catalog(lab_server) -> None:  # type: ignore[no-untyped-def]
    for name in ("qa", "qb", "qc"):
        write_form_study(lab_server, name, cfg_scale="3, 7")
    # Written directly: saving it over HTTP would expand its 10,001 jobs once more.
    many_form = DesignForm(
        "too-many", form()["fields"], {"seed": f"{Limits().max_study_jobs + 1} random"}, {}
    )
    (lab_server.root / "studies" / "too-many.toml").write_text(form_to_toml(many_form), encoding="utf-8")
    write_form_study(lab_server, "too-big", size="64x64, 1024x512")
    studies = lab_server.root / "studies"
    # A study whose catalog folder is another's: both would write one catalog.
    write_form_study(lab_server, "twin", cfg_scale="4")
    (studies / "runs").mkdir(exist_ok=True)
    (studies / "runs" / "twin").symlink_to(studies / "runs" / "qa", target_is_directory=True)
    (studies / "runs" / "qa").mkdir(exist_ok=True)
    with httpx.Client(base_url=lab_server.url, timeout=60) as http:
        for name in ("qa", "qb", "qc"):
            r = http.post("/voidprompt/v1/queue", json={"study": name, "paused": True})
            assert r.status_code == 200, r.text
            assert r.json()["state"] == "paused" and r.json()["total"] == 2 and r.json()["done"] == 0
        again = http.post("/voidprompt/v1/queue", json={"study": "qa", "paused": True})
        assert again.status_code == 409 and "already in the queue" in again.json()["detail"]
        twin = http.post("/voidprompt/v1/queue", json={"study": "twin", "paused": True})
        assert twin.status_code == 409 and "two studies cannot write one catalog" in twin.json()["detail"]
        many = http.post("/voidprompt/v1/queue", json={"study": "too-many", "paused": True})
        limit = Limits().max_study_jobs
        assert many.status_code == 400
        assert f"{limit + 1} jobs, over this server's limit of {limit}" in many.json()["detail"]
        big = http.post("/voidprompt/v1/queue", json={"study": "too-big", "paused": True})
        assert big.status_code == 400
        assert "size=1024x512" in big.json()["detail"] and "--max-pixels" in big.json()["detail"]
        assert http.post("/voidprompt/v1/queue", json={"study": "nope"}).status_code == 404

        assert http.post("/voidprompt/v1/queue/qc/move", json={"position": 0}).json() == ["qc", "qa", "qb"]
        assert http.post("/voidprompt/v1/queue/qa/move", json={"position": 99}).json() == ["qc", "qb", "qa"]
        snapshot = http.get("/voidprompt/v1/queue").json()
        assert [i["study"] for i in snapshot["items"]] == ["qc", "qb", "qa"] and snapshot["running"] is None
        # The order and states are in the studies folder's queue file: a new server reads them back.
        saved = json.loads((studies / QUEUE_FILE).read_text(encoding="utf-8"))
        assert [(i["study"], i["state"]) for i in saved["items"]] == [("qc", "paused"), ("qb", "paused"),
                                                                       ("qa", "paused")]  # fmt: skip
        reread = StudyQueue(StudyRegistry(studies), Limits())
        order = [(i.study, i.state, i.total) for i in reread.items]
        assert order == [("qc", "paused", 2), ("qb", "paused", 2), ("qa", "paused", 2)]
        reread.close()
        # Resuming reads the study file again: edited past the limits since, it stays where it is.
        write_form_study(lab_server, "qb", size="1024x512")
        edited = http.post("/voidprompt/v1/queue/qb/resume")
        assert edited.status_code == 400 and "size=1024x512" in edited.json()["detail"]
        assert [i["state"] for i in http.get("/voidprompt/v1/queue").json()["items"]] == ["paused"] * 3
        cancelled = http.post("/voidprompt/v1/queue/qb/cancel").json()
        assert cancelled["state"] == "cancelled"
        assert http.post("/voidprompt/v1/queue/qb/cancel").status_code == 400
        assert http.delete("/voidprompt/v1/queue/qb").json() == ["qc", "qa"]
        assert http.post("/voidprompt/v1/queue/qb/pause").status_code == 404
        for name in ("qc", "qa"):
            assert http.delete(f"/voidprompt/v1/queue/{name}").status_code == 200
        assert http.get("/voidprompt/v1/queue").json()["items"] == []


def test_compare_two_images(lab_server) -> None:  # type: ignore[no-untyped-def]
    from voidprompt.lab.run import run_study
    from voidprompt.lab.study import load_study

    write_form_study(lab_server, "cmp", cfg_scale="3, 7")
    path = lab_server.root / "studies" / "cmp.toml"
    study = load_study(path)
    run_study(study, study.run.override(progress=False, catalog=catalog_path_beside(path)))
    with httpx.Client(base_url=lab_server.url, timeout=60) as http:
        images = http.get("/voidprompt/v1/studies/cmp/images").json()["images"]
        low, high = sorted(images, key=lambda i: i["axis_values"]["cfg_scale"])
        r = http.get(
            "/voidprompt/v1/compare", params={"a_study": "cmp", "a_image": low["id"], "b_image": high["id"]}
        )
        assert r.status_code == 200, r.text
        compared = r.json()
        assert compared["differences"] == {"cfg_scale": [3, 7], "axis:cfg_scale": [3, 7]}
        assert compared["a"]["settings"]["seed"] == compared["b"]["settings"]["seed"] == 5
        assert http.get(compared["b"]["url"]).content[:4] == b"\x89PNG"
        missing = http.get("/voidprompt/v1/compare", params={"a_study": "cmp", "a_image": 1, "b_image": 999})
        assert missing.status_code == 404


def test_the_lab_routes_are_in_the_openapi_page(lab_server) -> None:  # type: ignore[no-untyped-def]
    with httpx.Client(base_url=lab_server.url, timeout=60) as http:
        paths = http.get("/openapi.json").json()["paths"]
    queue = "/voidprompt/v1/queue"
    wanted = [
        queue,
        f"{queue}/events",
        *(f"{queue}/{{study_id}}/{verb}" for verb in ("pause", "resume", "cancel", "move")),
    ]
    wanted += [f"/voidprompt/v1/design/{name}" for name in ("check", "save", "from-infotext")]
    for path in [*wanted, "/voidprompt/v1/compare"]:
        assert path in paths, path
