"""run, status of a running wrapper, and importing hpcrun, end to end with the real hpcrun.py.
status, notify --test and --version run in process: test_run_status_notify.py."""

import json
import os
import re
import subprocess
import sys
import unittest

from support import (REPO, SUCCESS_WORDS, WAIT_FOR_GO, HpcrunTestCase, log_files, read_bytes,
                     read_records, record_names, refused_port, wait_for)

LAYER = "process"


def dicts_in(value):
    """Every JSON object anywhere inside value."""
    if isinstance(value, dict):
        yield value
        for item in value.values():
            for found in dicts_in(item):
                yield found
    elif isinstance(value, list):
        for item in value:
            for found in dicts_in(item):
                yield found


def strings_in(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            for found in strings_in(item):
                yield found
    elif isinstance(value, list):
        for item in value:
            for found in strings_in(item):
                yield found


class RunTest(HpcrunTestCase):

    def run_training(self, command, name):
        return self.hpcrun("run", "--work-dir", self.sb.work, "--command", command,
                           "--name", name)

    def test_run_pushes_the_report_itself_and_exits_with_the_failed_training_status(self):
        self.configure_xxtui()
        result = self.run_training("echo ran; exit 4", "self-push")
        self.assertExit(result, 4)
        self.assertTrue(result.stdout.startswith(b"ran\n"), result.describe())
        self.assertServerClean()
        self.assertRequestCount(1, context=result)
        body = self.server.bodies[0]
        self.assertIn("self-push", body["title"])
        self.assertRegex(body["title"], r"(?i)fail")
        self.assertIn("ran", body["content"])
        self.assertEqual(read_records(self.sb.work, "done"), {})
        self.assertEqual(len(read_records(self.sb.work, "sent")), 1)
        self.assertEqual(len(log_files(self.sb.work)), 1)

        monitor = self.hpcrun("monitor", "--once", "--work-dir", self.sb.work)
        self.assertExit(monitor, 0)
        self.assertRequestCount(1, context=monitor)
        self.assertSecretsKept()

    def test_run_of_a_succeeding_training_exits_0_after_one_push(self):
        self.configure_xxtui()
        result = self.run_training("echo fine", "good-run")
        self.assertExit(result, 0)
        self.assertServerClean()
        self.assertRequestCount(1, context=result)
        self.assertIn("good-run", self.server.bodies[0]["title"])
        self.assertRegex(self.server.bodies[0]["title"], SUCCESS_WORDS)
        self.assertNotRegex(self.server.bodies[0]["title"], r"(?i)fail|kill")

    def test_run_keeps_the_record_and_says_so_when_the_service_is_down(self):
        server = self.start_server()
        self.configure_xxtui(server, overrides={"xxtui": {
            "url": "http://127.0.0.1:%d/xxtui/{key}" % refused_port()}})
        # the retry delay is fixed when the push fails: make it 0 for the monitor below
        self.env["HPCRUN_MONITOR_RETRY_BASE"] = "0"
        result = self.run_training("echo trained", "offline-run")
        self.assertExit(result, 0)
        self.assertNoTraceback(result)
        self.assertRegex(result.err, r"(?i)record|monitor|later", result.describe())
        self.assertEqual(len(read_records(self.sb.work, "done")), 1, result.describe())
        self.assertEqual(read_records(self.sb.work, "sent"), {})
        self.assertEqual(record_names(self.sb.work, "claimed"), [])

        self.configure_xxtui(server)
        monitor = self.hpcrun("monitor", "--once", "--work-dir", self.sb.work)
        self.assertExit(monitor, 0)
        self.assertRequestCount(1, context=monitor)
        self.assertIn("offline-run", server.bodies[0]["title"])
        self.assertEqual(read_records(self.sb.work, "done"), {})
        self.assertEqual(len(read_records(self.sb.work, "sent")), 1)
        self.assertServerClean()
        self.assertSecretsKept()


class StatusTest(HpcrunTestCase):

    def test_status_shows_a_running_wrapper_as_running_and_a_finished_one_as_waiting(self):
        self.env["HPCRUN_NOTIFY_LANGUAGE"] = "en"   # the table speaks the configured language
        self.assertExit(self.wrap("echo finished line", extra=["--name", "done-run"]), 0)
        wrapper = self.start_wrap(sys.executable, "-c", WAIT_FOR_GO, extra=["--name", "live-run"])

        def log_has_step_two():
            for name in log_files(self.sb.work):
                if b"step two\n" in read_bytes(os.path.join(self.sb.work, "logs", name)):
                    return True
            return False

        ready = wait_for(lambda: record_names(self.sb.work, "running") and log_has_step_two(),
                         timeout=10)
        text = self.hpcrun("status", "--work-dir", self.sb.work)
        as_json = self.hpcrun("status", "--work-dir", self.sb.work, "--json")
        open(os.path.join(self.sb.work, "go"), "w").close()
        self.assertExit(self.finish(wrapper), 0)

        self.assertTrue(ready, "the wrapper did not start")
        self.assertExit(text, 0)
        lines = text.out.splitlines()
        live = [line for line in lines if "live-run" in line]
        done = [line for line in lines if "done-run" in line]
        self.assertEqual(len(live), 1, text.describe())
        self.assertEqual(len(done), 1, text.describe())
        self.assertRegex(live[0], r"(?i)\brunning\b")
        self.assertIn("step two", live[0])
        self.assertRegex(live[0], r"\b\d+s\b")  # how long it has run
        self.assertRegex(done[0], r"(?i)ended, to report")
        self.assertIn("finished line", done[0])

        self.assertExit(as_json, 0)
        data = json.loads(as_json.out)
        runs = {}
        for entry in dicts_in(data):
            for name in ("live-run", "done-run"):
                if name in entry.values():
                    runs[name] = entry
        self.assertEqual(sorted(runs), ["done-run", "live-run"], as_json.describe())
        self.assertTrue(any(re.search(r"(?i)^running$", s) for s in strings_in(runs["live-run"])),
                        runs["live-run"])
        self.assertTrue(any(re.search(r"(?i)wait", s) for s in strings_in(runs["done-run"])),
                        runs["done-run"])


class ImportTest(HpcrunTestCase):

    def test_importing_hpcrun_prints_nothing_and_creates_nothing(self):
        env = dict(self.env, PYTHONPATH=REPO)
        proc = subprocess.Popen([sys.executable, "-c", "import hpcrun"], cwd=self.sb.work,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = proc.communicate(timeout=30)
        self.assertEqual((proc.returncode, out, err), (0, b"", b""))
        self.assertEqual(os.listdir(self.sb.work), [])
        self.assertEqual(sorted(os.listdir(self.sb.home)), [])


if __name__ == "__main__":
    unittest.main()
