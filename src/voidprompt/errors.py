"""One exception hierarchy. Every message says what was wrong, with what value, and what to do."""

import difflib
import importlib
from collections.abc import Iterable
from types import ModuleType


class VoidpromptError(Exception):
    """Base of every error voidprompt raises on purpose."""


class ModelLoadError(VoidpromptError):
    """A checkpoint, VAE or network file could not be read or does not fit."""


class UnsafePickleError(ModelLoadError):
    """A pickled checkpoint asked for a class that is not on the allow-list; nothing was executed."""


class UnsupportedModelError(ModelLoadError):
    """The checkpoint is a model family voidprompt recognises but cannot run yet."""


class InvalidRequestError(VoidpromptError):
    """A generation request has a bad value (size, sampler name, steps, ...)."""


class PromptError(VoidpromptError):
    """A prompt cannot be encoded (for example an embedding of the wrong width is used)."""


class InfotextError(VoidpromptError):
    """Generation parameters text cannot be read or written."""


class StudyError(VoidpromptError):
    """A study file is invalid; the message names the file, the field and the fix."""


class DeviceError(VoidpromptError):
    """A device or precision that this machine, or its build of torch, cannot provide."""


class NansError(VoidpromptError):
    """A model produced a tensor of NaNs (A1111's ``NansException``); the generation is abandoned."""


class MissingExtraError(VoidpromptError, ModuleNotFoundError):
    """An optional package a command needs is not installed; the message names the extra to install.

    Also a ModuleNotFoundError (its ``name`` is the missing module), so code that already falls back
    on a missing import keeps working.
    """


def require_extra(module: str, extra: str, needed_by: str, *, instead: str = "") -> ModuleType:
    """Import ``module`` (a package of the optional dependency group ``extra``) or raise
    :class:`MissingExtraError` naming ``pip install 'voidprompt[extra]'``.

    ``needed_by`` says what wanted it (``"voidprompt serve"``); ``instead`` is an alternative that
    needs no install (``"or use --executor local"``). The one place that words this message.
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        missing = error.name or module
        alternative = f"; {instead}" if instead else ""
        raise MissingExtraError(
            f"{needed_by} needs {missing.partition('.')[0]}, which is not installed: "
            f"pip install 'voidprompt[{extra}]'{alternative}",
            name=missing,
        ) from None


def did_you_mean(name: str, choices: Iterable[str], *, ignore_case: bool = False) -> str:
    """``"; did you mean 'A' or 'B'?"`` for the near misses of ``name`` among ``choices``, else ``""``:
    the tail every "not one of ..." message ends with. ``ignore_case`` compares as the lookups of
    case-insensitive names (samplers, schedules) do, and suggests the choices' own spelling."""
    options = list(choices)
    if ignore_case:
        spelled: dict[str, str] = {}
        for option in options:
            spelled.setdefault(option.lower(), option)
        near = difflib.get_close_matches(name.strip().lower(), list(spelled), n=3, cutoff=0.6)
        matches = [spelled[m] for m in near]
    else:
        matches = difflib.get_close_matches(name, options, n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(repr(m) for m in matches)}?" if matches else ""
