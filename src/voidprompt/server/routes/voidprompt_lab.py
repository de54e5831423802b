"""voidprompt's lab routes: the study queue (and its live progress), designing and saving a study,
a study's fields from an image's infotext, and two images compared.

Live progress is server-sent events (``GET /voidprompt/v1/queue/events``): one ``queue`` event with
the whole queue at once, then one at every change (a state, an order, an image done), and a comment
line every 15 s to keep proxies from closing the stream. ``GET /voidprompt/v1/queue`` answers the
same snapshot once.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from enum import Enum
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse

from voidprompt.errors import InvalidRequestError, StudyError
from voidprompt.infotext.to_request import request_fields_from_infotext
from voidprompt.lab.catalog import catalog_path_beside
from voidprompt.lab.check import check_study
from voidprompt.lab.design import DesignForm, error_field, form_to_toml
from voidprompt.lab.schema import format_value
from voidprompt.lab.study import parse_study, request_to_dict
from voidprompt.request import GenerationRequest
from voidprompt.server import lab_models as lm
from voidprompt.server.checkpoints import NotFoundError
from voidprompt.server.routes import VOIDPROMPT
from voidprompt.server.state import App

__all__ = ["router"]

KEEP_ALIVE_S = 15.0
EVENTS_POLL_S = 0.25  # how soon a change reaches the stream


def _toml_of(body: lm.DesignBody, path: Path) -> str:
    if (body.toml is None) == (body.form is None):
        raise InvalidRequestError("give the study as toml (the file's text) or as form, one of the two")
    if body.toml is not None:
        return body.toml
    assert body.form is not None
    form = body.form
    return form_to_toml(
        DesignForm(
            name=body.name,
            fields=form.fields,
            axes=form.axes,
            model=form.model,
            master_seed=form.master_seed,
            description=form.description,
        ),
        path,
    )


def _shown(value: Any) -> Any:
    if isinstance(value, bool | int | float | str):
        return value
    return getattr(value, "spec", None) or format_value(value)


def router(state: App) -> APIRouter:
    router = APIRouter()
    prefix = VOIDPROMPT
    tags: list[str | Enum] = ["voidprompt lab"]
    queue = state.study_queue

    # ------------------------------------------------------------------------------------- queue

    @router.get(f"{prefix}/queue", tags=tags, response_model=lm.QueueSnapshot)
    def queue_snapshot() -> dict[str, Any]:
        """The study queue in its order, each study's state and progress."""
        return queue.snapshot()

    @router.get(f"{prefix}/queue/events", tags=tags, response_class=StreamingResponse)
    def queue_events() -> StreamingResponse:
        """Server-sent events: a `queue` event (the snapshot) now and at every change."""

        async def events() -> AsyncIterator[str]:
            # Polled on the event loop, not waited for in a worker thread: a closed connection or
            # a server shutdown cancels the stream at its next sleep.
            version, sent = -1, time.monotonic()
            while not queue.closed:
                if queue.version != version:
                    snapshot = queue.snapshot()
                    version = snapshot["version"]
                    yield f"event: queue\ndata: {json.dumps(snapshot)}\n\n"
                    sent = time.monotonic()
                elif time.monotonic() - sent >= KEEP_ALIVE_S:
                    yield ": keep-alive\n\n"
                    sent = time.monotonic()
                await asyncio.sleep(EVENTS_POLL_S)

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    @router.post(f"{prefix}/queue", tags=tags, response_model=lm.QueueEntry)
    def queue_add(body: lm.QueueAdd) -> dict[str, Any]:
        """Queue a study (it runs when its turn comes); refused over this server's limits, when it
        fails `study check`, or when another queued study writes the same catalog (409)."""
        item = queue.add(body.study, paused=body.paused, position=body.position)
        return _entry(item.study)

    def _entry(study_id: str) -> dict[str, Any]:
        for item in queue.snapshot()["items"]:
            if item["study"] == study_id:
                return dict(item)
        raise NotFoundError(f"study {study_id!r} is not in the queue")

    @router.post(f"{prefix}/queue/{{study_id}}/pause", tags=tags, response_model=lm.QueueEntry)
    def queue_pause(study_id: str) -> dict[str, Any]:
        """Stop its run (its finished images are kept); it waits until resumed."""
        queue.pause(study_id)
        return _entry(study_id)

    @router.post(f"{prefix}/queue/{{study_id}}/resume", tags=tags, response_model=lm.QueueEntry)
    def queue_resume(study_id: str) -> dict[str, Any]:
        """Queue it again at its place; its run makes only the images its catalog lacks."""
        queue.resume(study_id)
        return _entry(study_id)

    @router.post(f"{prefix}/queue/{{study_id}}/cancel", tags=tags, response_model=lm.QueueEntry)
    def queue_cancel(study_id: str) -> dict[str, Any]:
        """Stop it for good (resume still can take it up again); its images are kept."""
        queue.cancel(study_id)
        return _entry(study_id)

    @router.post(f"{prefix}/queue/{{study_id}}/move", tags=tags, response_model=list[str])
    def queue_move(study_id: str, body: lm.QueueMove) -> list[str]:
        """Move it to another place; answers the new order."""
        return queue.move(study_id, body.position)

    @router.delete(f"{prefix}/queue/{{study_id}}", tags=tags, response_model=list[str])
    def queue_remove(study_id: str) -> list[str]:
        """Take a study that is not running off the queue (its files stay)."""
        queue.remove(study_id)
        return [i["study"] for i in queue.snapshot()["items"]]

    # ------------------------------------------------------------------------------------ design

    @router.post(f"{prefix}/design/check", tags=tags, response_model=lm.DesignCheck)
    def design_check(body: lm.DesignBody) -> lm.DesignCheck:
        """`voidprompt study check` of a study given as TOML or as a form: its job count, each
        axis's values, the image shapes and the estimated time, or the error and the field it is
        about (valid=false; the request itself succeeded)."""
        path = state.studies.new_study_path(body.name)
        toml = _toml_of(body, path)
        try:
            study = parse_study(toml, path)
            catalog = catalog_path_beside(path)
            summary = check_study(study, catalog if catalog.exists() else None)
        except StudyError as error:
            text = str(error)
            prefix_text = f"{path}: "
            shown = text[len(prefix_text) :] if text.startswith(prefix_text) else text
            return lm.DesignCheck(valid=False, error=shown, field=error_field(error, path), toml=toml)
        return lm.DesignCheck(
            valid=True,
            name=summary.name,
            jobs=summary.jobs,
            done=summary.done,
            axes={name: [_shown(v) for v in values] for name, values in summary.axis_values.items()},
            shapes=[lm.ShapeCount(width=w, height=h, jobs=n) for (w, h), n in sorted(summary.shapes.items())],
            prompts=summary.prompts,
            megapixels=summary.megapixels,
            estimated_seconds=summary.estimated_seconds,
            summary=summary.format(),
            toml=toml,
        )

    @router.post(f"{prefix}/design/save", tags=tags, response_model=lm.DesignSaved)
    def design_save(body: lm.DesignSave) -> lm.DesignSaved:
        """Save a study (checked as `study check` does) as NAME.toml in the studies folder; an
        existing file only with overwrite=true (409 otherwise)."""
        path = state.studies.new_study_path(body.name)
        toml = _toml_of(body, path)
        study = parse_study(toml, path)
        summary = check_study(study)
        entry = state.studies.save_study(body.name, toml, overwrite=body.overwrite)
        return lm.DesignSaved(study=entry.id, path=str(path), jobs=summary.jobs)

    @router.post(f"{prefix}/design/from-infotext", tags=tags, response_model=lm.InfotextFields)
    def design_from_infotext(body: lm.InfotextBody) -> lm.InfotextFields:
        """The txt2img request fields an image's infotext sets, leaving out those at the request's
        default (A1111's reader fills in img2img's, which mean nothing to a txt2img study)."""
        fields = request_fields_from_infotext(body.infotext)
        defaults = request_to_dict(GenerationRequest())
        shown = {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}
        return lm.InfotextFields(
            fields={k: v for k, v in shown.items() if k not in defaults or v != defaults[k]}
        )

    # ----------------------------------------------------------------------------------- compare

    def _side(study_id: str, image_id: int) -> lm.CompareSide:
        entry = state.studies.get(study_id)
        with state.studies.open_readonly(entry) as catalog:
            row = next((r for r in catalog.images() if r["id"] == image_id), None)
        if row is None:
            raise NotFoundError(f"study {study_id!r} has no image {image_id}")
        return lm.CompareSide(
            study=study_id,
            image=image_id,
            job_id=row["job_id"],
            url=f"{prefix}/studies/{study_id}/images/{image_id}/file",
            axis_values=dict(row["axis_values"]),
            settings=dict(row["settings"]),
        )

    @router.get(f"{prefix}/compare", tags=tags, response_model=lm.CompareResponse)
    def compare(
        a_study: str = Query(description="the first image's study"),
        a_image: int = Query(ge=1, description="the first image's id in its catalog"),
        b_image: int = Query(ge=1, description="the second image's id"),
        b_study: str | None = Query(None, description="the second image's study (default: the first's)"),
    ) -> lm.CompareResponse:
        """Two images of one study or of two, side by side: their pictures, request fields and axis
        values, and what differs between them."""
        a = _side(a_study, a_image)
        b = _side(b_study or a_study, b_image)
        differences: dict[str, list[Any]] = {}
        for name in dict.fromkeys([*a.settings, *b.settings]):
            if a.settings.get(name) != b.settings.get(name):
                differences[name] = [a.settings.get(name), b.settings.get(name)]
        for name in dict.fromkeys([*a.axis_values, *b.axis_values]):
            if a.axis_values.get(name) != b.axis_values.get(name):
                differences[f"axis:{name}"] = [a.axis_values.get(name), b.axis_values.get(name)]
        return lm.CompareResponse(a=a, b=b, differences=differences)

    return router
