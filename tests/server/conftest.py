"""A real uvicorn server on a free loopback port, in a background thread, over tiny checkpoints."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


@dataclass
class RunningServer:
    url: str
    port: int
    app: object
    root: Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(config: object) -> Iterator[RunningServer]:
    import uvicorn

    from voidprompt.server.api import ServerConfig, create_app

    assert isinstance(config, ServerConfig)
    app = create_app(config)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=config.port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield RunningServer(f"http://127.0.0.1:{config.port}", config.port, app, Path("."))
    finally:
        server.should_exit = True
        thread.join(15)


def make_config(root: Path, checkpoint: Path, **changes: object) -> object:
    from voidprompt.server.api import ServerConfig
    from voidprompt.server.limits import Limits

    ckpt_dir = root / "models" / "Stable-diffusion"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if not (ckpt_dir / "tiny.safetensors").exists():
        shutil.copy(checkpoint, ckpt_dir / "tiny.safetensors")
    config = ServerConfig(
        host="127.0.0.1",
        port=free_port(),
        ckpt_dirs=[ckpt_dir],
        vae_dirs=[root / "models" / "VAE"],
        default_model="tiny.safetensors",
        studies_dir=root / "studies",
        limits=Limits(max_pixels=512 * 512, max_steps=20, max_batch_size=4, max_body_bytes=2 * 1024 * 1024,
                      max_input_pixels=1024 * 1024),
        threads=1,  # two shared cores: keep torch from oversubscribing them
    )
    for key, value in changes.items():
        setattr(config, key, value)
    return config


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("server")
    (root / "studies").mkdir()
    config = make_config(root, tiny_checkpoint)
    for running in start_server(config):
        running.root = root
        yield running


@pytest.fixture(scope="session")
def server_tools():  # type: ignore[no-untyped-def]
    """(make_config, start_server) for tests that need a server of their own."""
    return make_config, start_server
