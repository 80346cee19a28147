"""Against a real Slurm (issue 14): a job array gives one digest naming its failed tasks and
the task cancelled while it waited, with the resubmit line. Needs a running Slurm, like
test_slurm.py (whose helpers it uses); skips without one, fails with HPCRUN_REQUIRE_SLURM=1."""

import shlex
import sys
import unittest

from support import HPCRUN
from test_slurm import PENDING_WAIT, RUN_WAIT, BatchJob, SlurmTestCase, run_command

LAYER = "scheduler"

# Tasks 2, 5 and 6 fail (exit 1), the others succeed.
FAILING = "import os, sys; sys.exit(1 if os.environ['SLURM_ARRAY_TASK_ID'] in ('2', '5', '6') else 0)"


class SlurmArrayDigestTest(SlurmTestCase):

    @classmethod
    def submit_jobs(cls):
        work = cls.box.make_dir("work-digest")
        line = " ".join(shlex.quote(arg) for arg in [
            sys.executable, HPCRUN, "wrap", "--config", cls.config, "--work-dir", work,
            "--name", "digest-run", "--", sys.executable, "-c", FAILING])
        # %2: two tasks at a time, so that task 7 still waits when it is cancelled
        cls.job = BatchJob(cls.box, "digest", work, work + "/none", ["exec " + line],
                           ("--time=1", "--array=0-7%2"), cls.class_env)
        cls.jobs.append(cls.job)
        cls.job.submit()
        status, _, err = run_command(["scancel", "%s_7" % cls.job.id], cls.class_env)
        if status != 0:
            raise AssertionError("scancel %s_7 failed: %s" % (cls.job.id, err))
        cls.start_monitor(work)

    def test_an_array_with_failures_and_a_task_cancelled_while_pending_gives_one_digest(self):
        job = self.job
        self.focus = [job]
        digest = self.wait_until("the digest of array %s" % job.id,
                                 lambda: [p for p in self.pushes_about("digest-run") if p["title"].startswith("📦")],
                                 PENDING_WAIT + RUN_WAIT)[0]
        self.assertEqual(digest["title"], "📦 Array %s digest-run: 4/8 ok · 3 exit 1" % job.id)
        self.assertIn("Tasks: 8 · ok 4 · failed 3 · never started 1", digest["content"])
        self.assertIn("Failed: 2,5-6 (exit 1)", digest["content"])
        self.assertIn("Never started: 7", digest["content"])
        self.assertIn("Resubmit: sbatch --array=2,5-7 %s" % job.script, digest["content"])
        self.assertEqual(len(self.pushes_about("digest-run")), 1, "one push for the whole array")
        self.assertServerClean()


if __name__ == "__main__":
    unittest.main()
