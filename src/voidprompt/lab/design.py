"""Designing a study outside a file: a form (txt2img fields plus axes) written as study TOML, the
checks ``voidprompt study check`` makes, and the field an error belongs to.

The form is a front end's: the web UI and HTTP clients send one, this module writes it as the TOML
a person would, and the lab's own reader (:func:`voidprompt.lab.study.parse_study`) judges it, so
a study designed in the browser meets exactly the rules and messages of a study file.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from voidprompt.errors import StudyError
from voidprompt.lab.study import parse_study

__all__ = ["DesignForm", "error_field", "form_to_toml"]

# The request fields a form may carry that mean nothing in a study (each job is one image); an
# infotext or a txt2img form carries them with their default of 1.
_ONE_IMAGE = ("batch_size", "n_iter")


@dataclass(frozen=True)
class DesignForm:
    """A study as a form: ``fields`` are txt2img request fields (``prompt`` and
    ``negative_prompt`` go to ``[prompt]``, the rest to ``[settings]``); ``axes`` map an axis name
    to its values, written as in a study file (a string in A1111's X/Y/Z syntax or the lab's, or a
    list); ``model`` is the ``[model]`` table."""

    name: str
    fields: Mapping[str, Any]
    axes: Mapping[str, Any]
    model: Mapping[str, Any]
    master_seed: int | None = None
    description: str | None = None


def _toml_value(value: Any, where: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise StudyError(f"{where}: {value!r} is not a finite number; write e.g. 7.5")
        return repr(value)
    if isinstance(value, str):
        # A JSON string is a TOML basic string: the same escapes, control characters as \uXXXX.
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v, where) for v in value) + "]"
    if isinstance(value, Mapping):
        items = ", ".join(f"{_toml_key(str(k))} = {_toml_value(v, where)}" for k, v in value.items())
        return "{ " + items + " }" if items else "{}"
    raise StudyError(f"{where}: {value!r} cannot be written in a study file; use a string, number or list")


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key, ensure_ascii=False)


def form_to_toml(form: DesignForm, path: Path | str = "<form>") -> str:
    """The study file a form stands for. What an axis sweeps is left out of ``[settings]`` (a size
    axis its width and height; which field an axis sets is the lab reader's answer), and so are
    ``None`` values (TOML has no null). ``path`` anchors relative file names, as the file's own."""
    swept = set(form.axes)
    try:
        for axis in parse_study(_write(form, {}), path).axes:
            swept.add(axis.target)
            if axis.kind == "size":
                swept |= {"width", "height"}
    except StudyError:
        pass  # the axes themselves are wrong: the whole form's check names the mistake
    settings = {
        k: v
        for k, v in form.fields.items()
        if v is not None and k not in swept and not (k in _ONE_IMAGE and v == 1)
    }
    return _write(form, settings)


def _write(form: DesignForm, fields: Mapping[str, Any]) -> str:
    lines = ["[study]", f"name = {_toml_value(form.name, '[study] name')}"]
    if form.description:
        lines.append(f"description = {_toml_value(form.description, '[study] description')}")
    if form.master_seed is not None:
        lines.append(f"master_seed = {_toml_value(form.master_seed, '[study] master_seed')}")
    model = {k: v for k, v in form.model.items() if v not in (None, "")}
    if model:
        lines += ["", "[model]"]
        lines += [f"{_toml_key(k)} = {_toml_value(v, f'[model] {k}')}" for k, v in model.items()]
    settings = {k: v for k, v in fields.items() if k not in ("prompt", "negative_prompt")}
    prompt = {"prompt": "positive", "negative_prompt": "negative"}
    prompts = {prompt[k]: v for k, v in form.fields.items() if k in prompt and v is not None}
    if settings:
        lines += ["", "[settings]"]
        lines += [f"{_toml_key(k)} = {_toml_value(v, f'[settings] {k}')}" for k, v in settings.items()]
    if prompts:
        lines += ["", "[prompt]"]
        lines += [f"{k} = {_toml_value(v, f'[prompt] {k}')}" for k, v in prompts.items()]
    if form.axes:
        lines += ["", "[axes]"]
        lines += [f"{_toml_key(str(k))} = {_toml_value(v, f'[axes] {k}')}" for k, v in form.axes.items()]
    return "\n".join(lines) + "\n"


# "{path}: {where}: {message}": where is a section and key, e.g. "[axes] W", "[[points]] #2 seed".
_WHERE = re.compile(r"(\[\[?[A-Za-z_]+\]\]?(?:[ .][^:]*?)?): ")


def error_field(error: StudyError, path: Path | str) -> str | None:
    """The section and key a study error names (``"[axes] W"``, ``"[settings] steps"``), or None
    when it names none (the whole file)."""
    message = str(error)
    prefix = f"{path}: "
    if message.startswith(prefix):
        message = message[len(prefix) :]
    match = _WHERE.match(message)
    return match[1].strip() if match else None
