"""SimCLR fine-tuning: the loss falls, runs are reproducible, resume after SIGKILL is exact,
the time budget fits the schedule (or stops cleanly), the decoded cache is incremental, torchrun
works (gloo, CPU), threads follow the CPUs the process may use.

One tiny collection (16 synthetic photographs, 48 px training, resnet18, batch 8) is ingested
once; every test trains into its own models folder.
"""

from __future__ import annotations

import itertools
import json
import re
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import REPO, deep_merge, photo, save, write_params
from PIL import Image

from cbir.config import Settings, load_settings
from cbir.errors import CbirError
from cbir.model import (
    fingerprint,
    load_checkpoint,
    retrieval_model,
    retrieval_preprocess,
    safe_load,
)
from cbir.steps.ingest import run_ingest
from cbir.steps.train import resume_or_restart, build_cache, run_train
from cbir.store.layout import HISTORY, LAST
from cbir.store.layout import TRAIN_METRICS as METRICS
from cbir.training.cpu import available_cpus
from cbir.training.data import EpochBatches, TwoViews, mix_views
from cbir.training.schedule import Schedule, fit_epochs, lr_at

N_IMAGES = 16
EPOCHS = 4
# Mild augmentation: from random init, 8 steps of a strong recipe barely move the loss.
TRAIN = {"resolution": 48, "batch_size": 8, "epochs": EPOCHS, "lr": 1e-3, "temperature": 0.2,
         "warmup_epochs": 0.5, "augmentation": "heritage", "augment_strength": 0.3,
         "koleo_weight": 0.05, "mix_prob": 0.5, "workers": 1, "seed": 3}


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> Path:
    """Scans, manifest and decoded cache, shared by every test (read only after the first)."""
    root = tmp_path_factory.mktemp("collection")
    for i in range(N_IMAGES):
        save(photo(100 + i, (96, 72)), root / "scans" / f"print-{i:02d}.jpg", quality=90)
    save(photo(100, (96, 72)), root / "scans" / "copy" / "print-00.jpg", quality=90)  # exact dup
    run_ingest(_settings(root, root / "ingest"))
    return root


def _settings(collection: Path, ws: Path, **sections: dict[str, Any]) -> Settings:
    shared = collection.resolve()
    params = deep_merge({
        "data": {"scans_dir": str(shared / "scans"), "ground_truth": None,
                 "manifest_dir": str(shared / "manifest"), "catalog": str(shared / "cat.duckdb"),
                 "cache_dir": str(shared / "cache"), "models_dir": "models"},
        "ingest": {"workers": 2},
        "model": {"backbone": "resnet18", "projection_dim": 64, "checkpoint": "models/model.pt",
                  "seed": 1},
        "embed": {"resolution": 64},
        "train": TRAIN,
    }, sections)
    return load_settings(write_params(ws, params))


@pytest.fixture(scope="module")
def reference(collection, tmp_path_factory) -> tuple[Settings, Any]:
    """One uninterrupted run of the whole schedule."""
    settings = _settings(collection, tmp_path_factory.mktemp("reference"))
    return settings, run_train(settings, log=lambda _: None)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return safe_load(path)["state_dict"]


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def test_training_lowers_the_loss_and_writes_a_checkpoint_embed_uses(reference):
    settings, summary = reference
    losses = [h["loss"] for h in summary.history]
    assert len(losses) == EPOCHS and summary.epochs_done == EPOCHS and not summary.stopped_early
    assert summary.images == N_IMAGES  # the exact duplicate is trained on once
    assert losses[-1] < 0.75 * losses[0], losses

    # the retrieval checkpoint round-trips with the fingerprint it records
    ckpt = settings.path(settings.model.checkpoint)
    model, raw = load_checkpoint(ckpt)
    assert raw["fingerprint"] == summary.fingerprint
    pp = retrieval_preprocess(settings)
    assert fingerprint(model, pp) == raw["fingerprint"]
    _assert_same_weights(model.state_dict(), raw["state_dict"])
    assert raw["training"]["epochs"] == EPOCHS and raw["training"]["final_loss"] == losses[-1]
    # ... and `cbir embed` picks it up (a new fingerprint, so everything is re-embedded)
    _, _, fp, source = retrieval_model(settings)
    assert fp == summary.fingerprint and str(ckpt) in source
    _, _, untrained_fp, _ = retrieval_model(settings, untrained=True)
    assert untrained_fp != fp

    # last.pt holds the full state and loads with weights_only
    models = settings.path(settings.data.models_dir)
    state = safe_load(models / LAST)
    assert state["epoch"] == EPOCHS and len(state["history"]) == EPOCHS
    _assert_same_weights(state["model"], raw["state_dict"])
    rows = (models / HISTORY).read_text().splitlines()
    assert rows[0] == "epoch,step,loss,lr,seconds" and len(rows) == EPOCHS + 1
    assert rows[-1].startswith(f"{EPOCHS},{EPOCHS * 2},")  # 16 images / batch 8 = 2 steps
    metrics = json.loads((models / METRICS).read_text())
    assert metrics["epochs"] == EPOCHS and metrics["loss"] == losses[-1]
    assert metrics["images"] == N_IMAGES and metrics["stopped_early"] is False
    assert any("final loss" in line for line in summary.lines())


def test_same_params_and_seed_give_the_same_curve_and_resume_matches(reference, collection,
                                                                      tmp_path):
    ref_settings, ref = reference
    settings = _settings(collection, tmp_path)
    part = run_train(settings, max_epochs=2, log=lambda _: None)
    assert part.stopped_early and part.epochs_done == 2 and "max_epochs" in part.stop_reason
    assert [h["loss"] for h in part.history] == [h["loss"] for h in ref.history[:2]]

    # a resume with other params is refused rather than silently giving another model
    changed = _settings(collection, tmp_path, train={"lr": 2e-3})
    with pytest.raises(CbirError, match="train.lr"):
        run_train(changed, resume=True, log=lambda _: None)

    done = run_train(settings, resume=True, log=lambda _: None)
    assert done.resumed_from == 2 and done.epochs_done == EPOCHS and not done.stopped_early
    assert [h["loss"] for h in done.history] == [h["loss"] for h in ref.history]
    _assert_same_weights(_weights(settings.path(settings.model.checkpoint)),
                         _weights(ref_settings.path(ref_settings.model.checkpoint)))
    assert done.fingerprint == ref.fingerprint

    # a pipeline's rerun (cbir build, find-duplicates): a finished training is left as it is;
    # other params (or images) start it again, as `dvc repro` would, instead of failing
    lines: list[str] = []
    same = resume_or_restart(settings, log=lines.append)
    assert same.resumed_from == EPOCHS and same.history == done.history
    again = resume_or_restart(changed, log=lines.append)
    assert again.resumed_from is None and again.epochs_done == EPOCHS
    assert any("was trained with other params (train.lr" in line
               and line.endswith(": training again from the beginning") for line in lines), lines
    assert again.fingerprint != done.fingerprint


def _train_command(params: Path) -> list[str]:
    """`cbir train` once the CLI has it; until then this module's own entry point."""
    from cbir.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    module = "cbir.cli" if "train" in sub.choices else "cbir.steps.train"
    return [sys.executable, "-m", module, *(["train"] if module == "cbir.cli" else []),
            "--params", str(params)]


def test_resume_after_sigkill_gives_the_uninterrupted_result(reference, collection, tmp_path):
    ref_settings, ref = reference
    settings = _settings(collection, tmp_path)
    env = {**os.environ, "CBIR_KILL_AT": "train.epoch:2"}  # dies before saving epoch 2
    # multiprocessing's folder (its workers' forkserver listens there), which a process
    # killed outright cannot remove: not left in the machine's /tmp
    env["TMPDIR"] = str(tmp_path)
    out = subprocess.run(_train_command(settings.params_path), env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == -signal.SIGKILL, out.stderr
    models = settings.path(settings.data.models_dir)
    assert safe_load(models / LAST)["epoch"] == 1
    assert not settings.path(settings.model.checkpoint).exists()

    done = run_train(settings, resume=True, log=lambda _: None)
    assert done.resumed_from == 1 and done.epochs_done == EPOCHS
    _assert_same_weights(_weights(settings.path(settings.model.checkpoint)),
                         _weights(ref_settings.path(ref_settings.model.checkpoint)))
    assert [h["loss"] for h in done.history] == [h["loss"] for h in ref.history]


def ticks(seconds: float) -> Any:
    """A clock that advances `seconds` each time it is read: run_train reads it when the run
    starts, then at the start and the end of each epoch (so an epoch "takes" `seconds`, and
    `2 * seconds` from one epoch's start to the next)."""
    return itertools.count(0.0, seconds).__next__


def test_time_budget_stops_early_with_a_usable_checkpoint(collection, tmp_path):
    # 0.001 min = 60 ms: less than any epoch, so exactly one epoch runs (there is no estimate
    # before the first one); not even a schedule fitted to 2 epochs fits, so the run stops.
    settings = _settings(collection, tmp_path, train={"time_budget_minutes": 0.001,
                                                      "workers": 0})
    lines: list[str] = []
    summary = run_train(settings, log=lines.append, clock=ticks(1.0))
    assert summary.stopped_early and summary.epochs_done == 1 and summary.epochs == 2
    assert "time budget" in summary.stop_reason and "ran out" in summary.stop_reason
    said = next(s for s in lines if s.startswith("train: "))  # counts in the singular at 1
    assert re.search(r" (1 step|\d\d+ steps|[02-9] steps) an epoch, ", said), said
    assert re.search(r" with (1 thread|\d\d+ threads|[02-9] threads), 0 augmentation workers$",
                     said), said
    assert any("stopped early" in s for s in summary.lines())
    assert any("fitted to 2 epochs" in s for s in lines) and any("stopping" in s for s in lines)
    model, raw = load_checkpoint(settings.path(settings.model.checkpoint))
    assert raw["training"]["stopped_early"] and raw["training"]["epochs"] == 1
    metrics = json.loads((settings.path(settings.data.models_dir) / METRICS).read_text())
    assert metrics["stopped_early"] is True and metrics["epochs"] == 1
    with torch.inference_mode():
        z = model.eval()(torch.randn(2, 3, 64, 64))
    assert torch.isfinite(z).all()

    # without --resume an existing last.pt is not continued: training starts again
    lines.clear()
    again = run_train(settings, log=lines.append)
    assert again.resumed_from is None and again.epochs_done == 1
    assert not any("resuming" in s for s in lines)
    # with it, the run continues after epoch 1 (and the budget stops it again at once)
    resumed = run_train(settings, resume=True, log=lines.append)
    assert resumed.resumed_from == 1 and resumed.epochs_done == 1 and resumed.stopped_early


FIT = {"resolution": 32, "epochs": 6, "workers": 0, "time_budget_minutes": 2}


def test_binding_budget_fits_the_schedule_and_resume_continues_it(collection, tmp_path):
    # 15 s an epoch, 30 s from one epoch's start to the next; 45 s gone after epoch 1, so 6
    # epochs would take 3 min of the 2-min budget: 75 s left fit 2 more epochs (with slack).
    fitted_settings = _settings(collection, tmp_path / "whole", train=FIT)
    lines: list[str] = []
    whole = run_train(fitted_settings, log=lines.append, clock=ticks(15.0))
    assert whole.epochs_planned == 6 and whole.epochs == 3 and whole.epochs_done == 3
    assert not whole.stopped_early and not whole.stop_reason  # its schedule ran to its end
    assert not any("stopped early" in s for s in whole.lines())
    assert "6 epochs of ~30 s would take" in whole.fit_reason
    assert any(s.startswith("time budget: ") and "fitted to 3 epochs" in s for s in lines)
    raw = safe_load(fitted_settings.path(fitted_settings.model.checkpoint))["training"]
    assert (raw["epochs_planned"], raw["epochs_fitted"], raw["epochs"]) == (6, 3, 3)
    assert raw["fit_reason"] == whole.fit_reason and not raw["stopped_early"]
    metrics = json.loads((fitted_settings.path(fitted_settings.data.models_dir)
                          / METRICS).read_text())
    assert (metrics["epochs_planned"], metrics["epochs_fitted"], metrics["epochs"]) == (6, 3, 3)
    assert metrics["fit_reason"] == whole.fit_reason and metrics["stopped_early"] is False
    # the LR decays to 0 at the end of the fitted schedule (step 6), continuously
    plan = Schedule(base=1e-3, steps=2, warmup=1, epochs=6)
    sched = plan.fitted(1, 3)
    assert sched.lr(6) == pytest.approx(0.0, abs=1e-12)
    assert [h["lr"] for h in whole.history] == [plan.lr(1), sched.lr(3), sched.lr(5)]

    # killed after epoch 2 of the fitted schedule, then resumed: the same fitted schedule
    settings = _settings(collection, tmp_path / "parts", train=FIT)
    part = run_train(settings, max_epochs=2, log=lambda _: None, clock=ticks(15.0))
    assert part.epochs == 3 and part.epochs_done == 2 and part.stopped_early
    assert safe_load(settings.path(settings.data.models_dir) / LAST)["schedule"]["epochs"] == 3
    done = run_train(settings, resume=True, log=lambda _: None, clock=ticks(1.0))
    assert done.resumed_from == 2 and done.epochs == 3 and done.epochs_done == 3
    assert not done.stopped_early and done.fit_reason == whole.fit_reason
    same = ("epoch", "step", "loss", "lr")
    assert [[h[k] for k in same] for h in done.history] == \
        [[h[k] for k in same] for h in whole.history]
    _assert_same_weights(_weights(settings.path(settings.model.checkpoint)),
                         _weights(fitted_settings.path(fitted_settings.model.checkpoint)))


def test_budget_that_does_not_bind_changes_nothing(reference, collection, tmp_path):
    _, ref = reference
    settings = _settings(collection, tmp_path, train={"time_budget_minutes": 1.0})
    # epochs of 5 s, 10 s from start to start: 15 s gone after the first, 45 s in all, within
    # the minute: nothing is fitted
    summary = run_train(settings, log=lambda _: None, clock=ticks(5.0))
    assert summary.epochs == summary.epochs_planned == summary.epochs_done == EPOCHS
    assert not summary.fit_reason and not summary.stopped_early
    assert [(h["loss"], h["lr"]) for h in summary.history] == \
        [(h["loss"], h["lr"]) for h in ref.history]
    assert summary.fingerprint == ref.fingerprint


def test_fitted_schedule_is_continuous_and_decays_to_zero():
    plan = Schedule(base=1.0, steps=4, warmup=4, epochs=10)
    assert [plan.lr(s) for s in range(41)] == [lr_at(s, 40, 4, 1.0) for s in range(41)]
    first = plan.fitted(3, 6)  # after epoch 3 (step 12): end after epoch 6 instead of 10
    assert first.lr(12) == pytest.approx(plan.lr(12), rel=1e-12)
    assert first.lr(24) == pytest.approx(0.0, abs=1e-12)
    lrs = [first.lr(s) for s in range(12, 25)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))  # decays faster, but without a jump
    again = first.fitted(4, 5)  # epochs got slower: fitted again after epoch 4
    assert again.lr(16) == first.lr(16) and again.lr(20) == pytest.approx(0.0, abs=1e-12)
    # fitted during the warm-up: the warm-up runs as planned, then the shorter decay
    early = Schedule(base=1.0, steps=4, warmup=6, epochs=10).fitted(1, 3)
    assert early.lr(5) == pytest.approx(1.0) and early.lr(6) == pytest.approx(1.0)
    assert early.lr(12) == pytest.approx(0.0, abs=1e-12)
    assert Schedule(base=1.0, steps=4, warmup=6, epochs=10).fewest_epochs(1) == 2
    with pytest.raises(ValueError):
        plan.fitted(3, 3)


def test_fit_epochs_only_shortens_and_keeps_slack():
    plan = Schedule(base=1.0, steps=10, warmup=10, epochs=25)
    assert fit_epochs(plan, 1, 60.0, 50.0, 0.0) == 25  # no budget
    assert fit_epochs(plan, 1, 60.0, 50.0, 1260.0) == 25  # 60 + 24 * 50 fits exactly
    # 20 min, 95 s an epoch after the first: 1,105 s left hold 11 epochs at 95 s * 1.05
    assert fit_epochs(plan, 1, 95.0, 95.0, 1200.0) == 12
    assert fit_epochs(plan.fitted(1, 12), 4, 400.0, 200.0, 1200.0) == 7  # slower: again
    assert fit_epochs(plan, 1, 1190.0, 95.0, 1200.0) == 2  # at least one more epoch
    assert fit_epochs(plan, 25, 5000.0, 95.0, 1200.0) == 25  # nothing left to fit


def test_threads_follow_the_cpus_the_process_may_use(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    proc = tmp_path / "cgroup"
    v2 = tmp_path / "v2"
    (v2 / "box" / "job").mkdir(parents=True)
    proc.write_text("0::/box/job\n")
    (v2 / "box" / "job" / "cpu.max").write_text("max 100000\n")
    assert available_cpus(v2, proc) == 4  # no quota: the affinity mask
    (v2 / "box" / "cpu.max").write_text("150000 100000\n")  # a parent's quota counts
    assert available_cpus(v2, proc) == 2  # 1.5 CPUs: 2 threads, throttled to 1.5 together
    (v2 / "box" / "job" / "cpu.max").write_text("50000 100000\n")
    assert available_cpus(v2, proc) == 1  # never 0
    v1 = tmp_path / "v1"
    (v1 / "cpu,cpuacct").mkdir(parents=True)
    proc.write_text("4:memory:/x\n2:cpu,cpuacct:/\n")
    (v1 / "cpu,cpuacct" / "cpu.cfs_quota_us").write_text("-1\n")
    (v1 / "cpu,cpuacct" / "cpu.cfs_period_us").write_text("100000\n")
    assert available_cpus(v1, proc) == 4
    (v1 / "cpu,cpuacct" / "cpu.cfs_quota_us").write_text("300000\n")
    assert available_cpus(v1, proc) == 3
    assert available_cpus(tmp_path / "none", tmp_path / "missing") == 4
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {5})
    assert available_cpus(v1, proc) == 1


def test_training_views_are_embeds_tensors(collection):
    from cbir.model import to_tensor

    settings = _settings(collection, collection / "views")
    views = TwoViews(build_cache(settings, log=lambda _: None), "heritage", 48, 0.3, 0)
    rng = np.random.default_rng(0)
    for _ in range(5):
        picture = Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8), "RGB")
        assert torch.equal(views._tensor(picture), to_tensor(picture, views.pp))


def test_decoded_cache_is_incremental_and_follows_the_image_set(tmp_path):
    scans = tmp_path / "scans"
    for i in range(5):
        save(photo(200 + i, (80, 60)), scans / f"p{i}.png")
    settings = load_settings(write_params(tmp_path, {
        "data": {"scans_dir": "scans", "ground_truth": None}, "ingest": {"workers": 2},
        "train": {"resolution": 40}}))
    run_ingest(settings)
    logs: list[str] = []
    first = build_cache(settings, log=logs.append)
    assert first.side == 50 and len(first.rows) == 5 and "5 images decoded" in logs[-1]
    pixels = np.load(first.file, mmap_mode="r")
    assert pixels.shape == (5, 50, 50, 3) and pixels.dtype == np.uint8
    assert build_cache(settings, log=logs.append) == first and len(logs) == 1  # nothing to do

    save(photo(300, (80, 60)), scans / "new.png")
    (scans / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 50)  # quarantined by ingest
    run_ingest(settings)
    second = build_cache(settings, log=logs.append)
    assert "1 image decoded, 5 reused" in logs[-1] and len(second.rows) == 6
    again = np.load(second.file, mmap_mode="r")
    for image_id in first.ids:
        assert np.array_equal(again[second.ids.index(image_id)],
                              pixels[first.ids.index(image_id)])
    assert sorted(p.name for p in second.folder.glob("images-*.npy")) == [second.file.name]

    (scans / "p0.png").unlink()  # a scan removed: its row goes, nothing is decoded again
    run_ingest(settings)
    third = build_cache(settings, log=logs.append)
    assert len(third.rows) == 5 and "0 images decoded, 5 reused" in logs[-1]


def test_lr_schedule_warms_up_then_decays_to_zero():
    lrs = [lr_at(s, 100, 10, 1.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] < 0.001 and lr_at(100, 100, 10, 1.0) == pytest.approx(0.0)
    assert lr_at(0, 10, 0, 0.5) == pytest.approx(0.5)  # no warm-up


def test_ranks_share_each_global_batch_without_overlap():
    single = EpochBatches(10, 4, seed=7)
    ranks = [EpochBatches(10, 4, seed=7, rank=r, world=2) for r in range(2)]
    for s in [single, *ranks]:
        s.epoch = 3
    whole = list(single)
    parts = [list(r) for r in ranks]
    assert len(whole) == 2 and all(len(p) == 2 for p in parts)  # drop_last: 10 // 4
    for step, batch in enumerate(whole):
        assert parts[0][step] + parts[1][step] == batch  # rank 0 first half, rank 1 second
        assert all(epoch == 3 for epoch, _ in batch)
    single.epoch = 4
    assert list(single) != whole  # reshuffled every epoch


def test_mix_views_keeps_most_of_each_image_and_is_seeded():
    x = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 3, 16, 16).contiguous()
    for seed in range(20):
        out = mix_views(x, np.random.default_rng([seed]))
        assert out.shape == x.shape
        assert torch.equal(out, mix_views(x, np.random.default_rng([seed])))
        for i in range(4):  # image i (all pixels = i) is mixed only with image i-1 (rolled)
            own, other = float(i), float((i - 1) % 4)
            share = (out[i].mean().item() - other) / (own - other)  # 1: nothing mixed in
            assert 0.5 <= share <= 1.0 + 1e-6


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_torchrun_two_processes_on_cpu(collection, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip(f"torchrun not found next to {sys.executable}")
    settings = _settings(collection, tmp_path, train={"epochs": 1, "workers": 0})
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["TMPDIR"] = str(tmp_path)  # torchelastic's folders: not left in the machine's /tmp
    # the timeout only stops a hang: a loaded machine runs one epoch of two processes slowly
    out = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "cbir.steps.train",
                          "--params", str(settings.params_path)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "x2" in out.stdout  # the summary names both processes, and is printed once
    assert out.stdout.count("train: 1/1 epochs") == 1
    model, raw = load_checkpoint(settings.path(settings.model.checkpoint))
    assert raw["training"]["world_size"] == 2 and raw["training"]["epochs"] == 1
    assert np.isfinite(raw["training"]["final_loss"])
    assert safe_load(settings.path(settings.data.models_dir) / LAST)["epoch"] == 1
