"""Against a real Grid Engine (issue 13): h_rt, -notify, s_rt, qdel, job arrays, a command
that cannot start, each ending reported once with the cause its reader expects.

Needs a running Grid Engine with a queue all.q on this host (tests/sge/up.sh starts a
single-node one as root: Debian's gridengine 8.1.9, 2 slots, notify 5 s); the tests skip
with the reason when there is none or when HPCRUN_SKIP_SGE=1 is set, and fail instead when
HPCRUN_REQUIRE_SGE=1 is set. SGE_ROOT and SGE_CELL default to Debian's /var/lib/gridengine
and default when they are unset.

What Grid Engine does (reference sge-facts.md): it never sends SIGTERM. qdel and h_rt are a
SIGKILL to the job's process group; with -notify, h_rt first sends SIGUSR2 to the group and
the SIGKILL `notify` seconds later (the queue's setting); s_rt sends SIGUSR1 and nothing
after. Every job here is the real hpcrun.py wrap, submitted with `qsub -b y -shell no` (its
arguments arrive intact, wrap is the job's top process) or as a job script whose last line
execs it, with -V so that it sees the test's sandbox (HOME, HPCRUN_HOME). One long-running
monitor watches every work dir and pushes to a fake xxtui; each test reads the pushes about
its run as a user would: the title and the "Cause:" line.

All jobs are submitted in setUpClass, the 15-second time limits first, and share the 2
slots; the file takes about a minute on an idle Grid Engine.
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
if TESTS_DIR not in sys.path:    # also run as: python3 -m unittest tests.test_sge
    sys.path.insert(0, TESTS_DIR)

from support import (HPCRUN, KEY, SUCCESS_WORDS, Background, FakeXxtui, HpcrunTestCase, Sandbox,
                     clip, log_files, names_in, read_records, read_text, record_names, render_ini,
                     report_kind, run_command, wait_for)

LAYER = "scheduler"


QUEUE = "all.q"
PENDING_WAIT = 300            # seconds a job may wait for a slot (other jobs, other runs)
RUN_WAIT = 90                 # seconds from its start until a job here surely ended
ACCOUNTING_WAIT = 20          # seconds from the end of a job until qacct has it
DELIVERY_WAIT = 30            # seconds from the end of a job until its report is pushed
HEARTBEAT_INTERVAL = 1        # [wrap] heartbeat_interval of every job here
STALE_AFTER = 5               # [monitor] stale_after: lost this long after the last heartbeat
MONITOR_INTERVAL = 0.5        # --interval of the long-running monitor
MONITOR_LIFETIME = 900        # seconds after which the monitor stops by itself
QUIET = 2 * STALE_AFTER + 4 * MONITOR_INTERVAL   # no second report this long after the first
H_RT = 15                     # seconds: the hard run-time limit of the time-limit jobs
S_RT = 5                      # seconds: the soft run-time limit of the s_rt jobs
STAGE_SECONDS = 4             # seconds a job script works before it execs the wrapper
LONG_STEPS = 400              # 100 s of steps: far beyond any limit here

# The training of every job: argv MODE STEPS [EXIT | TASK:EXIT]. It writes started-<task>.json
# (its pid, group, session and the job's environment) in its working directory (wrap runs it in
# the work dir), prints a step every 0.25 s for STEPS steps, then exits EXIT (TASK:EXIT: only in
# array task TASK, 0 in the others). Each signal it handles is appended to signals.log with the
# time. MODE says which signals it handles:
#   plain  none: SIGUSR1 and SIGUSR2 kill it (Python's default action)
#   usr1   SIGUSR1: it saves a checkpoint and goes on
#   usr2   SIGUSR2: it saves a checkpoint and exits 0
TRAINING = '''\
import json
import os
import signal
import sys
import time

mode, steps = sys.argv[1], int(sys.argv[2])
task = os.environ.get("SGE_TASK_ID", "none")    # "undefined" off an array
code = 0
if len(sys.argv) > 3:   # EXIT, or TASK:EXIT for one task of an array
    wanted, _, value = sys.argv[3].rpartition(":")
    code = int(value) if wanted in ("", task) else 0


def note(name):
    with open("signals.log", "a") as stream:
        stream.write("%.3f %s task %s pid %d\\n" % (time.time(), name, task, os.getpid()))


def on_usr1(number, frame):
    note("SIGUSR1")
    print("checkpoint saved (SIGUSR1), going on", flush=True)


def on_usr2(number, frame):
    note("SIGUSR2")
    print("checkpoint saved (SIGUSR2), stopping", flush=True)
    sys.exit(0)


if mode == "usr1":
    signal.signal(signal.SIGUSR1, on_usr1)
elif mode == "usr2":
    signal.signal(signal.SIGUSR2, on_usr2)
facts = {"time": time.time(), "pid": os.getpid(), "pgid": os.getpgrp(), "sid": os.getsid(0),
         "ppid": os.getppid(), "env": dict(os.environ)}
with open("started-%s.json.tmp" % task, "w") as stream:
    json.dump(facts, stream, sort_keys=True)
os.rename("started-%s.json.tmp" % task, "started-%s.json" % task)
print("training started, pid %d, job %s task %s"
      % (os.getpid(), os.environ.get("JOB_ID"), task), flush=True)
for step in range(steps):
    print("step %d" % step, flush=True)
    time.sleep(0.25)
print("training finished", flush=True)
sys.exit(code)
'''

def cause_line(content):
    """What the report's "Cause:" line says, None when it has none."""
    match = re.search(r"(?m)^Cause: (.*)$", content)
    return match.group(1) if match else None


def job_line(content):
    match = re.search(r"(?m)^Job: (.*)$", content)
    return match.group(1) if match else None


# --- Grid Engine from the test process ---

def sge_env(base):
    """base plus where the Grid Engine clients find their cell (sealed_env drops SGE_*)."""
    env = dict(base)
    env["SGE_ROOT"] = os.environ.get("SGE_ROOT") or "/var/lib/gridengine"
    env["SGE_CELL"] = os.environ.get("SGE_CELL") or "default"
    return env


def queue_line(env):
    """(status, the all.q@host line of qstat -f or None, stderr)."""
    status, out, err = run_command(["qstat", "-f", "-q", QUEUE], env)
    lines = [line for line in out.splitlines() if line.startswith(QUEUE + "@")]
    return status, (lines[0] if lines else None), err


def sge_missing_reason():
    """Why the real-Grid-Engine tests cannot run here, or None when they can."""
    if os.environ.get("HPCRUN_SKIP_SGE", "") not in ("", "0"):
        return "HPCRUN_SKIP_SGE is set (the real-Grid-Engine tests run only in make test)"
    if not (shutil.which("qsub") and shutil.which("qconf") and shutil.which("qacct")):
        return ("no Grid Engine here: no qsub, qconf and qacct on PATH (start one with "
                "'bash tests/sge/up.sh' as root)")
    env = sge_env(os.environ)
    status, line, err = queue_line(env)
    if status != 0:
        return ("no Grid Engine here: qstat -f failed (SGE_ROOT=%s SGE_CELL=%s): %s; start one "
                "with 'bash tests/sge/up.sh' as root"
                % (env["SGE_ROOT"], env["SGE_CELL"], (err.strip().splitlines() or ["?"])[-1]))
    if not line:
        return "Grid Engine has no queue %s (tests/sge/up.sh makes one)" % QUEUE
    fields = line.split()   # queuename qtype resv/used/tot load_avg arch [states]
    if len(fields) != 5 or fields[4] == "-NA-":
        return "the queue %s is not ready: qstat -f says %r" % (QUEUE, line.strip())
    return None


def job_gone(job_id, env):
    """qstat -j no longer knows the job (every task of an array ended)."""
    status, _, err = run_command(["qstat", "-j", str(job_id)], env)
    return status not in (0, None) and "do not exist" in err


def qstat_j(job_id, env):
    status, out, err = run_command(["qstat", "-j", str(job_id)], env)
    return out if status == 0 else "qstat -j %s: %s" % (job_id, err.strip())


def qstat_states(job_id, env):
    """[(state, ja-task-ID)] of the job's lines in qstat (one per running array task)."""
    status, out, _ = run_command(["qstat", "-u", "*"], env)
    states = []
    for line in out.splitlines()[2:] if status == 0 else []:
        fields = line.split()
        if fields and fields[0] == str(job_id):
            states.append((fields[4], fields[-1] if len(fields) > 8 and
                           re.match(r"^\d+(?:[-:,]\d+)*$", fields[-1]) else None))
    return states


def qacct_records(job_id, env):
    """The accounting records of a job, one dict per record (per task of an array)."""
    status, out, _ = run_command(["qacct", "-j", str(job_id)], env)
    if status != 0:
        return []
    records = []
    for block in re.split(r"(?m)^=+\s*$", out):
        fields = dict(re.findall(r"(?m)^(\w+)\s+(.*?)\s*$", block))
        if fields.get("jobnumber") == str(job_id):
            records.append(fields)
    return records


class SgeJob(object):
    """A job submitted with qsub, and where to look at what became of it."""

    def __init__(self, sandbox, label, name, work, qsub_args, env, script=None, tasks=1):
        self.label = label
        self.name = name            # the run's --name, in the title of its reports
        self.work = work
        self.env = env
        self.script = script
        self.tasks = tasks
        self.output_pattern = sandbox.path("jobs", label + ".$JOB_ID.$TASK_ID.out")
        self.argv = ["qsub", "-terse", "-V", "-N", "hpcrun-it-" + label, "-wd", work,
                     "-o", self.output_pattern, "-j", "y"] + list(qsub_args)
        self.id = None

    def submit(self):
        status, out, err = run_command(self.argv, self.env, cwd=self.work)
        if status != 0:
            raise AssertionError("qsub failed (%s): %s%s" % (status, err.strip(), self.describe()))
        self.id = out.strip().split(".")[0]     # 7 of "7.1-3:1" for an array
        return self

    def gone(self):
        return bool(self.id) and job_gone(self.id, self.env)

    def accounting(self):
        return qacct_records(self.id, self.env) if self.id else []

    def started_facts(self):
        """{task: what the training wrote at its start} (task "undefined" off an array)."""
        facts = {}
        for name in sorted(os.listdir(self.work)):
            match = re.match(r"^started-(\w+)\.json$", name)
            if match:
                facts[match.group(1)] = json.loads(read_text(os.path.join(self.work, name)))
        return facts

    def signals(self):
        """The signals the training handled: [(time, name, task)]."""
        lines = read_text(os.path.join(self.work, "signals.log")).splitlines()
        return [(float(f[0]), f[1], f[3]) for f in (line.split() for line in lines)
                if len(f) >= 4 and f[0][:1].isdigit()]

    def output_paths(self):
        directory = os.path.dirname(self.output_pattern)
        prefix = "%s.%s." % (self.label, self.id)
        return [os.path.join(directory, name) for name in sorted(os.listdir(directory))
                if self.id and name.startswith(prefix)]

    def describe(self):
        lines = ["\n--- job %s: %s ---" % (self.label, " ".join(shlex.quote(a) for a in self.argv))]
        if self.script:
            lines.append(read_text(self.script).rstrip())
        if self.id:
            lines.append("job id %s, qstat states %s" % (self.id, qstat_states(self.id, self.env)))
            lines.append(clip(qstat_j(self.id, self.env), 1500).rstrip())
            for record in self.accounting():
                lines.append("qacct: %s" % ", ".join("%s=%s" % (key, record.get(key)) for key in (
                    "taskid", "failed", "exit_status", "start_time", "end_time", "ru_wallclock")))
            for path in self.output_paths():
                lines.append("--- %s ---\n%s" % (path, clip(read_text(path), 500).rstrip()))
        for state in ("running", "done", "claimed", "sent"):
            names = record_names(self.work, state)
            if names:
                lines.append("%s/.hpcrun/%s: %s" % (self.work, state, names))
        for name in sorted(os.listdir(self.work)) if os.path.isdir(self.work) else []:
            if name == "signals.log":
                lines.append("signals.log:\n%s" % read_text(os.path.join(self.work, name)).rstrip())
        return "\n".join(lines)


class BoundedMonitor(Background):
    """A long-running hpcrun.py monitor under timeout(1): it ends even if the tests are killed."""

    def __init__(self, args, env, cwd, out_dir):
        Background.__init__(self, args, env, cwd, out_dir, prefix=["timeout", str(MONITOR_LIFETIME)])


class SgeEndingsTest(HpcrunTestCase):
    """Issue 13: how runs end under a real Grid Engine, each ending reported once."""

    @classmethod
    def setUpClass(cls):
        reason = sge_missing_reason()
        if reason and os.environ.get("HPCRUN_REQUIRE_SGE", "") not in ("", "0") and \
                os.environ.get("HPCRUN_SKIP_SGE", "") in ("", "0"):
            raise AssertionError("HPCRUN_REQUIRE_SGE is set (a Grid Engine should be up), but "
                                 + reason)
        if reason:
            raise unittest.SkipTest(reason)
        cls.jobs = []
        cls.monitor = None
        cls.box = Sandbox()
        cls.sge_server = FakeXxtui(KEY)
        cls.class_env = sge_env(cls.box.env)
        try:
            cls.sge_server.start()
            cls.training = cls.box.write_file("train.py", TRAINING, secret=False)
            cls.box.make_dir("jobs")
            cls.config = cls.box.write_config(render_ini({
                "notify": {"channels": "xxtui", "language": "en", "events": "end, lost, array_done"},
                "xxtui": {"url": cls.sge_server.url, "timeout": "5"},
                "wrap": {"heartbeat_interval": str(HEARTBEAT_INTERVAL)},
                "monitor": {"stale_after": str(STALE_AFTER)},
            }))
            cls.box.write_keys({"xxtui": {"api_key": KEY}})
            cls.submit_jobs()
        except BaseException:
            cls.tearDownClass()
            raise

    @classmethod
    def submit_jobs(cls):
        limit = "h_rt=0:0:%d" % H_RT
        # First the qdel job, cancelled as soon as its training runs; beside it the time limits.
        cls.qdel_job = cls.binary_job("qdel", "qdel-run", ["plain", LONG_STEPS]).submit()
        cls.h_rt_job = cls.binary_job("hrt", "h-rt-run", ["plain", LONG_STEPS],
                                      options=["-l", limit]).submit()
        cls.cancel_when_started(cls.qdel_job)
        cls.notify_job = cls.binary_job("notify", "notify-run", ["plain", LONG_STEPS],
                                        options=["-notify", "-l", limit]).submit()
        # a job script that stages its data before it execs the wrapper: h_rt counts from the
        # job's start, seconds before the wrapper's
        cls.script_job = cls.script_job_of("script", "script-run", ["usr2", LONG_STEPS],
                                           ["-notify", "-l " + limit],
                                           setup=["sleep %d" % STAGE_SECONDS]).submit()
        cls.s_rt_handled_job = cls.binary_job("srt-handled", "s-rt-handled", ["usr1", 36],
                                              options=["-l", "s_rt=0:0:%d" % S_RT]).submit()
        cls.s_rt_plain_job = cls.binary_job("srt-plain", "s-rt-plain", ["plain", 36],
                                            options=["-l", "s_rt=0:0:%d" % S_RT]).submit()
        cls.array_job = cls.binary_job("array", "array-run", ["plain", 4, "2:3"],
                                       options=["-t", "1-3"], tasks=3).submit()
        cls.no_program_job = cls.binary_job("noprog", "no-program-run", [],
                                            program=["/no/such/training-program", "--epochs",
                                                     "1"]).submit()
        cls.monitor = BoundedMonitor(
            ["monitor", "--config", cls.config, "--interval", str(MONITOR_INTERVAL)] +
            [arg for job in cls.jobs for arg in ("--work-dir", job.work)],
            cls.class_env, cls.box.root, cls.box.root)

    @classmethod
    def tearDownClass(cls):
        if getattr(cls, "monitor", None):
            cls.monitor.kill()
        ids = [job.id for job in getattr(cls, "jobs", ()) if job.id and not job.gone()]
        if ids:
            run_command(["qdel", "-f"] + ids, cls.class_env)
            wait_for(lambda: all(job.gone() for job in cls.jobs if job.id), 30, 0.5)
        cls.sge_server.stop()
        cls.box.cleanup()

    # jobs
    @classmethod
    def wrap_argv(cls, work, name, training_args, program=None):
        program = program or [sys.executable, cls.training] + [str(a) for a in training_args]
        return [sys.executable, HPCRUN, "wrap", "--config", cls.config, "--work-dir", work,
                "--name", name, "--"] + program

    @classmethod
    def binary_job(cls, label, name, training_args, options=(), tasks=1, program=None):
        """qsub -b y -shell no python3 hpcrun.py wrap ... -- python3 train.py ARGS."""
        work = cls.box.make_dir("work-" + label)
        argv = cls.wrap_argv(work, name, training_args, program)
        job = SgeJob(cls.box, label, name, work,
                     list(options) + ["-b", "y", "-shell", "no"] + argv, cls.class_env, tasks=tasks)
        cls.jobs.append(job)
        return job

    @classmethod
    def script_job_of(cls, label, name, training_args, directives, setup=()):
        """A job script with #$ lines and setup lines whose last line execs the wrapper."""
        work = cls.box.make_dir("work-" + label)
        argv = cls.wrap_argv(work, name, training_args)
        lines = ["#!/bin/bash", "#$ -S /bin/bash"] + ["#$ %s" % d for d in directives]
        lines += list(setup) + [
            "echo \"job $JOB_ID starts the wrapper\"",
            "exec " + " ".join(shlex.quote(a) for a in argv)]
        script = cls.box.write_file(cls.box.path("jobs", label + ".sh"), "\n".join(lines) + "\n",
                                    mode=0o755, secret=False)
        job = SgeJob(cls.box, label, name, work, [script], cls.class_env, script=script)
        cls.jobs.append(job)
        return job

    @classmethod
    def cancel_when_started(cls, job):
        """qdel the job once its training runs (bounded: the time it may wait for a slot)."""
        started = wait_for(lambda: job.started_facts(), PENDING_WAIT, 0.1)
        if not started:
            raise AssertionError("the training of job %s never started%s" % (job.label, job.describe()))
        status, out, err = run_command(["qdel", job.id], cls.class_env)
        if status != 0:
            raise AssertionError("qdel %s failed: %s%s" % (job.id, (out + err).strip(), job.describe()))
        job.cancelled = time.time()

    # what a failing test shows
    def context(self):
        """The job, what the monitor said of it and the pushes about it. Kept short: every
        failure repeats it, and tests/run.py reads a module's output only at its end."""
        parts = [super(SgeEndingsTest, self).context()]
        monitor = self.monitor
        for job in self.focus:
            parts.append(job.describe())
            said = [line for line in monitor.read_stdout().decode("utf-8", "replace").splitlines()
                    if names_in(line, job.name)]
            parts.append("\n--- the monitor (%s) on %s ---\n%s" % (
                "running" if monitor.proc.poll() is None else "exit %s" % monitor.proc.returncode,
                job.name, clip("\n".join(said), 1200)))
            for push in self.pushes_about(job.name):
                content = push["content"]
                if len(content) > 700:
                    content = content[:700] + " [...]"
                parts.append("\n--- push: %s ---\n%s" % (push["title"], content))
        errors = clip(monitor.read_stderr().decode("utf-8", "replace"), 1200).strip()
        if errors:
            parts.append("\n--- the monitor's stderr ---\n" + errors)
        if self.sge_server.errors:
            parts.append("\nfake xxtui errors: %r" % self.sge_server.errors)
        return "".join(parts)

    def setUp(self):
        super(SgeEndingsTest, self).setUp()
        self.server = self.sge_server
        self.focus = []

    # waiting
    def wait_until(self, what, predicate, timeout, interval=0.25):
        if not wait_for(predicate, timeout, interval):
            self.fail("timed out after %ss waiting for %s" % (timeout, what))

    def wait_for_job_end(self, job):
        """Until qstat no longer knows the job and qacct has a record of each of its tasks."""
        self.focus = [job]
        self.wait_until("job %s (%s) to end" % (job.label, job.id), job.gone,
                        PENDING_WAIT + RUN_WAIT, interval=0.5)
        self.wait_until("qacct to have the %d task(s) of job %s" % (job.tasks, job.id),
                        lambda: len(job.accounting()) >= job.tasks, ACCOUNTING_WAIT, interval=0.5)
        return job.accounting()

    def pushes_about(self, name):
        return [r.json for r in self.sge_server.valid_requests if names_in(r.json["title"], name)]

    def push_times(self, name):
        """time.monotonic() at the arrival of each valid push about a run."""
        server = self.sge_server
        return [when for request, when in zip(list(server.requests), list(server.request_times))
                if not request.problems and names_in(request.json["title"], name)]

    def only_push_about(self, name, count=1):
        """The pushes about a run once there are `count` and QUIET seconds passed since the
        last of them without another one."""
        self.wait_until("%d report(s) about %s" % (count, name),
                        lambda: len(self.pushes_about(name)) >= count, STALE_AFTER + DELIVERY_WAIT)
        quiet_until = self.push_times(name)[count - 1] + QUIET
        more = wait_for(lambda: len(self.pushes_about(name)) > count,
                        max(0.0, quiet_until - time.monotonic()), MONITOR_INTERVAL)
        pushes = self.pushes_about(name)
        self.assertFalse(more, "more than %d report(s) about %s: %s"
                         % (count, name, [p["title"] for p in pushes]))
        return pushes

    def assertReads(self, push, kinds, cause=None):
        """The push reads as one of `kinds` in its title and, when `cause` (a pattern) is
        given, its "Cause:" line matches it. One failure that says both (no subTests:
        tests/run.py would count each failed one as a failed test)."""
        problems = []
        kind = report_kind(push["title"])
        if kind not in kinds:
            problems.append("the title reads as %s, expected %s" % (kind, " or ".join(kinds)))
        said = cause_line(push["content"])
        if cause and not re.search(cause, said or ""):
            problems.append("the Cause: line is %r, expected %r" % (said, cause))
        if problems:
            self.fail("%s\n  title: %s\n  Cause: %s" % ("; ".join(problems), push["title"], said))

    # --- the cases of issue 13 ---

    def test_h_rt_without_notify_kills_the_job_silently_reported_once_as_time_limit(self):
        job = self.h_rt_job
        accounting = self.wait_for_job_end(job)
        self.assertTrue(job.started_facts(), "precondition: the training ran")
        self.assertRegex(accounting[0]["failed"], r"^37\b.*h_rt",
                         "precondition: Grid Engine enforced h_rt (qacct failed 37)")
        self.assertEqual(accounting[0]["exit_status"].split()[0], "137",
                         "precondition: the job was SIGKILLed")
        self.assertEqual(job.signals(), [], "precondition: no signal came before the kill")

        pushes = self.only_push_about("h-rt-run")
        push = pushes[0]
        self.assertNotRegex(push["title"], SUCCESS_WORDS)
        self.assertIn(job.id, push["content"], "the report names the job")
        self.assertReads(push, ("time_limit", "lost"), r"^time limit reached")
        self.assertServerClean()

    def test_notify_sigusr2_kills_a_training_without_handler_reported_once_as_time_limit(self):
        job = self.notify_job
        accounting = self.wait_for_job_end(job)
        self.assertTrue(job.started_facts(), "precondition: the training ran")
        self.assertEqual(accounting[0]["exit_status"].split()[0], "140",
                         "precondition: the training (and so the wrapper) ended of SIGUSR2, "
                         "before the SIGKILL")
        self.assertRegex(accounting[0]["failed"], r"^37\b",
                         "precondition: Grid Engine enforced h_rt (qacct failed 37)")

        pushes = self.only_push_about("notify-run")
        push = pushes[0]
        self.assertIn(job.id, push["content"], "the report names the job")
        self.assertReads(push, ("time_limit",), r"^time limit reached")
        self.assertNotRegex(push["title"], r"SIGUSR2",
                            "SIGUSR2 is how Grid Engine warns of the limit, not the cause")
        self.assertServerClean()

    def test_job_script_exec_wrap_training_checkpointing_on_sigusr2_reported_once_as_time_limit(self):
        job = self.script_job
        accounting = self.wait_for_job_end(job)
        signals = job.signals()
        self.assertEqual([name for _, name, _ in signals], ["SIGUSR2"],
                         "precondition: the training got -notify's SIGUSR2 once")
        started = list(job.started_facts().values())
        self.assertEqual(len(started), 1, "precondition: the training started once")
        # counted from the job's start (qacct's, to the second): a loaded machine may take
        # seconds to start the training
        job_start = time.mktime(time.strptime(accounting[0]["start_time"], "%a %b %d %H:%M:%S %Y"))
        self.assertGreaterEqual(signals[0][0] - job_start, H_RT - 1,
                                "precondition: the SIGUSR2 came at the time limit (%.1fs after "
                                "the job's start)" % (signals[0][0] - job_start))
        self.assertEqual(accounting[0]["exit_status"].split()[0], "0",
                         "precondition: the training saved its checkpoint and exited 0")
        self.assertRegex(accounting[0]["failed"], r"^37\b",
                         "precondition: Grid Engine counts the job as ended by h_rt (qacct "
                         "failed 37) although its exit status is 0")
        output = "".join(read_text(path) for path in job.output_paths())
        self.assertIn("starts the wrapper", output, "precondition: the script ran")

        pushes = self.only_push_about("script-run")
        push = pushes[0]
        self.assertIn("checkpoint saved (SIGUSR2)", push["content"], "the log tail ends the report")
        # stopped at its time limit, the training did not finish: not a success
        self.assertReads(push, ("time_limit",), r"^time limit reached")
        self.assertServerClean()

    def test_s_rt_sigusr1_handled_by_the_training_reported_once_success_with_a_warning(self):
        job = self.s_rt_handled_job
        accounting = self.wait_for_job_end(job)
        self.assertEqual([name for _, name, _ in job.signals()], ["SIGUSR1"],
                         "precondition: s_rt sent the training SIGUSR1 once")
        self.assertEqual((accounting[0]["failed"].split()[0], accounting[0]["exit_status"].split()[0]),
                         ("0", "0"), "precondition: the job ran to its end")

        pushes = self.only_push_about("s-rt-handled")
        push = pushes[0]
        self.assertEqual(report_kind(push["title"]), "success", push["title"])
        self.assertIn("training finished", push["content"])
        self.assertRegex(push["content"], r"SIGUSR1", "a warning: the soft time limit (s_rt) passed")
        self.assertServerClean()

    def test_s_rt_sigusr1_kills_a_training_without_handler_reported_once_as_time_limit(self):
        job = self.s_rt_plain_job
        accounting = self.wait_for_job_end(job)
        facts = job.started_facts()
        self.assertTrue(facts, "precondition: the training ran")
        self.assertEqual(accounting[0]["exit_status"].split()[0], "138",
                         "precondition: the training (and so the wrapper) ended of SIGUSR1")

        pushes = self.only_push_about("s-rt-plain")
        push = pushes[0]
        self.assertReads(push, ("time_limit",), r"^time limit reached")
        self.assertRegex(push["content"], r"SIGUSR1", "the report names the signal, so that the "
                                                      "user knows what to handle")
        self.assertServerClean()

    def test_qdel_of_a_running_job_reported_once_as_cancelled(self):
        job = self.qdel_job
        accounting = self.wait_for_job_end(job)
        self.assertRegex(accounting[0]["failed"], r"^100\b",
                         "precondition: qacct says failed 100 (assumedly after job)")
        self.assertEqual(accounting[0]["exit_status"].split()[0], "137",
                         "precondition: qdel SIGKILLed the job")

        pushes = self.only_push_about("qdel-run")
        push = pushes[0]
        self.assertIn(job.id, push["content"], "the report names the job")
        self.assertReads(push, ("lost", "cancelled", "terminated", "killed"), r"^cancelled")
        self.assertServerClean()

    def test_array_job_of_three_tasks_one_failing_gives_one_digest_with_the_task_and_resubmit(self):
        job = self.array_job
        accounting = self.wait_for_job_end(job)
        self.assertEqual(sorted((r["taskid"], r["exit_status"].split()[0]) for r in accounting),
                         [("1", "0"), ("2", "3"), ("3", "0")], "precondition: task 2 failed")
        facts = job.started_facts()
        self.assertEqual(sorted(facts), ["1", "2", "3"], "precondition: three trainings ran")
        for task, fact in facts.items():
            self.assertEqual((fact["env"]["JOB_ID"], fact["env"]["SGE_TASK_ID"]), (job.id, task))
        logs = log_files(job.work)
        self.assertEqual(len(logs), 3, "one log per task: %s" % logs)

        pushes = self.only_push_about("array-run", count=1)
        digest = pushes[0]
        self.assertEqual(digest["title"], "📦 Array %s array-run: 2/3 ok · 1 exit 3" % job.id)
        self.assertIn("Tasks: 3 · ok 2 · failed 1 · never started 0", digest["content"])
        self.assertIn("Failed: 2 (exit 3)", digest["content"])
        self.assertRegex(digest["content"], r"(?m)^Resubmit: qsub -t 2 -b y -shell no .*hpcrun.*wrap")
        sent = {run_id: record for run_id, record in read_records(job.work, "sent").items()
                if record.get("status") in ("success", "failed", "killed", "terminated")}
        self.assertEqual(len(sent), 3, sorted(sent))
        self.assertEqual(sorted(str((r.get("job") or {}).get("id")) for r in sent.values()),
                         [job.id] * 3, "JOB_ID in each record")
        self.assertEqual(sorted((str((r.get("job") or {}).get("array_index")), r["status"],
                                 r["exit_code"]) for r in sent.values()),
                         [("1", "success", 0), ("2", "failed", 3), ("3", "success", 0)])
        self.assertServerClean()

    def test_training_command_that_cannot_start_reported_once_as_cannot_start(self):
        job = self.no_program_job
        accounting = self.wait_for_job_end(job)
        self.assertEqual(accounting[0]["exit_status"].split()[0], "127",
                         "precondition: wrap ran and exited 127")

        pushes = self.only_push_about("no-program-run")
        push = pushes[0]
        self.assertReads(push, ("failed",), r"^the command could not be started")
        self.assertIn("cannot start", push["title"])
        self.assertIn("/no/such/training-program", push["content"])
        self.assertServerClean()


if __name__ == "__main__":
    unittest.main()
