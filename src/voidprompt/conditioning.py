"""Conditioning as it travels from the prompt encoder to the CFG denoiser.

Mirrors A1111's ScheduledPromptConditioning / MulticondLearnedConditioning: a prompt becomes a
schedule of encoded tensors (prompt editing, alternation), and a positive prompt may be several
AND-ed sub-prompts with weights. Every image of a batch carries its own schedules, so one UNet batch
can hold images with different prompts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ScheduledCond:
    """One entry of a prompt schedule: ``cond`` is used while the denoiser's call index <= end_at_step.

    ``cond`` has shape (tokens, width), tokens a multiple of 77. ``pooled`` is SDXL's vector
    conditioning (A1111's ``vector``), None for SD1: the encoder gives bigG's pooled text vector, and
    the Engine appends the pass's size numbers (original size, crop, target size; the refiner's
    aesthetic score) before the schedule reaches the denoiser.
    """

    end_at_step: int
    cond: torch.Tensor
    pooled: torch.Tensor | None = None


CondSchedule = tuple[ScheduledCond, ...]


@dataclass(frozen=True)
class MultiCond:
    """The AND-ed sub-prompts of one positive prompt, each with its composable-diffusion weight."""

    parts: tuple[tuple[CondSchedule, float], ...]


def entry_at_step(schedule: CondSchedule, step: int) -> ScheduledCond:
    """The schedule entry A1111 uses at denoiser call ``step`` (0-based).

    A1111 picks the first entry with ``step <= end_at_step``: an entry ending at step 3 serves calls
    0..3, four calls. This off-by-one is A1111's and is reproduced on purpose.
    """
    return schedule[entry_index_at_step(schedule, step)]


def entry_index_at_step(schedule: CondSchedule, step: int) -> int:
    """The index in ``schedule`` of :func:`entry_at_step`'s entry."""
    for index, entry in enumerate(schedule):
        if step <= entry.end_at_step:
            return index
    return len(schedule) - 1


def cond_at_step(schedule: CondSchedule, step: int) -> torch.Tensor:
    """The cross-attention tensor A1111 uses at denoiser call ``step`` (see :func:`entry_at_step`)."""
    return entry_at_step(schedule, step).cond
