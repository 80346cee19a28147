#!/bin/bash
# A Slurm batch script that runs a training under hpcrun.  Submit with:  sbatch slurm_job.sh
# Copy it next to your train.py, adjust the #SBATCH lines, and point HPCRUN at your copy of
# hpcrun.py.  On a login node, `./hpcrun.sh monitor` (no directory: it serves every work dir a
# wrap registered) or the cron line `./hpcrun.sh cron` prints reports the end.
#
#SBATCH --job-name=train
#SBATCH --time=01:00:00
#SBATCH --output=slurm-%j.out
##SBATCH --gres=gpu:1
#
# Optional early warning: Slurm sends SIGUSR1 to the batch shell 300 s (give or take 60 s)
# before the time limit.  "B:" is required: without it the signal goes only to job steps
# started with srun, and with the exec below there are none.  hpcrun notes the warning and
# keeps running; add `--forward-signal USR1` to the wrap line if your training saves a
# checkpoint on SIGUSR1 (Python's default action for it is to exit).  Remove one "#" to enable.
##SBATCH --signal=B:USR1@300

HPCRUN="${HPCRUN:-$HOME/hpcrun.py}"

# Set up the training's environment here, for example:
# module load python/3.10
# source ~/venvs/train/bin/activate

# Why exec: with proctrack/cgroup (Slurm's default and recommended setting) a time limit or
# scancel sends SIGTERM only to the batch shell, the direct child of slurmstepd.  A wrapper
# started as an ordinary line of this script is the shell's child: the shell dies on the
# SIGTERM, and slurmstepd SIGKILLs everything left in the job at once.  The wrapper gets no
# warning and leaves no record, so the login node never hears about the job.
# With exec the wrapper replaces the shell: it IS the process that gets the SIGTERM, and it
# has KillWait seconds (30 by default, never less than 5) to write its record and forward
# the signal to the training.  exec must be the last line: nothing after it runs.
#
# Alternative: run it as a job step instead, which Slurm also signals directly:
#   srun python3 "$HPCRUN" wrap --work-dir "$SLURM_SUBMIT_DIR" --command "python train.py"
exec python3 "$HPCRUN" wrap --work-dir "$SLURM_SUBMIT_DIR" --command "python train.py"
