"""Dataset health report at fit start: class balance, leaks, bad and tiny images, sizes.

Written to the run directory::

    dataset_stats.json          everything below, machine-readable
    dataset_class_counts.png    per-class counts of every split (log scale)
    dataset_image_sizes.png     width / height histograms of the distinct image files

* class counts per split, imbalance ratio ``max / min`` of the train counts, classes missing
  from val/test;
* what the index and the pre-training check skipped or fixed, with counts: rows whose label is
  not a train class (``SplitIndex.skipped_unknown``), labels stripped of surrounding whitespace,
  hidden files, images that do not decode (``data.skip_bad_images``; every one is listed), and
  the train sample left out of each epoch when the last batch would hold one image;
* duplicates keyed on **content**, not path: rows whose images decode to the same pixels
  (:class:`~classifier_training.data.validate.ImageFacts` ``content``), so a file listed twice,
  the same picture saved under two names or with other metadata all count. Groups across splits
  (train/val leaks), extra copies within a split, and groups carrying different labels;
* tiny images (shorter side < 16 px), PIL modes (16-bit, palette, ...), sizes;
* metadata distributions (``jersey_color``, ``number_color``, ``border``) when rows carry them.

The per-file facts, near-duplicate signatures included, come from the full-decode check's cache
(:func:`~classifier_training.data.validate.check_images`), so the hook decodes nothing that the
check already decoded.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import StrMethodFormatter

from classifier_training.data import near_duplicates
from classifier_training.data.index import DatasetIndex
from classifier_training.data.validate import ImageFacts, cache_file, check_images
from classifier_training.hooks.base import FitContext, Hook
from classifier_training.hooks.common import format_table
from classifier_training.io import atomic_write_json, save_figure

TINY_SIDE = 16
"""Images whose shorter side is below this many pixels are reported as tiny."""
METADATA_KEYS = ("jersey_color", "number_color", "border")
MAX_LISTED = 50
"""Examples kept per list in the JSON (counts are always complete; bad images are all listed)."""


def all_paths(index: DatasetIndex) -> list[Path]:
    """Every sample's image path, split by split, in sample order (repeats included)."""
    return [x.path for s in index.splits.values() for x in s.samples]


def _duplicates(index: DatasetIndex, facts: Mapping[Path, ImageFacts]) -> dict[str, Any]:
    """Rows grouped by decoded content; see the module docstring."""
    groups: dict[str, list[dict[str, str]]] = defaultdict(list)
    for s in index.splits.values():
        for x in s.samples:
            content = facts[x.path].content
            if content:
                groups[content].append(
                    {"split": s.name, "path": str(x.path), "label": x.label, "source": x.source}
                )
    cross, conflicts = [], []
    within: Counter[str] = Counter()
    for content, rows in groups.items():
        if len(rows) < 2:
            continue
        per_split = Counter(r["split"] for r in rows)
        entry = {"content_sha1": content, "rows": rows}
        if len(per_split) > 1:
            cross.append(entry)
        for name, n in per_split.items():
            within[name] += n - 1
        if len({r["label"] for r in rows}) > 1:
            conflicts.append(entry)
    return {
        "cross_split_groups": len(cross),
        "cross_split_rows": sum(len(e["rows"]) for e in cross),
        "within_split_extra_copies": {n: c for n, c in within.items() if c},
        "label_conflict_groups": len(conflicts),
        "cross_split_examples": cross[:MAX_LISTED],
        "label_conflict_examples": conflicts[:MAX_LISTED],
    }


def _bad_images(index: DatasetIndex, facts: Mapping[Path, ImageFacts]) -> list[dict[str, str]]:
    """Rows the check dropped (``data.skip_bad_images``) plus any row whose facts hold an error."""
    out = [
        {"split": s.name, "source": b.sample.source, "path": str(b.sample.path), "error": b.error}
        for s in index.splits.values()
        for b in s.bad_images
    ]
    out += [
        {"split": s.name, "source": x.source, "path": str(x.path), "error": facts[x.path].error}
        for s in index.splits.values()
        for x in s.samples
        if facts[x.path].error
    ]
    return out


def _size_summary(values: list[int]) -> dict[str, float | int]:
    arr = np.array(values or [0])
    return {"min": int(arr.min()), "median": float(np.median(arr)), "max": int(arr.max())}


def dataset_stats(
    index: DatasetIndex,
    facts: Mapping[Path, ImageFacts] | None = None,
    *,
    last_batch_dropped: int = 0,
) -> dict[str, Any]:
    """The report as a JSON-ready dict (see the module docstring). ``facts`` (from
    :func:`check_images`) are looked up in the check's cache when not given;
    ``last_batch_dropped`` is the number of train samples each epoch leaves out."""
    labels = sorted(index.class_to_idx, key=index.class_to_idx.__getitem__)
    splits = {s.name: s for s in index.splits.values()}
    counts = {name: Counter(x.label for x in s.samples) for name, s in splits.items()}
    train_counts = [counts[index.train.name][label] for label in labels]
    if facts is None:
        facts = check_images(all_paths(index), cache=cache_file(index.root))

    tiny = []
    for name, s in splits.items():
        for p in dict.fromkeys(x.path for x in s.samples):
            f = facts[p]
            if not f.error and min(f.width, f.height) < TINY_SIDE:
                tiny.append({"split": name, "path": str(p), "width": f.width, "height": f.height})
    good = [f for f in facts.values() if not f.error]
    sizes = [(f.width, f.height) for f in good]
    bad = _bad_images(index, facts)

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
        "stripped_label_rows": {name: s.stripped_labels for name, s in splits.items()},
        "skipped_hidden_files": {name: s.skipped_hidden for name, s in splits.items()},
        "bad_images_count": len(bad),
        "bad_images": bad,
        "train_samples_left_out_per_epoch": last_batch_dropped,
        "distinct_files": len(facts),
        "duplicates": _duplicates(index, facts),
        "tiny_count": len(tiny),
        "tiny_min_side": TINY_SIDE,
        "tiny": tiny[:MAX_LISTED],
        "image_modes": dict(Counter(f.mode for f in good).most_common()),
        "image_sizes": {
            "width": _size_summary([w for w, _ in sizes]),
            "height": _size_summary([h for _, h in sizes]),
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
    for key, what in (
        ("skipped_unknown_label_rows", "rows skipped (label not a train class)"),
        ("stripped_label_rows", "labels stripped of surrounding whitespace"),
        ("skipped_hidden_files", "hidden files skipped"),
    ):
        counted = {s: n for s, n in stats[key].items() if n}
        if counted:
            lines.append(f"{what}: {counted}")
    if stats["bad_images_count"]:
        lines.append(
            f"bad images skipped (data.skip_bad_images): {stats['bad_images_count']}, listed "
            "in dataset_stats.json"
        )
    if stats["train_samples_left_out_per_epoch"]:
        lines.append(
            f"train samples left out per epoch (one-image last batch): "
            f"{stats['train_samples_left_out_per_epoch']}"
        )
    lines.append(
        f"duplicates (same decoded pixels): {dup['cross_split_groups']} groups across splits, "
        f"extra copies within splits {dup['within_split_extra_copies'] or 0}, "
        f"{dup['label_conflict_groups']} with conflicting labels"
    )
    modes = ", ".join(f"{m} {n}" for m, n in stats["image_modes"].items())
    lines.append(f"tiny images (< {TINY_SIDE} px): {stats['tiny_count']}; modes: {modes}")
    for split, meta in stats["metadata"].items():
        for key in ("jersey_color", "number_color"):
            if key in meta:
                top = ", ".join(f"{k} {v}" for k, v in list(meta[key].items())[:8])
                lines.append(f"{split} {key}: {top}")
    return "\n".join(lines)


def write_dataset_figures(
    stats: Mapping[str, Any],
    sizes: list[tuple[int, int]],
    pairs: list[near_duplicates.NearDuplicate],
    run_dir: Path,
) -> None:
    """The class-count and image-size figures and, when there are pairs, the near-duplicate
    sheet (plain inputs -> files; runs in the background worker)."""
    if pairs:
        sheet = near_duplicates.plot_near_duplicates(pairs)
        save_figure(sheet, run_dir / near_duplicates.SHEET_FILE)
    save_figure(plot_class_counts(stats), run_dir / "dataset_class_counts.png")
    save_figure(plot_image_sizes(sizes), run_dir / "dataset_image_sizes.png")


class DatasetStatsHook(Hook):
    """Writes ``dataset_stats.json`` at fit start and prints a summary; its figures are drawn
    in the background (waited for when a near-duplicate leak stops the run)."""

    name = "dataset_stats"

    def on_fit_start(self, ctx: FitContext) -> None:
        facts = check_images(all_paths(ctx.index), cache=cache_file(ctx.index.root))
        dropped = 1 if ctx.loaders.train.drop_last else 0  # see drop_single_sample_batch
        stats = dataset_stats(ctx.index, facts, last_batch_dropped=dropped)
        distance = ctx.recipe.hooks.near_duplicate_distance
        leaks = near_duplicates.check_index(ctx.index, facts, distance)
        if leaks is not None:
            stats["near_duplicates"] = leaks.report
            # never leave the sheet of an earlier dataset
            (ctx.run_dir / near_duplicates.SHEET_FILE).unlink(missing_ok=True)
        atomic_write_json(ctx.run_dir / "dataset_stats.json", stats)
        sizes = [(f.width, f.height) for f in facts.values() if not f.error]
        # ~2 s of matplotlib at 5,000 images (the pair sheet decodes its images): beside epoch 1
        pairs = leaks.pairs if leaks is not None else []
        ctx.background.submit(write_dataset_figures, stats, sizes, pairs, ctx.run_dir)
        ctx.accelerator.print(_summary_text(stats))
        if leaks is not None:
            ctx.accelerator.print(leaks.summary())
            if ctx.recipe.hooks.fail_on_near_duplicates and leaks.pairs:
                ctx.background.wait()  # the sheet the error points to exists when the run stops
            leaks.raise_if_leaking(ctx.recipe.hooks.fail_on_near_duplicates, ctx.run_dir)
