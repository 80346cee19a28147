"""What a new user meets first, end to end with the real hpcrun.py: a command that cannot
start, reported in Chinese; cron --once naming the report that waits for its retry; make
demo. The rest of issue 12's checks run in process: test_first_run.py."""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import unittest

from support import REPO, HpcrunTestCase, Reply, sealed_env
from test_first_run import ENGLISH_WORDS, chinese_config

LAYER = "process"


class StartFailureTest(HpcrunTestCase):

    def test_a_command_that_cannot_start_shows_no_peak_memory_and_no_english_in_chinese(self):
        chinese_config(self.sb)
        result = self.wrap(self.sb.path("no-such-program"), "--flag")
        self.assertExit(result, 127)
        _, record = self.only_record()
        self.assertIsNone(record.get("peak_rss"), record)
        report = self.hpcrun("monitor", "--once", "--work-dir", self.sb.work)
        self.assertExit(report, 0)
        text = report.out.split("\n" + "20", 1)[0]          # the report, not the monitor's log line
        body = text.replace(self.sb.path("no-such-program"), "PROGRAM").replace(self.sb.work, "DIR")
        body = re.sub(r"logs/train_\S+\.log", "LOG", body)
        self.assertNotRegex(body, ENGLISH_WORDS, text)
        self.assertNotIn("峰值内存", text)
        self.assertIn("找不到这个程序", text)


class WaitingReportTest(HpcrunTestCase):

    def test_monitor_once_names_each_report_waiting_for_its_retry(self):
        server = self.start_server()
        self.configure_xxtui(server)
        server.queue(Reply.json({"code": 500, "msg": "system busy"}, 502))
        self.assertExit(self.wrap("echo done", extra=["--name", "waiting-run"]), 0)
        first = self.hpcrun("monitor", "--once", "--work-dir", self.sb.work)
        self.assertExit(first, 1)
        again = self.hpcrun("monitor", "--once", "--work-dir", self.sb.work)
        self.assertExit(again, 1)
        line = self.assertTimestampedLine(again.out, "waiting")
        self.assertIn("waiting-run", line)
        self.assertIn("via xxtui", line)
        self.assertRegex(line, r"retry in \d+m\d+s|retry in \d+s")
        self.assertIn("502", line)
        self.assertEqual(len(server.requests), 1)


class DemoTest(unittest.TestCase):

    def test_make_demo_starts_with_the_demo_not_with_a_warning(self):
        home = tempfile.mkdtemp(prefix="hpcrun-demo-")
        self.addCleanup(shutil.rmtree, home, True)
        env = sealed_env(os.environ, home, os.path.join(home, ".hpcrun"))
        result = subprocess.run(["make", "-s", "demo", "PYTHON=" + sys.executable], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
        output = result.stdout.decode("utf-8", "replace")
        self.assertEqual(result.returncode, 0, output)
        first = next(line for line in output.splitlines() if line.strip())
        self.assertTrue(first.startswith("--- 1."), "first line: %r" % first)
        self.assertNotIn("hpcrun: warning", output)


if __name__ == "__main__":
    unittest.main()
