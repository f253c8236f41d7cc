"""Where everything lives under a workspace: the one place that names the files of `data/`.

Each output folder comes from params.yaml (`data.*`, `model.checkpoint`); the names of the files
inside them are fixed here. Steps ask a `Layout` for a path and never join names themselves, so a
new output or a renamed file is one edit, and `outputs.OWN` (which names cbir may write where)
is built from the same names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

# data.manifest_dir (cbir ingest)
FILES = "files.parquet"
QUARANTINE = "quarantine.parquet"
RUNS = "runs.parquet"
JOURNAL = "journal"
# data.embeddings_dir/<model fingerprint>/ (cbir embed)
SHARD_GLOB = "shard-*.parquet"
MODEL_CARD = "model.json"
VECTOR_ROWS = "vectors.parquet"  # what each row of the memory-mapped vector file is (the commit)
VECTOR_DATA_PREFIX = "vectors-"  # vectors-<generation>.f16: float16 rows (cbir.store.vectors)
VECTOR_DATA_GLOB = "vectors-*.f16"
# data.embeddings_dir/<model fingerprint>/regions-<scheme key>/ (cbir embed with embed.regions)
REGIONS_PREFIX = "regions-"
REGION_SHARD_GLOB = "regions-*.parquet"
# data.index_dir (cbir index)
INDEX_FILE = "index.faiss"
SIDECAR_FILE = "index.json"
STAGED_FILE = "index.faiss.next"  # a new index file, until the sidecar that describes it is in
DELTA_FILE = "index.delta.faiss"  # what was added since index.faiss was last written whole
DELTA_STAGED = "index.delta.faiss.next"  # a new delta file, until the sidecar that describes it
IDS_PREFIX = "index.ids-"  # the index's ids sorted, `index.ids-<token>.npy`, named by the sidecar
IDS_GLOB = "index.ids-*.npy"
NEAR_FILE = "index.near.npz"  # each inverted list's nearest lists (cbir.probes), for its centroids
# the Dask workers' parts of a `cbir index` build (orchestration.dask_address), one folder per run,
# removed once merged: the trained empty index and each part's encoded vectors
INDEX_PARTS = "parts"
INDEX_TRAINED = "trained.faiss"
INDEX_PART = "part-{:05d}.faiss"
REGION_INDEX = "regions"  # the regional descriptors' index: the same three files in this folder
LOCAL_INDEX = "local"  # the local descriptors' index (search.local_candidates): the same three
# data.models_dir (cbir train)
LAST = "last.pt"
HISTORY = "history.csv"
TRAIN_METRICS = "train_metrics.json"
# data.pairs_dir (cbir pairs)
PAIRS = "pairs.parquet"
CLUSTERS = "clusters.parquet"
SEARCHED = "searched.parquet"  # ids whose neighbours pairs.parquet holds (incremental runs)
EXACT = "exact.parquet"  # byte-identical copies as pairs (from the manifest, every run)
# the pairs that each incremental run added, one partition per run (cbir.store.pairs), until a
# run folds them into pairs.parquet; PAIRS_STATE says which partitions are committed
PAIRS_RUNS = "runs"
RUN_PAIRS = "pairs-{:06d}.parquet"
RUN_SEARCHED = "searched-{:06d}.parquet"
# the clusters the incremental runs since the last whole clustering formed, and the ids of the
# clusters of clusters.parquet they replace (cbir.store.pairs: clusters_files); pairs.json
# names the current one by its token
RUN_CLUSTERS = "clusters-{}.parquet"
PAIRS_STATE = "pairs.json"
# a new base, staged until pairs.json commits it, then renamed over pairs.parquet/searched.parquet
PAIRS_NEXT = "pairs.next.parquet"
SEARCHED_NEXT = "searched.next.parquet"
CLUSTERS_NEXT = "clusters.next.parquet"
# the Dask workers' results of a `cbir pairs` run (orchestration.dask_address), one folder per
# run, removed once merged
PAIRS_PARTS = "parts"
PAIRS_PART = "part-{:05d}.parquet"
# data.decisions_dir (cbir review, decide, decisions import): an append-only log of parts
DECISION_PART_PREFIX = "part-"
DECISION_PART_GLOB = "part-*.parquet"
DECISIONS_README = "README.txt"  # what the folder is (and DVC versions no empty folder)
# data.reports_dir (cbir evaluate, calibrate, report, nightly, augment-preview)
METRICS_JSON = "metrics.json"
METRICS_MD = "metrics.md"
NEIGHBORS = "neighbors.parquet"
CALIBRATION = "calibration.json"  # the figures (a DVC metric)
CALIBRATION_STATE = "calibration.state.json"  # what they were computed from
CALIBRATION_CURVE = "calibration_curve.csv"  # a DVC plot
GALLERY = "gallery"
PLOTS = "plots"
NIGHTLY = "nightly"  # run-<N>.md, one per nightly run
PREVIEW_PREFIX = "augment-preview-"
# data.cache_dir
BASELINE_EMBEDDINGS = "baseline-embeddings"
REVIEW_CACHE = "review"  # the review server's renditions of scans (cbir review)
FEATURES = "features"  # local features for geometric verification (cbir pairs, query)
TRAIN_CACHE_PREFIX = "train-"
FINGERPRINTS = "fingerprints.json"  # model fingerprints by what built them (store/fingerprint.py)
VECTOR_ORDER = "vector-order"  # the vector files' rows by image id (store/vector_order.py)
STORED_VIEWS = "catalog"  # the results of the catalogue's joined views (store/catalog.py)
CACHE_TOOLS = ("matplotlib", "torch", "xdg")  # caches of the libraries (cbir/environ.py)
# beside data.manifest_dir: the data folder's writer lock and Prefect's home
LOCK_NAME = ".cbir.lock"
PREFECT = "prefect"


@dataclass(frozen=True)
class Layout:
    """The paths of one workspace, resolved against its params file's folder."""

    root: Path
    scans: Path
    ground_truth: Path | None
    manifest_dir: Path
    embeddings_dir: Path
    index_dir: Path
    models_dir: Path
    checkpoint: Path
    pairs_dir: Path
    decisions_dir: Path
    reports_dir: Path
    cache_dir: Path
    catalog: Path

    # the data folder: the one that holds the manifest folder (and the lock, Prefect's home)
    @property
    def data(self) -> Path:
        return self.manifest_dir.parent

    @property
    def lock(self) -> Path:
        return self.data / LOCK_NAME

    @property
    def prefect_home(self) -> Path:
        return self.data / PREFECT

    # manifest
    @property
    def files(self) -> Path:
        return self.manifest_dir / FILES

    @property
    def quarantine(self) -> Path:
        return self.manifest_dir / QUARANTINE

    @property
    def runs(self) -> Path:
        return self.manifest_dir / RUNS

    @property
    def journal(self) -> Path:
        return self.manifest_dir / JOURNAL

    # embeddings
    def embeddings(self, fingerprint: str, *, baseline: bool = False) -> Path:
        """Where the embeddings of model `fingerprint` live. Baselines (used only by evaluation)
        go to the cache, so that evaluating never changes the embed step's outputs."""
        if baseline:
            return self.cache_dir / BASELINE_EMBEDDINGS / fingerprint
        return self.embeddings_dir / fingerprint

    def regions(self, fingerprint: str, scheme_key: str) -> Path:
        """Where the regional descriptors of model `fingerprint` under a region scheme live
        (one folder per scheme: vectors of different schemes are never mixed)."""
        return self.embeddings_dir / fingerprint / f"{REGIONS_PREFIX}{scheme_key}"

    @property
    def region_index_dir(self) -> Path:
        """The index of the regional descriptors, beside the global index."""
        return self.index_dir / REGION_INDEX

    @property
    def index_parts(self) -> Path:
        return self.index_dir / INDEX_PARTS

    def index_part(self, run: str, part: int | None) -> Path:
        """Part `part` of the Dask run `run` of `cbir index` (None: its trained empty index;
        cbir.steps.index_dask)."""
        name = INDEX_TRAINED if part is None else INDEX_PART.format(part)
        return self.index_parts / run / name

    @property
    def local_index_dir(self) -> Path:
        """The index of the local descriptors (cbir.votes), beside the global index."""
        return self.index_dir / LOCAL_INDEX

    def review_rendition(self, image_id: str, side: int) -> Path:
        """The review server's JPEG of image `image_id` (a content id), at most `side` px."""
        return self.cache_dir / REVIEW_CACHE / str(side) / f"{image_id}.jpg"

    # training
    @property
    def last_state(self) -> Path:
        return self.models_dir / LAST

    @property
    def history(self) -> Path:
        return self.models_dir / HISTORY

    @property
    def train_metrics(self) -> Path:
        return self.models_dir / TRAIN_METRICS

    @property
    def fingerprints(self) -> Path:
        return self.cache_dir / FINGERPRINTS

    def vector_order(self, fingerprint: str) -> Path:
        """The vector file's rows of `fingerprint` in image id order (store/vector_order.py)."""
        return self.cache_dir / VECTOR_ORDER / f"{fingerprint}.bin"

    def stored_view(self, name: str) -> Path:
        """The stored result of the catalogue's view `name` (cbir.store.catalog)."""
        return self.cache_dir / STORED_VIEWS / f"{name}.parquet"

    def features(self, recipe: str) -> Path:
        """The cache of local features extracted by `recipe` (cbir.store.features)."""
        return self.cache_dir / FEATURES / recipe

    def train_cache(self, side: int) -> Path:
        """Decoded training pictures at `side` px."""
        return self.cache_dir / f"{TRAIN_CACHE_PREFIX}{side}"

    # pairs
    @property
    def pairs(self) -> Path:
        return self.pairs_dir / PAIRS

    @property
    def clusters(self) -> Path:
        return self.pairs_dir / CLUSTERS

    @property
    def searched(self) -> Path:
        return self.pairs_dir / SEARCHED

    @property
    def exact(self) -> Path:
        return self.pairs_dir / EXACT

    @property
    def pairs_state(self) -> Path:
        return self.pairs_dir / PAIRS_STATE

    @property
    def pairs_next(self) -> Path:
        return self.pairs_dir / PAIRS_NEXT

    @property
    def searched_next(self) -> Path:
        return self.pairs_dir / SEARCHED_NEXT

    @property
    def clusters_next(self) -> Path:
        return self.pairs_dir / CLUSTERS_NEXT

    @property
    def pairs_runs(self) -> Path:
        return self.pairs_dir / PAIRS_RUNS

    def run_pairs(self, seq: int) -> Path:
        """The pairs incremental run `seq` of `cbir pairs` added."""
        return self.pairs_runs / RUN_PAIRS.format(seq)

    def run_searched(self, seq: int) -> Path:
        """The images incremental run `seq` of `cbir pairs` searched."""
        return self.pairs_runs / RUN_SEARCHED.format(seq)

    def run_clusters(self, token: str) -> Path:
        """The incremental runs' changes to clusters.parquet, the one of this token."""
        return self.pairs_runs / RUN_CLUSTERS.format(token)

    @property
    def pairs_parts(self) -> Path:
        return self.pairs_dir / PAIRS_PARTS

    def pairs_part(self, run: str, part: int) -> Path:
        """Part `part` of the Dask run `run` of `cbir pairs` (cbir.steps.pairs_dask)."""
        return self.pairs_parts / run / PAIRS_PART.format(part)

    # reports
    @property
    def metrics_json(self) -> Path:
        return self.reports_dir / METRICS_JSON

    @property
    def metrics_md(self) -> Path:
        return self.reports_dir / METRICS_MD

    @property
    def neighbors(self) -> Path:
        return self.reports_dir / NEIGHBORS

    @property
    def calibration(self) -> Path:
        return self.reports_dir / CALIBRATION

    @property
    def calibration_state(self) -> Path:
        return self.reports_dir / CALIBRATION_STATE

    @property
    def calibration_curve(self) -> Path:
        return self.reports_dir / CALIBRATION_CURVE

    @property
    def gallery(self) -> Path:
        return self.reports_dir / GALLERY

    @property
    def plots(self) -> Path:
        return self.reports_dir / PLOTS

    @property
    def nightly(self) -> Path:
        return self.reports_dir / NIGHTLY

    def preview(self, image: Path) -> Path:
        """`cbir augment-preview IMAGE`'s default output."""
        return self.reports_dir / f"{PREVIEW_PREFIX}{image.stem}.png"


def layout(settings: Any) -> Layout:
    """The workspace's paths from its settings."""
    d, path = settings.data, settings.path
    return Layout(
        root=settings.root,
        scans=path(d.scans_dir),
        ground_truth=path(d.ground_truth) if d.ground_truth is not None else None,
        manifest_dir=path(d.manifest_dir),
        embeddings_dir=path(d.embeddings_dir),
        index_dir=path(d.index_dir),
        models_dir=path(d.models_dir),
        checkpoint=path(settings.model.checkpoint),
        pairs_dir=path(d.pairs_dir),
        decisions_dir=path(d.decisions_dir),
        reports_dir=path(d.reports_dir),
        cache_dir=path(d.cache_dir),
        catalog=path(d.catalog),
    )
