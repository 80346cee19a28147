"""Against a real Slurm (issue 4): an allocation that outlives its training gets release
reminders until it is cancelled, and none after. Needs a running Slurm, like test_slurm.py
(whose helpers it uses; a module of its own, so that it runs beside that file's 1-minute jobs);
skips without one, fails with HPCRUN_REQUIRE_SLURM=1."""

import os
import re
import sys
import time
import unittest

from support import HPCRUN, SUCCESS_WORDS, wait_for
from test_slurm import (ENDED_STATES, MONITOR_INTERVAL, PENDING_WAIT, SlurmTestCase, hpcrun,
                        job_states, run_command)

LAYER = "scheduler"


@unittest.skipUnless(
    "reminder_interval" in hpcrun.DEFAULTS.get("monitor", {}),
    "hpcrun.py has no [monitor] reminder_interval yet (issue 4, release reminders): "
    "this test runs once it does")
class SlurmReleaseReminderTest(SlurmTestCase):
    """Issue 4: an allocation that outlives its training is a node paid for nothing."""

    REMINDER_INTERVAL = 4
    config_sections = {"notify": {"events": "end, release_reminder"},
                       "monitor": {"reminder_interval": str(REMINDER_INTERVAL),
                                   "reminder_max": "6"}}

    def salloc(self):
        """An allocation with no shell, like an interactive session left open; its job id."""
        status, out, err = run_command(["salloc", "--no-shell", "--time=5",
                                        "--job-name=hpcrun-it-alloc"], self.class_env,
                                       timeout=PENDING_WAIT)
        match = re.search(r"Granted job allocation (\d+)", out + err)
        self.assertTrue(status == 0 and match, "salloc --no-shell failed (%s): %s" % (status, err))
        job_id = match.group(1)
        self.addCleanup(run_command, ["scancel", job_id], self.class_env)
        return job_id

    def test_allocation_outliving_its_training_gets_release_reminders_until_it_is_cancelled(self):
        work = self.box.make_dir("work-alloc")
        job_id = self.salloc()
        monitor = self.start_monitor(work)
        self.addCleanup(monitor.kill)
        argv = ["srun", "--jobid=" + job_id, sys.executable, HPCRUN, "wrap", "--config",
                self.config, "--work-dir", work, "--name", "alloc-run", "--", sys.executable,
                self.training, os.path.join(work, "marker.json"), "2"]
        status, out, err = run_command(argv, self.class_env, timeout=120)
        self.assertEqual(status, 0, "%s\nexit %s\n%s\n%s" % (" ".join(argv), status, out, err))
        self.assertEqual(job_states(job_id, self.class_env), ["RUNNING"],
                         "precondition: the allocation outlives the training")

        command = "scancel %s" % job_id
        seen = []          # (monotonic time first seen, push) of each push naming the command

        def pushes_naming_command(count):
            naming = [p.json for p in self.slurm_server.valid_requests
                      if command in p.json["title"] + p.json["content"]]
            for push in naming[len(seen):]:
                seen.append((time.monotonic(), push))
            return len(seen) >= count

        self.wait_until("the report and two reminders naming '%s'" % command,
                        lambda: pushes_naming_command(3), 60, interval=0.05)
        self.assertRegex(seen[0][1]["title"], SUCCESS_WORDS, "first comes the run's own report")
        self.assertIn("alloc-run", seen[0][1]["title"])
        gap = seen[2][0] - seen[1][0]
        self.assertGreaterEqual(gap, 0.8 * self.REMINDER_INTERVAL, "reminders too close: %.1fs" % gap)
        self.assertLessEqual(gap, self.REMINDER_INTERVAL + 4 * MONITOR_INTERVAL + 2,
                             "reminders too far apart: %.1fs" % gap)

        status, _, err = run_command(["scancel", job_id], self.class_env)
        self.assertEqual(status, 0, err)
        self.wait_until("the allocation to end", lambda: all(
            s in ENDED_STATES for s in job_states(job_id, self.class_env) or ["?"]), 30, 0.25)
        gone = time.monotonic()
        pushes_naming_command(0)
        wait_for(lambda: pushes_naming_command(len(seen) + 1), 2 * self.REMINDER_INTERVAL + 2,
                 MONITOR_INTERVAL)
        late = [push for when, push in seen if when > gone + 1.5]
        self.assertEqual(late, [], "reminders after the allocation was gone")
        self.assertServerClean()



if __name__ == "__main__":
    unittest.main()
