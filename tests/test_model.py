"""The descriptor network: GeM, normalisation, weight loading (safe), fingerprints."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
import torchvision

from cbir.errors import CbirError
from cbir.model import (
    GeM, ModelConfig, Preprocess, build_model, fingerprint, load_checkpoint, safe_load,
    save_checkpoint,
)


def test_gem_matches_hand_computation():
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    assert torch.allclose(GeM(p=1.0)(x), torch.tensor([[2.5]]))
    expected = ((1 + 8 + 27 + 64) / 4) ** (1 / 3)
    assert torch.allclose(GeM(p=3.0)(x), torch.tensor([[expected]]))


def test_descriptor_is_unit_length_with_the_configured_dimension():
    for descriptor, dim in (("trunk", 512), ("projection", 128)):
        model, _ = build_model(ModelConfig(descriptor=descriptor, projection_dim=128))
        model.eval()
        with torch.inference_mode():
            z = model(torch.randn(3, 3, 64, 64))
        assert z.shape == (3, dim) and model.dim == dim
        assert torch.allclose(z.norm(dim=1), torch.ones(3), atol=1e-5)


def test_fingerprint_follows_weights_and_preprocessing():
    cfg = ModelConfig()
    a, _ = build_model(cfg, seed=1)
    b, _ = build_model(cfg, seed=1)
    c, _ = build_model(cfg, seed=2)
    pp = Preprocess(resolution=224, scales=(1.0,))
    assert fingerprint(a, pp) == fingerprint(b, pp)
    assert fingerprint(a, pp) != fingerprint(c, pp)
    assert fingerprint(a, pp) != fingerprint(a, Preprocess(resolution=160, scales=(1.0,)))
    # the projection head only matters when it produces the descriptor
    with torch.no_grad():
        b.head.weight.add_(1.0)
    assert fingerprint(a, pp) == fingerprint(b, pp)


def test_init_from_a_local_torchvision_state_dict(tmp_path):
    torch.manual_seed(5)
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    model, source = build_model(ModelConfig(), str(path))
    assert "file" in source
    assert torch.equal(model.trunk.conv1.weight, reference.conv1.weight)
    assert torch.equal(model.trunk.layer4[1].bn2.running_var, reference.layer4[1].bn2.running_var)


def test_init_from_a_torchvision_weights_name_uses_torchvision_loading(tmp_path, monkeypatch):
    # No network here: put the file where torchvision's downloader looks first (its hub cache).
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    torch.manual_seed(7)
    reference = torchvision.models.resnet18(weights=None)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(reference.state_dict(), cache / Path(weights.url).name)
    for name in ("IMAGENET1K_V1", "ResNet18_Weights.IMAGENET1K_V1"):
        model, source = build_model(ModelConfig(), name)
        assert "ResNet18_Weights.IMAGENET1K_V1" in source
        assert torch.equal(model.trunk.conv1.weight, reference.conv1.weight)


def test_unreachable_torchvision_weights_give_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    import torch.hub as hub

    def offline(*a, **kw):
        raise OSError("network unreachable")

    monkeypatch.setattr(hub, "download_url_to_file", offline)
    with pytest.raises(CbirError, match="could not get torchvision weights"):
        build_model(ModelConfig(backbone="resnet34"), "IMAGENET1K_V1")


def test_unknown_init_and_wrong_shapes_are_refused(tmp_path):
    with pytest.raises(CbirError, match="neither 'none'"):
        build_model(ModelConfig(), "no-such-weights")
    path = tmp_path / "r50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    with pytest.raises(CbirError, match="do not fit a resnet18 trunk"):
        build_model(ModelConfig(backbone="resnet18"), str(path))


class Payload:
    """Unpickling this would run code; weights_only loading must refuse it."""

    def __reduce__(self):
        return (print, ("arbitrary code ran",))


def test_pickled_objects_and_truncated_files_are_refused(tmp_path):
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as fh:
        torch.save({"state_dict": Payload()}, fh, pickle_module=pickle)
    with pytest.raises(CbirError, match="pickled Python objects"):
        safe_load(evil)
    model, _ = build_model(ModelConfig())
    good = tmp_path / "ckpt.pt"
    save_checkpoint(good, model, Preprocess(scales=(1.0,)))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(CbirError, match="damaged or truncated"):
        safe_load(truncated)


def test_checkpoint_round_trip_keeps_weights_and_fingerprint(tmp_path):
    model, _ = build_model(ModelConfig(projection="mlp", projection_dim=64), seed=3)
    pp = Preprocess(resolution=128, scales=(1.0,))
    fp = save_checkpoint(tmp_path / "m.pt", model, pp, extra={"epoch": 4})
    loaded, raw = load_checkpoint(tmp_path / "m.pt")
    assert raw["fingerprint"] == fp and raw["epoch"] == 4
    assert fingerprint(loaded, pp) == fp
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])


def test_multiscale_descriptor_is_the_normalised_sum_of_the_scales(tmp_path):
    from cbir.steps.embed import embed_files
    from conftest import photo, save

    files = [bytes(save(photo(s, (120, 90)), tmp_path / f"p{s}.png")) for s in range(3)]
    model, _ = build_model(ModelConfig(), seed=0)

    def run(pp: Preprocess) -> torch.Tensor:
        done, vec, failed = embed_files(model, files, pp, batch_size=2, workers=0,
                                        device=torch.device("cpu"))
        assert done == [0, 1, 2] and not failed
        return torch.from_numpy(vec)

    one, big = run(Preprocess(resolution=48, scales=(1.0,))), run(Preprocess(resolution=72, scales=(1.0,)))
    multi_pp = Preprocess(resolution=48, scales=(1.0, 1.5))
    assert multi_pp.sizes == (48, 72)
    multi = run(multi_pp)
    expected = torch.nn.functional.normalize(one + big, dim=-1)
    assert torch.allclose(multi, expected, atol=1e-5)
    assert not torch.allclose(multi, one, atol=1e-3)  # the second scale changes the descriptor
    assert fingerprint(model, multi_pp) != fingerprint(model, Preprocess(resolution=48, scales=(1.0,)))


def test_embed_scales_are_validated(tmp_path):
    import yaml

    from cbir.config import load_settings
    from cbir.errors import ConfigError
    from cbir.model import retrieval_preprocess

    def settings(embed: dict):
        (tmp_path / "params.yaml").write_text(yaml.safe_dump({"embed": embed,
                                                              "train": {"resolution": 96}}))
        return load_settings(tmp_path / "params.yaml")

    pp = retrieval_preprocess(settings({"scales": [1.0, 1.25]}))
    assert pp.resolution == 96 and pp.sizes == (96, 120)  # "train": the training resolution
    assert retrieval_preprocess(settings({"resolution": 64})).sizes == (64, 80)  # default scales
    for bad in ([], [0], [-1.0], "big"):
        with pytest.raises(ConfigError, match="embed.scales"):
            settings({"scales": bad})


def test_the_fingerprint_is_remembered_for_exactly_these_weights_and_params(workspace):
    """A step that only needs the fingerprint finds it without torch; a changed checkpoint (same
    size, same mtime), a changed parameter or a damaged cache never give a stale one."""
    import os
    import subprocess
    import sys

    from cbir.model import retrieval_model as build
    from cbir.store import fingerprint as remembered
    from cbir.store.layout import layout
    from conftest import REPO

    settings = workspace(embed={"scales": [1.0]})
    ckpt = layout(settings).checkpoint
    pp = Preprocess(resolution=settings.embed_resolution, scales=(1.0,))
    save_checkpoint(ckpt, build_model(ModelConfig(), seed=1)[0], pp)
    key = remembered.ModelKey(settings)
    fp = build(settings)[2]
    assert remembered.current_fingerprint(settings) == fp  # built: nothing remembered yet
    assert not layout(settings).fingerprints.exists()  # a step that only reads writes nothing
    remembered.remember_fingerprint(key, fp)  # what `cbir embed` does once it has embedded
    probe = ("import sys; from cbir.config import load_settings; "
             "from cbir.store.fingerprint import current_fingerprint; "
             f"print(current_fingerprint(load_settings({str(workspace.root / 'params.yaml')!r})),"
             " 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [fp, "False"]  # remembered: torch never imported

    # other weights in a file of the same size and mtime: the bytes decide
    stat = ckpt.stat()
    save_checkpoint(ckpt, build_model(ModelConfig(), seed=2)[0], pp)
    os.utime(ckpt, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert ckpt.stat().st_size == stat.st_size
    retrained = remembered.current_fingerprint(settings)
    assert retrained != fp and retrained == build(settings)[2]
    # a parameter the preprocessing depends on
    rescaled = workspace(embed={"scales": [1.0, 1.25]})
    assert remembered.current_fingerprint(rescaled) == build(rescaled)[2] != retrained
    # the weights file replaced between making the key and remembering: nothing is remembered
    key = remembered.ModelKey(settings)
    save_checkpoint(ckpt, build_model(ModelConfig(), seed=2)[0], pp)  # same bytes, a new file
    assert remembered.ModelKey(settings).value == key.value
    remembered.remember_fingerprint(key, "0" * 16)
    assert remembered.current_fingerprint(settings) == retrained
    # a checkpoint that appears after the key was made (the key said: the init's weights)
    moved = ckpt.with_name("elsewhere.pt")
    ckpt.rename(moved)
    key = remembered.ModelKey(settings)
    moved.rename(ckpt)
    remembered.remember_fingerprint(key, "1" * 16)
    ckpt.unlink()
    assert remembered.current_fingerprint(settings) == build(settings)[2] != "1" * 16
    save_checkpoint(ckpt, build_model(ModelConfig(), seed=2)[0], pp)
    # a damaged cache is only a miss
    layout(settings).fingerprints.write_text("{not json")
    assert remembered.current_fingerprint(settings) == retrained
