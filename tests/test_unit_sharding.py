"""The batch-splitting arithmetic, in-process: how an epoch's batches are
dealt to the ranks (`sharding.last_steps`, `sharding.global_batch_sizes`,
`pipelines.balanced_rounds`), every rank simulated in one process.

The rules every split must keep: every rank runs the same number of steps,
no rank's batch is empty, every row is used exactly once, and (where the
data allows) step k over all ranks is the k-th batch one process takes."""

from __future__ import annotations

import numpy as np
import pytest

from transparent_dist.core import sharding
from transparent_dist.core.errors import CollectiveError
from transparent_dist.core.sharding import global_batch_sizes, last_steps, steps_for


def _pieces_for_all(previous, tail, size):
    return [last_steps(previous, tail, r, size) for r in range(size)]


def _check_pieces(previous, tail, size):
    """The rules on `last_steps`' pieces for every rank; returns them."""
    pieces = _pieces_for_all(previous, tail, size)
    rows = list(previous or []) + list(tail)
    steps = {len(p) for p in pieces}
    assert len(steps) == 1, f"ranks run different numbers of steps: {pieces}"
    used = []
    for rank_pieces in pieces:
        for index, start, stop in rank_pieces:
            assert 0 <= start < stop <= rows[index], f"empty or out-of-range piece {rank_pieces}"
            used.extend((index, row) for row in range(start, stop))
    expected = [(index, row) for index, n in enumerate(rows) for row in range(n)]
    assert sorted(used) == expected, "rows lost or used twice"
    return pieces


# ---------------------------------------------------------------- last_steps


def test_last_steps_full_round_then_even_tail():
    pieces = _check_pieces([4, 4, 4], [3], 3)
    # The full round: batch r, whole; the tail (batch 3) split by rows.
    assert pieces == [[(0, 0, 4), (3, 0, 1)], [(1, 0, 4), (3, 1, 2)], [(2, 0, 4), (3, 2, 3)]]


def test_last_steps_tail_of_two_batches_groups_ranks_per_batch():
    pieces = _check_pieces(None, [5, 1], 3)
    # Rows in proportion: two ranks share the 5-row batch, one takes the 1-row one.
    assert [p[0][0] for p in pieces] == [0, 0, 1]
    assert pieces[0] == [(0, 0, 3)] and pieces[1] == [(0, 3, 5)]


def test_last_steps_borrows_rows_from_the_last_full_batch_when_the_tail_is_short():
    # 1 row left for 3 ranks: the last full batch gives 2 rows to the tail step.
    pieces = _check_pieces([4, 4, 4], [1], 3)
    assert pieces[2][0] == (2, 0, 2)
    assert [p[1] for p in pieces] == [(2, 2, 3), (2, 3, 4), (3, 0, 1)]


def test_last_steps_too_few_rows_anywhere_is_refused():
    with pytest.raises(sharding.TooFewSamples, match="last 1 sample"):
        last_steps(None, [1], 0, 2)
    # The previous round's last batch cannot spare a row either.
    with pytest.raises(sharding.TooFewSamples):
        last_steps([1, 1], [1], 0, 3)


def test_last_steps_nothing_left_after_the_round():
    assert _check_pieces([2, 3], [], 2) == [[(0, 0, 2)], [(1, 0, 3)]]
    assert _pieces_for_all(None, [], 3) == [[], [], []]
    # Empty batches in the tail are skipped, never a rank's only piece.
    _check_pieces(None, [0, 4, 0], 2)


def test_last_steps_one_rank_takes_its_tail_whole():
    assert _check_pieces([7], [], 1) == [[(0, 0, 7)]]
    assert _check_pieces(None, [3], 1) == [[(0, 0, 3)]]


@pytest.mark.parametrize("size", [2, 3, 4, 5])
def test_last_steps_keeps_the_rules_for_every_small_epoch_end(size):
    """Every previous round of 1..4 rows per batch and tail of up to
    size - 1 batches of 0..4 rows: equal steps, no empty piece, every row
    once, or a refusal only where the rows cannot go round."""
    rng = np.random.default_rng(size)
    for _ in range(150):
        previous = None if rng.random() < 0.3 else [int(v) for v in rng.integers(1, 5, size)]
        tail = [int(v) for v in rng.integers(0, 5, int(rng.integers(0, size)))]
        total = sum(tail)
        spare = 0 if previous is None else previous[-1] - 1
        if 0 < total < size and total + spare < size:
            with pytest.raises(sharding.TooFewSamples):
                last_steps(previous, tail, 0, size)
        else:
            _check_pieces(previous, tail, size)


# ------------------------------------------------------- global batch sizes


def test_steps_for_counts_a_short_last_batch():
    assert [steps_for(n, 4) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_global_batch_sizes_uneven_last_batch():
    assert global_batch_sizes(10, 4, 2) == [4, 4, 2]
    assert global_batch_sizes(8, 4, 2) == [4, 4]
    assert global_batch_sizes(1, 4, 1) == [1]
    assert global_batch_sizes(0, 4, 2) == []


def test_global_batch_sizes_short_last_batch_takes_rows_from_the_one_before():
    # 13 = 6 + 6 + 1 on 3 ranks: the last batch takes 2 rows of the one before.
    assert global_batch_sizes(13, 6, 3) == [6, 4, 3]
    # 9 = 4 + 4 + 1: taking 2 would leave 2 rows for 3 ranks; the two merge.
    assert global_batch_sizes(9, 4, 3) == [4, 5]
    # A single short batch has nothing to borrow from (refused by the caller).
    assert global_batch_sizes(2, 4, 3) == [2]


def test_global_batch_sizes_merge_the_last_two_when_the_one_before_cannot_spare_rows():
    # 4 = 3 + 1 on 3 ranks (batch 1 per rank): borrowing two rows would leave
    # [1, 3], two ranks with an empty first batch; one step of 4 instead.
    assert global_batch_sizes(4, 3, 3) == [4]
    assert global_batch_sizes(7, 3, 3) == [3, 4]
    assert global_batch_sizes(5, 4, 3) == [5]


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_global_batch_sizes_sum_to_the_data_and_fit_the_global_batch(size):
    for per_rank in (1, 2, 3, 8):
        global_batch = per_rank * size
        for n in range(size, 4 * global_batch + 2):
            sizes = global_batch_sizes(n, global_batch, size)
            assert sum(sizes) == n
            # One step fewer only where the last two merged.
            assert len(sizes) in (steps_for(n, global_batch), steps_for(n, global_batch) - 1)
            assert all(size <= s <= global_batch for s in sizes[:-1]), (n, global_batch, sizes)
            # Every rank gets a sample in every step: no empty local batch.
            assert size <= sizes[-1] < max(global_batch + 1, 2 * size), (n, global_batch, sizes)


# ---------------------------------------------------------- balanced_rounds


def _batches(rows):
    """Batches of consecutive sample ids, `rows[k]` rows in batch k."""
    first = np.cumsum([0, *rows[:-1]]) if rows else []
    return [np.arange(f, f + n, dtype=np.int64) for f, n in zip(first, rows, strict=True)]


def _deal(rows, size):
    from transparent_dist.tf.inputs import pipelines

    return [
        [np.asarray(b) for b in pipelines.balanced_rounds(iter(_batches(rows)), r, size)]
        for r in range(size)
    ]


def _check_dealt(rows, size):
    dealt = _deal(rows, size)
    assert len({len(d) for d in dealt}) == 1, f"unequal steps: {[len(d) for d in dealt]}"
    assert all(len(b) > 0 for d in dealt for b in d), "an empty batch"
    used = np.sort(np.concatenate([b for d in dealt for b in d] or [np.zeros(0, np.int64)]))
    np.testing.assert_array_equal(used, np.arange(sum(rows)))
    return dealt


def test_balanced_rounds_round_robin_then_the_tail_split_by_rows():
    dealt = _check_dealt([2, 2, 2, 2, 3], 2)
    # Steps 1-2: batches (0, 1) and (2, 3); step 3: the 3-row tail, 2 + 1 rows.
    assert [b.tolist() for b in dealt[0]] == [[0, 1], [4, 5], [8, 9]]
    assert [b.tolist() for b in dealt[1]] == [[2, 3], [6, 7], [10]]


def test_balanced_rounds_three_ranks_uneven_last_batch():
    dealt = _check_dealt([4, 4, 4, 4, 4, 4, 2], 3)
    assert len(dealt[0]) == 3
    # The last step: 2 tail rows + 1 row borrowed from the last full batch.
    assert sorted(np.concatenate([d[-1] for d in dealt]).tolist()) == [23, 24, 25]


def test_balanced_rounds_one_batch_of_one_row_on_one_rank():
    assert [b.tolist() for b in _check_dealt([1], 1)[0]] == [[0]]


def test_balanced_rounds_no_batches_gives_no_steps():
    assert _deal([], 3) == [[], [], []]


def test_balanced_rounds_fewer_rows_than_ranks_is_the_same_error_on_every_rank():
    from transparent_dist.tf.inputs import pipelines

    for rank in range(3):
        with pytest.raises(CollectiveError, match="the dataset: the last 2 sample"):
            list(pipelines.balanced_rounds(iter(_batches([2])), rank, 3))


@pytest.mark.parametrize("size", [2, 3, 4])
def test_balanced_rounds_keeps_the_rules_for_random_epochs(size):
    rng = np.random.default_rng(100 + size)
    for _ in range(25):
        rows = [int(v) for v in rng.integers(1, 6, int(rng.integers(size, 4 * size)))]
        rounds = len(rows) // size
        tail = sum(rows[rounds * size :])
        if 0 < tail < size and tail + rows[rounds * size - 1] - 1 < size:
            with pytest.raises(CollectiveError, match="cannot be spread"):
                _deal(rows, size)
        else:
            _check_dealt(rows, size)


def test_epoch_end_uses_only_the_own_and_last_batch_of_the_round():
    from transparent_dist.tf.inputs import pipelines

    own, last = np.arange(4), np.arange(100, 104)
    # Rank 0 of 2, tail of 1 row: the last batch (rank 1's) lends it a row.
    mine = pipelines.epoch_end(own, last, [np.array([200])], 0, 2, "the data")
    assert [b.tolist() for b in mine] == [[0, 1, 2, 3], [103]]
    theirs = pipelines.epoch_end(last, last, [np.array([200])], 1, 2, "the data")
    assert [b.tolist() for b in theirs] == [[100, 101, 102], [200]]


def _steps(rows, size, round_size=None):
    from transparent_dist.tf.inputs import pipelines

    return [
        [
            np.asarray(b)
            for b in pipelines.balanced_rounds(iter(_batches(rows)), r, size, round_size=round_size)
        ]
        for r in range(size)
    ]


@pytest.mark.parametrize(("started", "left"), [(3, 2), (3, 1), (4, 3), (4, 2), (2, 1)])
def test_balanced_rounds_after_a_lost_rank_keep_every_steps_samples(started, left):
    """A lost rank leaves `left` of `started` ranks: each step is the same
    samples the `started` ranks took in it (joined, split by rows), no
    survivor's batch is empty, every sample once (round_size)."""
    rng = np.random.default_rng(7 * started + left)
    for _ in range(20):
        rows = [int(v) for v in rng.integers(3, 7, int(rng.integers(started, 5 * started)))]
        rows[-1] = int(rng.integers(started, 7))  # a short last batch, enough for a step
        before = _steps(rows, started)
        after = _steps(rows, left, round_size=started)
        assert len({len(s) for s in after}) == 1 and len(after[0]) == len(before[0]), rows
        assert all(len(b) > 0 for s in after for b in s), rows
        for k in range(len(before[0])):
            expected = np.concatenate([s[k] for s in before])
            got = np.concatenate([s[k] for s in after])
            np.testing.assert_array_equal(got, expected)


def test_balanced_rounds_unchanged_when_no_rank_was_lost():
    rows = [4, 4, 4, 4, 4, 4, 2]
    assert [[b.tolist() for b in s] for s in _steps(rows, 3, round_size=3)] == [
        [b.tolist() for b in s] for s in _deal(rows, 3)
    ]


def test_batches_of_other_shapes_cannot_be_joined_after_a_lost_rank():
    """Padded batches (each to its own length) end the job with the reason."""
    from transparent_dist.tf.inputs import pipelines

    batches = [np.zeros((2, 5)), np.zeros((2, 7)), np.zeros((2, 6))]
    with pytest.raises(CollectiveError, match=r"cannot be joined \(shapes \[\[\(2, 5\)\]"):
        list(pipelines.balanced_rounds(iter(batches), 0, 2, round_size=3))


def test_a_batched_dataset_after_a_lost_rank_keeps_the_global_batches():
    """`dataset_batches` with the plan of 2 survivors of 3 ranks: each step
    is 3 of the script's batches, 36 rows each survivor; the length is the
    3-rank run's; a tensor dataset (tf.concat path)."""
    import tensorflow as tf

    from transparent_dist.core.shard_plan import ShardPlan
    from transparent_dist.tf.inputs import pipelines

    dataset = tf.data.Dataset.range(430).batch(24)  # 18 batches, the last of 22
    parts = [
        pipelines.dataset_batches(dataset, ShardPlan(rank=r, size=2, batch_ranks=3))
        for r in range(2)
    ]
    steps = [[b.numpy() for b in part] for part in parts]
    assert [int(p.cardinality()) for p in parts] == [6, 6]
    assert [len(b) for b in steps[0]] == [36] * 5 + [35]
    for k in range(6):
        np.testing.assert_array_equal(
            np.concatenate([steps[0][k], steps[1][k]]), np.arange(72 * k, min(72 * k + 72, 430))
        )
