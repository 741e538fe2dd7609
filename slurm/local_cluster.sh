#!/usr/bin/env bash
# A Slurm cluster with accounting on this one host: what the Slurm tests and the demo submit to.
#
#   slurm/local_cluster.sh install   Debian packages (slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
#   slurm/local_cluster.sh start     write configs under $HD_SLURM_DIR (default /tmp/hd-slurm), start the daemons,
#                                    wait until the nodes are idle; re-runnable (running daemons are kept, so
#                                    `stop` first after changing HD_SLURM_NODES or the ports)
#   slurm/local_cluster.sh stop      stop every daemon by its pid file
#   slurm/local_cluster.sh status    daemons, sinfo, squeue
#
# HD_SLURM_NODES=N (default 2) presents N nodes on this one host: one slurmd per node (`slurmd -N name`, Debian's
# Slurm is built with multiple-slurmd support), named hdnode1..N and resolved to 127.0.0.1 by a line added to
# /etc/hosts, so that multi-node jobs (rank/node derivation, master address) run for real. Each virtual node
# advertises all of this host's CPUs (oversubscribed). HD_SLURM_NODES=1 gives one node named after this host.
#
# Why each choice:
# - Everything (configs, munge key, MariaDB datadir and socket, spool, logs, pid files) lives in the state dir, so
#   a system Slurm/munge/MariaDB, if any, is left alone; non-default ports avoid clashing with one.
# - Accounting (slurmdbd + MariaDB) is required: submitit reads job states with `sacct`, and without it
#   `job.result()` never sees a cancelled job end.
# - proctrack/linuxproc + task/none: containers here have no usable cgroup hierarchy.
# - /etc/slurm/slurm.conf is linked to the state dir's config (only if absent or already a link) so that plain
#   `sinfo`/`sbatch` work for every shell, test and job without exporting SLURM_CONF.
set -euo pipefail
export PATH=$PATH:/usr/sbin:/sbin # the daemons live there; a non-login root shell may lack it

DIR=${HD_SLURM_DIR:-/tmp/hd-slurm}
CLUSTER=hd
ACCOUNT=hd
CTLD_PORT=${HD_SLURM_CTLD_PORT:-16817}
SLURMD_PORT=${HD_SLURM_SLURMD_PORT:-16820} # node i listens on SLURMD_PORT + i
DBD_PORT=${HD_SLURM_DBD_PORT:-16819}
DB_PORT=${HD_SLURM_DB_PORT:-13306}
NODES=${HD_SLURM_NODES:-2}
DB_PASS=hd-slurm-local # the DB listens on 127.0.0.1 only; this is not a secret
ETC=$DIR/etc
RUN=$DIR/run
LOG=$DIR/log
# Slurm 22.05's clients ignore AuthInfo=socket= for slurmdbd connections, so munged serves the default socket.
MUNGE_SOCKET=/run/munge/munge.socket.2
MYSQL_SOCKET=$RUN/mysqld.sock
export SLURM_CONF=$ETC/slurm.conf # slurmdbd finds slurmdbd.conf next to it

PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
HOSTS_TAG="# hybrid-distill local Slurm nodes"

# "name:pidfile" of every daemon, in start order (stop goes in reverse); one slurmd per node.
daemons() {
    local f
    echo "munged:$RUN/munged.pid mariadbd:$RUN/mariadbd.pid slurmdbd:$RUN/slurmdbd.pid slurmctld:$RUN/slurmctld.pid"
    for f in "$RUN"/slurmd-*.pid; do [[ -e $f ]] && echo "slurmd:$f"; done
    true
}

node_names() {
    if ((NODES == 1)); then hostname -s; else seq -f "hdnode%g" 1 "$NODES"; fi
}

log() { echo "[local_cluster] $*"; }
die() {
    echo "[local_cluster] ERROR: $*" >&2
    exit 1
}

# Wait up to $1 seconds for command "${@:2}" to succeed.
wait_for() {
    local timeout=$1
    shift
    local t0=$SECONDS
    until "$@" >/dev/null 2>&1; do
        ((SECONDS - t0 < timeout)) || return 1
        sleep 1
    done
}

# Pid from a pid file if that process is alive and is the named daemon (a reused pid is not ours).
live_pid() {
    local name=$1 pidfile=$2 pid
    [[ -s $pidfile ]] || return 1
    pid=$(tr -dc '0-9' <"$pidfile")
    [[ -n $pid && -r /proc/$pid/comm ]] || return 1
    [[ $(cat "/proc/$pid/comm") == "$name"* ]] || return 1
    echo "$pid"
}

cmd_install() {
    local missing=()
    for bin in slurmctld slurmd sinfo munged slurmdbd mariadbd; do
        command -v "$bin" >/dev/null || missing+=("$bin")
    done
    if ((${#missing[@]} == 0)); then
        log "packages already installed (slurm $(dpkg-query -W -f="\${Version}" slurmctld))"
        return
    fi
    log "installing ${PACKAGES[*]} (missing: ${missing[*]})"
    local out
    out=$(mktemp)
    if ! { DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}"; } >"$out" 2>&1; then
        tail -30 "$out" >&2
        die "apt-get failed (full log: $out)"
    fi
    rm -f "$out"
    log "installed slurm $(dpkg-query -W -f="\${Version}" slurmctld)"
}

write_configs() {
    local host hw name i=0 node_lines=""
    host=$(hostname -s)
    # `slurmd -C` gives this host's real CPUs/sockets/cores/memory (first line, without NodeName).
    hw=$(slurmd -C | head -1 | sed 's/^NodeName=[^ ]* //')
    for name in $(node_names); do
        node_lines+="NodeName=$name NodeHostname=$host NodeAddr=127.0.0.1 Port=$((SLURMD_PORT + i)) $hw State=UNKNOWN"$'\n'
        i=$((i + 1))
    done
    mkdir -p "$ETC" "$RUN" "$LOG" "$DIR/ctld" "$DIR/munge"
    for name in $(node_names); do mkdir -p "$DIR/slurmd/$name"; done
    chmod 755 "$DIR" "$ETC" "$RUN" "$LOG"
    cat >"$ETC/slurm.conf" <<EOF
# Written by slurm/local_cluster.sh (a cluster on one host, for tests); edits are overwritten on start.
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
AuthType=auth/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/slurmd/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=600
InactiveLimit=0
SlurmdTimeout=120
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
JobCompType=jobcomp/none
${node_lines}PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    cat >"$ETC/slurmdbd.conf" <<EOF
# Written by slurm/local_cluster.sh.
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=hd_slurm_acct_db
EOF
    chmod 600 "$ETC/slurmdbd.conf" # slurmdbd refuses a readable one (it holds the DB password)
    if ((NODES > 1)) && ! grep -qF "$HOSTS_TAG" /etc/hosts; then
        [[ -w /etc/hosts ]] || die "cannot add the node names to read-only /etc/hosts: use HD_SLURM_NODES=1"
        [[ -z $(tail -c1 /etc/hosts) ]] || echo >>/etc/hosts # the file may lack a final newline
        echo "127.0.0.1 $(node_names | tr '\n' ' ')$HOSTS_TAG" >>/etc/hosts
    fi
    if [[ ! -e /etc/slurm/slurm.conf || -L /etc/slurm/slurm.conf ]]; then
        mkdir -p /etc/slurm
        ln -sfn "$ETC/slurm.conf" /etc/slurm/slurm.conf
    else
        log "/etc/slurm/slurm.conf is a real file: export SLURM_CONF=$ETC/slurm.conf to use this cluster"
    fi
}

munge_ok() { munge -n -S "$MUNGE_SOCKET" | unmunge -S "$MUNGE_SOCKET"; }

start_munged() {
    live_pid munged "$RUN/munged.pid" >/dev/null && return
    if munge_ok >/dev/null 2>&1; then # a system munged already serves the socket: any key works on one host
        log "using the munged already serving $MUNGE_SOCKET"
        return
    fi
    mkdir -p "$(dirname "$MUNGE_SOCKET")"
    chmod 700 "$DIR/munge"
    [[ -s $DIR/munge/munge.key ]] || mungekey -c -k "$DIR/munge/munge.key"
    chmod 400 "$DIR/munge/munge.key"
    munged --force --socket="$MUNGE_SOCKET" --key-file="$DIR/munge/munge.key" --pid-file="$RUN/munged.pid" \
        --log-file="$LOG/munged.log" --seed-file="$DIR/munge/munged.seed"
    wait_for 20 munge_ok || die "munged did not start (see $LOG/munged.log)"
}

sql() { mariadb --no-defaults --socket="$MYSQL_SOCKET" -u root -e "$1"; }

start_mariadb() {
    if ! live_pid mariadbd "$RUN/mariadbd.pid" >/dev/null; then
        if [[ ! -d $DIR/mysql/mysql ]]; then
            mariadb-install-db --no-defaults --user=root --datadir="$DIR/mysql" --skip-test-db \
                --auth-root-authentication-method=socket >"$LOG/mariadb-install.log" 2>&1 ||
                die "mariadb-install-db failed (see $LOG/mariadb-install.log)"
        fi
        # mariadbd does not daemonize: detach it; it writes its own pid file.
        setsid nohup mariadbd --no-defaults --user=root --datadir="$DIR/mysql" --socket="$MYSQL_SOCKET" \
            --pid-file="$RUN/mariadbd.pid" --port="$DB_PORT" --bind-address=127.0.0.1 \
            --log-error="$LOG/mariadb.log" --innodb-use-native-aio=0 --innodb-buffer-pool-size=64M \
            </dev/null >/dev/null 2>&1 &
    fi
    wait_for 60 sql "SELECT 1" || die "mariadbd did not start (see $LOG/mariadb.log)"
    sql "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
         CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
         GRANT ALL ON hd_slurm_acct_db.* TO 'slurm'@'127.0.0.1';
         GRANT ALL ON hd_slurm_acct_db.* TO 'slurm'@'localhost';"
}

start_slurmdbd() {
    live_pid slurmdbd "$RUN/slurmdbd.pid" >/dev/null || slurmdbd
    wait_for 60 sacctmgr -n list cluster || die "slurmdbd did not answer (see $LOG/slurmdbd.log)"
    # Register cluster and account once (sacctmgr -i: no prompt).
    if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
        sacctmgr -i add cluster "$CLUSTER" >/dev/null
    fi
    if ! sacctmgr -n -P list account format=account | grep -qx "$ACCOUNT"; then
        sacctmgr -i add account "$ACCOUNT" Cluster="$CLUSTER" Description="hybrid-distill" Organization=hd >/dev/null
    fi
    if ! sacctmgr -n -P list assoc user=root account="$ACCOUNT" format=user | grep -qx root; then
        sacctmgr -i add user root Account="$ACCOUNT" Cluster="$CLUSTER" >/dev/null
    fi
}

# States of all nodes, one word each (idle, down, drained, ...).
node_states() { sinfo -h -N -o %T | sort -u | tr '\n' ' '; }

start_slurm() {
    local name state t0=$SECONDS
    live_pid slurmctld "$RUN/slurmctld.pid" >/dev/null || slurmctld
    wait_for 30 scontrol ping || die "slurmctld did not start (see $LOG/slurmctld.log)"
    for name in $(node_names); do
        live_pid slurmd "$RUN/slurmd-$name.pid" >/dev/null || slurmd -N "$name"
    done
    while state=$(node_states) && [[ $state =~ (down|drain|unknown|not_responding|future|fail) || -z $state ]]; do
        if [[ $state =~ (down|drain) ]]; then # left over from an earlier run
            scontrol update NodeName="$(node_names | paste -sd,)" State=RESUME >/dev/null 2>&1 || true
        fi
        ((SECONDS - t0 < 60)) || die "nodes are '$state', not idle (see $LOG/slurmd-*.log, $LOG/slurmctld.log)"
        sleep 1
    done
}

cmd_start() {
    command -v slurmctld >/dev/null || die "Slurm is not installed: run '$0 install' first"
    write_configs
    start_munged
    start_mariadb
    start_slurmdbd
    start_slurm
    log "cluster '$CLUSTER' up: $(sinfo -h -o '%P %D %T %c CPUs')  (state dir $DIR)"
}

cmd_stop() {
    local d name pidfile pid
    for d in $(daemons | tr ' ' '\n' | tac); do
        name=${d%%:*}
        pidfile=${d#*:}
        pid=$(live_pid "$name" "$pidfile") || continue
        kill "$pid"
        wait_for 30 bash -c "! kill -0 $pid" || {
            log "$name ($pid) ignored SIGTERM; sending SIGKILL"
            kill -9 "$pid" 2>/dev/null || true
        }
        log "stopped $name ($pid)"
    done
}

cmd_status() {
    local d name pidfile pid rc=0
    for d in $(daemons); do
        name=${d%%:*}
        pidfile=${d#*:}
        if pid=$(live_pid "$name" "$pidfile"); then
            echo "$name: running (pid $pid, $pidfile)"
        elif [[ $name == munged ]] && munge_ok >/dev/null 2>&1; then
            echo "munged: running (not started by this script)"
        else
            echo "$name: stopped"
            rc=3
        fi
    done
    if ((rc == 0)); then
        sinfo
        squeue
    fi
    return $rc
}

case ${1:-} in
install) cmd_install ;;
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
*) die "usage: $0 {install|start|stop|status}" ;;
esac
