"""In-process tests of hpcrun's pure helpers and of main(): tables of cases.

These name hpcrun.py's internal functions; the subprocess tests in the other files do not.
"""

import os
import re
import shutil
import signal
import tempfile
import time
import unittest
import urllib.parse

import support
from support import KEY, FakeXxtui, Reply, render_ini

LAYER = "fast"

hpcrun = support.load_hpcrun()


class TempDirTestCase(unittest.TestCase):

    def setUp(self):
        self.dir = os.path.realpath(tempfile.mkdtemp(prefix="hpcrun-unit-"))
        self.addCleanup(shutil.rmtree, self.dir, True)

    def write(self, name, data, mode=None):
        path = os.path.join(self.dir, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(data if isinstance(data, bytes) else data.encode("utf-8"))
        if mode is not None:
            os.chmod(path, mode)
        return path


class FormatDurationTest(unittest.TestCase):

    def test_format_duration_is_compact_and_never_negative(self):
        cases = [(0, "0s"), (42, "42s"), (59.6, "1m00s"), (303, "5m03s"),
                 (3 * 3600 + 12 * 60 + 5, "3h12m"), (24 * 3600, "24h00m"), (2 * 86400 + 4 * 3600, "52h00m"), (5 * 86400 + 4 * 3600, "5d04h"),
                 (None, "0s"), (-5, "0s")]
        for seconds, expected in cases:
            with self.subTest(seconds=seconds):
                self.assertEqual(hpcrun.format_duration(seconds), expected)


class RedactTest(unittest.TestCase):

    def test_redact_masks_the_key_raw_and_url_quoted(self):
        odd = "k/ey+with %20 spaces&\u00fc"
        cases = [
            ("url with the key", KEY, "POST https://www.xxtui.com/xxtui/%s failed" % KEY),
            ("quoted odd key", odd, "http://h/xxtui/%s: 404" % urllib.parse.quote(odd, safe="")),
            ("raw odd key", odd, "key %s in a message" % odd),
            ("both forms", odd, "%s and %s" % (odd, urllib.parse.quote(odd, safe=""))),
        ]
        for label, secret, text in cases:
            with self.subTest(label):
                masked = hpcrun.redact(text, hpcrun.secret_forms(secret))
                for form in (secret, urllib.parse.quote(secret, safe="")):
                    self.assertNotIn(form, masked)
                self.assertIn("***", masked)

    def test_redact_leaves_text_without_secrets_alone(self):
        text = "HTTP 500, code 7, internal error"
        self.assertEqual(hpcrun.redact(text, hpcrun.secret_forms(KEY)), text)


class SignalNameTest(unittest.TestCase):

    def test_signal_name_of_common_and_unknown_numbers(self):
        cases = [(signal.SIGKILL, "SIGKILL"), (signal.SIGTERM, "SIGTERM"),
                 (signal.SIGINT, "SIGINT"), (signal.SIGSEGV, "SIGSEGV"), (200, "SIG200")]
        for number, expected in cases:
            with self.subTest(expected):
                self.assertEqual(hpcrun.signal_name(int(number)), expected)


class ReadTailTest(TempDirTestCase):

    def test_read_tail_returns_the_last_lines_cleaned(self):
        cases = [
            ("plain", b"a\nb\nc\n", 2, ["b", "c"]),
            ("no final newline", b"a\nb\nc", 2, ["b", "c"]),
            ("fewer lines than asked", b"only\n", 5, ["only"]),
            ("empty file", b"", 3, []),
            ("zero lines asked", b"a\nb\n", 0, []),
            ("trailing blank lines", b"a\nb\n\n\n", 1, ["b"]),
            ("progress redraws", b"epoch 1\r 10%\r 50%\r100%\ndone\n", 2, ["100%", "done"]),
            ("colour codes", b"\x1b[31mred\x1b[0m and \x1b[1mbold\x1b[0m\n", 1, ["red and bold"]),
            ("invalid utf-8", b"\xff\xfe bad\n", 1, ["\ufffd\ufffd bad"]),
            ("crlf", b"x\r\ny\r\n", 2, ["x", "y"]),
            ("chinese", "\u8bad\u7ec3\u5b8c\u6210\n".encode("utf-8"), 1,
             ["\u8bad\u7ec3\u5b8c\u6210"]),
        ]
        for index, (label, data, count, expected) in enumerate(cases):
            with self.subTest(label):
                path = self.write("log%d" % index, data)
                self.assertEqual(hpcrun.read_tail(path, count), expected)

    def test_read_tail_never_returns_a_line_cut_by_its_byte_limit(self):
        path = self.write("log", "".join("line %04d\n" % i for i in range(1000)))
        lines = hpcrun.read_tail(path, 100, max_bytes=95)
        self.assertTrue(lines)
        self.assertEqual(lines[-1], "line 0999")
        for line in lines:
            self.assertRegex(line, r"^line \d{4}$")

    def test_read_tail_of_a_huge_log_reads_only_its_end(self):
        path = os.path.join(self.dir, "huge.log")
        with open(path, "wb") as handle:
            handle.write(b"first line\n")
            handle.seek(4 * 1024 ** 3)          # sparse: 4 GB that cost nothing on disk
            handle.write(b"\nsecond to last\nthe very last\n")
        started = time.monotonic()
        lines = hpcrun.read_tail(path, 2)
        elapsed = time.monotonic() - started
        self.assertEqual(lines, ["second to last", "the very last"])
        self.assertLess(elapsed, 1.0, "read_tail seems to read the whole file")


class ReportTextTest(unittest.TestCase):

    def test_report_text_keeps_the_header_and_cuts_the_tail_from_the_top(self):
        header = ["status: failed", "exit code: 3"]
        tail = ["tail %03d" % i for i in range(1, 101)]
        for limit in (60, 200, 4000):
            with self.subTest(limit=limit):
                report = hpcrun.Report("title", header, tail, "en", limit)
                text = report.text(4000)
                self.assertLessEqual(len(text), limit)
                self.assertTrue(text.startswith("status: failed\nexit code: 3"), text)
                self.assertTrue(text.endswith("tail 100"), text)

    def test_report_text_within_a_channel_limit_smaller_than_max_chars(self):
        report = hpcrun.Report("t", ["head"], ["x" * 50] * 10, "en", 4000)
        self.assertLessEqual(len(report.text(120)), 120)


class DescribeAnswerTest(unittest.TestCase):

    def test_describe_answer_names_status_code_and_message_without_the_key(self):
        cases = [
            ("json error", 500, b'{"code": 7, "msg": "boom"}', ["500", "7", "boom"]),
            ("message field", 200, b'{"code": 3, "message": "quota"}', ["200", "3", "quota"]),
            ("html page", 502, b"<html><body>Bad Gateway</body></html>", ["502"]),
            ("key in the body", 404, ('{"code": 4, "msg": "no route /xxtui/%s"}' % KEY).encode(),
             ["404", "4"]),
        ]
        for label, status, body, needles in cases:
            with self.subTest(label):
                text = hpcrun.describe_answer(status, body, hpcrun.secret_forms(KEY))
                for needle in needles:
                    self.assertIn(needle, text)
                self.assertNotIn(KEY, text)


class SendXxtuiTest(unittest.TestCase):

    def setUp(self):
        self.server = FakeXxtui(KEY).start()
        self.addCleanup(self.server.stop)
        self.settings = {"api_key": KEY, "url": self.server.url, "timeout": 2, "from": "hpcrun"}
        self.report = hpcrun.Report("title", ["body line"], [], "en", 4000)

    def send(self, reply=None):
        if reply is not None:
            self.server.queue(reply)
        return hpcrun.CHANNELS["xxtui"].send(self.settings, self.report, hpcrun.secret_forms(KEY))

    def test_send_xxtui_success_is_code_0_as_number_or_string(self):
        for reply in (Reply.ok(), Reply.json({"code": "0"}), Reply.json({"code": 0}, 201)):
            with self.subTest(reply=reply):
                self.send(reply)
        self.assertEqual(self.server.errors, [])
        self.assertEqual(len(self.server.requests), 3)

    def test_send_xxtui_failures_raise_channel_error_saying_if_a_retry_may_help(self):
        # xxtui documents no error codes: a 2xx that is not a success (a code, a proxy's
        # page) may pass, so it is retried on the normal schedule; redirects and 4xx are not.
        cases = [
            ("code not 0", Reply.json({"code": 1, "msg": "bad key"}), True),
            ("no code", Reply.json({"msg": "ok"}), True),
            ("not json", Reply.raw(200, "hello"), True),
            ("http 500", Reply.json({"code": 500}, 500), True),
            ("http 429", Reply.json({"code": 429}, 429), True),
            ("http 403", Reply.json({"code": 403}, 403), False),
            ("redirect", Reply.redirect(), False),
        ]
        for label, reply, retryable in cases:
            with self.subTest(label):
                with self.assertRaises(hpcrun.ChannelError) as caught:
                    self.send(reply)
                self.assertEqual(caught.exception.retryable, retryable)
                self.assertNotIn(KEY, str(caught.exception))
        self.assertEqual([r.method for r in self.server.requests], ["POST"] * len(cases))
        self.assertEqual(self.server.errors, [])

    def test_send_xxtui_network_failures_raise_channel_error(self):
        self.settings["url"] = "http://127.0.0.1:%d/xxtui/{key}" % support.refused_port()
        with self.assertRaises(hpcrun.ChannelError) as caught:
            self.send()
        self.assertNotIn(KEY, str(caught.exception))
        self.settings.update(url=self.server.url, timeout=0.3)
        with self.assertRaises(hpcrun.ChannelError):
            self.send(Reply.hang(5))


class ConfigTest(TempDirTestCase):

    def load(self, config=None, keys=None, env=None, overrides=None, keys_mode=0o600):
        path = self.write("conf/config.ini", render_ini(config)) if config is not None else None
        keys_path = os.path.join(self.dir, "conf", "api_keys.ini")
        if keys is not None:
            self.write("conf/api_keys.ini", render_ini(keys), keys_mode)
        elif os.path.exists(keys_path):
            os.remove(keys_path)
        environment = {"HOME": os.path.join(self.dir, "home")}
        environment.update(env or {})
        return hpcrun.load_config(path, overrides, environment, os.path.join(self.dir, "app"))

    def test_settings_come_from_flag_env_keys_file_config_file_then_default(self):
        cases = [
            ("default", {}, None, {}, None, ("monitor", "interval"), 60),
            ("config file", {"monitor": {"interval": "30"}}, None, {}, None,
             ("monitor", "interval"), 30),
            ("env beats config", {"monitor": {"interval": "30"}}, None,
             {"HPCRUN_MONITOR_INTERVAL": "20"}, None, ("monitor", "interval"), 20),
            ("flag beats env", {"monitor": {"interval": "30"}}, None,
             {"HPCRUN_MONITOR_INTERVAL": "20"}, {"monitor": {"interval": 10.0}},
             ("monitor", "interval"), 10),
            ("keys file beats config", {"xxtui": {"api_key": "from-config"}},
             {"xxtui": {"api_key": "from-keys"}}, {}, None, ("xxtui", "api_key"), "from-keys"),
            ("env beats keys file", {"xxtui": {"api_key": "from-config"}},
             {"xxtui": {"api_key": "from-keys"}}, {"HPCRUN_XXTUI_API_KEY": "from-env"}, None,
             ("xxtui", "api_key"), "from-env"),
            ("XXTUI_KEY is read", {}, None, {"XXTUI_KEY": "from-legacy-env"}, None,
             ("xxtui", "api_key"), "from-legacy-env"),
            ("language default", {}, None, {}, None, ("notify", "language"), "zh"),
            ("language env", {"notify": {"language": "zh"}}, None,
             {"HPCRUN_NOTIFY_LANGUAGE": "en"}, None, ("notify", "language"), "en"),
        ]
        for label, config, keys, env, overrides, (section, key), expected in cases:
            with self.subTest(label):
                loaded = self.load(config, keys, env, overrides)
                self.assertEqual(loaded.get(section, key), expected)

    def test_every_secret_is_known_so_it_can_be_masked(self):
        loaded = self.load({"xxtui": {"url": "http://h/xxtui/{key}"}},
                           {"xxtui": {"api_key": KEY}})
        self.assertIn(KEY, loaded.secrets)

    def test_config_errors_name_the_file_and_the_key(self):
        cases = [
            ("interval", {"monitor": {"interval": "abc"}}, "interval"),
            ("timeout", {"xxtui": {"timeout": "soon"}}, "timeout"),
            ("max_chars", {"report": {"max_chars": "4k"}}, "max_chars"),
        ]
        for label, config, key in cases:
            with self.subTest(label):
                with self.assertRaises(hpcrun.ConfigError) as caught:
                    self.load(config)
                self.assertIn("config.ini", str(caught.exception))
                self.assertIn(key, str(caught.exception))

    def test_unknown_channel_and_missing_key_are_config_errors(self):
        cases = [("unknown", {"notify": {"channels": "xxtui, pager"}}, {"xxtui": {"api_key": KEY}},
                  "pager"),
                 ("missing key", {"notify": {"channels": "xxtui"}}, None, "api_key")]
        for label, config, keys, needle in cases:
            with self.subTest(label):
                with self.assertRaises(hpcrun.ConfigError) as caught:
                    hpcrun.resolve_channels(self.load(config, keys))
                self.assertIn(needle, str(caught.exception))

    def test_default_channel_is_xxtui_with_a_key_and_console_without(self):
        self.assertEqual([c[0] for c in hpcrun.resolve_channels(self.load({}))], ["console"])
        with_key = self.load({}, env={"XXTUI_KEY": KEY})
        self.assertEqual([c[0] for c in hpcrun.resolve_channels(with_key)], ["xxtui"])

    def test_keys_file_readable_by_others_gives_a_warning(self):
        for mode, warned in ((0o644, True), (0o640, True), (0o600, False)):
            with self.subTest(oct(mode)):
                loaded = self.load({}, {"xxtui": {"api_key": KEY}}, keys_mode=mode)
                found = [w for w in loaded.warnings if "api_keys.ini" in w]
                self.assertEqual(bool(found), warned, loaded.warnings)

    def test_config_search_order(self):
        home = os.path.join(self.dir, "home")
        app = os.path.join(self.dir, "app")
        beside = self.write("app/config.ini", "")
        self.assertEqual(hpcrun.find_config_path(None, {"HOME": home}, app), beside)
        in_home = self.write("home/.config/hpcrun/config.ini", "")
        self.assertEqual(hpcrun.find_config_path(None, {"HOME": home}, app), in_home)
        env = {"HOME": home, "HPCRUN_CONFIG": "/env.ini"}
        self.assertEqual(hpcrun.find_config_path(None, env, app), "/env.ini")
        self.assertEqual(hpcrun.find_config_path("/flag.ini", env, app), "/flag.ini")
        os.remove(beside)
        os.remove(in_home)
        self.assertIsNone(hpcrun.find_config_path(None, {"HOME": home}, app))


class WrapHelpersTest(TempDirTestCase):

    def test_child_env_sets_pythonunbuffered_unless_set_and_exports_run_id_and_log(self):
        cases = [({}, "1"), ({"PYTHONUNBUFFERED": "0"}, "0"), ({"PYTHONUNBUFFERED": "x"}, "x")]
        for env, expected in cases:
            with self.subTest(env=env):
                child = hpcrun.child_env(env, "run-1", "/d/logs/train_x.log")
                self.assertEqual(child["PYTHONUNBUFFERED"], expected)
                self.assertEqual(child["HPCRUN_RUN_ID"], "run-1")
                self.assertEqual(child["HPCRUN_LOG_FILE"], "/d/logs/train_x.log")
                self.assertNotIn("HPCRUN_RUN_ID", env)

    def test_child_argv_runs_a_command_string_with_bash_and_a_program_unchanged(self):
        argv = hpcrun.child_argv("source env.sh && python train.py", [])
        self.assertEqual(os.path.basename(argv[0]), "bash")
        self.assertEqual(argv[1:], ["-c", "source env.sh && python train.py"])
        program = ["python", "train.py", "--name", "a b", "$HOME"]
        self.assertEqual(hpcrun.child_argv(None, program), program)

    def test_open_new_log_never_reuses_an_existing_name(self):
        now = time.time()
        stem = time.strftime("train_%Y%m%d_%H%M%S", time.localtime(now))
        existing = self.write("logs/%s.log" % stem, b"old")
        paths = []
        for _ in range(3):
            fd, path = hpcrun.open_new_log(os.path.join(self.dir, "logs"), now, None)
            os.close(fd)
            paths.append(path)
        self.assertEqual(len(set(paths + [existing])), 4, paths)
        for path in paths:
            self.assertRegex(os.path.basename(path), support.LOG_NAME_RE)
        with open(existing, "rb") as handle:
            self.assertEqual(handle.read(), b"old")

    def test_classify_ending(self):
        cases = [
            ("success", (0, None), ("success", 0, None)),
            ("failure", (3, None), ("failed", 3, None)),
            ("killed", (-signal.SIGKILL, None), ("killed", 137, "SIGKILL")),
            ("segfault", (-signal.SIGSEGV, None), ("killed", 139, "SIGSEGV")),
            ("wrapper told to stop", (-signal.SIGTERM, signal.SIGTERM),
             ("terminated", 143, "SIGTERM")),
        ]
        for label, (returncode, wrapper_signal), expected in cases:
            with self.subTest(label):
                status, code, name, _ = hpcrun.classify_ending(
                    returncode, wrapper_signal and int(wrapper_signal), time.time(), None,
                    None, None)
                self.assertEqual((status, code, name), expected)


class RegistryTest(TempDirTestCase):

    def setUp(self):
        TempDirTestCase.setUp(self)
        self.env = {"HPCRUN_HOME": self.dir}
        self.work = os.path.join(self.dir, "work")
        hpcrun.register_work_dir(self.work, 1000.0, env=self.env)
        ((_, registered, self.entry),) = hpcrun.registered_work_dirs(self.env)
        self.assertEqual(registered, 1000.0)

    def registry(self):
        return sorted(os.listdir(os.path.dirname(self.entry)))

    def test_an_entry_is_forgotten_only_if_no_wrap_registered_its_dir_again_since_it_was_read(self):
        hpcrun.register_work_dir(self.work, 2000.0, env=self.env)  # a wrap, after the read
        self.assertFalse(hpcrun.forget_work_dir(self.entry, 1000.0))
        self.assertEqual(hpcrun.registered_work_dirs(self.env), [(self.work, 2000.0, self.entry)])
        self.assertTrue(hpcrun.forget_work_dir(self.entry, 2000.0))
        self.assertEqual(self.registry(), [])
        self.assertFalse(hpcrun.forget_work_dir(self.entry, 2000.0))  # another monitor was first

    def test_an_entry_without_a_usable_time_reads_as_registered_at_0_and_can_be_forgotten(self):
        for label, registered in (("missing", None), ("text", "yesterday"), ("true", True)):
            with self.subTest(label):
                entry = {"work_dir": self.work}
                if registered is not None:
                    entry["registered"] = registered
                hpcrun.write_json_atomic(self.entry, entry)
                self.assertEqual(hpcrun.registered_work_dirs(self.env), [(self.work, 0.0, self.entry)])
                self.assertTrue(hpcrun.forget_work_dir(self.entry, 0.0))
                self.assertEqual(self.registry(), [])


class LegacyRecordTest(unittest.TestCase):

    def test_legacy_records_of_both_forms_become_records(self):
        cases = [
            ("timestamp form, success", {"timestamp": "2024-01-01 12:34:56", "status": "success",
                                         "exit_code": 0, "log_file": "logs/a.log"},
             "success", 0),
            ("timestamp form, failed", {"timestamp": "2024-01-01 12:34:56", "status": "failed",
                                        "exit_code": 1, "log_file": "logs/a.log"},
             "failed", 1),
            ("return_code form", {"return_code": 2, "start_time": "2024-01-01 12:00:00",
                                  "end_time": "2024-01-01 12:34:56", "elapsed_seconds": 2096.5,
                                  "command": "python train.py", "log_file": "logs/a.log"},
             "failed", 2),
            ("as train_wrapper.py wrote it", {"status": "completed", "return_code": 0,
                                              "start_time": "2024-01-01 12:00:00",
                                              "end_time": "2024-01-01 12:34:56",
                                              "elapsed_seconds": 2096.5, "command": "x",
                                              "log_file": "/abs/logs/a.log",
                                              "timestamp": 1704112496.25},
             "success", 0),
        ]
        for label, data, status, exit_code in cases:
            with self.subTest(label):
                record = hpcrun.legacy_to_record(data, "/work", "legacy-1")
                self.assertEqual(record["status"], status)
                self.assertEqual(record["exit_code"], exit_code)
                self.assertEqual(record["log_file"], data["log_file"])


class SmallParsersTest(unittest.TestCase):

    def test_env_key_names_the_environment_variable_of_a_setting(self):
        cases = [(("xxtui", "api_key"), "HPCRUN_XXTUI_API_KEY"),
                 (("monitor", "retry_base"), "HPCRUN_MONITOR_RETRY_BASE"),
                 (("notify", "language"), "HPCRUN_NOTIFY_LANGUAGE")]
        for (section, key), expected in cases:
            with self.subTest(expected):
                self.assertEqual(hpcrun.env_key(section, key), expected)

    def test_parse_list_splits_a_comma_list(self):
        cases = [("xxtui, console", ["xxtui", "console"]), ("", []), (None, []),
                 (" xxtui ,, ", ["xxtui"])]
        for text, expected in cases:
            with self.subTest(text=text):
                self.assertEqual(hpcrun.parse_list(text), expected)


class MainTest(TempDirTestCase):

    def call_main(self, argv):
        """hpcrun.main(argv) in this process, sealed as the tests run hpcrun: (code, out, err)."""
        home = os.path.join(self.dir, "home")
        result = support.run_in_process(argv, support.sealed_env(
            os.environ, home, os.path.join(home, ".hpcrun-state")))
        return result.returncode, result.out, result.err

    def test_main_version_returns_0_and_prints_the_version(self):
        code, out, _ = self.call_main(["--version"])
        self.assertEqual(code, 0)
        self.assertRegex(out.strip(), r"^hpcrun %s \(sha256 [0-9a-f]{12}\)$"
                         % re.escape(hpcrun.__version__))

    def test_main_notify_test_pushes_through_the_configured_channel(self):
        with FakeXxtui(KEY) as server:
            config = self.write("config.ini", render_ini({
                "notify": {"channels": "xxtui"},
                "xxtui": {"url": server.url, "api_key": KEY}}))
            code, out, err = self.call_main(["notify", "--test", "--config", config])
        self.assertEqual(code, 0, out + err)
        self.assertEqual(out.splitlines(), ["xxtui: ok"])
        self.assertEqual(server.errors, [])
        self.assertEqual(len(server.requests), 1)

    def test_main_monitor_config_error_returns_2(self):
        config = self.write("config.ini", render_ini({"monitor": {"interval": "abc"}}))
        code, out, err = self.call_main(["monitor", "--once", "--work-dir", self.dir,
                                         "--config", config])
        self.assertEqual(code, 2, out + err)
        self.assertTrue(err.startswith("hpcrun: error: "), err)

    def test_main_usage_errors_exit_2(self):
        for argv in (["wrap", "--work-dir", self.dir], [], ["notify"]):
            with self.subTest(argv=argv):
                code, _, _ = self.call_main(argv)
                self.assertEqual(code, 2)


if __name__ == "__main__":
    unittest.main()
