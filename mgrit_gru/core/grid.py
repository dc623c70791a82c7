"""Time grids, their multigrid hierarchy and the partition over ranks.

Pure functions and frozen dataclasses, no MPI: every answer here can be
checked for any (N, m, L, P) on one process.

Conventions
-----------
* The fine grid has ``N`` intervals and ``N + 1`` points ``0..N``; point 0 holds
  the initial condition.
* Level ``l`` has ``n_l`` points; its point ``j`` is the fine point
  ``j * m**l`` (its *stride*).  Level ``l + 1`` consists of the C-points of
  level ``l``: the level-``l`` points whose index is divisible by ``m``.
  ``n_{l+1} = (n_l - 1) // m + 1``.  ``N`` need not be divisible by ``m``: the
  points after the last C-point are F-points of the last interval and are
  reached by F-relaxation (as in XBraid); every coarse step has length
  ``m**l`` exactly.
* Coarsening stops when the next level would have fewer than ``min_points``
  points, or when ``max_levels`` is reached.
* A partition gives each of ``P`` positions a contiguous block of fine points
  (``block_ranges``: the remainder goes to the first positions).  A rank owns,
  on every level, the level points whose fine index falls into its block; on
  coarse levels a rank may own none.  ``left``/``right`` are the positions
  owning the point before the first / after the last owned point, so ranks
  without points are skipped over.
* A :class:`TimeGrid` is what one rank needs before any stepper exists: the
  hierarchy, the partition (in forward or reversed time), this rank's
  position in it and the map from positions to ranks.  The solver and the
  steppers that need the partition (the adjoint linearises this rank's steps
  of every level) are built from the same one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from mgrit_gru.errors import InputError


def block_ranges(n_points: int, parts: int) -> list[tuple[int, int]]:
    """Split ``range(n_points)`` into ``parts`` contiguous blocks, remainder first.

    >>> block_ranges(10, 3)
    [(0, 4), (4, 7), (7, 10)]
    """
    if parts < 1:
        raise InputError(f"number of ranks must be >= 1, got {parts}")
    if n_points < parts:
        raise InputError(
            f"cannot split {n_points} time points over {parts} ranks: "
            f"use at most {n_points} time ranks"
        )
    base, extra = divmod(n_points, parts)
    ranges, lo = [], 0
    for p in range(parts):
        hi = lo + base + (1 if p < extra else 0)
        ranges.append((lo, hi))
        lo = hi
    return ranges


@dataclass(frozen=True)
class Level:
    """One level of the time-grid hierarchy."""

    index: int
    stride: int      # fine intervals per interval of this level (m**index)
    n_points: int    # points 0..n_points-1; point j is fine point j*stride
    cfactor: int     # coarsening factor towards the next level
    coarsest: bool   # no coarser level below

    def is_cpoint(self, j: int) -> bool:
        """C-points are the points kept on the next coarser level."""
        return j % self.cfactor == 0

    def fine_index(self, j: int) -> int:
        return j * self.stride


def make_hierarchy(n_intervals: int, cfactor: int, max_levels: int, min_points: int = 2) -> list[Level]:
    """Levels 0..L-1 for ``n_intervals`` fine intervals (see module docstring)."""
    if n_intervals < 1:
        raise InputError(f"the time grid needs at least 1 interval, got {n_intervals}")
    if cfactor < 2:
        raise InputError(f"cfactor must be >= 2, got {cfactor}")
    if max_levels < 1:
        raise InputError(f"levels must be >= 1, got {max_levels}")
    counts = [n_intervals + 1]
    while len(counts) < max_levels:
        nxt = (counts[-1] - 1) // cfactor + 1
        if nxt < min_points:
            break
        counts.append(nxt)
    return [
        Level(index=l, stride=cfactor ** l, n_points=n, cfactor=cfactor, coarsest=(l == len(counts) - 1))
        for l, n in enumerate(counts)
    ]


@dataclass(frozen=True)
class LevelRange:
    """What one position (rank in time order) owns on one level."""

    lo: int                  # first owned level point
    hi: int                  # one past the last owned level point (lo == hi: owns none)
    left: int | None         # position owning point lo-1
    right: int | None        # position owning point hi

    @property
    def size(self) -> int:
        return self.hi - self.lo

    @property
    def empty(self) -> bool:
        return self.hi <= self.lo


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class Partition:
    """Ownership of the points of every level by ``P`` positions in time order.

    ``fine_ranges[q] = (lo, hi)`` are the fine points of position ``q``;
    together they must tile ``0..N`` in order.
    """

    def __init__(self, levels: Sequence[Level], fine_ranges: Sequence[tuple[int, int]]):
        n_fine = levels[0].n_points
        if not fine_ranges or fine_ranges[0][0] != 0 or fine_ranges[-1][1] != n_fine:
            raise ValueError(f"fine ranges {fine_ranges} do not cover points 0..{n_fine - 1}")
        for (a, b), (c, _) in zip(fine_ranges, fine_ranges[1:]):
            if b != c or b <= a:
                raise ValueError(f"fine ranges {fine_ranges} are not contiguous and non-empty")
        self.levels = list(levels)
        self.fine_ranges = [tuple(r) for r in fine_ranges]
        self.size = len(fine_ranges)
        # level_ranges[l][q]
        self.level_ranges: list[list[LevelRange]] = []
        for lev in self.levels:
            bounds = []
            for flo, fhi in self.fine_ranges:
                lo = min(_ceil_div(flo, lev.stride), lev.n_points)
                hi = min(_ceil_div(fhi, lev.stride), lev.n_points)
                bounds.append((lo, hi))
            owner = self._owner_table(bounds)
            ranges = []
            for lo, hi in bounds:
                if hi <= lo:
                    ranges.append(LevelRange(lo, lo, None, None))
                    continue
                left = owner(lo - 1) if lo > 0 else None
                right = owner(hi) if hi < lev.n_points else None
                ranges.append(LevelRange(lo, hi, left, right))
            self.level_ranges.append(ranges)

    @staticmethod
    def _owner_table(bounds):
        def owner(j: int) -> int:
            for q, (lo, hi) in enumerate(bounds):
                if lo <= j < hi:
                    return q
            raise IndexError(j)
        return owner

    @classmethod
    def block(cls, levels: Sequence[Level], parts: int) -> "Partition":
        """The standard block partition of the fine points over ``parts`` positions."""
        return cls(levels, block_ranges(levels[0].n_points, parts))

    def reversed(self, levels: Sequence[Level]) -> "Partition":
        """The same ownership seen in reversed time ``s = N - t``.

        Position ``q`` of the result is position ``P-1-q`` of ``self``.  The
        levels must be a hierarchy for the same ``N`` (coarse points differ in
        reversed time unless ``m`` divides ``N``).  This is the one place the
        reversed ranges are computed (:class:`TimeGrid` uses it).
        """
        n = self.levels[0].n_points - 1
        rev = [(n - hi + 1, n - lo + 1) for lo, hi in reversed(self.fine_ranges)]
        return Partition(levels, rev)

    def owner(self, level: int, j: int) -> int:
        """Position owning point ``j`` of ``level``."""
        for q, r in enumerate(self.level_ranges[level]):
            if r.lo <= j < r.hi:
                return q
        raise IndexError(f"point {j} is not on level {level}")

    def range(self, level: int, position: int) -> LevelRange:
        return self.level_ranges[level][position]


@dataclass(frozen=True)
class TimeGrid:
    """The hierarchy and partition of one solve, seen from one rank.

    Built by :meth:`build` from the number of intervals, the coarsening, and
    the communicator's size and rank only, so that it exists before any
    stepper.  ``reverse=True``: solver point ``s`` is fine point ``N - s`` of
    the forward grid, owned by the rank that owns that forward point; rank
    ``r`` is then position ``P - 1 - r`` (positions are in solver time order).
    """

    n_intervals: int
    cfactor: int
    max_levels: int
    min_points: int
    reverse: bool
    size: int                      # ranks (positions)
    rank: int                      # this rank
    levels: tuple[Level, ...]
    partition: Partition

    @classmethod
    def build(cls, n_intervals: int, cfactor: int, max_levels: int, size: int = 1, rank: int = 0,
              reverse: bool = False, min_points: int = 2) -> "TimeGrid":
        """The grid of ``n_intervals`` fine intervals over ``size`` ranks, for ``rank``."""
        if not 0 <= rank < size:
            raise ValueError(f"rank {rank} is not in 0..{size - 1}")
        levels = tuple(make_hierarchy(n_intervals, cfactor, max_levels, min_points))
        part = Partition.block(levels, size)
        if reverse:
            part = part.reversed(levels)
        return cls(n_intervals, cfactor, max_levels, min_points, bool(reverse), size, rank,
                   levels, part)

    @property
    def position(self) -> int:
        """This rank's position in solver time order."""
        return self.position_of(self.rank)

    def position_of(self, rank: int) -> int:
        return self.size - 1 - rank if self.reverse else rank

    def rank_of(self, position: int) -> int:
        """The rank at ``position`` (positions and ranks map both ways the same)."""
        return self.size - 1 - position if self.reverse else position

    def range(self, level: int) -> LevelRange:
        """What this rank owns on ``level`` (solver indices)."""
        return self.partition.range(level, self.position)

    @property
    def fine_range(self) -> LevelRange:
        return self.range(0)

    @property
    def c_rows(self) -> slice:
        """This rank's level-1 points (its fine C-points, point 0 included) as rows
        of its fine values: all that an initial F-sweep reads of a guess."""
        m, lo, hi = self.cfactor, self.fine_range.lo, self.fine_range.hi
        k0 = _ceil_div(lo, m) * m - lo
        return slice(k0, max(hi - lo, k0), m)

    @property
    def c_first(self) -> int:
        """Solver index of the first of :attr:`c_rows`."""
        return self.fine_range.lo + self.c_rows.start

    def fine_point(self, s: int) -> int:
        """The forward fine point of solver point ``s``."""
        return self.n_intervals - s if self.reverse else s
