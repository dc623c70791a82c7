#!/usr/bin/env bash
# Stop the daemons started by start.sh (by their pid files, nothing else).
set -uo pipefail

stop() {  # stop NAME PIDFILE
    local pid
    [[ -s "$2" ]] || return 0
    pid="$(cat "$2")"
    kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || { echo "stopped $1 ($pid)"; return 0; }; sleep 0.5; done
    # A daemon stuck on a failed job step ignores SIGTERM.
    kill -9 "$pid" 2>/dev/null && echo "killed $1 ($pid) after 10 s"
}
stop slurmd /run/slurm-local/slurmd.pid
stop slurmctld /run/slurm-local/slurmctld.pid
if [[ -e /run/slurm-local/munged.ours ]]; then
    stop munged /run/munge/munged.pid
    rm -f /run/slurm-local/munged.ours
fi
