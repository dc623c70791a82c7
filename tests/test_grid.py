"""Grid hierarchy and partition: pure functions, checked for a sweep of (N, m, L, P)."""
import itertools

import pytest

from mgrit_gru.errors import InputError
from mgrit_gru.core.grid import Partition, TimeGrid, block_ranges, make_hierarchy

NS = [1, 2, 3, 4, 5, 7, 16, 37, 64, 100, 127, 128, 129]
MS = [2, 3, 4, 5]
LS = [1, 2, 3, 5]


def _cases():
    for n, m, nl in itertools.product(NS, MS, LS):
        for p in sorted({1, 2, 3, 4, 5, 7, n, n + 1}):
            if 1 <= p <= n + 1:
                yield n, m, nl, p


def test_block_ranges_tile_and_balance():
    for n, p in itertools.product(range(1, 40), range(1, 12)):
        if p > n:
            continue
        r = block_ranges(n, p)
        assert r[0][0] == 0 and r[-1][1] == n
        assert all(b == c for (_, b), (c, _) in zip(r, r[1:]))
        sizes = [b - a for a, b in r]
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_hierarchy_levels_are_nested_c_points():
    for n, m, nl in itertools.product(NS, MS, LS):
        levels = make_hierarchy(n, m, nl)
        assert levels[0].n_points == n + 1 and levels[-1].coarsest
        assert len(levels) <= nl
        for fine, coarse in zip(levels, levels[1:]):
            c_fine = {fine.fine_index(j) for j in range(fine.n_points) if fine.is_cpoint(j)}
            pts = {coarse.fine_index(j) for j in range(coarse.n_points)}
            assert pts == c_fine  # level l+1 points are exactly level l's C-points
            assert coarse.stride == fine.stride * m
            assert coarse.n_points >= 2
        # coarsening stops only when the next level would be too small
        if len(levels) < nl:
            assert (levels[-1].n_points - 1) // m + 1 < 2


@pytest.mark.parametrize("reverse", [False, True])
def test_partition_owns_every_point_once(reverse):
    for n, m, nl, p in _cases():
        levels = make_hierarchy(n, m, nl)
        part = Partition.block(levels, p)
        if reverse:
            part = part.reversed(make_hierarchy(n, m, nl))
        for lev in part.levels:
            owned = []
            for q in range(p):
                r = part.range(lev.index, q)
                owned.extend(range(r.lo, r.hi))
                if r.empty:
                    continue
                # neighbours: the owners of the points just outside the range
                assert r.left == (None if r.lo == 0 else part.owner(lev.index, r.lo - 1))
                assert r.right == (None if r.hi == lev.n_points else part.owner(lev.index, r.hi))
                # a rank owns a level point iff it owns the corresponding fine point
                flo, fhi = part.fine_ranges[q]
                for j in range(r.lo, r.hi):
                    assert flo <= lev.fine_index(j) < fhi
            assert owned == list(range(lev.n_points)), (n, m, nl, p, lev)


def test_reversed_partition_maps_owners():
    n, m, p = 37, 4, 3
    levels = make_hierarchy(n, m, 3)
    fwd = Partition.block(levels, p)
    rev = fwd.reversed(make_hierarchy(n, m, 3))
    for t in range(n + 1):
        q_fwd = fwd.owner(0, t)
        assert rev.owner(0, n - t) == p - 1 - q_fwd


@pytest.mark.parametrize("bad", [dict(n=0, m=2, l=1), dict(n=5, m=1, l=2), dict(n=5, m=2, l=0)])
def test_bad_hierarchy_arguments(bad):
    with pytest.raises(InputError):
        make_hierarchy(bad["n"], bad["m"], bad["l"])


def test_too_many_ranks_is_a_clear_error():
    with pytest.raises(InputError, match="at most 4 time ranks"):
        block_ranges(4, 5)


@pytest.mark.parametrize("reverse", [False, True])
def test_time_grid_is_the_partition_seen_from_one_rank(reverse):
    """TimeGrid.build: the block partition (reversed through Partition.reversed, the
    one formula), positions <-> ranks, and the level-1 rows of each rank, checked
    against brute force for a sweep of (N, m, L, P)."""
    for n, m, nl, p in _cases():
        if p > min(n, 7):   # at most N time ranks (the propagators' rule); few, to keep it short
            continue
        levels = make_hierarchy(n, m, nl)
        part = Partition.block(levels, p)
        if reverse:
            part = part.reversed(levels)
        seen = set()
        for rank in range(p):
            g = TimeGrid.build(n, m, nl, p, rank, reverse=reverse)
            assert [lev.n_points for lev in g.levels] == [lev.n_points for lev in levels]
            assert g.partition.fine_ranges == part.fine_ranges
            q = g.position
            assert q == (p - 1 - rank if reverse else rank) and g.rank_of(q) == rank
            assert g.position_of(rank) == q
            seen.add(q)
            r = g.fine_range
            assert (r.lo, r.hi) == part.fine_ranges[q]
            for lev in g.levels:
                assert g.range(lev.index) == part.range(lev.index, q)
            # level-1 rows: exactly the owned fine points divisible by m (point 0 included)
            rows = list(range(*g.c_rows.indices(r.size)))
            assert [r.lo + k for k in rows] == [j for j in range(r.lo, r.hi) if j % m == 0]
            if rows:
                assert g.c_first == r.lo + rows[0]
            # the forward point of every owned solver point is owned by this rank in forward time
            fwd = Partition.block(levels, p).fine_ranges[rank]
            assert all(fwd[0] <= g.fine_point(s) < fwd[1] for s in range(r.lo, r.hi))
        assert seen == set(range(p))


def test_time_grid_rejects_a_rank_outside_the_communicator():
    with pytest.raises(ValueError):
        TimeGrid.build(10, 2, 2, size=2, rank=2)
