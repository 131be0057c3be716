#!/usr/bin/env bash
# A real single-node Slurm cluster with accounting (munge, mariadb + slurmdbd, slurmctld, slurmd),
# all on loopback under one state directory. Idempotent.
#   bash slurm/local_cluster.sh start|stop|status|env
# Afterwards: `eval "$(bash slurm/local_cluster.sh env)"` sets SLURM_CONF for sinfo/sbatch/submitit.
# State lives in $ADM_SLURM_BASE (default /tmp/adm-slurm; every parent must be world-executable for munge).
set -euo pipefail
BASE=${ADM_SLURM_BASE:-/tmp/adm-slurm}
CLUSTER=adm
DB_PORT=${ADM_SLURM_DB_PORT:-3307}
CTLD_PORT=${ADM_SLURM_CTLD_PORT:-6817}
SLURMD_PORT=${ADM_SLURM_SLURMD_PORT:-6818}
DBD_PORT=${ADM_SLURM_DBD_PORT:-6819}
NODE=$(hostname -s)
log() { printf '[slurm-local] %s\n' "$*" >&2; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

install_packages() {
  local need=()
  for p in slurmctld slurmd slurm-client munge slurmdbd mariadb-server; do
    dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
  done
  [ ${#need[@]} -eq 0 ] && return 0
  log "installing ${need[*]} (about 30 s)"
  local made_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then  # keep package scripts from starting system daemons
    printf '#!/bin/sh\nexit 101\n' | as_root tee /usr/sbin/policy-rc.d >/dev/null
    as_root chmod +x /usr/sbin/policy-rc.d
    made_policy=1
  fi
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurmctld slurmd slurm-client munge slurmdbd mariadb-server libpmix-dev >/dev/null
  [ $made_policy = 1 ] && as_root rm -f /usr/sbin/policy-rc.d
  return 0
}

write_configs() {
  mkdir -p "$BASE"/{munge,state,spool,log,run,db}
  chmod 755 "$BASE"; chmod 711 "$BASE/munge"
  local mem
  mem=$(slurmd -C 2>/dev/null | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -1)
  mem=$(( ${mem:-4096} * 9 / 10 ))
  local cpus; cpus=$(nproc)
  cat > "$BASE/slurm.conf" <<CONF
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$BASE/munge/munge.socket.2,cred_expire=5
AccountingStoragePass=$BASE/munge/munge.socket.2
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
JobAcctGatherType=jobacct_gather/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
JobRequeue=1
ReturnToService=2
KillWait=5
MailProg=/bin/true
MpiDefault=none
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
SlurmdParameters=config_overrides
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd.log
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$(( cpus * 2 )) RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP DefMemPerCPU=512 PriorityTier=1 GraceTime=30
PartitionName=urgent Nodes=$NODE MaxTime=INFINITE State=UP DefMemPerCPU=512 PriorityTier=2 PreemptMode=OFF
CONF
  cat > "$BASE/slurmdbd.conf" <<CONF
AuthType=auth/munge
AuthInfo=socket=$BASE/munge/munge.socket.2
DbdHost=$NODE
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
PidFile=$BASE/run/slurmdbd.pid
LogFile=$BASE/log/slurmdbd.log
CONF
  chmod 600 "$BASE/slurmdbd.conf"
}

# A pid file names our daemon only while that pid runs the expected program and is not a zombie: after a
# crash, or on a machine restored from a snapshot, the file outlives the daemon and its pid may belong to anything.
alive() {
  local want pid; want=$(basename "$1" .pid); [ "$want" = mariadb ] && want=mariadbd
  [ -f "$1" ] || return 1
  pid=$(cat "$1")
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$want" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$pid/status" 2>/dev/null
}

# Say that a daemon did not come up, with the end of its log, and fail.
failed() { log "$1 did not answer; the end of $BASE/log/$1.log:"; tail -n 20 "$BASE/log/$1.log" >&2; return 1; }

# Wait up to $1 seconds for the command after it to succeed.
wait_for() {
  local tries=$(( $1 * 10 )); shift
  for _ in $(seq "$tries"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  return 1
}

start() {
  install_packages
  write_configs
  export SLURM_CONF="$BASE/slurm.conf"
  if ! alive "$BASE/run/munged.pid"; then
    [ -f "$BASE/munge/munge.key" ] || mungekey --create --keyfile="$BASE/munge/munge.key" >/dev/null 2>&1 \
      || dd if=/dev/urandom of="$BASE/munge/munge.key" bs=1024 count=1 2>/dev/null
    chmod 400 "$BASE/munge/munge.key"
    munged --key-file="$BASE/munge/munge.key" --socket="$BASE/munge/munge.socket.2" \
      --pid-file="$BASE/run/munged.pid" --log-file="$BASE/log/munged.log" --seed-file="$BASE/munge/munge.seed" --force
  fi
  if ! alive "$BASE/run/mariadb.pid"; then
    if [ ! -d "$BASE/db/mysql" ]; then
      mariadb-install-db --user=root --datadir="$BASE/db" --auth-root-authentication-method=normal >/dev/null 2>&1
      local init=1
    fi
    rm -f "$BASE/run/mysqld.sock"  # a dead server's socket would look ready and refuse connections
    (mariadbd --user=root --datadir="$BASE/db" --port="$DB_PORT" --bind-address=127.0.0.1 \
       --socket="$BASE/run/mysqld.sock" --pid-file="$BASE/run/mariadb.pid" \
       --log-error="$BASE/log/mariadb.log" >/dev/null 2>&1 &)
    wait_for 60 mariadb-admin --socket="$BASE/run/mysqld.sock" -uroot ping \
      || failed mariadb
    mariadb --socket="$BASE/run/mysqld.sock" -uroot -e \
      "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
       GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;" >/dev/null
  fi
  if ! alive "$BASE/run/slurmdbd.pid"; then
    slurmdbd  # reads slurmdbd.conf beside $SLURM_CONF
    wait_for 30 sacctmgr -n list cluster \
      || failed slurmdbd
    sacctmgr -n list cluster format=cluster 2>/dev/null | grep -qw "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null
  fi
  # -c: start without saved job state. `stop` cancels every job anyway, and a job left COMPLETING by an
  # unclean stop (a step that would not die) otherwise keeps the node from coming up for up to an hour.
  alive "$BASE/run/slurmctld.pid" || slurmctld -c -f "$BASE/slurm.conf"
  alive "$BASE/run/slurmd.pid" || slurmd -f "$BASE/slurm.conf"
  local deadline=$(( SECONDS + 60 ))
  while [ $SECONDS -lt $deadline ]; do
    sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)' && { log "up: $(sinfo -h -o '%P %t %c CPUs' | tr '\n' ' ')"; return 0; }
    scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
    sleep 0.2
  done
  log "the node did not come up; logs in $BASE/log"; return 1
}

stop() {
  export SLURM_CONF="$BASE/slurm.conf"
  if alive "$BASE/run/slurmctld.pid"; then scancel --full --quiet -u "$(id -un)" 2>/dev/null || true; sleep 1; fi
  for f in slurmd slurmctld slurmdbd mariadb munged; do
    if alive "$BASE/run/$f.pid"; then kill -TERM "$(cat "$BASE/run/$f.pid")" 2>/dev/null || true; fi
  done
  for _ in $(seq 100); do
    any=0; for f in slurmd slurmctld slurmdbd mariadb munged; do alive "$BASE/run/$f.pid" && any=1; done
    [ $any = 0 ] && break; sleep 0.1
  done
  for f in slurmd slurmctld slurmdbd mariadb munged; do
    alive "$BASE/run/$f.pid" && kill -KILL "$(cat "$BASE/run/$f.pid")" 2>/dev/null || true
  done
  # a step that would not die: this cluster's only (its slurmd's environment, or a file of its open), never
  # another cluster's on the same machine (a second state directory, as tests and users may run)
  for pid in $(pgrep -f "^slurmstepd" 2>/dev/null); do
    if tr '\0' '\n' < "/proc/$pid/environ" 2>/dev/null | grep -qxF "SLURM_CONF=$BASE/slurm.conf" \
        || ls -l "/proc/$pid/fd" 2>/dev/null | grep -qF " $BASE/"; then
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  log "stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) export SLURM_CONF="$BASE/slurm.conf"; sinfo ;;
  env) echo "export SLURM_CONF=$BASE/slurm.conf" ;;
  *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
