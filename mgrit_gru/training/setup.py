"""What a run is made of, decided before it trains: the options left to run
time (:func:`resolve_config`), the checks across options
(:func:`check_options`), the device (:func:`choose_device`), the
propagator, the model and the optimizer.

The device: ``cpu``; ``cuda``, this rank's GPU (local rank modulo the GPUs
torch sees on the node; the local rank comes from the launcher's
environment, :data:`LOCAL_RANK_VARS`); ``auto``, ``cuda`` when torch sees a
GPU, else ``cpu``. The model lives on the device; the data sets are loaded on
the host and each batch is moved (:class:`~mgrit_gru.training.update.TensorSplit`).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from typing import Any

import torch

from mgrit_gru.core.comm import Comm
from mgrit_gru.data import Dataset
from mgrit_gru.errors import InputError
from mgrit_gru.training.config import TrainConfig, flag
from mgrit_gru.training.runfolder import claim_run_name

#: Environment variables that hold a rank's index on its node, by launcher:
#: MPICH's hydra, SLURM's srun, Open MPI's mpirun (the first one set counts).
LOCAL_RANK_VARS = ("MPI_LOCALRANKID", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK")


def resolve_config(config: TrainConfig, comm: Comm) -> TrainConfig:
    """Fill in the options left to run time (``out``, ``time_ranks``) and check
    the options against the communicator.

    The run folder is rank 0's choice, broadcast to every rank.
    """
    changes: dict[str, Any] = {}
    out = error = None
    if comm.is_root:
        out = config.out
        if out is None:
            try:
                out = claim_run_name(f"runs/{time.strftime('%Y%m%d-%H%M%S')}-{config.cell}")
            except OSError as e:
                error = f"run folder under runs/: cannot create ({e.strerror})"
    out, error = comm.bcast_object((out, error))
    if error:
        raise InputError(error)
    changes["out"] = out
    time_ranks = config.time_ranks
    if time_ranks is None:
        time_ranks = comm.size if config.propagator == "mgrit" else 1
    changes["time_ranks"] = time_ranks
    if comm.size % time_ranks:
        raise InputError(f"option time_ranks ({flag('time_ranks')}): {time_ranks} does not "
                         f"divide the {comm.size} MPI ranks")
    if time_ranks > 1 and config.propagator != "mgrit":
        raise InputError(f"option time_ranks ({flag('time_ranks')}): {time_ranks} time ranks "
                         f"need propagator = mgrit (got {config.propagator})")
    return dataclasses.replace(config, **changes)


def check_options(config: TrainConfig) -> None:
    """Checks across options that need neither the data nor the ranks."""
    if config.on_divergence == "skip-batch" and config.strategy != "sequential":
        raise InputError(f"option on_divergence ({flag('on_divergence')}): skip-batch needs "
                         f"strategy = sequential (workers update the model themselves)")
    if config.propagator == "mgrit" and config.exact_last_epochs and \
            config.strategy != "sequential":
        raise InputError(f"option exact_last_epochs ({flag('exact_last_epochs')}): needs "
                         f"strategy = sequential (the workers keep their own propagators)")


# --------------------------------------------------------------------------- #
# the device
# --------------------------------------------------------------------------- #
def local_rank(rank: int, environ=None) -> int | None:
    """This rank's index on its node as the launcher announces it
    (:data:`LOCAL_RANK_VARS`), else ``None``."""
    environ = os.environ if environ is None else environ
    for var in LOCAL_RANK_VARS:
        value = environ.get(var, "").strip()
        if value.isdigit():
            return int(value)
    return None


def resolve_device(name: str, rank: int = 0, environ=None) -> torch.device:
    """The device of option ``device`` = ``name`` for the rank ``rank`` of the
    job: ``cpu``; ``cuda:<local rank mod GPUs>`` (the local rank from the
    launcher's environment, else ``rank``); ``auto``: ``cuda`` when torch sees
    a GPU, else ``cpu``. :class:`InputError` for ``cuda`` without a GPU."""
    where = f"option device ({flag('device')})"
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if name not in ("cuda", "auto"):
        raise InputError(f"{where}: unknown value {name!r} (choose from cpu, cuda, auto)")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise InputError(f"{where}: cuda, but torch sees no CUDA device on "
                         f"{socket.gethostname()} (use --device cpu or auto)")
    local = local_rank(rank, environ)
    return torch.device("cuda", (rank if local is None else local) % count)


def choose_device(config: TrainConfig, comm: Comm) -> torch.device:
    """:func:`resolve_device` on every rank of ``comm`` (collective: an error on
    one rank is raised on all), then the checks of the options against it."""
    device = error = None
    try:
        device = resolve_device(config.device, comm.rank)
    except InputError as e:
        error = str(e)
    errors = comm.allgather_object(error)
    failed = next((r for r, e in enumerate(errors) if e), None)
    if failed is not None:
        some = comm.size > 1 and not all(errors)
        raise InputError(errors[failed] + (f" (rank {failed})" if some else ""))
    check_device_options(config, device)
    return device


def check_device_options(config: TrainConfig, device: torch.device) -> None:
    """The strategies that cannot run on a GPU: Hogwild, and worker threads or
    processes with more than one worker (one worker of mutex or averaging is
    the sequential run, in a thread)."""
    if device.type == "cpu":
        return
    where = f"option strategy ({flag('strategy')})"
    if config.strategy == "hogwild":
        raise InputError(f"{where}: hogwild cannot run on a GPU (device {device}): its "
                         f"workers update the model without a lock; use --device cpu")
    if config.strategy != "sequential" and config.workers > 1:
        raise InputError(f"{where}: {config.strategy} with {config.workers} workers cannot run "
                         f"on a GPU (device {device}): the workers are CPU threads or "
                         f"processes; use --device cpu, or strategy = sequential with MPI "
                         f"data groups")


# --------------------------------------------------------------------------- #
# model pieces
# --------------------------------------------------------------------------- #
def make_propagator(config: TrainConfig, time_comm: Comm):
    """The propagator named by ``config.propagator``."""
    from mgrit_gru.models import AutogradPropagator, SerialPropagator

    if config.propagator == "serial":
        return SerialPropagator()
    if config.propagator == "autograd":
        return AutogradPropagator()
    from mgrit_gru.models import MGRITOptions, MGRITPropagator

    options = MGRITOptions(levels=config.levels, cfactor=config.cfactor,
                           fwd_iters=config.fwd_iters, bwd_iters=config.bwd_iters,
                           fwd_tol=config.fwd_tol, bwd_tol=config.bwd_tol,
                           fwd_rtol=config.fwd_rtol, bwd_rtol=config.bwd_rtol,
                           relax=config.relax, bwd_relax=config.bwd_relax,
                           skip_first_relax=config.skip_first_relax,
                           final_residual=config.final_residual,
                           cycle=config.cycle, nested=config.nested,
                           warm_start=config.warm_start, warm_start_mb=config.warm_start_mb,
                           coarse_input=config.coarse_input)
    return MGRITPropagator(time_comm, options)


def build_model(config: TrainConfig, dataset: Dataset, time_comm: Comm | None = None, *,
                device: torch.device | str = "cpu", propagator: Any = None):
    """The run's :class:`SequenceClassifier` on ``device``, its weights drawn
    from ``config.seed`` on the host (the same on every rank and device);
    ``propagator`` defaults to :func:`make_propagator`'s."""
    from mgrit_gru.models import SequenceClassifier

    torch.manual_seed(config.seed)
    if propagator is None:
        propagator = make_propagator(config, time_comm or Comm.serial())
    model = SequenceClassifier(cell=config.cell, input_size=dataset.input_size,
                               hidden_size=config.hidden, num_classes=dataset.num_classes,
                               pooling=config.pooling, layers=config.layers,
                               propagator=propagator, dtype=getattr(torch, config.dtype))
    device = torch.device(device)
    return model if device.type == "cpu" else model.to(device)


def make_optimizer(config: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """SGD or Adam over the model's parameters with ``config.lr``.

    Adam is torch's fused implementation (one kernel for all parameters)
    where this torch has it for the parameters' device (CPU since torch 2.4):
    right after a minibatch its step takes about half the time of the
    per-tensor loop (docs/performance.md); the two differ by float rounding
    only. SGD stays the plain loop (its fused form is no faster here)."""
    params = list(model.parameters())
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr)
    try:
        return torch.optim.Adam(params, lr=config.lr, fused=True)
    except (RuntimeError, TypeError, ValueError):     # no fused kernel for this device
        return torch.optim.Adam(params, lr=config.lr)
