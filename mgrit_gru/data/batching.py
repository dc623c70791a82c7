"""Minibatches of a split: shuffled index blocks, reproducible from a seed.

With ``bucket=True`` and the sequences' lengths, batches hold sequences of
similar lengths (length bucketing): the shuffled order is cut into pools of
about ``BUCKET_POOL`` batches, each pool is sorted by length and cut into
batches, and the batches of the epoch are shuffled.  A batch then costs about
what its longest sequence costs.  With ``group = K`` (the data-parallel
workers), runs of ``K`` neighbouring batches of a pool (similar lengths) are
shuffled as units, so that the ``K`` batches that workers run side by side
(averaging's rounds, mutex's turns: batches ``rK .. rK + K - 1``) take similar
times; a pool then holds a multiple of ``K`` batches, and the one short unit
of the epoch (if any) comes last.  Every epoch draws new pools, so batch
compositions still change between epochs.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from mgrit_gru.data.schema import Batch, Split
from mgrit_gru.errors import InputError

#: Batches per pool of length bucketing: larger pools give more uniform
#: lengths within a batch, smaller ones more random batch compositions.
BUCKET_POOL = 50


def _generator(seed: int | None, generator: np.random.Generator | None) -> np.random.Generator:
    if seed is not None and generator is not None:
        raise ValueError("give either seed or generator, not both")
    return generator if generator is not None else np.random.default_rng(seed)


def batch_indices(n: int, batch_size: int, *, shuffle: bool, seed: int | None = None,
                  generator: np.random.Generator | None = None,
                  drop_last: bool = False, lengths: np.ndarray | None = None,
                  bucket: bool = False, group: int = 1) -> Iterator[np.ndarray]:
    """Index arrays of one epoch over ``n`` samples: each sample exactly once.

    With ``shuffle`` the order is a permutation drawn from ``generator`` (or a
    fresh ``default_rng(seed)``); pass the same generator every epoch for a
    new, reproducible order each epoch.  ``drop_last`` drops a final short batch.
    ``bucket`` (with ``lengths [n]``) groups sequences of similar lengths into
    batches (see the module docstring); without ``shuffle`` the batches are
    the samples sorted by length; ``group`` keeps runs of that many
    neighbouring batches together (see the module docstring).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
            or batch_size < 1:
        raise InputError(f"batch_size: must be a positive integer, got {batch_size!r}")
    if isinstance(group, bool) or not isinstance(group, (int, np.integer)) or group < 1:
        raise InputError(f"group: must be a positive integer, got {group!r}")
    rng = _generator(seed, generator) if shuffle else None
    if bucket:
        if lengths is None:
            raise InputError("bucket: length bucketing needs the sequences' lengths")
        yield from _bucketed(n, batch_size, rng, drop_last, np.asarray(lengths), int(group))
        return
    order = rng.permutation(n) if shuffle else np.arange(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        yield order[start:start + batch_size]


def _bucketed(n: int, batch_size: int, rng: np.random.Generator | None, drop_last: bool,
              lengths: np.ndarray, group: int = 1) -> Iterator[np.ndarray]:
    if lengths.shape != (n,):
        raise InputError(f"lengths: expected {n} values, got shape {list(lengths.shape)}")
    order = rng.permutation(n) if rng is not None else np.arange(n)
    per_pool = -(-BUCKET_POOL // group) * group          # a multiple of the group
    pool = batch_size * per_pool if rng is not None else max(n, 1)
    batches = []
    for start in range(0, n, pool):
        chunk = order[start:start + pool]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    # units of ``group`` neighbouring batches; only the last unit may be short
    units = [batches[i:i + group] for i in range(0, len(batches), group)]
    short = [units.pop()] if units and len(units[-1]) < group else []
    sequence = rng.permutation(len(units)) if rng is not None else range(len(units))
    for u in [units[i] for i in sequence] + short:
        yield from u


def lengths_vary(lengths: np.ndarray | None) -> bool:
    """Whether a split with these per-sequence ``lengths`` has sequences of
    different lengths (the rule of ``--bucket-by-length``: bucketing applies
    to variable-length data only)."""
    if lengths is None or len(lengths) < 2:
        return False
    lengths = np.asarray(lengths)
    return bool(lengths.min() != lengths.max())


def iterate_minibatches(split: Split, batch_size: int, *, shuffle: bool, seed: int | None = None,
                        generator: np.random.Generator | None = None,
                        drop_last: bool = False, bucket: bool = False) -> Iterator[Batch]:
    """One epoch of :class:`Batch` slices ``(x, y, lengths)`` of ``split``.

    Same order rules as :func:`batch_indices` (``bucket``: by the split's
    lengths; a split without lengths has one length, and bucketing changes
    nothing).  Batches keep the split's padded length ``T`` (a fixed time grid
    across batches).
    """
    bucket = bucket and split.lengths is not None
    for idx in batch_indices(len(split), batch_size, shuffle=shuffle, seed=seed,
                             generator=generator, drop_last=drop_last, lengths=split.lengths,
                             bucket=bucket):
        if not shuffle and not bucket:  # contiguous: views, no copy
            idx = slice(int(idx[0]), int(idx[-1]) + 1)
        lengths = None if split.lengths is None else split.lengths[idx]
        yield Batch(split.x[idx], split.y[idx], lengths)

