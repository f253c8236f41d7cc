"""params.yaml -> typed, validated settings.

params.yaml is the single source of parameters. Every relative path in it resolves against the
folder holding the params file, so a copy of params.yaml in another folder is a separate workspace.

Longer than 400 lines: one pydantic model per params section, with its ranges and descriptions.
"""

from __future__ import annotations

import difflib
import os
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from .augment import Strategy
from .errors import ConfigError

DEFAULT_PARAMS = "params.yaml"

# Ranges of counts and sizes. Each one is checked when the params are loaded, so a value that
# cannot work is one line naming the key, not an overflow deep in FAISS, DuckDB or torch later.
MAX_WORKERS = 1024  # processes
MAX_SIDE = 8192  # px of a network input or a generated picture
MAX_BATCH = 65536
MAX_K = 10_000  # neighbours of an image (search.k, evaluate.ks, `cbir query --k`)
#: Seeds: FAISS takes a C int (and uses seed + 1), numpy no negative ones.
Seed = Annotated[int, Field(ge=0, le=2**31 - 2)]
NO_LIMIT = 1 << 62  # what a larger limit saturates to: fits DuckDB's BIGINT (LIMIT ?)


def _saturate(value: int) -> int:
    return min(value, NO_LIMIT)


#: A limit ("at most N"): a value larger than anything it could limit means no limit, so it
#: saturates (report.max_pairs: 10**30 is "all pairs") instead of failing where it is used.
Limit = Annotated[int, AfterValidator(_saturate)]


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
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

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
    """Where the scans are and where the pipeline writes (relative paths: this file's folder)."""

    scans_dir: Path = Field(
        Path("demo/scans"), description="the archive's scans (read only, never written)"
    )
    ground_truth: Path | None = Field(
        None,
        description="path,group CSV of labelled near-duplicates (paths relative to the "
        "CSV's folder or to the scans folder; it may label a subset, or nothing yet)",
    )
    manifest_dir: Path = Path("data/manifest")
    catalog: Path = Path("data/catalog.duckdb")
    embeddings_dir: Path = Path("data/embeddings")
    index_dir: Path = Path("data/index")
    models_dir: Path = Path("data/models")
    pairs_dir: Path = Path("data/pairs")
    decisions_dir: Path = Field(
        Path("data/decisions"),
        description="reviewers' decisions on pairs (append-only; DVC-tracked on its own, "
        "never rebuilt by `dvc repro`)",
    )
    reports_dir: Path = Path("data/reports")
    cache_dir: Path = Path("data/cache")


class IngestSettings(_Section):
    """Reading new scans into the manifest."""

    workers: int = Field(
        0,
        ge=0,
        le=MAX_WORKERS,
        description="decode processes (ingest, training cache, thumbnails); 0 = all cores",
    )
    max_pixels: Limit = Field(
        200_000_000,
        gt=0,
        description="larger images are quarantined "
        "(decompression bombs), and so are those that would decode to more "
        "than 3 bytes a pixel of it (RGBA, CMYK, float)",
    )
    ignore: list[str] = Field(
        default_factory=lambda: [".*", "Thumbs.db", "desktop.ini", "*.md5", "*.sha256"],
        description="glob patterns (file or folder names) that are not scans",
    )
    journal_every: Limit = Field(
        500, gt=0, description="decoded files per crash-recovery journal part"
    )


class DemoSettings(_Section):
    """`cbir demo-data`: the synthetic demo collection (not part of an archive's pipeline)."""

    out_dir: Path = Field(Path("demo"), description="scans/ and ground_truth.csv go here")
    n_groups: int = Field(
        150, ge=1, le=1_000_000, description="originals that get near-duplicate copies"
    )
    n_distractors: int = Field(150, ge=0, le=1_000_000, description="originals with no copies")
    max_copies: int = Field(4, ge=1, le=100, description="group size at most (original included)")
    size: int = Field(512, ge=64, le=MAX_SIDE, description="long side of the originals, px")
    seed: Seed = 0


class ModelSettings(_Section):
    """The descriptor network."""

    backbone: Literal["resnet18", "resnet34", "resnet50"] = "resnet18"
    init: str = Field(
        "none", description="none | a torchvision weights name (IMAGENET1K_V1) | a local file"
    )
    gem_p: float = Field(3.0, gt=0, description="GeM pooling exponent (1 = average pooling)")
    projection: Literal["linear", "mlp"] = Field(
        "linear", description="projection head: linear (SSCD) | mlp (SimCLR)"
    )
    projection_dim: int = Field(512, ge=8, le=MAX_BATCH)
    descriptor: Literal["trunk", "projection"] = Field(
        "trunk", description="retrieval descriptor: trunk (pooled, L2-normalised) | projection"
    )
    checkpoint: Path = Field(
        Path("data/models/model.pt"), description="used by embed when it exists (written by train)"
    )
    seed: Seed = Field(0, description="initialisation of untrained weights")


class EmbedSettings(_Section):
    """Descriptors of every image, in shards."""

    # "train": the training resolution. Descriptors are sharpest at the scale they were trained
    # at (benchmarks/quality.py: trained at 112 px, embedding at 112 px gave P@1 0.92, at 224 px
    # 0.81).
    resolution: Annotated[int, Field(ge=32, le=MAX_SIDE)] | Literal["train"] = Field(
        "train",
        description="square input size in px; train = train.resolution (descriptors "
        "are sharpest at the scale they were trained at)",
    )
    # Multi-scale descriptor: sum of the descriptors at resolution * each scale (cost grows with
    # the sum of the scales squared). [1.0, 1.25]: benchmarks/quality.py mAP@10 0.953 vs 0.937.
    scales: list[Annotated[float, Field(gt=0, le=4)]] = Field(
        [1.0, 1.25],
        min_length=1,
        description="multi-scale descriptor: sum over resolution x "
        "each scale ([1.0]: single scale, 1.5x faster; benchmark mAP@10 0.937 vs 0.953)",
    )
    # Regional descriptors (cbir/regions.py) for details cut from a picture: benchmarks/partial.py.
    regions: Literal["none", "halves", "thirds"] = Field(
        "none",
        description="regional descriptors beside the global one, for details cut from a "
        "picture: none | halves (9 windows) | thirds (34); see README, Partial copies",
    )
    batch_size: int = Field(32, ge=1, le=MAX_BATCH)
    shard_size: Limit = Field(
        1000, ge=1, description="images per Parquet shard (the unit of resumption)"
    )
    workers: int = Field(1, ge=0, le=MAX_WORKERS, description="DataLoader decode processes")
    device: str = Field("auto", description="auto (CUDA when present) | cpu | cuda")


class IndexSettings(_Section):
    """The FAISS index (exact below ~10,000 images, IVF-PQ above)."""

    bytes_per_vector: int = Field(64, ge=8, le=MAX_BATCH, description="PQ code budget per vector")
    target_recall: float = Field(
        0.95, gt=0, le=1, description="nprobe is tuned to reach this recall@10 vs exact search"
    )
    rebuild_factor: float = Field(
        4.0, ge=1, description="rebuild when the collection outgrows the trained index by this"
    )
    seed: Seed = 0
    # The local descriptors' index (cbir/votes.py, cbir/store/local.py), built when
    # search.local_candidates > 0: about 136 bytes a descriptor (8-bit codes and an id).
    local_keypoints: int = Field(
        300,
        ge=10,
        le=1000,
        description="strongest local descriptors indexed per picture for "
        "search.local_candidates (more find smaller details; the index grows in proportion)",
    )


Threshold = Annotated[float, Field(ge=-1, le=1)] | Literal["auto"]


class SearchSettings(_Section):
    """Near-duplicate pairs and clusters."""

    k: int = Field(10, ge=1, le=MAX_K, description="neighbours per image considered for pairs")
    # "auto": calibrated by `cbir calibrate` (cbir/steps/calibrate.py) to reach precision_target, on
    # the ground truth where there is one, else on held-out synthetic copies of the collection.
    pair_threshold: Threshold = Field(
        "auto",
        description="cosine similarity for a "
        "near-duplicate pair; auto = calibrated to reach "
        "precision_target (`cbir calibrate`)",
    )
    cluster_threshold: Threshold = Field(
        "auto", description="similarity for joining clusters; auto = the pair threshold"
    )
    precision_target: float = Field(
        0.95,
        gt=0,
        lt=1,
        description="pair precision that an `auto` threshold is calibrated to reach",
    )
    # Geometric verification (cbir/verify.py): local features (SIFT, cached per picture under
    # data.cache_dir) and a similarity fit confirm a pair or a query's candidate, and say which
    # side is a detail of the other, and where (benchmarks/partial.py, README "Partial copies").
    verify: bool = Field(
        True,
        description="check pairs and query candidates with local features (relation, "
        "matched region); confirmed pairs below the threshold join as partial copies",
    )
    verify_top: int = Field(
        20,
        ge=0,
        le=MAX_K,
        description="`cbir query`: the top candidates verified and re-ranked (verified "
        "first); 0 = none",
    )
    query_turns: bool = Field(
        True,
        description="`cbir query` also searches the query turned by 90, 180 and 270 degrees (a "
        "print scanned sideways or upside down), each neighbour keeping its best score; "
        "`cbir pairs` searches upright pictures only",
    )
    verify_floor: float = Field(
        0.5,
        ge=-1,
        le=1,
        description="`cbir pairs` also verifies neighbours scoring between this and the "
        "pair threshold (where details of an original land); lower costs more time",
    )
    verify_rank: int = Field(
        3,
        ge=0,
        le=MAX_K,
        description="`cbir pairs` verifies a neighbour below the pair threshold only among "
        "each image's nearest verify_rank (and, with embed.regions, the owners of its nearest "
        "regions); 0 = none: only pairs above the threshold are checked",
    )
    # Local-feature voting (cbir/votes.py): the candidates that small details need, which the
    # descriptors miss (benchmarks/partial.py, README "Partial copies").
    local_candidates: int = Field(
        0,
        ge=0,
        le=MAX_K,
        description="`cbir query`: the pictures most of the query's keypoints vote for join "
        "its candidates (`cbir index` builds an index of index.local_keypoints "
        "descriptors a picture); 0 = off",
    )


class CalibrateSettings(_Section):
    """Self-calibration of the pair threshold without ground truth (cbir/steps/calibrate.py)."""

    images: Limit = Field(
        1000,
        ge=10,
        description="images whose neighbours estimate how "
        "non-duplicates score (all when the collection is smaller)",
    )
    copies: Limit = Field(
        300, ge=10, description="held-out synthetic copies that estimate how duplicates score"
    )
    seed: Seed = 0


class EvaluateSettings(_Section):
    """Retrieval quality against the ground truth."""

    ks: list[Annotated[int, Field(ge=1, le=MAX_K)]] = Field(
        default_factory=lambda: [1, 5, 10], min_length=1
    )
    precision_target: float = Field(
        0.9, gt=0, le=1, description="recall is reported at this precision"
    )
    baselines: bool = Field(
        True, description="also score the untrained backbone and perceptual hashing"
    )


class TrainSettings(_Section):
    """Self-supervised fine-tuning of the descriptor on the collection itself (SimCLR)."""

    augmentation: Strategy = Field(
        "heritage", description="heritage (archive-informed) | simclr (the original recipe)"
    )
    augment_strength: float = Field(
        1.0, ge=0, description="scales the augmentations' probabilities and magnitudes"
    )
    resolution: int = Field(
        112, ge=32, le=MAX_SIDE, description="training view size (decoded once into data/cache)"
    )
    batch_size: int = Field(
        64, ge=2, le=MAX_BATCH, description="global batch (split across GPUs under torchrun)"
    )
    epochs: int = Field(
        25,
        ge=1,
        le=100_000,
        description="the cosine schedule must reach its end: "
        "stopping mid-schedule costs quality (about 30 s an epoch for 1,000 "
        "images on 2 CPU cores with native bf16)",
    )
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_epochs: float = Field(1.0, ge=0, description="linear warm-up, then cosine decay to 0")
    temperature: float = Field(
        0.05, gt=0, description="NT-Xent temperature (SSCD: 0.05; SimCLR: 0.1-0.5)"
    )
    koleo_weight: float = Field(
        0.0, ge=0, description="entropy (KoLeo) regulariser; 0 turns it off"
    )
    mix_prob: float = Field(0.0, ge=0, le=1, description="probability of cutmix/mixup per batch")
    workers: int = Field(
        1,
        ge=0,
        le=MAX_WORKERS,
        description="augmentation processes (GPU: "
        "about the number of cores); on the CPU, torch trains with the CPUs "
        "left beside them",
    )
    device: str = Field(
        "auto", description="auto (CUDA with mixed precision when present) | cpu | cuda"
    )
    precision: Literal["auto", "fp32"] = Field(
        "auto",
        description="auto: mixed precision where it is faster (fp16 on CUDA; a bf16 "
        "trunk, half the time, on CPUs with native bf16, e.g. AVX512-BF16, when training runs "
        "one torch thread) | fp32: full precision everywhere",
    )
    time_budget_minutes: float = Field(
        20,
        ge=0,
        description="when the epochs would not finish in this, the LR schedule is "
        "fitted to fewer epochs that do (it stops mid-schedule only if even that cannot "
        "finish); 0 = none",
    )
    seed: Seed = 0


class ReportSettings(_Section):
    """The review gallery."""

    page_size: Limit = Field(200, ge=1, description="pairs, clusters or queries per gallery page")
    max_pairs: Limit = Field(50_000, ge=0, description="strongest pairs in the gallery; 0 = all")
    thumb_size: int = Field(
        256,
        ge=32,
        le=2048,
        description="long side of gallery thumbnails, px (made once, then reused)",
    )


class ReviewSettings(_Section):
    """`cbir review`, the review server (no DVC stage depends on it)."""

    host: str = Field(
        "127.0.0.1",
        min_length=1,
        max_length=255,
        description="address it listens on; any but a loopback one needs a token",
    )
    port: int = Field(
        8765, ge=0, le=65535, description="its port (0 picks a free one); nightly reports link it"
    )


class OrchestrationSettings(_Section):
    """Prefect flows, the nightly schedule, the writer lock (not pipeline params: no DVC stage
    depends on them)."""

    nightly_cron: str = Field("0 2 * * *", description="when `cbir serve` runs the nightly flow")
    timezone: str = Field("UTC", description="IANA time zone of nightly_cron")
    dask_address: str | None = Field(
        None,
        description="Dask scheduler (tcp://host:8786) for the embedding "
        "shards and the all-pairs search of `cbir pairs`; null = in the process running them",
    )
    task_retries: int = Field(
        2, ge=0, le=1000, description="retries of a task after a transient error"
    )
    retry_delay_seconds: float = Field(10.0, ge=0)
    lock_timeout: float = Field(
        600.0, ge=0, description="seconds a writer waits for another to finish; 0 = stop at once"
    )
    nightly_evaluate: bool = Field(
        False,
        description="the nightly run also re-evaluates "
        "(when data.ground_truth is set); costs as much as a full "
        "evaluation",
    )
    nightly_gallery: bool = Field(
        False,
        description="the nightly run also rewrites the review "
        "gallery; costs as much as a full `cbir report`",
    )
    dvc_commit: bool = Field(
        True,
        description="flows record their outputs with `dvc commit` "
        "in a DVC repository (and `dvc push` when a remote is set)",
    )


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
    calibrate: CalibrateSettings = CalibrateSettings()
    evaluate: EvaluateSettings = EvaluateSettings()
    train: TrainSettings = TrainSettings()
    report: ReportSettings = ReportSettings()
    review: ReviewSettings = ReviewSettings()
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
    def decode_workers(self) -> int:
        """Processes that decode scans: ingest.workers, or all cores when 0. Used by ingest, by
        the training cache (decoding the scans once), by the gallery's thumbnails, and by
        `cbir pairs` to extract and verify local features."""
        return self.ingest.workers or (os.cpu_count() or 1)


def _suggestion(loc: tuple[Any, ...]) -> str:
    """ "; did you mean ...?" for a misspelt key, from the names its section knows."""
    model: Any = Settings
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(str(part))
        model = field.annotation if field is not None else None
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return ""
    names = [n for n in model.model_fields if n not in ("root", "params_path")]
    close = difflib.get_close_matches(str(loc[-1]), names, n=1, cutoff=0.6)
    where = ".".join(str(x) for x in loc[:-1])
    return f"; did you mean {where + '.' if where else ''}{close[0]}?" if close else ""


def _format_error(err: ValidationError, source: Path) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        got = e.get("input")
        got_txt = f" (got {got!r})" if not isinstance(got, dict) else ""
        if e["type"] == "extra_forbidden":
            parts.append(f"{loc}: unknown key{_suggestion(tuple(e['loc']))}")
        else:
            parts.append(f"{loc}: {e['msg']}{got_txt}")
    return f"{source}: invalid params: " + "; ".join(parts)


def _yaml_error(exc: yaml.YAMLError) -> str:
    """One line: what is wrong and where (line and column of the params file)."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    text = str(exc).strip()
    problem = getattr(exc, "problem", None) or (
        text.splitlines()[0] if text else type(exc).__name__
    )
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}"


#: Bounds on a params file, checked before anything is built from it: a real one is a few KB
#: without aliases, while a YAML alias bomb ("billion laughs") of a few hundred bytes expands to
#: billions of values (validating or printing them would never end).
MAX_PARAMS_BYTES = 1 << 20
MAX_PARAMS_VALUES = 100_000  # values in the file, every alias expanded


class _ParamsLoader(yaml.SafeLoader):
    """yaml.safe_load, but a key given twice in one mapping is an error: silently, the last one
    would win (two `train:` sections, and the first one's settings are ignored)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value if isinstance(node, yaml.MappingNode) else ():
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *defaults`: explicit keys may override merged ones
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:  # an unhashable key: the constructor says so itself
                continue
            if first is not key_node:
                line = first.start_mark.line + 1
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {line})", key_node.start_mark
                )
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node: yaml.Node, memo: dict[int, int | None], limit: int) -> int:
    """Values under `node` with every alias expanded; a YAML error past `limit` or on an alias
    that contains itself. Linear in the file: a node shared by aliases is counted once."""
    if id(node) in memo:
        size = memo[id(node)]
        if size is None:
            raise yaml.composer.ComposerError(
                None, None, "an alias refers to a value that contains it", node.start_mark
            )
        return size
    memo[id(node)] = None  # being counted
    total = 1
    children: list[yaml.Node] = (
        node.value
        if isinstance(node, yaml.SequenceNode)
        else [n for pair in node.value for n in pair]
        if isinstance(node, yaml.MappingNode)
        else []
    )
    for child in children:
        total += _expanded_size(child, memo, limit)
        if total > limit:
            raise yaml.composer.ComposerError(
                None,
                None,
                f"the aliases here expand to more than {limit:,} values (a YAML alias bomb?)",
                node.start_mark,
            )
    memo[id(node)] = total
    return total


def _load_yaml(path: Path) -> Any:
    """The params file's YAML, bounded in size and alias expansion, without duplicate keys."""
    with open(path, "rb") as fh:
        data = fh.read(MAX_PARAMS_BYTES + 1)
    if len(data) > MAX_PARAMS_BYTES:
        raise ConfigError(
            f"{path}: larger than {MAX_PARAMS_BYTES:,} bytes, which no params file "
            f"is (is it the right file?)"
        )
    loader = _ParamsLoader(data.decode("utf-8"))
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, {}, MAX_PARAMS_VALUES)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def load_settings(
    params_path: str | os.PathLike[str] = DEFAULT_PARAMS, overrides: dict[str, Any] | None = None
) -> Settings:
    """Read and validate a params file. Raise ConfigError with one readable line on any problem."""
    path = Path(params_path).expanduser().absolute()
    if not path.is_file():
        raise ConfigError(f"params file not found: {path}")
    try:
        raw = _load_yaml(path)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_error(exc)}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML: nested too deeply") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"cannot read params file {path}: {exc.strerror}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    for key, value in (overrides or {}).items():
        _set_dotted(raw, key, value)
    try:
        settings = Settings(root=path.parent, params_path=path, **raw)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, path)) from None
    except TypeError as exc:  # e.g. a section given as a list
        raise ConfigError(f"{path}: invalid params: {exc}") from None
    from .store.outputs import check_outputs  # no output may overwrite what cbir does not own

    check_outputs(settings)
    return settings


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value
