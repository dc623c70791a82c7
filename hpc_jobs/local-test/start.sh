#!/usr/bin/env bash
# Start a single-node SLURM on this machine for testing hpc_jobs/ (a dev aid,
# not used by CI; needs root and Debian's slurm-wlm: see README.md).
#   sudo bash hpc_jobs/local-test/start.sh     # then sinfo, sbatch ...
#   sudo bash hpc_jobs/local-test/stop.sh
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
for exe in munged slurmctld slurmd scontrol; do
    command -v "$exe" >/dev/null || { echo "start.sh: $exe not found (apt-get install slurm-wlm)" >&2; exit 2; }
done

for pidfile in /run/slurm-local/slurmctld.pid /run/slurm-local/slurmd.pid; do
    if [[ -s "$pidfile" ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        echo "start.sh: already running ($pidfile); stop.sh first" >&2
        exit 1
    fi
done

host="$(hostname -s)"
# This node's line as slurmd itself sees it (CPUs, sockets, cores, memory).
node_line="$(slurmd -C | head -n 1 | sed -E 's/ RealMemory=[0-9]+//') RealMemory=4000 State=UNKNOWN"
mkdir -p /etc/slurm /var/spool/slurm-local/ctld /var/spool/slurm-local/d \
    /run/slurm-local /var/log/slurm-local
sed -e "s/^SlurmctldHost=.*/SlurmctldHost=$host/" \
    -e "s/^NodeName=.*/$node_line/" \
    -e "s/^PartitionName=debug Nodes=[^ ]*/PartitionName=debug Nodes=$host/" \
    "$here/slurm.conf" > /etc/slurm/slurm.conf
[[ -n "${TASK_PLUGIN:-}" ]] && sed -i "s|^TaskPlugin=.*|TaskPlugin=$TASK_PLUGIN|" /etc/slurm/slurm.conf

# munge: a key (the Debian package makes one), its run directory, the daemon.
if [[ ! -s /etc/munge/munge.key ]]; then
    if command -v mungekey >/dev/null; then mungekey --create; else create-munge-key; fi
fi
mkdir -p /run/munge && chown munge:munge /run/munge
pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged

slurmctld
slurmd
for _ in $(seq 30); do
    scontrol ping 2>/dev/null | grep -q UP && break
    sleep 1
done
scontrol update nodename="$host" state=resume 2>/dev/null || true
sinfo
