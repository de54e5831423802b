"""What other packages give the lab, by name: labelers and named models.

A study names them and never more: ``[labels] labeler = "detector"`` picks a registered labeler,
``[model] checkpoint = "miniature"`` a registered model (anything else there is a file). Packages
register them as Python entry points, so the lab imports none of them::

    [project.entry-points."voidprompt.labelers"]
    detector = "voidprompt.demo.labeler:DetectorLabeler"      # a class or function -> a Labeler

    [project.entry-points."voidprompt.models"]
    miniature = "voidprompt.demo.miniature:MINIATURE_MODEL"   # a NamedModel

A caller may also hand the lab its own :class:`Plugins` (tests do); :func:`installed_plugins` is
what the installed packages registered. One named model may be the default: the model of a study
whose ``[model]`` names no checkpoint (voidprompt's own is the shipped miniature model).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from PIL import Image

from voidprompt.errors import StudyError, did_you_mean
from voidprompt.lab.schema import LabelOptions, ModelRef

LABELERS_GROUP = "voidprompt.labelers"
MODELS_GROUP = "voidprompt.models"


@dataclass(frozen=True)
class Label:
    """An outcome class, free tags, and numbers the plugin read off the image.

    ``measures`` are stored with the image's other measures (so reports can plot them against any
    axis); name them after the plugin, e.g. ``detector_objects``.
    """

    label_class: str | None
    tags: tuple[str, ...] = ()
    measures: Mapping[str, float] = field(default_factory=dict)


@runtime_checkable
class Labeler(Protocol):
    """An auto-labeler plugin: one image in, one outcome class (of ``classes``) and free tags out.

    A labeler whose reading depends on the model's pixel scale may take a keyword ``native_size``
    in ``label`` (the side the model was trained at, from its ``voidprompt.arch`` metadata): the
    study runner then passes it (:func:`voidprompt.lab.labels.label_image`). A labeler that cannot
    read one image raises a :class:`voidprompt.errors.VoidpromptError`: that image's job is then
    counted as failed and the study goes on."""

    name: str  # stored as the label's source
    classes: Sequence[str]

    def label(self, image: Image.Image) -> Label: ...


@dataclass(frozen=True)
class NamedModel:
    """A model a study may name instead of giving a file."""

    path: Callable[[], Path]  # where its checkpoint is (may raise ModelLoadError when it is missing)
    labeler: str | None = None  # the labeler that reads its pictures unless [labels] says otherwise
    default: bool = False  # the model of a study that names none


@dataclass(frozen=True)
class ModelFiles:
    checkpoint: Path
    vae: Path | None

    def absolute(self) -> ModelFiles:
        """The same files by absolute paths: a worker process's working directory is not the driver's."""
        return ModelFiles(self.checkpoint.absolute(), self.vae.absolute() if self.vae else None)


@dataclass(frozen=True)
class Plugins:
    """The labelers (name -> factory) and named models a study may use."""

    labelers: Mapping[str, Callable[..., Any]] = field(default_factory=dict)
    models: Mapping[str, NamedModel] = field(default_factory=dict)

    def labeler(self, name: str, options: LabelOptions | None = None) -> Labeler:
        """A fresh labeler registered as ``name``; one whose factory takes a keyword ``options`` gets
        the study's ``[labels]`` (the tagger labelers read their tagger and rules there)."""
        factory = self.labelers.get(name)
        if factory is None:
            raise StudyError(
                f"[labels] labeler = {name!r} is not registered; registered: {_names(self.labelers)} "
                f'(or "none" for no pre-labels). Packages register labelers under the {LABELERS_GROUP!r} '
                "entry point group; after updating voidprompt from source, reinstall it (pip install -e .)"
                + did_you_mean(name, self.labelers)
            )
        if _takes_options(factory):
            labeler = factory(options=options or LabelOptions())
        else:
            unread = options.tag_options() if options is not None else {}
            if unread:
                raise StudyError(
                    f"[labels] {next(iter(unread))}: the labeler {name!r} does not read it; it is for the "
                    'tagger labelers (labeler = "wd14" or "deepdanbooru") - remove it or change the labeler'
                )
            labeler = factory()
        if not isinstance(labeler, Labeler):
            raise StudyError(f"the labeler {name!r} does not give a Labeler (name, classes, label(image))")
        return labeler

    def default_model(self) -> tuple[str, NamedModel] | None:
        defaults = [(name, model) for name, model in self.models.items() if model.default]
        if len(defaults) > 1:
            raise StudyError(
                f"several installed models claim to be the default ({', '.join(n for n, _ in defaults)}); "
                'name one in [model] checkpoint = "..."'
            )
        return defaults[0] if defaults else None

    def named_model(self, model: ModelRef) -> tuple[str, NamedModel] | None:
        """The registered model ``model`` names (the default one for no checkpoint); None for a file."""
        if model.checkpoint is None:
            return self.default_model()
        named = self.models.get(model.checkpoint)
        return None if named is None else (model.checkpoint, named)

    def model_labeler(self, model: ModelRef) -> str | None:
        """The labeler the named model asks for; None for a model given as a file."""
        named = self.named_model(model)
        return None if named is None else named[1].labeler

    def resolve_model(self, model: ModelRef, base_dir: Path) -> ModelFiles:
        """The checkpoint and VAE files of ``model``; relative names are relative to ``base_dir``."""
        vae = None if model.vae is None else _relative_to(Path(model.vae), base_dir)
        named = self.named_model(model)
        if named is not None:
            return ModelFiles(Path(named[1].path()), vae)
        if model.checkpoint is None:
            raise StudyError(
                "[model]: the study names no checkpoint and no default model is installed; set "
                '[model] checkpoint = "path/to/model.safetensors"'
            )
        checkpoint = _relative_to(Path(model.checkpoint), base_dir)
        if not checkpoint.is_file():
            raise StudyError(
                f"[model] checkpoint = {model.checkpoint!r}: no file at {checkpoint}; give a path relative "
                f"to the study file, an absolute one, or a registered model name ({_names(self.models)})"
            )
        return ModelFiles(checkpoint, vae)


def installed_plugins() -> Plugins:
    """The labelers and models the installed packages registered (their entry points).

    Labelers are imported when first used; models when this is called (to find the default).
    """
    labelers = {ep.name: _deferred(ep) for ep in entry_points(group=LABELERS_GROUP)}
    models = {}
    for ep in entry_points(group=MODELS_GROUP):
        model = _load(ep)
        if not isinstance(model, NamedModel):
            raise StudyError(f"the {MODELS_GROUP} entry point {ep.name!r} ({ep.value}) is not a NamedModel")
        models[ep.name] = model
    return Plugins(labelers, models)


class _Deferred:
    """An entry point's factory, imported when first called or inspected."""

    def __init__(self, ep: EntryPoint) -> None:
        self.ep = ep

    def target(self) -> Any:
        return _load(self.ep)

    def __call__(self, **kwargs: Any) -> Any:
        return self.target()(**kwargs)


def _deferred(ep: EntryPoint) -> Callable[..., Any]:
    return _Deferred(ep)


def _takes_options(factory: Callable[..., Any]) -> bool:
    target = factory.target() if isinstance(factory, _Deferred) else factory
    try:
        return "options" in inspect.signature(target).parameters
    except (TypeError, ValueError):  # a builtin or C callable without a signature
        return False


def _load(ep: EntryPoint) -> Any:
    try:
        return ep.load()
    except Exception as error:  # a broken third-party plugin: say which one, whatever it raised
        raise StudyError(f"the plugin {ep.name!r} ({ep.value}) cannot be loaded: {error}") from error


def _names(registry: Mapping[str, Any]) -> str:
    return ", ".join(repr(n) for n in sorted(registry)) or "(none)"


def _relative_to(path: Path, base: Path) -> Path:
    return path if path.is_absolute() else base / path
