"""Near-duplicate images across splits: a perceptual hash (dHash) confirmed by a colour thumbnail.

Byte-identical checks miss what leaks most in jersey data: crops of consecutive video frames,
re-encodes and resizes of the same crop. Two stages find them:

1. dHash (Krawetz's difference hash): grayscale -> resize to 9 x 8 (bilinear) -> bit (r, c) =
   ``pixel[r, c + 1] > pixel[r, c]``: 64 bits that survive re-encoding, resizing and small
   shifts. Pairs whose hashes differ in at most ``max_distance`` bits (Hamming) are candidates.
2. Confirmation: the mean absolute difference of the two 16 x 16 RGB thumbnails must be at most
   ``max_mean_diff`` (0-255 scale). dHash alone ignores colour and is noise on low-contrast
   crops: on the 6,048 synthetic 64-px jerseys (no true duplicates) it paired 1,207 images
   across splits within 8 bits, 3 of which stay after this check; a JPEG re-encode at quality
   60 differs by ~1.4 and a 2-pixel shift by ~6 (medians, measured on that data).

Written by hand because none of the project's libraries has a perceptual hash, and
``imagehash`` would add a dependency (and scipy) for ten lines. Flat images (every thumbnail
pixel within 1 grey level) all hash to 0; they are counted and left out.

The hash and the thumbnail come from the one full decode of the pre-training check
(:func:`~classifier_training.data.validate.decode_facts`: the 8-bit RGB image training reads, so
16-bit and transparent files are hashed as training sees them) and are cached with the file's
other facts (the thumbnail as base64 of its 768 bytes, the hash as 16 hex digits): the report
decodes no image again, and a second run over unchanged files decodes none at all.

Pairs are searched between every two splits (train/val, train/test, val/test) with numpy:
XOR of uint64 hashes, ``np.bitwise_count``, chunked so memory stays ~tens of MB for 100k images.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from PIL import Image

from classifier_training.data.index import DataError, DatasetIndex

HASH_NAME = "dhash-64"
SHEET_FILE = "dataset_near_duplicates.png"
"""The thumbnail sheet of the closest pairs, in the run directory."""
DEFAULT_MAX_DISTANCE = 8
"""Hamming distance (of 64 bits) at or below which two images are candidates."""
DEFAULT_MAX_MEAN_DIFF = 8.0
"""Largest mean |RGB difference| (0-255) of the 16 x 16 thumbnails of a confirmed pair."""
THUMB = 16
MAX_LISTED = 50
"""Pairs kept in the JSON report, closest first (the counts are always complete)."""
_CHUNK = 2048


@dataclass(frozen=True)
class Signature:
    """What one decode of a file gives: its dHash (None when flat) and a colour thumbnail."""

    dhash: int | None
    thumb: npt.NDArray[np.uint8]  # [THUMB, THUMB, 3]


@dataclass(frozen=True)
class NearDuplicate:
    """Two files in different splits: ``distance`` dHash bits, ``mean_diff`` thumbnail grey
    levels apart."""

    distance: int
    mean_diff: float
    split_a: str
    path_a: Path
    label_a: str
    split_b: str
    path_b: Path
    label_b: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "distance": self.distance,
            "mean_diff": round(self.mean_diff, 2),
            "a": {"split": self.split_a, "path": str(self.path_a), "label": self.label_a},
            "b": {"split": self.split_b, "path": str(self.path_b), "label": self.label_b},
            "same_label": self.label_a == self.label_b,
        }


def dhash(image: Image.Image) -> int | None:
    """64-bit difference hash of ``image``; None for a flat image (no gradient to hash)."""
    small = np.asarray(image.convert("L").resize((9, 8), Image.Resampling.BILINEAR), np.int16)
    if int(small.max()) - int(small.min()) <= 1:
        return None
    bits = (small[:, 1:] > small[:, :-1]).ravel()
    return int(np.packbits(bits).view(">u8")[0])


def image_signature(rgb: Image.Image) -> Signature:
    """dHash and thumbnail of a decoded 8-bit RGB image. The full-decode check computes it
    (:func:`classifier_training.data.validate.decode_facts`) from the image training reads, and
    caches it with the file's other facts, so finding near-duplicates decodes nothing."""
    thumb = np.asarray(rgb.resize((THUMB, THUMB), Image.Resampling.BILINEAR), dtype=np.uint8)
    return Signature(dhash(rgb), thumb)


class HasSignature(Protocol):
    """Per-file facts that carry a signature (:class:`~classifier_training.data.validate.
    ImageFacts`): the :class:`Signature`, or the error text when the file does not decode."""

    def signature(self) -> Signature | str: ...


def _pairs_between(
    a: npt.NDArray[np.uint64], b: npt.NDArray[np.uint64], max_distance: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Indices (i into a, j into b) and distances of all pairs within ``max_distance``."""
    ii, jj, dd = [], [], []
    for start in range(0, len(a), _CHUNK):
        block = a[start : start + _CHUNK, None] ^ b[None, :]
        dist = np.bitwise_count(block)
        i, j = np.nonzero(dist <= max_distance)
        ii.append(i + start)
        jj.append(j)
        dd.append(dist[i, j].astype(np.int64))
    if not ii:
        empty = np.empty(0, np.int64)
        return empty, empty, empty
    return np.concatenate(ii), np.concatenate(jj), np.concatenate(dd)


def _thumb_diffs(
    thumbs_a: Sequence[npt.NDArray[np.uint8]],
    thumbs_b: Sequence[npt.NDArray[np.uint8]],
    ii: npt.NDArray[np.int64],
    jj: npt.NDArray[np.int64],
) -> npt.NDArray[np.float64]:
    """Mean absolute thumbnail difference of each candidate pair ``(ii[k], jj[k])``, in
    chunks (dHash alone pairs many unrelated small or plain images: the thumbnails decide)."""
    out = np.empty(len(ii), dtype=np.float64)
    if not len(ii):
        return out
    ta, tb = (np.stack(t).reshape(len(t), -1).astype(np.int16) for t in (thumbs_a, thumbs_b))
    for start in range(0, len(ii), _CHUNK):
        i, j = ii[start : start + _CHUNK], jj[start : start + _CHUNK]
        # An exact integer sum, then one division: the float mean, bit for bit, in 2/3 the time.
        total = np.abs(ta[i] - tb[j]).sum(axis=1, dtype=np.int32)
        out[start : start + len(i)] = total / ta.shape[1]
    return out


def _hashed(sig: Signature | str | None) -> bool:
    return isinstance(sig, Signature) and sig.dhash is not None


def find_near_duplicates(
    splits: Mapping[str, Sequence[tuple[Path, str]]],
    sigs: Mapping[Path, Signature | str],
    max_distance: int = DEFAULT_MAX_DISTANCE,
    max_mean_diff: float = DEFAULT_MAX_MEAN_DIFF,
) -> list[NearDuplicate]:
    """Every confirmed cross-split pair, closest first (dHash distance, then thumbnail diff).

    ``splits`` maps a split name to its ``(path, label)`` samples; a path listed twice in a
    split counts once; the same file in two splits is a pair at distance 0. Flat and
    undecodable files are skipped.
    """
    if not 0 <= max_distance <= 64:
        raise ValueError(f"max_distance must be in [0, 64], got {max_distance}")
    per_split: dict[str, list[tuple[Path, str, Signature]]] = {}
    for name, samples in splits.items():
        rows = []
        for p, lab in dict(samples).items():
            sig = sigs.get(p)
            if isinstance(sig, Signature) and sig.dhash is not None:
                rows.append((p, lab, sig))
        per_split[name] = rows
    found: list[NearDuplicate] = []
    for sa, sb in combinations(per_split, 2):
        fa, fb = per_split[sa], per_split[sb]
        if not fa or not fb:
            continue
        ha = np.array([s.dhash for _, _, s in fa], dtype=np.uint64)
        hb = np.array([s.dhash for _, _, s in fb], dtype=np.uint64)
        ii, jj, dd = _pairs_between(ha, hb, max_distance)
        diffs = _thumb_diffs([s.thumb for _, _, s in fa], [s.thumb for _, _, s in fb], ii, jj)
        for k in np.nonzero(diffs <= max_mean_diff)[0]:
            (pa, la, _), (pb, lb, _) = fa[ii[k]], fb[jj[k]]
            found.append(NearDuplicate(int(dd[k]), float(diffs[k]), sa, pa, la, sb, pb, lb))
    found.sort(key=lambda x: (x.distance, x.mean_diff, x.split_a, str(x.path_a), str(x.path_b)))
    return found


def near_duplicate_report(
    pairs: Sequence[NearDuplicate],
    sigs: Mapping[Path, Signature | str],
    max_distance: int,
    max_mean_diff: float = DEFAULT_MAX_MEAN_DIFF,
) -> dict[str, Any]:
    """The ``near_duplicates`` block of ``dataset_stats.json``."""
    by_splits: dict[str, int] = {}
    for p in pairs:
        key = f"{p.split_a}/{p.split_b}"
        by_splits[key] = by_splits.get(key, 0) + 1
    return {
        "hash": HASH_NAME,
        "max_distance": max_distance,
        "max_mean_diff": max_mean_diff,
        "pairs": len(pairs),
        "pairs_by_splits": by_splits,
        "pairs_with_different_labels": sum(1 for p in pairs if p.label_a != p.label_b),
        "files_hashed": sum(1 for s in sigs.values() if _hashed(s)),
        "flat_files_skipped": sum(
            1 for s in sigs.values() if isinstance(s, Signature) and s.dhash is None
        ),
        "undecodable_files_skipped": sum(1 for s in sigs.values() if isinstance(s, str)),
        "closest": [p.as_dict() for p in pairs[:MAX_LISTED]],
    }


def leak_message(pairs: Sequence[NearDuplicate], max_distance: int, where: str) -> str:
    """One paragraph naming the count, the closest pairs and what to do."""
    shown = "; ".join(
        f"{p.split_a} {p.path_a} ~ {p.split_b} {p.path_b} (distance {p.distance})"
        for p in pairs[:3]
    )
    return (
        f"near-duplicate leak: {len(pairs)} image pair(s) across splits within Hamming distance "
        f"{max_distance} of their dHash and alike in colour, e.g. {shown}. See {where}. Remove "
        "one image of each pair from the evaluation split, or set hooks.fail_on_near_duplicates "
        "false to train anyway"
    )


def plot_near_duplicates(pairs: Sequence[NearDuplicate], limit: int = 24) -> Any:
    """A sheet of the closest ``limit`` pairs side by side (a matplotlib ``Figure``)."""
    from matplotlib.figure import Figure

    shown = list(pairs[:limit])
    cols = 2  # pairs per row; each pair takes two axes
    rows = max(1, math.ceil(len(shown) / cols))
    fig = Figure(figsize=(4 * 2 * cols, 2.4 * rows + 0.6), layout="constrained")
    fig.suptitle(
        f"Closest cross-split near-duplicates ({len(shown)} of {len(pairs)} pairs; d: dHash "
        "Hamming distance, diff: mean thumbnail difference, 0-255)",
        fontsize=12,
    )
    for k, p in enumerate(shown):
        for side, (split, path, label) in enumerate(
            ((p.split_a, p.path_a, p.label_a), (p.split_b, p.path_b, p.label_b))
        ):
            ax = fig.add_subplot(rows, 2 * cols, 2 * k + side + 1)
            try:
                with Image.open(path) as im:
                    ax.imshow(np.asarray(im.convert("RGB")), interpolation="nearest")
            except (OSError, ValueError):
                ax.text(0.5, 0.5, "unreadable", ha="center", va="center")
            colour = "black" if p.label_a == p.label_b else "#cf222e"
            head = f"d={p.distance} diff={p.mean_diff:.1f}  " if side == 0 else ""
            ax.set_title(f"{head}{split} {label!r}\n{path.name}", fontsize=8, color=colour)
            ax.set_xticks([])
            ax.set_yticks([])
    return fig


@dataclass(frozen=True)
class LeakCheck:
    """Result of :func:`check_index`: the pairs (closest first) and the JSON report block."""

    pairs: list[NearDuplicate]
    report: dict[str, Any]

    def summary(self) -> str:
        """One console line for the dataset summary."""
        r = self.report
        head = (
            f"near-duplicates ({r['hash']} distance <= {r['max_distance']}, thumbnail diff <= "
            f"{r['max_mean_diff']:g}):"
        )
        if not self.pairs:
            return f"{head} none across splits ({r['files_hashed']} files hashed)"
        by = ", ".join(f"{k} {v}" for k, v in r["pairs_by_splits"].items())
        return (
            f"{head} {r['pairs']} cross-split pair(s) ({by}; {r['pairs_with_different_labels']} "
            f"with different labels); look at {SHEET_FILE}"
        )

    def raise_if_leaking(self, fail: bool, run_dir: Path) -> None:
        """Raise :class:`DataError` when ``fail`` is set and any pair was found."""
        if fail and self.pairs:
            where = f"{run_dir / SHEET_FILE} and {run_dir / 'dataset_stats.json'}"
            raise DataError(leak_message(self.pairs, self.report["max_distance"], where))


def check_index(
    index: DatasetIndex, facts: Mapping[Path, HasSignature], max_distance: int
) -> LeakCheck | None:
    """Pair the files of every split of ``index`` by the signatures in ``facts`` (the full-decode
    check's :func:`~classifier_training.data.validate.check_images` of every sample path); None
    when ``max_distance < 0`` (the check is switched off)."""
    if max_distance < 0:
        return None
    splits = {s.name: [(x.path, x.label) for x in s.samples] for s in index.splits.values()}
    sigs = {p: facts[p].signature() for samples in splits.values() for p, _ in samples}
    pairs = find_near_duplicates(splits, sigs, max_distance)
    return LeakCheck(pairs, near_duplicate_report(pairs, sigs, max_distance))
