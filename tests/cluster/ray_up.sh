#!/usr/bin/env bash
# ray_up.sh [NAMESPACE]: a one-node Ray cluster (head only) inside a network namespace
# that has only loopback (default name "nbray"). `ray start` binds every address it finds,
# so it is kept off the machine's network; the sweep's driver must run in the same
# namespace (`ip netns exec NAMESPACE normbench sweep hydra/launcher=ray
# hydra.launcher.ray.init.address=auto +hydra.launcher.ray.init.object_store_memory=null`).
# Each namespace has its own loopback, so clusters in different namespaces (concurrent
# test sessions) do not share ports.
#
# Idempotent: when Ray's head (gcs_server) already runs in the namespace it returns at once.
# Stop it with ray_down.sh NAMESPACE. Run as root (namespaces need it), with iproute2.
# Environment: RAY, the `ray` executable (default: the one on PATH, i.e. the environment's
# where normbench and hydra-ray-launcher are installed); RAY_NUM_CPUS (default 2).
set -euo pipefail

NS=${1:-nbray}
RAY=${RAY:-ray}
CPUS=${RAY_NUM_CPUS:-2}

[ "$(id -u)" = 0 ] || { echo "ray_up.sh: run as root (network namespaces need it)" >&2; exit 1; }
command -v ip >/dev/null || { echo "ray_up.sh: needs iproute2 (ip)" >&2; exit 1; }
command -v "$RAY" >/dev/null || { echo "ray_up.sh: no '$RAY' executable (pip install -e '.[ray]', or set RAY)" >&2; exit 1; }

if ip netns list | awk '{print $1}' | grep -qxF -- "$NS"; then
  for pid in $(ip netns pids "$NS"); do
    if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = gcs_server ]; then
      echo "[ray_up] already up in namespace $NS"
      exit 0
    fi
  done
else
  ip netns add "$NS"
fi
ip netns exec "$NS" ip link set lo up
# no dashboard, no usage report: nothing to reach outside the namespace anyway
out=$(ip netns exec "$NS" "$RAY" start --head --port 6379 --num-cpus "$CPUS" \
  --include-dashboard=false --disable-usage-stats 2>&1) || { printf '%s\n' "$out" >&2; echo "ray_up.sh: ray start failed" >&2; exit 1; }
echo "[ray_up] up in namespace $NS ($CPUS CPUs, loopback only)"
