"""The synthetic long-sequence task (lengths 64 .. 16384 and beyond)."""

from __future__ import annotations


import numpy as np

from mgrit_gru import limits
from mgrit_gru.errors import InputError
from mgrit_gru.limits import MAX_SYNTHETIC_LENGTH

from mgrit_gru.data.schema import Dataset, Split, _check_limit, _check_num_classes


_MIN_SEGMENT = 4
_PULSE_WIDTH = 8
_NOISE_STD = 0.25


def _pulse_code(num_classes: int, input_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Channel and signed amplitude of each pulse type.

    Type ``c`` is a bump on channel ``(c // 2) % d`` with sign ``+`` for even
    ``c`` and ``-`` for odd ``c``, amplitude ``1 + c // (2 d)``: for two classes
    and one channel simply a positive and a negative bump.
    """
    c = np.arange(num_classes)
    channel = (c // 2) % input_size
    amplitude = np.where(c % 2 == 0, 1.0, -1.0) * (1 + c // (2 * input_size))
    return channel, amplitude


def _synthetic_split(length: int, n: int, num_classes: int, input_size: int,
                     variable_length: bool, seed: np.random.SeedSequence) -> Split:
    num_events = 2 * num_classes - 1
    r_label, r_len, r_type, r_fix, r_pos, r_noise = (np.random.default_rng(s) for s in seed.spawn(6))
    y = r_label.permutation(np.arange(n) % num_classes).astype(np.int64)
    if variable_length:
        lengths = r_len.integers(max(length // 2, _MIN_SEGMENT * num_events), length + 1, size=n)
    else:
        lengths = np.full(n, length, dtype=np.int64)

    # Event types: random, then repaired so the label type is the strict majority.
    types = r_type.integers(0, num_classes, size=(n, num_events))
    fix_order = np.argsort(r_fix.random((n, num_events)), axis=1)
    rows = np.arange(n)
    for _ in range(num_events):
        counts = np.stack([(types == c).sum(axis=1) for c in range(num_classes)], axis=1)
        own = counts[rows, y]
        counts[rows, y] = -1
        need = own <= counts.max(axis=1)
        if not need.any():
            break
        # the first event (in the random order) that is not yet of the label type
        not_label = np.take_along_axis(types, fix_order, axis=1) != y[:, None]
        pick = fix_order[rows, np.argmax(not_label, axis=1)]
        sel = rows[need]
        types[sel, pick[need]] = y[need]

    # One event per equal segment of the valid length, at a random offset inside it.
    seg = lengths // num_events                                   # [n]
    width = np.minimum(_PULSE_WIDTH, seg // 2)                    # [n]
    offset = (r_pos.random((n, num_events)) * (seg - width + 1)[:, None]).astype(np.int64)
    start = np.arange(num_events)[None, :] * seg[:, None] + offset  # [n, E]

    x = (_NOISE_STD * r_noise.standard_normal((n, length, input_size))).astype(np.float32)
    channel, amplitude = _pulse_code(num_classes, input_size)
    k = np.arange(_PULSE_WIDTH)
    steps = start[:, :, None] + k[None, None, :]                  # [n, E, W]
    inside = np.broadcast_to(k[None, None, :] < width[:, None, None], steps.shape)
    ii = np.broadcast_to(rows[:, None, None], steps.shape)[inside]
    tt = steps[inside]
    cc = np.broadcast_to(channel[types][:, :, None], steps.shape)[inside]
    aa = np.broadcast_to(amplitude[types][:, :, None], steps.shape)[inside]
    x[ii, tt, cc] += aa.astype(np.float32)
    x[np.arange(length)[None, :] >= lengths[:, None]] = 0.0
    return Split(x, y, lengths if variable_length else None)


def make_synthetic(length: int, n_train: int, n_test: int, *, num_classes: int = 2,
                   input_size: int = 1, seed: int = 0, variable_length: bool = False) -> Dataset:
    """The synthetic long-memory classification task (deterministic in ``seed``).

    Each sequence is Gaussian noise (std 0.25) carrying ``E = 2C - 1`` short
    pulses (width 8, fewer steps for very short sequences), one at a random
    offset inside each of ``E`` equal segments of the sequence, so the first
    pulse lies in the first ``1/E`` of it.  A pulse has one of ``C`` types
    (channel and signed amplitude, see :func:`_pulse_code`); the class is the
    type that occurs most often (a strict majority by construction).  The
    answer thus depends on events spread over the whole sequence: a model must
    detect pulses in noise and keep counts from the first to the last step.
    Labels are balanced exactly (counts differ by at most one); train and test
    come from independent streams of ``seed``.  With ``variable_length`` the
    lengths are uniform in ``[length // 2, length]`` and padding is zero.
    """
    where = f"synthetic:{length}"
    for option, value in (("length", length), ("n_train", n_train), ("n_test", n_test),
                          ("input_size", input_size)):
        _check_limit(option, value)
    num_classes = _check_num_classes(where, num_classes)
    num_events = 2 * num_classes - 1
    if length < _MIN_SEGMENT * num_events:
        raise InputError(f"{where}: length must be >= {_MIN_SEGMENT * num_events} "
                         f"for {num_classes} classes ({num_events} pulses), got {length}")
    if length > MAX_SYNTHETIC_LENGTH:
        raise InputError(f"{where}: length {length} is more than the {MAX_SYNTHETIC_LENGTH} "
                         "steps supported")
    # peak: both splits as float32, the float64 noise and masks of the larger one
    values = length * input_size
    need = (n_train + n_test) * values * 4 + max(n_train, n_test) * (values * 9 + length)
    limits.check_read(where, f"generating {n_train} + {n_test} sequences of {length} x "
                      f"{input_size} values", need,
                      "use a smaller LEN, --max-len, --max-train or --max-test")
    ss_train, ss_test = np.random.SeedSequence(seed).spawn(2)
    train = _synthetic_split(length, n_train, num_classes, input_size, variable_length, ss_train)
    test = _synthetic_split(length, n_test, num_classes, input_size, variable_length, ss_test)
    attrs = {
        "name": where,
        "num_classes": num_classes,
        "source": "mgrit_gru.data.make_synthetic",
        "normalisation": "none",
        "description": (f"majority pulse type among {num_events} pulses (width {_PULSE_WIDTH}) "
                        f"in Gaussian noise (std {_NOISE_STD}), one pulse per segment"),
        "seed": int(seed),
        "input_size": int(input_size),
        "variable_length": bool(variable_length),
    }
    return Dataset(where, train, test, num_classes, attrs)
