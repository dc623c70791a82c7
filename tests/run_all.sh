#!/usr/bin/env bash
# The whole test suite: the MPI tests on 2 and 3 ranks, then the serial tests
# (last, so that the final line is one pytest summary).
#   bash tests/run_all.sh            # uses the venv next to the repository (.venv)
#   VENV=/path/to/venv bash tests/run_all.sh
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$root/.venv}"
py="$venv/bin/python"
mpiexec="$venv/bin/mpiexec"
for exe in "$py" "$mpiexec"; do
    if [[ ! -x "$exe" ]]; then
        echo "run_all.sh: $exe not found (create the venv: python3 -m venv .venv && .venv/bin/pip install -e \".[test]\")" >&2
        exit 2
    fi
done

cd "$root"
# A hung MPI job is killed after this many seconds (mpich's hydra reads it).
export MPIEXEC_TIMEOUT="${MPIEXEC_TIMEOUT:-600}"
# One torch thread per rank: the ranks share the machine.
export OMP_NUM_THREADS=1

run_mpi() {
    local n="$1" rc=0
    shift
    local paths=("$@")
    [[ ${#paths[@]} -gt 0 ]] || paths=(tests)
    echo "== mpiexec -n $n: pytest --with-mpi -m mpi ${paths[*]}"
    "$mpiexec" -n "$n" "$py" -m pytest --with-mpi -m mpi -q -p no:cacheprovider "${paths[@]}" || rc=$?
    # 5 = no test collected: not a failure
    if [[ "$rc" -ne 0 && "$rc" -ne 5 ]]; then
        echo "run_all.sh: the MPI tests failed on $n ranks (exit $rc)" >&2
        exit "$rc"
    fi
}

run_mpi 2
run_mpi 3
# the solver's P-independence at an even count that is not 2 (oversubscribed here)
run_mpi 4 tests/test_mgrit.py tests/test_mgrit_cycles.py tests/test_mgrit_gru.py
# strategy workers on 2 time ranks x 2 data groups (the test runs only on 4 ranks; ~10 s)
run_mpi 4 "tests/test_strategies.py::test_mgrit_time_ranks_compose_with_workers[mutex-2x2]" \
    "tests/test_strategies.py::test_mgrit_time_ranks_compose_with_workers[averaging-2x2]"
# the pure-torch path of the propagators and steppers (what runs where the fused
# C++ kernels cannot: no compiler, a GPU, a stacked or custom cell)
echo "== serial, torch path (MGRIT_GRU_KERNELS=0): pytest tests/test_model.py tests/test_mgrit_gru.py"
MGRIT_GRU_KERNELS=0 "$py" -m pytest -q -p no:cacheprovider tests/test_model.py tests/test_mgrit_gru.py
echo "== serial: pytest"
exec "$py" -m pytest -q tests
