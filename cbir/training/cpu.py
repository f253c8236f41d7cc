"""The CPU side of training: how many torch threads a rank gets (the CPUs this process may use:
affinity mask and cgroup quota, less its augmentation workers), and whether the trunk runs in
bf16 (native bf16 CPUs, one thread)."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch


def available_cpus(
    cgroup_root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")
) -> int:
    """The CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (what a
    container, `taskset` or a systemd slice grants), not the machine's core count. More threads
    than that only wait for each other at every parallel step."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota(cgroup_root, proc_cgroup)
    return max(1, min(cpus, math.ceil(quota)) if quota else cpus)


def torch_threads(cpus: int, workers: int, ranks: int = 1) -> int:
    """Intra-op threads for each rank: its share of the CPUs, less those its augmentation workers
    run on. OpenMP threads meet at the end of every operation, so a thread that has to share a
    core (with a worker, or another process) holds up the others hundreds of times a step:
    on 2 busy cores, 2 threads ran a step slower than 1 did."""
    return max(1, cpus // max(1, ranks) - workers)


def _cgroup_quota(root: Path, proc_cgroup: Path) -> float | None:
    """CPUs' worth of time per period the cgroup grants (the smallest along its path), or None."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2: cpu.max in the cgroup and each of its parents
            folder = root / path.lstrip("/")
            while True:
                limits.append(_read_quota(folder / "cpu.max", None))
                if folder == root or root not in folder.parents:
                    break
                folder = folder.parent
        elif "cpu" in controllers.split(","):  # cgroup v1
            for base in (root / "cpu", root / "cpu,cpuacct", root / "cpuacct,cpu"):
                for folder in (base / path.lstrip("/"), base):
                    limits.append(
                        _read_quota(folder / "cpu.cfs_quota_us", folder / "cpu.cfs_period_us")
                    )
    found = [q for q in limits if q]
    return min(found) if found else None


def _read_quota(quota_file: Path, period_file: Path | None) -> float | None:
    try:
        if period_file is None:  # v2: "max 100000" or "150000 100000"
            quota, period = quota_file.read_text().split()[:2]
        else:  # v1: quota -1 = none
            quota, period = quota_file.read_text().strip(), period_file.read_text().strip()
        q, per = float(quota), float(period)
    except (OSError, ValueError):
        return None
    return q / per if q > 0 and per > 0 else None


def _native_bf16() -> bool:
    """Whether the CPU computes bf16 in hardware (AVX512-BF16, AMX): there bf16 convolutions take
    half the time of fp32 ones; elsewhere oneDNN emulates them, no faster than fp32."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
        return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags)) and bool(
            torch.ops.mkldnn._is_mkldnn_bf16_supported()
        )
    except (OSError, AttributeError, RuntimeError):
        return False


def cpu_bf16(device: torch.device, precision: str, threads: int) -> bool:
    """Whether the trunk runs in bf16 on this CPU: train.precision auto, native bf16, and one
    torch thread. oneDNN's bf16 weight gradients slow down as threads are added (layer4's 3x3
    convolution at 112 px: 0.19 s with 1 thread, 1.2 s with 2, 4.7 s with 4; AVX512-BF16,
    oneDNN 3.12), while fp32 ones speed up."""
    return device.type == "cpu" and precision == "auto" and threads == 1 and _native_bf16()
