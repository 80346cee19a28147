"""No run ends unreported, in process (issue 3): records planted as a wrap or another monitor
would leave them, delivered by `monitor --once` through hpcrun.main([...]); bad input; runs
whose heartbeat stops, watched by an hpcrun.Monitor whose clocks the test moves instead of
letting seconds pass.

The same helpers as test_reliability.py, which keeps what needs real processes: signals,
wraps killed, monitors racing, killed or restarted."""

import json
import os
import re
import time
import unittest

from support import (KEY, ISO_LINE_RE, FakeXxtui, InProcess, Reply, TickingMonitor, pass_time,
                     read_records, record_names, report_kind, wait_for)
from test_reliability import ReliabilityTestCase

LAYER = "fast"


class LostRunTest(InProcess, ReliabilityTestCase):
    """Runs whose heartbeat stops, watched by a long-running monitor in this process: each
    tick lets its poll interval pass on the monitor's clocks, then it polls (converted from
    test_reliability.py, where a monitor process waited on real seconds)."""

    def setUp(self):
        ReliabilityTestCase.setUp(self)
        self.install_fake_slurm()
        self.ticking = None

    def monitor(self, *work_dirs, **options):
        """The long-running monitor, polling every 0.25 s of its clocks, its first poll done."""
        self.ticking = TickingMonitor(work_dirs or (self.sb.work,), options.pop("env", None) or self.env,
                                      cwd=self.sb.root, interval=float(options.pop("interval", "0.25")))
        self.ticking.watch(self.server).start()
        return self.ticking

    def wait_for_report(self, name, kind, count=1, timeout=15, server=None):
        """Tick until the report is there (timeout: seconds on the monitor's clocks); return
        when, on its clock, it arrived."""
        server = server or self.server
        reached = self.ticking.until(lambda: len([k for k in self.reports_of(name, server) if k == kind])
                                     >= count, timeout)
        self.assertTrue(reached, "no %s report about %s within %ss\n%s\n%s"
                        % (kind, name, timeout, server.describe(), self.ticking.log))
        times = [t for t, body in zip(self.ticking.arrivals(server), server.bodies)
                 if report_kind(body["title"]) == kind and name in body["title"]]
        return times[count - 1]

    def ping(self, work, label):
        """A finished run planted and ticked for: the monitor has polled at least once more."""
        name = "ping-" + label
        self.plant_done(work, name)
        self.assertTrue(self.ticking.until(lambda: name in read_records(work, "sent"), 10),
                        "the monitor did not deliver %s\n%s" % (name, self.ticking.log))

    def test_a_run_the_scheduler_still_shows_running_is_not_reported_lost(self):
        self.configure(monitor={"stale_after": "0.7"})
        job = {"scheduler": "slurm", "id": "4343", "name": "fakejob"}
        self.set_job(4343)
        self.plant_running(self.sb.work, "slow-nfs", seq=3, job=job)
        monitor = self.monitor()
        asked_twice = monitor.until(lambda: len(self.job_queries(4343)) >= 2, 10)
        self.assertTrue(asked_twice, "the scheduler was not asked (again): %r" % self.calls())
        self.assertEqual(self.reports_of("slow-nfs"), [], self.server.describe())
        # the job ends without a record: now it is lost
        self.set_job(4343, state="CANCELLED", exit_code="0:15")
        self.wait_for_report("slow-nfs", "lost")
        self.ping(self.sb.work, "1")
        self.assertEqual(self.reports_of("slow-nfs"), ["lost"], self.server.describe())
        self.assertIn("CANCELLED", self.bodies_of("slow-nfs", "lost")[0]["content"])
        self.assertNoTraceback(monitor.result())

    def test_a_heartbeat_back_after_a_lost_report_gives_one_recovered_and_no_second_lost(self):
        self.configure(monitor={"stale_after": "0.7"})
        work = self.sb.work
        self.plant_running(work, "flaky", seq=5)
        monitor = self.monitor()
        self.wait_for_report("flaky", "lost")
        self.plant_running(work, "flaky", seq=6)            # the heartbeat comes back
        self.wait_for_report("flaky", "recovered")
        self.plant_running(work, "flaky", seq=7)
        # a run planted now goes stale when flaky goes stale again, in the same poll
        self.plant_running(work, "sentinel", seq=1)
        self.wait_for_report("sentinel", "lost")
        self.ping(work, "1")
        self.assertEqual(self.reports_of("flaky"), ["lost", "recovered"], self.server.describe())
        self.assertNoTraceback(monitor.result())
        self.assertServerClean()


class DeliveryTest(InProcess, ReliabilityTestCase):
    """Failing services and claims left by other monitors: every report goes out once."""

    def test_a_claim_of_a_monitor_on_another_host_is_taken_over_only_after_claim_timeout(self):
        record = self.completion_record(self.sb.work, "elsewhere")
        path = self.plant(self.sb.work, "claimed", "elsewhere", record)
        os.rename(path, path + ".login9.invalid.4242")
        result = self.once()
        self.assertExit(result, 0)
        self.assertRequestCount(0, context=result)
        self.configure(monitor={"claim_timeout": "0.2"})
        pass_time(0.3)
        result = self.once()
        self.assertExit(result, 0)
        self.assertEqual(self.reports_of("elsewhere"), ["success"], self.server.describe())
        self.assertEqual(list(read_records(self.sb.work, "sent")), ["elsewhere"])

    def test_a_service_failing_three_times_gets_the_report_on_the_fourth_try_and_only_once(self):
        self.plant_done(self.sb.work, "persistent")
        self.server.queue(*[Reply.json({"code": 500, "msg": "upstream down"}, 500)
                            for _ in range(3)])
        exits = [self.once().returncode for _ in range(5)]
        self.assertEqual(exits, [1, 1, 1, 0, 0], self.context())
        self.assertRequestCount(4)
        self.assertEqual(self.reports_of("persistent"), ["success"] * 4)
        self.assertEqual(list(read_records(self.sb.work, "sent")), ["persistent"])
        self.assertServerClean()

    def test_with_two_channels_only_the_failing_one_is_retried_until_it_accepts(self):
        second = FakeXxtui("second-" + KEY).start()
        self.addCleanup(second.stop)
        self.secrets.append(second.key)
        self.configure(notify={"channels": "xxtui, xxtui:second"},
                       **{"xxtui:second": {"url": second.url, "timeout": "5"}})
        self.sb.write_keys({"xxtui": {"api_key": KEY}, "xxtui:second": {"api_key": second.key}})
        self.plant_done(self.sb.work, "two-ways")
        second.queue(Reply.json({"code": 500, "msg": "down"}, 500),
                     Reply.json({"code": 500, "msg": "still down"}, 500))

        first = self.once()
        self.assertExit(first, 1)
        self.assertEqual(len(self.server.requests), 1, self.server.describe())
        self.assertEqual(len(second.requests), 1, second.describe())
        self.assertEqual(list(read_records(self.sb.work, "done")), ["two-ways"], first.describe())
        self.assertExit(self.once(), 1)
        delivered = self.once()
        self.assertExit(delivered, 0)
        again = self.once()
        self.assertExit(again, 0)

        self.assertEqual(len(self.server.requests), 1, self.server.describe())
        self.assertEqual(len(second.requests), 3, second.describe())
        self.assertServerClean()
        self.assertServerClean(second)
        self.assertEqual(list(read_records(self.sb.work, "sent")), ["two-ways"])
        self.assertEqual(read_records(self.sb.work, "done"), {})
        self.assertSecretsKept()

    def test_retry_after_of_a_429_is_honoured_across_monitor_restarts(self):
        self.plant_done(self.sb.work, "throttled")
        self.server.queue(Reply.with_headers(
            Reply.json({"code": 429, "msg": "too many requests"}, 429), Retry_After="1"))
        self.assertExit(self.once(), 1)
        # every --once is a new monitor: the delay lives on disk. A --once that starts just
        # before the delay ends may deliver (a slow start-up); when it did is checked below.
        while time.monotonic() < self.server.request_times[0] + 0.7 and len(self.server.requests) == 1:
            result = self.once()
            if len(self.server.requests) == 1:
                self.assertExit(result, 1)
        self.assertTrue(wait_for(lambda: len(self.server.requests) == 2 or self.once().returncode == 0,
                                 timeout=10, interval=0.1))
        self.assertRequestCount(2)
        waited = self.server.request_times[1] - self.server.request_times[0]
        self.assertGreaterEqual(waited, 1.0 - 0.05, "retried %.2fs after a Retry-After: 1"
                                % waited)
        self.assertEqual(list(read_records(self.sb.work, "sent")), ["throttled"])


class BadInputTest(InProcess, ReliabilityTestCase):
    """Each bad input: one clear line, the right exit status, no lost report, the rest served."""

    def test_unreadable_records_each_give_one_error_line_and_a_report_and_the_others_go_out(self):
        work = self.sb.work
        good = self.completion_record(work, "good-run")
        bad = {
            "bad-truncated": json.dumps(good).encode()[:40],
            "bad-empty": b"",
            "bad-not-json": b"\x00\xffthis is not JSON\n",
            "bad-array": b"[1, 2, 3]\n",
            "bad-types": json.dumps(dict(good, run_id="bad-types", exit_code="zero")).encode(),
            "bad-status": json.dumps(dict(good, run_id="bad-status", status="exploded")).encode(),
        }
        for run_id, data in bad.items():
            self.plant(work, "done", run_id, data)
        self.plant(work, "done", "good-run", good)
        result = self.once()
        self.assertExit(result, 0)
        self.assertNoTraceback(result)
        self.assertServerClean()
        self.assertEqual(self.reports_of("good-run"), ["success"], self.server.describe())
        for run_id in sorted(bad):
            with self.subTest(run_id):
                line = self.assertOneLogLine(result, run_id, r"\berror\b")
                self.assertRegex(line, ISO_LINE_RE)
                self.assertEqual(len(self.bodies_of(run_id)), 1, self.server.describe())
        self.assertNotIn("lost", [report_kind(b["title"]) for b in self.server.bodies])
        self.assertEqual(record_names(work, "done"), [])
        self.assertEqual(record_names(work, "claimed"), [])
        again = self.once()
        self.assertExit(again, 0)
        self.assertRequestCount(len(bad) + 1, context=again)

    def test_a_record_is_delivered_when_the_work_dir_holds_nothing_but_done(self):
        # e.g. written by another hpcrun version, or claimed/ deleted with sent/
        directory = os.path.join(self.sb.work, ".hpcrun", "done")
        os.makedirs(directory)
        with open(os.path.join(directory, "only-done.json"), "w") as out:
            json.dump(self.completion_record(self.sb.work, "only-done"), out)
        result = self.once()
        self.assertNoTraceback(result)
        self.assertEqual(self.reports_of("only-done"), ["success"],
                         "record in done/ left unreported" + result.describe())
        self.assertExit(result, 0)

    def test_a_record_of_a_newer_schema_is_reported_with_a_note(self):
        self.plant_done(self.sb.work, "from-the-future", schema=99,
                        future_field={"anything": [1, 2]})
        result = self.once()
        self.assertExit(result, 0)
        self.assertNoTraceback(result)
        self.assertEqual(self.reports_of("from-the-future"), ["success"], self.server.describe())
        self.assertRegex(self.server.bodies[0]["content"], r"(?i)schema\D*99")
        self.assertEqual(list(read_records(self.sb.work, "sent")), ["from-the-future"])

    def test_records_planted_as_symlinks_are_not_followed(self):
        self.configure(monitor={"stale_after": "0.5"})
        work = self.sb.work
        outside = self.sb.make_dir("outside")
        target = self.sb.write_file(os.path.join(outside, "record.json"), json.dumps(
            self.completion_record(outside, "secret-target")), secret=False)
        running_target = self.sb.write_file(os.path.join(outside, "running.json"), json.dumps({
            "run_id": "decoy", "name": "decoy", "seq": 1, "log_size": 0,
            "heartbeat_interval": 1.0}), secret=False)
        self.plant_done(work, "good-run")
        os.symlink(target, os.path.join(work, ".hpcrun", "done", "planted-link.json"))
        os.makedirs(os.path.join(work, ".hpcrun", "running"), exist_ok=True)
        os.symlink(running_target, os.path.join(work, ".hpcrun", "running", "decoy.json"))

        result = self.once()
        self.assertExit(result, 0)
        self.assertNoTraceback(result)
        self.assertEqual(self.reports_of("good-run"), ["success"], self.server.describe())
        self.assertOneLogLine(result, "planted-link", r"(?i)symbolic link|symlink")
        for body in self.server.bodies:
            self.assertNotIn("secret-target", body["title"] + body["content"])
        self.assertTrue(os.path.exists(target), "the symlink's target was moved or removed")
        pass_time(0.7)                        # the linked heartbeat would be stale by now
        again = self.once()
        self.assertExit(again, 0)
        self.assertEqual(self.reports_of("decoy"), [], self.server.describe())

    def test_records_with_a_missing_empty_binary_or_2gb_log_are_reported_at_once(self):
        work = self.sb.work
        logs = self.sb.make_dir("work", "logs")
        open(os.path.join(logs, "empty.log"), "wb").close()
        with open(os.path.join(logs, "binary.log"), "wb") as out:
            out.write(bytes(range(256)) * 64 + b"\xff\xfe\x00\n")
        huge = os.path.join(logs, "huge.log")
        with open(huge, "wb") as out:
            out.truncate(2 * 1024 ** 3)
            out.seek(0, os.SEEK_END)
            out.write(b"\nepoch 99 final line of a huge log\n")
        size = os.path.getsize(huge)
        for name in ("missing", "empty", "binary", "huge"):
            self.plant_done(work, "log-" + name, log_file="logs/%s.log" % name)
        started = time.monotonic()
        result = self.once()
        elapsed = time.monotonic() - started
        self.assertExit(result, 0)
        self.assertNoTraceback(result)
        self.assertServerClean()
        self.assertLess(elapsed, 10, "the 2 GB log was read whole?")
        contents = {}
        for name in ("missing", "empty", "binary", "huge"):
            bodies = self.bodies_of("log-" + name)
            self.assertEqual(len(bodies), 1, self.server.describe())
            contents[name] = bodies[0]["content"]
        self.assertRegex(contents["missing"], r"(?i)no log.*(no such file|missing)")
        self.assertRegex(contents["empty"], r"(?i)no log.*empty|empty")
        self.assertIn("epoch 99 final line of a huge log", contents["huge"])
        # a binary tail is shown, but not as raw control bytes (NUL, BEL, ...) in a push
        self.assertIn("log-binary", self.bodies_of("log-binary")[0]["title"])
        controls = sorted(set(re.findall(r"[\x00-\x08\x0b-\x1f\x7f]", contents["binary"])))
        self.assertEqual(controls, [], "control characters pushed: %r" % controls)
        self.assertEqual(os.path.getsize(huge), size)
        self.assertEqual(len(read_records(work, "sent")), 4)

    def test_bad_answers_of_the_push_service_keep_the_record_while_the_other_runs_go_out(self):
        # retry_max = 0: even an answer that is not worth retrying soon is retried next poll
        self.configure(xxtui={"timeout": "1"}, monitor={"retry_max": "0"})
        page = "<html><body><h1>502 Bad Gateway</h1><p>nginx</p></body></html>"
        cases = [("non-JSON answer", Reply.raw(200, "OK, pushed!"), r"(?i)json"),
                 ("HTML error page", Reply.raw(502, page, "text/html"), r"\b502\b"),
                 ("redirect", Reply.redirect(301, "http://127.0.0.1:9/elsewhere"), r"\b301\b"),
                 ("connection closed", Reply.drop(), r"(?i)closed|disconnect|reset"),
                 ("no answer in time", Reply.hang(5), r"(?i)time|no answer")]
        work_dirs = []
        for index, (label, reply, needle) in enumerate(cases):
            work = self.sb.make_dir("work-%d" % index)
            self.plant_done(work, "a-victim-%d" % index)
            self.plant_done(work, "b-bystander-%d" % index)
            self.server.queue(reply, Reply.ok())
            work_dirs.append(work)
        result = self.once(*work_dirs)
        self.assertExit(result, 1)
        self.assertNoTraceback(result)
        for index, (label, reply, needle) in enumerate(cases):
            with self.subTest(label):
                work = work_dirs[index]
                line = self.assertOneLogLine(result, "a-victim-%d" % index, r"(?i)fail")
                self.assertRegex(line, needle)
                self.assertRegex(line, ISO_LINE_RE)
                # a channel that timed out is not tried again in that pass (issue 11): the
                # bystander behind it waits for the next pass instead of for another timeout
                waits = ["b-bystander-%d" % index] if label == "no answer in time" else []
                self.assertEqual(list(read_records(work, "done")), ["a-victim-%d" % index] + waits)
                self.assertEqual(list(read_records(work, "sent")), [] if waits else ["b-bystander-%d" % index])
        again = self.once(*work_dirs)
        self.assertExit(again, 0)
        for index in range(len(cases)):
            self.assertEqual(len(self.bodies_of("a-victim-%d" % index)), 2)
            self.assertEqual(len(self.bodies_of("b-bystander-%d" % index)), 1)
        self.assertNotIn("lost", [report_kind(b["title"]) for b in self.server.bodies])
        self.assertSecretsKept()


if __name__ == "__main__":
    unittest.main()
