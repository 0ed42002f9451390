#!/usr/bin/env bash
# Stop what tests/slurm/start_slurm.sh STATE_DIR started (by the pid files in STATE_DIR, nothing else) and
# remove the slurm.conf / gres.conf it wrote. Safe to run twice.
set -uo pipefail

STATE=${1:?usage: stop_slurm.sh STATE_DIR}
MARK="# written by histoclip tests/slurm/start_slurm.sh"

stop_pid_file() {
    local file=$1 pid
    [ -s "$file" ] || return 0
    pid=$(cat "$file")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid"
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    fi
    rm -f "$file"
}

# jobs first (a killed slurmd leaves its job steps behind otherwise)
if command -v scancel >/dev/null && [ -s "$STATE/slurmctld.pid" ] && kill -0 "$(cat "$STATE/slurmctld.pid")" 2>/dev/null; then
    timeout 10 scancel --full --quiet --user "$(id -un)" 2>/dev/null || true
    for _ in $(seq 50); do [ -z "$(timeout 5 squeue -h 2>/dev/null)" ] && break; sleep 0.2; done
fi
stop_pid_file "$STATE/slurmd.pid"
stop_pid_file "$STATE/slurmctld.pid"
stop_pid_file "$STATE/munged.pid"
for conf in /etc/slurm/slurm.conf /etc/slurm/gres.conf; do
    if [ -e "$conf" ] && grep -qF "$MARK" "$conf"; then rm -f "$conf"; fi
done
exit 0
