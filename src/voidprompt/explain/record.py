"""What the capture gathers for one picture: per-tag attention maps over step windows, the guidance
decomposition of every denoiser call, and the trajectory previews."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from voidprompt.errors import InvalidRequestError

POSITIVE = "positive"
NEGATIVE = "negative"
WINDOW_ALL = "all"
FIRST_PASS_WINDOWS = ("early", "middle", "late")
HIRES_WINDOW = "hires"


@dataclass(frozen=True)
class ExplainOptions:
    """What to capture besides the per-tag maps. ``per_token`` keeps a map per prompt token too;
    ``preview_every`` stores the trajectory previews of every k-th denoiser call of each pass (and
    its last call; 0: none); ``vae_calls`` are the calls (0-based, over the whole generation) whose
    guided prediction the full VAE decodes as well."""

    per_token: bool = False
    preview_every: int = 5
    vae_calls: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.preview_every < 0:
            raise InvalidRequestError(
                f"preview_every must be 0 (no previews) or more, got {self.preview_every}"
            )
        if any(call < 0 for call in self.vae_calls):
            raise InvalidRequestError(
                f"vae_calls are 0-based denoiser call indices (0 or more), got {list(self.vae_calls)}"
            )


@dataclass(frozen=True)
class TagInfo:
    """A tag of the positive prompt (AND sub-prompt ``part``) or of the negative prompt."""

    branch: str
    part: int
    label: str
    weight: float
    tokens: tuple[str, ...]

    @property
    def key(self) -> str:
        """``negative:lowres``; a sub-prompt past the first adds its index, ``positive#1:cat``."""
        part = f"#{self.part}" if self.part else ""
        return f"{self.branch}{part}:{self.label}"


@dataclass(frozen=True)
class TokenInfo:
    """One prompt token of a branch / sub-prompt / schedule entry, with its tag (index into the
    explanation's ``tags``, -1 for a comma)."""

    branch: str
    part: int
    entry: int
    index: int
    text: str
    weight: float
    tag: int


@dataclass(frozen=True)
class CallInfo:
    """One denoiser call: its pass (``first`` / ``hires``), its index within the pass, its sigma (the
    timestep for timestep samplers), whether the uncond branch ran, and the mean absolute difference
    between the cond and uncond predictions of the clean latent (None without an uncond branch)."""

    pass_name: str
    call: int
    sigma: float
    uncond: bool
    guidance_difference: float | None


@dataclass(frozen=True)
class Preview:
    """A trajectory step: the clean latent predicted by the positive prompt, by the negative prompt
    and by the guided combination, as cheap RGB pictures at latent resolution (A1111's live-preview
    subjects "Prompt", "Negative prompt", "Combined"), and the map of |cond - uncond| (mean over
    latent channels). ``call`` indexes the explanation's ``calls``."""

    call: int
    prompt: np.ndarray
    negative: np.ndarray | None
    combined: np.ndarray
    difference: np.ndarray | None


@dataclass
class Explanation:
    """Everything captured for one picture.

    ``tag_maps[i, w]`` is tag i's attention in window ``windows[w]``: the head-mean cross-attention
    probability of its tokens, summed over tokens and layers (each layer upsampled to the final latent
    size), averaged over the window's calls where the tag's branch ran (NaN where it never did).
    ``content_share[branch_key][window]`` is the share of attention the prompt's own tokens get (the
    rest goes to the start, end and padding rows)."""

    latent_size: tuple[int, int]
    windows: tuple[str, ...]
    window_calls: dict[str, tuple[int, ...]]
    tags: tuple[TagInfo, ...]
    tag_maps: np.ndarray
    content_share: dict[str, dict[str, float]]
    calls: tuple[CallInfo, ...]
    previews: tuple[Preview, ...] = ()
    tokens: tuple[TokenInfo, ...] = ()
    token_maps: np.ndarray | None = None
    vae_previews: dict[int, np.ndarray] = field(default_factory=dict)

    def tag_index(self, key: str) -> int:
        for index, tag in enumerate(self.tags):
            if tag.key == key:
                return index
        raise KeyError(f"no tag {key!r}; tags: {', '.join(t.key for t in self.tags)}")

    def window_index(self, window: str) -> int:
        if window not in self.windows:
            raise KeyError(f"no window {window!r}; windows: {', '.join(self.windows)}")
        return self.windows.index(window)
