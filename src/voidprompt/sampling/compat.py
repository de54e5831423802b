"""Backward-compatibility switches implied by an infotext's "Version" (A1111 ``infotext_versions``).

A1111 (option ``auto_backcompat``, on by default) turns on compatibility settings when it reads
parameters written by an older release. :func:`backcompat_overrides` returns the same decisions as
``GenerationRequest`` field overrides. Versions we write ("voidprompt-x.y.z") never trigger them.

``use_old_karras_scheduler_sigmas`` (Karras range 0.1..10) has no infotext key and no version rule
in A1111; it is only ever set explicitly, so it is never returned here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_PEP440 = re.compile(
    r"""^\s*v?
    (?P<release>[0-9]+(?:\.[0-9]+)*)
    (?:[-_.]?(?P<pre_l>alpha|a|beta|b|preview|pre|c|rc)[-_.]?(?P<pre_n>[0-9]+)?)?
    (?:-(?P<post_n1>[0-9]+)|[-_.]?(?P<post_l>post|rev|r)[-_.]?(?P<post_n2>[0-9]+)?)?
    (?:[-_.]?(?P<dev_l>dev)[-_.]?(?P<dev_n>[0-9]+)?)?
    (?:\+[a-z0-9]+(?:[-_.][a-z0-9]+)*)?
    \s*$""",
    re.VERBOSE | re.IGNORECASE,
)
_PRE_RANK = {"a": 0, "alpha": 0, "b": 1, "beta": 1, "c": 2, "rc": 2, "pre": 2, "preview": 2}


@dataclass(frozen=True, order=True)
class Version:
    """A PEP 440 version reduced to a sort key (the subset ``packaging.version`` accepts that A1111
    versions use: release, pre, post including the bare "-N" form, dev, local)."""

    key: tuple[tuple[int, ...], tuple[float, ...], float, float]


def _key(text: str) -> Version | None:
    m = _PEP440.match(text)
    if m is None:
        return None
    release = tuple(int(p) for p in m["release"].split("."))
    while len(release) > 1 and release[-1] == 0:
        release = release[:-1]
    dev = float(m["dev_n"] or 0) if m["dev_l"] else float("inf")
    post_text = m["post_n1"] or m["post_n2"]
    has_post = m["post_n1"] is not None or re.search(r"(post|rev|r)", m.group(0)[m.end("release") :] or "")
    post = float(post_text or 0) if has_post else -1.0
    if m["pre_l"]:
        pre: tuple[float, ...] = (0, _PRE_RANK[m["pre_l"].lower()], float(m["pre_n"] or 0))
    elif dev != float("inf") and post < 0:
        pre = (-1,)  # a bare dev release sorts before every pre-release
    else:
        pre = (1,)
    return Version((release, pre, post, dev))


def parse_version(text: str | None) -> Version | None:
    """A1111's ``infotext_versions.parse_version``: keep the first two '-'-separated parts
    ("v1.7.0-225-gabc123" -> "v1.7.0-225", i.e. 1.7.0.post225), then parse; None if unparsable."""
    if text is None:
        return None
    m = re.match(r"([^-]+-[^-]+)-.*", text)
    if m:
        text = m.group(1)
    return _key(text)


V160 = _key("1.6.0")
V170_TSNR = _key("v1.7.0-225")


def is_own_version(text: str | None) -> bool:
    return bool(text) and str(text).strip().lower().startswith("voidprompt")


def backcompat_overrides(version: str | None, prompt: str, sampler_name: str | None) -> dict[str, bool]:
    """GenerationRequest overrides A1111's ``backcompat`` would apply for an infotext.

    - < 1.6.0 and '[' in the prompt: old prompt editing timelines (``use_old_scheduling``);
    - < 1.6.0 and sampler DDIM or PLMS: "Pad conds v0" (``pad_cond_uncond_v0``);
    - < v1.7.0-225: "Downcast alphas_cumprod" (``use_downcasted_alpha_bar``).
    """
    if is_own_version(version):
        return {}
    ver = parse_version(version)
    if ver is None:
        return {}
    assert V160 is not None and V170_TSNR is not None
    out: dict[str, bool] = {}
    if ver < V160 and "[" in (prompt or ""):
        out["use_old_scheduling"] = True
    if ver < V160 and (sampler_name or "") in ("DDIM", "PLMS"):
        out["pad_cond_uncond_v0"] = True
    if ver < V170_TSNR:
        out["use_downcasted_alpha_bar"] = True
    return out
