"""A hostile group member (issue: shared project dirs): records, names and files planted under
WORK and WORK/.hpcrun/ by another user, and push services that misbehave on purpose.

The threat model: a project dir may be group-writable, so another member of the group can
create, replace and symlink any file under WORK and WORK/.hpcrun/. The monitor runs as the
victim. No record content may make the monitor write outside WORK/.hpcrun/, read a file the
record's author could not, or stop serving the other runs. Bad input gets one error line,
never a traceback. The tests run as root and chown files to other uids (1234, and 65534 for
nobody) to play the other users; inotify (IN_ACCESS) tells whether a file was read at all.

Here the monitor runs in process (hpcrun.main([...])); what needs a real process (a hang to be
killed, a signal, real wraps for the fuzz) is in test_hostile_e2e.py.
"""

import ctypes
import json
import os
import random
import re
import stat
import struct
import time
import unittest

from support import InProcess, Reply, names_in, pass_time, read_records, record_names
from fakes import Services, start_service
from test_reliability import ReliabilityTestCase

LAYER = "fast"

OTHER_UID = 1234             # another member of the project's group
NOBODY_UID = 65534           # what NFSv4 shows for a uid it cannot map
UNREADABLE_TITLE = "\u2753 Unreadable run record"
DEAD_PID = 99999999          # above any pid_max: never a live process
TRACEBACK = "Traceback (most recent call last)"


# --- helpers: a fake private key, a file-tree snapshot, a read detector ---

def fake_private_key(seed):
    """The lines of an OpenSSH private key that looks real (BEGIN, base64 body, END)."""
    rng = random.Random(seed)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    body = ["b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW"]
    body += ["".join(rng.choice(alphabet) for _ in range(70)) for _ in range(5)]
    body.append("".join(rng.choice(alphabet) for _ in range(34)) + "==")
    return (["-----BEGIN OPENSSH PRIVATE KEY-----"] + body +
            ["-----END OPENSSH PRIVATE KEY-----"])


def snapshot(root, skip=()):
    """{path: (mode, size, mtime_ns, inode)} of root and everything under it, symlinks not
    followed, leaving out the subtrees in skip (whose own entries are left out too)."""
    skip = set(os.path.normpath(path) for path in skip)
    found = {}

    def note(path):
        info = os.lstat(path)
        found[path] = (stat.S_IFMT(info.st_mode), info.st_size, info.st_mtime_ns, info.st_ino)

    note(root)
    for directory, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if os.path.normpath(os.path.join(directory, d)) not in skip]
        for name in dirs + files:
            path = os.path.join(directory, name)
            if os.path.normpath(path) not in skip:
                note(path)
    return found


def tree_changes(before, after):
    """What changed between two snapshots, one line each."""
    changes = []
    for path in sorted(set(before) | set(after)):
        if path not in before:
            changes.append("created %s" % path)
        elif path not in after:
            changes.append("removed %s" % path)
        elif before[path] != after[path]:
            changes.append("changed %s" % path)
    return changes


class ReadWatch(object):
    """Which of some files any process read data from since the watch began (inotify
    IN_ACCESS). Opening a file and fstat() on it, without reading, is not a read."""

    IN_ACCESS = 0x00000001

    def __init__(self):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        self.paths = {}

    def add(self, path):
        wd = self.libc.inotify_add_watch(self.fd, os.fsencode(path), self.IN_ACCESS)
        if wd < 0:
            raise OSError(ctypes.get_errno(), "inotify_add_watch failed", path)
        self.paths[wd] = path

    def read_paths(self):
        found = set()
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return found
            offset = 0
            while offset + 16 <= len(data):
                wd, mask, _, length = struct.unpack_from("iIII", data, offset)
                offset += 16 + length
                if mask & self.IN_ACCESS and wd in self.paths:
                    found.add(self.paths[wd])

    def close(self):
        os.close(self.fd)


class HostileTestCase(ReliabilityTestCase):
    """The reliability helpers, plus records planted by others and checks on what leaked."""

    def plant_file(self, work, sub, filename, data):
        """A record file of any name (str or bytes, not ending in .json by itself)."""
        for state in ("running", "done", "claimed", "delivery", "sent", sub):
            os.makedirs(os.path.join(work, ".hpcrun", state), exist_ok=True)
        directory = os.fsencode(os.path.join(work, ".hpcrun", sub))
        path = os.path.join(directory, os.fsencode(filename) + b".json")
        with open(path, "wb") as out:
            out.write(data if isinstance(data, bytes) else json.dumps(data).encode("utf-8"))
        return path

    def write_key(self, path, uid=0, seed=1):
        """A fake private key file of uid (mode 600); returns its lines."""
        lines = fake_private_key(seed)
        self.sb.write_file(path, "\n".join(lines) + "\n", mode=0o600, secret=False)
        os.chown(path, uid, uid)
        return lines

    def watch_reads(self, *paths):
        try:
            watch = ReadWatch()
        except (OSError, AttributeError) as error:
            self.skipTest("inotify is needed to tell whether a file was read: %s" % error)
        self.addCleanup(watch.close)
        for path in paths:
            watch.add(path)
        return watch

    def assertNotRead(self, watch, context=None):
        read = sorted(watch.read_paths())
        if read:
            self.fail("the monitor read %s, named by a record it must not trust"
                      % ", ".join(read) + (context.describe() if context else ""))

    def pushed_text(self, server=None):
        server = server or self.server
        return "\n".join("%s\n%s" % (body.get("title"), body.get("content"))
                         for body in server.bodies)

    def assertNoKeyLinePushed(self, lines, server=None):
        text = self.pushed_text(server)
        leaked = [line for line in lines if line in text]
        if leaked:
            self.fail("%d of the %d lines of a private key were pushed, e.g. %r\n%s"
                      % (len(leaked), len(lines), leaked[0], (server or self.server).describe()))

    def once_within(self, seconds, *work_dirs):
        """monitor --once that must end within seconds (a hang is a failure, not an error)."""
        try:
            return self.once(*work_dirs, timeout=seconds)
        except AssertionError as error:
            if isinstance(error, self.failureException):
                raise
            self.fail(str(error))

    def assertUnchanged(self, before, after, what, result):
        changes = tree_changes(before, after)
        if changes:
            self.fail("%s:\n  %s%s" % (what, "\n  ".join(changes), result.describe()))

    def assertNoTracebackIn(self, *results):
        for result in results:
            self.assertNoTraceback(result)

    def lines_of(self, *results):
        return [line for result in results for line in (result.out + result.err).splitlines()]



# --- 1. run ids that climb out of the state dir ---

class PathEscapeTest(InProcess, HostileTestCase):
    """A run id from a record's content never becomes part of a path outside WORK/.hpcrun/."""

    def unchanged_outside_state_dir(self):
        """A snapshot of the sandbox without WORK/.hpcrun, the fake Slurm's call log and
        ~/.hpcrun (the monitor's own state)."""
        os.makedirs(self.sb.hpcrun_home, exist_ok=True)    # its creation would change home/
        skip = [os.path.join(self.sb.work, ".hpcrun"), self.sb.hpcrun_home]
        if getattr(self, "bin", None):
            skip.append(self.bin)
        return snapshot(self.sb.root, skip)

    def test_a_planted_run_id_with_dotdot_writes_nothing_outside_the_state_dir(self):
        self.install_fake_slurm()
        for job_id in (1, 2, 3):
            self.set_job(job_id)                       # every job still RUNNING: release reminders
        work = self.sb.work
        outside = self.sb.make_dir("outside")
        self.sb.make_dir("work", "outside")
        self.sb.write_file(os.path.join(outside, "keep.txt"), "the victim's own file\n",
                           secret=False)

        def job(number):
            return {"scheduler": "slurm", "id": str(number), "release": "scancel %d" % number}

        # done/evil-rel.json: reminders/<run_id>.json is sandbox/outside/x.json
        self.plant(work, "done", "evil-rel", dict(self.completion_record(work, "evil-rel"),
                                                  run_id="../../../outside/x", job=job(1)))
        # an absolute run id: os.path.join drops everything before it
        self.plant(work, "done", "evil-abs", dict(self.completion_record(work, "evil-abs"),
                                                  run_id=os.path.join(outside, "abs"), job=job(2)))
        # no job: nothing is written by this run id today, nor may it be tomorrow
        self.plant(work, "done", "evil-plain", dict(self.completion_record(work, "evil-plain"),
                                                    run_id="../../../outside/plain"))
        # a planted release reminder: its event record goes to done/<run_id>~release_reminder-1
        os.makedirs(os.path.join(work, ".hpcrun", "reminders"), exist_ok=True)
        self.plant(work, "reminders", "evil-reminder", {
            "run_id": "../../outside/z", "name": "evil-reminder", "job": job(3),
            "work_dir": work, "host": "node07", "start_time": time.time() - 100,
            "ended": time.time() - 90, "sent": 0, "next_check": 0})
        before = self.unchanged_outside_state_dir()

        result = self.once()
        self.assertUnchanged(before, self.unchanged_outside_state_dir(), "the monitor wrote "
                             "outside WORK/.hpcrun/ where a record's run_id pointed", result)
        self.assertIn(result.returncode, (0, 1), result.describe())
        self.assertNoTraceback(result)
        self.assertServerClean()
        for name in ("evil-rel", "evil-abs", "evil-plain"):
            self.assertEqual(len(self.bodies_of(name)), 1, "report of %s\n%s"
                             % (name, self.server.describe()))

    def test_a_running_record_with_a_dotdot_run_id_is_reported_lost_without_writing_outside(self):
        self.configure(monitor={"stale_after": "0.5"})
        work = self.sb.work
        self.sb.make_dir("work", "outside")
        elsewhere = self.sb.make_dir("elsewhere")
        for filename, run_id in (("r1", "../../outside/y"), ("r2", os.path.join(elsewhere, "y"))):
            self.plant(work, "running", filename, {
                "schema": 1, "run_id": run_id, "name": filename, "command": "python train.py",
                "work_dir": work, "host": "node07", "pid": 4321, "start_time": time.time() - 60,
                "seq": 3, "written_at": time.time(), "heartbeat_interval": 1.0, "log_size": 100,
                "last_line": "epoch 3 loss 0.25", "warnings": [], "job": None})
        before = self.unchanged_outside_state_dir()

        results = [self.once()]                         # first sight of the heartbeats
        pass_time(0.7)                                  # beyond stale_after
        results.append(self.once())
        if not (self.reports_of("r1") and self.reports_of("r2")):
            results.append(self.once())
        self.assertUnchanged(before, self.unchanged_outside_state_dir(), "the monitor wrote "
                             "outside WORK/.hpcrun/ where a running record's run_id pointed",
                             results[-1])
        self.assertNoTracebackIn(*results)
        for name in ("r1", "r2"):
            self.assertEqual(self.reports_of(name), ["lost"], "lost report of %s\n%s"
                             % (name, self.server.describe()))

# --- 2. file names that are not run ids ---

class RecordNameTest(InProcess, HostileTestCase):

    def test_a_record_whose_file_name_is_not_a_run_id_is_reported_unreadable_and_others_go_out(self):
        work = self.sb.work
        bad_names = ["bad name;x", "a\nb", b"\xff\xfe", "\u00fc-umlaut"]
        for index, filename in enumerate(bad_names):
            self.plant_file(work, "done", filename,
                            self.completion_record(work, "innocent-%d" % index))
        self.plant_done(work, "good-run")

        result = self.once()
        self.assertIn(result.returncode, (0, 1), result.describe())
        self.assertNoTraceback(result)
        self.assertServerClean()
        self.assertEqual(self.reports_of("good-run"), ["success"], self.server.describe())
        titles = [body["title"] for body in self.server.bodies]
        unreadable = [title for title in titles if title.startswith(UNREADABLE_TITLE)]
        self.assertEqual(len(unreadable), len(bad_names),
                         "records named %r are not reported as unreadable: titles %r%s"
                         % (bad_names, titles, result.describe()))
        self.assertEqual(len(titles), len(bad_names) + 1, self.server.describe())
        again = self.once()
        self.assertNoTraceback(again)
        self.assertRequestCount(len(bad_names) + 1, context=again)


# --- 3, 4. files a record names, and records of other users ---

class NamedFileTest(InProcess, HostileTestCase):
    """A record only makes the monitor read files its author could read."""

    def setUp(self):
        if os.geteuid() != 0:
            self.skipTest("playing other users needs chown, as root")
        HostileTestCase.setUp(self)

    def root_key(self):
        path = self.sb.path("home", ".ssh", "id_ed25519")
        return path, self.write_key(path, uid=0, seed=1)

    def other_users_key(self):
        path = self.sb.path("other", ".ssh", "id_rsa")
        return path, self.write_key(path, uid=OTHER_UID, seed=2)

    def test_a_record_written_by_another_user_is_reported_as_theirs_and_no_file_it_names_is_read(self):
        key, lines = self.root_key()
        path = self.plant_done(self.sb.work, "theirs", status="failed", exit_code=1, log_file=key)
        os.chown(path, OTHER_UID, OTHER_UID)
        watch = self.watch_reads(key)
        result = self.once()
        self.assertIn(result.returncode, (0, 1), result.describe())
        self.assertNoTraceback(result)
        self.assertServerClean()
        self.assertRequestCount(1, context=result)
        self.assertNoKeyLinePushed(lines)
        self.assertNotRead(watch, result)
        content = self.server.bodies[0]["content"]
        self.assertRegex(content, r"(?i)written by", "the report does not say who wrote the record")
        self.assertIn(str(OTHER_UID), content)

    def test_a_legacy_record_of_another_user_names_no_file_that_is_read(self):
        # WORK/.train_complete.json (the original design's record) is in WORK itself
        key, lines = self.root_key()
        path = self.sb.write_file(os.path.join(self.sb.work, ".train_complete.json"), json.dumps(
            {"status": "failed", "exit_code": 1, "log_file": key, "command": "python train.py"}),
            secret=False)
        os.chown(path, OTHER_UID, OTHER_UID)
        watch = self.watch_reads(key)
        result = self.once()
        self.assertIn(result.returncode, (0, 1), result.describe())
        self.assertNoTraceback(result)
        self.assertServerClean()
        self.assertRequestCount(1, context=result)
        self.assertNoKeyLinePushed(lines)
        self.assertNotRead(watch, result)

    def test_a_log_file_outside_the_work_dir_owned_by_another_user_is_not_read(self):
        key, lines = self.other_users_key()
        self.plant_done(self.sb.work, "ours-outside", status="failed", exit_code=1, log_file=key)
        watch = self.watch_reads(key)
        result = self.once()
        self.assertIn(result.returncode, (0, 1), result.describe())
        self.assertNoTraceback(result)
        self.assertServerClean()
        self.assertRequestCount(1, context=result)
        self.assertNoKeyLinePushed(lines)
        self.assertNotRead(watch, result)

    def test_a_log_symlink_planted_by_another_user_is_not_followed(self):
        key, lines = self.root_key()
        logs = self.sb.make_dir("work", "logs")
        link = os.path.join(logs, "train.log")
        os.symlink(key, link)
        os.lchown(link, OTHER_UID, OTHER_UID)
        self.plant_done(self.sb.work, "ours-link", status="failed", exit_code=1,
                        log_file="logs/train.log")
        watch = self.watch_reads(key)
        result = self.once()
        self.assertIn(result.returncode, (0, 1), result.describe())
        self.assertNoTraceback(result)
        self.assertServerClean()
        self.assertRequestCount(1, context=result)
        self.assertNoKeyLinePushed(lines)
        self.assertNotRead(watch, result)

    def test_the_job_output_file_of_a_killed_or_terminated_run_is_read_only_if_the_authors(self):
        root_key, root_lines = self.root_key()
        other_key, other_lines = self.other_users_key()
        theirs, ours = self.sb.make_dir("theirs"), self.sb.make_dir("ours")
        # another user's record naming the victim's key as its job's output file
        path = self.plant_done(theirs, "theirs-killed", status="killed", exit_code=137,
                               signal="SIGKILL", cause="signal",
                               job={"scheduler": "slurm", "id": "7", "output_file": root_key})
        os.chown(path, OTHER_UID, OTHER_UID)
        # the victim's record naming a file outside WORK that another user owns
        self.plant_done(ours, "ours-terminated", status="terminated", exit_code=143,
                        signal="SIGTERM", cause="cancelled",
                        job={"scheduler": "slurm", "id": "7", "output_file": other_key})
        watch = self.watch_reads(root_key, other_key)
        result = self.once(theirs, ours)
        self.assertIn(result.returncode, (0, 1), result.describe())
        self.assertNoTraceback(result)
        self.assertServerClean()
        self.assertRequestCount(2, context=result)
        self.assertNoKeyLinePushed(root_lines + other_lines)
        self.assertNotRead(watch, result)

    def test_a_private_key_block_in_the_tail_of_a_legitimate_log_is_masked(self):
        lines = fake_private_key(3)
        self.sb.write_file(os.path.join(self.sb.work, "logs", "train.log"), "\n".join(
            ["epoch 1 loss 0.9", "dumping the environment for debugging:"] + lines +
            ["epoch 2 loss 0.5", "RuntimeError: boom"]) + "\n", secret=False)
        self.plant_done(self.sb.work, "leaky-log", status="failed", exit_code=1,
                        log_file="logs/train.log")
        result = self.once()
        self.assertExit(result, 0)
        self.assertNoTraceback(result)
        self.assertRequestCount(1, context=result)
        self.assertNoKeyLinePushed(lines[1:-1])        # the base64 body
        self.assertIn("epoch 2 loss 0.5", self.server.bodies[0]["content"],
                      "the rest of the log tail is still shown")

    def test_a_record_owned_by_nobody_warns_of_nfs_id_mapping_and_is_still_reported(self):
        path = self.plant_done(self.sb.work, "nfs-run")
        os.chown(path, NOBODY_UID, NOBODY_UID)
        result = self.once()
        self.assertIn(result.returncode, (0, 1), result.describe())
        self.assertNoTraceback(result)
        self.assertRequestCount(1, context=result)
        warnings = [line for line in self.lines_of(result)
                    if re.search(r"(?i)nobody", line) and re.search(r"(?i)id.?map", line)]
        self.assertEqual(len(warnings), 1, "expected one line naming nobody and id mapping"
                         + result.describe())


# --- 5. state dirs that are symbolic links ---

class StateDirSymlinkTest(InProcess, HostileTestCase):

    def test_a_state_dir_that_is_a_symlink_is_refused_and_its_target_left_alone(self):
        host = os.uname()[1]
        good = self.sb.make_dir("good")
        self.plant_done(good, "good-run")
        cases = {}
        for sub in ("sent", "claimed", "delivery", "done"):
            work = self.sb.make_dir("proj-%s" % sub)
            target = self.sb.make_dir("victim-%s" % sub)
            self.sb.write_file(os.path.join(target, "keep.txt"), "the victim's own file\n",
                               secret=False)
            if sub == "claimed":     # a claim a monitor on this host would take over at once
                self.sb.write_file(os.path.join(target, "victim-run.json.%s.%d" % (host, DEAD_PID)),
                                   json.dumps(self.completion_record(target, "victim-run")),
                                   secret=False)
            if sub == "done":        # the victim's record in another dir
                self.sb.write_file(os.path.join(target, "victim-run.json"),
                                   json.dumps(self.completion_record(target, "victim-run")),
                                   secret=False)
            else:
                self.plant_done(work, "run-%s" % sub)
            link = os.path.join(work, ".hpcrun", sub)
            os.makedirs(os.path.dirname(link), exist_ok=True)
            if os.path.isdir(link):
                os.rmdir(link)
            os.symlink(target, link)
            cases[sub] = (work, target, snapshot(target))

        result = self.once(*([good] + [cases[sub][0] for sub in sorted(cases)]))
        self.assertNoTraceback(result)
        self.assertEqual(self.reports_of("good-run"), ["success"], self.server.describe())
        lines = self.lines_of(result)
        for sub in sorted(cases):
            work, target, before = cases[sub]
            with self.subTest(sub):
                self.assertUnchanged(before, snapshot(target), ".hpcrun/%s is a symbolic link "
                                     "to %s, and the monitor used it" % (sub, target), result)
                refused = [line for line in lines if names_in(line, sub) and
                           re.search(r"(?i)symbolic link|symlink", line) and
                           re.search(r"\berror\b", line)]
                self.assertTrue(refused, "no error line naming .hpcrun/%s as a symbolic link"
                                % sub + result.describe())


# --- 6. a webhook URL whose path is the secret ---

class SecretPathTest(InProcess, HostileTestCase):

    TOKEN = "Xq7Vb2Lm9Pz4Rt6Wc8Yd3Kf5"

    def test_a_webhook_path_echoed_by_a_404_stays_out_of_output_status_and_files(self):
        path = "/services/T0123ABCD/B0456EFGH/" + self.TOKEN
        check, success = Services.slack(path)
        slack = start_service(self, "slack", check, success)
        slack.queue(Reply.raw(404, "no_service: there is no hook at %s\n" % path))
        self.sb.write_config({"notify": {"channels": "slack", "language": "en"},
                              "monitor": {"retry_base": "0"}, "slack": {"timeout": "5"}})
        self.sb.write_keys({"slack": {"url": slack.base + path}})
        self.plant_done(self.sb.work, "hooked")

        result = self.once()
        self.assertExit(result, 1)
        self.assertNoTraceback(result)
        self.assertEqual(len(slack.requests), 1, slack.describe())
        self.assertEqual(slack.errors, [], slack.describe())
        status = self.hpcrun("status", "--work-dir", self.sb.work)
        status_json = self.hpcrun("status", "--json", "--work-dir", self.sb.work)
        self.assertNoTracebackIn(status, status_json)
        self.assertSecretsKept([self.TOKEN, "T0123ABCD/B0456EFGH/" + self.TOKEN])


# --- 8, 9. poison records ---

def deep(levels):
    return "[" * levels + "]" * levels


class PoisonRecordTest(InProcess, HostileTestCase):

    def poison(self, stem, **fields):
        record = self.completion_record(self.sb.work, stem)
        record.update(fields)
        return json.dumps(record).encode("utf-8")

    def test_poison_records_are_each_reported_once_and_the_pass_goes_on(self):
        work = self.sb.work
        now = time.time()
        deep_field = self.poison("poison-deep-field").replace(
            b'"job": null', b'"job": ' + deep(200000).encode())
        self.assertIn(b"[[[[", deep_field)
        poisons = {
            "poison-deep-whole": b"[" * 200000,
            "poison-deep-field": deep_field,
            # a success "shorter" than min_duration: today it is archived and never sent
            "poison-duration-neg-inf": self.poison("poison-duration-neg-inf",
                                                   duration=float("-inf")),
            "poison-duration-nan": self.poison("poison-duration-nan", duration=float("nan")),
            "poison-start-inf": self.poison("poison-start-inf", start_time=float("inf")),
            "poison-job-id-list": self.poison("poison-job-id-list", job={"id": [1]}),
            "poison-job-string": self.poison("poison-job-string", job="x"),
            "poison-exit-code-string": self.poison("poison-exit-code-string", exit_code="3"),
            "poison-metric-values-string": self.poison("poison-metric-values-string",
                                                       metric={"values": "x"}),
            "poison-warnings-int": self.poison("poison-warnings-int", warnings=5),
            "poison-bad-utf8": self.poison("poison-bad-utf8", command="python train.py \u00e9")
            .replace("\u00e9".encode("utf-8"), b"\xff\xfe"),
            "poison-surrogate": self.poison("poison-surrogate", name="poison-surrogate \ud800"),
            # found while writing these: each crashes today's monitor
            "poison-metric-values-int": self.poison("poison-metric-values-int",
                                                    metric={"values": 5}),
            "poison-peak-rss-string": self.poison("poison-peak-rss-string", peak_rss="x"),
            "poison-gpus-names-int": self.poison("poison-gpus-names-int", gpus={"names": 5}),
            "poison-last-heartbeat-string": self.poison("poison-last-heartbeat-string",
                                                        last_heartbeat="x"),
            "poison-job-time-limit-string": self.poison(
                "poison-job-time-limit-string", status="failed", exit_code=1,
                job={"scheduler": "slurm", "id": "7", "time_limit": "x"}),
            "poison-silence-string": self.poison("poison-silence-string", status="lost",
                                                 silence="x"),
            "poison-grace-string": self.poison("poison-grace-string", final=False, grace="soon",
                                               end_time=now - 3600),
            "poison-pid-huge": self.poison("poison-pid-huge", final=False, host=os.uname()[1],
                                           pid=2 ** 64, end_time=now - 7200),
        }
        self.assertIn(b"\\ud800", poisons["poison-surrogate"])
        self.assertIn(b"-Infinity", poisons["poison-duration-neg-inf"])
        for run_id, data in poisons.items():
            self.plant(work, "done", run_id, data)
        self.plant_done(work, "good-run")

        result = self.once()
        self.assertIn(result.returncode, (0, 1), result.describe())
        self.assertNoTraceback(result)
        self.assertServerClean()
        self.assertEqual(self.reports_of("good-run"), ["success"], self.server.describe())
        for run_id in sorted(poisons):
            with self.subTest(run_id):
                self.assertEqual(len(self.bodies_of(run_id)), 1, self.server.describe())
        self.assertRequestCount(len(poisons) + 1, context=result)
        self.assertEqual(record_names(work, "done"), [], result.describe())
        self.assertEqual(record_names(work, "claimed"), [], result.describe())
        again = self.once()
        self.assertNoTraceback(again)
        self.assertRequestCount(len(poisons) + 1, context=again)


# --- 10, 11, 12. push services that answer slowly, too late or not before 2057 ---

class SlowServiceTest(InProcess, HostileTestCase):

    def test_a_reply_dripping_one_byte_a_second_is_cut_at_the_channel_timeout(self):
        self.configure(xxtui={"timeout": "2"})
        self.plant_done(self.sb.work, "dripped")
        self.server.queue(Reply.drip())                  # 60 bytes: a minute
        first = self.once_within(8)
        self.assertExit(first, 1)
        self.assertNoTraceback(first)
        self.assertEqual(read_records(self.sb.work, "sent"), {}, first.describe())
        second = self.once()
        self.assertExit(second, 0)
        self.assertRequestCount(2, context=second)
        self.assertEqual(list(read_records(self.sb.work, "sent")), ["dripped"])
        self.assertEqual(self.reports_of("dripped"), ["success", "success"])

    def test_after_a_push_timed_out_the_channel_is_not_tried_again_in_the_same_pass(self):
        self.configure(xxtui={"timeout": "2"})
        self.plant_done(self.sb.work, "a-first")
        self.plant_done(self.sb.work, "b-second")
        self.server.queue(Reply.hang(10))
        first = self.once(timeout=15)
        self.assertExit(first, 1)
        self.assertNoTraceback(first)
        self.assertRequestCount(1, context=first)
        second = self.once()
        self.assertExit(second, 0)
        self.assertNoTraceback(second)
        self.assertEqual(self.reports_of("a-first"), ["success", "success"], self.server.describe())
        self.assertEqual(self.reports_of("b-second"), ["success"], self.server.describe())
        self.assertEqual(sorted(read_records(self.sb.work, "sent")), ["a-first", "b-second"])

    def test_a_retry_after_of_infinity_is_capped_at_retry_max_too(self):
        self.configure(monitor={"retry_max": "1", "retry_base": "0"})
        self.plant_done(self.sb.work, "a-throttled")
        self.plant_done(self.sb.work, "b-bystander")
        self.server.queue(Reply.with_headers(Reply.json({"code": 429, "msg": "slow down"}, 429),
                                             Retry_After="1e999"))
        first = self.once()
        self.assertNoTraceback(first)
        self.assertExit(first, 1)
        pass_time(1.2)
        second = self.once()
        self.assertNoTraceback(second)
        self.assertEqual(self.reports_of("a-throttled"), ["success", "success"],
                         self.server.describe())
        self.assertEqual(self.reports_of("b-bystander"), ["success"], self.server.describe())
        self.assertExit(second, 0)
        self.assertEqual(sorted(read_records(self.sb.work, "sent")), ["a-throttled", "b-bystander"])

    def test_a_retry_after_beyond_retry_max_waits_only_retry_max(self):
        self.configure(monitor={"retry_max": "1", "retry_base": "0"})
        self.plant_done(self.sb.work, "throttled")
        self.server.queue(Reply.with_headers(Reply.json({"code": 429, "msg": "slow down"}, 429),
                                             Retry_After="1000000000"))
        first = self.once()
        self.assertExit(first, 1)
        pass_time(1.2)
        second = self.once()
        self.assertRequestCount(2, context=second)
        self.assertExit(second, 0)
        self.assertEqual(list(read_records(self.sb.work, "sent")), ["throttled"])


# --- 13. the lost marker ---

class LostDurabilityTest(InProcess, HostileTestCase):

    def test_a_lost_report_that_could_not_be_queued_is_queued_by_a_later_pass(self):
        self.configure(monitor={"stale_after": "0.5"})
        work = self.sb.work
        self.plant_running(work, "ghost", seq=3)
        os.rmdir(os.path.join(work, ".hpcrun", "done"))
        results = [self.once()]                          # first sight of the heartbeat
        pass_time(0.7)
        results += [self.once() for _ in range(3)]       # stale: lost; then one or two more
        self.assertNoTracebackIn(*results)
        self.assertEqual(self.reports_of("ghost"), ["lost"], "lost reports of ghost after the "
                         "pass that found it stale and two more\n%s\nthe pass that found it "
                         "stale:%s" % (self.server.describe(), results[1].describe()))


if __name__ == "__main__":
    unittest.main()
