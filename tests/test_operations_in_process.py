"""selftest in process (hpcrun.main(["selftest", ...]); its wrap step runs the real wrap,
as it does on a cluster): every step ok with one push marked as a test, a rejected key, a
broken config, end reports switched off. The other daily operations are in test_operations.py.
"""

import re
import unittest

from support import KEY, InProcess, Reply, read_bytes
from test_operations import SelftestTestCase

LAYER = "fast"


class SelftestTest(InProcess, SelftestTestCase):

    def test_selftest_passes_end_to_end_with_one_push_marked_as_a_test(self):
        self.configure()
        result = self.hpcrun("selftest", timeout=60)
        self.assertExit(result, 0)
        steps = re.findall(r"(?m)^\[(\d)/(\d)\] ([\w ]+): ok\b", result.out)
        self.assertEqual([(n, total) for n, total, _ in steps],
                         [(str(n), "6") for n in range(1, 7)], result.describe())
        self.assertEqual([name for _, _, name in steps],
                         ["config", "work dir", "wrap", "monitor", "push", "archive"])
        self.assertNotRegex(result.out, r"FAILED")
        self.assertRequestCount(1)
        self.assertServerClean()
        title = self.server.bodies[0]["title"]
        self.assertTrue(title.startswith("[test] "), title)
        self.assertEqual(self.leftovers(self.selftest_dir()), {})
        self.assertNotIn(self.selftest_dir(), self.registry())
        self.assertSecretsKept()

    def test_selftest_with_a_rejected_key_names_the_push_step_and_leaves_nothing_to_push(self):
        self.configure()
        self.server.queue(Reply.json({"code": 40001, "msg": "无效的 API_KEY"}))
        result = self.hpcrun("selftest", timeout=60)
        self.assertExit(result, 1)
        self.assertNoTraceback(result)
        failed = re.findall(r"(?m)^\[(\d)/6\] ([\w ]+): FAILED: (.*)$", result.out)
        self.assertEqual(len(failed), 1, result.describe())
        number, step, message = failed[0]
        self.assertEqual((number, step), ("5", "push"), result.describe())
        self.assertIn("xxtui", message)
        self.assertIn("40001", message)
        self.assertIn("无效的 API_KEY", message)
        self.assertRegex(result.out, r"(?m)^\s+fix: .*\bkey\b")
        self.assertNotRegex(result.out, r"\[6/6\]|selftest passed")
        self.assertRequestCount(1)

        # nothing left that a monitor would push later
        self.assertEqual(self.leftovers(self.selftest_dir()), {})
        for args in (["monitor", "--once"],
                     ["monitor", "--once", "--work-dir", self.selftest_dir()]):
            later = self.hpcrun(*args)
            self.assertExit(later, 0)
        self.assertRequestCount(1)
        self.assertSecretsKept()

    def test_selftest_with_a_broken_config_names_the_config_step(self):
        cases = [("no key", {"notify": {"channels": "xxtui"}}, False, r"api_key"),
                 ("bad number", {"notify": {"min_duration": "soon"}}, True, r"min_duration"),
                 ("unknown event", {"notify": {"events": "end, finished"}}, True, r"finished")]
        for label, sections, with_key, needle in cases:
            with self.subTest(label):
                config = self.config_file(label.replace(" ", "-"), **sections)
                if not with_key:
                    text = read_bytes(config).decode("utf-8").replace("api_key = %s\n" % KEY, "")
                    self.sb.write_file(config, text)
                result = self.hpcrun("selftest", "--config", config, timeout=60)
                self.assertExit(result, 1)
                self.assertNoTraceback(result)
                self.assertRegex(result.out, r"(?m)^\[1/6\] config: FAILED: .*%s" % needle)
                self.assertRegex(result.out, r"(?m)^\s+fix: \S")
                self.assertNotRegex(result.out, r"\[2/6\]")
        self.assertRequestCount(0)

    def test_selftest_never_reports_a_push_that_did_not_happen(self):
        # with end reports switched off, the test report must still go out, or the push fail
        self.configure(notify={"events": "lost, stalled"})
        result = self.hpcrun("selftest", timeout=60)
        if result.returncode == 0:
            self.assertRequestCount(1, context=result)
        else:
            self.assertExit(result, 1)
            self.assertRegex(result.out, r"(?m)^\[5/6\] push: FAILED: ")


if __name__ == "__main__":
    unittest.main()
