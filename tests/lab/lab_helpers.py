"""Study texts and run options for the lab tests."""

from pathlib import Path
from typing import Any

from voidprompt.lab.schema import RunOptions
from voidprompt.lab.study import Study


def quiet(study: Study, **changes: Any) -> RunOptions:
    """The study's own [run] options with ``changes`` over them and no progress bar."""
    return study.run.override(progress=False, **changes)


def study_text(checkpoint: Path, *, sizes: str = "16x16, 32x16", seeds: str = "2 random", steps: int = 3,
               labels: str = 'labeler = "none"') -> str:  # fmt: skip
    return f"""
[study]
name = "t"
master_seed = 11
[model]
checkpoint = "{checkpoint}"
[settings]
sampler_name = "Euler a"
steps = {steps}
cfg_scale = 7.0
[prompt]
negative_step = {{ tags = "lowres, text", weight = "{{W}}" }}
[axes]
size = "{sizes}"
W = "1.0, 1.5"
seed = "{seeds}"
[labels]
{labels}
"""
