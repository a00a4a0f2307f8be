# Body shared by launch/pretrain.sbatch and launch/finetune.sbatch: sourced from the repository
# root after they set ENTRY, CONFIG, OVERRIDES, GPUS_PER_NODE, LAUNCHER, PYTHON and LOG_DIR.
#
# Launchers (LAUNCHER):
#   srun       (default) one SLURM task per GPU running the entry point directly. SLURM owns every
#              rank: no ssh, no launcher process that could swallow the warning signal or kill the
#              ranks on a 30 s timer while they save; m2r.dist maps SLURM_PROCID/NTASKS/LOCALID to
#              RANK/WORLD_SIZE/LOCAL_RANK.
#   deepspeed  the DeepSpeed launcher, one per node (srun, one task per node) with a hostfile from
#              launch/hostfile.sh and --no_ssh --node_rank=$SLURM_NODEID: no ssh/pdsh needed. The
#              launchers ignore USR1 so that only the ranks act on it.
#
# Preemption and time limits: SLURM sends USR1 to this shell before the time limit
# (#SBATCH --signal=B:USR1@<margin>). We pass it on to the job step; srun delivers it to every
# process of the step. The trainer raises a flag, all ranks agree at the next step boundary, save a
# checkpoint and exit 0. Then we requeue the job: it restarts with SLURM_RESTART_COUNT + 1 and the
# trainer resumes from the newest checkpoint (run.resume=latest is the default). A USR1 sent to the
# ranks alone does the same (they say so in $M2R_STOP_FILE).

set -euo pipefail

log() { echo "[$(date '+%F %T')] $*"; }
die() { echo "[$(date '+%F %T')] error: $*" >&2; exit 2; }

# Installed first: bash's default action for USR1 would end the job without a requeue.
warned=0
step_pid=
resender_pid=
forward_warning() {
    warned=1
    log "time-limit warning (USR1): asking the trainer to checkpoint and stop"
    if [[ -n $step_pid ]]; then
        kill -USR1 "$step_pid" 2>/dev/null || true
        # Ranks still starting Python ignore USR1 until the trainer's handler is installed: say it again
        # every 5 s until the step has ended (the trainer acts on the first one it sees).
        if [[ -z $resender_pid ]]; then
            ( trap "" USR1; while sleep 5 && kill -USR1 "$step_pid" 2>/dev/null; do :; done ) &
            resender_pid=$!
        fi
    fi
}
trap forward_warning USR1

requeue() {
    log "requeueing job $SLURM_JOB_ID: it resumes from the newest checkpoint"
    local attempt
    for attempt in 1 2 3 4 5; do   # a busy controller answers "Socket timed out" now and then
        if scontrol requeue "$SLURM_JOB_ID"; then exit 0; fi
        sleep $((attempt * 5))
    done
    die "scontrol requeue $SLURM_JOB_ID failed 5 times: resubmit; the run resumes from its newest checkpoint"
}

restart=${SLURM_RESTART_COUNT:-0}
[[ -n ${SLURM_JOB_ID:-} ]] || die "not inside a SLURM job: submit with sbatch (see README, 'SLURM clusters')"
[[ -f $ENTRY ]] || die "entry point '$ENTRY' not found in $PWD: submit from the repository root or set M2R_ROOT"
[[ $CONFIG == m2r:* || -f $CONFIG ]] ||
    die "CONFIG='$CONFIG' not found in $PWD (a shipped one: m2r:${ENTRY%.py}/<x>.yaml)"
[[ $LAUNCHER == srun || $LAUNCHER == deepspeed ]] || die "LAUNCHER='$LAUNCHER' must be 'srun' or 'deepspeed'"
read -r -a overrides <<< "$OVERRIDES"   # expanded as ${overrides[@]+...}: bash < 4.4 calls an empty one unset

# Ranks per node: one per GPU of the allocation; a CPU-only allocation runs its tasks per node.
if [[ -z $GPUS_PER_NODE ]]; then
    if [[ ${SLURM_GPUS_ON_NODE:-0} -gt 0 ]]; then
        GPUS_PER_NODE=$SLURM_GPUS_ON_NODE
    else
        GPUS_PER_NODE=${SLURM_NTASKS_PER_NODE:-1}
    fi
fi
cpus_per_rank=${SLURM_CPUS_PER_TASK:-1}

# Rank 0 runs on the first node of the allocation, where this script runs too: the port is picked
# free here. NodeAddr is the address SLURM itself uses for the node (the host name on most clusters).
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
head_addr=$(scontrol show node "$head_node" --oneliner | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2 || true)
export MASTER_ADDR=${head_addr:-$head_node}
export MASTER_PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')
# A RANK exported by the submitting shell would make every srun task believe it is that rank.
unset RANK WORLD_SIZE LOCAL_RANK

# The GPUs do the math: one OpenMP thread per rank leaves the cores to the data workers.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
# Compute nodes are often offline; with a hub tag open_clip would retry for about 46 s first.
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}

mkdir -p "$LOG_DIR"
run_log="$LOG_DIR/${SLURM_JOB_NAME}-${SLURM_JOB_ID}.restart${restart}.log"
# Rank 0 writes here the signal that stopped an unfinished run (m2r/engine/run.py): a USR1 sent to the
# ranks only (scancel --signal=USR1 without --batch) asks for a requeue too, though our trap never saw it.
export M2R_STOP_FILE="$LOG_DIR/${SLURM_JOB_NAME}-${SLURM_JOB_ID}.restart${restart}.stop"
rm -f "$M2R_STOP_FILE"
log "job $SLURM_JOB_ID restart $restart: $SLURM_JOB_NUM_NODES node(s) x $GPUS_PER_NODE rank(s), launcher $LAUNCHER," \
    "master $MASTER_ADDR:$MASTER_PORT"
log "  $ENTRY --config $CONFIG ${OVERRIDES}"
log "  trainer log: $run_log"

# Each launcher execs srun, so that $! below is srun itself: srun passes signals on to its tasks.
# Ranks are placed in blocks (consecutive ranks on a node): DeepSpeed's expert-parallel groups are consecutive
# ranks, and their every-step all-to-all should stay within a node.
# Task counts are given in full: srun inside the job inherits SLURM_NTASKS, which would otherwise
# override --ntasks-per-node.
# The ranks start with USR1 ignored (inherited through exec) until the trainer installs its handler,
# first thing in the entry point: a warning forwarded while Python starts must not kill a rank.
launch_srun() {
    exec srun --kill-on-bad-exit=1 --nodes="$SLURM_JOB_NUM_NODES" --ntasks=$((SLURM_JOB_NUM_NODES * GPUS_PER_NODE)) \
        --ntasks-per-node="$GPUS_PER_NODE" --cpus-per-task="$cpus_per_rank" --distribution=block:block \
        bash -c 'trap "" USR1; exec "$@"' rank "$PYTHON" "$ENTRY" --config "$CONFIG" ${overrides[@]+"${overrides[@]}"}
}

launch_deepspeed() {
    local hostfile="$LOG_DIR/${SLURM_JOB_NAME}-${SLURM_JOB_ID}.hostfile"
    bash launch/hostfile.sh "$GPUS_PER_NODE" > "$hostfile"
    # SLURM_NODEID must expand on each node, hence the inner bash; `trap "" USR1` is inherited
    # through exec by the launchers, while the trainer installs its own handler.
    exec srun --kill-on-bad-exit=1 --nodes="$SLURM_JOB_NUM_NODES" --ntasks="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 \
        --cpus-per-task=$((GPUS_PER_NODE * cpus_per_rank)) \
        bash -c 'trap "" USR1; exec "$1" -m deepspeed.launcher.runner --hostfile "$2" --no_ssh \
                 --node_rank "$SLURM_NODEID" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "${@:3}"' \
        deepspeed-node "$PYTHON" "$hostfile" "$ENTRY" --config "$CONFIG" ${overrides[@]+"${overrides[@]}"}
}

if (( warned )); then requeue; fi  # warned before anything started: nothing to save
"launch_$LAUNCHER" >> "$run_log" 2>&1 &
step_pid=$!
if (( warned )); then forward_warning; fi  # warned while the step was being started
# A trapped signal interrupts `wait`; keep waiting until the step has really ended.
status=0
wait "$step_pid" || status=$?
while kill -0 "$step_pid" 2>/dev/null; do
    status=0
    wait "$step_pid" || status=$?
done
if [[ -n $resender_pid ]]; then kill "$resender_pid" 2>/dev/null || true; fi
log "training step exited with status $status"

# Requeue only a run the warning stopped, saved and unfinished (the trainer says so in $M2R_STOP_FILE):
# a failing one would fail again, slot after slot, and a finished one has nothing left to do.
stopped_by=$(cat "$M2R_STOP_FILE" 2>/dev/null || true)
if (( status == 0 )) && [[ $stopped_by == SIGUSR1 ]]; then
    log "the ranks stopped on SIGUSR1 before the end of the run"
    requeue
fi
exit "$status"
