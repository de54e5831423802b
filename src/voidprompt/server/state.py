"""The server's settings and state: what ``voidprompt serve`` was started with, the model host, the
generation queue, the network folders, the studies and the recent explanations. Every route reads it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from voidprompt.models.placement import default_randn_source, resolve_device, resolve_precision
from voidprompt.models.tokenizer import load_clip_tokenizer
from voidprompt.models.upscalers.registry import Upscalers
from voidprompt.prompts.styles import StyleDatabase
from voidprompt.server.checkpoints import DEFAULT_CKPT_DIR, ModelRegistry
from voidprompt.server.explanations import DEFAULT_CACHE_SIZE, ExplanationCache
from voidprompt.server.generation import ModelHost, Options
from voidprompt.server.limits import Limits
from voidprompt.server.networks import NetworkFolders
from voidprompt.server.queue import GenerationQueue
from voidprompt.server.studies import StudyRegistry
from voidprompt.server.study_queue import StudyQueue

__all__ = ["DEFAULT_OUTDIR", "DEFAULT_STYLES_FILE", "App", "ServerConfig", "load_styles"]


DEFAULT_STYLES_FILE = Path("styles.csv")
# A1111's output folder: save_images=true writes to <outdir>/txt2img-images/<date>/ (and img2img-images),
# its default outdir_txt2img_samples with its default "[date]" subfolder.
DEFAULT_OUTDIR = Path("outputs")


def load_styles(paths: list[Path]) -> StyleDatabase:
    """The server's style database: A1111's rules, so an unknown style name is ignored."""
    present = [p for p in paths if p != DEFAULT_STYLES_FILE or p.is_file()]
    return StyleDatabase.from_csv_files(present, ignore_unknown=True)


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 7860
    ckpt_dirs: list[Path] = field(default_factory=lambda: [DEFAULT_CKPT_DIR])
    extra_checkpoints: list[Path] = field(default_factory=list)
    vae_dirs: list[Path] = field(default_factory=lambda: [Path("models/VAE")])
    # A1111's default folders (--lora-dir, --embeddings-dir, --hypernetwork-dir); None: no folder.
    lora_dir: Path | None = Path("models/Lora")
    embeddings_dir: Path | None = Path("embeddings")
    hypernetwork_dir: Path | None = Path("models/hypernetworks")
    # Taggers for /sdapi/v1/interrogate: A1111's DeepDanbooru folder and the WD14 tagger folders.
    deepdanbooru_dir: Path = Path("models/torch_deepdanbooru")
    wd14_dir: Path = Path("models/wd14")
    # Model upscalers: A1111's models folder, whose ESRGAN/ and RealESRGAN/ hold the files.
    upscaler_dir: Path = Path("models")
    # A1111's --styles-file (repeatable); its default styles.csv is read only when present.
    styles_files: list[Path] = field(default_factory=lambda: [DEFAULT_STYLES_FILE])
    default_model: str | None = None
    studies_dir: Path | None = None
    outdir: Path | None = DEFAULT_OUTDIR  # None: save_images is ignored
    credentials: dict[str, str] = field(default_factory=dict)
    cors_allow_origins: list[str] = field(default_factory=list)
    cors_allow_origin_regex: str | None = None
    limits: Limits = field(default_factory=Limits)
    device: str = "cpu"
    precision: str = "auto"  # models.placement.resolve_precision's names
    # Arguments every study run started from the web UI gets (serve's explicit --device/--precision).
    study_run_args: tuple[str, ...] = ()
    threads: int | None = None
    disable_nan_check: bool = False  # A1111's --disable-nan-check: keep NaN output (black pictures)
    # Explanations of generations on voidprompt's own routes kept in memory: the most recent ones.
    explain_cache: int = DEFAULT_CACHE_SIZE
    ui: bool = True


class App:
    """Server state: settings, the model host, the queue and the studies."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        device = resolve_device(config.device)
        self.options = Options({"randn_source": default_randn_source(device)})
        self.queue = GenerationQueue(max_queued=config.limits.max_queued)
        self.registry = ModelRegistry(config.ckpt_dirs, config.extra_checkpoints, config.vae_dirs)
        self.registry.refresh()
        self.networks = NetworkFolders(config.lora_dir, config.embeddings_dir, config.hypernetwork_dir)
        self.networks.refresh()
        self.styles = load_styles(config.styles_files)
        self.upscalers = Upscalers.in_models_dir(config.upscaler_dir, device=device)
        self.host = ModelHost(
            self.registry,
            self.options,
            self.queue.state,
            device=device,
            precision=resolve_precision(config.precision, device),
            networks=self.networks,
            style_db=self.styles,
            disable_nan_check=config.disable_nan_check,
            upscalers=self.upscalers,
        )
        if config.default_model:
            self.host.select(config.default_model)
        self.studies = StudyRegistry(config.studies_dir, run_args=config.study_run_args)
        self.study_queue = StudyQueue(self.studies, config.limits)
        self.explanations = ExplanationCache(config.explain_cache)
        self._tokenizer: Any = None

    def tokenizer(self) -> Any:
        if self.host.engine is not None:
            return self.host.engine.components.tokenizer
        if self._tokenizer is None:
            self._tokenizer = load_clip_tokenizer()
        return self._tokenizer

    def text_width(self) -> int | None:
        """The width of an embedding vector the current model takes (None when there is no
        checkpoint): from the model in memory, else from the selected checkpoint's tensor shapes
        (header only). SDXL's is CLIP-L's + bigG's, as A1111 measures an SDXL embedding."""
        selected = self.host.selected
        engine, loaded = self.host.engine, self.host.loaded
        if engine is not None and loaded is not None and (selected is None or loaded[0] is selected):
            return int(engine.encoder.width)
        if selected is None:
            return None
        return self.registry.facts(selected).text_width

    def options_dict(self) -> dict[str, Any]:
        values: dict[str, Any] = self.options.snapshot()
        selected = self.host.selected
        values["sd_model_checkpoint"] = selected.title if selected is not None else None
        values["sd_checkpoint_hash"] = selected.sha256 if selected is not None else None
        values["sd_vae"] = self.host.selected_vae
        return values
