"""/voidprompt/v1 study routes over a study run through the API."""

from __future__ import annotations

import httpx

from voidprompt.lab.catalog import Catalog


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


def test_start_and_stop_a_run(study_server, tiny_checkpoint, study_writer) -> None:  # type: ignore[no-untyped-def]
    import time

    study_writer(study_server.root / "studies", tiny_checkpoint, name="long", seeds=60)
    with httpx.Client(base_url=study_server.url, timeout=60) as http:
        assert http.post("/voidprompt/v1/studies/long/run").status_code == 200
        assert http.post("/voidprompt/v1/studies/long/run").status_code == 409  # already running
        time.sleep(3)
        stopped = http.post("/voidprompt/v1/studies/long/stop").json()
        assert stopped["running"] is False
        assert http.get("/voidprompt/v1/studies/long/run").json()["running"] is False
        study = http.get("/voidprompt/v1/studies/long").json()
        assert study["jobs"] in (0, 240) and study["images"] < 240
        assert http.post("/voidprompt/v1/studies/nope/run").status_code == 404
