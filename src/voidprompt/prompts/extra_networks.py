"""Extra-network tags in prompts: ``<lora:name:0.8>``, ``<hypernet:name:0.5>``, ``<lora:name:te=1:unet=0.5>``.

A1111 (``modules/extra_networks.py``) removes every ``<kind:args>`` tag - ``kind`` a run of word
characters, ``args`` anything up to the next ``>`` - from the positive prompt before conditioning,
and hands the parsed calls to the network handlers. The infotext keeps the tags.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = [
    "ExtraNetworkCall",
    "extract_extra_networks",
    "parse_extra_network_args",
]

_TAG = re.compile(r"<(\w+):([^>]+)>")


@dataclass(frozen=True)
class ExtraNetworkCall:
    """One tag. ``items`` are its ``:``-separated fields; ``name`` is the first positional one.

    A field ``key=value`` is named; anything else, including ``a=b=c``, is positional (A1111 splits on
    ``=`` at most twice and only a two-part result counts as named).
    """

    kind: str
    name: str
    args: tuple[str, ...] = ()
    named: dict[str, str] = field(default_factory=dict)
    items: tuple[str, ...] = ()

    @property
    def positional(self) -> tuple[str, ...]:
        return (self.name, *self.args) if self.name or self.args else ()


def parse_extra_network_args(kind: str, args: str) -> ExtraNetworkCall:
    items = tuple(args.split(":"))
    positional: list[str] = []
    named: dict[str, str] = {}
    for item in items:
        parts = item.split("=", 2)
        if len(parts) == 2:
            # A1111 quirk: a repeated key keeps the last value.
            named[parts[0]] = parts[1]
        else:
            positional.append(item)
    name = positional[0] if positional else ""
    return ExtraNetworkCall(kind, name, tuple(positional[1:]), named, items)


def extract_extra_networks(prompt: str) -> tuple[str, list[ExtraNetworkCall]]:
    """Remove every tag from ``prompt``; return the remaining text and the calls in prompt order.

    Nothing else changes: the spaces or commas around a removed tag stay where they were.
    """
    calls: list[ExtraNetworkCall] = []

    def take(m: re.Match[str]) -> str:
        calls.append(parse_extra_network_args(m.group(1), m.group(2)))
        return ""

    return _TAG.sub(take, prompt), calls
