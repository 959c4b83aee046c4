#!/usr/bin/env bash
# slurm_up.sh: a one-node SLURM cluster with accounting on this machine, for the tests.
#
#   munged -> mariadbd (unix socket only) -> slurmdbd -> slurmctld -> slurmd
#
# Node "localhost" (127.0.0.1) with every CPU, partition "debug" (the default). Run as root
# on Debian 12 (where it is tested): missing packages are installed with apt-get; no
# systemd is needed, the daemons are started here and stopped by slurm_down.sh (by their
# PIDs).
#
# Idempotent: when the cluster is already up with this script's configuration it returns
# at once and touches nothing (tests that share the cluster keep their jobs); a daemon
# that is down is started, and running daemons are restarted only when a configuration
# file changed. Ends when the node is idle and `srun hostname` works.
#
# Where things live: the configurations in /etc/slurm (where the SLURM commands look) and
# munge's key and socket where munge keeps them; everything else the cluster writes (PID
# files, logs, slurmctld's state, slurmd's spool, MariaDB's data) under $NORMBENCH_SLURM_DIR
# (default /var/lib/normbench-slurm). MariaDB's socket stays at its default path
# (/run/mysqld/mysqld.sock), where slurmdbd's client library looks for it: slurmdbd.conf
# has no option to name another.
#
# Environment: NORMBENCH_SLURM_DIR (above); NORMBENCH_SLURM_TIMEOUT (s, default 90) bounds
# the wait for the node.
set -euo pipefail

STATE=${NORMBENCH_SLURM_DIR:-/var/lib/normbench-slurm}
TIMEOUT=${NORMBENCH_SLURM_TIMEOUT:-90}
PARTITION=debug
NODE=localhost
DBPASS=normbench-slurmdbd   # MariaDB account for slurmdbd; the server has no network port
START=$(date +%s%N)

log() { local ds=$(( ($(date +%s%N) - START) / 100000000 )); printf '[slurm_up %3d.%ds] %s\n' $((ds / 10)) $((ds % 10)) "$*"; }
die() {
  log "ERROR: $*"
  for f in "$STATE"/log/{slurmctld,slurmd,slurmdbd,mariadbd}.log; do
    if [ -f "$f" ]; then echo "--- tail $f"; tail -n 15 "$f"; fi
  done
  exit 1
}
# alive PIDFILE COMM: the PID in PIDFILE is a running process named COMM (a PID reused by
# another program does not count)
alive() { local pid; [ -s "$1" ] && pid=$(cat "$1") && [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$2" ]; }
# stop PIDFILE COMM: SIGTERM that process (by its PID, never by name), SIGKILL after 15 s
stop() {
  if ! alive "$1" "$2"; then rm -f "$1"; return 0; fi
  local pid; pid=$(cat "$1"); kill "$pid"
  for _ in $(seq 150); do [ -d "/proc/$pid" ] || break; sleep 0.1; done
  if [ -d "/proc/$pid" ]; then kill -9 "$pid"; fi
  rm -f "$1"; log "stopped $2 (pid $pid) to apply the new configuration"
}
# foreign PIDFILE COMM: fail when a COMM runs that is not the one in PIDFILE: a cluster
# brought up some other way holds the ports (and /etc/slurm); it must be stopped first
foreign() {
  local own=""; alive "$1" "$2" && own=$(cat "$1")
  local pid
  for pid in $(pgrep -x "$2" || true); do
    if [ "$pid" != "$own" ]; then
      log "ERROR: $2 (pid $pid) runs but was not started by this script: stop it first"
      exit 1
    fi
  done
}
# wait_for SECONDS CMD...: until CMD succeeds
wait_for() { local n=$(( $1 * 5 )); shift; for _ in $(seq "$n"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done; return 1; }

[ "$(id -u)" = 0 ] || { echo "slurm_up.sh: run as root (it installs packages and starts daemons)" >&2; exit 1; }

# ---------------------------------------------------------------- 1. packages
pkgs=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt_log=$(mktemp /tmp/slurm_up.apt.XXXXXX.log)
  # The packages' own init scripts must not start their daemons (a mariadbd on the default
  # data folder would hold the socket ours needs): Debian's policy-rc.d, exit 101 =
  # "forbidden", for the time of the install, where there is none.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 0755 /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  # The package lists may be missing (a fresh container) or stale: update once, then install.
  apt-get update -q >"$apt_log" 2>&1 || { tail -n 20 "$apt_log"; die "apt-get update failed (log: $apt_log)"; }
  apt-get install -y -q --no-install-recommends "${missing[@]}" >>"$apt_log" 2>&1 \
    || { tail -n 20 "$apt_log"; die "apt-get install failed (log: $apt_log)"; }
  rm -f "$apt_log"
  if trap -p EXIT | grep -q policy-rc.d; then rm -f /usr/sbin/policy-rc.d; trap - EXIT; fi
  log "installed"
fi

# ---------------------------------------------------------------- 2. configuration
cpus=$(nproc)
mem_mb=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
# Why these settings:
# - accounting through slurmdbd: submitit (hydra/launcher=submitit_slurm) learns from
#   `sacct` that a job was cancelled, killed or timed out; without it `sacct` fails and the
#   sweep's driver waits forever for such a job.
# - KillWait=5: submitit's jobs ignore SIGTERM, so `scancel` and a time limit take effect
#   only at the SIGKILL that follows KillWait seconds later (the default is 30).
# - TaskPlugin=task/affinity: with task/none a job given 1 CPU still sees every core, and
#   the tests check that a run uses the CPUs its job was allotted.
# - NoCtldInAddrAny,NoInAddrAny with the node at 127.0.0.1: slurmctld and slurmd listen on
#   loopback only. slurmdbd (22.05) has no such option; DbdAddr names 127.0.0.1 for its
#   clients, and its traffic is munge-authenticated.
# - ReturnToService=2: a node that went down (a restart of slurmd) comes back by itself.
new_conf=$(cat <<CONF
# written by tests/cluster/slurm_up.sh: one node, loopback only
ClusterName=normbench
SlurmctldHost=localhost
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
CredType=cred/munge
SlurmUser=slurm
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobCompType=jobcomp/none
MailProg=/bin/true
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
KillWait=5
StateSaveLocation=$STATE/slurmctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
CONF
)
new_dbd=$(cat <<CONF
# written by tests/cluster/slurm_up.sh
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=slurm
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DBPASS
StorageLoc=slurm_acct_db
LogFile=$STATE/log/slurmdbd.log
PidFile=$STATE/run/slurmdbd.pid
CONF
)
conf_same() { [ "$(cat /etc/slurm/slurm.conf 2>/dev/null)" = "$new_conf" ] && [ "$(cat /etc/slurm/slurmdbd.conf 2>/dev/null)" = "$new_dbd" ]; }

# Already up with this configuration: nothing to do. No srun here: on a node busy with
# other tests' jobs it would wait for a free CPU.
if conf_same && alive /run/munge/munged.pid munged && alive "$STATE/mysql/mariadbd.pid" mariadbd \
  && alive "$STATE/run/slurmdbd.pid" slurmdbd && alive "$STATE/run/slurmctld.pid" slurmctld \
  && alive "$STATE/run/slurmd.pid" slurmd \
  && sinfo -h -n "$NODE" -o %T 2>/dev/null | grep -qxE '(idle|mixed|allocated|completing)'; then
  log "already up"
  exit 0
fi

for d in slurmctld slurmd slurmdbd; do foreign "$STATE/run/$d.pid" "$d"; done
foreign "$STATE/mysql/mariadbd.pid" mariadbd

install -d -m 0755 "$STATE"
install -d -o slurm -g slurm -m 0755 "$STATE/slurmctld" "$STATE/slurmd" "$STATE/log" "$STATE/run"
if [ ! -s /etc/munge/munge.key ]; then mungekey --create --keyfile=/etc/munge/munge.key; fi
chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key

if ! conf_same; then
  install -d /etc/slurm
  printf '%s\n' "$new_conf" >/etc/slurm/slurm.conf
  printf '%s\n' "$new_dbd" >/etc/slurm/slurmdbd.conf
  # running daemons read the old configuration: restart them
  stop "$STATE/run/slurmd.pid" slurmd; stop "$STATE/run/slurmctld.pid" slurmctld; stop "$STATE/run/slurmdbd.pid" slurmdbd
fi
# slurmdbd refuses a configuration file that others can read (it holds the password)
chown slurm:slurm /etc/slurm/slurmdbd.conf && chmod 0600 /etc/slurm/slurmdbd.conf

# ---------------------------------------------------------------- 3. daemons
if ! alive /run/munge/munged.pid munged; then
  install -d -o munge -g munge -m 0755 /run/munge
  runuser -u munge -- /usr/sbin/munged --force
  wait_for 10 bash -c 'munge -n | unmunge' || die "munged does not answer"
  log "munged started (pid $(cat /run/munge/munged.pid))"
fi

if ! alive "$STATE/mysql/mariadbd.pid" mariadbd; then
  install -d -o mysql -g root -m 0755 /run/mysqld   # its socket's folder
  if [ ! -d "$STATE/mysql/mysql" ]; then
    install -d -o mysql -g mysql -m 0750 "$STATE/mysql"
    mariadb-install-db --user=mysql --datadir="$STATE/mysql" >"$STATE/log/mariadb-install-db.log" 2>&1 \
      || die "mariadb-install-db failed (log: $STATE/log/mariadb-install-db.log)"
  fi
  # its log among the others', written by mariadbd as the mysql user
  touch "$STATE/log/mariadbd.log" && chown mysql:mysql "$STATE/log/mariadbd.log"
  # --skip-networking: the unix socket only; setsid: out of the caller's session, so that
  # Ctrl-C or the end of the caller's terminal does not reach it
  setsid /usr/sbin/mariadbd --user=mysql --datadir="$STATE/mysql" --skip-networking \
    --pid-file="$STATE/mysql/mariadbd.pid" --log-error="$STATE/log/mariadbd.log" \
    >/dev/null 2>&1 </dev/null &
  wait_for 30 mariadb -e "select 1" || die "mariadbd does not answer"
  log "mariadbd started (pid $(cat "$STATE/mysql/mariadbd.pid"), unix socket only)"
fi
mariadb -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DBPASS';
            ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$DBPASS';
            GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"

if ! alive "$STATE/run/slurmdbd.pid" slurmdbd; then
  /usr/sbin/slurmdbd
  wait_for 30 sacctmgr -n list cluster || die "slurmdbd does not answer"
  log "slurmdbd started (pid $(cat "$STATE/run/slurmdbd.pid"))"
fi

if ! alive "$STATE/run/slurmctld.pid" slurmctld; then
  /usr/sbin/slurmctld
  wait_for 30 bash -c 'scontrol ping | grep -q UP' || die "slurmctld does not answer"
  log "slurmctld started (pid $(cat "$STATE/run/slurmctld.pid"))"
fi

if ! alive "$STATE/run/slurmd.pid" slurmd; then
  /usr/sbin/slurmd -N "$NODE"
  wait_for 10 alive "$STATE/run/slurmd.pid" slurmd || die "slurmd did not start"
  log "slurmd started (pid $(cat "$STATE/run/slurmd.pid"))"
fi

# ---------------------------------------------------------------- 4. the node, idle
deadline=$(( $(date +%s) + TIMEOUT ))
while :; do
  state=$(sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n1)
  case "$state" in
    idle|mixed|allocated) break ;;
    drain*|down*|fail*) scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true ;;
  esac
  [ "$(date +%s)" -lt "$deadline" ] || die "node $NODE is '$state' after ${TIMEOUT}s"
  sleep 0.5
done
# slurmctld registers the cluster with slurmdbd on its first start; until then sacct
# knows no jobs of it
wait_for 30 bash -c 'sacctmgr -n -P list cluster format=cluster | grep -qx normbench' \
  || die "cluster not registered in slurmdbd"
out=$(timeout 30 srun -N1 -n1 -t 1 hostname 2>&1) || die "srun hostname failed: $out"
log "up: node $NODE is $state ($cpus CPUs, ${mem_mb} MB), partition $PARTITION; srun ok; state in $STATE"
