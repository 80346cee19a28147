"""Configuration end to end, with the real hpcrun.py: a wrapped run reported without any
config, in an ASCII locale, in the configured language; where wrap writes its log; the
interval of a monitor that keeps running.

The rest of the configuration tests run in process: test_config.py."""

import os
import re
import signal
import sys
import unittest

from support import KEY, REPO, WAIT_FOR_GO, HpcrunTestCase, log_files, read_records
from test_config import CJK, xxtui_config

LAYER = "process"


class NoConfigTest(HpcrunTestCase):

    def setUp(self):
        super(NoConfigTest, self).setUp()
        if os.path.exists(os.path.join(REPO, "config.ini")):
            self.skipTest("a config.ini beside hpcrun.py would be found")

    def test_without_any_config_monitor_prints_the_report_and_warns_nothing_is_pushed(self):
        wrapped = self.wrap("echo console tail line", extra=["--name", "quiet-run"])
        self.assertExit(wrapped, 0)
        result = self.hpcrun("monitor", "--once", "--work-dir", self.sb.work)
        self.assertExit(result, 0)
        self.assertNoTraceback(result)
        self.assertIn("quiet-run", result.out)
        self.assertIn("console tail line", result.out)
        warnings = [line for line in result.err.splitlines() if re.search(r"(?i)warning", line)]
        self.assertEqual(len(warnings), 1, result.describe())
        self.assertEqual(len(read_records(self.sb.work, "sent")), 1, result.describe())
        self.assertEqual(read_records(self.sb.work, "done"), {})
        again = self.hpcrun("monitor", "--once", "--work-dir", self.sb.work)
        self.assertExit(again, 0)
        self.assertNotIn("console tail line", again.out)

    def test_console_report_in_chinese_survives_an_ascii_locale(self):
        self.env.update({"LANG": "C", "LC_ALL": "C", "PYTHONCOERCECLOCALE": "0",
                         "PYTHONUTF8": "0"})
        self.assertExit(self.wrap("echo ascii world", extra=["--name", "c-locale"]), 0)
        result = self.hpcrun("monitor", "--once", "--work-dir", self.sb.work)
        self.assertExit(result, 0)
        self.assertNoTraceback(result)
        self.assertIn("c-locale", result.out)
        self.assertIn("ascii world", result.out)


class PrecedenceTest(HpcrunTestCase):

    def test_language_comes_from_env_then_config_then_defaults_to_chinese(self):
        server = self.start_server()
        self.secrets.append(KEY)
        cases = [("default is zh", None, {}, True),
                 ("config en", "en", {}, False),
                 ("config zh", "zh", {}, True),
                 ("env en beats config zh", "zh", {"HPCRUN_NOTIFY_LANGUAGE": "en"}, False)]
        wraps = []
        for index, case in enumerate(cases):
            work = self.sb.make_dir("work%d" % index)
            wraps.append((case, work, self.start_wrap("echo plain ascii output", work=work,
                                                      extra=["--name", "lang-run"])))
        for (label, language, env, chinese), work, background in wraps:
            with self.subTest(label):
                self.assertExit(self.finish(background), 0)
                sections = xxtui_config(server)
                if language:
                    sections["notify"]["language"] = language
                else:
                    del sections["notify"]["language"]
                self.sb.write_config(sections)
                count = len(server.requests)
                result = self.hpcrun("monitor", "--once", "--work-dir", work,
                                     env=dict(self.env, **env))
                self.assertExit(result, 0)
                self.assertRequestCount(count + 1, context=result)
                body = server.requests[-1].json
                if chinese:
                    self.assertRegex(body["title"], CJK)
                else:
                    self.assertNotRegex(body["title"] + body["content"], CJK)
        self.assertServerClean()

    def test_log_dir_comes_from_flag_then_env_then_config_then_default(self):
        self.sb.write_config({"wrap": {"log_dir": "from-config"}})
        cases = [("flag", ["--log-dir", "from-flag"], {"HPCRUN_WRAP_LOG_DIR": "from-env"},
                  "from-flag"),
                 ("env", [], {"HPCRUN_WRAP_LOG_DIR": "from-env"}, "from-env"),
                 ("config", [], {}, "from-config")]
        runs = []
        for label, flags, env, expected in cases:
            work = self.sb.make_dir(label)
            runs.append((label, work, expected, self.start_wrap(
                "echo where", work=work, extra=flags, env=dict(self.env, **env))))
        for label, work, expected, background in runs:
            with self.subTest(label):
                result = self.finish(background)
                self.assertExit(result, 0)
                self.assertEqual(len(log_files(work, expected)), 1, result.describe())
                self.assertEqual(sorted(n for n in os.listdir(work) if not n.startswith(".")),
                                 [expected.split("/")[0]])
        os.remove(self.sb.config_path)
        with self.subTest("default"):
            work = self.sb.make_dir("default")
            result = self.wrap("echo where", work=work)
            self.assertExit(result, 0)
            self.assertEqual(len(log_files(work, "logs")), 1, result.describe())

    def test_interval_comes_from_flag_then_env_then_config(self):
        server = self.start_server()
        self.secrets.append(KEY)
        self.sb.write_config(dict(xxtui_config(server), monitor={"interval": "3600"}))
        cases = [("env beats config", [], {"HPCRUN_MONITOR_INTERVAL": "1"}),
                 ("flag beats env", ["--interval", "1"], {"HPCRUN_MONITOR_INTERVAL": "3600"})]
        runs = []
        for label, flags, env in cases:
            work = self.sb.make_dir(label.replace(" ", "-"))
            self.assertExit(self.wrap("echo first", work=work), 0)
            waiting = self.start_wrap(sys.executable, "-c", WAIT_FOR_GO, work=work)
            monitor = self.start("monitor", "--work-dir", work, *flags,
                                 env=dict(self.env, **env))
            runs.append((label, work, waiting, monitor))
        # both monitors delivered the first run: their first poll is over
        self.assertTrue(server.wait_for_requests(2, timeout=10), server.describe())
        for label, work, waiting, monitor in runs:
            open(os.path.join(work, "go"), "w").close()
            self.assertExit(self.finish(waiting), 0)
        delivered = server.wait_for_requests(4, timeout=6)
        for label, work, waiting, monitor in runs:
            monitor.proc.send_signal(signal.SIGTERM)
            result = self.finish(monitor, timeout=10)
            with self.subTest(label):
                self.assertTrue(delivered, server.describe() + result.describe())
                self.assertEqual(len(read_records(work, "sent")), 2, result.describe())
        self.assertServerClean()


if __name__ == "__main__":
    unittest.main()
