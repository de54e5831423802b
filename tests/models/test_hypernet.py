"""Hypernetworks: file layouts (A1111 layer indices with dropout, NovelAI linear1/linear2), exact
context transform x + mlp(x) * mult on k and v, self-attention where widths match, restore."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from voidprompt.errors import ModelLoadError
from voidprompt.models.hashes import sha256_file
from voidprompt.models.load import load_model
from voidprompt.models.networks import NetworkManager, hypernetworks, load_hypernetwork
from voidprompt.models.networks.hypernetworks import parse_dropout_structure
from voidprompt.prompts.extra_networks import extract_extra_networks
from voidprompt.testing.fake_checkpoints import write_tiny_checkpoint


class _Tok:
    pass


def _lin(g: torch.Generator, n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n_out, n_in, generator=g) * 0.3, torch.randn(n_out, generator=g) * 0.1


def _a1111_file(path: Path, seed: int = 0) -> dict[str, object]:
    """[1, 2, 2, 1], relu, dropout on, activate_output False: A1111 builds
    Linear(0) ReLU(1) Dropout(2) Linear(3) ReLU(4) Linear(5) - so the saved keys are 0, 3, 5."""
    g = torch.Generator().manual_seed(seed)
    obj: dict[object, object] = {
        "layer_structure": [1, 2, 2, 1],
        "activation_func": "relu",
        "is_layer_norm": False,
        "use_dropout": True,
        "last_layer_dropout": False,
        "activate_output": False,
        "weight_initialization": "Normal",
        "name": "h",
        "step": 1000,
        "sd_checkpoint": "abc",
    }
    raw = {}
    for width in (32, 64):
        pair = []
        for _ in range(2):
            sd = OrderedDict()
            for idx, (i, o) in zip((0, 3, 5), ((1, 2), (2, 2), (2, 1)), strict=True):
                w, b = _lin(g, width * i, width * o)
                sd[f"linear.{idx}.weight"], sd[f"linear.{idx}.bias"] = w, b
            pair.append(sd)
        obj[width] = tuple(pair)
        raw[width] = pair
    torch.save(obj, path)
    return raw  # type: ignore[return-value]


def _mlp_ref(sd: dict[str, torch.Tensor], x: np.ndarray) -> np.ndarray:
    def lin(idx: int, v: np.ndarray) -> np.ndarray:
        return v @ sd[f"linear.{idx}.weight"].double().numpy().T + sd[f"linear.{idx}.bias"].double().numpy()

    h = np.maximum(lin(0, x), 0)
    h = np.maximum(lin(3, h), 0)
    return lin(5, h)


def test_dropout_structure_rule() -> None:
    assert parse_dropout_structure([1, 2, 1], False, False) == [0, 0, 0]
    assert parse_dropout_structure([1, 2, 2, 1], True, False) == [0, 0.3, 0, 0]
    assert parse_dropout_structure([1, 2, 2, 1], True, True) == [0, 0.3, 0.3, 0]


def test_novelai_old_keys_are_mapped(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    pair = []
    for _ in range(2):
        w1, b1 = _lin(g, 768, 1536)
        w2, b2 = _lin(g, 1536, 768)
        pair.append({"linear1.weight": w1, "linear1.bias": b1, "linear2.weight": w2, "linear2.bias": b2})
    torch.save({768: tuple(pair)}, tmp_path / "nai.pt")
    net = load_hypernetwork(tmp_path / "nai.pt")
    x = torch.randn(2, 5, 768, generator=g)
    mlp = net.layers[768][1]
    mlp.multiplier = 0.7
    sd = pair[1]
    ref = (
        x.double()
        + (
            (x.double() @ sd["linear1.weight"].double().T + sd["linear1.bias"].double())
            @ sd["linear2.weight"].double().T
            + sd["linear2.bias"].double()
        )
        * 0.7
    )
    torch.testing.assert_close(mlp(x).double(), ref, rtol=1e-5, atol=1e-4)


def test_bad_structure_is_a_clear_error(tmp_path: Path) -> None:
    torch.save({32: ({"linear.0.weight": torch.zeros(64, 32)}, {})}, tmp_path / "bad.pt")
    with pytest.raises(ModelLoadError, match="does not fit layer_structure"):
        load_hypernetwork(tmp_path / "bad.pt")


def test_context_changed_exactly_on_k_and_v_in_cross_and_self_attention(tmp_path: Path) -> None:
    raw = _a1111_file(tmp_path / "h.pt")
    comps = load_model(write_tiny_checkpoint(tmp_path / "m.safetensors"), tokenizer=_Tok())
    seen: dict[str, torch.Tensor] = {}
    attn2 = comps.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    attn1 = comps.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    mgr = NetworkManager()
    applied = mgr.apply(
        comps, extract_extra_networks("<hypernet:h:0.6>")[1], lora_dir=None, hypernet_dir=tmp_path
    )
    assert applied.infotext["Hypernet hashes"] == f"h: {sha256_file(tmp_path / 'h.pt')[:10]}"
    # forward hooks run after the pre-hooks, so they see what to_k / to_v actually receive
    hooks = [
        m.register_forward_hook(lambda _m, args, _o, n=n: seen.__setitem__(n, args[0].detach().clone()))
        for n, m in (
            ("k2", attn2.to_k),
            ("v2", attn2.to_v),
            ("q2", attn2.to_q),
            ("k1", attn1.to_k),
            ("v1", attn1.to_v),
        )
    ]
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 77, 32, generator=g)
    self_in: dict[str, torch.Tensor] = {}
    hq = attn1.to_q.register_forward_hook(
        lambda _m, args, _o: self_in.__setitem__("x", args[0].detach().clone())
    )
    with torch.no_grad():
        comps.unet(x, 5, encoder_hidden_states=ctx)
    for h in [*hooks, hq]:
        h.remove()
    c = ctx.double().numpy()
    np.testing.assert_allclose(
        seen["k2"].double().numpy(), c + _mlp_ref(raw[32][0], c) * 0.6, rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        seen["v2"].double().numpy(), c + _mlp_ref(raw[32][1], c) * 0.6, rtol=1e-5, atol=1e-5
    )
    # self-attention: the context is the normalised hidden state (what to_q sees), width 32 -> changed too
    s = self_in["x"].double().numpy()
    np.testing.assert_allclose(
        seen["k1"].double().numpy(), s + _mlp_ref(raw[32][0], s) * 0.6, rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        seen["v1"].double().numpy(), s + _mlp_ref(raw[32][1], s) * 0.6, rtol=1e-5, atol=1e-5
    )
    # removing it restores the plain forward exactly
    with torch.no_grad():
        hooked = comps.unet(x, 5, encoder_hidden_states=ctx).sample
        mgr.restore()
        plain = comps.unet(x, 5, encoder_hidden_states=ctx).sample
        mgr2 = NetworkManager()
        mgr2.apply(comps, extract_extra_networks("<hypernet:h:0>")[1], lora_dir=None, hypernet_dir=tmp_path)
        zero = comps.unet(x, 5, encoder_hidden_states=ctx).sample
        mgr2.restore()
    assert (hooked - plain).abs().max() > 1e-3
    assert torch.equal(zero, plain)  # multiplier 0: x + mlp(x) * 0 == x exactly


def _small_file(path: Path, **options: object) -> Path:
    g = torch.Generator().manual_seed(3)
    pair = []
    for _ in range(2):
        w0, b0 = _lin(g, 8, 16)
        w1, b1 = _lin(g, 16, 8)
        pair.append({"linear.0.weight": w0, "linear.0.bias": b0, "linear.1.weight": w1, "linear.1.bias": b1})
    torch.save({8: tuple(pair), **options}, path)
    return path


def test_layer_structure_is_checked_against_saved_tensors_before_any_module_is_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # [1, 1000000, 1] over tensors saved for [1, 2, 1]: building the MLPs first would allocate
    # 2 x 8 x 8,000,000 floats per MLP before load_state_dict could notice.
    path = _small_file(tmp_path / "huge.pt", layer_structure=[1, 1000000, 1])
    assert path.stat().st_size < 8 * 1024

    def no_build(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a module was built before the shapes were checked")

    monkeypatch.setattr(hypernetworks, "HypernetworkMLP", no_build)
    with pytest.raises(
        ModelLoadError,
        match=r"k-MLP for width 8 does not fit layer_structure \[1.0, 1000000.0, 1.0\]: it needs Linear "
        r"weights of shapes \[\(8000000, 8\), \(8, 8000000\)\] but the file holds \[\(16, 8\), \(8, 16\)\]",
    ):
        load_hypernetwork(path)


def test_matching_layer_structure_still_loads(tmp_path: Path) -> None:
    net = load_hypernetwork(_small_file(tmp_path / "ok.pt", layer_structure=[1, 2, 1]))
    assert [tuple(m.weight.shape) for m in net.layers[8][0].linear if isinstance(m, torch.nn.Linear)] == [
        (16, 8),
        (8, 16),
    ]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"layer_structure": [2, 1]}, "starts and ends with 1"),
        ({"layer_structure": [1, -3, 1]}, "list of positive numbers"),
        ({"layer_structure": "1,2,1"}, "list of positive numbers"),
        ({"dropout_structure": [0, 0.3]}, "one probability in \\[0, 1\\) per layer_structure entry \\(3\\)"),
        ({"activation_func": ["relu"]}, "activation_func \\['relu'\\] is not a name"),
    ],
)
def test_malformed_options_are_clear_errors(tmp_path: Path, options: dict[str, object], message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        load_hypernetwork(_small_file(tmp_path / "bad.pt", **options))


def test_recursive_hypernetwork_file_is_a_clear_error(tmp_path: Path) -> None:
    loop: list[object] = []
    loop.append(loop)
    torch.save({8: (loop, {}), "layer_structure": [1, 2, 1]}, tmp_path / "loop.pt")
    with pytest.raises(ModelLoadError, match="a list that contains itself"):
        load_hypernetwork(tmp_path / "loop.pt")
