"""The shared benchmark harness: timing (median of repeats), machine facts, tables, JSON.

Timings on shared machines are noisy: every script compares estimators with baselines in one
process on the same data and reports ratios, which hold across runs better than times do.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def sync(device: torch.device | str | None = None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_median(fn: Callable[[], object], repeats: int = 5, warmup: int = 1,
                device: torch.device | str | None = None) -> tuple[float, list[float]]:
    """Median wall time of fn() in seconds over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
        sync(device)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 0,
                     device: torch.device | str | None = None) -> dict[str, float]:
    """Median wall seconds of each fns[name]() over `repeats` rounds, the functions alternating
    call by call (after `warmup` calls each), so that a change in a shared machine's load falls
    on every side instead of reading as a difference between them."""
    rounds = time_interleaved_rounds(fns, repeats, warmup, device)
    return {name: statistics.median(t) for name, t in rounds.items()}


def time_interleaved_rounds(fns: dict[str, Callable[[], object]], repeats: int,
                            warmup: int = 0, device: torch.device | str | None = None
                            ) -> dict[str, list[float]]:
    """time_interleaved's per-round wall seconds of each function (round i: one call of each,
    back to back), for ratios paired within a round."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
            sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=Path(__file__).resolve().parent, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True,
                               cwd=Path(__file__).resolve().parent).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine_info(device: str = "cpu") -> dict[str, object]:
    info: dict[str, object] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "commit": _commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
    }
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def write_json(name: str, payload: dict[str, object], directory: Path | None = None) -> Path:
    directory = RESULTS_DIR if directory is None else Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return path


def format_table(rows: list[dict[str, object]], columns: list[tuple[str, str, str]]) -> str:
    """columns: (key, header, format spec); missing values print as '-'."""
    cells = [[h for _, h, _ in columns]]
    for row in rows:
        line = []
        for key, _, spec in columns:
            v = row.get(key)
            line.append("-" if v is None else (format(v, spec) if spec else str(v)))
        cells.append(line)
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    out = []
    for j, c in enumerate(cells):
        out.append("  ".join(s.ljust(w) if i == 0 else s.rjust(w) for i, (s, w) in enumerate(zip(c, widths))))
        if j == 0:
            out.append("-" * len(out[0]))
    return "\n".join(out)
