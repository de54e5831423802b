"""Pydantic schemas of the lab's HTTP routes: the study queue, designing a study, comparing images."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class QueueAdd(BaseModel):
    model_config = ConfigDict(extra="forbid")
    study: str = Field(description="the study's id (GET /voidprompt/v1/studies lists them)")
    paused: bool = Field(default=False, description="add it held: it waits until resumed")
    position: int | None = Field(default=None, ge=0, description="its place in the queue (default: the end)")


class QueueMove(BaseModel):
    model_config = ConfigDict(extra="forbid")
    position: int = Field(ge=0, description="0 is the front; past the end is the end")


class QueueEntry(BaseModel):
    study: str
    state: str = Field(description="queued, running, paused, done, failed or cancelled")
    total: int = Field(description="the study's jobs")
    done: int = Field(description="jobs with their picture in the catalog")
    catalog: str
    added: str
    message: str
    images_per_minute: float | None = Field(description="since this run's first image")
    eta_seconds: float | None


class QueueSnapshot(BaseModel):
    version: int = Field(description="grows at every change; the events route sends each one")
    running: str | None
    items: list[QueueEntry]


class DesignFormBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    fields: dict[str, Any] = Field(
        default_factory=dict,
        description="txt2img request fields (prompt and negative_prompt become [prompt]; the rest "
        "[settings]); a field an axis is named after is left to the axis",
    )
    axes: dict[str, Any] = Field(
        default_factory=dict,
        description='axis name -> values as in a study file: "3, 5, 7", "1-3 (+0.5)", "8 random", '
        '"1:1 @ 1, 4:3 @ 1.5", A1111\'s X/Y/Z syntax, or a list',
    )
    model: dict[str, Any] = Field(default_factory=dict, description="the [model] table: checkpoint, vae")
    master_seed: int | None = None
    description: str | None = None


class DesignBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(
        default="untitled",
        description="the study's name and file name (NAME.toml in the studies folder): letters, digits, "
        ". _ -",
    )
    toml: str | None = Field(default=None, description="the study file's text (instead of form)")
    form: DesignFormBody | None = Field(default=None, description="the study as a form (instead of toml)")


class DesignSave(DesignBody):
    overwrite: bool = Field(default=False, description="replace an existing study file of that name")


class ShapeCount(BaseModel):
    width: int
    height: int
    jobs: int


class DesignCheck(BaseModel):
    valid: bool
    error: str | None = Field(default=None, description="study check's message")
    field: str | None = Field(
        default=None, description='the section and key the error is about, e.g. "[axes] W"'
    )
    name: str | None = None
    jobs: int | None = None
    done: int | None = Field(default=None, description="jobs the study's catalog already has (a saved study)")
    axes: dict[str, list[Any]] = Field(default_factory=dict, description="each axis's expanded values")
    shapes: list[ShapeCount] = Field(default_factory=list)
    prompts: int | None = None
    megapixels: float | None = None
    estimated_seconds: float | None = Field(
        default=None, description="from the study's catalog's measured speed; null until it has images"
    )
    summary: str | None = Field(default=None, description="what `voidprompt study check` prints")
    toml: str = Field(description="the study file's text (the form written as TOML)")


class DesignSaved(BaseModel):
    study: str
    path: str
    jobs: int


class InfotextBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    infotext: str = Field(description="an image's parameters text (PNG Info)")


class InfotextFields(BaseModel):
    fields: dict[str, Any] = Field(description="the txt2img request fields the infotext sets")


class CompareSide(BaseModel):
    study: str
    image: int
    job_id: str
    url: str
    axis_values: dict[str, Any]
    settings: dict[str, Any]


class CompareResponse(BaseModel):
    a: CompareSide
    b: CompareSide
    differences: dict[str, list[Any]] = Field(
        description="request field (or axis, as axis:NAME) -> [a's value, b's value], only those that differ"
    )
