"""Prompt editing ``[from:to:when]`` and alternation ``[a|b]``: one prompt -> a schedule of texts.

Reproduces A1111's ``get_learned_conditioning_prompt_schedules`` for a single prompt
with a hand-written recursive-descent parser that accepts the same language as A1111's grammar:

* at the top level, any of ``[ ] ( ) :`` may stand alone as text ("stray" brackets);
* inside a bracket construct everything must nest properly: ``(p)``, ``(p:p)`` and ``[p]`` are kept
  literally (emphasis is resolved later by the encoder), ``[to:N]`` / ``[from:to:N]`` are scheduled,
  ``[a|b|...]`` (empty options allowed) alternates;
* plain text is any character but ``\\ [ ] ( ) : |``, or a backslash followed by any character but a
  newline (kept verbatim: the emphasis parser resolves escapes).

Where a bracket could start a construct or be a stray character, the construct wins: the scheduled
reading, the same in every process. A1111 has no fixed answer there: its lark grammar is ambiguous
next to a stray ``:``, ``)`` or ``]`` (``x [a:2]:``), and lark 1.1.2 resolves the ambiguity by an
order that follows the process's string hash seed, so one prompt schedules in one launch and stays
literal in the next. If the prompt is not in the language at all - a ``|`` outside any alternation,
a trailing lone backslash - the whole prompt is used verbatim for every step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from voidprompt.errors import InvalidRequestError, PromptError

__all__ = [
    "prompt_schedules",
    "schedule_steps_for_sampler",
]


@dataclass(frozen=True)
class _Scheduled:
    before: tuple[_Node, ...] | None  # None: no "from" part, i.e. ``[to:when]``
    after: tuple[_Node, ...]
    number: str  # the NUMBER text as written; whether it contains "." changes its meaning


@dataclass(frozen=True)
class _Alternate:
    options: tuple[tuple[_Node, ...], ...]


_Node = Union[str, _Scheduled, _Alternate]  # noqa: UP007 - a forward-referencing alias needs Union

_CLOSERS = frozenset(")]:|")


class _Failed(Exception):
    """The text is not in the scheduling language; A1111 then uses the prompt verbatim."""


def _scan_int(text: str, i: int) -> int:
    # lark's INT is ASCII digits only.
    while i < len(text) and "0" <= text[i] <= "9":
        i += 1
    return i


def _number_end(text: str, i: int) -> int:
    """End of the longest lark SIGNED_NUMBER at ``i``, or ``i`` if there is none.

    SIGNED_NUMBER = [+-]? (INT | DECIMAL EXP? | INT EXP), DECIMAL = INT "." INT? | "." INT,
    EXP = [eE] [+-]? INT.
    """
    j = i
    if j < len(text) and text[j] in "+-":
        j += 1
    int_end = _scan_int(text, j)
    end = int_end
    if int_end < len(text) and text[int_end] == ".":
        frac_end = _scan_int(text, int_end + 1)
        if int_end > j or frac_end > int_end + 1:
            end = frac_end
    if end == j:
        return i  # no digits at all
    if end < len(text) and text[end] in "eE":
        k = end + 1
        if k < len(text) and text[k] in "+-":
            k += 1
        exp_end = _scan_int(text, k)
        if exp_end > k:
            end = exp_end
    return end


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.n = len(text)

    def start(self) -> list[_Node]:
        nodes: list[_Node] = []
        i = 0
        while i < self.n:
            c = self.text[i]
            if c in "([":
                try:
                    construct, i = self.construct(i)
                except _Failed:
                    # A bracket that starts no valid construct is plain text at the top level.
                    nodes.append(c)
                    i += 1
                else:
                    nodes.extend(construct)
            elif c in ")]:":
                nodes.append(c)
                i += 1
            elif c == "|":
                raise _Failed
            else:
                i = self.plain(i, nodes)
        return nodes

    def plain(self, i: int, out: list[_Node]) -> int:
        j = i
        while j < self.n:
            c = self.text[j]
            if c == "\\":
                if j + 1 >= self.n or self.text[j + 1] == "\n":
                    raise _Failed
                j += 2
            elif c in "()[]:|":
                break
            else:
                j += 1
        out.append(self.text[i:j])
        return j

    def prompt(self, i: int) -> tuple[tuple[_Node, ...], int]:
        """Items up to the next ``) ] : |`` at this nesting level (or the end)."""
        nodes: list[_Node] = []
        while i < self.n:
            c = self.text[i]
            if c in _CLOSERS:
                break
            if c in "([":
                construct, i = self.construct(i)
                nodes.extend(construct)
            else:
                i = self.plain(i, nodes)
        return tuple(nodes), i

    def expect(self, i: int, char: str) -> int:
        if i < self.n and self.text[i] == char:
            return i + 1
        raise _Failed

    def number_then_close(self, i: int) -> tuple[str, int] | None:
        """Match optional whitespace, a NUMBER, optional whitespace and ``]`` at ``i``."""
        while i < self.n and self.text[i].isspace():
            i += 1
        end = _number_end(self.text, i)
        if end == i:
            return None
        number = self.text[i:end]
        while end < self.n and self.text[end].isspace():
            end += 1
        if end < self.n and self.text[end] == "]":
            return number, end + 1
        return None

    def construct(self, i: int) -> tuple[list[_Node], int]:
        if self.text[i] == "(":
            first, j = self.prompt(i + 1)
            if j < self.n and self.text[j] == ":":
                second, k = self.prompt(j + 1)
                return ["(", *first, ":", *second, ")"], self.expect(k, ")")
            return ["(", *first, ")"], self.expect(j, ")")

        first, j = self.prompt(i + 1)
        if j >= self.n:
            raise _Failed
        c = self.text[j]
        if c == "]":
            return ["[", *first, "]"], j + 1
        if c == "|":
            options = [first]
            while j < self.n and self.text[j] == "|":
                option, j = self.prompt(j + 1)
                options.append(option)
            return [_Alternate(tuple(options))], self.expect(j, "]")
        if c == ":":
            short = self.number_then_close(j + 1)
            if short is not None:
                number, end = short
                return [_Scheduled(None, first, number)], end
            second, k = self.prompt(j + 1)
            if k < self.n and self.text[k] == ":":
                full = self.number_then_close(k + 1)
                if full is not None:
                    number, end = full
                    return [_Scheduled(first, second, number)], end
        raise _Failed


def _walk(nodes: tuple[_Node, ...] | list[_Node]) -> list[_Scheduled | _Alternate]:
    """Every scheduled and alternate node, nested ones included (in all branches)."""
    found: list[_Scheduled | _Alternate] = []
    stack: list[_Node] = list(nodes)
    while stack:
        node = stack.pop()
        if isinstance(node, _Scheduled):
            found.append(node)
            stack.extend(node.before or ())
            stack.extend(node.after)
        elif isinstance(node, _Alternate):
            found.append(node)
            for option in node.options:
                stack.extend(option)
    return found


def _render(nodes: tuple[_Node, ...] | list[_Node], step: int, whens: dict[int, int]) -> str:
    parts: list[str] = []
    for node in nodes:
        if isinstance(node, str):
            parts.append(node)
        elif isinstance(node, _Scheduled):
            chosen = node.before or () if step <= whens[id(node)] else node.after
            parts.append(_render(chosen, step, whens))
        else:
            parts.append(_render(node.options[(step - 1) % len(node.options)], step, whens))
    return "".join(parts)


def _when(number: str, steps: int, int_offset: int, flt_offset: float, use_old_scheduling: bool) -> int:
    v = float(number)
    if use_old_scheduling:
        v = v * steps if v < 1 else v
    elif "." in number:
        # A1111 quirk: only the presence of "." makes a fraction, so "1.0" means "all steps" while "1"
        # means "step 1", and "1.5e1" is a fraction (15 x steps) while "15" is a step.
        v = (v - flt_offset) * steps
    else:
        v = v - int_offset
    try:
        return min(steps, int(v))
    except OverflowError:
        # A1111 fails here too (int() of an infinite float); tell the user what to change.
        raise PromptError(
            f"the prompt-editing step {number!r} is too large to be a step or a fraction of steps; "
            "use a step number or a fraction like 0.5"
        ) from None


def prompt_schedules(
    prompt: str,
    steps: int,
    hires_steps: int | None = None,
    use_old_scheduling: bool = False,
) -> list[tuple[int, str]]:
    """A1111's prompt schedule for one prompt: ``[(end_at_step, text), ...]``, sorted by step.

    ``steps`` is the sampler's step count (A1111 passes ``total_steps``, 2x for second-order
    samplers). With ``hires_steps`` the schedule is for the hires pass: integers count on from the
    end of the first pass and fractions are offset by 1.0 (``1.5`` = half-way through the hires
    pass), unless ``use_old_scheduling`` (A1111's "Old prompt editing timelines").
    """
    if steps < 1:
        raise InvalidRequestError(f"steps must be at least 1 to schedule a prompt, got {steps}")
    if hires_steps is None or use_old_scheduling:
        int_offset, flt_offset, total = 0, 0.0, steps
    else:
        int_offset, flt_offset, total = steps, 1.0, hires_steps
        if total < 1:
            raise InvalidRequestError(f"hires_steps must be at least 1, got {hires_steps}")

    try:
        tree = _Parser(prompt).start()
    except (_Failed, RecursionError):
        return [(total, prompt)]

    whens: dict[int, int] = {}
    boundaries = {total}
    for node in _walk(tree):
        if isinstance(node, _Scheduled):
            when = _when(node.number, total, int_offset, flt_offset, use_old_scheduling)
            whens[id(node)] = when
            if when >= 1:
                boundaries.add(when)
        else:
            boundaries.update(range(1, total + 1))

    return [(t, _render(tree, t, whens)) for t in sorted(boundaries)]


def schedule_steps_for_sampler(steps: int, second_order: bool) -> int:
    """The step count A1111 schedules prompts over (``sampler_config.total_steps``).

    Second-order samplers (Heun, DPM2, DPM2 a, DPM++ 2S a, DPM++ SDE, Restart) call the model about
    twice per step, and A1111 counts denoiser calls, so their schedules use 2 x steps.
    """
    return steps * 2 if second_order else steps
