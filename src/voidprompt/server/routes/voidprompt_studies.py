"""voidprompt's study routes: studies, their images, measures and labels, reports, and runs."""

from __future__ import annotations

from enum import Enum
from typing import Any

from fastapi import APIRouter, Path, Query
from fastapi.responses import FileResponse

from voidprompt.errors import InvalidRequestError
from voidprompt.server import models as m
from voidprompt.server.checkpoints import NotFoundError
from voidprompt.server.routes import VOIDPROMPT, voidprompt_lab
from voidprompt.server.state import App
from voidprompt.server.studies import human_labeled, image_record

__all__ = ["SQLITE_MAX_INT", "image_id_param", "router"]

# Image ids are SQLite row ids: larger numbers cannot even be asked of the catalog.
SQLITE_MAX_INT = 2**63 - 1


def image_id_param() -> Any:
    return Path(ge=1, le=SQLITE_MAX_INT, description="the image's id in the study's catalog")


def router(state: App) -> APIRouter:
    router = APIRouter()
    prefix = VOIDPROMPT
    tags: list[str | Enum] = ["voidprompt"]

    @router.get(f"{prefix}/studies", tags=tags, response_model=list[m.StudyItem])
    def studies() -> list[m.StudyItem]:
        state.studies.refresh()
        return [m.StudyItem(**state.studies.summary(entry)) for entry in state.studies.entries.values()]

    @router.get(f"{prefix}/studies/{{study_id}}", tags=tags, response_model=m.StudyItem)
    def study(study_id: str) -> m.StudyItem:
        return m.StudyItem(**state.studies.summary(state.studies.get(study_id)))

    @router.get(f"{prefix}/studies/{{study_id}}/images", tags=tags, response_model=m.StudyImagesResponse)
    def study_images(
        study_id: str,
        where: list[str] = Query(  # noqa: B008 - FastAPI's way to declare a repeatable query parameter
            default=[], description="axis=value filters (repeatable; values compared as text)"
        ),
        label: str | None = Query(None, description="only images whose effective label is this class"),
        unlabeled: bool = Query(False, description="only images without a human label"),
        offset: int = Query(0, ge=0),
        limit: int = Query(500, ge=1, le=5000),
    ) -> m.StudyImagesResponse:
        entry = state.studies.get(study_id)
        filters: dict[str, str] = {}
        for item in where:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise InvalidRequestError(f"where={item!r}: write axis=value, e.g. where=W=1.5")
            filters[key] = value
        with state.studies.open_readonly(entry) as catalog:
            classes, _axis_names = state.studies.scheme(entry, catalog)
            rows = catalog.images()
            labels = catalog.all_labels()
            labeled = human_labeled(catalog)
        axes: dict[str, list[Any]] = {}
        for row in rows:
            for key, value in row["axis_values"].items():
                values = axes.setdefault(key, [])
                if value not in values:
                    values.append(value)
        unknown = set(filters) - set(axes)
        if unknown:
            raise InvalidRequestError(
                f"where: unknown axis {sorted(unknown)[0]!r}; axes: {', '.join(axes) or '(none)'}"
            )
        selected = []
        for row in rows:
            if any(str(row["axis_values"].get(k)) != v for k, v in filters.items()):
                continue
            image_labels = labels.get(row["id"], {})
            record = image_record(row, image_labels, f"{prefix}/studies/{study_id}/images/{row['id']}/file")
            if label is not None and record["label"] != label:
                continue
            if unlabeled and image_labels.get("human", (None, []))[0] is not None:
                continue
            selected.append(record)
        return m.StudyImagesResponse(
            study=study_id,
            total=len(selected),
            labeled=labeled,
            all_images=len(rows),
            classes=list(classes),
            axes=axes,
            images=[m.StudyImage(**r) for r in selected[offset : offset + limit]],
        )

    @router.get(
        f"{prefix}/studies/{{study_id}}/images/{{image_id}}", tags=tags, response_model=m.StudyImageDetail
    )
    def study_image(study_id: str, image_id: int = image_id_param()) -> m.StudyImageDetail:
        entry = state.studies.get(study_id)
        with state.studies.open_readonly(entry) as catalog:
            rows = [r for r in catalog.images() if r["id"] == image_id]
            if not rows:
                raise NotFoundError(f"study {study_id!r} has no image {image_id}")
            labels = catalog.labels(image_id)
            measures = catalog.measures(image_id)
        row = rows[0]
        record = image_record(row, labels, f"{prefix}/studies/{study_id}/images/{image_id}/file")
        explanation_url = None
        try:
            _image, explanation = state.studies.explanation_file(entry, image_id)
            if explanation.is_file():
                explanation_url = f"{prefix}/studies/{study_id}/images/{image_id}/explanation"
        except NotFoundError:
            pass  # the image's own file is missing: its row is still shown
        return m.StudyImageDetail(
            **record,
            infotext=row["infotext"],
            settings=row["settings"],
            measures=dict(measures),
            explanation_url=explanation_url,
        )

    @router.get(
        f"{prefix}/studies/{{study_id}}/images/{{image_id}}/file", tags=tags, response_class=FileResponse
    )
    def study_image_file(study_id: str, image_id: int = image_id_param()) -> FileResponse:
        entry = state.studies.get(study_id)
        return FileResponse(state.studies.image_file(entry, image_id))

    @router.get(f"{prefix}/studies/{{study_id}}/measures", tags=tags)
    def study_measures(study_id: str) -> dict[str, dict[str, float | None]]:
        entry = state.studies.get(study_id)
        with state.studies.open_readonly(entry) as catalog:
            return {str(k): dict(v) for k, v in catalog.all_measures().items()}

    @router.get(f"{prefix}/studies/{{study_id}}/labels", tags=tags)
    def study_labels(study_id: str) -> dict[str, dict[str, m.LabelValue]]:
        entry = state.studies.get(study_id)
        with state.studies.open_readonly(entry) as catalog:
            labels = catalog.all_labels()
        return {
            str(i): {s: m.LabelValue(label_class=c, tags=t) for s, (c, t) in v.items()}
            for i, v in labels.items()
        }

    @router.put(f"{prefix}/studies/{{study_id}}/labels/{{image_id}}", tags=tags, response_model=m.LabelValue)
    def put_label(study_id: str, body: m.LabelPut, image_id: int = image_id_param()) -> m.LabelValue:
        entry = state.studies.get(study_id)
        if not body.source or len(body.source) > 64:
            raise InvalidRequestError("source: 1 to 64 characters, e.g. human")
        state.studies.set_label(entry, image_id, body.label_class, body.tags, body.source)
        return m.LabelValue(label_class=body.label_class, tags=body.tags)

    def report_response(study_id: str, stamp: dict[str, Any]) -> m.ReportResponse:
        base = f"{prefix}/studies/{study_id}/report"
        names = list(stamp["figures"])
        figures = []
        for name in names:
            if not name.lower().endswith(".png"):
                continue
            stem = name[: -len(".png")]
            kind = next((k for k in ("grid", "plot", "outcomes") if stem.startswith(k + "-")), "figure")
            svg = f"{stem}.svg"
            figures.append(
                m.ReportFigure(
                    name=name,
                    kind=kind,
                    url=f"{base}/figures/{name}",
                    svg_url=f"{base}/figures/{svg}" if svg in names else None,
                )
            )
        files = [m.ReportFile(name=name, url=f"{base}/{name}") for name in stamp["files"]]
        html = next((f.url for f in files if f.name.endswith(".html")), None)
        return m.ReportResponse(
            study=study_id,
            generated=str(stamp.get("generated", "")),
            built=bool(stamp.get("built")),
            html_url=html,
            figures=figures,
            files=files,
        )

    @router.get(f"{prefix}/studies/{{study_id}}/report", tags=tags, response_model=m.ReportResponse)
    def study_report(
        study_id: str, rebuild: bool = Query(False, description="build it again even if up to date")
    ) -> m.ReportResponse:
        """The lab's report of a study (figures, report.html, CSVs); built first when missing or
        older than the catalog's images, measures and labels."""
        entry = state.studies.get(study_id)
        return report_response(study_id, state.studies.report(entry, rebuild=rebuild))

    @router.post(f"{prefix}/studies/{{study_id}}/report", tags=tags, response_model=m.ReportResponse)
    def rebuild_study_report(study_id: str) -> m.ReportResponse:
        entry = state.studies.get(study_id)
        return report_response(study_id, state.studies.report(entry, rebuild=True))

    @router.get(
        f"{prefix}/studies/{{study_id}}/report/figures/{{name}}", tags=tags, response_class=FileResponse
    )
    def study_report_figure(study_id: str, name: str) -> FileResponse:
        entry = state.studies.get(study_id)
        return FileResponse(state.studies.report_file(entry, name, figure=True))

    @router.get(f"{prefix}/studies/{{study_id}}/report/{{name}}", tags=tags, response_class=FileResponse)
    def study_report_file(study_id: str, name: str) -> FileResponse:
        entry = state.studies.get(study_id)
        return FileResponse(state.studies.report_file(entry, name, figure=False))

    @router.get(f"{prefix}/studies/{{study_id}}/run", tags=tags, response_model=m.RunStatus)
    def run_status(study_id: str) -> m.RunStatus:
        entry = state.studies.get(study_id)
        handle = state.studies.runs.get(entry.id)
        if handle is None:
            return m.RunStatus(study=study_id, running=False)
        return m.RunStatus(
            study=study_id,
            running=handle.process.poll() is None,
            returncode=handle.process.poll(),
            log_tail="\n".join(handle.log),
        )

    @router.post(f"{prefix}/studies/{{study_id}}/run", tags=tags, response_model=m.RunStatus)
    def start_run(
        study_id: str,
        max_jobs: int | None = Query(None, ge=0, le=SQLITE_MAX_INT),
        batch_size: int | None = Query(None, ge=1, le=4096),
    ) -> m.RunStatus:
        entry = state.studies.get(study_id)
        state.studies.start_run(entry, max_jobs=max_jobs, batch_size=batch_size)
        return m.RunStatus(study=study_id, running=True)

    @router.post(f"{prefix}/studies/{{study_id}}/stop", tags=tags, response_model=m.RunStatus)
    def stop_run(study_id: str) -> m.RunStatus:
        entry = state.studies.get(study_id)
        handle = state.studies.stop_run(entry)
        if handle is None:
            return m.RunStatus(study=study_id, running=False)
        return m.RunStatus(
            study=study_id, running=False, returncode=handle.process.poll(), log_tail="\n".join(handle.log)
        )

    # The queue, designing and comparing: the lab's routes beside the studies' own.
    router.include_router(voidprompt_lab.router(state))
    return router
