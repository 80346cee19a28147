#!/bin/bash
# A PBS (OpenPBS, PBS Pro, Torque) batch script that runs a training under hpcrun.
# Submit with:  qsub pbs_job.sh
# Copy it next to your train.py, adjust the #PBS lines, and point HPCRUN at your copy of
# hpcrun.py.  On a login node, `./hpcrun.sh monitor` (no directory: it serves every work dir a
# wrap registered) or the cron line `./hpcrun.sh cron` prints reports the end.
#
#PBS -N train
#PBS -l walltime=01:00:00
#PBS -j oe

HPCRUN="${HPCRUN:-$HOME/hpcrun.py}"
cd "$PBS_O_WORKDIR" || exit 1

# Set up the training's environment here, for example:
# module load python/3.10
# source ~/venvs/train/bin/activate

# PBS signals every process of the job's session at the walltime or on qdel, so the wrapper
# would get the SIGTERM even without exec.  exec still makes it the job's top process and
# its exit status the job's.  The time between SIGTERM and SIGKILL is short (kill_delay:
# 10 s on PBS Pro, 2 s on Torque's qdel), so expect only the provisional record sometimes.
exec python3 "$HPCRUN" wrap --work-dir "$PBS_O_WORKDIR" --command "python train.py"
