"""What a new user meets first, and numbers a report must get right (issue 12), in process:
the cause line, a lost run's progress, selftest and missing keys, legacy records, short jobs
and time-limit warnings. A command that cannot start, cron --once while a report waits and
make demo run the real hpcrun.py: test_first_run_e2e.py."""

import json
import os
import re
import time
import unittest

from support import HpcrunTestCase, InProcess, load_hpcrun, pass_time

LAYER = "fast"

hpcrun = load_hpcrun()

ENGLISH_WORDS = r"\b(?:exit|cannot|start|empty|No such|Peak|Status|Cause|memory|log)\b"


def chinese_config(sb, **notify):
    sections = {"notify": dict({"channels": "console", "language": "zh"}, **notify)}
    return sb.write_config(sections)


class CauseLineTest(unittest.TestCase):

    def test_the_cause_quotes_the_exception_line_not_the_raise_statement_above_it(self):
        cases = [
            ("python", ["Traceback (most recent call last):",
                        '  File "train.py", line 74, in allocate',
                        '    raise RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")',
                        "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"]),
            ("python 3.11 markers", ["Traceback (most recent call last):",
                                     '  File "train.py", line 9, in <module>',
                                     "    raise MemoryError('CUDA out of memory')",
                                     "    ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^",
                                     "torch.OutOfMemoryError: CUDA out of memory. Tried 1 GiB"]),
            ("rank prefixed", ["[rank0]: Traceback (most recent call last):",
                               '[rank0]:   File "t.py", line 3, in <module>',
                               "[rank0]:     raise RuntimeError('CUDA out of memory')",
                               "[rank0]: RuntimeError: CUDA out of memory. Tried to allocate 4 GiB"]),
        ]
        for label, lines in cases:
            with self.subTest(label):
                cause, line = hpcrun.classify_log(lines)
                self.assertEqual(cause, "cuda_oom")
                self.assertNotIn("raise", line)
                self.assertIn("Tried", line)


class LostProgressTest(InProcess, HpcrunTestCase):

    def test_a_lost_runs_report_shows_one_progress_the_same_as_its_last_line(self):
        self.sb.write_config({"notify": {"channels": "console", "language": "en"},
                              "monitor": {"stale_after": "0.3"}})
        log = os.path.join(self.sb.work, "logs", "train.log")
        os.makedirs(os.path.dirname(log))
        with open(log, "w") as out:
            out.write("".join("epoch 5/10 step %d/1000 loss=0.5\n" % step for step in range(100, 301)))
        running = os.path.join(self.sb.work, ".hpcrun", "running")
        os.makedirs(running)
        with open(os.path.join(running, "r1.json"), "w") as out:   # its last heartbeat: step 120
            json.dump({"run_id": "r1", "name": "r1", "seq": 3, "written_at": time.time() - 200,
                       "start_time": time.time() - 600, "heartbeat_interval": 60.0, "log_size": 10,
                       "log_file": "logs/train.log", "last_line": "epoch 5/10 step 120/1000 loss=0.5",
                       "progress": "epoch 5/10 · step 120/1000"}, out)
        self.hpcrun("monitor", "--once", "--work-dir", self.sb.work)
        pass_time(0.4)                    # stale_after passes: the feature is a duration
        result = self.hpcrun("monitor", "--once", "--work-dir", self.sb.work)
        self.assertIn("lost", result.out)
        self.assertIn("Progress: epoch 5/10 · step 300/1000", result.out)
        self.assertIn("Last line: epoch 5/10 step 300/1000 loss=0.5", result.out)
        self.assertNotIn("step 120", result.out)


class SelftestAndKeysTest(InProcess, HpcrunTestCase):

    def test_selftest_fails_its_config_step_when_only_the_console_would_get_reports(self):
        for label, config in (("no channel", {"notify": {"language": "en"}}),
                              ("console only", {"notify": {"channels": "console"}})):
            with self.subTest(label):
                self.sb.write_config(config)
                result = self.hpcrun("selftest", timeout=60)
                self.assertExit(result, 1)
                self.assertRegex(result.out, r"\[1/6\] config: FAILED: nothing will be pushed: set "
                                             r"\[notify\] channels and a key")
                self.assertNotIn("[2/6]", result.out)

    def test_a_missing_key_names_the_keys_file_looked_for_and_whether_it_exists(self):
        self.sb.write_config({"notify": {"channels": "xxtui"}})
        for exists in (False, True):
            with self.subTest(exists=exists):
                if exists:
                    self.sb.write_keys({"xxtui": {"from": "lab"}})
                result = self.hpcrun("notify", "--test")
                self.assertExit(result, 2)
                line = self.assertOneErrorLine(result, "[xxtui] api_key is not set", self.sb.keys_path)
                self.assertIn("found, no such key" if exists else "not found", line)


class LegacyRecordTest(InProcess, HpcrunTestCase):

    def test_a_legacy_record_in_a_dir_hpcrun_never_wrapped_is_reported_without_errors(self):
        self.sb.write_config({"notify": {"channels": "console", "language": "en"}})
        with open(os.path.join(self.sb.work, ".train_complete.json"), "w") as out:
            json.dump({"exit_code": 0, "command": "python train.py"}, out)
        result = self.hpcrun("monitor", "--once", "--work-dir", self.sb.work)
        self.assertExit(result, 0)
        self.assertNotIn("error", result.out + result.err)
        self.assertIn("Training finished", result.out)

    def test_a_corrupt_legacy_record_is_named_by_its_own_path(self):
        self.sb.write_config({"notify": {"channels": "console", "language": "en"}})
        legacy = os.path.join(self.sb.work, ".train_complete.json")
        with open(legacy, "w") as out:
            out.write("{not json")
        result = self.hpcrun("monitor", "--once", "--work-dir", self.sb.work)
        errors = [line for line in result.out.splitlines() if " error: " in line]
        self.assertEqual(len(errors), 1, result.describe())
        self.assertIn("'%s'" % legacy, errors[0])
        self.assertNotIn("claimed", errors[0])
        self.assertNotIn("cannot save watch state", result.out)


class ShortJobWarningTest(InProcess, HpcrunTestCase):
    """A time-limit warning only when it can still help: the margin scales to a short job's
    limit, and never in a job's first minutes."""

    def plant(self, run_id, time_limit, remaining):
        running = os.path.join(self.sb.work, ".hpcrun", "running")
        os.makedirs(running, exist_ok=True)
        now = time.time()
        with open(os.path.join(running, run_id + ".json"), "w") as out:
            json.dump({"run_id": run_id, "name": run_id, "seq": 1, "written_at": now,
                       "start_time": now - (time_limit - remaining), "heartbeat_interval": 60.0,
                       "job": {"scheduler": "slurm", "id": "77", "time_limit": time_limit,
                               "end_time": now + remaining}}, out)

    def test_a_debug_job_gets_no_warning_and_a_long_one_gets_it_within_a_scaled_margin(self):
        self.sb.write_config({"notify": {"channels": "console", "language": "en",
                                         "events": "time_limit_warning"}})
        self.plant("debug-5min", 300, 240)           # 1 minute in: the default margin is 10
        self.plant("debug-at-end", 300, 50)          # 4 minutes in, 50 s left: still its first minutes
        self.plant("hour-job-early", 3600, 700)      # 700 s left of an hour: outside the margin
        self.plant("hour-job", 3600, 500)            # within the 10-minute margin
        self.plant("half-hour-job", 1800, 500)       # margin scaled to a fifth: 360 s
        self.plant("half-hour-end", 1800, 300)
        result = self.hpcrun("monitor", "--once", "--work-dir", self.sb.work)
        warned = sorted(re.findall(r"Time limit near (\S+)", result.out))
        self.assertEqual(warned, ["half-hour-end", "hour-job"], result.describe())


if __name__ == "__main__":
    unittest.main()
