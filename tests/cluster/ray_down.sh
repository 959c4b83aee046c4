#!/usr/bin/env bash
# ray_down.sh [NAMESPACE]: stop the Ray cluster that ray_up.sh started in NAMESPACE
# (default "nbray") and delete the namespace. Every process in the namespace is killed by
# its PID (`ip netns pids`); never `ray stop`, which kills every Ray process on the
# machine by name, other sessions' included. Idempotent: no namespace, nothing to do.
# Run as root.
set -euo pipefail

NS=${1:-nbray}
[ "$(id -u)" = 0 ] || { echo "ray_down.sh: run as root" >&2; exit 1; }
if ! ip netns list | awk '{print $1}' | grep -qxF -- "$NS"; then
  echo "[ray_down] no namespace $NS: already down"
  exit 0
fi
# SIGKILL: nothing of this throwaway cluster needs saving
for pid in $(ip netns pids "$NS"); do kill -9 "$pid" 2>/dev/null || true; done
for _ in $(seq 50); do [ -z "$(ip netns pids "$NS")" ] && break; sleep 0.1; done
ip netns del "$NS"
echo "[ray_down] down: namespace $NS deleted"
