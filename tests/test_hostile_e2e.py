"""A hostile group member, end to end with the real hpcrun.py: logs that would wedge the
monitor, fuzzed records built from what real wraps wrote, a SIGTERM during a push, and what
must not stall. Each of these needs a real process: a hang is only cut by killing it.

The threat model and the other hostile inputs (run in process): test_hostile.py."""

import copy
import json
import os
import random
import re
import signal
import shutil
import subprocess
import sys
import unittest

from support import Background, Reply, Sandbox, names_in, read_records, record_names, wait_for
from test_hostile import TRACEBACK, HostileTestCase, deep

LAYER = "process"


# --- 7. logs that would wedge the monitor ---

class WedgingLogTest(HostileTestCase):

    def test_a_log_that_is_a_fifo_device_directory_or_symlink_loop_does_not_wedge_the_monitor(self):
        work = self.sb.work
        logs = self.sb.make_dir("work", "logs")
        os.mkfifo(os.path.join(logs, "pipe.log"))
        os.symlink("loop-b.log", os.path.join(logs, "loop-a.log"))
        os.symlink("loop-a.log", os.path.join(logs, "loop-b.log"))
        os.mkfifo(os.path.join(logs, "slurm-7.out"))
        cases = {"log-fifo": "logs/pipe.log", "log-dev-zero": "/dev/zero",
                 "log-dev-tty": "/dev/tty", "log-directory": "logs",
                 "log-symlink-loop": "logs/loop-a.log"}
        for name, log_file in cases.items():
            self.plant_done(work, name, status="failed", exit_code=1, log_file=log_file)
        # the job's output file is read for a killed run
        self.plant_done(work, "output-fifo", status="killed", exit_code=137, signal="SIGKILL",
                        cause="signal", job={"scheduler": "slurm", "id": "7",
                                             "output_file": os.path.join(logs, "slurm-7.out")})
        self.plant_done(work, "a-good-run")
        self.plant_done(work, "z-good-run")

        result = self.once_within(5)
        self.assertIn(result.returncode, (0, 1), result.describe())
        self.assertNoTraceback(result)
        self.assertServerClean()
        for name in ("a-good-run", "z-good-run"):
            self.assertEqual(self.reports_of(name), ["success"], self.server.describe())
        self.assertEqual(len(self.bodies_of("output-fifo")), 1, self.server.describe())
        for name in sorted(cases):
            with self.subTest(name):
                bodies = self.bodies_of(name)
                self.assertEqual(len(bodies), 1, self.server.describe())
                self.assertRegex(bodies[0]["content"], r"(?i)no log")


# The fuzz: values of every JSON type and then some, fields of the records hpcrun writes.
INF, NAN = float("inf"), float("nan")
DEEP_VALUE = "\x00deep\x00"          # replaced by nested brackets in the JSON text
LONG_DIGITS = "\x00digits\x00"       # replaced by a 400-digit number in the JSON text
POOL = (None, True, False, 0, -1, 1, 7, 2 ** 31, 2 ** 63, 2 ** 64 + 1, 10 ** 30, -10 ** 30,
        1e308, -1e308, 5e-324, INF, -INF, NAN, 0.5, -0.5, "", "x", " ", "\ud800", "\udfff",
        "\u00e9\u2603\u202e\x00", "-1", "nan", "1e999", "9" * 50, "../../x", "%s %d {name} {0}",
        "\x1b[31mred\x1b[0m", "a\nb\r\nc", [], [None], [1, "a"], [INF, NAN], {}, {"a": 1},
        {"values": "x"}, {"names": 5}, {"name": 5, "values": [1e308, INF, NAN, "x", None]},
        {"id": [1]}, DEEP_VALUE, LONG_DIGITS)
FUZZ_KEYS = ("run_id", "status", "exit_code", "signal", "cause", "log_file", "command", "work_dir",
             "host", "start_time", "end_time", "duration", "timestamp", "started", "schema",
             "job", "metric", "progress", "peak_rss", "gpus", "warnings", "log_error", "test",
             "pid", "hpcrun_version", "silence", "since", "remaining", "release",
             "last_heartbeat", "last_line", "scheduler_state", "note", "seq", "log_size",
             "legacy", "base_run_id", "child_returncode", "heartbeat_interval", "written_at")
NESTED_KEYS = {
    "job": ("scheduler", "id", "name", "partition", "nodes", "array_id", "array_index",
            "time_limit", "end_time", "outlives", "release", "output_file", "restart_count"),
    "metric": ("name", "values"),
    "gpus": ("visible", "names", "count"),
}
# No "success" (a success shorter than [notify] min_duration, e.g. of a negative duration, is
# not sent, by design; "SUCCESS" is just an unknown status) and no final=false (a provisional
# record waits for its wrapper): every mutant is due for a report in the one pass.
STATUSES = ("failed", "killed", "terminated", "lost", "recovered", "stalled", "resumed", "start",
            "time_limit_warning", "release_reminder", "unknown", "exploded", "SUCCESS")
WHOLE_FILES = (b"", b"null", b"[]", b"1", b'"x"', b"{}", b"[" * 100000, b"{" * 50000,
               b"\x00" * 16, b"\xef\xbb\xbf{}", b"{" + b'"a": ' * 3, b"\xff\xfe{\x00}\x00")


def pool_value(rng):
    return copy.deepcopy(rng.choice(POOL))


def mutate_record(rng, record, notes):
    """One mutation of a record (a dict) in place; its description appended to notes."""
    operation = rng.choice(("set", "set", "set", "remove", "nested", "retype"))
    keys = sorted(key for key in record if key != "name")
    if operation == "remove" and keys:
        key = rng.choice(keys)
        del record[key]
        notes.append("remove %s" % key)
    elif operation == "nested":
        key = rng.choice(sorted(NESTED_KEYS))
        if not isinstance(record.get(key), dict):
            record[key] = {}
        sub = rng.choice(NESTED_KEYS[key])
        record[key][sub] = pool_value(rng)
        notes.append("%s.%s = %r" % (key, sub, record[key][sub]))
    elif operation == "retype" and keys:
        key = rng.choice(keys)
        record[key] = rng.choice((str(record[key]), [record[key]], {"value": record[key]}))
        notes.append("%s retyped to %r" % (key, record[key]))
    else:
        key = rng.choice(FUZZ_KEYS)
        if key == "status" and rng.random() < 0.5:
            record[key] = rng.choice(STATUSES)
        else:
            record[key] = pool_value(rng)
        notes.append("%s = %r" % (key, record[key]))


def mutate_text(rng, data, name, notes):
    """One mutation of a record's JSON text; the "name" member is left whole."""
    span = re.search(re.escape(json.dumps({"name": name})[1:-1].encode("utf-8")), data)
    operation = rng.choice(("truncate", "bad-utf8", "duplicate", "whole"))
    if operation == "truncate":
        cut = rng.randrange(1, max(2, len(data) - 1))
        notes.append("truncated at %d of %d bytes" % (cut, len(data)))
        return data[:cut]
    if operation == "bad-utf8":
        positions = [i for i in range(1, len(data)) if not (span and span.start() <= i < span.end())]
        where = rng.choice(positions)
        junk = rng.choice((b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80\x80", b"\xf8\x88\x80\x80\x80"))
        notes.append("%r inserted at byte %d" % (junk, where))
        return data[:where] + junk + data[where:]
    if operation == "duplicate":
        key = rng.choice(("status", "final", "exit_code", "job", "duration", "run_id"))
        value = rng.choice(STATUSES) if key == "status" else pool_value(rng)
        if key == "final":
            value = rng.choice((True, None, 0, "false"))
        text = dump(value)
        notes.append("duplicate key %s: %s" % (key, text[:60]))
        return data.rstrip()[:-1] + b', "' + key.encode() + b'": ' + text + b"}"
    whole = rng.choice(WHOLE_FILES)
    notes.append("whole file %r" % whole[:20])
    return whole


def dump(value):
    text = json.dumps(value).encode("utf-8")
    text = text.replace(json.dumps(DEEP_VALUE).encode(), deep(100000).encode())
    return text.replace(json.dumps(LONG_DIGITS).encode(), b"9" * 400)




class FuzzTest(HostileTestCase):
    """Seeded mutations of real records (HPCRUN_FUZZ_SEED=N picks another seed)."""

    COUNT = 150

    @classmethod
    def setUpClass(cls):
        """One real wrap in a Slurm-like job: its running record while it runs, its completion
        record and its log after."""
        sandbox = Sandbox()
        cls.base_sandbox = sandbox
        try:
            training = ("import os, sys, time\n"
                        "print('epoch 1/3 loss 0.91', flush=True)\n"
                        "print('epoch 2/3 loss 0.52', flush=True)\n"
                        "deadline = time.time() + 30\n"
                        "while not os.path.exists('go') and time.time() < deadline:\n"
                        "    time.sleep(0.01)\n"
                        "print('Traceback (most recent call last):')\n"
                        "print('  File \"train.py\", line 3, in <module>')\n"
                        "print('RuntimeError: CUDA error: device-side assert triggered')\n"
                        "sys.exit(3)\n")
            env = dict(sandbox.env, SLURM_JOB_ID="77", SLURM_JOB_NAME="fuzzjob",
                       SLURM_JOB_PARTITION="gpu", SLURM_JOB_NODELIST="node01",
                       SLURM_JOB_NUM_NODES="1")
            wrap = Background(["wrap", "--work-dir", sandbox.work, "--name", "fuzz-base", "--",
                               sys.executable, "-c", training], env, sandbox.root, sandbox.root)
            try:
                running = wait_for(lambda: read_records(sandbox.work, "running"), timeout=15)
                with open(os.path.join(sandbox.work, "go"), "w"):
                    pass
                wrap.proc.wait(30)
            finally:
                wrap.kill()
            done = read_records(sandbox.work, "done")
            if not running or len(done) != 1:
                raise AssertionError("the base wrap left no running or done record: %r %r%s"
                                     % (running, done, wrap.result().describe()))
            cls.running_base = list(running.values())[0]
            cls.done_base = list(done.values())[0]
            cls.log_dir = os.path.join(sandbox.work, "logs")
        except BaseException:
            sandbox.cleanup()
            raise

    @classmethod
    def tearDownClass(cls):
        cls.base_sandbox.cleanup()

    def base_records(self, work):
        done = dict(self.done_base, work_dir=work)
        lost = dict(self.running_base, work_dir=work, status="lost", final=True, silence=42.0,
                    last_heartbeat=self.running_base.get("written_at"), cause="unknown",
                    scheduler_state="TIMEOUT, exit 0:15", base_run_id=self.running_base["run_id"])
        lost["run_id"] += "~lost"
        stalled = dict(lost, status="stalled", run_id=lost["base_run_id"] + "~stalled-3")
        return [done, lost, stalled]

    def test_fuzzed_records_are_each_reported_exactly_once_without_a_traceback(self):
        seed = int(os.environ.get("HPCRUN_FUZZ_SEED") or 20261130)
        rng = random.Random(seed)
        self.configure(notify={"events": "start, end, lost, stalled, time_limit_warning, "
                                         "release_reminder"})
        work = self.sb.work
        shutil.copytree(self.log_dir, os.path.join(work, "logs"))
        bases = self.base_records(work)
        mutations = {}
        for index in range(self.COUNT):
            name = "fuzz-%03d" % index
            record = copy.deepcopy(rng.choice(bases))
            record["name"] = name
            notes = ["base %s" % record.get("status")]
            for _ in range(rng.randint(1, 3)):
                mutate_record(rng, record, notes)
            if record.get("final") is False:
                record["final"] = True
            data = dump(record)
            if rng.random() < 0.3:
                data = mutate_text(rng, data, name, notes)
            self.plant(work, "done", name, data)
            mutations[name] = notes

        def explain(message, names=()):
            details = "".join("\n  %s: %s" % (name, "; ".join(mutations[name])) for name in names)
            return "fuzz seed %d (HPCRUN_FUZZ_SEED=%d reruns it): %s%s" % (
                seed, seed, message, details)

        result = self.once(timeout=60)
        for stream in (result.out, result.err):
            where = stream.find(TRACEBACK)
            if where < 0:
                continue
            # the culprit: a record named just before the traceback, else the last record
            # claimed or the first one left in done/
            before = stream[max(0, where - 400):where]
            named = [name for name in sorted(mutations) if name in before]
            claimed = sorted(name for name in mutations if any(
                n.startswith(name + ".") for n in record_names(work, "claimed")))
            waiting = sorted(name for name in mutations
                             if name + ".json" in record_names(work, "done"))
            self.fail(explain("a traceback (exit status %s):\n%s\nsuspects:" % (
                result.returncode, stream[max(0, where - 400):where + 3000]),
                named[-1:] or (claimed[-1:] + waiting[:1])))
        self.assertIn(result.returncode, (0, 1), explain("exit status" + result.describe()))
        self.assertEqual(self.server.errors, [], explain("invalid pushes\n" + self.server.describe()))
        named = {name: 0 for name in mutations}
        unnamed = []
        for body in self.server.bodies:
            text = "%s\n%s" % (body["title"], body["content"])
            found = [name for name in mutations if names_in(text, name)]
            for name in found:
                named[name] += 1
            if len(found) != 1:
                unnamed.append(body["title"])
        wrong = sorted(name for name, count in named.items() if count != 1)
        self.assertEqual(wrong, [], explain("records not reported exactly once: %s; pushes "
                                            "naming no or several records: %r"
                                            % (dict((n, named[n]) for n in wrong), unnamed),
                                            wrong[:10]) + result.describe())
        self.assertEqual(len(self.server.bodies), self.COUNT, explain(
            "%d pushes for %d records" % (len(self.server.bodies), self.COUNT)))
        self.assertEqual(record_names(work, "done"), [], explain("left in done/"))
        self.assertEqual(record_names(work, "claimed"), [], explain("left in claimed/"))


# --- 10, 11, 12. push services that answer slowly, too late or not before 2057 ---

class SlowServiceTest(HostileTestCase):

    def test_sigterm_in_the_middle_of_a_push_stops_the_monitor_at_once(self):
        self.plant_done(self.sb.work, "interrupted")
        self.server.queue(Reply.drip())
        monitor = self.monitor()
        self.assertTrue(self.server.wait_for_requests(1, timeout=10), self.server.describe())
        monitor.proc.send_signal(signal.SIGTERM)
        try:
            monitor.proc.wait(1.5)
        except subprocess.TimeoutExpired:
            monitor.kill()
            self.fail("the monitor did not stop within 1.5 s of SIGTERM during a push"
                      + monitor.result().describe())
        stopped = self.finish(monitor)
        self.assertNoTraceback(stopped)
        result = self.once()
        self.assertExit(result, 0)
        self.assertNoTraceback(result)
        again = self.once()
        self.assertRequestCount(2, context=again)
        self.assertEqual(list(read_records(self.sb.work, "sent")), ["interrupted"])
        self.assertEqual(record_names(self.sb.work, "done"), [])
        self.assertEqual(record_names(self.sb.work, "claimed"), [])


# --- found while writing the tests above: faults of the same kind, beyond the brief ---

class BeyondTheBriefTest(HostileTestCase):

    def test_status_does_not_wedge_on_a_log_that_is_a_fifo(self):
        logs = self.sb.make_dir("work", "logs")
        os.mkfifo(os.path.join(logs, "pipe.log"))
        self.plant_done(self.sb.work, "fifo-log", log_file="logs/pipe.log")
        try:
            result = self.hpcrun("status", "--work-dir", self.sb.work, timeout=5)
        except AssertionError as error:
            if isinstance(error, self.failureException):
                raise
            self.fail(str(error))
        self.assertExit(result, 0)
        self.assertNoTraceback(result)
        self.assertTrue(names_in(result.out, "fifo-log"), result.describe())

    def test_a_long_command_that_makes_a_secret_pattern_backtrack_does_not_stall_the_monitor(self):
        # mask_secrets ran over a record's whole command. Two of its patterns backtrack
        # quadratically: r"(--?[\w-]*(?:...|token|...)[ =])" on "--token--token...", and the
        # URL one, r"(\b[a-z][\w+.-]*://...", on "a-a-a-...": 20 KB take seconds, 200 KB
        # minutes, the 1 MB a record may hold hours.
        self.plant_done(self.sb.work, "a-long-options", command="--token" * 30000)
        self.plant_done(self.sb.work, "b-long-words", command="a-" * 100000)
        # an event report shows the run's last line, masked the same way
        self.plant_done(self.sb.work, "c-long-last-line", status="lost", silence=120.0,
                        last_line="a-" * 100000)
        self.plant_done(self.sb.work, "z-bystander")
        result = self.once_within(5)
        self.assertIn(result.returncode, (0, 1), result.describe())
        self.assertNoTraceback(result)
        self.assertEqual(self.reports_of("z-bystander"), ["success"], self.server.describe())
        for name in ("a-long-options", "b-long-words", "c-long-last-line"):
            self.assertEqual(len(self.bodies_of(name)), 1, self.server.describe())


if __name__ == "__main__":
    unittest.main()
