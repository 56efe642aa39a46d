"""Class weights and the weighted sampler, including Accelerate's per-process sharding."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from torch.utils.data import BatchSampler, DataLoader, Dataset

from classifier_training.data.imbalance import (
    WeightedClassSampler,
    build_sampler,
    class_counts,
    inverse_frequency_weights,
)
from classifier_training.data.index import DataError

CLASS_TO_IDX = {"0": 0, "00": 1, "1": 2, "10": 3}
# A 64x imbalance like the real data: 64, 16, 4, 1 rows.
TARGETS = [0] * 64 + [1] * 16 + [2] * 4 + [3] * 1


def test_class_counts() -> None:
    assert class_counts(TARGETS, 4) == [64, 16, 4, 1]
    assert class_counts([], 2) == [0, 0]
    with pytest.raises(ValueError, match=r"target 4 is outside 0\.\.3"):
        class_counts([0, 4], 4)


def test_inverse_frequency_weights_sum_to_c_and_are_inverse_proportional() -> None:
    counts = [64, 16, 4, 1, 0]
    w = inverse_frequency_weights(counts)
    assert w.dtype == torch.float32 and w.shape == (5,)
    assert float(w.sum()) == pytest.approx(5.0, rel=1e-6)
    # w_c * max(count_c, 1) is the same constant for every class (count 0 clamps to 1).
    products = [float(w[i]) * max(c, 1) for i, c in enumerate(counts)]
    assert products == pytest.approx([products[0]] * 5, rel=1e-6)
    expected = torch.tensor([1 / 64, 1 / 16, 1 / 4, 1.0, 1.0], dtype=torch.float64)
    expected = expected / expected.sum() * 5
    assert torch.allclose(w.double(), expected, rtol=1e-6)
    with pytest.raises(ValueError):
        inverse_frequency_weights([])


def test_sampler_has_no_generator_attribute() -> None:
    sampler = WeightedClassSampler([1.0, 2.0], seed=1)
    # Accelerate's prepare() would overwrite/synchronise an attribute with this name.
    assert not hasattr(sampler, "generator")
    assert len(sampler) == 2


def test_same_seed_epoch_same_draw_and_set_epoch_changes_it() -> None:
    a = WeightedClassSampler([1.0] * 50, num_samples=200, seed=7)
    b = WeightedClassSampler([1.0] * 50, num_samples=200, seed=7)
    a.set_epoch(3)
    b.set_epoch(3)
    first = list(a)
    assert first == list(b) == list(a)  # another process, or a second pass: same draw
    assert a.last_indices == first and len(first) == 200
    a.set_epoch(4)
    assert list(a) != first
    assert list(WeightedClassSampler([1.0] * 50, num_samples=200, seed=8)) != list(
        WeightedClassSampler([1.0] * 50, num_samples=200, seed=7)
    )
    # draw() has no side effect on last_indices.
    assert a.draw(3) == first and a.last_indices != first


def test_state_dict_round_trip() -> None:
    a = WeightedClassSampler([1.0] * 20, seed=5)
    a.set_epoch(9)
    b = WeightedClassSampler([1.0] * 20, seed=0)
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == {"seed": 5, "epoch": 9}
    assert list(b) == list(a)


def test_sampler_validation() -> None:
    with pytest.raises(ValueError, match="finite and >= 0"):
        WeightedClassSampler([1.0, -1.0])
    with pytest.raises(ValueError, match="finite and >= 0"):
        WeightedClassSampler([1.0, float("nan")])
    with pytest.raises(ValueError, match="all be zero"):
        WeightedClassSampler([0.0, 0.0])
    with pytest.raises(ValueError, match="num_samples"):
        WeightedClassSampler([1.0], num_samples=0)
    with pytest.raises(ValueError, match="without replacement"):
        WeightedClassSampler([1.0, 0.0], num_samples=2, replacement=False)
    with pytest.raises(ValueError, match="epoch"):
        WeightedClassSampler([1.0]).set_epoch(-1)


def test_weights_zero_rows_are_never_drawn() -> None:
    sampler = WeightedClassSampler([0.0, 1.0, 0.0, 3.0], num_samples=400, seed=0)
    counts = Counter(sampler)
    assert set(counts) == {1, 3}
    assert counts[3] / 400 == pytest.approx(0.75, abs=0.08)


def test_build_sampler_modes() -> None:
    assert build_sampler("disabled", TARGETS, CLASS_TO_IDX, None, seed=0) is None

    auto = build_sampler("auto", TARGETS, CLASS_TO_IDX, None, seed=0)
    assert auto is not None and len(auto) == len(TARGETS)
    class_w = inverse_frequency_weights([64, 16, 4, 1])
    assert torch.allclose(auto.weights, class_w.double()[torch.tensor(TARGETS)])
    # Balanced in expectation: each class ~1/4 of a long draw.
    long = build_sampler("auto", TARGETS, CLASS_TO_IDX, None, seed=0, num_samples=20000)
    assert long is not None
    per_class = Counter(TARGETS[i] for i in long)
    assert [per_class[c] / 20000 for c in range(4)] == pytest.approx([0.25] * 4, abs=0.02)

    manual = build_sampler("manual", TARGETS, CLASS_TO_IDX, {"10": 5.0, "0": 0.5}, seed=0)
    assert manual is not None
    expected = {0: 0.5, 1: 1.0, 2: 1.0, 3: 5.0}
    assert manual.weights.tolist() == [expected[t] for t in TARGETS]


def test_build_sampler_errors() -> None:
    with pytest.raises(DataError, match=r"unknown label '7'; valid labels: '0', '00', '1', '10'"):
        build_sampler("manual", TARGETS, CLASS_TO_IDX, {"7": 1.0}, seed=0)
    with pytest.raises(DataError, match=r"sampler_weights\['1'\] = -1.0"):
        build_sampler("manual", TARGETS, CLASS_TO_IDX, {"1": -1.0}, seed=0)
    with pytest.raises(DataError, match="every train class has weight 0"):
        build_sampler("manual", TARGETS, CLASS_TO_IDX, dict.fromkeys(CLASS_TO_IDX, 0.0), seed=0)
    with pytest.raises(DataError, match="unknown sampler mode"):
        build_sampler("balanced", TARGETS, CLASS_TO_IDX, None, seed=0)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Sharding under Accelerate: each process builds its own sampler with the same seed; the
# BatchSamplerShard that accelerator.prepare() installs hands each one disjoint batches.


def shards(num_samples: int, batch_size: int, epoch: int) -> tuple[list[int], list[list[int]]]:
    """(single-process draw, the two processes' batches as lists of indices)."""
    weights = [float(1 + t) for t in TARGETS]
    single = WeightedClassSampler(weights, num_samples=num_samples, seed=11)
    single.set_epoch(epoch)
    draw = list(single)
    per_process: list[list[int]] = []
    for rank in (0, 1):
        sampler = WeightedClassSampler(weights, num_samples=num_samples, seed=11)  # "process" rank
        sampler.set_epoch(epoch)
        shard = BatchSamplerShard(
            BatchSampler(sampler, batch_size=batch_size, drop_last=False),
            num_processes=2,
            process_index=rank,
        )
        per_process.append([i for batch in shard for i in batch])
        assert sampler.last_indices == draw  # every process sees the same global draw
        assert all(len(b) == batch_size for b in shard)
    return draw, per_process


def positions(per_process: list[list[int]], batch_size: int) -> list[list[int]]:
    """Global positions of each process's rows: batch k of rank r is global batch 2k + r."""
    return [
        [(2 * (j // batch_size) + r) * batch_size + j % batch_size for j in range(len(rows))]
        for r, rows in enumerate(per_process)
    ]


def test_batch_sampler_shard_splits_one_global_draw() -> None:
    draw, per_process = shards(num_samples=80, batch_size=8, epoch=2)  # 10 batches, 5 each
    pos = positions(per_process, 8)
    assert set(pos[0]).isdisjoint(pos[1])
    assert sorted(pos[0] + pos[1]) == list(range(80))
    for rows, where in zip(per_process, pos, strict=True):
        assert rows == [draw[p] for p in where]  # each process holds its part of the draw
    draw_e3, _ = shards(num_samples=80, batch_size=8, epoch=3)
    assert draw_e3 != draw


def test_batch_sampler_shard_uneven_tail_wraps_from_the_start() -> None:
    draw, per_process = shards(num_samples=84, batch_size=8, epoch=0)  # 11 batches, last short
    pos = positions(per_process, 8)
    assert set(pos[0]).isdisjoint(pos[1])
    assert set(range(84)) <= set(pos[0]) | set(pos[1])
    # even_batches pads the tail with the first rows of the same draw.
    padded = draw + draw
    for rows, where in zip(per_process, pos, strict=True):
        assert rows == [padded[p] for p in where]


class Rows(Dataset[int]):
    """Item i is i: a loader over it yields the sampled row indices."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def _prepared_indices(out_dir: str) -> None:
    """Runs in each of 2 debug_launcher processes: prepare a loader, record this rank's rows."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DataLoaderConfiguration

    AcceleratorState._reset_state(True)  # forked from pytest: start from a clean singleton
    acc = Accelerator(
        cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True)
    )
    sampler = WeightedClassSampler([float(1 + t) for t in TARGETS], num_samples=64, seed=3)
    loader = DataLoader(Rows(len(TARGETS)), batch_size=4, sampler=sampler)
    prepared = acc.prepare(loader)
    result: dict[str, object] = {"num_processes": acc.num_processes}
    for epoch in (1, 2):
        prepared.set_epoch(epoch)
        result[str(epoch)] = {
            "rows": [int(i) for batch in prepared for i in batch],
            "draw": sampler.last_indices,
        }
    Path(out_dir, f"rank{acc.process_index}.json").write_text(json.dumps(result))
    acc.wait_for_everyone()


def test_accelerate_prepare_two_processes(tmp_path: Path) -> None:
    from functools import partial

    from accelerate import debug_launcher

    debug_launcher(partial(_prepared_indices, str(tmp_path)), num_processes=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["num_processes"] == ranks[1]["num_processes"] == 2
    for epoch in ("1", "2"):
        r0, r1 = ranks[0][epoch], ranks[1][epoch]
        assert r0["draw"] == r1["draw"]  # same global draw on both processes
        expected = WeightedClassSampler(
            [float(1 + t) for t in TARGETS], num_samples=64, seed=3
        ).draw(int(epoch))
        assert r0["draw"] == expected
        assert len(r0["rows"]) == len(r1["rows"]) == 32
        batches = [r0["rows"][k : k + 4] for k in range(0, 32, 4)]
        others = [r1["rows"][k : k + 4] for k in range(0, 32, 4)]
        assert [
            i for pair in zip(batches, others, strict=True) for b in pair for i in b
        ] == expected
    assert ranks[0]["1"]["draw"] != ranks[0]["2"]["draw"]
