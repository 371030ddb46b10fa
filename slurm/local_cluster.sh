#!/usr/bin/env bash
# A real one-machine SLURM cluster on loopback, with two emulated nodes (n1, n2), for tests and for
# trying the sbatch scripts without a cluster. Needs root (apt, munged, slurmd).
#
#   slurm/local_cluster.sh start   # installs slurm-wlm + munge if missing, starts munged, slurmctld, 2 slurmd
#   slurm/local_cluster.sh env     # prints the export line that points sbatch/squeue/scontrol at it
#   slurm/local_cluster.sh stop    # stops the daemons this script started (by PID), nothing else
#
# Everything lives under $LATENTLOOM_SLURM_DIR (default /tmp/latentloom-slurm): slurm.conf, state,
# spool, logs, PID files. Clients find the cluster through SLURM_CONF=$LATENTLOOM_SLURM_DIR/slurm.conf.
# Each node offers $LATENTLOOM_SLURM_CPUS CPUs (default 1, so the two fit on a 2-core machine).
set -euo pipefail

DIR="${LATENTLOOM_SLURM_DIR:-/tmp/latentloom-slurm}"
CPUS="${LATENTLOOM_SLURM_CPUS:-1}"
CONF="$DIR/slurm.conf"
HOST="$(hostname -s)"

log() { echo "[local_cluster] $*" >&2; }

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
        return
    fi
    log "installing slurm-wlm and munge with apt"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null \
        || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null; }
}

write_conf() {
    mkdir -p "$DIR/state" "$DIR/log" "$DIR/spool/n1" "$DIR/spool/n2"
    cat > "$CONF" <<CONF
ClusterName=latentloom
SlurmctldHost=${HOST}(127.0.0.1)
SlurmctldPort=6817
SlurmdPort=6818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SchedulerParameters=bf_interval=1,sched_interval=2
ReturnToService=2
JobRequeue=1
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=600
NodeName=n1 NodeHostname=${HOST} NodeAddr=127.0.0.1 Port=17001 CPUs=${CPUS} RealMemory=4000 State=UNKNOWN
NodeName=n2 NodeHostname=${HOST} NodeAddr=127.0.0.1 Port=17002 CPUs=${CPUS} RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
CONF
}

start_munge() {
    if [ -f "$DIR/munged.pid" ] && kill -0 "$(cat "$DIR/munged.pid")" 2>/dev/null; then
        return
    fi
    if pgrep -x munged >/dev/null; then
        log "munged is already running (not ours): using it"
        return
    fi
    if [ ! -s /etc/munge/munge.key ]; then
        log "creating /etc/munge/munge.key"
        (mungekey --create 2>/dev/null || create-munge-key -f) >/dev/null
        chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/latentloom-munged.pid
    for _ in $(seq 50); do [ -f /run/munge/latentloom-munged.pid ] && break; sleep 0.1; done
    cp /run/munge/latentloom-munged.pid "$DIR/munged.pid"
}

wait_for_nodes() {
    for _ in $(seq 120); do
        states="$(SLURM_CONF="$CONF" sinfo -h -N -o '%N %T' 2>/dev/null | sort -u || true)"
        if [ "$(echo "$states" | grep -c -E ' (idle|mixed|allocated)$' || true)" = 2 ]; then
            log "nodes up: $(echo "$states" | tr '\n' ' ')"
            return 0
        fi
        sleep 0.5
    done
    log "the nodes did not come up; see $DIR/log"
    SLURM_CONF="$CONF" sinfo -N >&2 || true
    return 1
}

start() {
    install
    mkdir -p "$DIR"
    write_conf
    start_munge
    if ! { [ -f "$DIR/slurmctld.pid" ] && kill -0 "$(cat "$DIR/slurmctld.pid")" 2>/dev/null; }; then
        slurmctld -f "$CONF" -i   # -i: ignore state left by an earlier cluster in $DIR
    fi
    for node in n1 n2; do
        if ! { [ -f "$DIR/slurmd-$node.pid" ] && kill -0 "$(cat "$DIR/slurmd-$node.pid")" 2>/dev/null; }; then
            slurmd -f "$CONF" -N "$node"
        fi
    done
    wait_for_nodes
    echo "export SLURM_CONF=$CONF"
}

stop() {
    for name in slurmd-n1 slurmd-n2 slurmctld munged; do
        pidfile="$DIR/$name.pid"
        if [ -f "$pidfile" ]; then
            pid="$(cat "$pidfile")"
            if kill "$pid" 2>/dev/null; then
                for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
                log "stopped $name ($pid)"
            fi
            rm -f "$pidfile"
        fi
    done
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 start|stop|env" >&2; exit 2 ;;
esac
