"""Against a real Slurm: time limits, scancel, job arrays, silent kills, idle allocations.

Needs a running Slurm (tests/slurm/up.sh starts a single-node one as root); the tests skip
with the reason when there is none or when HPCRUN_SKIP_SLURM=1 is set, and fail instead when
HPCRUN_REQUIRE_SLURM=1 is set (.ci/run sets it after starting Slurm). SLURM_CONF defaults
to the config up.sh writes ($HPCRUN_SLURM_DIR, default /tmp/hpcrun-slurm) when it is unset.

The jobs run the real hpcrun.py with this interpreter, so every path they see is absolute.
A 1-minute time limit fires 65-80 s after the job starts. The test node up.sh starts has 16
CPUs whatever the machine has (the trainings mostly sleep), so every job of this file runs at
once and the file takes about as long as the time-limit jobs; jobs of other runs of these
tests beyond 16 wait for a CPU (PENDING_WAIT), they do not fail.
"""

import json
import os
import re
import shlex
import shutil
import sys
import time
import unittest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if TESTS_DIR not in sys.path:    # also run as: python3 -m unittest tests.test_slurm
    sys.path.insert(0, TESTS_DIR)

from support import (HPCRUN, KEY, SUCCESS_WORDS, Background, FakeXxtui, HpcrunTestCase, Sandbox,
                     clip, load_hpcrun, log_files, read_records, read_text, record_names,
                     render_ini, run_command, wait_for)

LAYER = "scheduler"

hpcrun = load_hpcrun()


SLURM_DIR = os.environ.get("HPCRUN_SLURM_DIR") or "/tmp/hpcrun-slurm"
CANCEL_LIMIT = 3              # minutes, of the job that is scancel'd (raised by 2 first)
PENDING_WAIT = 600            # seconds a job may wait for a CPU (other runs of these tests)
RUN_WAIT = 150                # seconds from its start until a 1-minute job surely ended
DELIVERY_WAIT = 30            # seconds from the end of a job until its report is pushed
HEARTBEAT_INTERVAL = 1        # [wrap] heartbeat_interval of every job here
STALE_AFTER = 5               # [monitor] stale_after: lost this long after the last heartbeat
MONITOR_INTERVAL = 0.5        # --interval of the long-running monitors
MONITOR_LIFETIME = 1200       # seconds after which a long-running monitor stops by itself
ENDED_STATES = ("COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL",
                "PREEMPTED", "BOOT_FAIL", "DEADLINE")
LAUNCH_WARNING_RE = re.compile(r"(?m)^hpcrun: warning: .*\bexec\b.*$")

# The training of every job. It blocks SIGTERM and takes it with sigtimedwait instead of a
# handler, which is the same for the process but also tells who sent the signal: its marker
# file names the sender's pid, so a test can tell the wrapper's forward from Slurm's own.
TRAINING = '''\
"""argv: MARKER STEPS. A line every 0.5 s for STEPS steps (step i/STEPS, a checkpoint every 20
steps, as HF Trainer logs it), then exit 0.

On SIGTERM: write MARKER (JSON: the sender's pid), say so, exit 0 (a saved checkpoint).
"""
import json
import os
import signal
import sys
import time

marker, steps = sys.argv[1], int(sys.argv[2])
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
print("training started, pid %d, array task %s"
      % (os.getpid(), os.environ.get("SLURM_ARRAY_TASK_ID", "-")), flush=True)
for step in range(steps):
    info = signal.sigtimedwait([signal.SIGTERM], 0.5)
    if info is not None:
        with open(marker + ".tmp", "w", encoding="utf-8") as stream:
            json.dump({"sender_pid": info.si_pid, "pid": os.getpid(), "time": time.time()}, stream)
        os.rename(marker + ".tmp", marker)
        print("SIGTERM from pid %d: checkpoint saved to ckpt/final" % info.si_pid, flush=True)
        sys.exit(0)
    print("step %d/%d" % (step, steps), flush=True)
    if step and step % 20 == 0:
        print("Saving model checkpoint to ckpt/step-%d" % step, flush=True)
print("training finished", flush=True)
'''
LONG_STEPS = 600              # 300 s: far beyond any time limit here


# --- Slurm from the test process ---

def slurm_env(base):
    """base plus the Slurm client's config location (sealed_env drops SLURM_*)."""
    env = dict(base)
    conf = os.environ.get("SLURM_CONF") or os.path.join(SLURM_DIR, "slurm.conf")
    if os.path.exists(conf) or os.environ.get("SLURM_CONF"):
        env["SLURM_CONF"] = conf
    return env


def slurm_missing_reason():
    """Why the real-Slurm tests cannot run here, or None when they can."""
    if os.environ.get("HPCRUN_SKIP_SLURM", "") not in ("", "0"):
        return "HPCRUN_SKIP_SLURM is set (make test-all leaves the real-Slurm tests to make test)"
    if not shutil.which("sbatch"):
        return "no Slurm here: no sbatch on PATH (start one with 'bash tests/slurm/up.sh' as root)"
    env = slurm_env(os.environ)
    status, out, err = run_command(["sinfo", "-h", "-o", "%t"], env)
    if status != 0:
        return ("no Slurm here: sinfo failed (SLURM_CONF=%s): %s; start one with "
                "'bash tests/slurm/up.sh' as root" % (env.get("SLURM_CONF", "unset"),
                                                      (err.strip().splitlines() or ["?"])[-1]))
    # plnd: up, held for a pending job by the backfill scheduler (between two test classes)
    if not set(out.split()) & {"idle", "mix", "alloc", "comp", "plnd"}:
        return "no Slurm node is up (sinfo says %r)" % out.strip()
    return None


def job_states(job_id, env):
    """The state of each task of a job (one for a plain job, one per task of an array)."""
    status, out, _ = run_command(["squeue", "-h", "-r", "-t", "all", "-j", str(job_id),
                                  "-o", "%T"], env)
    return out.split() if status == 0 else []


def scontrol_job(job_id, env):
    status, out, err = run_command(["scontrol", "show", "job", str(job_id)], env)
    return out if status == 0 else "scontrol show job %s failed: %s" % (job_id, err.strip())


def scontrol_state(job_id, env):
    match = re.search(r"\bJobState=(\S+)", scontrol_job(job_id, env))
    return match.group(1) if match else None


def ending_records(work, state):
    """{run_id: record} of the completion records (not event records) in DIR/.hpcrun/<state>/."""
    return {run_id: record for run_id, record in read_records(work, state).items()
            if record.get("status") in hpcrun.STATUSES}


def running_job_end(work):
    """The job end time in a work dir's (one) running record, None before there is one."""
    records = list(read_records(work, "running").values())
    return (records[0].get("job") or {}).get("end_time") if records else None


class BatchJob(object):
    """A batch script submitted with sbatch, and where to look at what became of it."""

    def __init__(self, sandbox, label, work, marker, body_lines, options, env):
        self.label = label
        self.work = work
        self.marker = marker
        self.env = env
        self.output_pattern = sandbox.path("jobs", "%s-%%j.out" % label)
        if any(option.startswith("--array") for option in options):
            self.output_pattern = sandbox.path("jobs", "%s-%%A_%%a.out" % label)
        header = ["#!/bin/bash", "#SBATCH --job-name=hpcrun-it-%s" % label,
                  "#SBATCH --output=%s" % self.output_pattern]
        header += ["#SBATCH %s" % option for option in options]
        self.script = sandbox.write_file(
            sandbox.path("jobs", "%s.sh" % label), "\n".join(header + list(body_lines)) + "\n",
            secret=False)
        self.argv = ["sbatch", "--parsable", self.script]
        self.id = None

    def submit(self):
        status, out, err = run_command(self.argv, self.env)
        if status != 0:
            raise AssertionError("sbatch failed (%s): %s%s" % (status, err.strip(), self.describe()))
        self.id = out.strip().split(";")[0]
        return self

    def states(self):
        return job_states(self.id, self.env) if self.id else []

    def started(self):
        """Every task has left the pending state."""
        states = self.states()
        return bool(states) and "PENDING" not in states and "CONFIGURING" not in states

    def ended(self):
        """Every task has left the queue for good (not pending, running or completing)."""
        states = self.states()
        return bool(states) and all(state in ENDED_STATES for state in states)

    def output_paths(self):
        if not self.id:
            return []
        directory = os.path.dirname(self.output_pattern)
        prefix = "%s-%s" % (self.label, self.id)
        return [os.path.join(directory, name) for name in sorted(os.listdir(directory))
                if name.startswith(prefix) and name.endswith(".out")]

    def output(self):
        """The job's output file (all of them for an array), where Slurm writes its verdicts."""
        return "".join(read_text(path) for path in self.output_paths())

    def describe(self):
        lines = ["\n--- job %s: %s ---" % (self.label, " ".join(shlex.quote(a) for a in self.argv)),
                 read_text(self.script).rstrip()]
        if self.id:
            lines.append("job id %s, squeue states %s" % (self.id, self.states()))
            lines.append(clip(scontrol_job(self.id, self.env), 1500).rstrip())
            for path in self.output_paths():
                lines.append("--- %s ---\n%s" % (path, clip(read_text(path)).rstrip()))
        for state in ("running", "done", "claimed", "sent"):
            names = record_names(self.work, state)
            if names:
                lines.append("%s/.hpcrun/%s: %s" % (self.work, state, names))
        if os.path.exists(self.marker):
            lines.append("marker: %s" % read_text(self.marker))
        return "\n".join(lines)


class BoundedMonitor(Background):
    """A long-running hpcrun.py monitor under timeout(1): it ends even if the tests are killed."""

    def __init__(self, args, env, cwd, out_dir):
        Background.__init__(self, args, env, cwd, out_dir, prefix=["timeout", str(MONITOR_LIFETIME)])


def wrap_line(config, work, name, training, marker, steps, exec_it):
    """The batch script's line that runs the training under hpcrun.py wrap."""
    argv = [sys.executable, HPCRUN, "wrap", "--config", config, "--work-dir", work,
            "--name", name, "--", sys.executable, training, marker, str(steps)]
    return ("exec " if exec_it else "") + " ".join(shlex.quote(a) for a in argv)


class SlurmTestCase(HpcrunTestCase):
    """A class-wide sandbox, fake xxtui, config and training; jobs submitted in setUpClass."""

    config_sections = {}

    @classmethod
    def setUpClass(cls):
        reason = slurm_missing_reason()
        if reason and os.environ.get("HPCRUN_REQUIRE_SLURM", "") not in ("", "0") and \
                os.environ.get("HPCRUN_SKIP_SLURM", "") in ("", "0"):
            raise AssertionError("HPCRUN_REQUIRE_SLURM is set (CI started a Slurm), but " + reason)
        if reason:
            raise unittest.SkipTest(reason)
        cls.jobs = []
        cls.monitors = []
        cls.box = Sandbox()
        cls.slurm_server = FakeXxtui(KEY)
        cls.class_env = slurm_env(cls.box.env)
        try:
            cls.slurm_server.start()
            cls.training = cls.box.write_file("train.py", TRAINING, secret=False)
            cls.box.make_dir("jobs")
            sections = {
                "notify": {"channels": "xxtui", "language": "en"},
                "xxtui": {"url": cls.slurm_server.url, "timeout": "5"},
                "wrap": {"heartbeat_interval": str(HEARTBEAT_INTERVAL)},
                "monitor": {"stale_after": str(STALE_AFTER)},
            }
            for section, values in cls.config_sections.items():
                sections.setdefault(section, {}).update(values)
            cls.sections = sections
            cls.config = cls.box.write_config(render_ini(sections))
            cls.box.write_keys({"xxtui": {"api_key": KEY}})
            cls.submit_jobs()
        except BaseException:
            cls.tearDownClass()
            raise

    @classmethod
    def submit_jobs(cls):
        pass

    @classmethod
    def tearDownClass(cls):
        for monitor in cls.monitors:
            monitor.kill()
        ids = [job.id for job in cls.jobs if job.id]
        if ids:
            run_command(["scancel"] + ids, cls.class_env)
            wait_for(lambda: all(job.ended() for job in cls.jobs if job.id), 30, 0.5)
        cls.slurm_server.stop()
        cls.box.cleanup()

    def setUp(self):
        super(SlurmTestCase, self).setUp()
        self.server = self.slurm_server
        self.focus = []

    # jobs and monitors
    @classmethod
    def batch_job(cls, label, name, steps, exec_it=True, options=("--time=1",), work=None):
        work = work or cls.box.make_dir("work-" + label)
        marker = os.path.join(work, "sigterm-from.json")
        line = wrap_line(cls.config, work, name, cls.training, marker, steps, exec_it)
        body = [line] if exec_it else [line, 'echo "wrap exited with status $?"']
        job = BatchJob(cls.box, label, work, marker, body, options, cls.class_env)
        cls.jobs.append(job)
        return job

    @classmethod
    def start_monitor(cls, *work_dirs):
        args = ["monitor", "--config", cls.config, "--interval", str(MONITOR_INTERVAL)]
        for work in work_dirs:
            args += ["--work-dir", work]
        monitor = BoundedMonitor(args, cls.class_env, cls.box.root, cls.box.root)
        cls.monitors.append(monitor)
        return monitor

    @classmethod
    def start_monitor_with(cls, config, *work_dirs):
        args = ["monitor", "--config", config, "--interval", str(MONITOR_INTERVAL)]
        for work in work_dirs:
            args += ["--work-dir", work]
        monitor = BoundedMonitor(args, cls.class_env, cls.box.root, cls.box.root)
        cls.monitors.append(monitor)
        return monitor

    def monitor_once(self, *work_dirs):
        args = ["monitor", "--once", "--config", self.config]
        for work in work_dirs:
            args += ["--work-dir", work]
        return self.hpcrun(*args, env=self.class_env, cwd=self.box.root)

    # what a failing test shows
    def context(self):
        parts = [super(SlurmTestCase, self).context()]
        for job in self.focus:
            parts.append(job.describe())
        for monitor in self.monitors:
            parts.append("\n--- long-running monitor: %s (%s) ---\nstdout:\n%s\nstderr:\n%s" % (
                " ".join(shlex.quote(a) for a in monitor.argv),
                "running" if monitor.proc.poll() is None else "exit %s" % monitor.proc.returncode,
                clip(monitor.read_stdout().decode("utf-8", "replace")),
                clip(monitor.read_stderr().decode("utf-8", "replace"))))
        parts.append("\n" + clip(self.slurm_server.describe(), 6000))
        return "".join(parts)

    # waiting
    def wait_until(self, what, predicate, timeout, interval=0.25):
        value = wait_for(predicate, max(1.0, timeout), interval)
        if not value:
            self.fail("waited %.0fs for %s in vain" % (timeout, what))
        return value

    def wait_for_job_start(self, job):
        self.wait_until("job %s (%s) to start" % (job.label, job.id), job.started, PENDING_WAIT,
                        interval=0.5)

    def wait_for_job_end(self, job):
        self.wait_for_job_start(job)
        self.wait_until("job %s (%s) to end" % (job.label, job.id), job.ended, RUN_WAIT,
                        interval=0.5)

    def wait_for_endings_delivered(self, work, count=1):
        """Until count completion records sit in sent/ and none waits in done/ or claimed/."""
        def delivered():
            waiting = [n for state in ("done", "claimed") for n in record_names(work, state)
                       if not n.startswith(".")]
            return len(ending_records(work, "sent")) >= count and not waiting
        self.wait_until("%d completion record(s) of %s delivered" % (count, work), delivered,
                        DELIVERY_WAIT)
        return ending_records(work, "sent")

    def pushes_about(self, name):
        """The pushes about a run, but its deadline forecasts (forecasts_about)."""
        return [r.json for r in self.slurm_server.valid_requests if name in r.json["title"]
                and not self.is_forecast(r.json)]

    def forecasts_about(self, name):
        return [r.json for r in self.slurm_server.valid_requests if name in r.json["title"]
                and self.is_forecast(r.json)]

    @staticmethod
    def is_forecast(push):
        return "will not finish" in push["title"]

    def assertTrainingGotSigtermFromWrapper(self, job, record):
        self.assertTrue(os.path.exists(job.marker),
                        "the training never got a SIGTERM (no marker %s)" % job.marker)
        marker = json.loads(read_text(job.marker))
        self.assertEqual(marker["sender_pid"], record["pid"],
                         "the training's SIGTERM came from pid %s, not from the wrapper (pid %s)"
                         % (marker["sender_pid"], record["pid"]))


class SlurmEndingsTest(SlurmTestCase):
    """Issue 3: how runs end under a real Slurm, each ending reported once."""

    # Only the ends (and lost runs) are pushed: a 1-minute job also gets a time-limit warning.
    # Every array task is pushed on its own (arrays = each); the digest is test_slurm_arrays'.
    config_sections = {"notify": {"events": "end, lost", "arrays": "each"}}

    @classmethod
    def submit_jobs(cls):
        # The two time-limit jobs first, the longest (~80 s); the others run beside them, and
        # the scancel job is cancelled long before its limit
        # (3 minutes: its test comes after the time-limit ones, some 90 s in).
        cls.exec_job = cls.batch_job("exec", "tl-exec", LONG_STEPS).submit()
        cls.plain_job = cls.batch_job("plain", "tl-plain", LONG_STEPS, exec_it=False).submit()
        cls.cancel_job = cls.batch_job("cancel", "cancel-run", LONG_STEPS,
                                       options=("--time=%d" % CANCEL_LIMIT,)).submit()
        cls.array_job = cls.batch_job("array", "array-run", 2,
                                      options=("--time=1", "--array=0-4")).submit()
        # Watching the time-limit jobs from start to end, as a monitor on a login node would,
        # one monitor a dir: two monitors of one dir share its records, and the first to claim
        # one sends it by its own [notify] events.
        cls.start_monitor(cls.plain_job.work)
        # The exec job's monitor also pushes its deadline forecast (issue 16): 600 steps at two
        # a second cannot finish within the 1-minute limit.
        sections = json.loads(json.dumps(cls.sections))
        sections["notify"]["events"] = "end, deadline_forecast"
        sections["monitor"]["forecast_after"] = "5"
        # beside the class's config, so that it finds the same keys file
        forecast = os.path.join(os.path.dirname(cls.config), "forecast.ini")
        cls.box.write_file(forecast, render_ini(sections))
        cls.start_monitor_with(forecast, cls.exec_job.work)

    def test_exec_wrapped_job_killed_at_its_time_limit_is_reported_once_terminated_by_time_limit(self):
        job = self.exec_job
        self.focus = [job]
        self.wait_for_job_end(job)
        self.assertEqual(scontrol_state(job.id, self.class_env), "TIMEOUT",
                         "precondition: Slurm ended the job at its time limit")
        self.assertIn("DUE TO TIME LIMIT", job.output(), "precondition: Slurm's own verdict")
        sent = self.wait_for_endings_delivered(job.work)

        self.assertEqual(len(sent), 1, "one run, one completion record: %r" % sorted(sent))
        record = list(sent.values())[0]
        self.assertIs(record["final"], True,
                      "only the provisional record: the wrapper was SIGKILLed before its final one")
        self.assertTrainingGotSigtermFromWrapper(job, record)
        self.assertEqual(record.get("child_returncode"), 0,
                         "the training did not finish its SIGTERM handling before the SIGKILL")
        self.assertEqual((record["status"], record["signal"], record["exit_code"]),
                         ("terminated", "SIGTERM", 143))
        self.assertIsNone(LAUNCH_WARNING_RE.search(job.output()),
                          "an exec'd wrapper must not warn that it is not the top process")
        pushes = self.pushes_about("tl-exec")
        self.assertTrue(pushes, "no report of the run's end")
        last = pushes[-1]
        self.assertNotRegex(last["title"], SUCCESS_WORDS)
        self.assertIn("checkpoint saved", last["content"], "the log tail ends the report")
        self.assertIn(job.id, last["content"], "the report names the Slurm job")
        with self.subTest("cause"):
            self.assertEqual(record["cause"], "time_limit")
            self.assertRegex(last["content"], r"(?i)time limit")
        with self.subTest("one report"):
            self.assertEqual([p["title"] for p in pushes], [last["title"]],
                             "one end, one report (provisional and final record both pushed?)")
        self.assertServerClean()

    def test_exec_job_gets_its_deadline_forecast_before_the_limit_and_its_end_names_the_last_checkpoint(self):
        job = self.exec_job
        self.focus = [job]
        self.wait_for_job_end(job)
        self.wait_for_endings_delivered(job.work)
        self.wait_until("the end report of tl-exec", lambda: self.pushes_about("tl-exec"), DELIVERY_WAIT)
        forecasts = self.forecasts_about("tl-exec")
        self.assertEqual(len(forecasts), 1, [p["title"] for p in forecasts])
        titles = [r.json["title"] for r in self.slurm_server.valid_requests if "tl-exec" in r.json["title"]]
        self.assertLess(titles.index(forecasts[0]["title"]), titles.index(self.pushes_about("tl-exec")[-1]["title"]),
                        "the forecast came after the end")
        self.assertRegex(forecasts[0]["title"], r"^⏳ tl-exec will not finish: needs ≈ \S+ more, \S+ left → "
                                                r"stops near step \d+/600 \(\d+ %\)$")
        self.assertIn("scontrol update JobId=%s TimeLimit=" % job.id, forecasts[0]["content"])
        self.assertIn("sbatch --time=", forecasts[0]["content"])
        end = self.pushes_about("tl-exec")[-1]["content"]
        self.assertRegex(end, r"Last checkpoint: ckpt/final \(step \d+/600\), \d+s before the end")
        self.assertNotIn("the whole run is lost", end)

    def test_wrap_without_exec_killed_silently_at_the_time_limit_is_reported_lost_with_timeout(self):
        job = self.plain_job
        self.focus = [job]
        self.wait_for_job_end(job)
        self.assertEqual(scontrol_state(job.id, self.class_env), "TIMEOUT",
                         "precondition: Slurm ended the job at its time limit")
        output = job.output()
        warning = LAUNCH_WARNING_RE.search(output)
        self.assertIsNotNone(warning, "no launch warning (not the top process, use exec) in the "
                                      "job output")
        self.assertLess(warning.start(), output.find("training started"),
                        "the launch warning must come at start, before the training's output")
        self.assertNotIn("wrap exited with status", output,
                         "precondition: the batch shell died at the time limit")

        self.wait_until("a lost report of tl-plain", lambda: self.pushes_about("tl-plain"),
                        STALE_AFTER + DELIVERY_WAIT)
        self.assertFalse(os.path.exists(job.marker),
                         "precondition: Slurm sent the training no SIGTERM")
        self.assertEqual(ending_records(job.work, "sent"), {},
                         "precondition: the SIGKILLed wrapper left no completion record")
        lost = [r for r in read_records(job.work, "sent").values() if r.get("status") == "lost"]
        self.assertEqual(len(lost), 1, sorted(read_records(job.work, "sent")))
        self.assertRegex(lost[0].get("scheduler_state") or "", r"^TIMEOUT\b")
        self.assertEqual(lost[0].get("cause"), "time_limit")
        push = self.pushes_about("tl-plain")[0]
        self.assertRegex(push["title"], r"(?i)\blost\b")
        self.assertIn("TIMEOUT", push["content"])
        self.assertIn(job.id, push["content"], "the report names the Slurm job")

        # Never a second lost (nor a recovered): give the monitor several more stale periods
        # after the lost report (it may have come while an earlier test waited).
        server = self.slurm_server
        lost_at = max(arrived for request, arrived in zip(server.requests, server.request_times)
                      if not request.problems and "tl-plain" in request.json["title"])
        window = lost_at + 2 * STALE_AFTER + 4 * MONITOR_INTERVAL - time.monotonic()
        more = wait_for(lambda: len(self.pushes_about("tl-plain")) > 1, max(0.0, window),
                        MONITOR_INTERVAL)
        self.assertFalse(more, "a second report of the lost run")
        self.assertServerClean()

    def test_scancel_of_an_exec_wrapped_job_is_reported_terminated_as_cancelled(self):
        job = self.cancel_job
        self.focus = [job]

        def training_started():
            return any("training started" in read_text(os.path.join(job.work, "logs", name))
                       for name in log_files(job.work))
        self.wait_for_job_start(job)
        self.wait_until("the training of job %s to start" % job.label, training_started, 30)
        # first its time limit is raised, as a user who needs longer would
        first_end = running_job_end(job.work)
        self.assertTrue(first_end, "the running record has no job end time")
        status, _, err = run_command(["scontrol", "update", "JobId=%s" % job.id,
                                      "TimeLimit=%d" % (CANCEL_LIMIT + 2)], self.class_env)
        self.assertEqual(status, 0, "scontrol update %s: %s" % (job.id, err))
        self.wait_until("the wrapper to see the raised time limit",
                        lambda: (running_job_end(job.work) or 0) >= first_end + 110, 15)
        status, _, err = run_command(["scancel", job.id], self.class_env)
        self.assertEqual(status, 0, "scancel %s: %s" % (job.id, err))
        self.wait_for_job_end(job)
        self.assertEqual(scontrol_state(job.id, self.class_env), "CANCELLED",
                         "precondition: Slurm cancelled the job")
        self.wait_until("the wrapper's final record", lambda: [
            r for r in ending_records(job.work, "done").values() if r.get("final")], 15)

        result = self.monitor_once(job.work)
        self.assertExit(result, 0)
        sent = ending_records(job.work, "sent")
        self.assertEqual(len(sent), 1, sorted(sent))
        record = list(sent.values())[0]
        self.assertTrainingGotSigtermFromWrapper(job, record)
        self.assertEqual((record["status"], record["signal"], record["exit_code"]),
                         ("terminated", "SIGTERM", 143))
        pushes = self.pushes_about("cancel-run")
        self.assertEqual(len(pushes), 1)
        self.assertNotRegex(pushes[0]["title"], SUCCESS_WORDS)
        self.assertGreaterEqual(record["job"]["end_time"], first_end + 110)
        self.assertEqual(record["cause"], "cancelled",
                         "scancel'd %.0fs after the start of a job with a %d-minute time limit"
                         % (json.loads(read_text(job.marker))["time"] - record["start_time"],
                            CANCEL_LIMIT + 2))
        self.assertRegex(pushes[0]["content"], r"(?i)cancel")
        self.assertNotRegex(pushes[0]["content"], r"(?i)time limit")
        self.assertServerClean()

    def test_job_array_of_five_tasks_gives_five_distinct_logs_and_five_reports(self):
        job = self.array_job
        self.focus = [job]
        self.wait_for_job_end(job)
        self.assertEqual(job.states(), ["COMPLETED"] * 5, "precondition: five tasks completed")
        logs = log_files(job.work)
        self.assertEqual(len(logs), 5, logs)
        tasks_per_log = [re.findall(r"array task (\S+)", read_text(os.path.join(job.work, "logs", n)))
                         for n in logs]
        self.assertEqual(sorted(t for found in tasks_per_log for t in found),
                         ["0", "1", "2", "3", "4"], "each log holds exactly one task's output")

        result = self.monitor_once(job.work)
        self.assertExit(result, 0)
        sent = ending_records(job.work, "sent")
        self.assertEqual(len(sent), 5, sorted(sent))
        self.assertEqual(sorted(r["status"] for r in sent.values()), ["success"] * 5)
        self.assertEqual(sorted(str(r["job"]["array_index"]) for r in sent.values()),
                         ["0", "1", "2", "3", "4"])
        self.assertEqual(sorted(r["log_file"] for r in sent.values()),
                         sorted("logs/" + n for n in logs))
        pushes = self.pushes_about("array-run")
        self.assertEqual(len(pushes), 5, "one push per task")
        for index in range(5):
            label = "%s_%d" % (job.id, index)
            with self.subTest(task=label):
                self.assertEqual(len([p for p in pushes if re.search(r"\b%s\b" % label,
                                                                      p["content"])]), 1)
        again = self.monitor_once(job.work)
        self.assertExit(again, 0)
        self.assertEqual(len(self.pushes_about("array-run")), 5, "pushed again")
        self.assertServerClean()


if __name__ == "__main__":
    unittest.main()
