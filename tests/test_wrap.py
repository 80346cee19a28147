"""wrap: the training's exit status, its log, its bytes, its records."""

import os
import re
import shlex
import signal
import subprocess
import sys
import time
import unittest

from support import (HpcrunTestCase, LOG_NAME_RE, RECORD_TIME_RE, WAIT_FOR_GO, hpcrun_argv,
                     log_files, read_bytes, read_records, record_names, refused_port, wait_for)

LAYER = "process"


# Bytes a training may print: \r redraws, invalid UTF-8, colour codes, no final newline.
AWKWARD_STDOUT = (b"epoch 1\r 10%\r 50%\r100%\n\xff\xfe\xc3( not utf-8\n"
                  b"\x1b[31mred\x1b[0m \x1b[1mbold\x1b[0m\n")
AWKWARD_STDERR = b"warning on stderr\n"
AWKWARD_TAIL = b"last\rno newline"
AWKWARD_ALL = AWKWARD_STDOUT + AWKWARD_STDERR + AWKWARD_TAIL

AWKWARD_SHELL = (r"printf 'epoch 1\r 10%%\r 50%%\r100%%\n\377\376\303( not utf-8\n"
                 r"\033[31mred\033[0m \033[1mbold\033[0m\n'; "
                 r"printf 'warning on stderr\n' >&2; printf 'last\rno newline'")
AWKWARD_PYTHON = (
    "import sys\n"
    "sys.stdout.buffer.write(%r); sys.stdout.flush()\n"
    "sys.stderr.buffer.write(%r); sys.stderr.flush()\n"
    "sys.stdout.buffer.write(%r); sys.stdout.flush()\n"
    % (AWKWARD_STDOUT, AWKWARD_STDERR, AWKWARD_TAIL))

def local_epoch(text, pattern):
    return time.mktime(time.strptime(text, pattern))


class WrapExitStatusAndRecordTest(HpcrunTestCase):

    def test_wrap_of_a_succeeding_command_exits_0_with_its_log_and_a_success_record(self):
        before = time.time()
        result = self.wrap("echo hello; echo world")
        after = time.time()
        self.assertExit(result, 0)
        log = self.only_log(result=result)
        self.assertEqual(read_bytes(log), b"hello\nworld\n")
        self.assertEqual(result.stdout, b"hello\nworld\n", result.describe())
        log_time = local_epoch(LOG_NAME_RE.match(os.path.basename(log)).group(1),
                               "%Y%m%d_%H%M%S")
        self.assertTrue(int(before) - 1 <= log_time <= after + 1, (before, log_time, after))

        run_id, record = self.only_record(result=result)
        self.assertEqual(record_names(self.sb.work, "done"), [run_id + ".json"])
        self.assertEqual(record["status"], "success")
        self.assertEqual(record["exit_code"], 0)
        self.assertIsNone(record.get("signal"))
        self.assertEqual(record["log_file"], "logs/" + os.path.basename(log))
        self.assertEqual(record["run_id"], run_id)
        self.assertEqual(record["schema"], 1)
        self.assertIs(record["final"], True)
        self.assertEqual(record["command"], "echo hello; echo world")
        self.assertEqual(os.path.realpath(record["work_dir"]), self.sb.work)
        self.assertIsNone(record["job"])
        self.assertIsInstance(record["pid"], int)
        self.assertTrue(record["host"])
        self.assertRegex(record["timestamp"], RECORD_TIME_RE)
        end = local_epoch(record["timestamp"], "%Y-%m-%d %H:%M:%S")
        self.assertTrue(int(before) - 1 <= end <= after + 1, (before, end, after))
        self.assertTrue(before - 1 <= record["start_time"] <= record["end_time"] <= after + 1,
                        record)
        self.assertGreaterEqual(record["duration"], 0)
        self.assertEqual(record_names(self.sb.work, "running"), [])

    def test_wrap_of_a_failing_command_exits_with_its_status_and_records_failed(self):
        result = self.wrap("echo boom >&2; echo out; exit 3")
        self.assertExit(result, 3)
        log = self.only_log(result=result)
        self.assertEqual(read_bytes(log), b"boom\nout\n")
        self.assertEqual(result.stdout, b"boom\nout\n", result.describe())
        self.assertNotIn(b"boom", result.stderr)
        _, record = self.only_record(result=result)
        self.assertEqual(record["status"], "failed")
        self.assertEqual(record["exit_code"], 3)
        self.assertEqual(record["log_file"], "logs/" + os.path.basename(log))
        self.assertIs(record["final"], True)
        self.assertEqual(record_names(self.sb.work, "running"), [])

    def test_wrap_runs_a_program_after_double_dash_directly_in_the_work_dir(self):
        result = self.wrap("sh", "-c", 'pwd; printf "%s|" "$@"', "sh", "a b", "$HOME", "*", ";")
        self.assertExit(result, 0)
        expected = (self.sb.work + "\na b|$HOME|*|;|").encode()
        self.assertEqual(result.stdout, expected, result.describe())
        self.assertEqual(read_bytes(self.only_log(result=result)), expected)
        _, record = self.only_record(result=result)
        self.assertEqual(record["status"], "success")
        self.assertIsInstance(record["command"], str)
        self.assertIn("sh", record["command"])

    def test_wrap_of_a_failing_program_after_double_dash_exits_with_its_status(self):
        result = self.wrap("sh", "-c", "echo partial; exit 7")
        self.assertExit(result, 7)
        self.assertEqual(read_bytes(self.only_log(result=result)), b"partial\n")
        _, record = self.only_record(result=result)
        self.assertEqual(record["status"], "failed")
        self.assertEqual(record["exit_code"], 7)

    def test_wrap_exits_128_plus_n_and_records_killed_when_the_training_dies_of_signal_n(self):
        cases = [
            ("bash builtin kill -KILL", ("kill -KILL $$",), signal.SIGKILL, "SIGKILL"),
            ("bash builtin kill -TERM", ("kill -TERM $$",), signal.SIGTERM, "SIGTERM"),
            ("python program SIGUSR1", (sys.executable, "-c",
                                        "import os, signal; print('bye', flush=True); "
                                        "os.kill(os.getpid(), signal.SIGUSR1)"),
             signal.SIGUSR1, "SIGUSR1"),
        ]
        runs = []
        for index, (label, command, number, name) in enumerate(cases):
            work = self.sb.make_dir("work%d" % index)
            runs.append((label, work, number, name, self.start_wrap(*command, work=work)))
        for label, work, number, name, background in runs:
            with self.subTest(label):
                result = self.finish(background)
                self.assertExit(result, 128 + int(number))
                _, record = self.only_record(work=work, result=result)
                self.assertEqual(record["status"], "killed", record)
                self.assertEqual(record["exit_code"], 128 + int(number))
                self.assertEqual(record["signal"], name)
                self.assertEqual(record_names(work, "running"), [])

    def test_wrap_told_to_stop_records_terminated_and_exits_128_plus_n(self):
        runs = []
        for number in (signal.SIGTERM, signal.SIGINT):
            work = self.sb.make_dir("work-%d" % number)
            runs.append((number, work, self.start_wrap(sys.executable, "-c", WAIT_FOR_GO,
                                                       work=work)))
        for number, work, background in runs:
            self.assertTrue(wait_for(lambda: log_files(work) and b"step two" in read_bytes(
                os.path.join(work, "logs", log_files(work)[0])), timeout=10), "no start")
            background.proc.send_signal(number)
        for number, work, background in runs:
            with self.subTest(signal.Signals(number).name):
                result = self.finish(background)
                self.assertExit(result, 128 + int(number))
                # (stdout is the training's: Python prints its KeyboardInterrupt there)
                self.assertNotIn("Traceback", result.err)
                _, record = self.only_record(work=work, result=result)
                self.assertEqual(record["status"], "terminated", record)
                self.assertEqual(record["exit_code"], 128 + int(number))
                self.assertEqual(record["signal"], signal.Signals(number).name)
                self.assertEqual(record_names(work, "running"), [])

    def test_wrap_of_a_program_that_cannot_start_exits_with_the_status_it_records(self):
        result = self.wrap(self.sb.path("no", "such", "program"), "--flag")
        self.assertNotEqual(result.returncode, 0, result.describe())
        self.assertOneErrorLine(result, "program")
        _, record = self.only_record(result=result)
        self.assertEqual(record["status"], "failed")
        self.assertEqual(record["exit_code"], result.returncode, record)

    def test_wrap_and_monitor_accept_a_work_dir_relative_to_the_current_dir(self):
        self.configure_xxtui()
        result = self.hpcrun("wrap", "--work-dir", "work", "--command", "echo relative",
                             cwd=self.sb.root)
        self.assertExit(result, 0)
        _, record = self.only_record(result=result)
        self.assertEqual(read_bytes(os.path.join(self.sb.work, record["log_file"])),
                         b"relative\n")
        monitor = self.hpcrun("monitor", "--once", "--work-dir", "work", cwd=self.sb.root)
        self.assertExit(monitor, 0)
        self.assertEqual(len(self.server.valid_requests), 1, self.server.describe())
        self.assertIn("relative", self.server.bodies[0]["content"])

    def test_wrap_with_log_dir_and_name_writes_there_and_records_the_name(self):
        result = self.wrap("echo named", extra=["--log-dir", "custom/deeper", "--name", "my-run"])
        self.assertExit(result, 0)
        self.assertEqual(log_files(self.sb.work), [])
        log = self.only_log(log_dir="custom/deeper", result=result)
        self.assertEqual(read_bytes(log), b"named\n")
        _, record = self.only_record(result=result)
        self.assertEqual(record["name"], "my-run")
        self.assertEqual(record["log_file"], "custom/deeper/" + os.path.basename(log))

    def test_wrap_without_a_command_or_with_both_forms_is_a_usage_error(self):
        cases = [
            ("no command", ["wrap", "--work-dir", self.sb.work]),
            ("both forms", ["wrap", "--work-dir", self.sb.work, "--command", "true", "--", "true"]),
            ("no work dir", ["wrap", "--command", "true"]),
        ]
        for label, args in cases:
            with self.subTest(label):
                result = self.hpcrun(*args)
                self.assertExit(result, 2)
                self.assertNoTraceback(result)
                self.assertEqual(read_records(self.sb.work, "done"), {})

    def test_wrap_needs_neither_the_network_nor_a_push_key(self):
        self.sb.write_config({"notify": {"channels": "xxtui"},
                              "xxtui": {"url": "http://127.0.0.1:%d/xxtui/{key}" % refused_port()}})
        result = self.wrap("echo offline")
        self.assertExit(result, 0)
        self.assertEqual(result.stdout, b"offline\n")
        _, record = self.only_record(result=result)
        self.assertEqual(record["status"], "success")


class WrapOutputTest(HpcrunTestCase):

    def test_wrap_relays_carriage_returns_invalid_utf8_colours_and_stderr_byte_for_byte(self):
        cases = [("--command via bash", "shell", (AWKWARD_SHELL,)),
                 ("-- program", "program", (sys.executable, "-c", AWKWARD_PYTHON))]
        for label, work_name, command in cases:
            with self.subTest(label):
                work = self.sb.make_dir(work_name)
                result = self.wrap(*command, work=work)
                self.assertExit(result, 0)
                self.assertEqual(result.stdout, AWKWARD_ALL, result.describe())
                self.assertEqual(read_bytes(self.only_log(work=work, result=result)),
                                 AWKWARD_ALL)

    def test_wrap_relays_megabytes_of_output_completely(self):
        script = ("import sys\n"
                  "block = bytes(range(256)) * 64\n"
                  "for _ in range(256): sys.stdout.buffer.write(block)\n")
        expected = bytes(range(256)) * 64 * 256
        result = self.wrap(sys.executable, "-c", script)
        self.assertExit(result, 0)
        self.assertEqual(len(result.stdout), len(expected))
        self.assertTrue(result.stdout == expected, "stdout differs from the training's bytes")
        self.assertTrue(read_bytes(self.only_log(result=result)) == expected,
                        "log differs from the training's bytes")

    def test_wrap_writes_python_output_to_the_log_while_the_training_runs(self):
        background = self.start_wrap(sys.executable, "-c", WAIT_FOR_GO)
        log_dir = os.path.join(self.sb.work, "logs")

        def log_says_started():
            names = log_files(self.sb.work)
            return names and b"step two\n" in read_bytes(os.path.join(log_dir, names[0]))

        seen = wait_for(log_says_started, timeout=10)
        running = record_names(self.sb.work, "running")
        open(os.path.join(self.sb.work, "go"), "w").close()
        result = self.finish(background)
        self.assertTrue(seen, "training output not in the log while it ran" + result.describe())
        self.assertEqual(len([n for n in running if n.endswith(".json")]), 1, running)
        self.assertExit(result, 0)
        self.assertEqual(result.stdout, b"started\nstep two\nfinished\n")

    def test_wrap_rewrites_its_running_record_with_an_increasing_seq(self):
        self.env["HPCRUN_WRAP_HEARTBEAT_INTERVAL"] = "0.1"
        background = self.start_wrap(sys.executable, "-c", WAIT_FOR_GO)
        seen = []

        def seq_advanced():
            records = read_records(self.sb.work, "running")
            if records:
                seen.append(list(records.values())[0].get("seq"))
            numbers = [s for s in seen if isinstance(s, int)]
            return len(set(numbers)) >= 3

        advanced = wait_for(seq_advanced, timeout=10)
        open(os.path.join(self.sb.work, "go"), "w").close()
        result = self.finish(background)
        self.assertExit(result, 0)
        self.assertTrue(advanced, "seq seen: %r" % seen)
        numbers = [s for s in seen if isinstance(s, int)]
        self.assertEqual(numbers, sorted(numbers), "seq went backwards: %r" % seen)
        self.assertEqual(record_names(self.sb.work, "running"), [])

    def test_wrap_keeps_logging_when_its_own_stdout_goes_away(self):
        argv = hpcrun_argv(["wrap", "--work-dir", self.sb.work, "--command",
                            'for i in $(seq 1 20000); do echo "line $i"; done; echo end'])
        read_end, write_end = os.pipe()
        os.close(read_end)             # the terminal that was watching is gone
        with open(self.sb.path("stderr"), "wb") as stderr:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=write_end,
                                    stderr=stderr, env=self.env, cwd=self.sb.root)
        os.close(write_end)
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        proc.wait(30)
        self.assertEqual(proc.returncode, 0, read_bytes(self.sb.path("stderr")))
        log = read_bytes(self.only_log())
        self.assertTrue(log.endswith(b"line 20000\nend\n"), log[-100:])
        self.assertEqual(log.count(b"\n"), 20001)
        _, record = self.only_record()
        self.assertEqual(record["status"], "success")

    def test_wrap_does_not_wait_for_background_processes_the_training_left(self):
        pid_file = os.path.join(self.sb.work, "left-behind.pid")

        def kill_left_behind():
            try:
                os.kill(int(open(pid_file).read()), signal.SIGKILL)
            except (OSError, ValueError):
                pass
        self.addCleanup(kill_left_behind)
        started = time.monotonic()
        result = self.wrap("sleep 30 & echo $! > left-behind.pid; echo started")
        elapsed = time.monotonic() - started
        self.assertExit(result, 0)
        self.assertLess(elapsed, 10, "wrap waited for a process the training left behind")
        self.assertEqual(read_bytes(self.only_log(result=result)), b"started\n")
        self.assertEqual(self.only_record(result=result)[1]["status"], "success")

    def test_wrap_sets_pythonunbuffered_for_the_training(self):
        result = self.wrap('printf "%s\\n" "${PYTHONUNBUFFERED-unset}"')
        self.assertExit(result, 0)
        self.assertEqual(result.stdout, b"1\n", result.describe())

    def test_wrap_keeps_the_pythonunbuffered_the_user_set(self):
        self.env["PYTHONUNBUFFERED"] = "0"
        result = self.wrap('printf "%s\\n" "${PYTHONUNBUFFERED-unset}"')
        self.assertExit(result, 0)
        self.assertEqual(result.stdout, b"0\n", result.describe())

    def test_wrap_exports_the_run_id_and_the_log_file_to_the_training(self):
        result = self.wrap('printf "%s\\n%s\\n" "$HPCRUN_RUN_ID" "$HPCRUN_LOG_FILE"')
        self.assertExit(result, 0)
        lines = result.out.splitlines()
        self.assertEqual(len(lines), 2, result.describe())
        run_id, _ = self.only_record(result=result)
        self.assertEqual(lines[0], run_id)
        log = self.only_log(result=result)
        self.assertEqual(os.path.realpath(os.path.join(self.sb.work, lines[1])),
                         os.path.realpath(log))

    def test_wrap_runs_the_command_string_unchanged_through_bash_in_the_work_dir(self):
        self.sb.write_file(os.path.join(self.sb.work, "env.sh"),
                           "GREETING='hi there'\nexport GREETING\n", secret=False)
        command = ('source env.sh && echo "$GREETING, \\"quoted\\" world" '
                   "&& echo 'single $HOME' && [[ -n $BASH_VERSION ]] && pwd")
        result = self.wrap(command)
        self.assertExit(result, 0)
        expected = 'hi there, "quoted" world\nsingle $HOME\n%s\n' % self.sb.work
        self.assertEqual(result.out, expected, result.describe())
        _, record = self.only_record(result=result)
        self.assertEqual(record["command"], command)

    def test_wrap_never_overwrites_an_existing_log(self):
        log_dir = self.sb.make_dir("work", "logs")
        now = int(time.time())
        old = {}
        for offset in range(-1, 5):
            name = time.strftime("train_%Y%m%d_%H%M%S.log", time.localtime(now + offset))
            old[name] = ("old log %d\n" % offset).encode()
            with open(os.path.join(log_dir, name), "wb") as handle:
                handle.write(old[name])
        result = self.wrap("echo new")
        self.assertExit(result, 0)
        for name, data in old.items():
            self.assertEqual(read_bytes(os.path.join(log_dir, name)), data, name)
        new = sorted(set(log_files(self.sb.work)) - set(old))
        self.assertEqual(len(new), 1, log_files(self.sb.work))
        self.assertRegex(new[0], LOG_NAME_RE)
        self.assertEqual(read_bytes(os.path.join(log_dir, new[0])), b"new\n")
        _, record = self.only_record(result=result)
        self.assertEqual(record["log_file"], "logs/" + new[0])


class ManyWrappersTest(HpcrunTestCase):

    def test_ten_wrappers_started_together_in_one_dir_give_ten_logs_records_and_pushes(self):
        server = self.start_server()
        self.configure_xxtui(server)
        runs = [self.start_wrap("echo output of job %d" % index, extra=["--name", "job-%d" % index])
                for index in range(10)]
        results = [self.finish(run) for run in runs]
        for result in results:
            self.assertExit(result, 0)

        names = log_files(self.sb.work)
        self.assertEqual(len(names), 10, names)
        contents = sorted(read_bytes(os.path.join(self.sb.work, "logs", n)) for n in names)
        self.assertEqual(contents, sorted(b"output of job %d\n" % i for i in range(10)))
        records = read_records(self.sb.work, "done")
        self.assertEqual(sorted(r["name"] for r in records.values()),
                         sorted("job-%d" % i for i in range(10)))
        self.assertEqual(sorted(r["log_file"] for r in records.values()),
                         sorted("logs/" + n for n in names))

        result = self.hpcrun("monitor", "--work-dir", self.sb.work, "--once")
        self.assertExit(result, 0)
        self.assertServerClean()
        self.assertRequestCount(10, context=result)
        for index in range(10):
            mentioning = [body for body in server.bodies
                          if re.search(r"\bjob-%d\b" % index, body["title"])
                          and "output of job %d" % index in body["content"]]
            self.assertEqual(len(mentioning), 1, "job-%d: %s" % (index, server.describe()))
        self.assertEqual(read_records(self.sb.work, "done"), {})
        self.assertEqual(len(read_records(self.sb.work, "sent")), 10)
        self.assertSecretsKept()


class JobStartTest(HpcrunTestCase):
    """A batch script may work minutes (module load, staging data) before it execs wrap: the
    time limit counts from the job's start, not the wrapper's."""

    STAGE = 3   # seconds the job script works before it execs wrap

    def test_a_pbs_walltime_counts_from_the_job_shell_started_by_pbs_mom(self):
        mom = os.path.join(self.sb.root, "pbs_mom")     # a process of that name, like the daemon
        os.symlink(sys.executable, mom)
        wrap = " ".join(shlex.quote(arg) for arg in hpcrun_argv(
            ["wrap", "--work-dir", self.sb.work, "--command", "true"]))
        env = dict(self.env, PBS_JOBID="4242.pbs", PBS_WALLTIME="3600",
                   PBS_ENVIRONMENT="PBS_BATCH")
        before = time.time()
        status = subprocess.call(
            [mom, "-c", "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))",
             "sh", "-c", "sleep %d; exec %s" % (self.STAGE, wrap)],
            env=env, cwd=self.sb.root, stdout=subprocess.DEVNULL, timeout=60)
        self.assertEqual(status, 0)
        _, record = self.only_record()
        job_start = record["job"]["end_time"] - 3600
        # /proc's boot time is whole seconds: the start it gives may be off by up to one
        self.assertGreaterEqual(job_start, before - 1.1, record)
        self.assertLessEqual(job_start, record["start_time"] - (self.STAGE - 1.1),
                             "the end counts from the wrapper's start, not the job's: %r" % record)


if __name__ == "__main__":
    unittest.main()
