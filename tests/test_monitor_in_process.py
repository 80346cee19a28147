"""monitor --once in process (hpcrun.main([...])): usage errors, nothing to report, the
records of the original design. The monitor's reports of wrapped runs, its failures and its
long-running life are in test_monitor.py."""

import json
import os
import unittest

from support import SUCCESS_WORDS, InProcess
from test_monitor import MonitorTestCase

LAYER = "fast"


class MonitorOnceTest(InProcess, MonitorTestCase):

    def test_monitor_once_with_nothing_to_report_exits_0_and_pushes_nothing(self):
        self.configure_xxtui()
        result = self.monitor_once()
        self.assertExit(result, 0)
        self.assertNoTraceback(result)
        self.assertRequestCount(0, context=result)

    def test_monitor_usage_errors_exit_2(self):
        cases = [("interval not a number", ["monitor", "--once", "--work-dir", self.sb.work,
                                            "--interval", "abc"]),
                 ("unknown option", ["monitor", "--once", "--work-dir", self.sb.work, "--fast"])]
        for label, args in cases:
            with self.subTest(label):
                result = self.hpcrun(*args)
                self.assertExit(result, 2)
                self.assertNoTraceback(result)


LEGACY_LOG = "".join("legacy line %d\n" % i for i in range(1, 9))


class LegacyRecordTest(InProcess, MonitorTestCase):

    def write_legacy(self, work, record):
        log = os.path.join(work, "logs", "train_20240101_123456.log")
        self.sb.write_file(log, LEGACY_LOG, secret=False)
        if record.get("log_file") == "ABSOLUTE":
            record["log_file"] = log
        marker = os.path.join(work, ".train_complete.json")
        self.sb.write_file(marker, json.dumps(record, indent=2), secret=False)
        return marker

    def test_monitor_reports_and_removes_an_original_design_record_with_exit_code(self):
        self.configure_xxtui()
        marker = self.write_legacy(self.sb.work, {
            "timestamp": "2024-01-01 12:34:56", "status": "success", "exit_code": 0,
            "log_file": "logs/train_20240101_123456.log"})
        result = self.monitor_once()
        self.assertExit(result, 0)
        self.assertServerClean()
        self.assertRequestCount(1, context=result)
        body = self.server.bodies[0]
        self.assertIn("legacy line 8", body["content"])
        self.assertRegex(body["title"], SUCCESS_WORDS)
        self.assertNotRegex(body["title"], r"(?i)fail|kill")
        self.assertFalse(os.path.exists(marker), "the legacy record was not removed")
        again = self.monitor_once()
        self.assertExit(again, 0)
        self.assertRequestCount(1, context=again)

    def test_monitor_reports_and_removes_an_original_design_record_with_return_code(self):
        self.configure_xxtui()
        cases = [
            ("fields named in the issue", {
                "return_code": 2, "start_time": "2024-01-01 12:00:00",
                "end_time": "2024-01-01 12:34:56", "elapsed_seconds": 2096.5,
                "command": "python train.py --epochs 3",
                "log_file": "logs/train_20240101_123456.log"}),
            ("as train_wrapper.py wrote it", {
                "status": "completed", "start_time": "2024-01-01 12:00:00",
                "end_time": "2024-01-01 12:34:56", "elapsed_seconds": 2096.5,
                "return_code": 2, "command": "python train.py --epochs 3",
                "work_dir": "WORK", "log_file": "ABSOLUTE", "timestamp": 1704112496.25}),
        ]
        for index, (label, record) in enumerate(cases):
            with self.subTest(label):
                work = self.sb.make_dir("legacy%d" % index)
                if record.get("work_dir") == "WORK":
                    record["work_dir"] = work
                marker = self.write_legacy(work, record)
                count = len(self.server.requests)
                result = self.monitor_once(work)
                self.assertExit(result, 0)
                self.assertServerClean()
                self.assertRequestCount(count + 1, context=result)
                body = self.server.requests[-1].json
                self.assertIn("legacy line 8", body["content"])
                self.assertIn("python train.py --epochs 3", body["content"])
                self.assertRegex(body["title"], r"(?i)fail")
                self.assertNotRegex(body["title"], r"(?i)succe|\u2705")
                self.assertFalse(os.path.exists(marker), "the legacy record was not removed")


if __name__ == "__main__":
    unittest.main()
