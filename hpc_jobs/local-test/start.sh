#!/usr/bin/env bash
# Start a single-node SLURM on this machine for testing hpc_jobs/ (a dev aid,
# and CI's SLURM, .ci/run; needs root and Debian's slurm-wlm: see README.md).
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
rm -f /run/slurm-local/munged.ours
if ! pgrep -x munged >/dev/null; then
    runuser -u munge -- /usr/sbin/munged
    touch /run/slurm-local/munged.ours     # stop.sh ends munged only if we started it
fi

slurmctld
slurmd
up=0
for _ in $(seq 30); do
    scontrol ping 2>/dev/null | grep -q UP && { up=1; break; }
    sleep 1
done
if [[ "$up" != 1 ]]; then
    echo "start.sh: slurmctld does not answer after 30 s (see /var/log/slurm-local/)" >&2
    exit 1
fi
scontrol update nodename="$host" state=resume 2>/dev/null || true
# the node registers with the controller shortly after slurmd starts
for _ in $(seq 30); do
    sinfo -h -o %t 2>/dev/null | grep -Eq '^(idle|mix|alloc)' && break
    sleep 1
done
sinfo
