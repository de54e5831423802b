"""A1111's refiner switch (``sd_samplers_common.apply_refiner``): when to hand a sampler pass over.

Before every call of the CFG denoiser A1111 measures how far the pass has come, and once that reaches
``refiner_switch_at`` it loads the refiner checkpoint, recomputes the pass's conditioning with it and
carries on with the same sampler, the same latent and the same schedule:

* the completed fraction is ``(999 - t) / 1000`` with t the index of the model's sigma table nearest to
  the call's largest sigma (for the timestep samplers the call's timestep itself), or, with the setting
  ``refiner_switch_by_sample_steps``, the denoiser's call count over its expected total;
* ``refiner_switch_at`` None switches at the first call (A1111 tests ``is not None and ratio < at``);
* with hires fix the setting ``hires_fix_refiner_pass`` picks the pass ("second pass" by default,
  "first pass", "both passes"); after a switch the refiner stays loaded for the rest of the iteration
  (a hires pass after a first-pass switch runs on it alone) and decodes the pictures; every iteration
  of ``n_iter`` starts on the main model again (A1111 reloads it at the top of its loop);
* the infotext gains ``Refiner: <name> [<hash>]`` and ``Refiner switch at``, plus ``Hires refiner`` when
  hires fix is on and the setting is not "second pass".

A1111 quirk: with ``refiner_switch_by_sample_steps`` on, ``Refiner switch by sampling steps: True`` is
written into every infotext, refiner or not (it is recorded before the refiner is even looked at).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from voidprompt.request import GenerationRequest

__all__ = ["completed_ratio", "pass_takes_refiner", "refiner_infotext", "refiner_name"]

# The names A1111 reads as "no refiner".
_NO_REFINER = ("", "None", "none")


def refiner_name(request: GenerationRequest) -> str | None:
    """The refiner checkpoint the request names, or None."""
    name = request.refiner_checkpoint
    return None if name is None or name in _NO_REFINER else name


def completed_ratio(
    sigma: Tensor, *, sigmas: Tensor | None, step: int, total_steps: int, by_steps: bool
) -> float:
    """How far a pass has come at a denoiser call, A1111's way (see the module docstring);
    ``sigmas`` is the model's sigma table, None for the timestep samplers."""
    if by_steps:
        return step / total_steps
    peak = torch.max(sigma)
    if sigmas is None:
        timestep = int(peak.to(dtype=torch.int64))
    else:
        timestep = int(torch.argmin(torch.abs(sigmas.to(peak.device) - peak)))
    return (999 - timestep) / 1000


def pass_takes_refiner(request: GenerationRequest, *, hires: bool, second_pass: bool) -> bool:
    """Whether this pass may switch: any pass without hires fix; with it, the setting's pass(es)."""
    if not hires:
        return True
    mode = request.hires_fix_refiner_pass
    if mode == "first pass":
        return not second_pass
    if mode == "second pass":
        return second_pass
    return True


def refiner_infotext(request: GenerationRequest, title: str, *, hires: bool) -> dict[str, Any]:
    """The keys A1111 records when the refiner takes over (``title`` is ``name [short hash]``)."""
    facts: dict[str, Any] = {}
    if hires and request.hires_fix_refiner_pass != "second pass":
        facts["Hires refiner"] = request.hires_fix_refiner_pass
    facts["Refiner"] = title
    facts["Refiner switch at"] = request.refiner_switch_at
    return facts
