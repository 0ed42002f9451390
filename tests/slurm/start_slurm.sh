#!/usr/bin/env bash
# Start a single-node SLURM cluster on this machine (localhost) to try the workflow's SLURM profile for real:
# munged, slurmctld and slurmd, partitions `cpu` (default) and `gpu`, as root.
#
#   tests/slurm/start_slurm.sh STATE_DIR     # then: sbatch/squeue/scontrol work; tests/slurm/stop_slurm.sh STATE_DIR
#
# Installs Debian's slurmctld, slurmd, slurm-client and munge when they are missing (apt-get). Writes
# /etc/slurm/slurm.conf (and gres.conf) marked as ours: the executor plugin drops SLURM_CONF before it calls
# srun, so the configuration must be at the default path. It refuses to touch a slurm.conf it did not write
# or to start when a slurmctld is already running. Everything else (state, spool, logs, pid files, the job
# completion log) lives in STATE_DIR. The node gets a GPU *count* (GRES gpu:1, no device file) so that jobs
# asking for `--gpus=1` are scheduled onto the `gpu` partition exactly as on a cluster; they run on the CPU.
# Accounting is off (no slurmdbd): use `--slurm-status-command squeue`; finished jobs stay visible in
# `scontrol show job` for MinJobAge (1 h) and are appended to STATE_DIR/jobcomp.log.
set -euo pipefail

STATE=${1:?usage: start_slurm.sh STATE_DIR}
MARK="# written by histoclip tests/slurm/start_slurm.sh"
CONF=/etc/slurm/slurm.conf
GRES=/etc/slurm/gres.conf

HERE=$(cd "$(dirname "$0")" && pwd)
STARTED=0
die() {
    echo "start_slurm.sh: $*" >&2
    # leave nothing half-started behind (only what this run started: its pid files in STATE_DIR)
    if [ "$STARTED" = 1 ]; then bash "$HERE/stop_slurm.sh" "$STATE" >/dev/null 2>&1 || true; fi
    exit 1
}

[ "$(id -u)" -eq 0 ] || die "must run as root (it installs packages and starts daemons)"
mkdir -p "$STATE"
STATE=$(cd "$STATE" && pwd)

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
    || ! command -v munged >/dev/null; then
    command -v apt-get >/dev/null || die "SLURM is not installed and there is no apt-get to install it"
    echo "installing slurmctld slurmd slurm-client munge (apt-get)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge >"$STATE/apt.log" 2>&1 || die "apt-get install failed: see $STATE/apt.log"
fi
SLURMCTLD=$(command -v slurmctld)
SLURMD=$(command -v slurmd)
MUNGED=$(command -v munged)

for conf in "$CONF" "$GRES"; do
    if [ -e "$conf" ] && ! grep -qF "$MARK" "$conf"; then
        die "$conf exists and was not written by this script: refusing to replace a real cluster's configuration"
    fi
done
if pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null; then
    die "a slurmctld or slurmd is already running; stop it first (tests/slurm/stop_slurm.sh STATE_DIR)"
fi

# munge: reuse a running munged, else start one and remember that we did
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
        chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
    fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    STARTED=1
    runuser -u munge -- "$MUNGED" --force
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n | unmunge >/dev/null || die "munged did not start (see /var/log/munge/munged.log)"
    cp /run/munge/munged.pid "$STATE/munged.pid"   # ours to stop
fi

CPUS=$(nproc)
MEM_MB=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.95}' /proc/meminfo)
rm -rf "$STATE/ctld" "$STATE/spool"   # a fresh cluster: no drained node or old job remembered
mkdir -p "$STATE/ctld" "$STATE/spool"
cat >"$CONF" <<CONF
$MARK (state: $STATE)
ClusterName=histoclip-test
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/jobcomp.log
ReturnToService=2
MinJobAge=3600
SchedulerParameters=sched_interval=1
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB Gres=gpu:1 State=UNKNOWN
PartitionName=cpu Nodes=localhost Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=localhost Default=NO MaxTime=INFINITE State=UP
CONF
cat >"$GRES" <<CONF
$MARK
NodeName=localhost Name=gpu File=/dev/null Count=1
CONF

STARTED=1
"$SLURMCTLD" -c || die "slurmctld did not start; see $STATE/slurmctld.log"
"$SLURMD" -N localhost || die "slurmd did not start; see $STATE/slurmd.log"
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
state=""
for _ in $(seq 100); do
    sleep 0.2
    alive "$STATE/slurmctld.pid" || die "slurmctld stopped: $(grep -m1 fatal "$STATE/slurmctld.log" || tail -1 "$STATE/slurmctld.log")"
    alive "$STATE/slurmd.pid" || die "slurmd stopped: $(grep -m1 fatal "$STATE/slurmd.log" || tail -1 "$STATE/slurmd.log")"
    state=$(timeout 5 sinfo -h -N -o %t 2>/dev/null | head -1 || true)
    case "$state" in idle*|mix*|alloc*) break ;; esac
done
case "$state" in
    idle*|mix*|alloc*) echo "SLURM is up: node localhost ($CPUS CPUs, $MEM_MB MB, gpu:1), partitions cpu (default), gpu; state in $STATE" ;;
    *) die "the node did not become idle (state '$state'); see $STATE/slurmctld.log and $STATE/slurmd.log" ;;
esac
