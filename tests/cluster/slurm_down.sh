#!/usr/bin/env bash
# slurm_down.sh: stop the one-node cluster that slurm_up.sh started: cancel its jobs, then
# stop slurmd, slurmctld, slurmdbd, mariadbd and munged, each by the PID in its PID file,
# checked against the process's name (a PID reused by another program is never signalled;
# nothing is killed by name). Idempotent: when the cluster is down it does nothing.
# Packages, configurations, the accounting database and the logs stay, under
# $NORMBENCH_SLURM_DIR (default /var/lib/normbench-slurm): slurm_up.sh reuses them.
# Run as root.
set -euo pipefail

STATE=${NORMBENCH_SLURM_DIR:-/var/lib/normbench-slurm}
START=$(date +%s)
log() { printf '[slurm_down %3ds] %s\n' "$(( $(date +%s) - START ))" "$*"; }
alive() { local pid; [ -s "$1" ] && pid=$(cat "$1") && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$2" ]; }
stopped=0
# stop PIDFILE COMM: SIGTERM, then SIGKILL after 15 s
stop() {
  if ! alive "$1" "$2"; then rm -f "$1"; return 0; fi
  local pid; pid=$(cat "$1")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 150); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
  if [ -d "/proc/$pid" ]; then kill -9 "$pid" 2>/dev/null || true; log "$2 (pid $pid) killed after 15 s"; fi
  rm -f "$1"
  log "stopped $2 (pid $pid)"
  stopped=$((stopped + 1))
}

[ "$(id -u)" = 0 ] || { echo "slurm_down.sh: run as root" >&2; exit 1; }

# Jobs first: a job's step (slurmstepd and its tasks) outlives slurmd.
if alive "$STATE/run/slurmctld.pid" slurmctld && alive "$STATE/run/slurmd.pid" slurmd; then
  jobs=$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ' || true)
  if [ -n "${jobs// /}" ]; then
    log "cancelling jobs: $jobs"
    # shellcheck disable=SC2086  # one argument per job id
    scancel $jobs 2>/dev/null || true
    for _ in $(seq 60); do [ -z "$(squeue -h -o %A 2>/dev/null || true)" ] && break; sleep 0.5; done
    left=$(squeue -h -o '%A %T' 2>/dev/null | tr '\n' ' ' || true)
    if [ -n "$left" ]; then log "warning: jobs still listed: $left"; fi
  fi
fi

stop "$STATE/run/slurmd.pid" slurmd
stop "$STATE/run/slurmctld.pid" slurmctld
stop "$STATE/run/slurmdbd.pid" slurmdbd
stop "$STATE/mysql/mariadbd.pid" mariadbd
stop /run/munge/munged.pid munged

if [ "$stopped" = 0 ]; then log "already down"; else log "down"; fi
