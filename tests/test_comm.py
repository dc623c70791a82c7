"""Communicator wrapper: tensor transport, collectives, grid split, no-hang abort."""
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from mgrit_gru.core.comm import Comm, abort_on_exception
from mgrit_gru.errors import InputError


def _mpiexec():
    exe = Path(sys.executable).parent / "mpiexec"
    return str(exe) if exe.exists() else shutil.which("mpiexec")


def test_serial_stand_in():
    c = Comm.serial()
    assert (c.rank, c.size, c.is_root) == (0, 1, True)
    t = torch.arange(4.0)
    assert torch.equal(c.allreduce_(t.clone()), t)
    assert c.allreduce_scalar(3.5, "max") == 3.5
    assert c.allgather_object({"a": 1}) == [{"a": 1}]
    tc, dc = c.split_grid(1)
    assert tc.size == dc.size == 1
    with pytest.raises(InputError, match="--time-ranks"):
        c.split_grid(2)


def test_serial_exception_propagates():
    with pytest.raises(ValueError):
        with abort_on_exception(Comm.serial()):
            raise ValueError("x")


@pytest.mark.mpi
def test_tensor_ring_and_allreduce():
    c = Comm.world()
    for dtype in (torch.float32, torch.float64):
        x = torch.full((3, 5), float(c.rank), dtype=dtype)
        right, left = (c.rank + 1) % c.size, (c.rank - 1) % c.size
        req = c.isend(x, right, tag=7)
        y = c.recv(torch.empty_like(x), left, tag=7)
        req.wait()
        assert torch.equal(y, torch.full_like(x, float(left)))
        s = c.allreduce_(x.clone())
        assert torch.equal(s, torch.full_like(x, sum(range(c.size))))
    with pytest.raises(ValueError):
        c.isend(torch.zeros(4, 4).t(), (c.rank + 1) % c.size)  # non-contiguous: refused, not garbled


@pytest.mark.mpi
def test_split_grid_layout():
    c = Comm.world()
    if c.size % 2:
        time_size = c.size
    else:
        time_size = 2
    tc, dc = c.split_grid(time_size)
    assert tc.size == time_size and dc.size == c.size // time_size
    # consecutive world ranks form a time group
    members = tc.allgather_object(c.rank)
    assert members == list(range(c.rank - tc.rank, c.rank - tc.rank + time_size))


SCRIPT = textwrap.dedent("""
    import time, torch
    from mgrit_gru.core.comm import Comm, abort_on_exception
    c = Comm.world()
    with abort_on_exception(c):
        if c.rank == 1:
            time.sleep(0.5)
            raise RuntimeError("boom from rank one")
        c.recv(torch.empty(3), source=1, tag=3)   # would wait forever
""")


@pytest.mark.timeout(60)
def test_exception_on_one_rank_ends_the_job(tmp_path):
    exe = _mpiexec()
    if exe is None:
        pytest.skip("no mpiexec")
    script = tmp_path / "boom.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, MPIEXEC_TIMEOUT="50")
    t0 = time.time()
    p = subprocess.run([exe, "-n", "2", sys.executable, str(script)], capture_output=True, text=True,
                       timeout=55, env=env)
    elapsed = time.time() - t0
    assert p.returncode != 0
    assert "boom from rank one" in p.stderr
    assert "rank 1" in p.stderr
    assert elapsed < 30, elapsed


@pytest.mark.mpi
@pytest.mark.timeout(120)
def test_allreduce_scalar_from_threads_in_opposite_orders():
    """allreduce_scalar is a buffer allreduce that releases the GIL while it waits:
    two threads per rank, on two communicators, entered in opposite orders on
    neighbouring ranks, both finish (a GIL-holding wait would deadlock: each rank's
    first thread would wait for a thread its neighbour cannot run)."""
    import threading

    world = Comm.world()
    if world.size < 2:
        pytest.skip("needs 2 ranks")
    a, b = world.split(0, world.rank), world.split(0, world.rank)
    results = {}

    def reduce(name, comm):
        results[name] = comm.allreduce_scalar(world.rank + 1.0, "sum")

    order = [("a", a), ("b", b)] if world.rank % 2 == 0 else [("b", b), ("a", a)]
    threads = []
    for name, comm in order:
        t = threading.Thread(target=reduce, args=(name, comm), daemon=True)
        t.start()
        threads.append(t)
        time.sleep(0.3)
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "allreduce_scalar deadlocked"
    want = world.size * (world.size + 1) / 2
    assert results == {"a": want, "b": want}
    assert world.allreduce_scalar(2.5, "max") == 2.5
    assert world.allreduce_scalar(float(world.rank), "min") == 0.0
