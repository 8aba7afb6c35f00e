#!/usr/bin/env bash
# local_slurm.sh - a real SLURM "cluster" of TWO emulated nodes on this one machine
# (a private munged + slurmctld + two slurmd from Debian's slurm-wlm), for tests and for
# trying tools/submit.py. Based on shared/cluster/local-slurm.sh, extended to two nodes and
# made private: its config, state, logs, munge socket and ports are its own, so it does not
# touch /etc/slurm or a munged / SLURM that someone else runs on the machine.
#
# Usage (as root):
#   slurm_setup/local_slurm.sh install   install slurmctld slurmd slurm-client munge if missing
#   slurm_setup/local_slurm.sh start     write the config, start the daemons, wait until both
#                                    nodes are idle; prints `export SLURM_CONF=...`
#   slurm_setup/local_slurm.sh stop      cancel this cluster's jobs, stop ONLY the daemons this
#                                    script started (the PIDs it recorded in the state dir)
#   slurm_setup/local_slurm.sh status    recorded daemons, sinfo, squeue
#   slurm_setup/local_slurm.sh up        start, print "READY SLURM_CONF=<path>", then stay in the
#                                    foreground and stop everything when stdin closes or on
#                                    TERM/INT/HUP (test fixtures: the cluster cannot outlive
#                                    the process that holds our stdin)
#
# Environment knobs:
#   LOCAL_SLURM_DIR=/tmp/dist_ssl-slurm  state dir: slurm.conf, pids, logs, spool, munge socket
#   LOCAL_SLURM_TIMEOUT=90               seconds to wait for readiness / for jobs to drain
#   LOCAL_SLURM_CPUS_PER_NODE=1          CPUs of each emulated node (2 nodes x 1 = this
#                                        2-core machine: jobs never share a CPU)
#   LOCAL_SLURM_CRED_EXPIRE=10           credential lifetime (s); a requeued job becomes
#                                        eligible again after this (Slurm default 120)
#   LOCAL_SLURM_CTLD_PORT / LOCAL_SLURM_NODE_PORT  first ports to try (16817 / 17001; node2
#                                        uses NODE_PORT+1); busy ports are skipped in steps of 100
#
# Node names node1, node2 must resolve: `start` adds "127.0.0.1 node1 node2" to /etc/hosts
# when they do not. Job processes run as root on this host; both "nodes" share its filesystem.
set -u
set +m   # no job control: `setsid` then execs in place and $! is the daemon's own PID

PROG=local_slurm.sh
DIR=${LOCAL_SLURM_DIR:-/tmp/dist_ssl-slurm}
TIMEOUT=${LOCAL_SLURM_TIMEOUT:-90}
CPUS=${LOCAL_SLURM_CPUS_PER_NODE:-1}
CRED_EXPIRE=${LOCAL_SLURM_CRED_EXPIRE:-10}
NODES="node1 node2"
CONF=$DIR/slurm.conf
RUN=$DIR/run
LOGS=$DIR/log
MUNGE_DIR=$DIR/munge
MUNGE_SOCK=$MUNGE_DIR/munge.socket
PKGS="slurmctld slurmd slurm-client munge"
export PATH="$PATH:/usr/sbin:/sbin"
export SLURM_CONF=$CONF

log() { echo "[$PROG] $*" >&2; }
die() { echo "[$PROG] ERROR: $*" >&2; exit 1; }
need_root() { [ "$(id -u)" = 0 ] || die "must run as root (uid is $(id -u))"; }

# ---------------------------------------------------------------- PID bookkeeping
# pid_alive NAME COMM: print the recorded PID and succeed if that process still runs as COMM
pid_alive() {
    local f="$RUN/$1.pid" pid
    [ -s "$f" ] || return 1
    pid=$(cat "$f" 2>/dev/null)
    case "$pid" in ''|*[!0-9]*) return 1;; esac
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] || return 1   # gone, or PID reused
    grep -q '^State:.*Z' "/proc/$pid/status" 2>/dev/null && return 1
    echo "$pid"
}

# start_bg NAME COMM LOGFILE CMD...: start CMD detached in its own session, record its PID
start_bg() {
    local name=$1 comm=$2 out=$3 pid i; shift 3
    setsid "$@" >>"$out" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$RUN/$name.pid"
    for i in $(seq 1 50); do
        [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$comm" ] && return 0
        [ -d "/proc/$pid" ] || break
        sleep 0.1
    done
    log "$name did not start (pid $pid); last lines of $out:"
    tail -n 20 "$out" >&2
    return 1
}

# stop_one NAME COMM: TERM the recorded PID, KILL it after 15 s; never anything else
stop_one() {
    local pid i
    pid=$(pid_alive "$1" "$2") || { rm -f "$RUN/$1.pid"; return 0; }
    log "stopping $1 (pid $pid)"
    kill -TERM "$pid" 2>/dev/null
    for i in $(seq 1 30); do
        pid_alive "$1" "$2" >/dev/null || break
        sleep 0.5
    done
    if pid_alive "$1" "$2" >/dev/null; then
        log "$1 (pid $pid) ignored TERM; sending KILL"
        kill -KILL "$pid" 2>/dev/null
    fi
    rm -f "$RUN/$1.pid"
}

# ---------------------------------------------------------------- install
have_binaries() {
    local b
    for b in slurmctld slurmd sbatch srun scontrol sinfo squeue scancel munged munge unmunge; do
        command -v "$b" >/dev/null 2>&1 || return 1
    done
}

cmd_install() {
    have_binaries && return 0
    need_root
    command -v apt-get >/dev/null 2>&1 || die "SLURM is not installed and there is no apt-get"
    log "installing $PKGS (Debian slurm-wlm)"
    local t0=$SECONDS apt_log=/tmp/dist_ssl-slurm-apt.log
    export DEBIAN_FRONTEND=noninteractive
    # shellcheck disable=SC2086  # PKGS is a fixed word list
    if ! apt-get install -y -q --no-install-recommends $PKGS >"$apt_log" 2>&1; then
        apt-get update -q >>"$apt_log" 2>&1
        apt-get install -y -q --no-install-recommends $PKGS >>"$apt_log" 2>&1 \
            || { tail -n 20 "$apt_log" >&2; die "apt-get install $PKGS failed (log: $apt_log)"; }
    fi
    have_binaries || die "installed $PKGS but some SLURM/munge commands are still missing"
    log "installed in $((SECONDS - t0)) s"
}

# ---------------------------------------------------------------- config
# port_busy PORT: something listens on PORT (IPv4 or IPv6), read from /proc/net/tcp*
port_busy() {
    local hex
    hex=$(printf ':%04X' "$1")
    awk -v p="$hex" '$4 == "0A" && substr($2, length($2) - 4) == p {found = 1} END {exit !found}' \
        /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

pick_ports() {
    local c=${LOCAL_SLURM_CTLD_PORT:-16817} n=${LOCAL_SLURM_NODE_PORT:-17001} i
    for i in $(seq 0 20); do
        port_busy $((c + 100 * i)) || { CTLD_PORT=$((c + 100 * i)); break; }
    done
    for i in $(seq 0 20); do
        if ! port_busy $((n + 100 * i)) && ! port_busy $((n + 100 * i + 1)); then
            NODE_PORT=$((n + 100 * i)); break
        fi
    done
    [ -n "${CTLD_PORT:-}" ] && [ -n "${NODE_PORT:-}" ] || die "no free ports near $c / $n"
}

ensure_hosts() {
    local name missing=""
    for name in $HOST $NODES; do
        getent hosts "$name" >/dev/null 2>&1 || missing="$missing $name"
    done
    [ -z "$missing" ] && return 0
    log "adding '127.0.0.1$missing' to /etc/hosts (emulated node names must resolve)"
    [ -z "$(tail -c 1 /etc/hosts 2>/dev/null)" ] || echo >>/etc/hosts   # file lacked a final newline
    echo "127.0.0.1$missing" >>/etc/hosts || die "cannot write /etc/hosts"
}

write_config() {
    local mem
    mem=$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024 / 4 ))
    cat >"$CONF.tmp" <<EOF
# generated by slurm_setup/local_slurm.sh -- rewritten on every start
ClusterName=distssl
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCK,cred_expire=$CRED_EXPIRE
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$RUN/slurmctld.internal.pid
SlurmdPidFile=$RUN/slurmd-%n.internal.pid
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
SlurmctldDebug=info
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdDebug=info
SlurmdLogFile=$LOGS/slurmd-%n.log
MailProg=/bin/true
KillWait=5
MinJobAge=600
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=node[1-2] NodeHostname=$HOST NodeAddr=127.0.0.1 Port=[$NODE_PORT-$((NODE_PORT + 1))] CPUs=$CPUS RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
    mv -f "$CONF.tmp" "$CONF"
}

# ---------------------------------------------------------------- munge (private socket)
munge_ok() { munge -S "$MUNGE_SOCK" -n 2>/dev/null | unmunge -S "$MUNGE_SOCK" >/dev/null 2>&1; }

start_munge() {
    pid_alive munged munged >/dev/null && munge_ok && return 0
    [ -s /etc/munge/munge.key ] || die "/etc/munge/munge.key is missing (reinstall the munge package)"
    install -d -o munge -g munge -m 0755 "$MUNGE_DIR"
    log "starting munged (socket $MUNGE_SOCK)"
    start_bg munged munged "$LOGS/munged.console" \
        setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged --foreground \
        --socket="$MUNGE_SOCK" --pid-file="$MUNGE_DIR/munged.pid" \
        --seed-file="$MUNGE_DIR/munged.seed" --log-file="$MUNGE_DIR/munged.log" || return 1
    local i
    for i in $(seq 1 50); do munge_ok && return 0; sleep 0.2; done
    log "munged runs but munge/unmunge fails; last lines of its log:"
    tail -n 20 "$MUNGE_DIR/munged.log" >&2
    return 1
}

# ---------------------------------------------------------------- start / stop
node_states() { sinfo -h -N -o '%N %t' 2>/dev/null | sort -u; }

wait_nodes_idle() {
    local deadline=$1 st
    while :; do
        st=$(node_states)
        [ "$(echo "$st" | grep -c ' idle$')" = 2 ] && return 0
        if echo "$st" | grep -qE ' (drain|drng|down|fail)'; then
            # left over from an earlier run of this state dir: return the nodes to service
            scontrol update NodeName=node[1-2] State=RESUME >/dev/null 2>&1
        fi
        pid_alive slurmctld slurmctld >/dev/null || die "slurmctld died; see $LOGS/slurmctld.log"
        pid_alive node1 slurmd >/dev/null || die "slurmd node1 died; see $LOGS/slurmd-node1.log"
        pid_alive node2 slurmd >/dev/null || die "slurmd node2 died; see $LOGS/slurmd-node2.log"
        if [ $SECONDS -ge "$deadline" ]; then
            log "timeout after ${TIMEOUT}s: node states: $(echo "$st" | tr '\n' ' ')"
            sinfo -R >&2
            tail -n 15 "$LOGS/slurmctld.log" "$LOGS"/slurmd-node*.log >&2
            exit 1
        fi
        sleep 0.3
    done
}

cmd_start() {
    need_root
    have_binaries || die "SLURM is not installed; run: $0 install"
    local t0=$SECONDS
    HOST=$(hostname -s 2>/dev/null || hostname)
    [ -n "$HOST" ] || die "cannot determine the host name"
    mkdir -p "$DIR" "$RUN" "$LOGS" "$DIR/state" "$DIR/spool/node1" "$DIR/spool/node2"
    chmod 755 "$DIR"     # munged runs as user munge and must reach $MUNGE_DIR
    ensure_hosts
    if pid_alive slurmctld slurmctld >/dev/null; then
        log "this state dir's cluster is already running"; cmd_status >&2
        echo "export SLURM_CONF=$CONF"; return 0
    fi
    pick_ports
    write_config
    start_munge || die "munge does not work"
    log "starting slurmctld (port $CTLD_PORT)"
    start_bg slurmctld slurmctld "$LOGS/slurmctld.console" /usr/sbin/slurmctld -D -i -c \
        || die "slurmctld failed to start (see $LOGS/slurmctld.log)"
    local deadline=$((t0 + TIMEOUT))
    until scontrol ping 2>/dev/null | grep -q 'is UP'; do
        pid_alive slurmctld slurmctld >/dev/null || { tail -n 25 "$LOGS/slurmctld.log" >&2; die "slurmctld died"; }
        [ $SECONDS -ge $deadline ] && die "timeout: slurmctld does not answer 'scontrol ping'"
        sleep 0.3
    done
    local n
    for n in $NODES; do
        log "starting slurmd $n"
        start_bg "$n" slurmd "$LOGS/slurmd-$n.console" /usr/sbin/slurmd -D -N "$n" \
            || die "slurmd $n failed to start (see $LOGS/slurmd-$n.log)"
    done
    wait_nodes_idle "$deadline"
    log "ready in $((SECONDS - t0)) s: node1 node2 idle, $CPUS CPU(s) each, partition debug"
    echo "export SLURM_CONF=$CONF"
}

cmd_stop() {
    need_root
    local i jobs
    if pid_alive slurmctld slurmctld >/dev/null; then
        jobs=$(squeue -h -o '%i' 2>/dev/null | tr '\n' ' ')
        if [ -n "${jobs// /}" ]; then
            log "cancelling jobs: $jobs"
            # shellcheck disable=SC2086  # job ids from squeue
            scancel $jobs 2>/dev/null
            for i in $(seq 1 40); do
                [ -z "$(squeue -h -t R,CG -o '%i' 2>/dev/null)" ] && break
                sleep 0.5
            done
        fi
    fi
    stop_one node1 slurmd
    stop_one node2 slurmd
    kill_stray_stepds
    stop_one slurmctld slurmctld
    stop_one munged munged
    log "stopped"
}

# slurmstepd processes of THIS cluster (their environment names our slurm.conf) that outlived
# their slurmd, e.g. a job that ignored cancellation: kill them and their direct children
kill_stray_stepds() {
    local pid pids=""
    for pid in $(pgrep -x slurmstepd 2>/dev/null); do
        tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | grep -qxF "SLURM_CONF=$CONF" && pids="$pids $pid"
    done
    [ -z "$pids" ] && return 0
    log "killing leftover slurmstepd of this cluster:$pids"
    for pid in $pids; do
        kill -KILL $(pgrep -P "$pid") "$pid" 2>/dev/null
    done
}

cmd_status() {
    local rc=0 n pid
    for n in munged:munged slurmctld:slurmctld node1:slurmd node2:slurmd; do
        if pid=$(pid_alive "${n%%:*}" "${n##*:}"); then
            echo "${n%%:*}: running (pid $pid)"
        else
            echo "${n%%:*}: not running"; rc=3
        fi
    done
    if [ $rc = 0 ]; then echo "SLURM_CONF=$CONF"; sinfo; squeue; fi
    return $rc
}

cmd_up() {
    need_root
    # never adopt a cluster started by `start`: on exit, up stops what it started, nothing else
    pid_alive slurmctld slurmctld >/dev/null && die "a cluster already runs in $DIR (stop it first)"
    trap cmd_stop EXIT
    trap 'exit 143' TERM
    trap 'exit 130' INT
    trap 'exit 129' HUP
    cmd_start >/dev/null
    echo "READY SLURM_CONF=$CONF"
    # hold the cluster until our parent closes stdin (or dies), or a signal arrives
    while read -r _; do :; done
}

case "${1:-start}" in
    install) cmd_install;;
    start)   cmd_start;;
    stop)    cmd_stop;;
    status)  cmd_status;;
    up)      cmd_up;;
    -h|--help|help) sed -n '2,32p' "$0";;
    *) echo "usage: $0 install|start|stop|status|up" >&2; exit 2;;
esac
