"""The lab: study files -> jobs -> catalog -> measures -> reports."""

from voidprompt.lab.sizes import aspect512, nai_buckets
from voidprompt.lab.study import Job, ModelRef, Study, StudySummary, load_study, parse_study, summarize

__all__ = [
    "Job",
    "ModelRef",
    "Study",
    "StudySummary",
    "aspect512",
    "load_study",
    "nai_buckets",
    "parse_study",
    "summarize",
]
