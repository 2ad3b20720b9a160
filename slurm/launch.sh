# The body every slurm/*.sh shares; they source it after their #SBATCH lines. Not a job script itself.
# One task per node: `srun` starts `python -m aligntI.slurm` on each node, which turns SLURM's variables
# (nodes, node index, GPUs per node, job id) into a `torchrun` with c10d rendezvous on the first node.
# CPU-only jobs (no GPUs allocated) say how many ranks a node runs: `NPROC_PER_NODE=2 sbatch ...`.
# sbatch passes the submitting shell's environment on: submit with the project's venv active.
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:?submit with sbatch from the repository root}"

# Run "$@" (a script and its arguments) on every node of the allocation and return its exit status.
run_on_nodes() {
  srun --ntasks-per-node=1 --kill-on-bad-exit=1 --wait=60 python -m aligntI.slurm -- "$@"
}

# Train a recipe on every node: $1 = recipe YAML, the rest = dotted.key=value overrides. The run directory is
# the recipe's; each job appends a line to its slurm_jobs.log. On USR1 (`#SBATCH --signal=B:USR1@<s>` before the
# time limit, or `scancel --batch --signal=USR1 <job>` by hand) the run checkpoints after its current step and
# stops, and the job requeues itself: the same job then resumes from that checkpoint (resume: auto).
train_recipe() {
  local recipe=$1
  shift
  local run_dir
  run_dir=$(python -m aligntI.slurm run-dir "$recipe" "$@")
  mkdir -p "$run_dir"
  rm -f "$run_dir/stop_request"  # a request is for the job that received the signal, not for its restart
  echo "$(date -Is) job ${SLURM_JOB_ID} restart ${SLURM_RESTART_COUNT:-0} nodes ${SLURM_JOB_NODELIST}" \
    >> "$run_dir/slurm_jobs.log"
  local stop_requested=0
  trap 'stop_requested=1; touch "$run_dir/stop_request"; echo "[slurm] USR1: $run_dir checkpoints and stops"' USR1
  run_on_nodes recipes/train.py --config "$recipe" "$@" &
  local step=$! rc=0
  while true; do
    wait "$step" && rc=0 || rc=$?
    # Over 128 with the step still alive: the trap interrupted `wait`, not the step ending.
    if [ "$rc" -gt 128 ] && kill -0 "$step" 2>/dev/null; then continue; fi
    break
  done
  trap - USR1
  if [ "$stop_requested" = 1 ] && [ "$rc" = 0 ] && [ ! -f "$run_dir/final/config.json" ]; then
    echo "[slurm] requeueing job ${SLURM_JOB_ID}: it resumes from the checkpoint in $run_dir/checkpoints"
    scontrol requeue "$SLURM_JOB_ID"
    sleep 600  # SLURM ends this shell as part of the requeue
  fi
  return "$rc"
}
