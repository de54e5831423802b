"""Real uvicorn servers on free loopback ports, in background threads.

``server`` serves a tiny random checkpoint (fast; for protocol, client and abuse tests);
``mini_server`` serves the repository's miniature model (a real 64x64 SD1 model) and its studies,
for the browser, load and study tests. Tests never depend on the miniature model's pixel values:
its weights may be retrained at any time.
"""

from __future__ import annotations

import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from voidprompt.explain.record import CallInfo, Explanation, Preview, TagInfo

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

    from voidprompt.server.api import create_app
    from voidprompt.server.serving import uvicorn_config
    from voidprompt.server.state import ServerConfig

    assert isinstance(config, ServerConfig)
    app = create_app(config)
    # `voidprompt serve`'s own uvicorn settings, connection bounds included.
    settings = uvicorn_config(
        app, host="127.0.0.1", port=config.port, limits=config.limits, log_level="warning"
    )
    server = uvicorn.Server(settings)
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


def make_config(root: Path, checkpoint: Path | None, **changes: object) -> object:
    """A test server's config under ``root``: ``checkpoint`` copied in as tiny.safetensors (None:
    no checkpoint folder content; pass extra_checkpoints / default_model instead)."""
    from voidprompt.server.limits import Limits
    from voidprompt.server.state import ServerConfig

    ckpt_dir = root / "models" / "Stable-diffusion"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if checkpoint is not None and not (ckpt_dir / "tiny.safetensors").exists():
        shutil.copy(checkpoint, ckpt_dir / "tiny.safetensors")
    config = ServerConfig(
        host="127.0.0.1",
        port=free_port(),
        ckpt_dirs=[ckpt_dir],
        vae_dirs=[root / "models" / "VAE"],
        lora_dir=root / "models" / "Lora",
        embeddings_dir=root / "embeddings",
        hypernetwork_dir=root / "models" / "hypernetworks",
        default_model="tiny.safetensors" if checkpoint is not None else None,
        studies_dir=root / "studies",
        limits=Limits(
            max_pixels=512 * 512,
            max_steps=20,
            max_batch_size=4,
            max_body_bytes=2 * 1024 * 1024,
            max_input_pixels=1024 * 1024,
        ),
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
def mini_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A server whose only checkpoint is the shipped miniature model (used in place, not copied)."""
    from voidprompt.demo.miniature import miniature_model_path

    path = miniature_model_path()
    root = tmp_path_factory.mktemp("mini-server")
    (root / "studies").mkdir()
    config = make_config(root, None, extra_checkpoints=[path], default_model=path.name)
    for running in start_server(config):
        running.root = root
        yield running


@pytest.fixture(scope="session")
def server_tools():  # type: ignore[no-untyped-def]
    """(make_config, start_server) for tests that need a server of their own."""
    return make_config, start_server


REPO = Path(__file__).resolve().parents[2]


def write_study(
    folder: Path, checkpoint: Path | None, name: str = "smoke", seeds: int = 3, steps: int = 1
) -> Path:
    """The repository's smoke study (2 sizes x 2 W x ``seeds`` seeds, ``steps`` steps) on
    ``checkpoint``; None keeps the study's own model, the miniature one."""
    text = (REPO / "studies" / "smoke.toml").read_text(encoding="utf-8")
    text, found_seed = re.subn(r'(?m)^seed = "\d+ random"', f'seed = "{seeds} random"', text)
    text, found_name = re.subn(r'(?m)^name = "smoke"', f'name = "{name}"', text)
    text, found_steps = re.subn(r"(?m)^steps = \d+", f"steps = {steps}", text)
    # Its sizes are the miniature model's native ones; small ones keep the tests quick. The tests
    # label with the study brief's four classes, not the miniature world's.
    text, found_size = re.subn(r'(?m)^size = ".*"', 'size = "32x32, 64x32"', text)
    classes = '["Pattern", "Object or Scenery", "Malformed human", "Legit human"]'
    text, found_classes = re.subn(r"(?m)^classes = \[.*\]", f"classes = {classes}", text)
    found = (found_seed, found_name, found_steps, found_size, found_classes)
    assert found == (1, 1, 1, 1, 1), "studies/smoke.toml changed its layout"
    if checkpoint is not None:
        text += f'\n[model]\ncheckpoint = "{checkpoint}"\n'
    path = folder / f"{name}.toml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def study_server(mini_server, tiny_checkpoint):  # type: ignore[no-untyped-def]
    """The miniature-model server with the smoke study (on the tiny checkpoint, 2 steps) run to
    completion through the API: 12 images."""
    import httpx

    server = mini_server
    write_study(server.root / "studies", tiny_checkpoint, steps=2)
    with httpx.Client(base_url=server.url, timeout=60) as http:
        studies = http.get("/voidprompt/v1/studies").json()
        assert [s["id"] for s in studies] == ["smoke"]
        started = http.post("/voidprompt/v1/studies/smoke/run", params={"batch_size": 4})
        assert started.status_code == 200, started.text
        deadline = time.monotonic() + 300
        while True:
            status = http.get("/voidprompt/v1/studies/smoke/run").json()
            if not status["running"]:
                break
            assert time.monotonic() < deadline, status
            time.sleep(0.5)
        assert status["returncode"] == 0, status["log_tail"]
    return server


@pytest.fixture(scope="session")
def study_writer():  # type: ignore[no-untyped-def]
    return write_study


# The tiny files' text encoders: SD1's CLIP is 32 wide; SDXL's CLIP-L and bigG are 32 wide each.
SD1_WIDTH = 32
SDXL_L_WIDTH = SDXL_G_WIDTH = 32


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from voidprompt.testing.fake_checkpoints import write_tiny_sdxl_checkpoint

    return write_tiny_sdxl_checkpoint(tmp_path_factory.mktemp("sdxl") / "tiny-xl.safetensors")


@pytest.fixture(scope="session")
def xl_server(tmp_path_factory, tiny_checkpoint, tiny_sdxl, server_tools):  # type: ignore[no-untyped-def]
    """A server whose folder holds the tiny SD1 file (selected), the tiny SDXL file and a tiny SDXL
    refiner, with an SD1 embedding and an SDXL clip_l + clip_g one."""
    import torch
    from safetensors.torch import save_file

    from voidprompt.testing.fake_checkpoints import write_tiny_sdxl_checkpoint

    make_config, start_server = server_tools
    root = tmp_path_factory.mktemp("xl-server")
    (root / "studies").mkdir()
    config = make_config(root, tiny_checkpoint)
    shutil.copy(tiny_sdxl, root / "models" / "Stable-diffusion" / "tiny-xl.safetensors")
    write_tiny_sdxl_checkpoint(
        root / "models" / "Stable-diffusion" / "tiny-refiner.safetensors", refiner=True
    )
    emb = root / "embeddings"
    emb.mkdir()
    g = torch.Generator().manual_seed(3)
    save_file({"emb_params": torch.randn(2, SD1_WIDTH, generator=g)}, str(emb / "sdonestyle.safetensors"))
    save_file(
        {
            "clip_l": torch.randn(3, SDXL_L_WIDTH, generator=g),
            "clip_g": torch.randn(3, SDXL_G_WIDTH, generator=g),
        },
        str(emb / "xlstyle.safetensors"),
    )
    for running in start_server(config):
        running.root = root
        yield running


class SyntheticExplanation:
    """A hand-made explanation whose numbers are known: two tags (``positive:red ball``, weight 1;
    ``negative:lowres``, weight 1.3) with one bright cell each, windows all / early, and two calls of
    which the second ran no negative prompt (no uncond pass: no negative preview, no difference)."""

    side: ClassVar[int] = 16
    peak_positive: ClassVar[tuple[int, int]] = (3, 12)
    peak_negative: ClassVar[tuple[int, int]] = (10, 2)

    def build(self, height: int | None = None, width: int | None = None) -> Explanation:
        h, w = height or self.side, width or self.side
        maps = np.full((2, 2, h, w), 0.01, dtype=np.float32)
        maps[0, :, self.peak_positive[0] % h, self.peak_positive[1] % w] = 1.0
        maps[1, :, self.peak_negative[0] % h, self.peak_negative[1] % w] = 0.5
        red = np.zeros((h, w, 3), dtype=np.uint8)
        red[..., 0] = 200
        blue = np.zeros_like(red)
        blue[..., 2] = 180
        ramp = np.linspace(0, 1, h * w, dtype=np.float32).reshape(h, w)
        return Explanation(
            latent_size=(h, w),
            windows=("all", "early"),
            window_calls={"all": (0, 1), "early": (0,)},
            tags=(
                TagInfo("positive", 0, "red ball", 1.0, ("red", "ball")),
                TagInfo("negative", 0, "lowres", 1.3, ("lowres",)),
            ),
            tag_maps=maps,
            content_share={"positive": {"all": 0.2, "early": 0.2}, "negative": {"all": 0.1, "early": 0.1}},
            calls=(CallInfo("first", 0, 14.6, True, 0.5), CallInfo("first", 1, 1.2, False, None)),
            previews=(Preview(0, red, blue, red, ramp), Preview(1, red, None, blue, None)),
        )


@pytest.fixture(scope="session")
def synthetic() -> SyntheticExplanation:
    return SyntheticExplanation()
