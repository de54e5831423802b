"""A1111's "Version" rules: how a version is read, and the compatibility switches it turns on.

A1111 (``infotext_versions``, option ``auto_backcompat``, on by default) reads the "Version" of an
infotext and, for one written by an older release, turns on the settings that release behaved by.
Reading keeps the first two dash-separated parts when there are more (``v1.7.0-225-gabc1234`` is
``v1.7.0-225``, i.e. 1.7.0 post 225) and hands the rest to ``packaging``'s PEP 440 parser;
anything it rejects, such as our own ``voidprompt-0.1.0``, turns nothing on. voidprompt parses
PEP 440 itself (``packaging`` is not one of its dependencies); the tests hold it to ``packaging``.

This module is the only place that knows about versions: the reader adds :func:`backcompat_flags`
to the parsed dict, the request mapping turns those keys into request fields, and the writer asks
:func:`check_written_version` before it writes a "Version".
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from voidprompt import __version__
from voidprompt.errors import InfotextError

__all__ = [
    "DEFAULT_VERSION",
    "V160",
    "V170_TSNR",
    "V180",
    "V180_HR_STYLES",
    "Version",
    "backcompat_flags",
    "check_written_version",
    "parse_version",
]

# What we write as "Version". It must not parse as a PEP 440 version: A1111 turns on its
# backward-compatibility switches for any parseable version below its thresholds.
DEFAULT_VERSION = f"voidprompt-{__version__}"

# PEP 440's public and local version grammar, in its permissive spelling (any case, optional "v",
# "-", "_" or "." separators, "alpha"/"beta"/"c"/"pre"/"preview"/"rev"/"r" synonyms, implicit numbers).
_PEP440 = re.compile(
    r"""\s*v?
    (?:(?P<epoch>[0-9]+)!)?
    (?P<release>[0-9]+(?:\.[0-9]+)*)
    (?:[-_.]?(?P<pre_l>alpha|a|beta|b|preview|pre|c|rc)[-_.]?(?P<pre_n>[0-9]+)?)?
    (?:-(?P<post_implicit>[0-9]+)|[-_.]?(?P<post_l>post|rev|r)[-_.]?(?P<post_n>[0-9]+)?)?
    (?:[-_.]?(?P<dev_l>dev)[-_.]?(?P<dev_n>[0-9]+)?)?
    (?:\+(?P<local>[a-z0-9]+(?:[-_.][a-z0-9]+)*))?
    \s*""",
    re.VERBOSE | re.IGNORECASE,
)
_PRE_LETTER = {
    "a": "a",
    "alpha": "a",
    "b": "b",
    "beta": "b",
    "c": "rc",
    "rc": "rc",
    "pre": "rc",
    "preview": "rc",
}
_PRE_RANK = {"a": 0, "b": 1, "rc": 2}
_VERSION_PREFIX = re.compile(r"[^-]+-[^-]+(?=-)")


@dataclass(frozen=True, order=True)
class Version:
    """A PEP 440 version, ordered as PEP 440 orders versions; ``text`` is its normal form."""

    key: tuple[Any, ...]
    text: str = field(compare=False)

    def __str__(self) -> str:
        return self.text


def _sort_key(
    epoch: int,
    release: tuple[int, ...],
    pre: tuple[str, int] | None,
    post: int | None,
    dev: int | None,
    local: tuple[str, ...] | None,
) -> tuple[Any, ...]:
    # Trailing zeros do not count (1.6 == 1.6.0). A dev release without pre or post sorts before
    # every pre-release of its release; a post release after the final one; a dev release before
    # the release it develops; a local label after the public version, numbers after words.
    trimmed = release
    while len(trimmed) > 1 and trimmed[-1] == 0:
        trimmed = trimmed[:-1]
    if pre is not None:
        pre_key: tuple[int, ...] = (1, _PRE_RANK[pre[0]], pre[1])
    elif post is None and dev is not None:
        pre_key = (0,)
    else:
        pre_key = (2,)
    post_key = (0,) if post is None else (1, post)
    dev_key = (1,) if dev is None else (0, dev)
    local_key: tuple[Any, ...] = (0,)
    if local is not None:
        local_key = (1, *((1, int(p), "") if p.isdigit() else (0, 0, p) for p in local))
    return (epoch, trimmed, pre_key, post_key, dev_key, local_key)


def _parse_pep440(text: str) -> Version | None:
    m = _PEP440.fullmatch(text)
    if m is None:
        return None
    epoch = int(m["epoch"] or 0)
    release = tuple(int(p) for p in m["release"].split("."))
    pre = (_PRE_LETTER[m["pre_l"].lower()], int(m["pre_n"] or 0)) if m["pre_l"] else None
    post: int | None = None
    if m["post_implicit"] is not None:
        post = int(m["post_implicit"])
    elif m["post_l"]:
        post = int(m["post_n"] or 0)
    dev = int(m["dev_n"] or 0) if m["dev_l"] else None
    local = tuple(re.split(r"[-_.]", m["local"].lower())) if m["local"] else None

    pieces = [f"{epoch}!" if epoch else "", ".".join(map(str, release))]
    if pre is not None:
        pieces.append(f"{pre[0]}{pre[1]}")
    if post is not None:
        pieces.append(f".post{post}")
    if dev is not None:
        pieces.append(f".dev{dev}")
    if local is not None:
        pieces.append("+" + ".".join(local))
    return Version(_sort_key(epoch, release, pre, post, dev, local), "".join(pieces))


def parse_version(text: str | None) -> Version | None:
    """A1111's reading of a "Version" value, or None when A1111 cannot read it (nothing turns on)."""
    if text is None:
        return None
    text = str(text)
    prefix = _VERSION_PREFIX.match(text)
    if prefix is not None:
        text = prefix.group(0)
    return _parse_pep440(text)


def _threshold(text: str) -> Version:
    version = parse_version(text)
    assert version is not None, text
    return version


# A1111 1.10's thresholds: prompt-editing timelines and "Pad conds v0" changed in 1.6.0, the
# alphas_cumprod downcast was dropped at commit 225 after 1.7.0, the refiner switch changed in
# 1.8.0, and hires prompts took styles from commit 139 after 1.8.0.
V160 = _threshold("1.6.0")
V170_TSNR = _threshold("v1.7.0-225")
V180 = _threshold("1.8.0")
V180_HR_STYLES = _threshold("1.8.0-139")


def backcompat_flags(params: Mapping[str, Any]) -> dict[str, bool]:
    """The compatibility switches A1111 turns on for a parsed infotext's "Version".

    * before 1.6.0: "Old prompt editing timelines" when the prompt has ``[``; "Pad conds v0" when
      the sampler (as written, before any legacy suffix is split off) is DDIM or PLMS;
    * before v1.7.0-225: "Downcast alphas_cumprod";
    * before 1.8.0 with a Refiner: "Refiner switch by sampling steps".

    None when the version is missing or unreadable, such as the ``voidprompt-x.y.z`` we write.
    """
    version = parse_version(params.get("Version"))
    flags: dict[str, bool] = {}
    if version is None:
        return flags
    if version < V160 and "[" in str(params.get("Prompt", "")):
        flags["Old prompt editing timelines"] = True
    if version < V160 and params.get("Sampler", "") in ("DDIM", "PLMS"):
        flags["Pad conds v0"] = True
    if version < V170_TSNR:
        flags["Downcast alphas_cumprod"] = True
    if version < V180 and params.get("Refiner"):
        flags["Refiner switch by sampling steps"] = True
    return flags


def check_written_version(version: str | None) -> None:
    """Refuse to write a "Version" that would make A1111 read our image as an older release's."""
    if version is None:
        return
    parsed = parse_version(version)
    if parsed is not None and parsed < V180_HR_STYLES:
        raise InfotextError(
            f"Version {version!r} reads as version {parsed}, which turns on A1111's "
            f"backward-compatibility switches for this image; write a non-numeric version such as "
            f"{DEFAULT_VERSION!r}"
        )
