"""mgrit_gru: parallel-in-time (MGRIT) training of implicit GRU networks on MPI."""

__version__ = "0.1.0"
