"""The RRDBNet loader against spandrel (MIT; A1111 1.10 loads its upscalers through it) on the same
random weights, in both key layouts and the pixel-unshuffle variants.

spandrel imports torchvision for two unrelated architectures, and torchvision does not load beside
the CPU torch here, so spandrel runs in a subprocess that finds a stub ``torchvision`` first."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from voidprompt.errors import UnsupportedModelError
from voidprompt.models.upscalers.files import load_rrdbnet
from voidprompt.testing.tiny_upscalers import write_tiny_rrdb

if importlib.util.find_spec("spandrel") is None:
    pytest.skip("spandrel (the test oracle) is not installed", allow_module_level=True)

# (file name, layout, wrapper, shape): the scale the picture grows by is 2**ups // unshuffle.
CASES = [
    ("old_x4.pth", "old", None, {"ups": 2}),
    ("old_x2_plain.pth", "old", None, {"ups": 1, "nb": 2}),
    ("old_x1_plain.safetensors", "old", None, {"ups": 0}),
    ("basicsr_x4.pth", "basicsr", "params_ema", {"ups": 2}),
    ("basicsr_x2_unshuffle.pth", "basicsr", "params_ema", {"ups": 2, "unshuffle": 2}),
    ("basicsr_x1_unshuffle.pth", "basicsr", "params", {"ups": 2, "unshuffle": 4}),
    ("old_x2_unshuffle.pth", "old", None, {"ups": 2, "unshuffle": 2}),
    ("bsrgan_x4.pth", "old-basicsr", None, {"ups": 2, "nb": 2}),
]
EXPECTED_SCALE = {name: 2 ** shape["ups"] // shape.get("unshuffle", 1) for name, _, _, shape in CASES}

_ORACLE = textwrap.dedent(
    """
    import json, sys
    import torch
    import spandrel
    folder, names = sys.argv[1], json.loads(sys.argv[2])
    x = torch.load(folder + "/input.pt")
    out = {}
    for name in names:
        desc = spandrel.ModelLoader().load_from_file(folder + "/" + name)
        with torch.no_grad():
            y = desc.model.eval()(x)
        torch.save(y, folder + "/" + name + ".out.pt")
        out[name] = {"arch": desc.architecture.id, "scale": desc.scale}
    print(json.dumps(out))
    """
)


def _stub_torchvision(root: Path) -> None:
    pkg = root / "torchvision" / "transforms"
    pkg.mkdir(parents=True)
    (root / "torchvision" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "functional.py").write_text(
        "class InterpolationMode:\n    pass\n\n\ndef rotate(*a, **k):\n    raise NotImplementedError\n\n\n"
        "def normalize(*a, **k):\n    raise NotImplementedError\n"
    )


@pytest.fixture(scope="module")
def oracle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict[str, object]]]:
    folder = tmp_path_factory.mktemp("rrdb")
    for name, layout, wrapper, shape in CASES:
        write_tiny_rrdb(folder / name, layout, wrapper=wrapper, seed=len(name), **shape)
    # Odd sides: the unshuffle variants pad (reflect) to a multiple of their factor and crop back.
    torch.save(torch.rand(1, 3, 13, 10, generator=torch.Generator().manual_seed(1)), folder / "input.pt")
    stub = tmp_path_factory.mktemp("stub")
    _stub_torchvision(stub)
    (stub / "oracle.py").write_text(_ORACLE)
    done = subprocess.run(
        [sys.executable, str(stub / "oracle.py"), str(folder), json.dumps([c[0] for c in CASES])],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(stub), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return folder, json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_rrdbnet_matches_spandrel(oracle: tuple[Path, dict[str, dict[str, object]]], name: str) -> None:
    folder, facts = oracle
    assert facts[name] == {"arch": "ESRGAN", "scale": EXPECTED_SCALE[name]}
    net = load_rrdbnet(folder / name)
    assert net.scale == EXPECTED_SCALE[name]
    x = torch.load(folder / "input.pt")
    with torch.no_grad():
        ours = net(x)
    theirs = torch.load(folder / f"{name}.out.pt")
    assert ours.shape == (1, 3, 13 * net.scale, 10 * net.scale)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_hyper_parameters_come_from_shapes(tmp_path: Path) -> None:
    path = write_tiny_rrdb(
        tmp_path / "m.pth", "basicsr", wrapper="params_ema", nf=16, nb=3, gc=8, ups=2, unshuffle=2
    )
    shape = load_rrdbnet(path).shape
    assert (shape.in_nc, shape.out_nc, shape.nf, shape.gc, shape.nb, shape.ups, shape.unshuffle) == (
        3,
        3,
        16,
        8,
        3,
        2,
        2,
    )


def test_other_architectures_are_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "swinir.pth"
    torch.save(
        {"params": {"conv_first.weight": torch.zeros(1), "layers.0.residual_group.x": torch.zeros(1)}}, path
    )
    with pytest.raises(UnsupportedModelError, match=r"swinir\.pth: not an ESRGAN / Real-ESRGAN \(RRDBNet\)"):
        load_rrdbnet(path)


def test_esrgan_plus_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "plus.pth"
    torch.save({"model.0.weight": torch.zeros(1), "model.1.sub.0.RDB1.conv1x1.weight": torch.zeros(1)}, path)
    with pytest.raises(UnsupportedModelError, match="ESRGAN\\+"):
        load_rrdbnet(path)
