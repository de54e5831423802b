"""A full disk under the server's writes (labels, --outdir images): a 507 naming the place, not a 500."""

from __future__ import annotations

import datetime
import errno
import hashlib
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from PIL import Image

from voidprompt.files import atomic_write_bytes
from voidprompt.lab.catalog import Catalog, DiskFullError
from voidprompt.lab.study import parse_study


@pytest.fixture(scope="module")
def one_image_server(tmp_path_factory: pytest.TempPathFactory, server_tools: Any) -> Iterator[Any]:
    make_config, start_server = server_tools
    root = tmp_path_factory.mktemp("disk-full")
    (root / "studies").mkdir()
    text = '[study]\nname = "one"\nmaster_seed = 1\n[axes]\nseed = "1"'
    job = parse_study(text, "one.toml").expand()[0]
    with Catalog.open(root / "studies" / "one.sqlite") as catalog:
        catalog.register_study("one", text)
        catalog.register_jobs([job])
        final = atomic_write_bytes(catalog.images_dir / f"{job.job_id}.png", b"png")
        digest = hashlib.sha256(b"png").hexdigest()
        catalog.record_image(job.job_id, final, digest, "", seed=1, width=8, height=8)
    for running in start_server(make_config(root, None, ui=False)):
        running.root = root
        yield running


def test_a_label_write_on_a_full_disk_is_a_507_naming_the_catalog(
    one_image_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(*_args: Any, **_kwargs: Any) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(Catalog, "set_label", full)
    url = f"{one_image_server.url}/voidprompt/v1/studies/one/labels/1"
    answer = httpx.put(url, json={"label_class": "defective"}, timeout=10)
    assert answer.status_code == 507, answer.text
    catalog = one_image_server.root / "studies" / "one.sqlite"
    assert answer.json()["detail"] == f"disk full at {catalog}; free space and set the label again"
    monkeypatch.undo()
    assert httpx.put(url, json={"label_class": "defective"}, timeout=10).status_code == 200


def test_saving_generated_images_on_a_full_disk_is_a_disk_full_error_naming_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from voidprompt.server.api import _status_for
    from voidprompt.server.routes import sdapi_generation

    def full(image: Any, where: Path, *_args: Any, **_kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(where / ".partial-1-00000-7.png.tmp"))

    monkeypatch.setattr(sdapi_generation, "save_numbered", full)
    state = SimpleNamespace(config=SimpleNamespace(outdir=tmp_path))
    result = SimpleNamespace(images=[Image.new("RGB", (8, 8))], infotexts=["a"], seeds=[7])
    with pytest.raises(DiskFullError) as caught:
        sdapi_generation._save_images(state, "txt2img", SimpleNamespace(result=result))  # type: ignore[arg-type]
    # The dated folder of A1111's layout (the date of the save, read after it).
    folder = tmp_path / "txt2img-images" / datetime.date.today().isoformat()
    assert str(caught.value) == f"disk full at {folder}; free space and generate again"
    assert _status_for(caught.value) == 507
