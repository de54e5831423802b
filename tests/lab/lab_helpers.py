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


# Capture at 16x16, the first seed of the seed axis.
EXPLAIN_FIRST_SEED = '[explain]\nwhere = { size = "16x16" }\nseeds = 1\nmap_side = 4\n'


def explanations(folder: Path) -> dict[str, tuple[Any, ...]]:
    """job id -> what its explanation file holds (tags, windows, calls, the maps' bytes) and its
    tag_measures rows, for the catalog under ``folder``/runs/t. The files' own bytes carry the
    zip's write times, so their contents are compared."""
    from voidprompt.explain.store import load_explanation
    from voidprompt.lab.catalog import Catalog

    root = folder / "runs" / "t"
    with Catalog.open(root / "catalog.sqlite", readonly=True) as catalog:
        tags = catalog.all_tag_measures()
        out = {}
        for image in catalog.images():
            if image["explanation"] is None:
                continue
            loaded = load_explanation(root / image["explanation"])
            mine = [t for t in tags if t["image_id"] == image["id"]]
            rows = [{k: v for k, v in t.items() if k != "image_id"} for t in mine]
            maps = loaded.tag_maps.tobytes()
            out[image["job_id"]] = (loaded.tags, loaded.windows, loaded.calls, maps, rows)
        return out
