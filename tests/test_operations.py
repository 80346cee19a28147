"""Daily operations (issue 4): the argument-free monitor, monitor heartbeats, wrap --then,
selftest, the [notify] event settings, release reminders and what status shows.

The real hpcrun.py runs in subprocesses against a fake xxtui on 127.0.0.1. A fake Slurm is a
job environment plus stub `scontrol` and `sacct` first on PATH (the machine may have a real
Slurm: the stubs shadow it). Monitors poll every 0.25-0.5 s; a test that needs to know a
monitor has polled again gives it its own HPCRUN_HOME and counts the `seq` of its heartbeat
file. Where only the monitor's clock matters (a time-limit warning, release reminders), the
wraps are real and the monitor runs in process, its clocks moved by the test
(TickingMonitor). The selftests that need no real wrap run in process:
test_operations_in_process.py.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import unittest

from support import (KEY, HpcrunTestCase, MonitorTime, Reply, TickingMonitor, merge_sections,
                     read_bytes, read_records, names_in, pass_time, record_names, render_ini,
                     report_kind, wait_for)

LAYER = "process"


HOST = os.uname()[1]

# --- trainings ---

# Says where it is, then waits (bounded) for the file `go` in its work dir without a word.
WAITING_TRAINING = (
    "import os, time\n"
    "with open('training.pid', 'w') as out:\n"
    "    out.write(str(os.getpid()))\n"
    "print('epoch 3/10 loss 0.42', flush=True)\n"
    "deadline = time.time() + 30\n"
    "while not os.path.exists('go') and time.time() < deadline:\n"
    "    time.sleep(0.01)\n"
    "print('finished', flush=True)\n")

# wrap --then: what the command saw of the completion records when it ran, one JSON line
# appended to then-saw.jsonl in DIR (its cwd); then it exits with argv[1].
THEN_CHECK = (
    "import json, os, sys\n"
    "done = os.path.join('.hpcrun', 'done')\n"
    "records = []\n"
    "for name in sorted(os.listdir(done)) if os.path.isdir(done) else []:\n"
    "    if not name.endswith('.json'):\n"
    "        continue\n"
    "    try:\n"
    "        with open(os.path.join(done, name), encoding='utf-8') as handle:\n"
    "            records.append(dict(json.load(handle), file=name))\n"
    "    except ValueError as error:\n"
    "        records.append({'file': name, 'invalid': str(error)})\n"
    "saw = {'records': records, 'HPCRUN_STATUS': os.environ.get('HPCRUN_STATUS'),\n"
    "       'HPCRUN_EXIT_CODE': os.environ.get('HPCRUN_EXIT_CODE')}\n"
    "with open('then-saw.jsonl', 'a') as out:\n"
    "    out.write(json.dumps(saw) + '\\n')\n"
    "sys.exit(int(sys.argv[1]))\n")

# --- stub scheduler clients: each logs its calls and answers from files beside it ---

SCONTROL_STUB = """#!/bin/sh
echo "scontrol $*" >> '{dir}/calls.log'
if [ "$1 $2" = "show job" ] && [ -f '{dir}/job-'"$3" ]; then
    cat '{dir}/job-'"$3"
    exit 0
fi
[ "$1 $2" = "show config" ] && exit 0
echo "slurm_load_jobs error: Invalid job id specified" >&2
exit 1
"""

SACCT_STUB = """#!/bin/sh
echo "sacct $*" >> '{dir}/calls.log'
exit 1
"""

def slurm_time(epoch):
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(epoch))


class OperationsTestCase(HpcrunTestCase):
    """A fake xxtui per test; configs, monitors and a fake Slurm set up in one line each."""

    BASE = {"notify": {"channels": "xxtui", "language": "en"},
            "wrap": {"heartbeat_interval": "1"}}

    def setUp(self):
        HpcrunTestCase.setUp(self)
        self.start_server()
        self.bin = None

    # configs
    def configure(self, **sections):
        """~/.config/hpcrun/config.ini (and keys file) for the fake xxtui, updated by sections."""
        return self.configure_xxtui(self.server, overrides=merge_sections(self.BASE, sections))

    def config_file(self, label, **sections):
        """A config of its own (for --config), the key inside it."""
        base = merge_sections(self.BASE, {"xxtui": {"url": self.server.url, "timeout": "5",
                                                    "api_key": KEY}})
        self.secrets.append(KEY)
        return self.sb.write_file(self.sb.path("configs", label + ".ini"),
                                  render_ini(merge_sections(base, sections)))

    # monitors
    def own_home(self, label):
        """An environment whose HPCRUN_HOME is a dir of its own: one monitor heartbeat in it."""
        home = self.sb.make_dir("hpcrun-home-" + label)
        return dict(self.env, HPCRUN_HOME=home), home

    def heartbeat_path(self, home=None):
        return os.path.join(home or self.sb.hpcrun_home, "monitors", HOST + ".json")

    def polls(self, home=None):
        try:
            return json.loads(read_bytes(self.heartbeat_path(home)).decode("utf-8"))["seq"]
        except (OSError, ValueError, KeyError):
            return 0

    def wait_polls(self, count, home=None, monitor=None):
        """Wait until the monitor writing into home has finished `count` more polls."""
        target = self.polls(home) + count
        reached = wait_for(lambda: self.polls(home) >= target, timeout=15)
        self.assertTrue(reached, "the monitor did not poll %d more times (seq %s)%s" % (
            count, self.polls(home), monitor.result().describe() if monitor else ""))

    def monitor(self, *work_dirs, **options):
        """A long-running monitor polling every 0.25 s (no --work-dir: the registered dirs)."""
        args = ["monitor", "--interval", options.pop("interval", "0.25")]
        if options.get("config"):
            args += ["--config", options.pop("config")]
        for work in work_dirs:
            args += ["--work-dir", work]
        return self.start(*args, **options)

    def stop(self, monitor):
        monitor.proc.send_signal(signal.SIGTERM)
        result = self.finish(monitor)
        self.assertExit(result, 0)
        return result

    # registry
    def registry(self, home=None):
        """{work dir: registered epoch} of every entry under HPCRUN_HOME/registry."""
        directory = os.path.join(home or self.sb.hpcrun_home, "registry")
        entries = {}
        for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
            if name.endswith(".json") and not name.startswith("."):
                try:
                    entry = json.loads(read_bytes(os.path.join(directory, name)).decode("utf-8"))
                except (OSError, ValueError):
                    continue
                entries[entry["work_dir"]] = entry["registered"]
        return entries

    # trainings
    def start_training(self, work, name, env=None, extra=()):
        """WAITING_TRAINING under wrap, returned once it runs and its heartbeat is on disk."""
        background = self.start_wrap(sys.executable, "-c", WAITING_TRAINING, work=work,
                                     env=env, extra=["--name", name] + list(extra))
        started = wait_for(lambda: os.path.exists(os.path.join(work, "training.pid")) and
                           read_records(work, "running"), timeout=15)
        self.assertTrue(started, "the training did not start" + background.result().describe())
        return background

    def go(self, work):
        open(os.path.join(work, "go"), "w").close()

    # reports
    def reports(self, name=None):
        """(kind, body) of every valid request, in arrival order; only those naming name."""
        return [(report_kind(body["title"]), body) for body in self.server.bodies
                if name is None or names_in(body["title"], name)]

    def kinds(self, name=None):
        return [kind for kind, _ in self.reports(name)]

    def wait_for_reports(self, kind, count=1, name=None, timeout=15):
        """Wait for count reports of a kind (about name); return their arrival times (epoch)."""
        reached = wait_for(lambda: self.kinds(name).count(kind) >= count, timeout=timeout)
        self.assertTrue(reached, "no %d %s report(s)%s within %ss\n%s" % (
            count, kind, " about %s" % name if name else "", timeout, self.server.describe()))
        offset = time.time() - time.monotonic()
        return [arrived + offset for arrived, body in zip(self.server.request_times,
                                                          self.server.bodies)
                if report_kind(body["title"]) == kind and (name is None or
                                                           names_in(body["title"], name))]

    def bodies(self, kind, name=None):
        return [body for k, body in self.reports(name) if k == kind]

    # monitors in this process, their clocks moved by the test
    def ticking_monitor(self, *work_dirs, **options):
        """self.monitor(...) in this process: a TickingMonitor polling every 0.25 s of the
        clocks it shares with this test's other ticking monitors, its first poll done."""
        if not hasattr(self, "ticking"):
            self.ticking = ([], MonitorTime(), [])     # monitors, their clocks, their marks
        monitors, clocks, marks = self.ticking
        monitor = TickingMonitor(work_dirs, options.pop("env", None) or self.env,
                                 cwd=self.sb.root, interval=0.25, config=options.pop("config", None),
                                 clocks=clocks, marks=marks)
        monitors.append(monitor.watch(self.server))
        monitor.start()
        return monitor

    def tick(self, count=1):
        """count times: 0.25 s pass on the ticking monitors' clocks, then each of them polls."""
        monitors, clocks, _ = self.ticking
        for _ in range(count):
            clocks.advance(0.25)
            for monitor in monitors:
                monitor.poll()

    def tick_until(self, predicate, seconds=15):
        """Tick until predicate() is true or `seconds` passed on the monitors' clocks."""
        value = predicate()
        for _ in range(int(seconds / 0.25)):
            if value:
                break
            self.tick()
            value = predicate()
        return value

    def tick_for_reports(self, kind, count=1, name=None, seconds=15):
        """wait_for_reports with ticking monitors: the arrival times are on their clocks."""
        reached = self.tick_until(lambda: self.kinds(name).count(kind) >= count, seconds)
        self.assertTrue(reached, "no %d %s report(s)%s within %ss on the monitors' clocks\n%s" % (
            count, kind, " about %s" % name if name else "", seconds, self.server.describe()))
        arrivals = self.ticking[0][0].arrivals(self.server)
        return [arrived for arrived, body in zip(arrivals, self.server.bodies)
                if report_kind(body["title"]) == kind and (name is None or
                                                           names_in(body["title"], name))]

    def wait_for_heartbeat_line(self, work, line):
        """Until the one running record in work says its training printed line."""
        self.assertTrue(wait_for(lambda: [r for r in read_records(work, "running").values()
                                          if (r.get("last_line") or "").startswith(line)],
                                 timeout=15),
                        "no heartbeat with %r: %r" % (line, read_records(work, "running")))

    # a fake Slurm
    def install_fake_slurm(self):
        self.bin = self.sb.make_dir("bin")
        for name, text in (("scontrol", SCONTROL_STUB), ("sacct", SACCT_STUB)):
            path = self.sb.write_file(os.path.join(self.bin, name), text.format(dir=self.bin),
                                      secret=False)
            os.chmod(path, 0o755)
        self.env["PATH"] = self.bin + os.pathsep + self.env.get("PATH", "/usr/bin:/bin")

    def slurm_env(self, job_id, env=None):
        return dict(env or self.env, SLURM_JOB_ID=str(job_id), SLURM_JOB_NAME="fakejob",
                    SLURM_JOB_NODELIST="node01", SLURM_JOB_PARTITION="gpu",
                    SLURM_JOB_NUM_NODES="1")

    def set_job(self, job_id, end_time, state="RUNNING"):
        """What `scontrol show job ID` answers from now on."""
        self.sb.write_file(os.path.join(self.bin, "job-%s" % job_id), (
            "JobId={id} JobName=fakejob\n"
            "   JobState={state} Reason=None Dependency=(null)\n"
            "   RunTime=00:00:01 TimeLimit=00:10:00 TimeMin=N/A\n"
            "   StartTime={start} EndTime={end} Deadline=N/A\n"
            "   Partition=gpu NodeList=node01\n"
            "   StdOut={out}/slurm-{id}.out\n").format(
                id=job_id, state=state, start=slurm_time(time.time()), end=slurm_time(end_time),
                out=self.sb.root), secret=False)

    def job_gone(self, job_id):
        """The job ends: scontrol no longer knows it."""
        os.unlink(os.path.join(self.bin, "job-%s" % job_id))


class ArgumentFreeMonitorTest(OperationsTestCase):

    def test_a_monitor_without_work_dir_picks_up_a_new_dir_and_forgets_dirs_left_idle(self):
        self.configure(monitor={"forget_after": "1"})
        alpha = self.sb.make_dir("alpha")
        first = self.wrap("echo 'epoch 1/1'", work=alpha, extra=["--name", "alpha-1"])
        self.assertExit(first, 0)
        self.assertEqual(set(self.registry()), {alpha}, "the wrap did not register its dir")

        monitor = self.monitor(interval="0.5")
        self.wait_for_reports("success", name="alpha-1")
        self.wait_polls(1, monitor=monitor)
        beta = self.sb.make_dir("beta")                   # a dir the monitor never heard of
        training = self.start_training(beta, "beta")
        self.assertIn(beta, self.registry())
        # alpha has nothing left to watch and was registered over forget_after ago
        self.assertTrue(wait_for(lambda: alpha not in self.registry(), timeout=10),
                        "alpha was not forgotten: %r" % self.registry())
        # beta, past forget_after too, still has a running training: kept
        pass_time(max(0.0, self.registry()[beta] + 1.5 - time.time()))
        self.wait_polls(2, monitor=monitor)
        self.assertIn(beta, self.registry(), "a dir with a running training was forgotten")

        self.go(beta)
        self.assertExit(self.finish(training), 0)
        self.wait_for_reports("success", name="beta")
        self.assertTrue(wait_for(lambda: beta not in self.registry(), timeout=10),
                        "beta was not forgotten once reported: %r" % self.registry())
        # a forgotten dir comes back with its next wrap
        again = self.wrap("echo 'epoch 1/1'", work=alpha, extra=["--name", "alpha-2"])
        self.assertExit(again, 0)
        self.wait_for_reports("success", name="alpha-2")

        self.assertIsNone(monitor.proc.poll(), "the monitor stopped")
        result = self.stop(monitor)
        self.assertEqual(self.kinds(), ["success"] * 3, self.server.describe())
        self.assertEqual(len(re.findall(r"(?m)monitor started", result.out)), 1, result.describe())
        for work in (alpha, beta):
            self.assertTimestampedLine(result.out, "forgot %s" % work)
        self.assertServerClean()
        self.assertSecretsKept()


    def test_a_dir_registered_twice_under_different_names_is_watched_once_and_both_are_forgotten(self):
        # an entry whose name another hpcrun version derived differently from the same dir
        self.configure(monitor={"forget_after": "1"})
        work = self.sb.make_dir("twice")
        self.assertExit(self.wrap("echo 'epoch 1/1'", work=work, extra=["--name", "twice"]), 0)
        directory = os.path.join(self.sb.hpcrun_home, "registry")
        (ours,) = os.listdir(directory)
        other = os.path.join(directory, "0123456789abcdef.json")
        shutil.copyfile(os.path.join(directory, ours), other)

        monitor = self.monitor(interval="0.5")
        self.wait_for_reports("success", name="twice")
        self.assertTrue(wait_for(lambda: not os.listdir(directory), timeout=10),
                        "registry entries left: %r" % os.listdir(directory))
        result = self.stop(monitor)
        self.assertEqual(self.kinds(), ["success"], self.server.describe())
        self.assertEqual(len(re.findall(r"forgot %s:" % re.escape(work), result.out)), 1,
                         result.describe())
        self.assertServerClean()


class WrapFootprintTest(OperationsTestCase):

    def test_a_running_wrap_has_not_loaded_openssl(self):
        # hashlib and ssl map libcrypto: about 4 MiB of the wrapper's resident memory
        probe = subprocess.check_output([sys.executable, "-c", "import hashlib, ssl\n"
                                         "print(open('/proc/self/maps').read())"])
        if b"libcrypto" not in probe:
            self.skipTest("this Python does not load OpenSSL as a shared library")
        self.configure()
        work = self.sb.make_dir("footprint")
        training = self.start_training(work, "footprint")
        maps = read_bytes("/proc/%d/maps" % training.proc.pid)
        self.go(work)
        self.assertExit(self.finish(training), 0)
        self.assertTrue(maps.strip(), "nothing read from the wrapper's maps")
        self.assertNotIn(b"libcrypto", maps)
        self.assertNotIn(b"libssl", maps)


class MonitorHeartbeatTest(OperationsTestCase):

    def test_a_long_running_monitor_keeps_a_heartbeat_file_that_status_monitors_lists(self):
        self.configure()
        once = self.hpcrun("monitor", "--once")
        self.assertExit(once, 0)
        none = self.hpcrun("status", "--monitors")
        self.assertExit(none, 3)                          # --once leaves no heartbeat
        self.assertEqual(none.out, "", none.describe())

        monitor = self.monitor(interval="0.5")
        path = self.heartbeat_path()
        self.assertTrue(wait_for(lambda: self.polls() >= 1, timeout=15),
                        "no heartbeat file %s" % path + monitor.result().describe())
        beat = json.loads(read_bytes(path).decode("utf-8"))
        self.assertEqual((beat["host"], beat["pid"]), (HOST, monitor.proc.pid), beat)
        self.wait_polls(1, monitor=monitor)              # rewritten at every poll

        # monitors on other login nodes share the home: one alive, one long silent
        now = time.time()
        for host, written_at in (("login-b", now), ("login-c", now - 3600)):
            self.sb.write_file(self.heartbeat_path().replace(HOST + ".json", host + ".json"),
                               json.dumps({"host": host, "pid": 777, "seq": 9, "interval": 60,
                                           "version": "0.1.0", "written_at": written_at}),
                               secret=False)
        listed = self.hpcrun("status", "--monitors")
        self.assertExit(listed, 0)
        lines = listed.out.splitlines()
        self.assertEqual(len(lines), 3, listed.describe())
        mine = [line for line in lines if names_in(line, HOST)]
        self.assertEqual(len(mine), 1, listed.describe())
        self.assertIn("pid %d" % monitor.proc.pid, mine[0])
        self.assertRegex(mine[0], r"\balive\b")
        self.assertRegex([l for l in lines if "login-b" in l][0], r"\balive\b")
        self.assertRegex([l for l in lines if "login-c" in l][0], r"\bsilent\b")

        self.stop(monitor)
        self.assertFalse(os.path.exists(path), "the heartbeat file stayed after a clean stop")
        for host in ("login-b", "login-c"):
            os.unlink(self.heartbeat_path().replace(HOST + ".json", host + ".json"))
        gone = self.hpcrun("status", "--monitors")
        self.assertExit(gone, 3)


class ThenTest(OperationsTestCase):

    def test_then_runs_once_the_completion_record_is_on_disk_whatever_the_ending(self):
        self.configure(wrap={"grace": "2"})
        checker = self.sb.write_file("then_check.py", THEN_CHECK, secret=False)
        # (label, training, its exit, the wrapper's expected exit, status, then's own exit)
        cases = [("success", ["--command", "echo 'epoch 1/1'"], 0, "success", 7),
                 ("failure", ["--command", "echo boom; exit 3"], 3, "failed", 0),
                 ("sigterm", ["--", sys.executable, "-c", WAITING_TRAINING], 143, "terminated", 5),
                 ("cannot start", ["--", self.sb.path("no-such-program")], 127, "failed", 9)]
        runs = []
        for label, training, code, status, then_code in cases:
            work = self.sb.make_dir("work-" + label.replace(" ", "-"))
            then = "%s %s %d" % (sys.executable, checker, then_code)
            runs.append((label, work, self.start("wrap", "--work-dir", work, "--name", label,
                                                 "--then", then, *training)))
        sigterm_work, sigterm_wrap = runs[2][1], runs[2][2]
        self.assertTrue(wait_for(lambda: os.path.exists(os.path.join(sigterm_work, "training.pid")),
                                 timeout=15), "the training did not start")
        sigterm_wrap.proc.send_signal(signal.SIGTERM)

        for (label, work, background), (_, _, code, status, then_code) in zip(runs, cases):
            with self.subTest(label):
                result = self.finish(background)
                self.assertExit(result, code)             # then's own exit status changes nothing
                self.assertNoTraceback(result)
                run_id, record = self.only_record(work=work, result=result)
                self.assertEqual((record["status"], record["exit_code"], record["final"]),
                                 (status, code, True), record)
                with open(os.path.join(work, "then-saw.jsonl"), encoding="utf-8") as handle:
                    seen = [json.loads(line) for line in handle]
                self.assertEqual(len(seen), 1, "--then ran %d times" % len(seen))
                saw = seen[0]
                self.assertEqual([r.get("file") for r in saw["records"]], [run_id + ".json"],
                                 "--then did not find the completion record: %r" % saw)
                seen_record = saw["records"][0]
                self.assertNotIn("invalid", seen_record, saw)
                self.assertEqual((seen_record["status"], seen_record["exit_code"],
                                  seen_record["final"]), (status, code, True),
                                 "--then ran before the final record was written: %r" % saw)
                self.assertEqual((saw["HPCRUN_STATUS"], saw["HPCRUN_EXIT_CODE"]),
                                 (status, str(code)), saw)
                then = read_records(work, "then")
                self.assertEqual(list(then), [run_id], "then/: %r" % then)
                self.assertEqual(then[run_id]["exit_code"], then_code, then)
                if then_code:
                    self.assertIn("exited %d" % then_code, result.err, result.describe())


class SelftestTestCase(OperationsTestCase):

    def selftest_dir(self):
        return os.path.join(self.sb.hpcrun_home, "selftest", HOST)

    def leftovers(self, work):
        return {sub: record_names(work, sub) for sub in ("done", "claimed", "delivery", "running")
                if record_names(work, sub)}


class SelftestTest(SelftestTestCase):

    def test_wrap_selftest_leaves_a_record_the_monitor_pushes_as_a_test_and_prints_checks(self):
        # a test record gets through the filters that would hold back a short success
        self.configure(notify={"only_failures": "yes", "min_duration": "3600"})
        self.install_fake_slurm()
        self.set_job(4242, time.time() + 3600)
        work = self.sb.make_dir("batch")
        result = self.hpcrun("wrap", "--selftest", "--work-dir", work,
                             env=self.slurm_env(4242))
        self.assertExit(result, 0)
        checks = dict(re.findall(r"(?m)^hpcrun selftest: (\w+): (.*)$", result.out))
        for name in ("record", "log", "python", "job", "launch"):
            self.assertIn(name, checks, result.describe())
        self.assertIn(os.path.join(work, ".hpcrun", "done"), checks["record"])
        self.assertIn("4242", checks["job"])
        self.assertRegex(checks["launch"], r"\bexec\b|srun", "not started by slurmstepd here")
        run_id, record = self.only_record(work=work, result=result)
        self.assertIs(record["test"], True, record)
        self.assertRequestCount(0)

        once = self.hpcrun("monitor", "--once", "--work-dir", work)
        self.assertExit(once, 0)
        self.assertRequestCount(1)
        self.assertServerClean()
        title = self.server.bodies[0]["title"]
        self.assertTrue(title.startswith("[test] "), title)
        self.assertEqual(report_kind(title[len("[test] "):]), "success", title)
        self.assertEqual(list(self.sent(work)), [run_id])

    def test_selftest_in_a_work_dir_with_real_runs_loses_none_of_them(self):
        self.configure()
        work = self.sb.make_dir("project")
        finished = self.wrap("echo 'epoch 9/9'; exit 2", work=work, extra=["--name", "real-done"])
        self.assertExit(finished, 2)
        training = self.start_training(work, "real-running")
        self.server.queue(Reply.json({"code": 40001, "msg": "无效的 API_KEY"}))
        result = self.hpcrun("selftest", "--work-dir", work, timeout=60)
        self.assertExit(result, 1)
        self.assertRegex(result.out, r"(?m)^\[5/6\] push: FAILED: ")
        self.assertIn(work, self.registry(), "selftest unregistered a dir with a running training")
        self.assertTrue(read_records(work, "running"), "selftest removed the running record of "
                                                       "a real training")
        self.go(work)
        self.assertExit(self.finish(training), 0)
        # the key works again: an argument-free monitor reports both real runs
        later = self.hpcrun("monitor", "--once")
        self.assertExit(later, 0)
        self.assertEqual(len(self.bodies("failed", "real-done")), 1, self.server.describe())
        self.assertEqual(len(self.bodies("success", "real-running")), 1, self.server.describe())


class EventSettingsTest(OperationsTestCase):

    def test_events_start_and_end_send_those_two_and_the_default_events_no_start(self):
        chosen = self.config_file("start-end", notify={"events": "start, end"},
                                  monitor={"stall_after": "0.5"})
        default = self.config_file("default", monitor={"stall_after": "0.5"})
        runs = []
        for label, config in (("chosen", chosen), ("default", default)):
            env, home = self.own_home(label)
            work = self.sb.make_dir(label)
            monitor = self.monitor(work, config=config, env=env)
            runs.append((label, work, home, monitor, self.start_training(work, label + "-run")))
        self.wait_for_reports("start", name="chosen-run")
        # both runs are silent past stall_after: the default events push that, start-end not
        self.wait_for_reports("stalled", name="default-run")
        chosen_monitor = runs[0][3]
        self.assertTrue(wait_for(lambda: re.search(r"(?m)stalled: chosen-run", chosen_monitor
                                                   .read_stdout().decode("utf-8")), timeout=10),
                        "the start-end monitor never saw the stall" + chosen_monitor.result()
                        .describe())
        for label, work, home, monitor, training in runs:
            self.go(work)
            self.assertExit(self.finish(training), 0)
        for label, work, home, monitor, training in runs:
            self.wait_for_reports("success", name=label + "-run")
            self.assertTrue(wait_for(lambda: [r for r in self.sent(work) if "~" not in r],
                                     timeout=10))
            self.wait_polls(2, home=home, monitor=monitor)
        for label, work, home, monitor, training in runs:
            self.stop(monitor)
        self.assertEqual(self.kinds("chosen-run"), ["start", "success"], self.server.describe())
        default_kinds = self.kinds("default-run")
        self.assertNotIn("start", default_kinds, self.server.describe())
        self.assertEqual(default_kinds.count("success"), 1, self.server.describe())
        self.assertEqual(default_kinds[0], "stalled", self.server.describe())
        self.assertServerClean()

    def test_only_failures_and_min_duration_skip_exactly_what_they_say(self):
        quick_success = ["--command", "echo 'epoch 1/1'"]
        quick_failure = ["--command", "echo boom; exit 1"]
        long_success = ["--command", "sleep 2.5; echo 'epoch 1/1'"]
        # (label, [notify] settings, {run: training}, runs expected to be pushed)
        cases = [("defaults", {}, {"ok": quick_success, "bad": quick_failure}, {"ok", "bad"}),
                 ("only failures", {"only_failures": "yes"},
                  {"ok": quick_success, "bad": quick_failure}, {"bad"}),
                 ("min duration", {"min_duration": "3600"},
                  {"ok": quick_success, "bad": quick_failure}, {"bad"}),
                 ("min duration and skip short failures",
                  {"min_duration": "3600", "skip_short_failures": "yes"},
                  {"ok": quick_success, "bad": quick_failure}, set()),
                 ("min duration 2 s", {"min_duration": "2"},
                  {"ok": quick_success, "long": long_success}, {"long"})]
        wraps = []
        for number, (label, notify, trainings, expected) in enumerate(cases):
            work = self.sb.make_dir("case-%d" % number)
            config = self.config_file("case-%d" % number, notify=notify)
            for run, training in sorted(trainings.items()):
                wraps.append(self.start("wrap", "--config", config, "--work-dir", work,
                                        "--name", "c%d-%s" % (number, run), *training))
        for background in wraps:
            self.assertIn(self.finish(background).returncode, (0, 1))
        monitors = [self.start("monitor", "--once", "--config", self.sb.path(
            "configs", "case-%d.ini" % number), "--work-dir", self.sb.path("case-%d" % number))
            for number in range(len(cases))]
        for number, ((label, notify, trainings, expected), monitor) in enumerate(
                zip(cases, monitors)):
            with self.subTest(label):
                result = self.finish(monitor)
                self.assertExit(result, 0)
                pushed = {run for run in trainings
                          if self.kinds("c%d-%s" % (number, run))}
                self.assertEqual(pushed, expected, self.server.describe() + result.describe())
                for run in set(trainings) - expected:
                    self.assertRegex(result.out, r"(?m)^\S+ not sent\b.*\bc%d-%s\b" % (number, run))
                self.assertEqual(record_names(self.sb.path("case-%d" % number), "done"), [])
        self.assertRequestCount(5)
        self.assertServerClean()

    def test_time_limit_warning_comes_once_with_the_progress_when_time_left_nears_the_margin(self):
        # the wrap is real; the monitor runs in process and the test moves its clocks: the
        # margin comes after a few polls, not after seconds (extended jobs: the next test)
        margin = 4.0
        self.configure(notify={"time_limit_margin": str(margin)})
        self.install_fake_slurm()
        end_time = int(time.time()) + 10
        self.set_job(5151, end_time)
        env, home = self.own_home("monitor")
        monitor = self.ticking_monitor(self.sb.work, env=env)
        training = self.start_training(self.sb.work, "near-end", env=self.slurm_env(5151))
        self.wait_for_heartbeat_line(self.sb.work, "epoch 3/10")   # the progress it reports
        self.tick()
        running_seen = monitor.time.now()
        self.assertLess(running_seen, end_time - margin - 1,
                        "too slow to start: the test needs the run watched before the margin")
        arrived = self.tick_for_reports("warning", name="near-end", seconds=20)
        self.assertGreaterEqual(arrived[0], end_time - margin - 0.05,
                                "warned %.1fs before the end, margin %.0fs"
                                % (end_time - arrived[0], margin))
        self.assertLess(arrived[0], end_time)
        self.tick(4)
        self.go(self.sb.work)
        self.assertExit(self.finish(training), 0)
        self.tick_for_reports("success", name="near-end")
        self.assertNoTraceback(monitor.result())

        self.assertEqual(self.kinds("near-end"), ["warning", "success"], self.server.describe())
        warning = self.bodies("warning", "near-end")[0]
        self.assertRegex(warning["title"], r"\b[1-4]s\b")
        self.assertIn("epoch 3/10", warning["content"])
        self.assertRegex(warning["content"], r"(?m)^Time left: [0-4]s$")
        self.assertServerClean()

    def test_a_job_extended_while_it_runs_is_warned_again_near_its_new_end(self):
        margin = 4.0
        self.configure(notify={"time_limit_margin": str(margin)})
        self.install_fake_slurm()
        first_end = int(time.time()) + 10
        self.set_job(6161, first_end)
        far_end = int(time.time()) + 7200                  # far from its warning: never asked again
        self.set_job(6262, far_end)
        env, home = self.own_home("monitor")
        far_work = self.sb.make_dir("far")
        monitor = self.monitor(self.sb.work, far_work, env=env)
        training = self.start_training(self.sb.work, "extended", env=self.slurm_env(6161))
        far = self.start_training(far_work, "far", env=self.slurm_env(6262))
        self.wait_for_reports("warning", name="extended", timeout=20)

        second_end = int(time.time()) + 8                  # scontrol update ... TimeLimit=+...
        self.set_job(6161, second_end)
        self.assertTrue(wait_for(lambda: self.job_end(self.sb.work) == second_end, timeout=10),
                        "the running record kept end %r" % self.job_end(self.sb.work))
        arrived = self.wait_for_reports("warning", count=2, name="extended", timeout=20)
        self.assertGreaterEqual(arrived[1], second_end - margin - 0.05)
        self.assertLess(arrived[1], second_end)
        self.wait_polls(2, home=home, monitor=monitor)
        # a job that is no longer running shows its actual end, not its limit: not taken
        self.set_job(6161, int(time.time()) - 30, state="COMPLETING")
        seq = self.heartbeat_seq(self.sb.work)
        self.assertTrue(wait_for(lambda: self.heartbeat_seq(self.sb.work) >= seq + 2, timeout=10))
        self.assertEqual(self.job_end(self.sb.work), second_end)
        (run_id,) = read_records(self.sb.work, "running")        # a marker as older monitors named it
        open(os.path.join(self.sb.work, ".hpcrun", "running", run_id + ".time_limit_warning"), "w").close()
        for work in (self.sb.work, far_work):
            self.go(work)
        self.assertExit(self.finish(training), 0)
        self.assertExit(self.finish(far), 0)
        self.wait_for_reports("success", name="extended")
        self.wait_for_reports("success", name="far")
        self.stop(monitor)

        self.assertEqual(self.kinds("extended"), ["warning", "warning", "success"], self.server.describe())
        self.assertEqual(self.kinds("far"), ["success"], self.server.describe())
        calls = read_bytes(os.path.join(self.bin, "calls.log")).decode("utf-8")
        self.assertEqual(calls.count("show job 6262"), 1, calls)
        self.assertEqual(os.listdir(os.path.join(self.sb.work, ".hpcrun", "running")), [])
        self.assertServerClean()

    def heartbeat_seq(self, work):
        records = list(read_records(work, "running").values())
        return records[0]["seq"] if records else 0

    def job_end(self, work):
        records = list(read_records(work, "running").values())
        return records[0].get("job", {}).get("end_time") if records else None

    def test_release_reminders_come_every_interval_stop_when_the_job_goes_and_at_most_max(self):
        # the wraps are real; the monitors run in process and the test moves their clocks: a
        # reminder interval passes in four polls, not in a second of waiting
        self.install_fake_slurm()
        interval = 1.0
        # (label, job, reminder_max, whether the job goes after two reminders)
        cases = [("released", 4242, 6, True), ("forgotten", 4343, 2, False)]
        runs = []
        for label, job_id, most, goes in cases:
            self.set_job(job_id, time.time() + 3600)
            config = self.config_file(label, monitor={"reminder_interval": str(interval),
                                                      "reminder_max": str(most)})
            env, home = self.own_home(label)
            work = self.sb.make_dir(label)
            monitor = self.ticking_monitor(work, config=config, env=env)
            wrap = self.hpcrun("wrap", "--config", config, "--work-dir", work, "--name", label,
                               "--command", "echo 'epoch 1/1'", env=self.slurm_env(job_id, env))
            self.assertExit(wrap, 0)
            runs.append((label, job_id, most, goes, work, home, monitor))

        for label, job_id, most, goes, work, home, monitor in runs:
            self.tick_for_reports("success", name=label)
        for label, job_id, most, goes, work, home, monitor in runs:
            end = self.bodies("success", label)[0]
            self.assertRegex(end["content"], r"(?m)^.*billed.*\bscancel %d\b" % job_id, end)

        def reminders(job_id):
            return [body for kind, body in self.reports()
                    if kind == "reminder" and "scancel %d" % job_id in body["title"]]

        for job_id in (4242, 4343):
            self.assertTrue(self.tick_until(lambda: len(reminders(job_id)) >= 2, 15),
                            "no two reminders about job %d\n%s" % (job_id, self.server.describe()))
            if job_id == 4242:
                self.job_gone(4242)
                sent_before_gone = len(reminders(4242))
        for label, job_id, most, goes, work, home, monitor in runs:
            self.assertTrue(self.tick_until(lambda: record_names(work, "reminders") == [], 15),
                            "%s: the reminder was never dropped: %r"
                            % (label, record_names(work, "reminders")))
        self.tick(int((interval + 0.2) / 0.25) + 1)        # a reminder would be due by now
        self.tick(2)
        results = [monitor.result() for _, _, _, _, _, _, monitor in runs]

        self.assertEqual(len(reminders(4242)), sent_before_gone, self.server.describe())
        self.assertIn("job 4242 of released is gone", results[0].out)
        self.assertEqual(len(reminders(4343)), 2, "reminder_max is 2\n" + self.server.describe())
        arrivals = self.ticking[0][0].arrivals(self.server)
        for job_id, label in ((4242, "released"), (4343, "forgotten")):
            times = [t for t, body in zip(arrivals, self.server.bodies)
                     if report_kind(body["title"]) == "reminder" and
                     "scancel %d" % job_id in body["title"]]
            ended = [t for t, body in zip(arrivals, self.server.bodies)
                     if report_kind(body["title"]) == "success" and names_in(body["title"], label)]
            gaps = [b - a for a, b in zip(ended + times, times)]
            for gap in gaps:
                self.assertTrue(0.8 * interval <= gap <= interval + 2.0,
                                "%s: reminders %r s apart, interval %s s" % (label, gaps, interval))
        for result in results:
            self.assertNoTraceback(result)
        self.assertServerClean()


class StatusTest(OperationsTestCase):

    def test_status_of_registered_dirs_shows_progress_time_left_heartbeat_age_failed_pushes(self):
        self.configure()
        self.install_fake_slurm()
        end_time = time.time() + 3000
        self.set_job(6161, end_time)
        running_dir, pushed_dir = self.sb.make_dir("running"), self.sb.make_dir("pushed")
        training = self.start_training(running_dir, "long-run", env=self.slurm_env(6161))
        finished = self.wrap("echo 'epoch 2/2'", work=pushed_dir, extra=["--name", "short-run"])
        self.assertExit(finished, 0)
        self.server.queue(Reply.json({"code": 50077, "msg": "service down"}, 500))
        once = self.hpcrun("monitor", "--once", "--work-dir", pushed_dir)
        self.assertExit(once, 1)
        # the heartbeat after the first sample of the output carries the progress
        self.assertTrue(wait_for(lambda: [r for r in read_records(running_dir, "running").values()
                                          if r.get("progress")], timeout=10),
                        "no progress in the heartbeat: %r" % read_records(running_dir, "running"))

        text = self.hpcrun("status")                      # no --work-dir: the registered dirs
        listed = self.hpcrun("status", "--json")
        self.go(running_dir)
        self.assertExit(self.finish(training), 0)

        self.assertExit(text, 0)
        self.assertExit(listed, 0)
        runs = {run["name"]: run for run in json.loads(listed.out)}
        self.assertEqual(set(runs), {"long-run", "short-run"}, listed.describe())
        long_run, short_run = runs["long-run"], runs["short-run"]
        self.assertEqual(long_run["progress"], "epoch 3/10")
        self.assertTrue(2960 < long_run["time_left"] <= 3000, long_run)
        self.assertTrue(0 <= long_run["heartbeat_age"] < 4, long_run)
        self.assertEqual(short_run["delivery_failures"], 1, short_run)
        self.assertIn("50077", short_run["delivery_error"])

        lines = {name: [l for l in text.out.splitlines() if names_in(l, name)]
                 for name in ("long-run", "short-run")}
        for name, found in lines.items():
            self.assertEqual(len(found), 1, "%s: %r%s" % (name, found, text.describe()))
        self.assertIn("epoch 3/10", lines["long-run"][0])
        self.assertRegex(lines["long-run"][0], r"\brunning\b")
        self.assertRegex(lines["short-run"][0], r"push failed, retrying .*×1: .*HTTP 500.*service down")
        self.assertSecretsKept()


if __name__ == "__main__":
    unittest.main()
