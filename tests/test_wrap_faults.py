"""wrap under hostile conditions: a purged state dir, a full disk, a record that cannot be
written at SIGTERM, a closed stdout, grandchildren that outlive the training.

Whatever happens around it, wrap exits with the training's status (128+N for its own signal
N), leaves a completion record when the disk lets it, prints no traceback and orphans nothing
of the training's own process group.
"""

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import unittest

from support import (HpcrunTestCase, read_bytes, read_records, record_names, state_dir,
                     wait_for)

LAYER = "process"


# --- trainings ---

# Every training writes its pid files whole: a temporary name, then a rename.
WRITE_PID = (
    "import os, sys, time\n"
    "def write_pid(name, pid):\n"
    "    with open(name + '.part', 'w') as out:\n"
    "        out.write(str(pid))\n"
    "    os.rename(name + '.part', name)\n")

# Writes training.pid, says ready, waits (bounded) for `go`, then exits 3.
PURGED_TRAINING = WRITE_PID + (
    "write_pid('training.pid', os.getpid())\n"
    "print('ready', flush=True)\n"
    "deadline = time.time() + 30\n"
    "while not os.path.exists('go') and time.time() < deadline:\n"
    "    time.sleep(0.01)\n"
    "print('finished', flush=True)\n"
    "sys.exit(3)\n")

# Says one line, waits until the wrapper has logged it (so no log write fails later), then
# fills the disk of its work dir with zeros until ENOSPC and exits 3.
DISK_FILLING_TRAINING = (
    "import errno, os, sys, time\n"
    "print('filling the disk', flush=True)\n"
    "deadline = time.time() + 20\n"
    "while time.time() < deadline:\n"
    "    with open(os.environ['HPCRUN_LOG_FILE'], 'rb') as log:\n"
    "        if b'filling the disk' in log.read():\n"
    "            break\n"
    "    time.sleep(0.01)\n"
    "block = b'\\0' * 65536\n"
    "with open('fill', 'wb', buffering=0) as out:\n"
    "    try:\n"
    "        while True:\n"
    "            out.write(block)\n"
    "    except OSError as error:\n"
    "        if error.errno != errno.ENOSPC:\n"
    "            raise\n"
    "sys.exit(3)\n")

# Ignores SIGTERM and runs (bounded) until killed.
STUBBORN_TRAINING = WRITE_PID + (
    "import signal\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "write_pid('training.pid', os.getpid())\n"
    "print('ready', flush=True)\n"
    "deadline = time.time() + 30\n"
    "while time.time() < deadline:\n"
    "    time.sleep(0.01)\n")

# Several lines on stdout, one on stderr, exit 5.
FIVE_LINES = b"".join(b"step %d loss 0.%d\n" % (i, 9 - i) for i in range(5))
PRINTING_TRAINING = (
    "import sys\n"
    "for i in range(5):\n"
    "    print('step %%d loss 0.%%d' %% (i, 9 - i), flush=True)\n"
    "sys.stderr.write('a warning on stderr\\n'); sys.stderr.flush()\n"
    "sys.stdout.buffer.write(%r); sys.stdout.flush()\n"
    "sys.exit(5)\n" % b"last line\n")
PRINTED = FIVE_LINES + b"a warning on stderr\n" + b"last line\n"

# Forks a grandchild that calls setsid, writes daemon.pid and keeps the inherited stdout
# (the wrapper's pipe) open for 60 s: `chatty` writes a line every 0.1 s, `silent` nothing.
# The training itself writes training.pid once the daemon runs, says so and exits 0.
DAEMONISING_TRAINING = WRITE_PID + (
    "if os.fork() == 0:\n"
    "    try:\n"
    "        os.setsid()\n"
    "        write_pid('daemon.pid', os.getpid())\n"
    "        end = time.time() + 60\n"
    "        while time.time() < end:\n"
    "            if sys.argv[1] == 'chatty':\n"
    "                print('daemon still writing', flush=True)\n"
    "            time.sleep(0.1)\n"
    "    finally:\n"
    "        os._exit(0)\n"
    "deadline = time.time() + 10\n"
    "while not os.path.exists('daemon.pid') and time.time() < deadline:\n"
    "    time.sleep(0.01)\n"
    "write_pid('training.pid', os.getpid())\n"
    "os.write(1, b'training done\\n')  # one write: the daemon writes between print's two\n")

# A shell training: `sleep 300 &` (same process group) and a daemon that called setsid (its
# own session; holds stdout silently), then exit 0.
BACKGROUND_SHELL = (
    "sleep 300 & echo $! > bg.pid\n"
    "%s -c %s silent\n"
    "exit 0\n")


# --- processes ---

def process_state(pid):
    """The state letter of pid from /proc (R, S, Z...), or None when there is no such process."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as stream:
            return stream.read().rsplit(b")", 1)[1].split()[0].decode("ascii")
    except (OSError, IndexError):
        return None


def gone(pid):
    """pid has exited: no /proc entry, or a zombie nobody reaped yet."""
    return process_state(pid) in (None, "Z")


def read_pid(path):
    try:
        with open(path) as handle:
            return int(handle.read().strip())
    except (OSError, ValueError):
        return None


def kill_if_ours(path, home):
    """SIGKILL the pid in path if that process still runs in this test's sandbox (its HOME)."""
    pid = read_pid(path)
    if pid is None:
        return
    try:
        with open("/proc/%d/environ" % pid, "rb") as stream:
            environ = stream.read().split(b"\0")
    except OSError:
        return
    if ("HOME=" + home).encode("utf-8") in environ:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def kill_group_quietly(pgid):
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass


class WrapFaultTestCase(HpcrunTestCase):

    def configure_wrap(self, **settings):
        self.sb.write_config({"wrap": dict((k, str(v)) for k, v in settings.items())})

    def start_python(self, script, *args, **options):
        """wrap -- python -c script args in the background; kills what it leaves behind."""
        work = options.setdefault("work", self.sb.work)
        for name in ("training.pid", "daemon.pid", "bg.pid"):
            self.addCleanup(kill_if_ours, os.path.join(work, name), self.sb.home)
        background = self.start_wrap(sys.executable, "-c", script, *args, **options)
        self.addCleanup(kill_group_quietly, background.proc.pid)
        return background

    def wait_for_file(self, background, path, timeout=15):
        if not wait_for(lambda: os.path.exists(path), timeout=timeout):
            self.fail("%s did not appear within %ss%s"
                      % (os.path.basename(path), timeout, background.result().describe()))
        return path

    def wait_for_exit(self, background, seconds, why):
        """The seconds wrap took to exit from now; fails (explaining why) if it took longer."""
        started = time.monotonic()
        wait_for(lambda: background.proc.poll() is not None, timeout=seconds, interval=0.02)
        took = time.monotonic() - started
        if background.proc.poll() is None:
            self.fail("wrap still running %.1fs after %s%s" % (took, why, self.describe_running(
                background)))
        self.results.append(background.result())
        return took

    @staticmethod
    def describe_running(background):
        return ("\nran: %s\n--- stdout so far (last 600 bytes) ---\n%s\n--- stderr so far ---\n%s"
                % (" ".join(background.argv), background.read_stdout()[-600:].decode(
                    "utf-8", "replace"), background.read_stderr().decode("utf-8", "replace")))

    def assertWarningsAtMost(self, result, count):
        lines = [l for l in result.err.splitlines() if l.startswith("hpcrun: warning:")]
        self.assertLessEqual(len(lines), count, "%d 'hpcrun: warning:' lines, expected at most %d"
                             % (len(lines), count) + result.describe())

    def assertRecord(self, result, exit_code, work=None):
        """One completion record in done/ with this exit_code, and none left in running/."""
        work = work or self.sb.work
        run_id, record = self.only_record(work=work, result=result)
        self.assertEqual(record.get("exit_code"), exit_code, record)
        self.assertEqual(record.get("run_id"), run_id, record)
        self.assertEqual(record_names(work, "running"), [],
                         "a stale running record is left" + result.describe())
        return record


class StateDirPurgedTest(WrapFaultTestCase):
    """A scratch purge removes DIR/.hpcrun while the training runs."""

    @staticmethod
    def purge(work):
        """rmtree DIR/.hpcrun, again if the wrapper wrote into it meanwhile."""
        path = os.path.join(work, ".hpcrun")
        for attempt in range(20):
            try:
                shutil.rmtree(path)
                return
            except FileNotFoundError:
                return
            except OSError:
                if attempt == 19:
                    raise

    def test_a_purged_state_dir_mid_run_still_gives_the_exit_status_and_a_completion_record(self):
        background = self.start_python(PURGED_TRAINING)
        self.wait_for_file(background, os.path.join(self.sb.work, "training.pid"))
        self.purge(self.sb.work)
        open(os.path.join(self.sb.work, "go"), "w").close()
        result = self.finish(background, timeout=15)
        self.assertExit(result, 3)
        self.assertNoTraceback(result)
        record = self.assertRecord(result, 3)
        self.assertEqual(record.get("status"), "failed", record)
        self.assertEqual(result.stdout, b"ready\nfinished\n", result.describe())

    def test_a_heartbeat_due_after_the_purge_crashes_nothing_and_the_record_is_still_written(self):
        self.configure_wrap(heartbeat_interval=1)
        background = self.start_python(PURGED_TRAINING)
        self.wait_for_file(background, os.path.join(self.sb.work, "training.pid"))

        def seq():
            records = read_records(self.sb.work, "running")
            return max([r.get("seq") or 0 for r in records.values()] or [0])

        # right after a heartbeat: the next one is a whole interval away
        if not wait_for(lambda: seq() >= 2, timeout=5):
            self.fail("no heartbeat within 5 s (running: %r)%s" % (read_records(
                self.sb.work, "running"), self.describe_running(background)))
        self.purge(self.sb.work)
        # wait for the next heartbeat: a new running record or a warning, else 2.5 intervals
        wait_for(lambda: os.path.isdir(state_dir(self.sb.work, "running")) or
                 b"hpcrun: warning:" in background.read_stderr(), timeout=2.5)
        self.assertIsNone(background.proc.poll(), "wrap ended before the training"
                          + self.describe_running(background))
        open(os.path.join(self.sb.work, "go"), "w").close()
        result = self.finish(background, timeout=15)
        self.assertExit(result, 3)
        self.assertNoTraceback(result)
        self.assertRecord(result, 3)


class DiskFullTest(WrapFaultTestCase):
    """The work dir's disk is full when the final record is written."""

    def mount_small_tmpfs(self, path, size="1m"):
        if os.geteuid() != 0:
            self.skipTest("a full disk needs a small tmpfs, which only root can mount")
        mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%s" % size, "tmpfs", path],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if mount.returncode != 0:
            self.skipTest("a full disk needs a small tmpfs and mount failed: %s"
                          % mount.stderr.decode("utf-8", "replace").strip())
        self.addCleanup(self.unmount, path)

    @staticmethod
    def unmount(path):
        if subprocess.call(["umount", path], stderr=subprocess.DEVNULL) != 0:
            subprocess.call(["umount", "-l", path])

    def test_a_full_disk_at_the_end_leaves_exit_3_one_warning_a_record_and_no_debris(self):
        self.mount_small_tmpfs(self.sb.work)
        background = self.start_python(DISK_FILLING_TRAINING)
        result = self.finish(background, timeout=20)
        self.assertExit(result, 3)
        self.assertNoTraceback(result)
        self.assertWarningsAtMost(result, 1)
        self.assertIn(b"filling the disk\n", result.stdout, result.describe())
        self.assertGreater(os.path.getsize(os.path.join(self.sb.work, "fill")), 512 * 1024,
                           "the training did not fill the disk" + result.describe())
        debris = []
        for directory, _, names in os.walk(os.path.join(self.sb.work, ".hpcrun")):
            for name in names:
                path = os.path.join(directory, name)
                if name.startswith(".tmp") or os.path.getsize(path) == 0:
                    debris.append("%s (%d bytes)" % (os.path.relpath(path, self.sb.work),
                                                    os.path.getsize(path)))
        self.assertEqual(debris, [], "empty or temporary files left" + result.describe())
        self.assertRecord(result, 3)


class UnwritableRecordAtSigtermTest(WrapFaultTestCase):

    def test_sigterm_when_no_record_can_be_written_still_exits_143_and_kills_the_training(self):
        self.configure_wrap(grace=1)
        background = self.start_python(STUBBORN_TRAINING)
        pid_file = self.wait_for_file(background, os.path.join(self.sb.work, "training.pid"))
        training = read_pid(pid_file)
        done = state_dir(self.sb.work, "done")
        shutil.rmtree(done)
        with open(done, "w") as out:         # every record write now fails with ENOTDIR
            out.write("not a directory\n")
        background.proc.send_signal(signal.SIGTERM)
        took = self.wait_for_exit(background, 6, "SIGTERM (grace 1 s)")
        result = background.result()
        self.assertExit(result, 143)
        self.assertNoTraceback(result)
        # a training ignoring SIGTERM is SIGKILLed after the grace, not left to init
        if not wait_for(lambda: gone(training), timeout=2):
            with open("/proc/%d/stat" % training) as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            self.fail("the training (pid %d, state %s, parent %s) outlived its wrapper, which "
                      "exited %.1fs after SIGTERM%s" % (training, fields[0], fields[1], took,
                                                       result.describe()))


class ClosedStdoutTest(WrapFaultTestCase):

    def test_wrap_started_with_stdout_closed_keeps_the_exit_status_and_logs_every_byte(self):
        # cron style: `exec python3 hpcrun.py wrap ... >&-`
        background = self.start_python(PRINTING_TRAINING,
                                       prefix=["sh", "-c", 'exec "$@" >&-', "sh"])
        result = self.finish(background, timeout=15)
        self.assertExit(result, 5)
        self.assertNoTraceback(result)
        log = self.only_log(result=result)
        self.assertEqual(read_bytes(log), PRINTED, result.describe())
        self.assertRecord(result, 5)


class LingeringGrandchildTest(WrapFaultTestCase):
    """A grandchild that daemonised (setsid) and kept the training's stdout open."""

    def start_daemonising(self, mode):
        work = self.sb.make_dir("work-" + mode)
        background = self.start_python(DAEMONISING_TRAINING, mode, work=work)
        self.wait_for_file(background, os.path.join(work, "training.pid"))
        self.assertTrue(read_pid(os.path.join(work, "daemon.pid")), "no daemon.pid")
        return background, work

    def test_a_daemonised_grandchild_holding_stdout_does_not_keep_wrap_from_exiting(self):
        for mode in ("silent", "chatty"):
            with self.subTest(mode):
                background, work = self.start_daemonising(mode)
                self.wait_for_exit(background, 8, "the training exited, with a %s daemonised "
                                   "grandchild (pid %s) holding its stdout"
                                   % (mode, read_pid(os.path.join(work, "daemon.pid"))))
                result = background.result()
                self.assertExit(result, 0)
                self.assertNoTraceback(result)
                self.assertRecord(result, 0, work=work)
                self.assertIn(b"training done\n", result.stdout, result.describe())

    def test_sigterm_while_wrap_drains_a_chatty_grandchild_ends_wrap_within_2_seconds(self):
        background, work = self.start_daemonising("chatty")
        training = read_pid(os.path.join(work, "training.pid"))
        # reaped by wrap: wrap is now relaying what the grandchild still writes
        if not wait_for(lambda: process_state(training) is None, timeout=5):
            self.fail("the training (pid %d) was not reaped%s" % (
                training, self.describe_running(background)))
        background.proc.send_signal(signal.SIGTERM)
        self.wait_for_exit(background, 2.0, "SIGTERM, sent while it drained the output of a "
                           "daemonised grandchild (the training had exited 0)")
        result = background.result()
        self.assertIn(result.returncode, (0, 143), result.describe())
        self.assertNoTraceback(result)
        record = self.assertRecord(result, result.returncode, work=work)
        self.assertIs(record.get("final"), True, record)


class BackgroundGrandchildTest(WrapFaultTestCase):

    def test_a_cmd_and_grandchild_dies_with_the_process_group_and_a_setsid_daemon_is_left(self):
        work = self.sb.work
        for name in ("bg.pid", "daemon.pid"):
            self.addCleanup(kill_if_ours, os.path.join(work, name), self.sb.home)
        daemon = DAEMONISING_TRAINING.replace("training.pid", "launcher.pid")
        command = BACKGROUND_SHELL % (shlex.quote(sys.executable), shlex.quote(daemon))
        background = self.start_wrap(command, work=work)
        self.addCleanup(kill_group_quietly, background.proc.pid)
        result = self.finish(background, timeout=15)
        self.assertExit(result, 0)
        self.assertNoTraceback(result)
        sleeper, daemon_pid = (read_pid(os.path.join(work, n)) for n in ("bg.pid", "daemon.pid"))
        self.assertTrue(sleeper and daemon_pid, "pid files missing" + result.describe())
        self.assertFalse(gone(daemon_pid), "the setsid daemon (pid %d) did not outlive wrap: it "
                         "should be left alone" % daemon_pid)
        if not wait_for(lambda: gone(sleeper), timeout=2):
            self.fail("the `sleep 300 &` of the training (pid %d, state %s) still runs 2 s after "
                      "wrap exited" % (sleeper, process_state(sleeper)))
        self.assertFalse(gone(daemon_pid), "the setsid daemon (pid %d) was killed after wrap "
                         "exited: it should be left alone" % daemon_pid)

    def test_started_without_exec_the_cmd_and_grandchild_dies_and_the_calling_shell_lives(self):
        # a batch script that runs wrap without exec: the script's shell leads the process
        # group and wrap is only a member of it, so killing "the group" must spare the script
        work = self.sb.work
        self.addCleanup(kill_if_ours, os.path.join(work, "bg.pid"), self.sb.home)
        background = self.start_wrap("sleep 300 & echo $! > bg.pid; exit 0", work=work,
                                     prefix=["sh", "-c", '"$@"; echo "wrap exited $?"', "sh"])
        self.addCleanup(kill_group_quietly, background.proc.pid)
        result = self.finish(background, timeout=15)
        self.assertEqual(result.returncode, 0, "the shell that started wrap did not end "
                         "normally (killed with the group?)" + result.describe())
        self.assertTrue(result.stdout.endswith(b"wrap exited 0\n"), result.describe())
        sleeper = read_pid(os.path.join(work, "bg.pid"))
        self.assertTrue(sleeper, "bg.pid missing" + result.describe())
        if not wait_for(lambda: gone(sleeper), timeout=2):
            self.fail("the `sleep 300 &` of the training (pid %d, state %s) still runs 2 s after "
                      "wrap exited" % (sleeper, process_state(sleeper)))


if __name__ == "__main__":
    unittest.main()
