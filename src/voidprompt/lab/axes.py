"""Axis values in A1111's X/Y/Z plot syntax, plus the study's own axes (sizes, seeds, prompts).

Behaviour re-derived from A1111's ``scripts/xyz_grid.py`` and ``scripts/prompt_matrix.py``
(read for behaviour only). Every function raises :class:`StudyError` with a message about the
value; ``voidprompt.lab.study`` prefixes the file and the field.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from voidprompt.errors import StudyError
from voidprompt.lab.sizes import SDXL_BUCKETS, aspect512, nai_buckets
from voidprompt.request import MAX_SIDE

# A1111 draws random seeds with random.randrange(4294967294) (xyz_grid fix_axis_seeds).
SEED_SPAN = 4294967294
# The most jobs one study file expands to, and so the most values one axis may hold; counted from
# the axes' lengths before any value list or job is built. Beyond it, split the study into files.
MAX_JOBS = 100_000

_INT = r"[+-]?\s*\d+"
_FLOAT = r"[+-]?\s*\d+(?:\.\d*)?"
# "start-end" with an optional signed "(+step)", or an optional "[count]"; whitespace anywhere.
_INT_STEP = re.compile(rf"\s*({_INT})\s*-\s*({_INT})(?:\s*\(([+-]\d+)\s*\))?\s*")
_INT_COUNT = re.compile(rf"\s*({_INT})\s*-\s*({_INT})(?:\s*\[(\d+)\s*])?\s*")
# A1111 writes the decimal point as an unescaped "." (any character); we accept only a real
# point, so "1x5-2" is an error here instead of a confusing float("1x5") failure later.
_FLOAT_STEP = re.compile(rf"\s*({_FLOAT})\s*-\s*({_FLOAT})(?:\s*\(([+-]\d+(?:\.\d*)?)\s*\))?\s*")
_FLOAT_COUNT = re.compile(rf"\s*({_FLOAT})\s*-\s*({_FLOAT})(?:\s*\[(\d+)\s*])?\s*")
_RANDOM_SEEDS = re.compile(r"\s*(\d+)\s+random\s*", re.IGNORECASE)
_EXPLICIT_SIZE = re.compile(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*")
_ASPECT_SIZE = re.compile(
    r"\s*(\d+(?:\.\d*)?)\s*:\s*(\d+(?:\.\d*)?)\s*(?:@\s*(\d+(?:\.\d*)?|\.\d+)\s*)?", re.IGNORECASE
)
_NAI_BUCKETS = re.compile(r"\s*nai\s+buckets\s*(?:@\s*(\d+)\s*[xX×]\s*(\d+)\s*)?", re.IGNORECASE)
_SDXL_BUCKETS = re.compile(r"\s*sdxl\s+buckets\s*", re.IGNORECASE)


def split_csv(text: str, *, skip_initial_space: bool = False) -> list[str]:
    """A1111's value list: csv module rules (quotes protect commas), every item stripped.

    A1111 quirk: csv's defaults only honour a quote at the very start of a field, so write
    ``a,"b, c"`` - in ``a, "b, c"`` the quote follows a space and the comma splits. A1111 1.10's
    X/Y/Z plot reads with csv's ``skipinitialspace`` (``skip_initial_space``), where both split
    into ``a`` and ``b, c``.
    """
    rows = csv.reader(io.StringIO(text), skipinitialspace=skip_initial_space)
    return [item.strip() for row in rows for item in row]


def _number(text: str) -> str:
    # int()/float() reject "- 5", which the range regexes allow.
    return re.sub(r"\s+", "", text)


def _as_items(values: str | Iterable[object]) -> list[object]:
    if isinstance(values, str):
        return list(split_csv(values))
    return list(values)


def _check_count(have: int, adding: int, text: object) -> None:
    """Refuse an item that would take an axis past MAX_JOBS values, before its values are made."""
    if have + adding > MAX_JOBS:
        raise StudyError(
            f"{text!r} makes {have + adding} values, over the limit of {MAX_JOBS} jobs per study file; "
            "split the study into several files with fewer values each"
        )


def _range_length(start: int, stop: int, step: int) -> int:
    # len(range(...)) without building it (and without len()'s OverflowError past sys.maxsize).
    if step > 0:
        return max(0, (stop - start + step - 1) // step)
    return max(0, (start - stop - step - 1) // -step)


def _finite(value: float, text: object) -> float:
    if not math.isfinite(value):
        raise StudyError(f"{text!r} is not a finite number; write an ordinary number such as 7.5")
    return value


def parse_int_values(values: str | Iterable[object]) -> list[int]:
    """Int axis: ``1-5`` (inclusive), ``1-10 (+2)``, ``10-1 (-3)``, ``1-10 [5]``, plain items."""
    out: list[int] = []
    for item in _as_items(values):
        if isinstance(item, bool):
            raise StudyError(f"{item!r} is not a whole number")
        if isinstance(item, int):
            out.append(item)
            continue
        if isinstance(item, float) and item.is_integer():
            out.append(int(item))
            continue
        text = str(item)
        step_match = _INT_STEP.fullmatch(text)
        count_match = _INT_COUNT.fullmatch(text)
        if step_match:
            start, end = int(_number(step_match[1])), int(_number(step_match[2]))
            step = int(step_match[3]) if step_match[3] else 1
            if step == 0:
                raise StudyError(f"{text!r}: a step of 0 never ends; use (+1) or (-1)")
            # A1111 quirk: the end is made inclusive with end+1 even for negative steps, so
            # "10-1 (-3)" gives 10, 7, 4 (not 1), and "10-1" with the default +1 gives nothing.
            _check_count(len(out), _range_length(start, end + 1, step), text)
            out.extend(range(start, end + 1, step))
        elif count_match:
            start, end = int(_number(count_match[1])), int(_number(count_match[2]))
            count = int(count_match[3]) if count_match[3] else 1
            _check_count(len(out), count, text)
            # A1111 quirk: linspace values are truncated with int(), not rounded.
            out.extend(int(v) for v in np.linspace(start, end, count).tolist())
        else:
            try:
                out.append(int(text))
            except ValueError:
                raise StudyError(
                    f"{text!r} is not a whole number or a range; write e.g. 7, 1-5, 1-10 (+2) or 1-10 [5]"
                ) from None
    return out


def parse_float_values(values: str | Iterable[object]) -> list[float]:
    """Float axis: ``0.5-1.5 [5]`` (linspace), ``0.1-1.0 (+0.2)`` (np.arange to end+step), items."""
    out: list[float] = []
    for item in _as_items(values):
        if isinstance(item, bool):
            raise StudyError(f"{item!r} is not a number")
        if isinstance(item, int | float):
            out.append(_finite(float(item), item))
            continue
        text = str(item)
        step_match = _FLOAT_STEP.fullmatch(text)
        count_match = _FLOAT_COUNT.fullmatch(text)
        if step_match:
            start, end = (_finite(float(_number(step_match[i])), text) for i in (1, 2))
            step = _finite(float(step_match[3]), text) if step_match[3] else 1.0
            if step == 0:
                raise StudyError(f"{text!r}: a step of 0 never ends; use e.g. (+0.1)")
            # A1111 quirk: np.arange(start, end + step, step) - float steps can overshoot the end
            # ("0.1-1.0 (+0.2)" ends at 1.1) and carry binary noise (0.30000000000000004).
            _check_count(len(out), max(0, math.ceil((end + step - start) / step)), text)
            out.extend(np.arange(start, end + step, step).tolist())
        elif count_match:
            start, end = (_finite(float(_number(count_match[i])), text) for i in (1, 2))
            count = int(count_match[3]) if count_match[3] else 1
            _check_count(len(out), count, text)
            out.extend(np.linspace(start, end, count).tolist())
        else:
            try:
                value = float(text)
            except ValueError:
                raise StudyError(
                    f"{text!r} is not a number or a range; write e.g. 7.5, 0.5-1.5 [5] or 0.1-1.0 (+0.2)"
                ) from None
            out.append(_finite(value, text))
    return out


def parse_str_values(values: str | Iterable[object]) -> list[str]:
    return [str(item) for item in _as_items(values)]


def parse_bool_values(values: str | Iterable[object]) -> list[bool]:
    out: list[bool] = []
    for item in _as_items(values):
        if isinstance(item, bool):
            out.append(item)
            continue
        text = str(item).strip().lower()
        if text in ("true", "yes", "1", "on"):
            out.append(True)
        elif text in ("false", "no", "0", "off"):
            out.append(False)
        else:
            raise StudyError(f"{item!r} is not a yes/no value; write true or false")
    return out


def parse_auto_values(values: str | Iterable[object]) -> list[object]:
    """Values of a prompt variable: numbers (and numeric ranges) become floats, the rest text."""
    out: list[object] = []
    for item in _as_items(values):
        if isinstance(item, int | float) and not isinstance(item, bool):
            out.append(_finite(item, item) if isinstance(item, float) else item)
            continue
        text = str(item)
        if _FLOAT_STEP.fullmatch(text) or _FLOAT_COUNT.fullmatch(text):
            numbers = parse_float_values([text])
            _check_count(len(out), len(numbers), text)
            out.extend(numbers)
        else:
            try:
                number = float(text)
            except ValueError:
                out.append(text)
            else:
                # "nan" or "inf" read as a number would reach the prompt as "nan" or "inf".
                out.append(_finite(number, text))
    return out


def derived_rng(master_seed: int, purpose: str) -> random.Random:
    """A random stream of its own per purpose, so adding one random axis never shifts another."""
    digest = hashlib.sha256(f"{master_seed}/{purpose}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def parse_seed_values(values: str | Iterable[object], master_seed: int, purpose: str = "seed") -> list[int]:
    """Seeds: a list, int ranges, ``N random`` (drawn from ``master_seed``) and -1 / empty (random).

    A1111 replaces -1 and empty seeds with fresh random ones each run; drawing them from the
    study's recorded master seed instead keeps the expansion - and so resume - deterministic.
    Random seeds never repeat a seed the axis already holds: a draw that does is dropped and the
    next one taken, so axes whose draws were all distinct keep exactly the seeds they always had.
    """
    rng = derived_rng(master_seed, purpose)
    out: list[int] = []
    seen: set[int] = set()

    def draw() -> int:
        if len(seen) >= SEED_SPAN:
            raise StudyError(f"no unused seed is left among the {SEED_SPAN} random seeds")
        seed = rng.randrange(SEED_SPAN)
        while seed in seen:
            seed = rng.randrange(SEED_SPAN)
        return seed

    def add(seed: int) -> None:
        out.append(seed)
        seen.add(seed)

    for item in _as_items(values):
        if isinstance(item, str):
            match = _RANDOM_SEEDS.fullmatch(item)
            if match:
                _check_count(len(out), int(match[1]), item)
                for _ in range(int(match[1])):
                    add(draw())
                continue
            if item.strip() == "":
                _check_count(len(out), 1, item)
                add(draw())
                continue
        seeds = parse_int_values([item])
        _check_count(len(out), len(seeds), item)
        for seed in seeds:
            add(draw() if seed == -1 else seed)
    return out


@dataclass(frozen=True)
class SizeValue:
    """One value of a size axis: the pixel size and how the study wrote it."""

    width: int
    height: int
    spec: str

    @property
    def label(self) -> str:
        return f"{self.width}x{self.height}"


def parse_size_values(values: str | Iterable[object], base: int = 512, unit: int = 64) -> list[SizeValue]:
    """Sizes: ``512x768``; ``4:3`` or ``4:3 @ 1.5`` (aspect512 at 1.5 x base^2); ``nai buckets``;
    ``sdxl buckets``.

    ``nai buckets`` uses NovelAI's defaults scaled to ``base`` (max area base x 1.5 base, sides
    base/2 .. 2 base, step ``unit``); ``nai buckets @ 512x768`` names the maximum area explicitly.
    ``sdxl buckets`` is SDXL's fixed list at 1024 (:data:`~voidprompt.lab.sizes.SDXL_BUCKETS`),
    whatever ``base`` is: its sizes are the ones SDXL was trained at.
    """
    out: list[SizeValue] = []
    for item in _as_items(values):
        text = str(item).strip()
        explicit = _EXPLICIT_SIZE.fullmatch(text)
        aspect = _ASPECT_SIZE.fullmatch(text)
        buckets = _NAI_BUCKETS.fullmatch(text)
        sizes: list[tuple[int, int]]
        if _SDXL_BUCKETS.fullmatch(text):
            sizes = list(SDXL_BUCKETS)
        elif explicit:
            sizes = [(int(explicit[1]), int(explicit[2]))]
        elif aspect:
            w, h = float(aspect[1]), float(aspect[2])
            area = float(aspect[3]) if aspect[3] else 1.0
            sizes = [aspect512(w, h, area=area, base=base, unit=unit)]
        elif buckets:
            if base * 2 > MAX_SIDE or unit < 8:
                # The bucket search walks every pair of sides from base/2 to 2 base in units.
                raise StudyError(
                    f"{text!r} with base={base}, unit={unit}: nai buckets need base <= {MAX_SIDE // 2} "
                    f"(sides reach 2 x base, at most {MAX_SIDE} pixels) and unit >= 8"
                )
            max_area = int(buckets[1]) * int(buckets[2]) if buckets[1] else base * base * 3 // 2
            sizes = nai_buckets(max_area=max_area, min_dim=base // 2, max_dim=base * 2, step=unit)
        else:
            raise StudyError(
                f"{text!r} is not a size; write 512x768, an aspect ratio and area like 4:3 @ 1.5, "
                "nai buckets or sdxl buckets"
            )
        for width, height in sizes:
            if max(width, height) > MAX_SIDE:
                raise StudyError(
                    f"{text!r} gives {width}x{height}: a side is over the limit of {MAX_SIDE} pixels; "
                    "use a smaller size or area"
                )
        _check_count(len(out), len(sizes), text)
        out.extend(SizeValue(width, height, text) for width, height in sizes)
    return out


def apply_prompt_sr(prompt: str, negative_prompt: str, search: str, replacement: str) -> tuple[str, str]:
    """A1111 Prompt S/R: replace every occurrence of ``search`` in both prompts."""
    if search not in prompt and search not in negative_prompt:
        raise StudyError(
            f"Prompt S/R did not find {search!r} in the prompt {prompt!r} or the negative prompt "
            f"{negative_prompt!r}; the first value must be text that occurs in one of them"
        )
    return prompt.replace(search, replacement), negative_prompt.replace(search, replacement)


def apply_prompt_order(prompt: str, tokens: Sequence[str]) -> str:
    """A1111's "Prompt order" axis: the listed tokens, where they first occur in ``prompt``, are
    rewritten in the order of ``tokens`` (one permutation of them); the text between them stays."""
    for token in tokens:
        if token not in prompt:
            # A1111 goes on with find()'s -1 and cuts the prompt at the wrong place.
            raise StudyError(f"Prompt order did not find {token!r} in the prompt {prompt!r}")
    positions = sorted(((prompt.find(token), token) for token in tokens), key=lambda pair: pair[0])
    parts = []
    rest = prompt
    for _, token in positions:
        at = rest.find(token)
        parts.append(rest[:at])
        rest = rest[at + len(token) :]
    return "".join(part + tokens[i] for i, part in enumerate(parts)) + rest


def prompt_matrix(text: str, *, put_at_start: bool = False, delimiter: str = ", ") -> list[str]:
    """A1111's prompt matrix: ``a|b|c`` -> every combination of the optional parts b, c.

    The first part is always kept as written; each later part is stripped of spaces and commas.
    Combination i includes part k+1 when bit k of i is set, so the order is
    ``a``, ``a, b``, ``a, c``, ``a, b, c`` - 2^(n-1) prompts. With ``put_at_start`` the fixed
    part goes last instead.
    """
    parts = text.split("|")
    first, optional = parts[0], parts[1:]
    most = MAX_JOBS.bit_length() - 1  # 2**most <= MAX_JOBS
    if len(optional) > most:
        raise StudyError(
            f"{len(optional)} optional parts make 2^{len(optional)} prompts, over the limit of {MAX_JOBS} "
            f"jobs per study file; use at most {most} optional parts"
        )
    prompts = []
    for combination in range(2 ** len(optional)):
        chosen = [part.strip().strip(",") for k, part in enumerate(optional) if combination & (1 << k)]
        prompts.append(delimiter.join([*chosen, first] if put_at_start else [first, *chosen]))
    return prompts


def read_prompts_file(path: Path) -> list[str]:
    """One prompt per line; lines are stripped and blank lines skipped (as A1111's prompts-from-file)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise StudyError(f"cannot read the prompts file {str(path)!r}: {error.strerror}") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise StudyError(f"the prompts file {str(path)!r} has no prompts; write one prompt per line")
    _check_count(0, len(prompts), f"the prompts file {path}")
    return prompts
