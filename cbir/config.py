"""params.yaml -> typed, validated settings.

params.yaml is the single source of parameters. Every relative path in it resolves against the
folder holding the params file, so a copy of params.yaml in another folder is a separate workspace.
"""

from __future__ import annotations

import os
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from .errors import ConfigError

DEFAULT_PARAMS = "params.yaml"


def _number_not_bool(annotation: Any) -> bool:
    """Whether a field's type takes numbers (int/float) and not booleans."""
    if annotation in (int, float):
        return True
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return _number_not_bool(args[0])
    if origin in (typing.Union, types.UnionType):
        return bool not in args and any(_number_not_bool(a) for a in args)
    return False


class _Section(BaseModel):
    # Unknown keys are typos until proven otherwise: refuse them instead of silently ignoring.
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # YAML reads yes/no/on/off/true/false as booleans, and pydantic would take them as 1
        # and 0 (`workers: yes` = one worker, `max_pixels: on` = every scan too large).
        if isinstance(value, bool) and info.field_name is not None:
            field = cls.model_fields.get(info.field_name)
            if field is not None and _number_not_bool(field.annotation):
                raise ValueError("expected a number, got a boolean (yes/no/on/off/true/false)")
        return value


class DataSettings(_Section):
    scans_dir: Path = Path("data/demo/scans")
    ground_truth: Path | None = Path("data/demo/ground_truth.csv")
    manifest_dir: Path = Path("data/manifest")
    catalog: Path = Path("data/catalog.duckdb")
    embeddings_dir: Path = Path("data/embeddings")
    index_dir: Path = Path("data/index")
    models_dir: Path = Path("data/models")
    pairs_dir: Path = Path("data/pairs")
    reports_dir: Path = Path("data/reports")
    cache_dir: Path = Path("data/cache")


class IngestSettings(_Section):
    workers: int = Field(0, ge=0, description="decode processes; 0 = all cores")
    max_pixels: int = Field(200_000_000, gt=0, description="larger images are quarantined")
    ignore: list[str] = Field(
        default_factory=lambda: [".*", "Thumbs.db", "desktop.ini", "*.md5", "*.sha256"],
        description="glob patterns (file or folder names) that are not scans",
    )
    journal_every: int = Field(500, gt=0, description="records per crash-recovery journal part")


class DemoSettings(_Section):
    out_dir: Path = Path("data/demo")
    n_groups: int = Field(150, ge=1)
    n_distractors: int = Field(150, ge=0)
    max_copies: int = Field(4, ge=1)
    size: int = Field(512, ge=64)
    seed: int = 0


class ModelSettings(_Section):
    backbone: Literal["resnet18", "resnet34", "resnet50"] = "resnet18"
    init: str = Field("none", description="none | a torchvision weights name | a local file")
    gem_p: float = Field(3.0, gt=0)
    projection: Literal["linear", "mlp"] = "linear"
    projection_dim: int = Field(512, ge=8)
    descriptor: Literal["trunk", "projection"] = "trunk"
    checkpoint: Path = Path("data/models/model.pt")
    seed: int = 0


class EmbedSettings(_Section):
    # "train": the training resolution. Descriptors are sharpest at the scale they were trained
    # at (benchmarks/quality.py: trained at 112 px, embedding at 112 px gave P@1 0.92, at 224 px
    # 0.81).
    resolution: Annotated[int, Field(ge=32)] | Literal["train"] = "train"
    # Multi-scale descriptor: sum of the descriptors at resolution * each scale (cost grows with
    # the sum of the scales squared). [1.0, 1.25]: benchmarks/quality.py mAP@10 0.953 vs 0.937.
    scales: list[Annotated[float, Field(gt=0, le=4)]] = Field([1.0, 1.25], min_length=1)
    batch_size: int = Field(32, ge=1)
    shard_size: int = Field(1000, ge=1)
    workers: int = Field(1, ge=0, description="DataLoader decode processes")
    device: str = "auto"


class IndexSettings(_Section):
    bytes_per_vector: int = Field(64, ge=8, description="PQ code budget per vector")
    target_recall: float = Field(0.95, gt=0, le=1)
    rebuild_factor: float = Field(4.0, ge=1)
    seed: int = 0


class SearchSettings(_Section):
    k: int = Field(10, ge=1, description="neighbours per image for pairs")
    pair_threshold: float = Field(0.8, ge=-1, le=1)
    cluster_threshold: float = Field(0.9, ge=-1, le=1)


class EvaluateSettings(_Section):
    ks: list[int] = Field(default_factory=lambda: [1, 5, 10])
    precision_target: float = Field(0.9, gt=0, le=1)
    baselines: bool = True


class TrainSettings(_Section):
    augmentation: Literal["simclr", "heritage"] = "heritage"
    augment_strength: float = Field(1.0, ge=0)
    resolution: int = Field(112, ge=32)
    batch_size: int = Field(64, ge=2)
    epochs: int = Field(25, ge=1)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_epochs: float = Field(1.0, ge=0)
    temperature: float = Field(0.05, gt=0)
    koleo_weight: float = Field(0.0, ge=0, description="0 turns the entropy regulariser off")
    mix_prob: float = Field(0.0, ge=0, le=1, description="probability of cutmix/mixup per batch")
    workers: int = Field(1, ge=0, description="DataLoader augmentation processes")
    device: str = "auto"
    time_budget_minutes: float = Field(0, ge=0, description="stop cleanly after this; 0 = none")
    seed: int = 0


class ReportSettings(_Section):
    page_size: int = Field(200, ge=1, description="pairs, clusters or queries per gallery page")
    max_pairs: int = Field(50_000, ge=0, description="strongest pairs in the gallery; 0 = all")
    thumb_size: int = Field(256, ge=32, le=2048, description="long side of thumbnails, px")


class OrchestrationSettings(_Section):
    """Prefect flows, the nightly schedule, the writer lock (not pipeline params: no DVC stage
    depends on them)."""

    nightly_cron: str = Field("0 2 * * *", description="when `cbir serve` runs the nightly flow")
    timezone: str = Field("UTC", description="IANA time zone of nightly_cron")
    dask_address: str | None = Field(None, description="Dask scheduler for the embedding "
                                     "shards (tcp://host:8786); null = in the flow's process")
    task_retries: int = Field(2, ge=0, description="retries of a task after a transient error")
    retry_delay_seconds: float = Field(10.0, ge=0)
    lock_timeout: float = Field(600.0, ge=0, description="seconds a writer waits for another "
                                "to finish; 0 = stop at once")
    nightly_evaluate: bool = Field(False, description="the nightly run also re-evaluates "
                                   "(when data.ground_truth is set); costs as much as a full "
                                   "evaluation")
    nightly_gallery: bool = Field(False, description="the nightly run also rewrites the review "
                                  "gallery; costs as much as a full `cbir report`")
    dvc_commit: bool = Field(True, description="flows record their outputs with `dvc commit` "
                             "in a DVC repository (and `dvc push` when a remote is set)")


class Settings(_Section):
    """All settings, with paths resolved against `root` (the params file's folder)."""

    root: Path
    params_path: Path
    data: DataSettings = DataSettings()
    ingest: IngestSettings = IngestSettings()
    demo: DemoSettings = DemoSettings()
    model: ModelSettings = ModelSettings()
    embed: EmbedSettings = EmbedSettings()
    index: IndexSettings = IndexSettings()
    search: SearchSettings = SearchSettings()
    evaluate: EvaluateSettings = EvaluateSettings()
    train: TrainSettings = TrainSettings()
    report: ReportSettings = ReportSettings()
    orchestration: OrchestrationSettings = OrchestrationSettings()

    def path(self, p: Path) -> Path:
        """Resolve a params path against the workspace root."""
        p = Path(os.path.expanduser(p))
        return p if p.is_absolute() else (self.root / p)

    @property
    def embed_resolution(self) -> int:
        """The square size images are embedded at (embed.resolution, or train.resolution)."""
        r = self.embed.resolution
        return self.train.resolution if r == "train" else r

    @property
    def workers(self) -> int:
        return self.ingest.workers or (os.cpu_count() or 1)


def _format_error(err: ValidationError, source: Path) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        got = e.get("input")
        got_txt = f" (got {got!r})" if not isinstance(got, dict) else ""
        parts.append(f"{loc}: {e['msg']}{got_txt}")
    return f"{source}: invalid params: " + "; ".join(parts)


def load_settings(params_path: str | os.PathLike[str] = DEFAULT_PARAMS,
                  overrides: dict[str, Any] | None = None) -> Settings:
    """Read and validate a params file. Raise ConfigError with one readable line on any problem."""
    path = Path(params_path).expanduser().absolute()
    if not path.is_file():
        raise ConfigError(f"params file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{path}: not valid YAML: {first}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read params file {path}: {exc.strerror}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    for key, value in (overrides or {}).items():
        _set_dotted(raw, key, value)
    try:
        return Settings(root=path.parent, params_path=path, **raw)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, path)) from None
    except TypeError as exc:  # e.g. a section given as a list
        raise ConfigError(f"{path}: invalid params: {exc}") from None


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value

