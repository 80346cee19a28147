"""The documentation against the code: the READMEs and docs/ in both languages, their links,
the flags and commands they name, the configuration keys and the template fields.

Nothing here runs hpcrun: it reads the Markdown files and asks hpcrun's own tables
(build_parser, DEFAULTS, CHANNELS, TEMPLATE_FIELDS, EVENTS, STATUSES)."""

LAYER = "fast"

import argparse
import configparser
import os
import re
import shlex
import unicodedata
import unittest

import support
from support import REPO

hpcrun = support.load_hpcrun()

README_LIMIT = 15 * 1024
OPENING_COMMANDS = ("make demo", "make test")
CHINESE_SUFFIX = ".zh-CN.md"
EMPTY_DEFAULTS = ("*(empty)*", "*（空）*")

# Named in the docs before hpcrun.py has them (issue 17, being implemented in parallel). Each
# is accepted only while build_parser() lacks it: once it lands, it is checked like any other
# flag, so this list tightens the test by itself and may then be emptied.
PENDING_COMMANDS = {"config"}
PENDING_FLAGS = {
    ("status", "--tasks"),          # every task of a job array on its own line
    ("selftest", "--show-config"),  # the settings in force, as `config` prints them
    ("config", "--config"),         # every command takes --config
    ("config", "--json"),           # the same as JSON
}

# Flags of other programs the docs show (the scheduler's, the demo training's, the test
# runner's); never hpcrun's. A flag hpcrun has is always checked against its parser instead.
FOREIGN_FLAGS = {
    "--job-name": "sbatch", "--time": "sbatch", "--output": "sbatch", "--signal": "sbatch",
    "--array": "sbatch", "--wrap": "sbatch", "--pty": "srun",
    "--epochs": "train.py (examples)", "--fail": "examples/train_demo.py",
    "--fail-at": "examples/train_demo.py", "--layer": "tests/run.py", "--query-gpu": "nvidia-smi",
}

FLAG_RE = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:-[a-z0-9]+)*")
HEADING_RE = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
FENCE_RE = re.compile(r"^\s*(```|~~~)")
LINK_RE = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN_RE = re.compile(r"(`+)(.+?)\1")
COMMAND_USE_RE = re.compile(r"hpcrun\.py\s+(--?[a-z][\w-]*|[a-z][\w-]*)(?![\w.])(.*)")


# --- reading the pages ---

def read(path):
    with open(os.path.join(REPO, path), encoding="utf-8") as stream:
        return stream.read()


def doc_pages():
    """Every Markdown page of the documentation, relative to the repository."""
    pages = ["README.md", "README.zh-CN.md", os.path.join("examples", "README.md")]
    docs = os.path.join(REPO, "docs")
    pages += sorted(os.path.join("docs", name) for name in os.listdir(docs) if name.endswith(".md"))
    return pages


def twins():
    """(English page, Chinese page) for the READMEs and every page under docs/."""
    pairs = [("README.md", "README.zh-CN.md")]
    for page in doc_pages():
        if page.startswith("docs") and not page.endswith(CHINESE_SUFFIX):
            pairs.append((page, page[:-len(".md")] + CHINESE_SUFFIX))
    return pairs


def split_fences(text):
    """(prose lines, code lines) of a page: what is inside ``` fences is code."""
    prose, code, fenced = [], [], False
    for line in text.splitlines():
        if FENCE_RE.match(line):
            fenced = not fenced
            continue
        (code if fenced else prose).append(line)
    return prose, code


def headings(text):
    """[(level, text)] of the page's headings, outside code blocks."""
    found = []
    for line in split_fences(text)[0]:
        match = HEADING_RE.match(line)
        if match:
            found.append((len(match.group(1)), match.group(2)))
    return found


def github_anchor(heading):
    """The anchor GitHub gives a heading: lower case, links reduced to their text, every
    character but letters, digits, marks, `_`, `-` and spaces dropped (CJK stays, full-width
    punctuation goes), spaces made hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    kept = "".join(char for char in text
                   if char in " -_" or unicodedata.category(char)[0] in "LNM")
    return kept.replace(" ", "-")


def anchors(text):
    """Every anchor of a page, numbered as GitHub numbers repeated headings (-1, -2, ...)."""
    seen, found = {}, set()
    for _, heading in headings(text):
        anchor = github_anchor(heading)
        if anchor in seen:
            seen[anchor] += 1
            anchor = "%s-%d" % (anchor, seen[anchor])
        else:
            seen[anchor] = 0
        found.add(anchor)
    return found


def links(text):
    """Every link target in the prose of a page (not in code blocks or code spans)."""
    targets = []
    for line in split_fences(text)[0]:
        targets.extend(LINK_RE.findall(CODE_SPAN_RE.sub("", line)))
    return targets


def flags_named(text):
    return set(FLAG_RE.findall(text))


def code_snippets(text):
    """The code of a page: each line of its code blocks and each code span of its prose."""
    prose, code = split_fences(text)
    spans = [match.group(2) for line in prose for match in CODE_SPAN_RE.finditer(line)]
    return code + spans


def command_uses(text):
    """[(command, [flags])] of every `hpcrun.py COMMAND ...` the page writes in code: the flags
    up to the end of the command line (`--`, a pipe, a redirection, a comment, a quote closing
    an outer command)."""
    uses = []
    for snippet in code_snippets(text):
        for match in COMMAND_USE_RE.finditer(snippet):
            command, rest = match.group(1), match.group(2)
            if command.startswith("-"):
                uses.append((None, [command]))
                continue
            try:
                words = shlex.split(rest, comments=True)
            except ValueError:           # a quote opened before hpcrun.py closes in rest
                words = rest.split("'")[0].split('"')[0].split()
            flags = []
            for word in words:
                word = word.strip("[]()")
                if word in ("--", "|", "||", "&&", ";") or word.startswith((">", "2>", "#")):
                    break
                if FLAG_RE.match(word):
                    flags.append(word.split("=")[0])
            uses.append((command, flags))
    return uses


def commands_named(text):
    """The hpcrun commands a page names: after `hpcrun.py` or `hpcrun.sh`, or first in a code
    span (`status --json`)."""
    known = set(name for name in parser_flags() if name) | PENDING_COMMANDS
    named = set("hpcrun.py " + word for word in re.findall(r"hpcrun\.py\s+([a-z][\w-]*)", text)
                if word in known)
    named |= set("hpcrun.sh " + word for word in re.findall(r"hpcrun\.sh\s+([a-z][\w-]*)(?![\w:])", text))
    for snippet in code_snippets(text):
        first = snippet.split()[:1]
        if first and first[0] in known:
            named.add(first[0])
    return named


# --- asking the parser ---

def parser_flags():
    """{command: {long option}} of build_parser(), None for the top level."""
    parser = hpcrun.build_parser()
    flags = {None: long_options(parser)}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                flags[name] = long_options(sub)
    return flags


def long_options(parser):
    return set(option for action in parser._actions for option in action.option_strings
               if option.startswith("--"))


def allowed(command, flag, flags):
    """Whether the docs may name flag for command (None: for some command or other program)."""
    if command is None:
        if any(flag in options for options in flags.values()) or flag in FOREIGN_FLAGS:
            return True
        return any(flag == pending and pending not in flags.get(name, ())
                   for name, pending in PENDING_FLAGS)
    if flag in flags.get(command, ()):
        return True
    return (command, flag) in PENDING_FLAGS and (command in flags or command in PENDING_COMMANDS)


def render_default(value):
    """A default as config.ini.example and the configuration page write it."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "%g" % value
    return str(value)


def configuration_tables(text):
    """{section: {key: default as written}} from the tables under the `[section]` headings."""
    tables, section = {}, None
    for line in split_fences(text)[0]:
        heading = HEADING_RE.match(line)
        if heading:
            match = re.match(r"^`\[([\w:]+)\]`$", heading.group(2))
            section = match.group(1) if match else None
            if section:
                tables[section] = {}
            continue
        row = re.match(r"^\| `(\w+)` \| (.*?) \|", line)
        if section and row:
            cell = row.group(2).strip()
            tables[section][row.group(1)] = "" if cell in EMPTY_DEFAULTS else re.sub(
                r"^`(.*)`$", r"\1", cell)
    return tables


def section_text(text, anchor):
    """The prose under the heading with this anchor, up to the next heading of its level or
    higher."""
    lines, inside, level = [], False, 0
    for line in text.splitlines():
        match = HEADING_RE.match(line)
        if match and inside and len(match.group(1)) <= level:
            break
        if match and github_anchor(match.group(2)) == anchor:
            inside, level = True, len(match.group(1))
            continue
        if inside:
            lines.append(line)
    return "\n".join(lines)


class DocsTestCase(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.pages = dict((page, read(page)) for page in doc_pages())
        cls.flags = parser_flags()


class ReadmeTest(DocsTestCase):

    def test_english_readme_is_under_15_kb(self):
        size = len(self.pages["README.md"].encode("utf-8"))
        self.assertLess(size, README_LIMIT, "README.md is %d bytes" % size)

    def test_both_readmes_open_with_the_demo_and_the_test_command(self):
        for readme in ("README.md", "README.zh-CN.md"):
            with self.subTest(readme=readme):
                text = self.pages[readme]
                first_block = re.search(r"```\w*\n(.*?)```", text, re.S)
                self.assertIsNotNone(first_block, "no code block")
                before = text[:first_block.start()]
                self.assertNotIn("\n## ", before, "a section comes before the two commands")
                commands = [line.split("#")[0].strip() for line in first_block.group(1).splitlines()]
                self.assertEqual(tuple(commands), OPENING_COMMANDS)


class TwinTest(DocsTestCase):

    def test_every_page_under_docs_has_its_chinese_twin(self):
        names = [page for page in self.pages if page.startswith("docs")]
        english = [page for page in names if not page.endswith(CHINESE_SUFFIX)]
        chinese = [page for page in names if page.endswith(CHINESE_SUFFIX)]
        self.assertTrue(english, "no page under docs/")
        self.assertEqual(sorted(page[:-len(".md")] + CHINESE_SUFFIX for page in english), sorted(chinese))

    def test_each_page_and_its_twin_have_the_same_headings_level_by_level(self):
        for english, chinese in twins():
            with self.subTest(page=english):
                levels = [level for level, _ in headings(self.pages[english])]
                self.assertEqual(levels, [level for level, _ in headings(self.pages[chinese])],
                                 "%s: %s\n%s: %s" % (english, headings(self.pages[english]),
                                                     chinese, headings(self.pages[chinese])))

    def test_each_page_and_its_twin_name_the_same_flags(self):
        for english, chinese in twins():
            with self.subTest(page=english):
                self.assertEqual(flags_named(self.pages[english]), flags_named(self.pages[chinese]))

    def test_each_page_and_its_twin_name_the_same_commands(self):
        for english, chinese in twins():
            with self.subTest(page=english):
                self.assertEqual(commands_named(self.pages[english]), commands_named(self.pages[chinese]))


class FlagTest(DocsTestCase):

    def test_every_flag_the_docs_name_is_a_flag_of_hpcrun_or_a_known_foreign_one(self):
        for page, text in sorted(self.pages.items()):
            for flag in sorted(flags_named(text)):
                with self.subTest(page=page, flag=flag):
                    self.assertTrue(allowed(None, flag, self.flags),
                                    "%s names %s, which no hpcrun command has" % (page, flag))

    def test_every_hpcrun_command_the_docs_write_exists_and_takes_the_flags_given(self):
        for page, text in sorted(self.pages.items()):
            for command, flags in command_uses(text):
                with self.subTest(page=page, command=command):
                    self.assertTrue(command is None or command in self.flags
                                    or command in PENDING_COMMANDS, "no command %s" % command)
                    for flag in flags:
                        self.assertTrue(allowed(command, flag, self.flags),
                                        "%s: hpcrun.py %s has no %s" % (page, command, flag))

    def test_every_command_and_flag_of_the_parser_is_named_in_the_docs(self):
        text = "\n".join(self.pages.values())
        named = flags_named(text)
        for command, options in sorted(self.flags.items(), key=lambda item: str(item[0])):
            with self.subTest(command=command):
                if command:
                    self.assertRegex(text, r"hpcrun\.py\s+%s\b" % re.escape(command))
                self.assertEqual(sorted(options - named), [], "not in the docs")

    def test_pending_flags_name_only_commands_the_docs_describe(self):
        for command, flag in PENDING_FLAGS:
            with self.subTest(command=command, flag=flag):
                self.assertTrue(command in self.flags or command in PENDING_COMMANDS)
                self.assertRegex("\n".join(self.pages.values()), r"hpcrun\.py\s+%s\b" % command)


class LinkTest(DocsTestCase):

    def test_every_relative_link_and_anchor_resolves(self):
        for page, text in sorted(self.pages.items()):
            for target in links(text):
                if re.match(r"^[a-z][a-z0-9+.-]*:", target):
                    continue                      # https:, mailto: ...: not checked here
                with self.subTest(page=page, target=target):
                    path, _, anchor = target.partition("#")
                    linked = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
                    self.assertTrue(os.path.exists(os.path.join(REPO, linked)), "no file %s" % linked)
                    if anchor:
                        self.assertTrue(linked.endswith(".md"), "an anchor into %s" % linked)
                        self.assertIn(anchor, anchors(read(linked)), "no heading #%s in %s" % (anchor, linked))

    def test_anchors_follow_githubs_rules(self):
        cases = [("Job arrays: one push per array", "job-arrays-one-push-per-array"),
                 ("Release reminders and `--then`", "release-reminders-and---then"),
                 ("Will it finish in time?", "will-it-finish-in-time"),
                 ("`[notify]`", "notify"),
                 ("GPU 与费用", "gpu-与费用"),
                 ("作业数组：每个数组一条推送", "作业数组每个数组一条推送"),
                 ("能在时间上限前跑完吗？", "能在时间上限前跑完吗"),
                 ("在作业脚本里：`exec`", "在作业脚本里exec")]
        for heading, anchor in cases:
            with self.subTest(heading=heading):
                self.assertEqual(github_anchor(heading), anchor)


class ConfigurationTest(DocsTestCase):

    def expected_sections(self):
        sections = dict((name, defaults) for name, defaults in hpcrun.DEFAULTS.items())
        sections.update((kind, channel.defaults()) for kind, channel in hpcrun.CHANNELS.items()
                        if channel.defaults())
        return sections

    def test_configuration_pages_list_every_key_with_its_default(self):
        expected = dict((section, dict((key, render_default(value)) for key, value in defaults.items()))
                        for section, defaults in self.expected_sections().items())
        for page in ("docs/configuration.md", "docs/configuration" + CHINESE_SUFFIX):
            with self.subTest(page=page):
                self.assertEqual(configuration_tables(self.pages[page]), expected)

    def test_config_example_has_every_key_of_every_section(self):
        parser = configparser.ConfigParser(interpolation=None)
        parser.read_string(read("config.ini.example"))
        expected = self.expected_sections()
        self.assertEqual(sorted(parser.sections()), sorted(expected))
        for section, defaults in expected.items():
            with self.subTest(section=section):
                self.assertEqual(dict(parser[section]),
                                 dict((key, render_default(value)) for key, value in defaults.items()))

    def test_template_field_list_is_templates_fields_of_the_code(self):
        for page in ("docs/configuration.md", "docs/configuration" + CHINESE_SUFFIX):
            with self.subTest(page=page):
                anchor = "report-templates" if page.endswith("configuration.md") else "报告模板"
                table = [line for line in section_text(self.pages[page], anchor).splitlines()
                         if line.startswith("| `{")]
                fields = tuple(re.match(r"^\| `\{(\w+)\}`", line).group(1) for line in table)
                self.assertEqual(fields, hpcrun.TEMPLATE_FIELDS)


class ReferenceTest(DocsTestCase):

    def test_channel_pages_have_a_section_per_channel(self):
        for page in ("docs/channels.md", "docs/channels" + CHINESE_SUFFIX):
            sections = [text for level, text in headings(self.pages[page]) if level == 2]
            for kind in hpcrun.CHANNELS:
                with self.subTest(page=page, kind=kind):
                    self.assertIn(kind, sections)

    def test_report_pages_list_every_event_and_ending_pages_every_status(self):
        for page in ("docs/reports.md", "docs/reports" + CHINESE_SUFFIX):
            rows = " ".join(re.findall(r"(?m)^\| (`\w+`(?:[,、] ?`\w+`)*) \|", self.pages[page]))
            for event in hpcrun.EVENTS:
                with self.subTest(page=page, event=event):
                    self.assertIn("`%s`" % event, rows)
        for page in ("docs/endings.md", "docs/endings" + CHINESE_SUFFIX):
            rows = re.findall(r"(?m)^\| `(\w+)` \|", self.pages[page])
            for status in hpcrun.STATUSES:
                with self.subTest(page=page, status=status):
                    self.assertIn(status, rows)


if __name__ == "__main__":
    unittest.main()
