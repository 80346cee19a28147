"""Help that needs no README, the config command, and status at a glance (issue 17): every
option explains itself, each command's misuse prints that command's usage, `config` says where
each setting came from, and status is an aligned table in the configured language."""

import json
import os
import re
import unittest

from support import KEY, HpcrunTestCase, render_ini

import hpcrun

LAYER = "process"

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def subcommands(parser):
    """{name: subparser} of the top-level parser."""
    return dict(parser.subcommands)


class HelpTest(HpcrunTestCase):

    def test_every_option_of_every_command_has_a_help_line(self):
        parser = hpcrun.build_parser()
        for name, sub in sorted(subcommands(parser).items()):
            for action in sub._actions:
                if action.option_strings and action.help != "==SUPPRESS==":
                    with self.subTest(command=name, option=action.option_strings[-1]):
                        self.assertTrue(action.help and len(action.help) > 10, action.help)
        self.assertEqual(sorted(subcommands(parser)), ["config", "monitor", "notify", "run", "selftest",
                                                       "status", "wrap"])

    def test_the_helps_stand_alone(self):
        top = self.hpcrun("--help")
        self.assertExit(top, 0)
        for needle in ("hpcrun.sh", "selftest", "config"):
            self.assertIn(needle, top.out)
        wrap = self.hpcrun("wrap", "--help")
        self.assertExit(wrap, 0)
        # --config spells out the search order; the help ends with the batch line and the exit codes
        flat = " ".join(wrap.out.split())
        self.assertIn("$HPCRUN_CONFIG, else ~/.config/hpcrun/config.ini, else config.ini next to hpcrun.py", flat)
        self.assertIn('exec python3 hpcrun.py wrap --work-dir "$PWD"', wrap.out)
        self.assertRegex(wrap.out.strip().splitlines()[-1], r"error \(the training is not started\)\.$")
        self.assertIn("128+N", flat)

    def test_wrap_without_a_command_prints_the_usage_of_wrap(self):
        result = self.hpcrun("wrap", "--work-dir", self.sb.work)
        self.assertExit(result, 2)
        self.assertTrue(result.err.startswith("usage: hpcrun wrap "), result.describe())
        self.assertIn("hpcrun wrap: error: give the training either as --command", result.err)
        self.assertEqual(os.listdir(self.sb.work), [], "nothing ran")

    def test_notify_alone_says_what_it_can_do(self):
        result = self.hpcrun("notify")
        self.assertExit(result, 2)
        self.assertTrue(result.err.startswith("usage: hpcrun notify "), result.describe())
        self.assertIn("--test sends a test message through every channel", result.err)

    def test_hpcrun_sh_without_arguments_prints_its_usage_and_exits_2(self):
        import subprocess
        done = subprocess.run(["bash", os.path.join(REPO, "hpcrun.sh")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=self.env, universal_newlines=True, timeout=30)
        self.assertEqual(done.returncode, 2)
        self.assertIn("Usage: ./hpcrun.sh <command>", done.stderr)
        helped = subprocess.run(["bash", os.path.join(REPO, "hpcrun.sh"), "help"], stdout=subprocess.PIPE,
                                env=self.env, universal_newlines=True, timeout=30)
        self.assertEqual((helped.returncode, helped.stdout), (0, done.stderr))


class ConfigCommandTest(HpcrunTestCase):

    def test_every_value_says_where_it_came_from_and_secrets_stay_masked(self):
        config = self.sb.write_config(render_ini({
            "notify": {"channels": "xxtui", "language": "en"}, "monitor": {"stall_after": "900"},
            "xxtui": {"url": "http://127.0.0.1:9/xxtui"}}))
        self.sb.write_keys({"xxtui": {"api_key": KEY}})
        self.secrets.append(KEY)
        self.env["HPCRUN_MONITOR_INTERVAL"] = "120"
        result = self.hpcrun("config")
        self.assertExit(result, 0)
        lines = result.out.splitlines()

        def line_of(section, key):
            inside = lines[lines.index("[%s]" % section) + 1:]
            return [line for line in inside if line.startswith(key + " = ")][0]
        self.assertIn("# config file: %s" % config, lines)
        self.assertRegex(line_of("monitor", "stall_after"), r"^stall_after = 900 +# config '%s'$" % re.escape(config))
        self.assertRegex(line_of("monitor", "interval"), r"^interval = 120 +# environment HPCRUN_MONITOR_INTERVAL$")
        self.assertRegex(line_of("monitor", "retry_max"), r"^retry_max = 3600 +# default$")
        self.assertRegex(line_of("xxtui", "api_key"), r"^api_key = \*\*\* \(set, %d characters\) +# keys file '" % len(KEY))
        self.assertNotIn(KEY, result.out)
        as_json = json.loads(self.hpcrun("config", "--json").out)
        self.assertEqual(as_json["monitor"]["stall_after"], {"value": "900", "origin": "config '%s'" % config})
        self.assertEqual(self.hpcrun("selftest", "--show-config").out, result.out)
        self.assertSecretsKept()

    def test_a_broken_config_is_the_answer(self):
        self.sb.write_config("[monitor]\nstall_after = soon\n")
        result = self.hpcrun("config")
        self.assertExit(result, 2)
        self.assertOneErrorLine(result, "[monitor] stall_after: 'soon' is not a number")


class StatusTableTest(HpcrunTestCase):

    def runs(self, language="zh"):
        self.sb.write_config(render_ini({"notify": {"language": language}}))
        for name, command in (("first-ok", "echo all done"), ("second-oom", "echo 'CUDA out of memory'; exit 1")):
            self.assertExit(self.wrap(command, extra=["--name", name]), 0 if name == "first-ok" else 1)

    def table(self, *args, **env):
        result = self.hpcrun("status", "--work-dir", self.sb.work, *args, env=dict(self.env, **env))
        self.assertExit(result, 0)
        return result.out.splitlines()

    def test_an_aligned_table_in_the_configured_language_newest_first(self):
        self.runs("zh")
        lines = self.table(COLUMNS="200")
        self.assertEqual(lines[0].split(), ["名称", "状态", "时长", "进度", "原因", "/", "最后一行", "预计完成"])
        self.assertEqual([line.split()[0] for line in lines[1:]], ["second-oom", "first-ok"])
        self.assertIn("已结束，待推送 · 失败", lines[1])
        self.assertIn("exit 1 · CUDA out of memory", lines[1])
        # aligned: every column starts where its header does (two-column CJK counted)
        start = hpcrun.text_width(lines[0][:lines[0].index("时长")])
        for line in lines[1:]:
            self.assertRegex(line[self.column(line, start):], r"^\d+s ")
        english = self.table(COLUMNS="200", HPCRUN_NOTIFY_LANGUAGE="en")
        self.assertEqual(english[0].split()[:4], ["NAME", "STATE", "TIME", "PROGRESS"])
        self.assertIn("ended, to report · failed", english[1])

    @staticmethod
    def column(line, width):
        """The index in line at which `width` terminal columns have passed."""
        passed = 0
        for index, char in enumerate(line):
            if passed >= width:
                return index
            passed += hpcrun.text_width(char)
        return len(line)

    def test_it_fits_the_terminal_width(self):
        self.runs("en")
        for width in (60, 80):
            with self.subTest(width=width):
                lines = self.table(COLUMNS=str(width))
                self.assertTrue(all(hpcrun.text_width(line) <= width for line in lines), lines)
                self.assertTrue(any(line.endswith("…") for line in lines[1:]) or width >= 80, lines)

    def test_all_adds_the_reported_runs(self):
        self.runs("en")
        self.sb.write_config(render_ini({"notify": {"language": "en", "channels": "console"}}))
        self.assertExit(self.hpcrun("monitor", "--once", "--work-dir", self.sb.work), 0)
        self.assertEqual(self.table()[1:], [])
        self.assertEqual(self.hpcrun("status", "--work-dir", self.sb.work).out.strip(), "no runs")
        archived = self.table("--all")
        self.assertEqual([line.split()[0] for line in archived[1:]], ["second-oom", "first-ok"])
        self.assertIn("reported · success", archived[2])


if __name__ == "__main__":
    unittest.main()
