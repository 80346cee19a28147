"""In-process tests of how hpcrun treats what it reads from the shared file system (issue 11):
record checks, file names, files a record names, key blocks, secret URL paths, the monitor's
last line of defence. Fast: no subprocess; the attacks through main([...]) are in
test_hostile.py, those that need a real process in test_hostile_e2e.py.
"""

import os
import shutil
import tempfile
import threading
import unittest

import support

LAYER = "fast"

hpcrun = support.load_hpcrun()


class CheckRecordTest(unittest.TestCase):

    def good(self, **fields):
        record = {"run_id": "r1", "name": "r1", "status": "success", "exit_code": 0,
                  "start_time": 1.0, "end_time": 61.0, "duration": 60.0,
                  "job": {"scheduler": "slurm", "id": "42", "end_time": 100.0}}
        record.update(fields)
        return record

    def test_each_poisoned_field_is_an_error_naming_it(self):
        cases = [("duration", float("-inf")), ("duration", float("nan")), ("start_time", 1e300),
                 ("exit_code", "3"), ("exit_code", True), ("job", "x"), ("job", {"id": [1]}),
                 ("job", {"id": "1"}), ("metric", {"values": "x"}), ("warnings", 5),
                 ("warnings", [1]), ("gpus", {"names": [None]}), ("seq", 1 << 70), ("status", "gone")]
        for key, value in cases:
            with self.subTest(key=key, value=value):
                with self.assertRaisesRegex(hpcrun.HpcrunError, "record 'p'"):
                    hpcrun.check_record(self.good(**{key: value}), "p")

    def test_a_good_record_passes_with_numbers_ids_and_text_made_safe(self):
        record = hpcrun.check_record(self.good(name="a\ud800b", job={"scheduler": "pbs", "id": 7},
                                               metric={"name": "loss", "values": [1.0, float("nan")]}), "p")
        self.assertEqual(record["name"], "a\ufffdb")
        self.assertEqual(record["job"]["id"], "7")
        self.assertEqual(len(record["metric"]["values"]), 2)
        (record["name"] + record["job"]["id"]).encode("utf-8")

    def test_a_running_record_needs_no_status(self):
        self.assertEqual(hpcrun.check_record({"seq": 3}, "p", running=True)["seq"], 3)


class RunIdTest(unittest.TestCase):

    def test_only_plain_names_are_run_ids(self):
        good = ["20261130-064350-node07-1234-ab12", "legacy-x", "r1~lost", "a.b_c-d", "_x"]
        bad = ["", ".hidden", "../x", "a/b", "a b", "x\n", "ü", "x.json.y", "-x", "~x", "a" * 201]
        for name in good:
            self.assertTrue(hpcrun.valid_run_id(name), name)
        for name in bad:
            self.assertFalse(hpcrun.valid_run_id(name), name)
        self.assertTrue(hpcrun.valid_run_id(hpcrun.stand_in_id("bad name;x.json")))


class MaskKeyBlocksTest(unittest.TestCase):

    def test_key_blocks_whole_or_cut_by_the_tail_are_masked(self):
        begin, end = "-----BEGIN OPENSSH PRIVATE KEY-----", "-----END OPENSSH PRIVATE KEY-----"
        mask = hpcrun.PRIVATE_KEY_MASK
        cases = [
            (["a", begin, "b3BlbnNzaC1rZXk", "AAAAB3NzaC1yc2E", end, "z"], ["a", mask, "z"]),
            (["AAAAB3NzaC1yc2E", end, "z"], [mask, "z"]),                  # cut at the top
            (["a", "-----BEGIN RSA PRIVATE KEY-----", "MIIEpA"], ["a", mask]),  # cut at the end
            (["a", "-----BEGIN PUBLIC KEY-----", "b"], ["a", "-----BEGIN PUBLIC KEY-----", "b"]),
        ]
        for lines, expected in cases:
            with self.subTest(lines=lines):
                self.assertEqual(hpcrun.mask_key_blocks(lines), expected)


class SecretUrlPartsTest(unittest.TestCase):

    def test_the_token_carrying_parts_of_a_webhook_path_are_secret(self):
        token = "Xq7Vb2Lm9Pz4Rt6Wc8Yd3Kf5"
        parts = hpcrun.secret_url_parts("https://hooks.slack.com/services/T0123ABCD/B0456EFGH/" + token)
        for part in (token, "T0123ABCD/B0456EFGH/" + token, "/services/T0123ABCD/B0456EFGH/" + token):
            self.assertIn(part, parts)
        self.assertNotIn("services", parts)
        discord = hpcrun.secret_url_parts("https://discord.com/api/webhooks/123456789012/" + token)
        self.assertIn(token, discord)
        self.assertNotIn("webhooks", discord)
        self.assertEqual(hpcrun.secret_url_parts("https://open.feishu.cn/open-apis/bot/v2/hook/{token}"), set())
        self.assertIn("0a1b2c3d-4e5f", hpcrun.secret_url_parts("https://q.example/send?key=0a1b2c3d-4e5f&x=1"))


class NamedFileTest(unittest.TestCase):

    def setUp(self):
        self.dir = os.path.realpath(tempfile.mkdtemp(prefix="hpcrun-named-"))
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.work = os.path.join(self.dir, "work")
        os.makedirs(os.path.join(self.work, "logs"))
        self.secret = self.write(os.path.join(self.dir, "outside", "secret.txt"), "secret\n")
        self.log = self.write(os.path.join(self.work, "logs", "train.log"), "epoch 1\n")
        self.me = os.geteuid()

    def write(self, path, text):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as out:
            out.write(text)
        return path

    def tail(self, name, author=None, uid=None):
        record = {"author_uid": self.me if author is None else author}
        return hpcrun.read_named_tail(record, name, self.work, 5, [self.work], uid)

    def test_a_log_in_the_work_dir_is_read(self):
        self.assertEqual(self.tail("logs/train.log"), ["epoch 1"])

    def test_a_record_of_another_user_reads_no_file(self):
        with self.assertRaisesRegex(hpcrun.UnsafeFile, "written by"):
            self.tail("logs/train.log", author=self.me + 4242)

    def test_a_file_outside_the_work_dir_is_read_only_when_it_is_the_users(self):
        self.assertEqual(self.tail(self.secret), ["secret"])
        with self.assertRaisesRegex(hpcrun.UnsafeFile, "outside the work dir"):
            self.tail(self.secret, author=4242, uid=4242)

    def test_fifos_devices_directories_and_loops_are_refused_without_blocking(self):
        os.mkfifo(os.path.join(self.work, "fifo"))
        os.symlink("loop", os.path.join(self.work, "loop"))
        for name in ("fifo", "/dev/zero", "logs", "loop"):
            with self.subTest(name=name):
                with self.assertRaises(hpcrun.UnsafeFile):
                    self.tail(name)

    @unittest.skipUnless(os.geteuid() == 0, "lchown to another user needs root")
    def test_a_symlink_planted_by_another_user_is_not_followed(self):
        link = os.path.join(self.work, "logs", "planted.log")
        os.symlink(self.secret, link)
        os.lchown(link, 4242, 4242)
        with self.assertRaisesRegex(hpcrun.UnsafeFile, "symbolic link of"):
            self.tail("logs/planted.log")


class MonitorLastDefenceTest(unittest.TestCase):
    """A failure no check foresaw is logged with its traceback, secrets masked, and the monitor
    goes on (the end-to-end side is in test_hostile.py)."""

    def setUp(self):
        self.dir = os.path.realpath(tempfile.mkdtemp(prefix="hpcrun-defence-"))
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.config = hpcrun.load_config(os.devnull, env={})
        self.config.secrets = {support.KEY}
        self.lines = []

    def monitor(self, **options):
        return hpcrun.Monitor(self.config, [("console", "console", {})], self.lines.append, **options)

    def test_a_pass_that_raises_is_logged_with_its_traceback_and_secrets_masked(self):
        def work_dirs():
            raise RuntimeError("boom with " + support.KEY)
        status = hpcrun.run_monitor(self.monitor(), work_dirs, 0.01, True, threading.Event())
        self.assertEqual(status, 1)
        text = "\n".join(self.lines)
        self.assertIn("Traceback (most recent call last)", text)
        self.assertIn("RuntimeError: boom with ***", text)
        self.assertNotIn(support.KEY, text)

    def test_a_watch_that_raises_is_logged_and_the_other_runs_are_watched(self):
        work = os.path.join(self.dir, "work")
        running = os.path.join(work, ".hpcrun", "running")
        os.makedirs(running)
        for run_id in ("a-run", "b-run"):
            with open(os.path.join(running, run_id + ".json"), "w") as out:
                out.write('{"run_id": "%s", "seq": 1, "job": {"scheduler": "slurm", "id": "9"}}' % run_id)
        asked = []

        def scheduler(job):
            asked.append(job)
            raise RuntimeError("scheduler bug")
        self.config.sections["monitor"]["stale_after"] = 0.001
        clock = iter([0.0, 0.0, 10.0, 10.0, 20.0, 20.0])
        monitor = self.monitor(scheduler=scheduler, clock=lambda: next(clock))
        monitor.poll([work])
        monitor.poll([work])
        self.assertEqual(len(asked), 2, self.lines)  # both runs, though the first one raised
        self.assertEqual(sum("Traceback" in line for line in self.lines), 2, self.lines)


if __name__ == "__main__":
    unittest.main()
