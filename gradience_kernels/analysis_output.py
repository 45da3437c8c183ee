"""``analysis.analyze`` rows as an aligned text table, JSON or CSV, and written to a file."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

DEFAULT_COLUMNS: list[tuple[str, str, str]] = [
    ("name", "layer", ""),
    ("shape", "shape", ""),
    ("num_evals", "evals", "d"),
    ("alpha", "alpha", ".3f"),
    ("xmin", "xmin", ".4g"),
    ("D", "D", ".4f"),
    ("n_tail", "n_tail", "d"),
    ("stable_rank", "stable rank", ".2f"),
    ("effective_rank", "eff. rank", ".1f"),
    ("spectral_norm", "||W||_2", ".4g"),
    ("log_spectral_norm", "log10 lmax", ".3f"),
    ("frobenius_norm", "||W||_F", ".4g"),
    ("mp_spikes", "MP spikes", "d"),
    ("warning", "warning", ""),
]


def _cell(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, tuple):
        return "x".join(str(v) for v in value)
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
    if spec:
        try:
            return format(value, spec)
        except (ValueError, TypeError):
            return str(value)
    return str(value)


def format_table(rows: Sequence[Mapping[str, Any]],
                 columns: Sequence[tuple[str, str, str]] | None = None) -> str:
    """Aligned text table of ``analyze`` rows. columns: (key, header, format spec) triples
    (default ``DEFAULT_COLUMNS``); text columns left-aligned, numbers right-aligned; missing
    or NaN values print as '-', shapes as 768x3072."""
    cols = list(DEFAULT_COLUMNS if columns is None else columns)
    cells = [[h for _, h, _ in cols]]
    numeric = [True] * len(cols)
    for row in rows:
        line = []
        for j, (key, _, spec) in enumerate(cols):
            v = row.get(key)
            if isinstance(v, (str, tuple)):
                numeric[j] = False
            line.append(_cell(v, spec))
        cells.append(line)
    widths = [max(len(c[j]) for c in cells) for j in range(len(cols))]
    lines = []
    for r, line in enumerate(cells):
        parts = [s.rjust(w) if numeric[j] else s.ljust(w)
                 for j, (s, w) in enumerate(zip(line, widths))]
        lines.append("  ".join(parts).rstrip())
        if r == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return list(v)
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


def format_rows(rows: Sequence[Mapping[str, Any]], fmt: str = "table") -> str:
    """``analyze`` rows as text: 'table' (``format_table``), 'json' (a list of objects; NaN as
    null, infinities as "inf"/"-inf") or 'csv' (every key a column; shapes as 768x3072)."""
    if fmt == "table":
        return format_table(rows)
    if fmt == "json":
        import json

        return json.dumps([{k: _jsonable(v) for k, v in r.items()} for r in rows], indent=1) + "\n"
    if fmt == "csv":
        import csv
        import io

        keys: list[str] = []
        for r in rows:
            keys.extend(k for k in r if k not in keys)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("x".join(map(str, v)) if isinstance(v, tuple) else v)
                             for k, v in r.items()})
        return buf.getvalue()
    raise ValueError(f"fmt: expected 'table', 'json' or 'csv', got fmt={fmt!r}")


def write_rows(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Write ``analyze`` rows to a .json or .csv file (``format_rows``), chosen by the suffix."""
    p = Path(path)
    fmt = p.suffix.lower().lstrip(".")
    if fmt not in ("json", "csv"):
        raise ValueError(f"unsupported output file type {p.suffix!r} for {str(path)!r}: expected "
                         f".json or .csv")
    p.write_text(format_rows(rows, fmt))
    return p
