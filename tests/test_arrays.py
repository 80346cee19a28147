"""One push per job array (issue 14): a digest with counts, causes, failed indices as ranges
and the resubmit line; the each and failures modes; fail fast; array_timeout; a monitor
restarted between tasks; two monitors; status. Arrays are simulated with each scheduler's
environment (no scheduler runs); the real Slurm array is in test_slurm.py."""

import json
import re
import subprocess
import unittest

from support import HpcrunTestCase, hpcrun_argv, pass_time, read_records

import hpcrun

LAYER = "process"


CUDA_OOM = "echo 'RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB'; exit 1"
NAN_LOSS = "echo 'step 90 loss nan'; exit 1"
OK = "echo 'step 100 loss=0.25'"


def slurm_env(array_id, index, count=10, first=0):
    return {"SLURM_JOB_ID": str(int(array_id) + 1 + index), "SLURM_ARRAY_JOB_ID": str(array_id),
            "SLURM_ARRAY_TASK_ID": str(index), "SLURM_ARRAY_TASK_COUNT": str(count),
            "SLURM_ARRAY_TASK_MIN": str(first), "SLURM_ARRAY_TASK_MAX": str(first + count - 1),
            "SLURM_ARRAY_TASK_STEP": "1", "SLURM_JOB_NAME": "resnet-sweep"}


def sge_env(job_id, index, first=1, last=10):
    return {"JOB_ID": str(job_id), "SGE_TASK_ID": str(index), "SGE_TASK_FIRST": str(first),
            "SGE_TASK_LAST": str(last), "SGE_TASK_STEPSIZE": "1", "JOB_NAME": "resnet-sweep",
            "SGE_ROOT": "/var/lib/gridengine"}


def pbspro_env(job_id, index):
    return {"PBS_JOBID": "%d[%d].pbs01" % (job_id, index), "PBS_ARRAY_ID": "%d[].pbs01" % job_id,
            "PBS_ARRAY_INDEX": str(index), "PBS_JOBNAME": "resnet-sweep"}


def torque_env(job_id, index):
    return {"PBS_JOBID": "%d[%d].torque01" % (job_id, index), "PBS_ARRAYID": str(index),
            "PBS_JOBNAME": "resnet-sweep"}


def lsf_env(job_id, index):
    return {"LSB_JOBID": str(job_id), "LSB_JOBINDEX": str(index), "LSB_JOBINDEX_END": "10",
            "LSB_JOBNAME": "resnet-sweep[1-10]"}


# task index -> command: tasks 2, 5, 6 die of CUDA OOM, 8 of a NaN loss, the rest succeed
def endings(first=0):
    return {first + i: CUDA_OOM if i in (2, 5, 6) else NAN_LOSS if i == 8 else OK for i in range(10)}


def first_failure(records):
    """(index, label) of the task that failed first."""
    failed = [r for r in records if r.get("status") == "failed"]
    first = min(failed, key=lambda r: r["end_time"])
    return first["job"]["array_index"], "NaN loss" if "nan" in first["command"] else "CUDA OOM"


class ArrayTestCase(HpcrunTestCase):

    def setUp(self):
        HpcrunTestCase.setUp(self)
        self.server = self.start_server()
        self.notify = {"language": "en"}

    def configure(self, **notify):
        self.notify.update(notify)
        self.configure_xxtui(self.server, overrides={"notify": self.notify})

    def run_tasks(self, env_of, commands, work=None):
        """Wrap each task at once, side by side (a real wrap each), and wait for all of them."""
        work = work or self.sb.work
        processes = []
        for index, command in sorted(commands.items()):
            env = dict(self.env, **env_of(index))
            processes.append(subprocess.Popen(
                hpcrun_argv(["wrap", "--work-dir", work, "--command", command]), env=env,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        for process in processes:
            self.assertEqual(process.wait(30) in (0, 1), True, process.stderr.read())
            process.stderr.close()
        return work

    def once(self, work=None, **options):
        return self.hpcrun("monitor", "--once", "--work-dir", work or self.sb.work, **options)

    def pushes(self, kind=None):
        bodies = self.server.bodies
        return [b for b in bodies if kind is None or kind in b["title"]]

    def digest(self):
        digests = [b for b in self.server.bodies if b["title"].startswith("📦")]
        self.assertEqual(len(digests), 1, self.server.describe())
        return digests[0]["title"], digests[0]["content"]


class DigestPerSchedulerTest(ArrayTestCase):

    CASES = [
        ("slurm", lambda i: slurm_env(123456, i), 0, "sbatch --array=2,5-6,8 ", "123456"),
        ("sge", lambda i: sge_env(4242, i), 1, "qsub -t 3 ", "4242"),
        ("pbspro", lambda i: pbspro_env(777, i), 0, "qsub -v PBS_ARRAY_INDEX=2 ", "777[].pbs01"),
        ("torque", lambda i: torque_env(888, i), 0, "qsub -t 2,5-6,8 ", "888[].torque01"),
    ]

    def test_ten_tasks_with_mixed_endings_give_one_digest_with_ranges_and_resubmit_line(self):
        self.configure(array_timeout="1", array_fail_fast="0")
        for label, env_of, first, resubmit, array_id in self.CASES:
            with self.subTest(label):
                work = self.sb.make_dir("work-" + label)
                self.run_tasks(env_of, endings(first), work)
                result = self.once(work)
                if label in ("pbspro", "torque"):   # no task count in the environment: timeout
                    self.assertFalse(self.pushes(array_id), self.server.describe())
                    pass_time(1.2)
                    result = self.once(work)
                self.assertNoTraceback(result)
                digests = [b for b in self.server.bodies if array_id in b["title"]]
                self.assertEqual(len(digests), 1, self.server.describe())
                title, content = digests[0]["title"], digests[0]["content"]
                self.assertRegex(title, r"^📦 Array %s resnet-sweep: 6/10 ok · 3 CUDA OOM · 1 NaN loss$"
                                 % re.escape(array_id))
                self.assertIn("Tasks: 10 · ok 6 · failed 4 · never started 0", content)
                failed = [i + first for i in (2, 5, 6)]
                self.assertIn("Failed: %s (CUDA OOM) · %d (NaN loss)"
                              % (hpcrun.format_ranges(failed), first + 8), content)
                self.assertIn("Resubmit: " + resubmit, content)
                earliest = first_failure(read_records(work, "sent").values())   # first in time
                self.assertIn("First failure: task %d · %s — " % earliest, content)
                self.assertIn("--- task %d, last 1 log lines ---" % earliest[0], content)
                self.assertEqual(read_records(work, "done"), {})
                self.assertEqual(len(read_records(work, "sent")), 11)

    def test_lsf_and_pbs_resubmit_lines_follow_each_schedulers_syntax(self):
        cases = [("lsf", hpcrun.SCHEDULERS[2], {"name": "resnet-sweep[1-10]"}, [3, 6, 7, 9],
                  ['bsub -J "resnet-sweep[3,6-7,9]" job.sh']),
                 ("pbspro", hpcrun.SCHEDULERS[1], {"variant": "pbspro"}, [3, 6, 7, 9],
                  ["qsub -v PBS_ARRAY_INDEX=3 job.sh", "qsub -J 6-7 job.sh", "qsub -v PBS_ARRAY_INDEX=9 job.sh"]),
                 ("sge", hpcrun.SCHEDULERS[3], {}, [3, 6, 7, 9],
                  ["qsub -t 3 job.sh", "qsub -t 6-7 job.sh", "qsub -t 9 job.sh"])]
        for label, entry, job, indices, lines in cases:
            with self.subTest(label):
                self.assertEqual(entry.resubmit(indices, "job.sh", job), lines)

    def test_each_schedulers_environment_gives_the_array_facts(self):
        cases = [(slurm_env(10, 3), ("10", 3, 10)), (sge_env(20, 4), ("20", 4, 10)),
                 (pbspro_env(30, 5), ("30[].pbs01", 5, None)), (torque_env(40, 6), ("40[].torque01", 6, None)),
                 (lsf_env(50, 7), ("50", 7, None))]
        for env, (array_id, index, count) in cases:
            with self.subTest(env=sorted(env)):
                job = hpcrun.detect_job(env)
                self.assertEqual((job["array_id"], job["array_index"], job.get("array_count")),
                                 (array_id, index, count))
        self.assertNotIn("array_id", hpcrun.detect_job({"JOB_ID": "9", "SGE_TASK_ID": "undefined",
                                                        "SGE_ROOT": "/x"}))


class ModesTest(ArrayTestCase):

    def setUp(self):
        ArrayTestCase.setUp(self)
        self.notify["array_fail_fast"] = "0"

    def test_each_mode_pushes_every_task_and_no_digest(self):
        self.configure(arrays="each")
        self.run_tasks(lambda i: slurm_env(5000, i), endings())
        self.once()
        self.assertEqual(len(self.server.bodies), 10, self.server.describe())
        self.assertEqual(self.pushes("Array"), [])

    def test_failures_mode_pushes_the_first_failure_of_each_cause_and_the_digest(self):
        self.configure(arrays="failures")
        self.run_tasks(lambda i: slurm_env(5100, i), endings())
        self.once()
        titles = [b["title"] for b in self.server.bodies]
        self.assertEqual(len([t for t in titles if "CUDA OOM" in t and "Array" not in t]), 1, titles)
        self.assertEqual(len([t for t in titles if "NaN loss" in t and "Array" not in t]), 1, titles)
        self.assertEqual(len(self.pushes("Array")), 1, titles)
        self.assertEqual(len(titles), 3, titles)

    def test_only_failures_sends_nothing_for_an_array_that_all_succeeded(self):
        self.configure(only_failures="yes")
        self.run_tasks(lambda i: slurm_env(5200, i, count=3), {0: OK, 1: OK, 2: OK})
        self.assertExit(self.once(), 0)
        self.assertEqual(self.server.bodies, [])
        self.assertEqual(len(read_records(self.sb.work, "sent")), 4)


class FailFastTest(ArrayTestCase):

    def test_a_failing_array_gets_one_early_push_with_the_cancel_command(self):
        self.configure(array_fail_fast_after="4", array_fail_fast="0.5")
        first = {0: CUDA_OOM, 1: CUDA_OOM, 2: OK, 3: NAN_LOSS}
        self.run_tasks(lambda i: slurm_env(6000, i, count=8), first)
        self.once()
        failing = self.pushes("failing")
        self.assertEqual(len(failing), 1, self.server.describe())
        self.assertIn("3 of 4 ended tasks failed", failing[0]["title"])
        self.assertIn("Cancel the array: scancel 6000", failing[0]["content"])
        self.assertIn("Ended: 4 of 8 · ok 1 · failed 3", failing[0]["content"])
        self.run_tasks(lambda i: slurm_env(6000, i, count=8), {4: CUDA_OOM, 5: OK, 6: OK, 7: OK})
        self.once()
        self.assertEqual(len(self.pushes("failing")), 1, "fail fast is sent once")
        title, _ = self.digest()
        self.assertIn("4/8 ok", title)


class TimeoutAndRestartTest(ArrayTestCase):

    def setUp(self):
        ArrayTestCase.setUp(self)
        self.notify["array_fail_fast"] = "0"

    def test_array_timeout_sends_the_digest_saying_which_tasks_never_reported(self):
        self.configure(array_timeout="1")
        self.run_tasks(lambda i: slurm_env(7000, i), {i: OK for i in range(7)})
        self.once()
        self.assertEqual(self.pushes("Array"), [])
        pass_time(1.2)                       # array_timeout passes: the feature is a duration
        self.once()
        title, content = self.digest()
        self.assertIn("7/10 ok", title)
        self.assertIn("Never reported (timed out): 7-9", content)
        self.assertIn("Resubmit: sbatch --array=7-9 ", content)

    def test_a_monitor_restarted_between_tasks_sends_one_digest_of_all_of_them(self):
        self.configure()
        commands = endings()
        self.run_tasks(lambda i: slurm_env(8000, i), {i: commands[i] for i in range(5)})
        self.once()
        self.assertEqual(self.server.bodies, [])
        self.run_tasks(lambda i: slurm_env(8000, i), {i: commands[i] for i in range(5, 10)})
        self.once()
        title, _ = self.digest()
        self.assertIn("6/10 ok · 3 CUDA OOM · 1 NaN loss", title)
        self.assertEqual(len(self.server.bodies), 1)

    def test_two_monitors_at_once_send_one_digest(self):
        self.configure()
        self.run_tasks(lambda i: slurm_env(9000, i), endings())
        first = self.start("monitor", "--once", "--work-dir", self.sb.work)
        second = self.start("monitor", "--once", "--work-dir", self.sb.work)
        self.finish(first)
        self.finish(second)
        self.digest()
        self.assertEqual(len(self.server.bodies), 1, self.server.describe())

    def test_a_task_that_ends_after_the_digest_is_reported_on_its_own(self):
        self.configure(array_timeout="1")
        self.run_tasks(lambda i: slurm_env(9100, i, count=3), {0: OK, 1: OK})
        self.once()
        pass_time(1.2)
        self.once()
        self.digest()
        self.run_tasks(lambda i: slurm_env(9100, i, count=3), {2: CUDA_OOM})
        self.once()
        self.assertEqual(len(self.server.bodies), 2)
        self.assertIn("Training failed", self.server.bodies[-1]["title"])


class GroupAndStatusTest(ArrayTestCase):

    def test_a_wrap_group_sweep_gives_one_digest_naming_its_failed_runs(self):
        self.configure()
        for name, command in (("lr0.1", OK), ("lr0.3", CUDA_OOM), ("lr1.0", NAN_LOSS)):
            result = self.wrap(command, extra=["--group", "lr-sweep", "--group-size", "3", "--name", name])
            self.assertIn(result.returncode, (0, 1))
        self.once()
        title, content = self.digest()
        self.assertEqual(title, "📦 Array lr-sweep: 1/3 ok · 1 CUDA OOM · 1 NaN loss")
        self.assertIn("Failed: lr0.3 (CUDA OOM) · lr1.0 (NaN loss)", content)
        self.assertNotIn("Resubmit", content)

    def test_status_shows_an_array_as_one_line_and_its_tasks_with_tasks(self):
        self.configure()
        self.run_tasks(lambda i: slurm_env(9200, i), {0: OK, 1: CUDA_OOM, 2: OK})
        self.once()
        folded = self.hpcrun("status", "--work-dir", self.sb.work)
        lines = [line for line in folded.out.splitlines() if line.strip()]
        self.assertEqual(len(lines), 2, folded.describe())   # the table's header, the array
        self.assertIn("slurm-9200", lines[1])
        self.assertIn("1 task(s) failed", lines[1])
        every = self.hpcrun("status", "--work-dir", self.sb.work, "--tasks", "--json")
        self.assertEqual(len(json.loads(every.out)), 3)
        folded_json = json.loads(self.hpcrun("status", "--work-dir", self.sb.work, "--json").out)
        self.assertEqual([(entry["kind"], entry["tasks"], entry["failed"]) for entry in folded_json],
                         [("array", 3, 1)])


if __name__ == "__main__":
    unittest.main()
