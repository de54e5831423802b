"""Job ids outlive new request fields: a catalog written before a field existed resumes as it was.

The id below is the first job of the demo study (voidprompt/demo/pure-negative.toml) as a catalog
made by an earlier version (before the SDXL, refiner and noise-schedule settings joined the request)
recorded it.
"""

from __future__ import annotations

from voidprompt.demo.study import DEMO_STUDY
from voidprompt.lab.study import JOB_ID_FIELDS_V1, job_id, load_study, request_to_dict
from voidprompt.request import GenerationRequest

STUDY = DEMO_STUDY
FIRST_JOB_BEFORE_THE_NEW_FIELDS = "927766104d0459ef24ec"


def test_the_demo_study_keeps_the_job_ids_of_older_catalogs() -> None:
    first = load_study(STUDY).expand()[0]
    assert first.job_id == FIRST_JOB_BEFORE_THE_NEW_FIELDS


def test_a_newer_field_counts_once_it_leaves_its_default() -> None:
    first = load_study(STUDY).expand()[0]
    cropped = first.request.replace(sdxl_crop_top=8)
    assert job_id(cropped, first.axis_values, first.model) != first.job_id
    assert job_id(first.request.replace(), first.axis_values, first.model) == first.job_id


def test_the_v1_fields_are_request_fields() -> None:
    # A renamed or removed field would silently drop out of every id.
    assert set(request_to_dict(GenerationRequest())) >= JOB_ID_FIELDS_V1
