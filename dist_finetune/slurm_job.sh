# dist_finetune's SLURM job, sourced by scripts/slurm_single_node.sbatch and
# scripts/slurm_multi_node.sbatch after they set SLURM_SCRIPT (the name in log lines) and MULTI_NODE
# (1: one `accelerate launch` per node with machine ranks and a rendezvous address; 0: one node).
# It ships inside the package because sbatch runs a copy of the batch script from its spool
# directory, where no file beside the script can be found; the scripts find this one the way
# `python -m dist_finetune` finds the package.
#
# What it does: pick GPUs (or CPU processes) per node, build the `accelerate launch` command, run it
# on every node through srun, pass a stop signal on to the training processes as SIGUSR1 (they save
# a checkpoint and exit 42), and requeue the job after SIGUSR1 (the time-limit warning), never after
# SIGTERM (scancel, the time limit itself, preemption: the job is meant to stop, and SLURM requeues
# a preempted job itself where it is configured to).
# shellcheck shell=bash

log() { printf '[%(%F %T)T] [%s] %s\n' -1 "$SLURM_SCRIPT" "$*"; }

if (( MULTI_NODE )); then
    NNODES=${SLURM_NNODES:-1}
    where="$NNODES node(s): ${SLURM_JOB_NODELIST:-?}"
else
    NNODES=1
    where=${SLURM_JOB_NODELIST:-$(hostname)}
fi
log "job $SLURM_JOB_ID (${SLURM_JOB_NAME:-}) start #${SLURM_RESTART_COUNT:-0}" \
    "(SLURM_RESTART_COUNT=${SLURM_RESTART_COUNT:-0}) on $where"

# ---- devices: GPUs per node, or CPU processes per node --------------------------------------
gpus_found=0
if [[ ${SLURM_GPUS_ON_NODE:-0} =~ ^[1-9][0-9]*$ ]]; then
    gpus_found=$SLURM_GPUS_ON_NODE
elif command -v nvidia-smi >/dev/null 2>&1; then
    gpus_found=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ') || gpus_found=0
fi
case ${DIST_FINETUNE_CPU:-auto} in
    1 | true | yes) use_cpu=1 ;;
    0 | false | no) use_cpu=0 ;;
    *) use_cpu=$(( gpus_found == 0 )) ;;
esac
if (( gpus_found > 0 )); then default_procs=$gpus_found; else default_procs=1; fi
GPUS_PER_NODE=${GPUS_PER_NODE:-$default_procs}
if (( use_cpu )); then
    export ACCELERATE_USE_CPU=1   # gloo ranks on CPU; without it each process is rank 0 of 1
fi
NUM_PROCESSES=$(( NNODES * GPUS_PER_NODE ))
# Derived from the job id so that jobs sharing a node do not collide.
MAIN_PROCESS_PORT=${MAIN_PROCESS_PORT:-$(( 20000 + SLURM_JOB_ID % 10000 ))}

# ---- rendezvous: first node of the allocation ------------------------------------------------
if (( MULTI_NODE )) && [[ -z ${MAIN_PROCESS_IP:-} ]]; then
    mapfile -t hosts < <(scontrol show hostnames "${SLURM_JOB_NODELIST:-}" 2>/dev/null)
    head_node=${hosts[0]:-${SLURMD_NODENAME:-$(hostname)}}
    # Node names need not resolve; the controller knows each node's address.
    MAIN_PROCESS_IP=$(scontrol show node "$head_node" 2>/dev/null |
                      sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p') || true
    MAIN_PROCESS_IP=${MAIN_PROCESS_IP%%$'\n'*}
    MAIN_PROCESS_IP=${MAIN_PROCESS_IP:-$head_node}
fi

# ---- the command every node runs ---------------------------------------------------------------
launch=(accelerate launch)
if [[ -n ${ACCELERATE_CONFIG:-} ]]; then
    launch+=(--config_file "$ACCELERATE_CONFIG")
elif (( NUM_PROCESSES > 1 )); then
    launch+=(--multi_gpu)
fi
if (( MULTI_NODE )); then
    launch+=(--num_machines "$NNODES" --num_processes "$NUM_PROCESSES"
             --main_process_ip "$MAIN_PROCESS_IP" --main_process_port "$MAIN_PROCESS_PORT")
else
    launch+=(--num_processes "$GPUS_PER_NODE" --main_process_port "$MAIN_PROCESS_PORT")
fi
subcommand=train what=training
if [[ ${1:-} == predict ]]; then
    subcommand=predict what=prediction
    shift
fi
job=(-m dist_finetune "$subcommand" "$@")
if [[ $subcommand == train ]]; then   # a prediction has no checkpoint to resume from
    resume=1
    for arg in "$@"; do [[ $arg == --resume || $arg == --resume=* ]] && resume=0; done
    (( resume )) && job+=(--resume latest)
fi

# On SIGTERM torch's elastic agent (inside accelerate launch) passes the signal to its workers and
# kills them after this many seconds; give a checkpoint the whole of SLURM's KillWait instead.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-300}

# On each node `accelerate launch` ignores SIGUSR1 (it has no handler and would die, taking its
# workers down mid-checkpoint); SLURM signals every process of the step, so the workers receive it
# directly and dist_finetune's own handler replaces the inherited "ignore". srun runs the step so
# that it can forward signals to all of its processes; on several nodes each gets its machine rank.
if (( MULTI_NODE )); then
    # shellcheck disable=SC2016  # expanded by the bash that srun starts on each node, not here
    node_cmd='trap "" USR1
printf -v cmd " %q" "$1" "$2" --machine_rank "$SLURM_NODEID" "${@:3}"
echo "[slurm_multi_node] node $SLURM_NODEID of $SLURM_NNODES ($SLURMD_NODENAME):$cmd"
exec "$1" "$2" --machine_rank "$SLURM_NODEID" "${@:3}"'
    srun_opts=(--nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --label)
    log "rendezvous $MAIN_PROCESS_IP:$MAIN_PROCESS_PORT; $NNODES node(s) x $GPUS_PER_NODE process(es)" \
        "= world size $NUM_PROCESSES on $( (( use_cpu )) && echo CPU || echo GPU)"
else
    # shellcheck disable=SC2016  # expanded by the bash that srun starts, not here
    node_cmd='trap "" USR1
printf -v cmd " %q" "$@"
echo "[slurm_single_node] ($SLURMD_NODENAME):$cmd"
exec "$@"'
    srun_opts=(--nodes=1 --ntasks=1)
    log "$GPUS_PER_NODE process(es) on $( (( use_cpu )) && echo CPU || echo GPU), port $MAIN_PROCESS_PORT"
fi
# Since Slurm 22.05 srun no longer inherits --cpus-per-task from the job; pass it on.
[[ -n ${SLURM_CPUS_PER_TASK:-} ]] && srun_opts+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")

# ---- preemption: forward the signal, then requeue ----------------------------------------------
preempted=
interrupted=0
# shellcheck disable=SC2317  # called through the traps below
on_signal() {
    interrupted=1
    preempted=$1
    log "got SIG$1: asking the training processes to checkpoint and stop (SIGUSR1)"
    if [[ -n ${srun_pid:-} ]]; then kill -USR1 "$srun_pid" 2>/dev/null || true; fi   # srun forwards it
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

srun "${srun_opts[@]}" bash -c "$node_cmd" node "${launch[@]}" "${job[@]}" &
srun_pid=$!
while :; do   # a trapped signal interrupts `wait`; keep waiting for srun itself
    interrupted=0 rc=0
    wait "$srun_pid" || rc=$?
    (( interrupted )) || break
done

if (( rc == 0 )); then
    log "$what finished"
    exit 0
fi
if [[ $subcommand == predict && -n $preempted ]]; then
    # a requeued prediction would start over, and at a time limit do so forever
    log "prediction stopped by SIG$preempted (exit $rc), not requeued: resubmit it with a longer --time"
    exit "$rc"
fi
if [[ $preempted == TERM ]]; then
    log "training stopped by SIGTERM (exit $rc): checkpoint saved, job not requeued (cancelled, timed out or" \
        "preempted); the same command resumes it"
    exit "$rc"
fi
# accelerate launch turns the workers' exit code 42 into 1, so a forwarded signal counts as well.
# A prediction is never requeued, whatever its exit code: it has no checkpoint to resume from.
if [[ $subcommand != predict ]] && { (( rc == 42 )) || [[ -n $preempted ]]; }; then
    log "training stopped (exit $rc, signal ${preempted:-none}); requeueing job $SLURM_JOB_ID"
    if scontrol requeue "$SLURM_JOB_ID"; then
        exit 0
    fi
    log "scontrol requeue failed (job cancelled, or not requeueable); resubmit to resume"
    exit "$rc"
fi
log "$what failed with exit code $rc"
exit "$rc"
