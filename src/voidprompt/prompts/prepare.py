"""From the user's prompt texts to what the encoder needs, in the order of A1111's
``StableDiffusionProcessing.setup_prompts`` and ``setup_conds``.

1. styles (``{prompt}`` placeholder or appended with ", ");
2. ``#`` comments stripped (when enabled) - the infotext shows the text from here on;
3. extra-network tags removed from the positive prompt only (the infotext keeps them);
4. the positive prompt split on ``AND`` (the negative never is);
5. prompt editing / alternation schedules for every part, over the sampler's total steps
   (2x steps for second-order samplers).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from voidprompt.errors import PromptError
from voidprompt.prompts.extra_networks import ExtraNetworkCall, extract_extra_networks
from voidprompt.prompts.parse import multicond_prompt, strip_comments
from voidprompt.prompts.schedule import prompt_schedules, schedule_steps_for_sampler
from voidprompt.prompts.styles import StyleDatabase

__all__ = ["PreparedPrompts", "PromptSchedule", "prepare_prompts"]

PromptSchedule = list[tuple[int, str]]


@dataclass(frozen=True)
class PreparedPrompts:
    """Everything prompt-text related one image needs.

    ``positive`` has one (schedule, weight) per AND part, in order; parts with the same text share an
    equal schedule (A1111 encodes such a text once: see ``positive_texts`` / ``positive_parts``).
    ``schedule_steps`` is the step count the schedules were computed over.
    ``old_timelines_differ``: with ``use_old_scheduling``, whether the old timelines gave any
    schedule (of the negative prompt or the positive one, tags removed) that the current rule would
    not - A1111 writes "Old prompt editing timelines" only then.
    """

    prompt_for_infotext: str
    negative_for_infotext: str
    extra_networks: tuple[ExtraNetworkCall, ...]
    positive: tuple[tuple[PromptSchedule, float], ...]
    negative: PromptSchedule
    positive_texts: tuple[str, ...]
    positive_parts: tuple[tuple[int, float], ...]
    schedule_steps: int
    old_timelines_differ: bool = False

    def encoder_calls(self) -> tuple[tuple[str, ...], ...]:
        """The texts of each call A1111 makes to its text encoder, in call order: the negative
        prompt's schedule (``uc`` is set up first), then each distinct AND part's schedule."""
        calls = [tuple(text for _, text in self.negative)]
        first_part: dict[int, int] = {}
        for part, (text_index, _) in enumerate(self.positive_parts):
            first_part.setdefault(text_index, part)
        for text_index in range(len(self.positive_texts)):
            schedule, _ = self.positive[first_part[text_index]]
            calls.append(tuple(text for _, text in schedule))
        return tuple(calls)

    def encoded_texts(self) -> tuple[str, ...]:
        """Every text the encoder reads: each schedule entry of the negative prompt and of every
        AND part, in that order."""
        texts = [text for _, text in self.negative]
        for schedule, _ in self.positive:
            texts.extend(text for _, text in schedule)
        return tuple(texts)


def prepare_prompts(
    prompt: str,
    negative_prompt: str = "",
    *,
    steps: int,
    hires_steps: int | None = None,
    styles: Sequence[str] = (),
    style_db: StyleDatabase | None = None,
    use_old_scheduling: bool = False,
    second_order: bool = False,
    comments: bool = True,
) -> PreparedPrompts:
    """Run A1111's prompt pipeline for one image.

    ``steps`` is the requested step count; with ``hires_steps`` the schedules are those of the hires
    pass (A1111 computes them from the base steps and the hires steps, both as sampler totals).
    """
    if styles and style_db is None:
        raise PromptError(
            f"styles {list(styles)!r} were requested but no style database was given; "
            "load one with StyleDatabase.from_csv('styles.csv')"
        )
    if style_db is not None and styles:
        prompt = style_db.apply_styles_to_prompt(prompt, styles)
        negative_prompt = style_db.apply_negative_styles_to_prompt(negative_prompt, styles)

    if comments:
        prompt = strip_comments(prompt)
        negative_prompt = strip_comments(negative_prompt)

    prompt_for_infotext, negative_for_infotext = prompt, negative_prompt

    positive_text, calls = extract_extra_networks(prompt)

    total = schedule_steps_for_sampler(steps, second_order)
    hires_total = None if hires_steps is None else schedule_steps_for_sampler(hires_steps, second_order)

    def schedule(text: str) -> PromptSchedule:
        return prompt_schedules(text, total, hires_total, use_old_scheduling)

    old_timelines_differ = use_old_scheduling and any(
        prompt_schedules(text, total, hires_total, True) != prompt_schedules(text, total, hires_total, False)
        for text in (negative_prompt, positive_text)
    )

    multicond = multicond_prompt(positive_text)
    by_text = [schedule(text) for text in multicond.texts]
    positive = tuple((list(by_text[index]), weight) for index, weight in multicond.parts)

    return PreparedPrompts(
        prompt_for_infotext=prompt_for_infotext,
        negative_for_infotext=negative_for_infotext,
        extra_networks=tuple(calls),
        positive=positive,
        negative=schedule(negative_prompt),
        positive_texts=multicond.texts,
        positive_parts=multicond.parts,
        schedule_steps=hires_total if hires_total is not None else total,
        old_timelines_differ=old_timelines_differ,
    )
