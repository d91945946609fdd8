#!/bin/bash
# A study of base_model.study as a Slurm array: one task per run, then one job that writes the report.
#   bash configs/slurm_study.sh configs/study/timesteps.yaml [sbatch options...]
# Run 0 goes first (it builds the shared data cache and, when missing, the FD feature model); the other
# runs follow as an array; the last job finds every run cached and writes study.json and study.html.
# A task that fails or is preempted leaves its checkpoint: submitting again resumes it and skips the
# runs already done (each is cached by a hash of its config under the study's output_dir/runs/).
set -euo pipefail
CONFIG=${1:?usage: bash configs/slurm_study.sh configs/study/NAME.yaml [sbatch options...]}
shift
N=$(python -m base_model.study --config "$CONFIG" --list | wc -l)
OPTS=(--cpus-per-task=2 --time=04:00:00 --output=runs/slurm-study-%A_%a.out "$@")
WRAP="export OMP_NUM_THREADS=2; python -m base_model.study --config $CONFIG"
first=$(sbatch --parsable "${OPTS[@]}" --job-name=study-first --wrap="$WRAP --run_index 0")
after=$first
if [ "$N" -gt 1 ]; then
  array=$(sbatch --parsable "${OPTS[@]}" --job-name=study-runs --dependency=afterok:$first --array=1-$((N - 1)) \
    --wrap="$WRAP --run_index \$SLURM_ARRAY_TASK_ID")
  after=$array
fi
sbatch "${OPTS[@]}" --job-name=study-report --dependency=afterok:$after --wrap="$WRAP"
echo "submitted $N runs of $CONFIG (first $first)"
