"""Device and precision resolution: what exists is used, what does not is refused in one line."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace

import pytest
import torch

from voidprompt.errors import DeviceError, VoidpromptError
from voidprompt.models.placement import (
    PrecisionPolicy,
    available_devices,
    default_randn_source,
    resolve_device,
    resolve_precision,
    use_a1111_cuda_settings,
)

CPU = torch.device("cpu")


def _fake_cuda(monkeypatch: pytest.MonkeyPatch, names: list[str], majors: list[int]) -> None:
    """This CPU-only torch pretends to see ``names`` as CUDA GPUs of compute capability ``majors``."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(names))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: names[i])
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda i=0: SimpleNamespace(major=majors[i], name=names[i])
    )
    monkeypatch.setattr(torch.version, "hip", None)


def _no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


# ------------------------------------------------------------------------------------------ devices


@pytest.mark.parametrize("name", ["cpu", "CPU", " cpu ", "cpu:0"])
def test_the_cpu_always_resolves(name: str) -> None:
    assert resolve_device(name) == CPU


def test_cuda_on_a_cpu_only_torch_names_the_build_and_what_exists(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_cuda(monkeypatch)
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None)
    with pytest.raises(DeviceError) as info:
        resolve_device("cuda")
    message = str(info.value)
    assert "\n" not in message
    assert "CPU-only build" in message and torch.__version__ in message
    assert message.endswith("Available here: cpu.")
    assert isinstance(info.value, VoidpromptError)


def test_cuda_build_without_a_visible_gpu_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_cuda(monkeypatch)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    with pytest.raises(DeviceError, match=r"sees no CUDA GPU.*CUDA_VISIBLE_DEVICES"):
        resolve_device("cuda:0")


def test_a_cuda_index_past_the_last_gpu_lists_the_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cuda(monkeypatch, ["NVIDIA H100 80GB HBM3"], [9])
    with pytest.raises(DeviceError) as info:
        resolve_device("cuda:3")
    assert str(info.value) == (
        "--device 'cuda:3': there is only 1 CUDA device. Available here: cpu, cuda:0 (NVIDIA H100 80GB HBM3)."
    )


def test_cuda_without_an_index_is_the_current_device_with_its_index(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cuda(monkeypatch, ["GPU A", "GPU B"], [8, 8])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    assert available_devices() == ["cpu", "cuda:0 (GPU A)", "cuda:1 (GPU B)"]


def test_mps_without_mps(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_cuda(monkeypatch)
    with pytest.raises(DeviceError, match=r"no usable MPS .*Available here: cpu\.$"):
        resolve_device("mps")


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "", "meta", "xpu"])
def test_names_that_are_no_device_of_ours(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_cuda(monkeypatch)
    with pytest.raises(DeviceError, match="cpu, cuda, cuda:N or mps"):
        resolve_device(name)


# ---------------------------------------------------------------------------------------- precision


def test_auto_is_fp32_on_the_cpu() -> None:
    policy = resolve_precision("auto", CPU)
    assert policy == PrecisionPolicy("fp32", torch.float32, None, torch.float32, "cpu")
    assert not policy.is_half


def test_auto_on_cuda_is_a1111s_half_weights_under_autocast(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cuda(monkeypatch, ["GPU"], [7])
    cuda = resolve_device("cuda")
    for name in ("auto", "fp16", "FP16"):
        policy = resolve_precision(name, cuda)
        assert policy == PrecisionPolicy("fp16", torch.float16, torch.float16, torch.float16, "cuda")
    assert resolve_precision("fp32", cuda).autocast is None


def test_fp16_on_the_cpu_is_refused_with_the_alternatives() -> None:
    with pytest.raises(DeviceError) as info:
        resolve_precision("fp16", CPU)
    message = str(info.value)
    assert "\n" not in message and "refused" in message and "use fp32" in message and "bf16" in message


def test_bf16_on_the_cpu_runs_under_cpu_autocast() -> None:
    policy = resolve_precision("bf16", CPU)
    assert policy == PrecisionPolicy("bf16", torch.bfloat16, torch.bfloat16, torch.bfloat16, "cpu")
    with policy.autocast_context():
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
        product = torch.ones(2, 2) @ torch.ones(2, 2)
    assert product.dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")


def test_bf16_on_a_pre_ampere_gpu_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cuda(monkeypatch, ["NVIDIA A100", "Tesla T4"], [8, 7])
    assert resolve_precision("bf16", resolve_device("cuda:0")).weights == torch.bfloat16
    with pytest.raises(DeviceError) as info:
        resolve_precision("bf16", resolve_device("cuda:1"))
    message = str(info.value)
    assert "cuda:1 (Tesla T4)" in message and "Ampere" in message and "use fp16" in message


def test_unknown_precision_lists_the_choices() -> None:
    with pytest.raises(DeviceError, match="choose one of auto, fp32, fp16, bf16"):
        resolve_precision("half", CPU)


def test_fp32_policy_has_no_autocast() -> None:
    policy = resolve_precision("fp32", CPU)
    with policy.autocast_context():
        assert not torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_with_vae_changes_only_the_vae() -> None:
    policy = resolve_precision("bf16", CPU).with_vae(torch.float32)
    assert (policy.weights, policy.autocast, policy.vae) == (torch.bfloat16, torch.bfloat16, torch.float32)


def test_default_rng_source_is_gpu_on_cuda_only() -> None:
    assert default_randn_source(CPU) == "CPU"
    assert default_randn_source(torch.device("cuda", 0)) == "GPU"
    assert default_randn_source(torch.device("mps")) == "CPU"


@pytest.fixture
def cuda_switches() -> Iterator[None]:
    """All three switches off while the test runs, and as they were afterwards (torch's backend
    modules take plain assignment, not monkeypatch's attribute protocol)."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before = (matmul.allow_tf32, cudnn.allow_tf32, cudnn.benchmark)
    matmul.allow_tf32 = cudnn.allow_tf32 = cudnn.benchmark = False
    yield
    matmul.allow_tf32, cudnn.allow_tf32, cudnn.benchmark = before


@pytest.mark.parametrize(
    ("capabilities", "autotuned"),
    [([(8, 0)], False), ([(8, 6), (7, 5)], True), ([(7, 0)], False)],
)
@pytest.mark.usefixtures("cuda_switches")
def test_a1111s_cuda_settings_tf32_always_and_the_autotuner_for_turing(
    capabilities: list[tuple[int, int]], autotuned: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(capabilities))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: capabilities[i])
    use_a1111_cuda_settings()
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert torch.backends.cudnn.benchmark == autotuned


@pytest.mark.usefixtures("cuda_switches")
def test_a1111s_cuda_settings_leave_a_machine_without_cuda_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    use_a1111_cuda_settings()
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
