"""The run folder: its files, its lock and its checkpoints (rank 0 writes).

A run folder holds

* ``config.toml``: the resolved options;
* ``log.txt``: the lines the run printed;
* ``metrics.json``: strict JSON (non-finite numbers are written as ``null``);
* ``checkpoint.pt`` and ``checkpoint.prev.pt``: the last two checkpoints,
  plain ``torch.save`` files (``torch.load(path, weights_only=True)`` reads
  them), each with a SHA-256 digest of its content stored inside it
  (:func:`content_digest`). A checkpoint that cannot be read or whose digest
  does not match is reported in one line and the previous one is used;
* ``.lock``: held with ``flock`` by the run's rank 0 for the run's lifetime
  (it names the holder's host and pid), so that two runs never share a folder.

Every file is replaced atomically (written to a temporary file in the same
folder, flushed to disk, renamed), so an interrupted run never leaves a
half-written file behind. A folder whose run ended before its first
checkpoint (and whose lock is free) may be started again: its old files are
replaced.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import socket
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import torch
import tomli_w

from mgrit_gru.core.comm import Comm
from mgrit_gru.errors import InputError

CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"
LOCK = ".lock"
RUN_FILES = ("config.toml", "metrics.json", CHECKPOINT, PREVIOUS, "log.txt")
#: Version of the checkpoint layout (docs/reliability.md).
CHECKPOINT_FORMAT = 2


# --------------------------------------------------------------------------- #
# files
# --------------------------------------------------------------------------- #
def atomic_write(path: Path, write: Callable) -> None:
    """Write ``path`` through ``write(file_object)`` into a temporary file in the
    same folder, flushed to disk, then renamed over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def strict_json(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None`` (so that
    ``json.dumps(..., allow_nan=False)`` writes strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def content_digest(state: Any) -> str:
    """SHA-256 of a checkpoint's content (its ``"sha256"`` entry left out):
    every tensor's dtype, shape and bytes and every other value's ``repr``,
    walked in a fixed order. Independent of how torch lays out the file."""
    h = hashlib.sha256()

    def walk(v: Any) -> None:
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(v, dict):
            h.update(b"{")
            for k in sorted(v, key=repr):
                if k == "sha256":
                    continue
                h.update(repr(k).encode())
                walk(v[k])
            h.update(b"}")
        elif isinstance(v, (list, tuple)):
            h.update(b"[")
            for x in v:
                walk(x)
            h.update(b"]")
        else:
            h.update(repr(v).encode())

    walk(state)
    return h.hexdigest()


def finite_state(state_dict: dict) -> bool:
    """True if every floating-point tensor of a (model or optimizer) state is finite."""
    def walk(v: Any) -> bool:
        if isinstance(v, torch.Tensor):
            return not v.is_floating_point() or bool(torch.isfinite(v).all())
        if isinstance(v, dict):
            return all(walk(x) for x in v.values())
        if isinstance(v, (list, tuple)):
            return all(walk(x) for x in v)
        return True
    return walk(state_dict)


def on_host(state: Any) -> Any:
    """``state`` with every tensor on a GPU replaced by its host copy (dicts,
    lists and tuples walked). What holds no such tensor is returned as it is."""
    if isinstance(state, torch.Tensor):
        return state if state.device.type == "cpu" else state.cpu()
    if isinstance(state, dict):
        moved = {k: on_host(v) for k, v in state.items()}
        if all(moved[k] is v for k, v in state.items()):
            return state
        out = type(state)(moved) if isinstance(state, OrderedDict) else moved
        if hasattr(state, "_metadata"):     # a module's state_dict (versions of its parts)
            out._metadata = state._metadata
        return out
    if isinstance(state, (list, tuple)):
        moved = [on_host(v) for v in state]
        if all(m is v for m, v in zip(moved, state)):
            return state
        return type(state)(moved)
    return state


def read_checkpoint(path: Path) -> dict:
    """Load and verify one checkpoint file; ``ValueError`` with a one-line
    reason if it is unreadable, truncated, not a checkpoint or its digest
    does not match."""
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise ValueError("missing") from None
    except Exception as e:  # noqa: BLE001 - any failure means a bad file
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise ValueError(f"unreadable ({type(e).__name__}{': ' + first if first else ''})") \
            from None
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError("not an mgrit-gru checkpoint")
    digest = state.get("sha256")
    if digest is not None and digest != content_digest(state):
        raise ValueError("checksum mismatch (the file is corrupt)")
    for key in ("epoch", "batch"):
        value = state.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"bad {key!r} entry {value!r}")
    return state


# --------------------------------------------------------------------------- #
# the folder
# --------------------------------------------------------------------------- #
def claim_run_name(stem: str) -> str:
    """Create and return a new folder ``stem``, ``stem-2``, ``stem-3``, ...
    (``mkdir`` is atomic: two runs started in the same second get different
    folders)."""
    Path(stem).parent.mkdir(parents=True, exist_ok=True)
    name, n = stem, 2
    while True:
        try:
            os.mkdir(name)
            return name
        except FileExistsError:
            name = f"{stem}-{n}"
            n += 1


class RunFolder:
    """The files of one run; every method is a no-op except on rank 0.

    Construction is collective: rank 0 creates (or, with ``resume``, checks)
    the folder and takes its lock; any problem raises :class:`InputError` on
    every rank. :meth:`close` (or the end of a ``with`` block) releases the lock.
    """

    def __init__(self, path: str, comm: Comm, *, resume: bool):
        self.path = Path(path)
        self.active = comm.is_root
        self._lock_fh = None
        self.notes: list[str] = []        # lines for the log once it is open
        error = None
        if self.active:
            error = self._prepare(resume)
        error = comm.bcast_object(error)
        if error:
            self.close()
            raise InputError(error)

    # -- the lock ---------------------------------------------------------------
    def _lock(self) -> str | None:
        """Take the folder's lock; an error message if another run holds it."""
        lock = self.path / LOCK
        try:
            fh = open(lock, "a+")
        except OSError as e:
            return f"run folder {self.path}: cannot create its lock file ({e.strerror})"
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            return f"run folder {self.path}: in use by another run ({holder})"
        fh.seek(0)
        fh.truncate()
        fh.write(f"host {socket.gethostname()} pid {os.getpid()} since "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        fh.flush()
        self._lock_fh = fh
        return None

    def close(self) -> None:
        """Release the lock (the lock file stays)."""
        if self._lock_fh is not None:
            try:
                fcntl.flock(self._lock_fh, fcntl.LOCK_UN)
            finally:
                self._lock_fh.close()
                self._lock_fh = None

    def __enter__(self) -> "RunFolder":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _prepare(self, resume: bool) -> str | None:
        """Create (or check, on resume) and lock the folder; an error message or None."""
        where = f"run folder {self.path}"
        if self.path.exists() and not self.path.is_dir():
            return f"{where}: exists and is not a folder"
        if resume:
            if not self.path.is_dir():
                return f"{where}: not found"
            error = self._lock()
            if error:
                return error
            if not self.has_checkpoint():
                self.close()
                return f"{where}: no checkpoint.pt to resume from"
            return None
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            return f"{where}: cannot create ({e.strerror})"
        error = self._lock()
        if error:
            return error
        if self.has_checkpoint():
            self.close()
            return (f"{where}: already holds a run (resume it with --resume or "
                    f"--resume-or-start, or choose another --out)")
        old = [f for f in RUN_FILES if (self.path / f).exists()]
        if old:
            # a run that ended before its first checkpoint: start it again
            for f in old:
                (self.path / f).unlink()
            self.notes.append(f"restarting: the previous run in {self.path} ended before "
                              f"its first checkpoint (its {', '.join(old)} replaced)")
        return None

    def has_checkpoint(self) -> bool:
        return (self.path / CHECKPOINT).is_file() or (self.path / PREVIOUS).is_file()

    # -- writing ------------------------------------------------------------------
    def write_config(self, config) -> None:
        if self.active:
            atomic_write(self.path / "config.toml",
                         lambda fh: tomli_w.dump(config.to_dict(), fh))

    def write_metrics(self, metrics: dict) -> None:
        if self.active:
            text = json.dumps(strict_json(metrics), indent=2, allow_nan=False)
            atomic_write(self.path / "metrics.json", lambda fh: fh.write(text.encode()))

    def write_checkpoint(self, state: dict) -> None:
        """Write ``state`` (with its digest) as checkpoint.pt; the one before
        becomes checkpoint.prev.pt. Tensors are written from the host (a run
        resumes on any device). The caller makes sure the weights are finite."""
        if not self.active:
            return
        state = dict(on_host(state), format=CHECKPOINT_FORMAT)
        state["sha256"] = content_digest(state)
        current, previous = self.path / CHECKPOINT, self.path / PREVIOUS
        tmp = self.path / f".{CHECKPOINT}.tmp"
        with open(tmp, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        if current.exists():
            os.replace(current, previous)
        os.replace(tmp, current)
        _fsync_dir(self.path)

    def log(self, line: str) -> None:
        """Print ``line`` and append it to log.txt."""
        if self.active:
            print(line, flush=True)
            with open(self.path / "log.txt", "a") as fh:
                fh.write(line + "\n")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(folder: Path, comm: Comm) -> tuple[dict, list[str]]:
    """Rank 0 reads the newest good checkpoint of a run (checkpoint.pt, else
    checkpoint.prev.pt); every rank gets it and the warnings to log (one line
    per bad file). :class:`InputError` if neither is good."""
    state = error = None
    warnings: list[str] = []
    if comm.is_root:
        reasons = []
        for name in (CHECKPOINT, PREVIOUS):
            try:
                state = read_checkpoint(folder / name)
                break
            except ValueError as e:
                reasons.append(f"{name}: {e}")
        if state is None:
            error = f"run folder {folder}: cannot resume: " + "; ".join(reasons)
        else:
            warnings = [f"warning: {r}; using {PREVIOUS}" for r in reasons]
            if "history" not in state:         # checkpoints of format 1
                try:
                    with open(folder / "metrics.json") as fh:
                        state["history"] = json.load(fh)["epochs"]
                except Exception as e:  # noqa: BLE001 - any failure is a bad run folder
                    error = (f"run folder {folder}: cannot resume: metrics.json "
                             f"({type(e).__name__})")
    state, warnings, error = comm.bcast_object((state, warnings, error))
    if error:
        raise InputError(error)
    return state, warnings
