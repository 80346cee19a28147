"""No run ends unreported (issue 3): signals, lost and stalled runs, racing monitors, bad input,
end to end with the real hpcrun.py.

Everything here runs without a real Slurm: a fake Slurm is a job environment plus stub
`squeue`, `scontrol` and `sacct` first on PATH. The settings are small so that the whole file
stays fast: heartbeats every second, runs lost after one to three silent seconds, retries at
the next poll. What needs no real process (planted records, --once passes, a monitor whose
clock the test moves) is in test_reliability_in_process.py.
"""

import ctypes
import json
import os
import re
import signal
import subprocess
import sys
import time
import unittest

from support import (HpcrunTestCase, Reply, hpcrun_argv, kill_group, names_in, pass_time,
                     read_bytes, read_records, record_names, report_kind, wait_for)

LAYER = "process"


# --- trainings ---

# Waits (bounded) for the file `go` in its work dir; dies of any signal by default.
# Writes "pid pgid sid" to training.pid once it runs, and never dumps core.
WAITING_TRAINING = (
    "import os, resource, time\n"
    "resource.setrlimit(resource.RLIMIT_CORE, (0, 0))\n"
    "with open('training.pid', 'w') as out:\n"
    "    out.write('%d %d %d' % (os.getpid(), os.getpgrp(), os.getsid(0)))\n"
    "print('ready', flush=True)\n"
    "deadline = time.time() + 30\n"
    "while not os.path.exists('go') and time.time() < deadline:\n"
    "    time.sleep(0.01)\n"
    "print('finished', flush=True)\n")

# Counts the SIGTERMs it gets (one line each in `terms`); after the first it keeps running
# for argv[1] seconds, long enough to see a second one, then exits 0.
COUNTING_TRAINING = (
    "import os, signal, sys, time\n"
    "terms = []\n"
    "def on_term(number, frame):\n"
    "    terms.append(time.time())\n"
    "    with open('terms', 'a') as out:\n"
    "        out.write('%r\\n' % time.time())\n"
    "signal.signal(signal.SIGTERM, on_term)\n"
    "with open('training.pid', 'w') as out:\n"
    "    out.write('%d %d %d' % (os.getpid(), os.getpgrp(), os.getsid(0)))\n"
    "print('ready', flush=True)\n"
    "deadline = time.time() + 30\n"
    "while not terms and time.time() < deadline:\n"
    "    time.sleep(0.01)\n"
    "end = time.time() + float(sys.argv[1])\n"
    "while time.time() < end:\n"
    "    time.sleep(0.01)\n"
    "print('sigterms seen: %d' % len(terms), flush=True)\n")

# Ignores SIGTERM and runs (bounded) until killed.
STUBBORN_TRAINING = (
    "import os, signal, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "with open('training.pid', 'w') as out:\n"
    "    out.write('%d %d %d' % (os.getpid(), os.getpgrp(), os.getsid(0)))\n"
    "print('ready', flush=True)\n"
    "deadline = time.time() + 30\n"
    "while time.time() < deadline:\n"
    "    time.sleep(0.01)\n")

# Checkpoints on SIGUSR1 (writes `usr1`), else like WAITING_TRAINING.
CHECKPOINTING_TRAINING = (
    "import os, signal, time\n"
    "signal.signal(signal.SIGUSR1, lambda n, f: open('usr1', 'w').close())\n"
    + WAITING_TRAINING)

# Two steps of output, each followed by a wait for a file. Each line is written the way
# print() writes it under PYTHONUNBUFFERED=1 (which wrap sets): the text, then the newline,
# in two writes; the pause between them makes the relay see them as two reads every time.
STEPPING_TRAINING = (
    "import os, sys, time\n"
    "def wait_for(name):\n"
    "    deadline = time.time() + 30\n"
    "    while not os.path.exists(name) and time.time() < deadline:\n"
    "        time.sleep(0.01)\n"
    "def say(text):\n"
    "    sys.stdout.write(text); sys.stdout.flush(); time.sleep(0.1)\n"
    "    sys.stdout.write('\\n'); sys.stdout.flush()\n"
    "say('epoch 1')\n"
    "wait_for('go1')\n"
    "say('epoch 2 loss 0.5')\n"
    "wait_for('go2')\n")

# Silent (a hung collective) until `go`, then a line every 0.2 s until `stop`.
HANGING_TRAINING = (
    "import os, time\n"
    "print('epoch 1', flush=True)\n"
    "deadline = time.time() + 30\n"
    "while not os.path.exists('go') and time.time() < deadline:\n"
    "    time.sleep(0.01)\n"
    "tick = 0\n"
    "while not os.path.exists('stop') and time.time() < deadline:\n"
    "    tick += 1\n"
    "    print('tick %d' % tick, flush=True)\n"
    "    time.sleep(0.2)\n")

# 100 KiB of output (more than the 64 KiB log disk), a pause that lets the wrapper hit
# the full disk, then 100 KiB more and a last line: proof that it goes on.
FLOODING_TRAINING = (
    "import sys, time\n"
    "def flood(start):\n"
    "    for i in range(start, start + 100):\n"
    "        sys.stdout.buffer.write(b'%04d ' % i + b'x' * 1018 + b'\\n')\n"
    "    sys.stdout.flush()\n"
    "flood(0)\n"
    "time.sleep(0.3)\n"
    "with open('after-full', 'w') as out:\n"
    "    out.write('alive')\n"
    "flood(100)\n"
    "print('done after the disk filled', flush=True)\n")

SELF_SIGNAL_TRAINING = (
    "import os, resource, signal\n"
    "resource.setrlimit(resource.RLIMIT_CORE, (0, 0))\n"
    "print('about to die', flush=True)\n"
    "os.kill(os.getpid(), signal.%s)\n")

LIST_DIR = "import os, sys; os.listdir(sys.argv[1])"

ABORTING_TRAINING = (
    "import os, resource\n"
    "resource.setrlimit(resource.RLIMIT_CORE, (0, 0))\n"
    "print('about to abort', flush=True)\n"
    "os.abort()\n")


# --- stub scheduler clients: they log each call and answer from files beside them ---

SQUEUE_STUB = """#!/bin/sh
echo "squeue $*" >> '{dir}/calls.log'
job=""
while [ $# -gt 0 ]; do
    case "$1" in -j) job="$2"; shift ;; esac
    shift
done
[ -f '{dir}/end-'"$job" ] || exit 1
cat '{dir}/end-'"$job"
"""

SCONTROL_STUB = """#!/bin/sh
echo "scontrol $*" >> '{dir}/calls.log'
if [ "$1 $2" = "show config" ]; then
    [ -f '{dir}/config' ] && cat '{dir}/config'
    exit 0
fi
if [ "$1 $2" = "show job" ] && [ -f '{dir}/job-'"$3" ]; then
    cat '{dir}/job-'"$3"
    exit 0
fi
echo "slurm_load_jobs error: Invalid job id specified" >&2
exit 1
"""

SACCT_STUB = """#!/bin/sh
echo "sacct $*" >> '{dir}/calls.log'
exit 1
"""

# Titles of English reports, by kind (the first match wins).

def pid_exists(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def kill_group_quietly(pgid):
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass


def drop_dac_override():
    """preexec_fn: root without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH obeys chmod 000."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):       # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, capability, 0, 0, 0) != 0:     # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


class ReliabilityTestCase(HpcrunTestCase):
    """A fake xxtui per test and small settings; helpers to plant records and read reports."""

    FAST = {
        "wrap": {"heartbeat_interval": "1"},
        "monitor": {"stale_after": "3", "stall_after": "0", "retry_base": "0"},
    }

    def setUp(self):
        HpcrunTestCase.setUp(self)
        self.start_server()
        self.configure()

    def configure(self, **sections):
        """Config for the fake xxtui with FAST settings, updated by sections (dicts)."""
        overrides = {}
        for source in (self.FAST, sections):
            for section, values in source.items():
                overrides.setdefault(section, {}).update(values)
        return self.configure_xxtui(self.server, overrides=overrides)

    # records
    def plant(self, work, sub, run_id, record):
        """Write a record the way hpcrun does: temporary file, then rename."""
        for state in ("running", "done", "claimed", "delivery", "sent"):    # as wrap does
            os.makedirs(os.path.join(work, ".hpcrun", state), exist_ok=True)
        directory = os.path.join(work, ".hpcrun", sub)
        temp = os.path.join(directory, ".plant-%s" % run_id)
        data = record if isinstance(record, bytes) else json.dumps(record).encode("utf-8")
        with open(temp, "wb") as out:
            out.write(data)
        os.replace(temp, os.path.join(directory, run_id + ".json"))
        return os.path.join(directory, run_id + ".json")

    def completion_record(self, work, run_id, **fields):
        now = time.time()
        record = {"schema": 1, "run_id": run_id, "name": run_id, "status": "success",
                  "exit_code": 0, "final": True, "command": "python train.py",
                  "work_dir": work, "host": "node07", "pid": 4321, "start_time": now - 60,
                  "end_time": now, "duration": 60.0, "job": None}
        record.update(fields)
        return record

    def plant_done(self, work, run_id, **fields):
        return self.plant(work, "done", run_id, self.completion_record(work, run_id, **fields))

    def plant_running(self, work, run_id, seq, job=None, log_size=100):
        return self.plant(work, "running", run_id, {
            "schema": 1, "run_id": run_id, "name": run_id, "command": "python train.py",
            "work_dir": work, "host": "node07", "pid": 4321, "start_time": time.time() - 60,
            "seq": seq, "written_at": time.time(), "heartbeat_interval": 1.0,
            "log_size": log_size, "last_line": "epoch 3 loss 0.25", "warnings": [], "job": job})

    def ping(self, work, label):
        """A finished run planted and waited for: the monitor has polled at least once more."""
        name = "ping-" + label
        self.plant_done(work, name)
        self.assertTrue(wait_for(lambda: name in read_records(work, "sent"), timeout=10),
                        "the monitor did not deliver %s" % name)

    def done_record(self, work):
        """The one completion record in done/, or None."""
        records = read_records(work, "done")
        return list(records.values())[0] if len(records) == 1 else None

    # reports
    def reports_of(self, name, server=None):
        """Kinds of the reports pushed about name, in arrival order."""
        server = server or self.server
        return [report_kind(body["title"]) for body in server.bodies
                if names_in(body["title"], name)]

    def bodies_of(self, name, kind=None, server=None):
        server = server or self.server
        return [body for body in server.bodies if names_in(body["title"], name)
                and (kind is None or report_kind(body["title"]) == kind)]

    def wait_for_report(self, name, kind, count=1, timeout=15, server=None):
        reached = wait_for(lambda: len([k for k in self.reports_of(name, server) if k == kind])
                           >= count, timeout=timeout)
        self.assertTrue(reached, "no %s report about %s within %ss\n%s"
                        % (kind, name, timeout, (server or self.server).describe()))
        times = [t for t, body in zip((server or self.server).request_times,
                                      (server or self.server).bodies)
                 if names_in(body["title"], name) and report_kind(body["title"]) == kind]
        return times[count - 1]

    # processes
    def monitor(self, *work_dirs, **options):
        """A long-running monitor polling every 0.25 s."""
        args = ["monitor", "--interval", options.pop("interval", "0.25")]
        for work in work_dirs or (self.sb.work,):
            args += ["--work-dir", work]
        return self.start(*args, **options)

    def once(self, *work_dirs, **options):
        args = ["monitor", "--once"]
        for work in work_dirs or (self.sb.work,):
            args += ["--work-dir", work]
        return self.hpcrun(*args, **options)

    def start_training(self, script, *args, **options):
        """wrap -- python -c script args; returns (background, work) once the training runs."""
        work = options.pop("work", self.sb.work)
        background = self.start_wrap(sys.executable, "-c", script, *args, work=work, **options)
        pid_file = os.path.join(work, "training.pid")
        self.addCleanup(kill_group_quietly, background.proc.pid)
        if "training.pid" in script:
            self.assertTrue(wait_for(lambda: os.path.exists(pid_file) and
                                     read_bytes(pid_file).count(b" ") == 2, timeout=15),
                            "the training did not start" + background.result().describe())
        return background, work

    def training_ids(self, work):
        with open(os.path.join(work, "training.pid")) as handle:
            return [int(field) for field in handle.read().split()]

    def kill_wrapper_and_training(self, background):
        """What a silent SIGKILL of the whole job does: no record, no goodbye."""
        kill_group(background.proc)
        background.proc.wait()

    # a fake Slurm
    def install_fake_slurm(self):
        self.bin = self.sb.make_dir("bin")
        for name, text in (("squeue", SQUEUE_STUB), ("scontrol", SCONTROL_STUB),
                           ("sacct", SACCT_STUB)):
            path = self.sb.write_file(os.path.join(self.bin, name), text.format(dir=self.bin),
                                      secret=False)
            os.chmod(path, 0o755)
        self.env["PATH"] = self.bin + os.pathsep + self.env.get("PATH", "/usr/bin:/bin")

    def slurm_env(self, job_id, **extra):
        env = dict(self.env, SLURM_JOB_ID=str(job_id), SLURM_JOB_NAME="fakejob",
                   SLURM_JOB_NODELIST="node01", SLURM_JOB_PARTITION="gpu",
                   SLURM_JOB_NUM_NODES="1")
        env.update(extra)
        return env

    def set_job(self, job_id, end_time=None, state="RUNNING", reason="None", exit_code="0:0"):
        """What `squeue -o %e` and `scontrol show job` say about a job from now on."""
        end = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(end_time or time.time() + 3600))
        self.sb.write_file(os.path.join(self.bin, "end-%s" % job_id), end + "\n", secret=False)
        self.sb.write_file(os.path.join(self.bin, "job-%s" % job_id), (
            "JobId={id} JobName=fakejob\n"
            "   UserId=root(0) GroupId=root(0) MCS_label=N/A\n"
            "   JobState={state} Reason={reason} Dependency=(null)\n"
            "   Requeue=1 Restarts=0 BatchFlag=1 Reboot=0 ExitCode={exit_code}\n"
            "   RunTime=00:00:01 TimeLimit=01:00:00 TimeMin=N/A\n"
            "   SubmitTime={start} EligibleTime={start}\n"
            "   StartTime={start} EndTime={end} Deadline=N/A\n"
            "   Partition=gpu AllocNode:Sid=login1:4242\n"
            "   NodeList=node01\n"
            "   StdOut={out}/slurm-{id}.out\n").format(
                id=job_id, state=state, reason=reason, exit_code=exit_code, end=end,
                start=time.strftime("%Y-%m-%dT%H:%M:%S"), out=self.sb.root), secret=False)

    def job_queries(self, job_id):
        """Calls that asked the scheduler about one job (squeue -j ID, scontrol show job ID)."""
        return [line for line in self.calls() if re.search(r"\bsqueue .*-j %s\b|\bscontrol show "
                                                           r"job %s\b" % (job_id, job_id), line)]

    def assertOneLogLine(self, result, needle, *words):
        lines = [line for line in (result.out + result.err).splitlines()
                 if needle in line and all(re.search(w, line) for w in words)]
        self.assertEqual(len(lines), 1, "expected one line with %r and %r" % (needle, words)
                         + result.describe())
        return lines[0]

    def calls(self, *words):
        try:
            with open(os.path.join(self.bin, "calls.log")) as handle:
                lines = handle.read().splitlines()
        except OSError:
            return []
        return [line for line in lines if line.split()[:len(words)] == list(words)]


class WrapperSignalTest(ReliabilityTestCase):

    def test_sigterm_gives_a_provisional_record_within_a_second_and_forwards_one_sigterm(self):
        self.configure(wrap={"grace": "4"})
        background, work = self.start_training(COUNTING_TRAINING, "1.2")
        _, pgid, sid = self.training_ids(work)
        sent_at, sent_mono = time.time(), time.monotonic()
        background.proc.send_signal(signal.SIGTERM)
        provisional = wait_for(lambda: self.done_record(work), timeout=1.0)
        within = time.monotonic() - sent_mono
        result = self.finish(background)

        self.assertTrue(provisional, "no completion record within a second of SIGTERM")
        self.assertLess(within, 1.0)
        self.assertIs(provisional["final"], False, provisional)
        self.assertEqual(provisional["status"], "terminated", provisional)
        self.assertEqual(provisional["signal"], "SIGTERM", provisional)
        self.assertExit(result, 143)
        _, record = self.only_record(work=work, result=result)
        self.assertIs(record["final"], True, record)
        self.assertEqual((record["status"], record["exit_code"], record["signal"]),
                         ("terminated", 143, "SIGTERM"), record)
        self.assertEqual(record["cause"], "cancelled", record)
        self.assertEqual(record_names(work, "running"), [])

        with open(os.path.join(work, "terms")) as handle:
            terms = [float(line) for line in handle.read().split()]
        self.assertEqual(len(terms), 1, "the training got %d SIGTERMs" % len(terms))
        self.assertIn(b"sigterms seen: 1\n", result.stdout, result.describe())
        self.assertTrue(0.5 <= terms[0] - sent_at <= 3.0,
                        "SIGTERM forwarded %.2fs after the wrapper got it, expected ~1s"
                        % (terms[0] - sent_at))
        # the training stays in the wrapper's session and process group
        self.assertEqual((pgid, sid), (background.proc.pid, background.proc.pid))

    def test_a_sigterm_to_the_whole_process_group_reaches_a_training_that_stops_only_once(self):
        background, work = self.start_training(COUNTING_TRAINING, "0.5")
        os.killpg(background.proc.pid, signal.SIGTERM)      # as PBS, SGE or a terminal do
        result = self.finish(background)
        self.assertExit(result, 143)
        with open(os.path.join(work, "terms")) as handle:
            count = len(handle.read().split())
        self.assertEqual(count, 1, "the training, signalled directly, got the wrapper's "
                                   "forward too" + result.describe())
        _, record = self.only_record(work=work, result=result)
        self.assertEqual((record["status"], record["signal"], record["final"]),
                         ("terminated", "SIGTERM", True), record)

    def test_sigint_sighup_and_sigxcpu_give_terminated_records_and_exit_128_plus_n(self):
        runs = []
        for number in (signal.SIGINT, signal.SIGHUP, signal.SIGXCPU):
            work = self.sb.make_dir("work-%s" % signal.Signals(number).name)
            runs.append((number, work) + self.start_training(WAITING_TRAINING, work=work)[:1])
        sent = {}
        for number, work, background in runs:
            sent[number] = time.time()
            background.proc.send_signal(number)
        for number, work, background in runs:
            name = signal.Signals(number).name
            with self.subTest(name):
                # how soon the wrapper ended the run, by its own clock: this test's polling of
                # three runs in turn on a loaded machine is no measure of it
                provisional = wait_for(lambda: self.done_record(work), timeout=10.0)
                self.assertTrue(provisional, "no record within 10 s of %s" % name)
                self.assertLess(provisional["end_time"] - sent[number], 1.5, provisional)
                result = self.finish(background)
                self.assertExit(result, 128 + int(number))
                self.assertNotIn("Traceback", result.err)
                _, record = self.only_record(work=work, result=result)
                self.assertEqual((record["status"], record["exit_code"], record["signal"],
                                  record["final"]),
                                 ("terminated", 128 + int(number), name, True), record)
                if number == signal.SIGINT:
                    self.assertEqual(record["cause"], "interrupted", record)
                else:
                    self.assertNotEqual(record.get("cause"), "interrupted", record)

    def test_sigkill_right_after_sigterm_leaves_a_provisional_record_that_gets_reported(self):
        self.configure(monitor={"stale_after": "0.5"})
        background, work = self.start_training(WAITING_TRAINING, extra=["--name", "cut-short"])
        background.proc.send_signal(signal.SIGTERM)
        provisional = wait_for(lambda: self.done_record(work), timeout=1.0)
        background.proc.send_signal(signal.SIGKILL)
        background.proc.wait()
        kill_group_quietly(background.proc.pid)           # the training, left behind
        self.assertTrue(provisional, "no completion record within a second of SIGTERM")
        self.assertIs(self.done_record(work)["final"], False)

        result = self.once()
        self.assertExit(result, 0)
        self.assertNoTraceback(result)
        self.assertServerClean()
        self.assertEqual(self.reports_of("cut-short"), ["terminated"], self.server.describe())
        body = self.server.bodies[0]
        self.assertIn("SIGTERM", body["title"])
        self.assertRegex(body["content"], r"(?i)provisional")
        pass_time(0.7)                                    # beyond stale_after: no lost report
        again = self.once()
        self.assertExit(again, 0)
        self.assertRequestCount(1, context=again)

    def test_sigusr1_is_recorded_as_a_warning_and_forwarded_only_when_asked(self):
        plain_work, forward_work = self.sb.make_dir("plain"), self.sb.make_dir("forward")
        plain, _ = self.start_training(WAITING_TRAINING, work=plain_work)
        forward, _ = self.start_training(CHECKPOINTING_TRAINING, work=forward_work,
                                         extra=["--forward-signal", "USR1"])
        plain.proc.send_signal(signal.SIGUSR1)
        forward.proc.send_signal(signal.SIGUSR1)

        def warned(work):
            records = read_records(work, "running")
            return records and any("SIGUSR1" in warning for warning in
                                   list(records.values())[0].get("warnings") or ())

        self.assertTrue(wait_for(lambda: warned(plain_work), timeout=10),
                        "SIGUSR1 not in the running record: %r"
                        % read_records(plain_work, "running"))
        checkpointed = wait_for(lambda: os.path.exists(os.path.join(forward_work, "usr1")),
                                timeout=10)
        self.assertTrue(warned(forward_work) or wait_for(lambda: warned(forward_work), 5))
        for work in (plain_work, forward_work):
            open(os.path.join(work, "go"), "w").close()

        # a training that dies of SIGUSR1 by default ran to its end: nothing was forwarded
        result = self.finish(plain)
        self.assertExit(result, 0)
        self.assertIn(b"finished", result.stdout)
        _, record = self.only_record(work=plain_work, result=result)
        self.assertEqual(record["status"], "success", record)
        self.assertTrue(any("SIGUSR1" in w for w in record.get("warnings") or ()), record)

        result = self.finish(forward)
        self.assertExit(result, 0)
        self.assertTrue(checkpointed, "--forward-signal USR1 did not forward SIGUSR1")

    def test_a_training_dying_of_a_crash_signal_is_a_crash_and_one_sigkilled_is_killed(self):
        cases = [("SIGSEGV", SELF_SIGNAL_TRAINING % "SIGSEGV", "crash"),
                 ("SIGBUS", SELF_SIGNAL_TRAINING % "SIGBUS", "crash"),
                 ("SIGABRT", ABORTING_TRAINING, "crash"),
                 ("SIGKILL", WAITING_TRAINING, None)]
        runs = []
        for name, script, cause in cases:
            work = self.sb.make_dir("work-" + name)
            runs.append((name, cause, work, self.start_training(script, work=work)[0]))
        for name, cause, work, background in runs:
            if name == "SIGKILL":
                os.kill(self.training_ids(work)[0], signal.SIGKILL)   # e.g. the OOM killer
        for name, cause, work, background in runs:
            with self.subTest(name):
                number = int(getattr(signal, name))
                result = self.finish(background)
                self.assertExit(result, 128 + number)
                _, record = self.only_record(work=work, result=result)
                self.assertEqual((record["status"], record["exit_code"], record["signal"]),
                                 ("killed", 128 + number, name), record)
                if cause:
                    self.assertEqual(record["cause"], cause, record)
                else:
                    self.assertNotIn(record.get("cause"), ("crash", "oom", "time_limit",
                                                           "cancelled", "interrupted"), record)

    def test_the_heartbeat_rewrites_the_running_record_with_seq_log_size_and_last_line(self):
        background, work = self.start_training(STEPPING_TRAINING)
        seen = []

        def running_where(check):
            records = read_records(work, "running")
            record = list(records.values())[0] if len(records) == 1 else None
            if record:
                seen.append(record.get("seq"))
            return record if record and check(record) else None

        # the heartbeat after the whole first line: its size and the line itself
        first = wait_for(lambda: running_where(lambda r: r.get("log_size") == 8), timeout=10)
        self.assertTrue(first, "no heartbeat with log_size 8: %r" % read_records(work, "running"))
        open(os.path.join(work, "go1"), "w").close()
        second = wait_for(lambda: running_where(lambda r: r.get("log_size") == 25), timeout=10)
        self.assertTrue(second, "no heartbeat with log_size 25: %r"
                        % read_records(work, "running"))
        # without new output the heartbeat still goes on
        third = wait_for(lambda: running_where(lambda r: r["seq"] > second["seq"]), timeout=10)
        open(os.path.join(work, "go2"), "w").close()
        result = self.finish(background)
        self.assertExit(result, 0)
        self.assertTrue(third, "seq did not advance without output: %r" % seen)
        self.assertGreater(second["seq"], first["seq"])
        numbers = [s for s in seen if isinstance(s, int)]
        self.assertEqual(numbers, sorted(numbers), "seq went backwards: %r" % seen)
        self.assertEqual([first.get("last_line"), second.get("last_line"), third.get("last_line")],
                         ["epoch 1", "epoch 2 loss 0.5", "epoch 2 loss 0.5"],
                         "last_line of the heartbeats (a line written as text, then newline)")
        self.assertEqual(record_names(work, "running"), [])


class FakeSlurmTest(ReliabilityTestCase):
    """A Slurm job environment and stub squeue/scontrol/sacct on PATH."""

    def setUp(self):
        ReliabilityTestCase.setUp(self)
        self.install_fake_slurm()

    def test_sigterm_near_the_job_end_time_is_a_time_limit_and_far_from_it_cancelled(self):
        now = time.time()
        self.set_job(101, end_time=now + 5)
        self.set_job(102, end_time=now + 3600)
        self.set_job(103, end_time=now + 3600)
        cases = [("end time from the scheduler, a few seconds ahead", 101, {}, "time_limit"),
                 ("end time from the scheduler, an hour ahead", 102, {}, "cancelled"),
                 ("end time from SLURM_JOB_END_TIME, a few seconds ahead", 103,
                  {"SLURM_JOB_END_TIME": str(int(now + 5))}, "time_limit")]
        runs = []
        for label, job_id, extra, cause in cases:
            work = self.sb.make_dir("job-%d" % job_id)
            background, _ = self.start_training(WAITING_TRAINING, work=work,
                                                env=self.slurm_env(job_id, **extra))
            runs.append((label, job_id, cause, work, background))
        # --signal=B:USR1@300: a warning in the running record that says how long is left
        near = runs[0][4]
        near.proc.send_signal(signal.SIGUSR1)
        warned = wait_for(lambda: [w for r in read_records(runs[0][3], "running").values()
                                   for w in r.get("warnings") or () if "SIGUSR1" in w],
                          timeout=10)
        for label, job_id, cause, work, background in runs:
            background.proc.send_signal(signal.SIGTERM)
        for label, job_id, cause, work, background in runs:
            with self.subTest(label):
                result = self.finish(background)
                self.assertExit(result, 143)
                _, record = self.only_record(work=work, result=result)
                self.assertEqual(record["status"], "terminated", record)
                self.assertEqual(record["cause"], cause, record)
                self.assertEqual(str(record["job"]["id"]), str(job_id), record)
                # asked once at start (squeue -o %e or scontrol show job), not in a loop; a job
                # this near its end is asked again at each heartbeat (a raised limit is followed),
                # and until the stop signal only (once a second here)
                asked = len(self.job_queries(job_id))
                if job_id == 102:
                    self.assertEqual(asked, 1, "scheduler calls: %r" % self.calls())
                else:
                    self.assertLessEqual(asked, 2 + int(record["duration"]), "scheduler calls: %r" % self.calls())
        self.assertTrue(warned, "no SIGUSR1 warning in the running record")
        self.assertRegex(warned[0], r"(?i)time limit in ~\s*\d", warned)

    def test_a_training_ignoring_sigterm_is_killed_after_the_configured_grace_or_killwait(self):
        self.sb.write_file(os.path.join(self.bin, "config"),
                           "KillWait                = 5 sec\nMinJobAge               = 300 sec\n",
                           secret=False)
        self.set_job(104)
        # seconds from SIGTERM to the wrapper's end: the forward after ~1 s, then the grace
        cases = [("[wrap] grace = 1", dict(self.env, HPCRUN_WRAP_GRACE="1"), 1.5, 3.5),
                 # max(KillWait, 5) - 3 = 2 s (KillWait itself would be 5 s, the default 8 s)
                 ("Slurm's KillWait", self.slurm_env(104), 2.5, 5.0)]
        runs = []
        for label, env, shortest, longest in cases:
            work = self.sb.make_dir("work-%d" % len(runs))
            background, _ = self.start_training(STUBBORN_TRAINING, work=work, env=env)
            runs.append((label, work, background, self.training_ids(work)[0]))
        started = time.monotonic()
        for label, work, background, pid in runs:
            background.proc.send_signal(signal.SIGTERM)
        ended = {}

        def all_ended():
            for label, work, background, pid in runs:
                if label not in ended and background.proc.poll() is not None:
                    ended[label] = time.monotonic() - started
            return len(ended) == len(runs)

        wait_for(all_ended, timeout=20)
        for (label, work, background, pid), (_, _, shortest, longest) in zip(runs, cases):
            with self.subTest(label):
                result = self.finish(background)
                self.assertExit(result, 143)
                self.assertTrue(shortest <= ended[label] <= longest,
                                "wrapper ended %.1fs after SIGTERM, expected %.1f-%.1fs"
                                % (ended[label], shortest, longest))
                self.assertFalse(pid_exists(pid), "the training survived its wrapper")
                _, record = self.only_record(work=work, result=result)
                self.assertEqual((record["status"], record["exit_code"], record["signal"],
                                  record["final"]), ("terminated", 143, "SIGTERM", True), record)
                self.assertNoTraceback(result)
        self.assertEqual(len(self.calls("scontrol", "show", "config")), 1, self.calls())

    def test_a_wrapper_whose_parent_is_not_slurmstepd_warns_once_on_stderr(self):
        self.set_job(105)
        warning = r"^hpcrun: warning: .*\bexec\b"
        direct_work, stepd_work, plain_work = (self.sb.make_dir(n) for n in
                                               ("direct", "stepd", "plain"))
        stepd = os.path.join(self.bin, "slurmstepd")
        os.symlink("/bin/sh", stepd)
        argv = [stepd, "-c", '"$@"; exit $?', "slurmstepd"] + hpcrun_argv(
            ["wrap", "--work-dir", stepd_work, "--command", "echo under slurmstepd"])
        under_stepd = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, env=self.slurm_env(105),
                                       cwd=self.sb.root)
        direct = self.wrap("echo direct", work=direct_work, env=self.slurm_env(105))
        plain = self.wrap("echo plain", work=plain_work)
        stepd_out, stepd_err = under_stepd.communicate(timeout=30)

        self.assertExit(direct, 0)
        lines = [line for line in direct.err.splitlines() if line.strip()]
        self.assertEqual(len([l for l in lines if re.search(warning, l)]), 1, direct.describe())
        self.assertIn("srun", direct.err)
        self.assertExit(plain, 0)
        self.assertNotRegex(plain.err, r"(?m)" + warning)
        self.assertEqual(under_stepd.returncode, 0, stepd_err)
        self.assertEqual(stepd_out, b"under slurmstepd\n")
        self.assertNotRegex(stepd_err.decode("utf-8", "replace"), r"(?m)" + warning)


class LostRunTest(ReliabilityTestCase):
    """Runs that leave no record: lost, stalled, resumed. Each goes out once."""

    def setUp(self):
        ReliabilityTestCase.setUp(self)
        self.install_fake_slurm()

    def test_a_sigkilled_wrapper_is_reported_lost_once_by_a_long_running_monitor_or_by_cron(self):
        self.configure(monitor={"stale_after": "1"})
        daemon_work, cron_work = self.sb.make_dir("daemon"), self.sb.make_dir("cron")
        wrappers = [self.start_training(WAITING_TRAINING, work=work, extra=["--name", name])[0]
                    for work, name in ((daemon_work, "vanished-1"), (cron_work, "vanished-2"))]
        for work in (daemon_work, cron_work):
            self.assertTrue(wait_for(lambda: [r for r in read_records(work, "running").values()
                                              if r.get("seq", 0) >= 2], timeout=10))
        for background in wrappers:
            self.kill_wrapper_and_training(background)
        self.assertEqual(read_records(daemon_work, "done"), {})

        started = time.monotonic()
        monitor = self.monitor(daemon_work)

        def cron():
            self.assertExit(self.once(cron_work), 0)
            return self.reports_of("vanished-2")

        self.assertTrue(wait_for(cron, timeout=15, interval=0.1), "never reported lost by cron")
        daemon_lost_at = self.wait_for_report("vanished-1", "lost")
        cron_lost_at = self.wait_for_report("vanished-2", "lost", timeout=1)
        self.ping(daemon_work, "1")
        self.ping(daemon_work, "2")
        for _ in range(2):
            cron()
        for name, lost_at in (("vanished-1", daemon_lost_at), ("vanished-2", cron_lost_at)):
            self.assertEqual(self.reports_of(name), ["lost"], self.server.describe())
            self.assertGreaterEqual(lost_at - started, 1 - 0.1, "%s reported lost too early"
                                    % name)
        self.assertIn(daemon_work, self.bodies_of("vanished-1", "lost")[0]["content"])
        monitor.proc.send_signal(signal.SIGTERM)
        result = self.finish(monitor)
        self.assertNoTraceback(result)
        self.assertTimestampedLine(result.out, "vanished-1")
        self.assertServerClean()

    def test_a_lost_report_carries_the_schedulers_timeout_verdict(self):
        self.configure(monitor={"stale_after": "1"})
        self.set_job(4242)
        background, work = self.start_training(WAITING_TRAINING, env=self.slurm_env(4242),
                                               extra=["--name", "no-exec"])
        self.kill_wrapper_and_training(background)     # batch script without exec
        self.set_job(4242, state="TIMEOUT", reason="TimeLimit", exit_code="0:15")
        asked_by_wrap = len(self.job_queries(4242))
        monitor = self.monitor(work)
        self.wait_for_report("no-exec", "lost")
        self.ping(work, "1")
        self.assertEqual(self.reports_of("no-exec"), ["lost"], self.server.describe())
        content = self.bodies_of("no-exec", "lost")[0]["content"]
        self.assertIn("TIMEOUT", content)
        self.assertRegex(content, r"(?i)time limit")
        self.assertEqual(len(self.job_queries(4242)) - asked_by_wrap, 1,
                         "the monitor asks the scheduler once: %r" % self.calls())
        monitor.proc.send_signal(signal.SIGTERM)
        self.assertNoTraceback(self.finish(monitor))

    def test_a_silent_training_is_reported_stalled_once_and_resumed_once(self):
        self.configure(monitor={"stall_after": "2", "stale_after": "3"})
        monitor = self.monitor()
        started = time.monotonic()
        background, work = self.start_training(HANGING_TRAINING, extra=["--name", "hung"])
        stalled_at = self.wait_for_report("hung", "stalled")
        self.ping(self.sb.work, "1")
        self.ping(self.sb.work, "2")
        self.assertEqual(self.reports_of("hung"), ["stalled"], self.server.describe())
        self.assertGreaterEqual(stalled_at - started, 2 - 0.1, "reported stalled too early")

        open(os.path.join(work, "go"), "w").close()
        self.wait_for_report("hung", "resumed")
        open(os.path.join(work, "stop"), "w").close()
        self.assertExit(self.finish(background), 0)
        self.wait_for_report("hung", "success")
        self.assertEqual(self.reports_of("hung"), ["stalled", "resumed", "success"],
                         self.server.describe())
        self.assertIn("epoch 1", self.bodies_of("hung", "stalled")[0]["content"])
        monitor.proc.send_signal(signal.SIGTERM)
        self.assertNoTraceback(self.finish(monitor))
        self.assertServerClean()


class DeliveryTest(ReliabilityTestCase):
    """Several monitors, dying monitors and monitors restarted: every report goes out once."""

    def test_five_monitors_racing_over_100_records_send_exactly_100_pushes(self):
        names = ["race-%03d" % index for index in range(100)]
        for name in names:
            self.plant_done(self.sb.work, name)
        racers = [self.start("monitor", "--once", "--work-dir", self.sb.work)
                  for _ in range(5)]
        racers += [self.monitor() for _ in range(2)]
        for racer in racers[:5]:
            self.assertIn(self.finish(racer).returncode, (0, 1))
        self.assertTrue(wait_for(lambda: len(read_records(self.sb.work, "sent")) == 100,
                                 timeout=20), "not all delivered: %d"
                        % len(read_records(self.sb.work, "sent")))
        self.ping(self.sb.work, "after-the-race")
        for racer in racers[5:]:
            racer.proc.send_signal(signal.SIGTERM)
            self.assertNoTraceback(self.finish(racer))
        self.assertServerClean()
        titles = [body["title"] for body in self.server.bodies]
        self.assertEqual(len(titles), 101, "%d pushes for 100 runs and a ping" % len(titles))
        for name in names:
            self.assertEqual(len([t for t in titles if names_in(t, name)]), 1, name)
        self.assertEqual(record_names(self.sb.work, "done"), [])
        self.assertEqual(record_names(self.sb.work, "claimed"), [])

    def test_a_monitor_sigkilled_in_the_middle_of_a_push_leaves_the_report_to_the_next_one(self):
        self.plant_done(self.sb.work, "interrupted-push")
        self.server.queue(Reply.hang(30))
        first = self.start("monitor", "--once", "--work-dir", self.sb.work)
        self.assertTrue(self.server.wait_for_requests(1, timeout=10), self.server.describe())
        kill_group(first.proc)
        first.proc.wait()
        self.assertEqual(len(record_names(self.sb.work, "claimed")), 1,
                         "the dead monitor's claim is not on disk")

        result = self.once()
        self.assertExit(result, 0)
        self.assertNoTraceback(result)
        self.assertRequestCount(2, context=result)
        self.assertEqual(list(read_records(self.sb.work, "sent")), ["interrupted-push"])
        self.assertEqual(record_names(self.sb.work, "claimed"), [])
        self.assertEqual(record_names(self.sb.work, "done"), [])
        self.assertEqual([k for b in self.server.bodies for k in [report_kind(b["title"])]
                          if k == "lost"], [])

    def test_backoff_after_failed_pushes_doubles_and_survives_a_monitor_restart(self):
        self.configure(monitor={"retry_base": "0.5"})
        self.plant_done(self.sb.work, "backing-off")
        self.server.queue(*[Reply.json({"code": 500, "msg": "down"}, 500) for _ in range(2)])
        monitor = self.monitor()
        self.assertTrue(self.server.wait_for_requests(2, timeout=10), self.server.describe())
        monitor.proc.send_signal(signal.SIGTERM)                # restart after two failures
        self.finish(monitor)
        self.monitor()
        self.assertTrue(wait_for(lambda: read_records(self.sb.work, "sent"), timeout=10))
        times = self.server.request_times
        self.assertEqual(len(times), 3, self.server.describe())
        # retry_base, then twice that, although a new monitor made the third try
        self.assertGreaterEqual(times[1] - times[0], 0.5 - 0.05, times)
        self.assertGreaterEqual(times[2] - times[1], 1.0 - 0.05, times)


class BadInputTest(ReliabilityTestCase):
    """Bad input that needs a real process: a named pipe (a hang), a capability dropped, a
    full disk under a running wrap."""

    def test_a_record_planted_as_a_named_pipe_does_not_hang_the_monitor(self):
        self.plant_done(self.sb.work, "good-run")
        os.mkfifo(os.path.join(self.sb.work, ".hpcrun", "done", "planted-fifo.json"))
        result = self.once(timeout=3)
        self.assertExit(result, 0)
        self.assertNoTraceback(result)
        self.assertOneLogLine(result, "planted-fifo", r"\berror\b", r"(?i)regular file|named pipe")
        self.assertEqual(self.reports_of("good-run"), ["success"], self.server.describe())

    def test_an_unreadable_work_dir_gives_one_error_line_while_the_other_dirs_are_served(self):
        locked, open_dir = self.sb.make_dir("locked"), self.sb.make_dir("open")
        self.plant_done(locked, "behind-the-lock")
        self.plant_done(open_dir, "in-the-open")
        os.chmod(locked, 0)
        self.addCleanup(os.chmod, locked, 0o755)
        preexec = None
        if os.geteuid() == 0:
            preexec = drop_dac_override
            try:
                probe = subprocess.call([sys.executable, "-c", LIST_DIR, locked],
                                        stderr=subprocess.DEVNULL, preexec_fn=preexec,
                                        timeout=10)
            except (OSError, subprocess.SubprocessError) as error:
                self.skipTest("running as root and cannot drop CAP_DAC_OVERRIDE: %s" % error)
            if probe == 0:
                self.skipTest("running as root and chmod 000 cannot be enforced here")

        result = self.once(locked, open_dir, preexec_fn=preexec)
        self.assertExit(result, 1)
        self.assertNoTraceback(result)
        line = self.assertOneLogLine(result, locked, r"\berror\b")
        self.assertRegex(line, r"(?i)permission denied")
        self.assertEqual(self.reports_of("in-the-open"), ["success"], self.server.describe())
        self.assertEqual(self.reports_of("behind-the-lock"), [])

        monitor = self.monitor(locked, open_dir, preexec_fn=preexec)
        self.ping(open_dir, "1")
        self.ping(open_dir, "2")
        os.chmod(locked, 0o755)
        self.wait_for_report("behind-the-lock", "success")
        monitor.proc.send_signal(signal.SIGTERM)
        result = self.finish(monitor)
        self.assertNoTraceback(result)
        errors = [l for l in result.out.splitlines() if locked in l and re.search(r"\berror\b", l)]
        self.assertEqual(len(errors), 1, "the same error logged at every poll" + result.describe())
        self.assertEqual(self.reports_of("behind-the-lock"), ["success"])

    def test_a_log_dir_filling_up_mid_run_does_not_stop_the_training_and_the_record_says_so(self):
        full = self.sb.make_dir("work", "full")
        mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", full],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if mount.returncode != 0:
            self.skipTest("a full disk needs a small tmpfs and mount failed: %s"
                          % mount.stderr.decode("utf-8", "replace").strip())
        self.addCleanup(subprocess.call, ["umount", "-l", full])
        result = self.wrap(sys.executable, "-c", FLOODING_TRAINING,
                           extra=["--log-dir", "full", "--name", "flood"])
        self.assertExit(result, 0)
        self.assertTrue(os.path.exists(os.path.join(self.sb.work, "after-full")))
        self.assertTrue(result.stdout.endswith(b"done after the disk filled\n"),
                        result.describe())
        self.assertEqual(len(result.stdout), 200 * 1024 + len(b"done after the disk filled\n"))
        _, record = self.only_record(result=result)
        self.assertEqual(record["status"], "success", record)
        self.assertRegex(record.get("log_error") or "", r"(?i)incomplete", record)
        self.assertRegex(record.get("log_error") or "", r"(?i)no space", record)
        warnings = [l for l in result.err.splitlines() if l.startswith("hpcrun: warning:")]
        self.assertEqual(len(warnings), 1, result.describe())
        self.assertIn("incomplete", warnings[0])
        log = self.only_log(log_dir="full", result=result)
        self.assertTrue(result.stdout.startswith(read_bytes(log)))

        report = self.once()
        self.assertExit(report, 0)
        self.assertEqual(self.reports_of("flood"), ["success"], self.server.describe())
        self.assertRegex(self.server.bodies[0]["content"], r"(?i)log incomplete")


if __name__ == "__main__":
    unittest.main()
