"""hpcrun.sh: a real background monitor, its pid file, status, log, stop, cron and help.

HPCRUN_TEST_SH points these tests at another copy of hpcrun.sh (with hpcrun.py next to it),
to check that they catch a broken script; unset, they test the one in the repository.
"""

import errno
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import unittest

from support import (REPO, HpcrunTestCase, Result, kill_group, read_bytes, read_records,
                     wait_for)

LAYER = "process"


HPCRUN_SH = os.path.abspath(os.environ.get("HPCRUN_TEST_SH") or os.path.join(REPO, "hpcrun.sh"))
# hpcrun.sh runs the hpcrun.py that sits next to it (symlinks resolved).
HPCRUN_PY_BESIDE = os.path.join(os.path.dirname(os.path.realpath(HPCRUN_SH)), "hpcrun.py")
# What hpcrun.sh names its pid file and log after: bash's HOSTNAME up to the first dot.
HOST = socket.gethostname().split(".")[0]
COMMANDS = ("monitor", "stop", "status", "log", "cron", "help")


# --- processes, seen from outside ---

def command_line(pid):
    """The command line of pid as one string, "" for a zombie, None when there is no such pid."""
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except IOError as error:
        if error.errno != errno.ENOENT or os.path.isdir("/proc/self"):
            return None
    answer = subprocess.run(["ps", "-p", str(pid), "-o", "args="], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    return answer.stdout.decode("utf-8", "replace").strip() if answer.returncode == 0 else None


def process_gone(pid):
    """True once pid has exited: no such process, or a zombie nobody has reaped yet."""
    try:
        os.kill(pid, 0)
    except OSError as error:
        return error.errno == errno.ESRCH
    try:
        with open("/proc/%d/stat" % pid, "rb") as handle:
            return handle.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (IOError, IndexError):
        return command_line(pid) is None


def is_monitor_of(pid, root):
    """pid is a live `hpcrun.py monitor` whose command line names a path under root."""
    line = command_line(pid) or ""
    return bool(re.search(r"hpcrun\.py monitor\b", line)) and root in line


def monitors_of(root):
    """Pids of every live hpcrun.py monitor under root (None where /proc cannot be listed)."""
    if not os.path.isdir("/proc/self"):
        return None
    return sorted(int(name) for name in os.listdir("/proc")
                  if name.isdigit() and is_monitor_of(int(name), root))


def run_sh(args, env, cwd, timeout=30):
    """Run hpcrun.sh to the end; return a support.Result."""
    argv = [HPCRUN_SH] + [str(arg) for arg in args]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, cwd=cwd, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        returncode = proc.returncode
    except subprocess.TimeoutExpired:
        kill_group(proc)
        stdout, stderr = proc.communicate()
        returncode = None
    result = Result(returncode, stdout, stderr)
    result.argv = argv
    result.cwd = cwd
    result.env_notes = sorted((n, v) for n, v in env.items()
                              if n.startswith("HPCRUN_") or n == "HOME")
    if returncode is None:
        raise AssertionError("hpcrun.sh did not finish within %ss%s" % (timeout, result.describe()))
    return result


# --- the test case ---

class HpcrunShTestCase(HpcrunTestCase):
    """A sandbox whose hpcrun.sh monitors are killed at the end, whatever happened."""

    def setUp(self):
        super(HpcrunShTestCase, self).setUp()
        self.env = dict(self.env)
        self.env["HPCRUN_PYTHON"] = sys.executable
        self.env.pop("HOSTNAME", None)  # bash then takes it from gethostname(), like HOST
        self.pid_file = os.path.join(self.sb.hpcrun_home, "monitor.%s.pid" % HOST)
        self.log_file = os.path.join(self.sb.hpcrun_home, "monitor.%s.log" % HOST)
        self.seen_pids = set()
        self.addCleanup(self.kill_monitors)

    def kill_monitors(self):
        """Kill every monitor of this sandbox: by its pid file, by pids seen, by /proc."""
        pids = set(self.seen_pids)
        pids.update(filter(None, [self.read_pid_file()]))
        pids.update(monitors_of(self.sb.root) or ())
        for pid in sorted(pids):
            if is_monitor_of(pid, self.sb.root):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError as error:
                    if error.errno != errno.ESRCH:
                        raise
                wait_for(lambda: process_gone(pid), timeout=5)

    def context(self):
        """What the test ran, and the monitor's log: its stdout and stderr."""
        text = super(HpcrunShTestCase, self).context()
        if os.path.exists(self.log_file):
            log = read_bytes(self.log_file).decode("utf-8", "replace")
            text += "\n--- %s ---\n%s\n--- end ---" % (self.log_file, log[-3000:])
        return text

    # running hpcrun.sh
    def sh(self, *args, **options):
        options.setdefault("cwd", self.sb.root)
        result = run_sh(args, options.pop("env", None) or self.env, **options)
        self.results.append(result)
        self.seen_pids.update(int(n) for n in re.findall(r"\bpid (\d+)", result.out + result.err))
        return result

    def start_monitor(self, *extra):
        """`./hpcrun.sh monitor WORK -- --interval 1 ...`, which must succeed; returns its pid."""
        result = self.sh("monitor", self.sb.work, "--", "--interval", "1", *extra)
        self.assertExit(result, 0)
        pid = self.read_pid_file()
        self.assertIsNotNone(pid, "no pid in '%s'%s" % (self.pid_file, result.describe()))
        self.seen_pids.add(pid)
        self.assertTrue(is_monitor_of(pid, self.sb.root),
                        "pid %d is not an hpcrun.py monitor: %r" % (pid, command_line(pid)))
        self.assertTrue(command_line(pid).startswith(sys.executable + " "),
                        "not run by HPCRUN_PYTHON %s: %r" % (sys.executable, command_line(pid)))
        self.assertIn("pid %d" % pid, result.out)
        self.assertIn(self.log_file, result.out)
        return pid

    # pid file and log
    def read_pid_file(self):
        try:
            text = read_bytes(self.pid_file).decode("ascii", "replace").strip()
        except IOError:
            return None
        return int(text) if text.isdigit() else None

    def write_pid_file(self, text):
        os.makedirs(self.sb.hpcrun_home, exist_ok=True)
        with open(self.pid_file, "w", encoding="ascii") as handle:
            handle.write(text)

    def read_log(self):
        try:
            return read_bytes(self.log_file).decode("utf-8", "replace")
        except IOError:
            return ""

    def wait_for_log(self, pattern, timeout=10):
        found = wait_for(lambda: re.search(pattern, self.read_log(), re.MULTILINE), timeout)
        self.assertTrue(found, "no line matching %r in the monitor's log" % pattern)

    # other processes
    def not_a_monitor(self):
        """A live process that is not a monitor (a sleep), killed at the end."""
        sleeper = subprocess.Popen(["sleep", "60"], start_new_session=True)
        self.addCleanup(sleeper.wait)
        self.addCleanup(kill_group, sleeper)
        return sleeper

    def dead_pid(self):
        process = subprocess.Popen(["true"])
        process.wait()
        return process.pid

    def assertNotRunning(self, pid):
        self.assertTrue(wait_for(lambda: process_gone(pid), timeout=5),
                        "pid %d still runs: %r" % (pid, command_line(pid)))

    def assertRunningLine(self, status, pid):
        """status says, on one line, that the monitor runs here and names its pid."""
        self.assertRegex(status.out, r"(?m)^.*\brunning\b.*\bpid %d\b" % pid)

    def assertMonitorCount(self, count):
        found = monitors_of(self.sb.root)
        if found is not None:
            self.assertEqual(len(found), count, "monitors running: %r" % found)


class MonitorLifecycleTest(HpcrunShTestCase):

    def test_background_monitor_delivers_a_run_wrapped_after_it_started(self):
        server = self.start_server()
        self.configure_xxtui(server)
        pid = self.start_monitor()
        self.wait_for_log(r"monitor started")

        status = self.sh("status")
        self.assertExit(status, 0)
        self.assertRunningLine(status, pid)

        self.assertExit(self.wrap("echo trained for a while", extra=["--name", "bg-run"]), 0)
        self.assertTrue(server.wait_for_requests(1, timeout=10), server.describe())
        self.wait_for_log(r"delivered: ")
        self.assertServerClean()
        self.assertRequestCount(1)
        self.assertIn("bg-run", server.bodies[0]["title"])
        self.assertIn("trained for a while", server.bodies[0]["content"])
        self.assertEqual(read_records(self.sb.work, "done"), {})
        self.assertEqual(len(read_records(self.sb.work, "sent")), 1)
        self.assertTrue(is_monitor_of(pid, self.sb.root), "the monitor stopped after delivering")
        self.assertSecretsKept()

    def test_log_shows_the_monitor_lines_with_timestamps(self):
        self.configure_xxtui()
        self.assertExit(self.wrap("echo done", extra=["--name", "logged-run"]), 0)
        pid = self.start_monitor()  # its first poll delivers the run
        self.wait_for_log(r"delivered: logged-run")

        log = self.sh("log")
        self.assertExit(log, 0)
        self.assertEqual(log.err, "")
        self.assertIn("pid %d" % pid, self.assertTimestampedLine(log.out, "monitor started"))
        self.assertIn("logged-run", self.assertTimestampedLine(log.out, "delivered: "))

    def test_stop_ends_the_monitor_removes_its_pid_file_and_status_then_exits_3(self):
        pid = self.start_monitor()
        self.wait_for_log(r"monitor started")

        stop = self.sh("stop")
        self.assertExit(stop, 0)
        self.assertIn("pid %d" % pid, stop.out)
        self.assertNotRunning(pid)
        self.assertFalse(os.path.exists(self.pid_file), "the pid file is still there")
        self.assertTimestampedLine(self.read_log(), "monitor stopped")  # TERM, not KILL
        self.assertExit(self.sh("status"), 3)

        again = self.sh("stop")
        self.assertExit(again, 0)
        self.assertIn("no monitor running", again.out)

    def test_a_second_start_refuses_and_leaves_exactly_one_monitor_running(self):
        pid = self.start_monitor()
        self.wait_for_log(r"monitor started")

        second = self.sh("monitor", self.sb.work, "--", "--interval", "1")
        self.assertNotEqual(second.returncode, 0, second.describe())
        self.assertIn("pid %d" % pid, second.err)
        self.assertEqual(self.read_pid_file(), pid)
        self.assertTrue(is_monitor_of(pid, self.sb.root), "the first monitor is gone")
        self.assertMonitorCount(1)
        self.assertEqual(len(re.findall(r"monitor started", self.read_log())), 1, self.read_log())
        status = self.sh("status")
        self.assertExit(status, 0)
        self.assertRunningLine(status, pid)

    def test_start_reports_a_monitor_that_exits_at_once_and_leaves_no_pid_file(self):
        os.makedirs(self.sb.hpcrun_home)
        with open(self.log_file, "w", encoding="utf-8") as handle:
            handle.write("an old line from an earlier monitor\n")
        missing = self.sb.path("no-such-config.ini")

        start = self.sh("monitor", self.sb.work, "--", "--interval", "1", "--config", missing)
        self.assertExit(start, 1)
        self.assertIn("cannot read config", start.err)
        self.assertIn(missing, start.err)
        self.assertNotIn("an old line", start.err)
        self.assertFalse(os.path.exists(self.pid_file), "a pid file names a dead monitor")
        self.assertMonitorCount(0)
        self.assertExit(self.sh("status"), 3)

    def test_start_refuses_hpcrun_options_before_the_double_dash(self):
        start = self.sh("monitor", self.sb.work, "--interval", "1")
        self.assertExit(start, 1)
        self.assertIn("'--interval'", start.err)
        self.assertFalse(os.path.exists(self.pid_file))
        self.assertMonitorCount(0)


class StalePidFileTest(HpcrunShTestCase):

    def test_a_pid_file_naming_a_dead_process_is_stale_and_start_replaces_it(self):
        dead = self.dead_pid()
        self.write_pid_file("%d\n" % dead)
        self.assertExit(self.sh("status"), 1)

        pid = self.start_monitor()
        self.assertNotEqual(pid, dead)
        self.assertExit(self.sh("status"), 0)

    def test_a_pid_file_naming_a_live_process_that_is_not_a_monitor_is_stale(self):
        sleeper = self.not_a_monitor()
        self.write_pid_file("%d\n" % sleeper.pid)
        status = self.sh("status")
        self.assertExit(status, 1)

        pid = self.start_monitor()
        self.assertNotEqual(pid, sleeper.pid)
        self.assertIsNone(sleeper.poll(), "hpcrun.sh killed the sleep")
        self.assertExit(self.sh("stop"), 0)
        self.assertNotRunning(pid)
        self.assertIsNone(sleeper.poll(), "hpcrun.sh stop killed the sleep")

    def test_stop_with_a_pid_file_naming_another_process_leaves_it_alone(self):
        sleeper = self.not_a_monitor()
        self.write_pid_file("%d\n" % sleeper.pid)
        stop = self.sh("stop")
        self.assertExit(stop, 0)
        self.assertIn("no monitor running", stop.out)
        self.assertIsNone(sleeper.poll(), "hpcrun.sh stop killed the sleep")
        self.assertFalse(os.path.exists(self.pid_file), "the stale pid file is still there")
        self.assertExit(self.sh("status"), 3)

    def test_monitor_of_a_dir_that_does_not_exist_refuses_to_start(self):
        missing = self.sb.path("no-such-dir")
        result = self.sh("monitor", missing, "--", "--interval", "1")
        self.assertExit(result, 1)
        self.assertIn("no-such-dir", result.err)
        self.assertIsNone(self.read_pid_file())
        self.assertMonitorCount(0)

    def test_status_of_a_killed_monitor_never_says_alive_and_dead_at_once(self):
        pid = self.start_monitor()
        self.assertTrue(wait_for(lambda: os.path.exists(os.path.join(
            self.sb.hpcrun_home, "monitors", "%s.json" % socket.gethostname())), timeout=10),
            "the monitor wrote no heartbeat")
        os.kill(pid, signal.SIGKILL)     # its heartbeat file stays, fresh
        self.assertNotRunning(pid)
        status = self.sh("status")
        self.assertExit(status, 1)
        self.assertNotRegex(status.out, r"\balive\b")
        self.assertRegex(status.out, r"(?m)^monitor on .*\bdead\b")

    def test_status_of_a_pid_file_without_a_pid_exits_1(self):
        self.write_pid_file("not a pid\n")
        self.assertExit(self.sh("status"), 1)

    def test_without_a_pid_file_status_exits_3_and_log_says_there_is_none(self):
        status = self.sh("status")
        self.assertExit(status, 3)
        self.assertIn("not running", status.out)
        log = self.sh("log")
        self.assertExit(log, 1)
        self.assertIn(self.log_file, log.err)


class CronTest(HpcrunShTestCase):

    def cron_command(self, *args):
        """The command part of the crontab line `hpcrun.sh cron ARGS` prints, and the Result.

        HPCRUN_PYTHON is a bare name found on PATH, which cron's bare PATH would not find.
        """
        bin_dir = self.sb.make_dir("bin")
        os.symlink(sys.executable, os.path.join(bin_dir, "python-under-test"))
        env = dict(self.env, HPCRUN_PYTHON="python-under-test")
        env["PATH"] = bin_dir + os.pathsep + env["PATH"]
        result = self.sh("cron", *args, env=env)
        self.assertExit(result, 0)
        lines = [line for line in result.out.splitlines() if not line.startswith("#")]
        self.assertEqual(len(lines), 1, "expected one crontab line" + result.describe())
        fields = lines[0].split(None, 5)
        self.assertEqual(fields[:5], ["*/5", "*", "*", "*", "*"], result.describe())
        return fields[5], result

    def test_cron_prints_a_crontab_line_with_absolute_paths_and_once(self):
        work = self.sb.make_dir("my work")
        config = self.sb.path("cron config.ini")
        command, result = self.cron_command("my work", "--", "--config", config)
        words = shlex.split(command.replace("\\%", "%"))
        self.assertEqual(words[:3], ["cd", os.path.dirname(HPCRUN_PY_BESIDE), "&&"], command)
        self.assertTrue(os.path.isabs(words[3]), command)
        self.assertEqual(os.path.realpath(words[3]), os.path.realpath(sys.executable), command)
        self.assertEqual(words[4], HPCRUN_PY_BESIDE, command)
        self.assertEqual(words[5], "monitor", command)
        self.assertIn("--once", words)
        self.assertEqual(words[words.index("--work-dir") + 1], work, command)
        self.assertEqual(words[words.index("--config") + 1], config, command)
        redirects = [word for word in words if word.startswith(">>")]
        self.assertEqual(len(redirects), 1, command)
        self.assertTrue(os.path.isabs(redirects[0][2:]), command)
        self.assertEqual(words[-1], "2>&1", command)
        self.assertFalse(os.path.exists(self.pid_file), "cron started a monitor")
        self.assertMonitorCount(0)

    def test_the_cron_line_run_by_sh_with_a_bare_environment_delivers_a_wrapped_run(self):
        server = self.start_server()
        self.configure_xxtui(server)
        work = self.sb.make_dir("cron work")
        self.assertExit(self.wrap("echo trained", work=work, extra=["--name", "cron-run"]), 0)
        command, _ = self.cron_command(work)

        cron_env = {"HOME": self.sb.home, "PATH": "/usr/bin:/bin", "SHELL": "/bin/sh",
                    "LOGNAME": "hpcrun-test"}
        ran = subprocess.run(["/bin/sh", "-c", command.replace("\\%", "%")], env=cron_env,
                             cwd=self.sb.home, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, timeout=30)
        cron_log = os.path.join(self.sb.hpcrun_home, "cron.%s.log" % HOST)
        explanation = "ran: /bin/sh -c %r\n%s%s" % (
            command, ran.stdout.decode("utf-8", "replace"),
            read_bytes(cron_log).decode("utf-8", "replace") if os.path.exists(cron_log) else "")
        self.assertEqual(ran.returncode, 0, explanation)
        self.assertServerClean()
        self.assertRequestCount(1)
        self.assertIn("cron-run", server.bodies[0]["title"])
        self.assertIn("delivered: cron-run", read_bytes(cron_log).decode("utf-8", "replace"))
        self.assertEqual(len(read_records(work, "sent")), 1)


class UsageTest(HpcrunShTestCase):

    def test_help_prints_the_usage_on_stdout_and_no_arguments_on_stderr_with_status_2(self):
        bare = self.sh()
        self.assertExit(bare, 2)
        self.assertEqual(bare.out, "")
        self.assertTrue(bare.err.startswith("Usage: ./hpcrun.sh"), bare.describe())
        for args in (["help"], ["-h"], ["--help"]):
            with self.subTest(args=args):
                result = self.sh(*args)
                self.assertExit(result, 0)
                self.assertEqual(result.err, "")
                self.assertTrue(result.out.startswith("Usage: ./hpcrun.sh"), result.describe())
                for command in COMMANDS:
                    self.assertRegex(result.out, r"(?m)^\s+%s\b" % command)
                self.assertNotRegex(result.out, r"(?m)^#|set -euo")
        self.assertFalse(os.path.exists(self.sb.hpcrun_home), "usage created the state dir")

    def test_an_unknown_command_prints_the_usage_on_stderr_and_exits_2(self):
        result = self.sh("strat")
        self.assertExit(result, 2)
        self.assertEqual(result.out, "")
        self.assertIn("Usage: ./hpcrun.sh", result.err)
        self.assertIn("'strat'", result.err)


if __name__ == "__main__":
    unittest.main()
