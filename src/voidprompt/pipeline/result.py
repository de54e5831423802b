"""What a generation returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from voidprompt.explain.record import Explanation
from voidprompt.request import GenerationRequest


@dataclass
class Result:
    """Images with everything needed to regenerate each one from its infotext alone."""

    images: list[Image.Image]
    infotexts: list[str]
    seeds: list[int]
    subseeds: list[int]
    prompts: list[str]
    negative_prompts: list[str]
    params: list[dict[str, Any]]
    timings: dict[str, float] = field(default_factory=dict)
    # True when the run stopped before its last iteration (A1111's "interrupted").
    interrupted: bool = False
    # The request as it ran: canonical sampler names, fixed seeds, img2img defaults filled in.
    request: GenerationRequest | None = None
    # With the explain capture on: one per image, in image order.
    explanations: list[Explanation] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)
