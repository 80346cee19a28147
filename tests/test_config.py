"""Configuration in process: where it is found, what overrides what, and what a mistake looks
like, through hpcrun.main([...]) (notify --test, monitor --once).

What needs a wrapped run or a monitor that keeps running is in test_config_e2e.py."""

import os
import re
import shutil
import unittest

from support import HPCRUN, KEY, HpcrunTestCase, InProcess, render_ini

LAYER = "fast"

CJK = re.compile("[\u4e00-\u9fff]")


def xxtui_config(server, key=KEY, **xxtui):
    """Config sections that push to server with the key inside the config itself."""
    values = {"url": server.url, "timeout": "5"}
    if key is not None:
        values["api_key"] = key
    values.update(xxtui)
    return {"notify": {"channels": "xxtui", "language": "en"}, "xxtui": values}


class SearchOrderTest(InProcess, HpcrunTestCase):

    def test_config_flag_beats_hpcrun_config_which_beats_the_home_config(self):
        server = self.start_server()
        self.secrets.append(KEY)
        flag = self.sb.write_config(xxtui_config(server, **{"from": "from-flag"}),
                                    self.sb.path("flag", "flag.ini"))
        env_config = self.sb.write_config(xxtui_config(server, **{"from": "from-env"}),
                                          self.sb.path("env", "env.ini"))
        self.sb.write_config(xxtui_config(server, **{"from": "from-home"}))
        self.env["HPCRUN_CONFIG"] = env_config
        cases = [("--config", ["--config", flag], "from-flag"),
                 ("$HPCRUN_CONFIG", [], "from-env")]
        for label, args, expected in cases:
            with self.subTest(label):
                result = self.hpcrun("notify", "--test", *args)
                self.assertExit(result, 0)
                self.assertEqual(server.requests[-1].json["from"], expected, server.describe())
        del self.env["HPCRUN_CONFIG"]
        with self.subTest("~/.config/hpcrun/config.ini"):
            result = self.hpcrun("notify", "--test")
            self.assertExit(result, 0)
            self.assertEqual(server.requests[-1].json["from"], "from-home", server.describe())
        self.assertRequestCount(3)
        self.assertServerClean()
        self.assertSecretsKept()

    def test_config_beside_hpcrun_py_is_used_when_there_is_no_other(self):
        server = self.start_server()
        self.secrets.append(KEY)
        script = self.sb.path("app", "hpcrun.py")
        os.makedirs(os.path.dirname(script))
        shutil.copy(HPCRUN, script)
        self.sb.write_config(xxtui_config(server, **{"from": "from-beside"}),
                             self.sb.path("app", "config.ini"))
        result = self.hpcrun("notify", "--test", script=script)
        self.assertExit(result, 0)
        self.assertEqual(server.requests[-1].json["from"], "from-beside", server.describe())

        self.sb.write_config(xxtui_config(server, **{"from": "from-home"}))
        result = self.hpcrun("notify", "--test", script=script)
        self.assertExit(result, 0)
        self.assertEqual(server.requests[-1].json["from"], "from-home", server.describe())
        self.assertServerClean()

    def test_config_given_with_the_flag_must_exist(self):
        missing = self.sb.path("nowhere.ini")
        result = self.hpcrun("monitor", "--once", "--work-dir", self.sb.work, "--config", missing)
        self.assertExit(result, 2)
        self.assertOneErrorLine(result, "nowhere.ini")


class PrecedenceTest(InProcess, HpcrunTestCase):

    def test_api_key_comes_from_env_then_keys_file_then_config_file(self):
        server = self.start_server()
        cases = [
            # label, key in config, key in keys file, env, expected key
            ("config file only", "key-from-config-1", None, {}, "key-from-config-1"),
            ("keys file beats config file", "key-from-config-2", "key-from-keys-2", {},
             "key-from-keys-2"),
            ("HPCRUN_XXTUI_API_KEY beats keys file", "key-from-config-3", "key-from-keys-3",
             {"HPCRUN_XXTUI_API_KEY": "key-from-env-3"}, "key-from-env-3"),
            ("XXTUI_KEY is read", None, None, {"XXTUI_KEY": "key-from-xxtui-env-4"},
             "key-from-xxtui-env-4"),
        ]
        for label, in_config, in_keys, env, expected in cases:
            with self.subTest(label):
                server.key = expected
                config = self.sb.write_config(xxtui_config(server, key=in_config),
                                              self.sb.path(label, "config.ini"))
                if in_keys:
                    self.sb.write_keys({"xxtui": {"api_key": in_keys}},
                                       self.sb.path(label, "api_keys.ini"))
                count = len(server.requests)
                result = self.hpcrun("notify", "--test", "--config", config,
                                     env=dict(self.env, **env))
                self.assertExit(result, 0)
                self.assertRequestCount(count + 1, context=result)
                self.assertEqual(server.requests[-1].problems, [], server.describe())
                secrets = [k for k in (in_config, in_keys, expected) if k]
                self.assertSecretsKept(secrets)

    def test_xxtui_key_in_the_environment_alone_selects_the_xxtui_channel(self):
        server = self.start_server()
        self.sb.write_config({"xxtui": {"url": server.url}})
        self.env["XXTUI_KEY"] = KEY
        self.secrets.append(KEY)
        result = self.hpcrun("notify", "--test")
        self.assertExit(result, 0)
        self.assertRegex(result.out, r"(?m)^xxtui: ok$")
        self.assertRequestCount(1, context=result)
        self.assertServerClean()
        self.assertSecretsKept()

    def test_environment_beats_config_file_for_from(self):
        server = self.start_server()
        self.secrets.append(KEY)
        self.sb.write_config(xxtui_config(server, **{"from": "from-config"}))
        self.env["HPCRUN_XXTUI_FROM"] = "from-env"
        result = self.hpcrun("notify", "--test")
        self.assertExit(result, 0)
        self.assertEqual(server.bodies[-1]["from"], "from-env", server.describe())


class ConfigErrorTest(InProcess, HpcrunTestCase):
    """Each mistake: monitor exits 2 with one `hpcrun: error:` line naming file and key."""

    def check_error(self, label, sections, needles, keys=True, env=None, raw_config=None,
                    keys_as_dir=False, raw_keys=None):
        directory = self.sb.make_dir("case-" + re.sub(r"\W+", "-", label))
        config = os.path.join(directory, "config.ini")
        self.sb.write_config(raw_config if raw_config is not None else render_ini(sections),
                             config)
        keys_path = os.path.join(directory, "api_keys.ini")
        if keys_as_dir:
            os.makedirs(keys_path)
        elif raw_keys is not None:
            self.sb.write_keys(raw_keys, keys_path)
        elif keys:
            self.sb.write_keys({"xxtui": {"api_key": KEY}}, keys_path)
        result = self.hpcrun("monitor", "--once", "--work-dir", self.sb.work, "--config", config,
                             env=dict(self.env, **(env or {})))
        self.assertExit(result, 2)
        line = self.assertOneErrorLine(result, *needles)
        self.assertSecretsKept([KEY])
        return line

    def base(self, **changes):
        sections = {"notify": {"channels": "xxtui"},
                    "xxtui": {"url": "http://127.0.0.1:9/xxtui/{key}"}}
        for section, values in changes.items():
            sections.setdefault(section, {}).update(values)
        return sections

    def test_an_unknown_channel_is_a_config_error_naming_file_and_channel(self):
        self.check_error("unknown channel", self.base(notify={"channels": "xxtui, pager"}),
                         ["config.ini", "pager"])

    def test_a_missing_api_key_is_a_config_error_naming_the_key(self):
        line = self.check_error("missing key", self.base(), ["api_key"], keys=False)
        self.assertTrue("config.ini" in line or "api_keys.ini" in line, line)

    def test_a_number_that_is_not_a_number_is_a_config_error_naming_file_and_key(self):
        cases = [("monitor", "interval", "abc"), ("xxtui", "timeout", "soon"),
                 ("report", "include_last_n_lines", "many"), ("report", "max_chars", "4k"),
                 ("monitor", "retry_base", "x")]
        for section, key, value in cases:
            with self.subTest(key):
                self.check_error(key, self.base(**{section: {key: value}}), ["config.ini", key])

    def test_a_number_that_is_not_a_number_in_the_environment_names_the_variable(self):
        self.check_error("env interval", self.base(), ["HPCRUN_MONITOR_INTERVAL"],
                         env={"HPCRUN_MONITOR_INTERVAL": "abc"})

    def test_a_keys_file_that_cannot_be_read_is_a_config_error_naming_it(self):
        with self.subTest("a directory"):
            self.check_error("keys dir", self.base(), ["api_keys.ini"], keys_as_dir=True)
        with self.subTest("not INI"):
            self.check_error("keys garbage", self.base(), ["api_keys.ini"],
                             raw_keys="api_key with no section\n")
        with self.subTest("the key without its [xxtui] section"):
            self.check_error("keys no section", self.base(), ["api_keys.ini"],
                             raw_keys="api_key = %s\n" % KEY)
        with self.subTest("an explicit keys_file that does not exist"):
            self.check_error("keys missing", self.base(notify={"keys_file": "missing.ini"}),
                             ["missing.ini"], keys=False)
        with self.subTest("a line without '='"):
            self.check_error("keys bad line", self.base(), ["api_keys.ini"],
                             raw_keys="[xxtui]\n%s\n" % KEY)

    def test_a_config_file_that_is_not_ini_is_a_config_error_naming_it(self):
        self.check_error("garbage", None, ["config.ini"], raw_config="just some words\n")


class KeysFilePermissionTest(InProcess, HpcrunTestCase):

    def test_a_keys_file_readable_by_group_or_others_gets_a_warning(self):
        server = self.start_server()
        self.secrets.append(KEY)
        self.sb.write_config(xxtui_config(server, key=None))
        for mode, warned in ((0o644, True), (0o640, True), (0o604, True),
                             (0o600, False), (0o400, False)):
            with self.subTest(oct(mode)):
                self.sb.write_keys({"xxtui": {"api_key": KEY}}, mode=mode)
                result = self.hpcrun("notify", "--test")
                self.assertExit(result, 0)
                warnings = [line for line in result.err.splitlines()
                            if "api_keys.ini" in line and re.search(r"(?i)warn", line)]
                self.assertEqual(len(warnings), 1 if warned else 0, result.describe())
                os.chmod(self.sb.keys_path, 0o600)
        self.assertServerClean()
        self.assertSecretsKept()

    def test_keys_file_is_found_relative_to_the_config_file(self):
        server = self.start_server()
        self.secrets.append(KEY)
        config = self.sb.write_config(
            dict(xxtui_config(server, key=None),
                 notify={"channels": "xxtui", "language": "en", "keys_file": "secret/k.ini"}),
            self.sb.path("conf", "main.ini"))
        self.sb.write_keys({"xxtui": {"api_key": KEY}}, self.sb.path("conf", "secret", "k.ini"))
        result = self.hpcrun("notify", "--test", "--config", config, cwd=self.sb.work)
        self.assertExit(result, 0)
        self.assertRequestCount(1, context=result)
        self.assertServerClean()


if __name__ == "__main__":
    unittest.main()
