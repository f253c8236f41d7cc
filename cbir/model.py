"""The descriptor network: a torchvision ResNet trunk, GeM pooling, an optional projection head.

Weights come from a training checkpoint when one exists, else from `model.init`: `none` (random,
seeded), a torchvision weights name (e.g. `IMAGENET1K_V1`, downloaded by torchvision where the
network allows, or found in its cache), or a local file (a state dict or a cbir checkpoint).
Every load uses `torch.load(..., weights_only=True)`: a checkpoint cannot run code.

A fingerprint (hash of the weights that produce the descriptor and of the preprocessing)
identifies which embeddings, and which index, belong to which model.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import nn

from .errors import CbirError

if TYPE_CHECKING:  # the kernel never imports the settings at runtime
    from .config import ModelSettings, Settings

CHECKPOINT_FORMAT = "cbir-checkpoint/1"
TRUNK_DIMS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelConfig:
    """What defines the network's shape (stored in every checkpoint)."""

    backbone: str = "resnet18"
    gem_p: float = 3.0
    projection: str = "linear"  # linear | mlp
    projection_dim: int = 512
    descriptor: str = "trunk"  # trunk | projection: which output is used for retrieval

    @classmethod
    def from_settings(cls, m: ModelSettings) -> ModelConfig:
        return cls(
            backbone=m.backbone,
            gem_p=m.gem_p,
            projection=m.projection,
            projection_dim=m.projection_dim,
            descriptor=m.descriptor,
        )


class GeM(nn.Module):
    """Generalised-mean pooling (Radenović et al.): p=1 is average, p→∞ max pooling."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p.clamp(min=1.0)
        return x.clamp(min=self.eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


def projection_head(in_dim: int, out_dim: int, kind: str) -> nn.Module:
    if kind == "linear":  # SSCD: a linear projection keeps the descriptor's geometry
        return nn.Linear(in_dim, out_dim)
    if kind == "mlp":  # original SimCLR
        return nn.Sequential(
            nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, out_dim)
        )
    raise CbirError(f"unknown projection type {kind!r} (expected linear or mlp)")


class Descriptor(nn.Module):
    """ResNet trunk -> GeM -> (projection). `forward` returns the L2-normalised descriptor."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.backbone not in TRUNK_DIMS:
            raise CbirError(
                f"unknown backbone {config.backbone!r} (expected one of {', '.join(TRUNK_DIMS)})"
            )
        self.config = config
        resnet = getattr(torchvision.models, config.backbone)(weights=None)
        # Same child names as torchvision's ResNet, so its state dicts load into the trunk as-is.
        self.trunk = nn.Sequential(
            OrderedDict(
                (name, getattr(resnet, name))
                for name in (
                    "conv1",
                    "bn1",
                    "relu",
                    "maxpool",
                    "layer1",
                    "layer2",
                    "layer3",
                    "layer4",
                )
            )
        )
        self.pool = GeM(config.gem_p)
        self.trunk_dim = TRUNK_DIMS[config.backbone]
        self.head = projection_head(self.trunk_dim, config.projection_dim, config.projection)

    @property
    def dim(self) -> int:
        return (
            self.config.projection_dim if self.config.descriptor == "projection" else self.trunk_dim
        )

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.trunk(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.pooled(x)
        if self.config.descriptor == "projection":
            z = self.head(z)
        return F.normalize(z, dim=-1)

    def descriptor_state(self) -> dict[str, torch.Tensor]:
        """The weights the retrieval descriptor depends on (the head only when it is used)."""
        sd = self.state_dict()
        if self.config.descriptor != "projection":
            sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
        return sd


@dataclass(frozen=True)
class Preprocess:
    """How a picture becomes the network's input; part of the fingerprint."""

    resolution: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize: str = "square"  # the whole picture, squashed to resolution x resolution
    # Multi-scale descriptor: the L2-normalised sum of the descriptors at resolution * scale.
    # No default: retrieval takes embed.scales (retrieval_preprocess), a training view is one
    # scale, (1.0,); each caller says which.
    scales: tuple[float, ...] = field(kw_only=True)

    @property
    def sizes(self) -> tuple[int, ...]:
        """The square input sizes, one per scale."""
        return tuple(max(32, round(self.resolution * s)) for s in self.scales)


def retrieval_preprocess(settings: Settings) -> Preprocess:
    """How `cbir embed` and `cbir query` feed images to the model (embed.resolution, .scales)."""
    return Preprocess(resolution=settings.embed_resolution, scales=tuple(settings.embed.scales))


def fingerprint(model: Descriptor, preprocess: Preprocess) -> str:
    """Hash of the descriptor's weights, its configuration and the preprocessing."""
    h = hashlib.sha256()
    h.update(json.dumps([asdict(model.config), asdict(preprocess)], sort_keys=True).encode())
    for name, tensor in sorted(model.descriptor_state().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- loading


def safe_load(path: str | os.PathLike[str]) -> Any:
    """torch.load restricted to tensors and plain containers; clear errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise CbirError(f"weights file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise CbirError(
                f"{path} was refused: it contains pickled Python objects, not just "
                f"weights (loading it could run arbitrary code)"
            ) from None
        raise CbirError(
            f"{path} is not a readable weights file (damaged or truncated?): {text}"
        ) from None


def _trunk_state(sd: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Accept a torchvision ResNet state dict, a cbir checkpoint, or a Descriptor state dict."""
    if "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    elif "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]
    out = {}
    for k, v in sd.items():
        k = k.removeprefix("module.")
        if k.startswith("trunk."):
            out[k.removeprefix("trunk.")] = v
        elif not k.startswith(("fc.", "pool.", "head.")):
            out[k] = v
    return out


def _torchvision_weights(backbone: str, name: str) -> Any:
    try:
        if "." in name:
            return torchvision.models.get_weight(name)
        return torchvision.models.get_model_weights(backbone)[name]
    except (KeyError, ValueError, AttributeError):
        return None


def load_init(model: Descriptor, init: str, *, base: Path | None = None) -> str:
    """Initialise the trunk from `init`; returns a description of where the weights came from."""
    if init in ("", "none", "random"):
        return "random initialisation"
    weights = _torchvision_weights(model.config.backbone, init)
    if weights is not None:
        try:
            sd = weights.get_state_dict(progress=False)
        except Exception as exc:
            raise CbirError(
                f"could not get torchvision weights {init} for {model.config.backbone} "
                f"({type(exc).__name__}: {str(exc)[:120]}); without network access, place "
                f"{Path(weights.url).name} in {torch.hub.get_dir()}/checkpoints or set "
                f"model.init to a local file"
            ) from None
        source = f"torchvision {type(weights).__name__}.{weights.name}"
    else:
        path = Path(init)
        if base is not None and not path.is_absolute():
            path = base / path
        if not path.exists():
            raise CbirError(
                f"model.init {init!r} is neither 'none', a torchvision weights name "
                f"for {model.config.backbone}, nor an existing file"
            )
        raw = safe_load(path)
        if not isinstance(raw, dict):
            raise CbirError(f"{path}: expected a state dict, got {type(raw).__name__}")
        sd = raw
        source = f"file {path}"
    trunk_sd = _trunk_state(sd)
    try:
        model.trunk.load_state_dict(trunk_sd, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise CbirError(
            f"weights from {source} do not fit a {model.config.backbone} trunk: {first}"
        ) from None
    return source


def build_model(
    config: ModelConfig, init: str = "none", *, seed: int = 0, base: Path | None = None
) -> tuple[Descriptor, str]:
    """A fresh Descriptor (deterministic under `seed`), initialised from `init`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Descriptor(config)
    source = load_init(model, init, base=base)
    return model, source


def save_checkpoint(
    path: Path, model: Descriptor, preprocess: Preprocess, extra: dict[str, Any] | None = None
) -> str:
    """Write a checkpoint atomically; returns the fingerprint it carries."""
    from .fsutil import atomic_path

    fp = fingerprint(model, preprocess)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model_config": asdict(model.config),
        "preprocess": {"resolution": preprocess.resolution},
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "fingerprint": fp,
        **(extra or {}),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return fp


def load_checkpoint(path: Path, *, descriptor: str | None = None) -> tuple[Descriptor, dict]:
    """A Descriptor from a cbir checkpoint (weights_only). `descriptor` overrides which output."""
    raw = safe_load(path)
    if not isinstance(raw, dict) or raw.get("format") != CHECKPOINT_FORMAT:
        raise CbirError(f"{path} is not a cbir checkpoint (format {CHECKPOINT_FORMAT})")
    cfg = dict(raw["model_config"])
    if descriptor is not None:
        cfg["descriptor"] = descriptor
    model = Descriptor(ModelConfig(**cfg))
    try:
        model.load_state_dict(raw["state_dict"], strict=True)
    except RuntimeError as exc:
        raise CbirError(
            f"{path}: weights do not fit the recorded model: {str(exc).splitlines()[0]}"
        ) from None
    return model, raw


def retrieval_model(
    settings: Settings, *, untrained: bool = False
) -> tuple[Descriptor, Preprocess, str, str]:
    """The model `cbir embed` uses: the training checkpoint when there is one, else the init.

    Returns (model in eval mode, preprocessing, fingerprint, where the weights came from).
    """
    m = settings.model
    preprocess = retrieval_preprocess(settings)
    ckpt = settings.path(m.checkpoint)
    if ckpt.is_file() and not untrained:
        model, _ = load_checkpoint(ckpt, descriptor=m.descriptor)
        source = f"checkpoint {ckpt}"
    else:
        model, source = build_model(
            ModelConfig.from_settings(m), m.init, seed=m.seed, base=settings.root
        )
    model.eval()
    return model, preprocess, fingerprint(model, preprocess), source


# --------------------------------------------------------------------------- inputs and devices


def to_tensor(rgb: Image.Image, pp: Preprocess, size: int | None = None) -> torch.Tensor:
    """An RGB picture as the network's normalised input (squashed to a square of `size`, by
    default pp.resolution)."""
    size = size or pp.resolution
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
    x = torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1)
    x = x.float().div_(255.0)
    mean = torch.tensor(pp.mean).view(3, 1, 1)
    std = torch.tensor(pp.std).view(3, 1, 1)
    return x.sub_(mean).div_(std)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise CbirError(
            f"unknown device {name!r} (embed.device: auto, cpu, cuda, cuda:1...)"
        ) from None
