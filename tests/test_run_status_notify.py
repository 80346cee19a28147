"""status, notify --test and --version in process (hpcrun.main([...])). What needs the real
hpcrun.py (run, which wraps; status of a running wrapper; a bare import) is in
test_run_status_notify_e2e.py."""

import hashlib
import json
import os
import re
import shutil
import unittest

from support import HPCRUN, KEY, REPO, HpcrunTestCase, InProcess, Reply, read_bytes, refused_port

LAYER = "fast"


class StatusTest(InProcess, HpcrunTestCase):

    def test_status_of_an_empty_work_dir_succeeds(self):
        result = self.hpcrun("status", "--work-dir", self.sb.work)
        self.assertExit(result, 0)
        self.assertNoTraceback(result)
        as_json = self.hpcrun("status", "--work-dir", self.sb.work, "--json")
        self.assertExit(as_json, 0)
        json.loads(as_json.out)


class NotifyTestTest(InProcess, HpcrunTestCase):

    def test_notify_test_prints_ok_for_a_channel_that_accepted_and_exits_0(self):
        self.configure_xxtui()
        result = self.hpcrun("notify", "--test")
        self.assertExit(result, 0)
        self.assertRegex(result.out, r"(?m)^xxtui: ok$")
        self.assertRequestCount(1, context=result)
        self.assertServerClean()
        self.assertSecretsKept()

    def test_notify_test_names_why_a_channel_failed_and_exits_1(self):
        cases = [
            ("http 500", Reply.json({"code": 50077, "msg": "internal boom at /xxtui/" + KEY}, 500),
             [r"\b500\b", "internal boom"]),
            ("code not 0", Reply.json({"code": 40123, "msg": "bad key here"}),
             [r"\b40123\b", "bad key here"]),
            ("refused", None, [r"(?i)refused"]),
        ]
        server = self.start_server()
        for label, reply, needles in cases:
            with self.subTest(label):
                if reply is None:
                    self.configure_xxtui(server, overrides={"xxtui": {
                        "url": "http://127.0.0.1:%d/xxtui/{key}" % refused_port()}})
                else:
                    self.configure_xxtui(server)
                    server.queue(reply)
                result = self.hpcrun("notify", "--test")
                self.assertExit(result, 1)
                self.assertNoTraceback(result)
                failed = [line for line in result.out.splitlines()
                          if line.startswith("xxtui: failed: ")]
                self.assertEqual(len(failed), 1, result.describe())
                for needle in needles:
                    self.assertRegex(failed[0], needle)
        self.assertServerClean()
        self.assertSecretsKept()

    def test_notify_test_prints_one_line_per_channel_and_fails_if_any_failed(self):
        self.configure_xxtui(overrides={"notify": {"channels": "xxtui, console"}})
        self.server.queue(Reply.json({"code": 40123, "msg": "bad key here"}))
        result = self.hpcrun("notify", "--test")
        self.assertExit(result, 1)
        self.assertRegex(result.out, r"(?m)^xxtui: failed: .*40123")
        self.assertRegex(result.out, r"(?m)^console: ok$")
        self.assertSecretsKept()

    def test_notify_test_without_config_uses_the_console_channel(self):
        if os.path.exists(os.path.join(REPO, "config.ini")):
            self.skipTest("a config.ini beside hpcrun.py would be found")
        result = self.hpcrun("notify", "--test")
        self.assertExit(result, 0)
        self.assertRegex(result.out, r"(?m)^console: ok$")


class VersionTest(InProcess, HpcrunTestCase):

    VERSION_RE = re.compile(r"^hpcrun (\d+\.\d+\.\d+) \(sha256 ([0-9a-f]{12})\)$")

    def test_version_prints_the_version_and_the_first_12_hex_digits_of_the_file_sha256(self):
        result = self.hpcrun("--version")
        self.assertExit(result, 0)
        match = self.VERSION_RE.match(result.out.strip())
        self.assertTrue(match, result.describe())
        self.assertEqual(match.group(2), hashlib.sha256(read_bytes(HPCRUN)).hexdigest()[:12])

    def test_version_hash_changes_with_the_file_contents(self):
        copy = self.sb.path("copy", "hpcrun.py")
        os.makedirs(os.path.dirname(copy))
        shutil.copy(HPCRUN, copy)
        with open(copy, "ab") as handle:
            handle.write(b"\n# a local edit\n")
        result = self.hpcrun("--version", script=copy)
        self.assertExit(result, 0)
        match = self.VERSION_RE.match(result.out.strip())
        self.assertTrue(match, result.describe())
        self.assertEqual(match.group(2), hashlib.sha256(read_bytes(copy)).hexdigest()[:12])
        self.assertNotEqual(match.group(2), hashlib.sha256(read_bytes(HPCRUN)).hexdigest()[:12])


if __name__ == "__main__":
    unittest.main()
