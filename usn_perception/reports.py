"""Report writing shared by every front: atomic output folders, CSV, Markdown tables, plots.

Outputs are written into a hidden staging folder and moved into place only when the whole
report is complete, so a failed run never leaves files that look like a result.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402


@contextlib.contextmanager
def staged_output(out: str | Path) -> Iterator[Path]:
    """Yield a staging folder; on success move its files into ``out`` (created)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f'.{out.name}.partial-', dir=out.parent))
    try:
        yield stage
        out.mkdir(parents=True, exist_ok=True)
        for item in sorted(stage.iterdir()):
            target = out / item.name
            if target.is_dir():
                shutil.rmtree(target)
            item.replace(target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _fmt(v: object) -> object:
    if isinstance(v, float):  # numpy floats too: written as plain Python reprs
        return '' if math.isnan(v) else repr(float(v))
    if hasattr(v, 'item'):
        return v.item()
    return v


def write_csv(path: Path, rows: Sequence[dict], fields: Sequence[str]) -> None:
    """Rows as CSV with a header; floats written exactly (repr), NaN as empty."""
    with open(path, 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=list(fields), lineterminator='\n')
        w.writeheader()
        for row in rows:
            w.writerow({k: _fmt(row.get(k)) for k in fields})


def write_json(path: Path, doc: object) -> None:
    """Indented JSON; NaN becomes null so every JSON reader can parse it."""
    def clean(v: object) -> object:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    path.write_text(json.dumps(clean(doc), indent=2, sort_keys=False) + '\n')


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table; floats with 3 decimals."""
    def cell(v: object) -> str:
        if isinstance(v, float):
            return '–' if math.isnan(v) else f'{v:.3f}'
        return str(v)

    lines = ['| ' + ' | '.join(headers) + ' |', '|' + '---|' * len(headers)]
    lines += ['| ' + ' | '.join(cell(v) for v in row) + ' |' for row in rows]
    return '\n'.join(lines)


def plot_lines(
    path: Path, series: dict[str, tuple[Sequence[float], Sequence[float]]], *, xlabel: str,
    ylabel: str, title: str, ylim: tuple[float, float] | None = None,
) -> None:
    """One line per named series (x, y)."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for name, (x, y) in series.items():
        ax.plot(x, y, marker='o', label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if ylim:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_histograms(
    path: Path, series: dict[str, Sequence[float]], *, xlabel: str, title: str, bins: int = 40
) -> None:
    """Overlaid histograms, one per named series."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for name, values in series.items():
        vals = [v for v in values if math.isfinite(v)]
        if vals:
            ax.hist(vals, bins=bins, alpha=0.55, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel('keypoints')
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
