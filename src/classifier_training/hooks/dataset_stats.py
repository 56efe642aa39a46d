"""Dataset health report at fit start: class balance, leaks, broken and tiny images, sizes.

Written to the run directory::

    dataset_stats.json          everything below, machine-readable
    dataset_class_counts.png    per-class counts of every split (log scale)
    dataset_image_sizes.png     width / height histograms of the distinct image files

* class counts per split, imbalance ratio ``max / min`` of the train counts, classes missing
  from val/test;
* rows skipped because their label is not a train class (``SplitIndex.skipped_unknown``);
* duplicates: files with identical bytes (SHA-1) across splits (train/val leaks) and within a
  split, and byte-identical files carrying different labels;
* unreadable images (PIL cannot parse the header) and tiny ones (shorter side < 16 px);
* metadata distributions (``jersey_color``, ``number_color``, ``border``) when rows carry them.

Fast on ~10k small files: each distinct file is read once, hashed, and its size is taken from
the header (``Image.open`` decodes no pixels), on a thread pool.
"""

from __future__ import annotations

import hashlib
import io
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import StrMethodFormatter
from PIL import Image

from classifier_training.data.index import DatasetIndex
from classifier_training.hooks.base import FitContext, Hook
from classifier_training.hooks.common import format_table
from classifier_training.io import atomic_write_json, save_figure

TINY_SIDE = 16
"""Images whose shorter side is below this many pixels are reported as tiny."""
METADATA_KEYS = ("jersey_color", "number_color", "border")
MAX_LISTED = 50
"""Examples kept per list in the JSON (counts are always complete)."""


@dataclass(frozen=True)
class FileFacts:
    """What one pass over a file's bytes tells: content hash and header size (or the error)."""

    sha1: str
    width: int
    height: int
    error: str = ""


def inspect_file(path: Path) -> FileFacts:
    """SHA-1 of the bytes plus the image size from the header (no pixel decoding)."""
    try:
        data = path.read_bytes()
    except OSError as err:
        return FileFacts("", 0, 0, f"cannot read: {err}")
    sha1 = hashlib.sha1(data, usedforsecurity=False).hexdigest()
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return FileFacts(sha1, 0, 0, f"cannot parse image header: {err}")
    return FileFacts(sha1, int(width), int(height))


def inspect_files(paths: Iterable[Path], workers: int = 8) -> dict[Path, FileFacts]:
    """:func:`inspect_file` for each distinct path, on a thread pool (I/O bound)."""
    unique = list(dict.fromkeys(paths))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(zip(unique, pool.map(inspect_file, unique), strict=True))


def all_paths(index: DatasetIndex) -> list[Path]:
    """Every sample's image path, split by split, in sample order (repeats included)."""
    return [x.path for s in index.splits.values() for x in s.samples]


def dataset_stats(
    index: DatasetIndex, facts: Mapping[Path, FileFacts] | None = None
) -> dict[str, Any]:
    """The report as a JSON-ready dict (see the module docstring); ``facts`` from
    :func:`inspect_files` are computed here when not given."""
    labels = sorted(index.class_to_idx, key=index.class_to_idx.__getitem__)
    splits = {s.name: s for s in index.splits.values()}
    counts = {name: Counter(x.label for x in s.samples) for name, s in splits.items()}
    train_name = index.train.name
    train_counts = [counts[train_name][label] for label in labels]
    if facts is None:
        facts = inspect_files(all_paths(index))

    # Which splits/labels each distinct content hash appears under.
    by_hash: dict[str, dict[Path, tuple[str, str]]] = defaultdict(dict)
    for name, s in splits.items():
        for x in s.samples:
            f = facts[x.path]
            if f.sha1:
                by_hash[f.sha1].setdefault(x.path, (name, x.label))
    cross, conflicts = [], []
    within: Counter[str] = Counter()
    for sha1, files in by_hash.items():
        if len(files) < 2:
            continue
        names = {n for n, _ in files.values()}
        entry = {
            "sha1": sha1,
            "files": [{"split": n, "path": str(p), "label": lab} for p, (n, lab) in files.items()],
        }
        if len(names) > 1:
            cross.append(entry)
        for n in names:
            within[n] += sum(1 for sn, _ in files.values() if sn == n) - 1
        if len({lab for _, lab in files.values()}) > 1:
            conflicts.append(entry)

    unreadable, tiny = [], []
    for name, s in splits.items():
        for p in dict.fromkeys(x.path for x in s.samples):
            f = facts[p]
            if f.error:
                unreadable.append({"split": name, "path": str(p), "error": f.error})
            elif min(f.width, f.height) < TINY_SIDE:
                tiny.append({"split": name, "path": str(p), "width": f.width, "height": f.height})

    sizes = [(f.width, f.height) for f in facts.values() if not f.error]
    widths = np.array([w for w, _ in sizes] or [0])
    heights = np.array([h for _, h in sizes] or [0])

    metadata: dict[str, Any] = {}
    for name, s in splits.items():
        rows = [x.metadata for x in s.samples if x.metadata]
        if not rows:
            continue
        metadata[name] = {"rows_with_metadata": len(rows), "rows": len(s.samples)}
        for key in METADATA_KEYS:
            c = Counter(str(r[key]) for r in rows if key in r)
            if c:
                metadata[name][key] = dict(c.most_common())

    return {
        "root": str(index.root),
        "format": index.format,
        "num_classes": len(labels),
        "totals": {name: len(s) for name, s in splits.items()},
        "class_counts": {name: {lab: c[lab] for lab in labels} for name, c in counts.items()},
        "imbalance_ratio": max(train_counts) / max(1, min(train_counts)),
        "largest_class": labels[int(np.argmax(train_counts))],
        "smallest_class": labels[int(np.argmin(train_counts))],
        "missing_classes": {
            name: [lab for lab in labels if c[lab] == 0] for name, c in counts.items()
        },
        "skipped_unknown_label_rows": {name: s.skipped_unknown for name, s in splits.items()},
        "distinct_files": len(facts),
        "duplicates": {
            "cross_split_groups": len(cross),
            "cross_split_files": sum(len(e["files"]) for e in cross),
            "within_split_extra_copies": dict(within),
            "label_conflict_groups": len(conflicts),
            "cross_split_examples": cross[:MAX_LISTED],
            "label_conflict_examples": conflicts[:MAX_LISTED],
        },
        "unreadable_count": len(unreadable),
        "unreadable": unreadable[:MAX_LISTED],
        "tiny_count": len(tiny),
        "tiny_min_side": TINY_SIDE,
        "tiny": tiny[:MAX_LISTED],
        "image_sizes": {
            "width": {
                "min": int(widths.min()),
                "median": float(np.median(widths)),
                "max": int(widths.max()),
            },
            "height": {
                "min": int(heights.min()),
                "median": float(np.median(heights)),
                "max": int(heights.max()),
            },
            "most_common": [[w, h, n] for (w, h), n in Counter(sizes).most_common(10)],
        },
        "metadata": metadata,
    }


def plot_class_counts(stats: Mapping[str, Any]) -> Figure:
    """Grouped bars (one colour per split) of per-class counts, log y axis."""
    counts: dict[str, dict[str, int]] = stats["class_counts"]
    splits = list(counts)
    labels = list(next(iter(counts.values())))
    n = len(labels)
    fig = Figure(figsize=(max(8.0, 0.3 * n + 2.0), 5.5), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(n)
    width = 0.8 / max(1, len(splits))
    for i, split in enumerate(splits):
        values = [counts[split][lab] for lab in labels]
        offset = (i - (len(splits) - 1) / 2) * width
        ax.bar(x + offset, values, width, label=f"{split} ({sum(values)})")
    ax.set_yscale("log")
    ax.set_ylim(bottom=0.5)  # a class with one image still shows a bar
    ax.yaxis.set_major_formatter(StrMethodFormatter("{x:g}"))
    ax.set_xticks(x, labels=labels, rotation=90 if n > 20 else 0, fontsize=8 if n > 20 else 10)
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_xlabel("class")
    ax.set_ylabel("images (log scale)")
    train = counts[splits[0]]
    big, small = stats["largest_class"], stats["smallest_class"]
    ax.set_title(
        f"Images per class ({n} classes); train imbalance {stats['imbalance_ratio']:.1f}x "
        f"(largest {big!r}: {train[big]}, smallest {small!r}: {train[small]})"
    )
    ax.grid(axis="y", which="major", linestyle=":", alpha=0.6)
    # Outside the axes: with balanced splits the bars fill the plot to the top.
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=9)
    return fig


def plot_image_sizes(facts_sizes: list[tuple[int, int]]) -> Figure:
    """Histograms of image width and height (distinct files)."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    for i, (name, values) in enumerate(
        (("width", [w for w, _ in facts_sizes]), ("height", [h for _, h in facts_sizes]))
    ):
        ax = fig.add_subplot(1, 2, i + 1)
        distinct = Counter(values)
        if len(distinct) <= 20:  # a few fixed sizes (e.g. 224 and 96): one bar per size
            sizes = sorted(distinct)
            ax.bar([str(v) for v in sizes], [distinct[v] for v in sizes], color="tab:blue")
        else:
            ax.hist(values, bins=40, color="tab:blue")
        ax.set_xlabel(f"{name} (px)")
        ax.set_ylabel("files")
        ax.set_title(f"Image {name}s ({len(values)} files)")
        ax.grid(axis="y", linestyle=":", alpha=0.5)
    return fig


def _summary_text(stats: Mapping[str, Any]) -> str:
    counts: dict[str, dict[str, int]] = stats["class_counts"]
    splits = list(counts)
    labels = list(next(iter(counts.values())))
    rows = [[repr(lab) if lab == "" else lab, *(counts[s][lab] for s in splits)] for lab in labels]
    rows.append(["total", *(stats["totals"][s] for s in splits)])
    dup = stats["duplicates"]
    lines = [
        format_table(["class", *splits], rows, title="Dataset class distribution"),
        f"train imbalance (largest / smallest class): {stats['imbalance_ratio']:.1f}x "
        f"({stats['largest_class']!r} / {stats['smallest_class']!r})",
    ]
    for split, missing in stats["missing_classes"].items():
        if missing:
            lines.append(f"{split}: no images of {len(missing)} class(es): {', '.join(missing)}")
    skipped = {s: n for s, n in stats["skipped_unknown_label_rows"].items() if n}
    if skipped:
        lines.append(f"rows skipped (label not a train class): {skipped}")
    lines.append(
        f"duplicates: {dup['cross_split_groups']} identical-content groups across splits, "
        f"extra copies within splits {dup['within_split_extra_copies'] or 0}, "
        f"{dup['label_conflict_groups']} with conflicting labels"
    )
    lines.append(
        f"unreadable images: {stats['unreadable_count']}, tiny (< {TINY_SIDE} px): "
        f"{stats['tiny_count']}"
    )
    for split, meta in stats["metadata"].items():
        for key in ("jersey_color", "number_color"):
            if key in meta:
                top = ", ".join(f"{k} {v}" for k, v in list(meta[key].items())[:8])
                lines.append(f"{split} {key}: {top}")
    return "\n".join(lines)


class DatasetStatsHook(Hook):
    """Writes ``dataset_stats.json`` and two PNGs at fit start; prints a summary."""

    name = "dataset_stats"

    def on_fit_start(self, ctx: FitContext) -> None:
        if not ctx.accelerator.is_main_process:
            return
        facts = inspect_files(all_paths(ctx.index))
        stats = dataset_stats(ctx.index, facts)
        atomic_write_json(ctx.run_dir / "dataset_stats.json", stats)
        save_figure(plot_class_counts(stats), ctx.run_dir / "dataset_class_counts.png")
        sizes = [(f.width, f.height) for f in facts.values() if not f.error]
        save_figure(plot_image_sizes(sizes), ctx.run_dir / "dataset_image_sizes.png")
        ctx.accelerator.print(_summary_text(stats))
        ctx.extra["dataset_stats"] = stats
