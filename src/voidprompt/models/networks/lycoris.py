"""Weight deltas of the network module types: LoRA (with CP/Tucker ``lora_mid``), LoHa, LoKr, full diff.

Every function returns ΔW *before* the scale (alpha/dim) and the multiplier, in float32, in the
factors' natural layout; :func:`fit_delta` then puts it in the target weight's shape. The formulas are
LyCORIS' (Apache-2.0; studied, not copied) as A1111 evaluates them (``lyco_helpers.py``):

* conventional: ``up.flatten(1) @ down.flatten(1)``, reshaped to ``(out, in, *kernel)`` where the
  kernel comes from ``down`` (kxk conv LoRA) - ``dyn_dim`` keeps the first ranks only;
* CP decomposition (``lora_mid``, LoCon's "use_cp"): ``ΔW[o,i,h,w] = Σ up[o,a] mid[a,b,h,w] down[b,i]``;
* Tucker factors of LoHa/LoKr (``hada_t1``, ``lokr_t2``): ``Σ t[a,b,h,w] wa[a,o] wb[b,i]`` (note: the
  factors are stored rank-first there);
* LoHa: ``(w1a @ w1b) ⊙ (w2a @ w2b)`` (Hadamard product);
* LoKr: ``kron(w1, w2)`` where either factor may itself be a product ``a @ b``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "delta_full",
    "delta_loha",
    "delta_lokr",
    "delta_lora",
    "rebuild_conventional",
    "rebuild_cp",
    "rebuild_tucker",
]


def _f32(t: Tensor) -> Tensor:
    return t.to(torch.float32)


def rebuild_conventional(up: Tensor, down: Tensor, dyn_dim: int | None = None) -> Tensor:
    """``up @ down`` for linear or conv factors; (out, in) or (out, in, kh, kw)."""
    u = _f32(up).reshape(up.shape[0], -1)
    d = _f32(down).reshape(down.shape[0], -1)
    if dyn_dim is not None and dyn_dim < d.shape[0]:
        u, d = u[:, :dyn_dim], d[:dyn_dim]
    w = u @ d
    if down.ndim == 4:
        return w.reshape(up.shape[0], down.shape[1], down.shape[2], down.shape[3])
    return w


def rebuild_cp(up: Tensor, down: Tensor, mid: Tensor) -> Tensor:
    """LoRA with a CP middle conv: up (out, r[,1,1]), mid (r, r, kh, kw), down (r, in[,1,1])."""
    u = _f32(up).reshape(up.shape[0], -1)
    d = _f32(down).reshape(down.shape[0], -1)
    return torch.einsum("abhw,oa,bi->oihw", _f32(mid), u, d)


def rebuild_tucker(t: Tensor, wa: Tensor, wb: Tensor) -> Tensor:
    """Tucker core t (r, r, kh, kw) with factors wa (r, out) and wb (r, in)."""
    return torch.einsum(
        "abhw,ao,bi->oihw", _f32(t), _f32(wa).reshape(wa.shape[0], -1), _f32(wb).reshape(wb.shape[0], -1)
    )


def delta_lora(w: dict[str, Tensor], dyn_dim: int | None = None) -> Tensor:
    up, down = w["lora_up.weight"], w["lora_down.weight"]
    mid = w.get("lora_mid.weight")
    if mid is not None:
        # A1111 quirk: dyn_dim is ignored for CP-decomposed LoRAs.
        return rebuild_cp(up, down, mid)
    return rebuild_conventional(up, down, dyn_dim)


def _product(w: dict[str, Tensor], t_key: str, a_key: str, b_key: str) -> Tensor:
    t = w.get(t_key)
    if t is not None:
        return rebuild_tucker(t, w[a_key], w[b_key])
    return rebuild_conventional(w[a_key], w[b_key])


def delta_loha(w: dict[str, Tensor]) -> Tensor:
    w1 = _product(w, "hada_t1", "hada_w1_a", "hada_w1_b")
    w2 = _product(w, "hada_t2", "hada_w2_a", "hada_w2_b")
    return w1 * w2


def delta_lokr(w: dict[str, Tensor], target_shape: torch.Size) -> Tensor:
    w1 = _f32(w["lokr_w1"]) if "lokr_w1" in w else _f32(w["lokr_w1_a"]) @ _f32(w["lokr_w1_b"])
    if "lokr_w2" in w:
        w2 = _f32(w["lokr_w2"])
    elif "lokr_t2" in w:
        w2 = rebuild_tucker(w["lokr_t2"], w["lokr_w2_a"], w["lokr_w2_b"])
    else:
        w2 = rebuild_conventional(w["lokr_w2_a"], w["lokr_w2_b"])
    if w2.ndim == 4 and w1.ndim == 2:
        w1 = w1[:, :, None, None]
    out = torch.kron(w1, w2)
    if out.numel() == target_shape.numel():
        # A 2-D w2 against a conv weight: the kron's columns are (in1, in2*kh*kw), which is exactly
        # the row-major flattening of (in1*in2, kh, kw).
        return out.reshape(target_shape)
    return out


def delta_full(w: dict[str, Tensor]) -> Tensor:
    return _f32(w["diff"])
