"""monitor, end to end: one correct push per run a real wrap finished, records kept until
delivered, a monitor that keeps running and stops at a signal. What needs no wrap (usage
errors, legacy records) runs in process: test_monitor_in_process.py."""

import os
import re
import signal
import sys
import time
import unittest

from support import (HpcrunTestCase, ISO_LINE_RE, KEY, SUCCESS_WORDS, WAIT_FOR_GO, Reply,
                     read_records, record_names, refused_port, wait_for)

LAYER = "process"


def tail_numbers(prefix, text):
    return {int(n) for n in re.findall(re.escape(prefix) + r" (\d+)\b", text)}


class MonitorTestCase(HpcrunTestCase):

    def finished_run(self, command, name=None, work=None, expect=None):
        """Wrap command to the end; return (run_id, record) of its completion record."""
        work = work or self.sb.work
        before = set(read_records(work, "done"))
        extra = ["--name", name] if name else []
        result = self.wrap(command, work=work, extra=extra)
        if expect is not None:
            self.assertExit(result, expect)
        records = read_records(work, "done")
        new = sorted(set(records) - before)
        self.assertEqual(len(new), 1, "no new completion record" + result.describe())
        return new[0], records[new[0]]

    def monitor_once(self, *work_dirs, **options):
        args = ["monitor", "--once"]
        for work in work_dirs or (self.sb.work,):
            args += ["--work-dir", work]
        return self.hpcrun(*args, **options)

    def retry_now_env(self):
        """Retry at the next poll.

        The delay is fixed when a push fails: retry_base * 2**n, at most retry_max, and
        retry_max itself for an answer that retrying cannot fix (bad key, code not 0).
        """
        env = dict(self.env)
        env["HPCRUN_MONITOR_RETRY_BASE"] = "0"
        env["HPCRUN_MONITOR_RETRY_MAX"] = "0"
        return env


class MonitorOnceTest(MonitorTestCase):

    def test_monitor_once_pushes_one_correct_request_per_finished_run_then_nothing(self):
        server = self.start_server()
        self.configure_xxtui(server, overrides={"report": {"include_last_n_lines": "5"}})
        alpha_id, alpha_record = self.finished_run(
            'for i in $(seq 1 60); do echo "alpha tail line $i"; done', name="alpha", expect=0)
        beta_id, _ = self.finished_run(
            'for i in $(seq 1 60); do echo "beta tail line $i"; done; exit 3', name="beta",
            expect=3)

        result = self.monitor_once()
        self.assertExit(result, 0)
        self.assertServerClean()
        self.assertRequestCount(2, context=result)
        by_name = {}
        for request in server.valid_requests:
            self.assertTrue(request.headers["user-agent"].startswith("hpcrun/"),
                            request.headers)
            names = [n for n in ("alpha", "beta") if n in request.json["title"]]
            self.assertEqual(len(names), 1, request.json)
            by_name[names[0]] = request.json
        self.assertEqual(sorted(by_name), ["alpha", "beta"], server.describe())

        alpha, beta = by_name["alpha"], by_name["beta"]
        self.assertRegex(alpha["title"], SUCCESS_WORDS)
        self.assertNotRegex(alpha["title"], r"(?i)fail|kill")
        self.assertRegex(alpha["content"], r"(?i)succe")
        self.assertRegex(beta["title"], r"(?i)fail")
        self.assertRegex(beta["title"], r"\b3\b")
        self.assertRegex(beta["content"], r"(?i)fail")
        for label, body in (("alpha", alpha), ("beta", beta)):
            numbers = tail_numbers(label + " tail line", body["content"])
            self.assertTrue({56, 57, 58, 59, 60} <= numbers, body["content"])
            self.assertGreater(min(numbers), 50, body["content"])
            self.assertEqual(body["from"], "hpcrun")
            self.assertNotIn("channel", body)
        for needle in (alpha_record["command"], alpha_record["work_dir"], alpha_record["host"],
                       alpha_record["log_file"]):
            self.assertIn(needle, alpha["content"])

        self.assertEqual(read_records(self.sb.work, "done"), {})
        self.assertEqual(sorted(read_records(self.sb.work, "sent")), sorted([alpha_id, beta_id]))
        self.assertTimestampedLine(result.out, "alpha", alpha_id)
        self.assertTimestampedLine(result.out, "beta", beta_id)

        again = self.monitor_once()
        self.assertExit(again, 0)
        self.assertRequestCount(2, context=again)
        self.assertSecretsKept()

    def test_monitor_report_of_a_killed_run_names_the_signal_in_its_title(self):
        self.configure_xxtui()
        self.finished_run("echo dying; kill -KILL $$", name="victim", expect=137)
        result = self.monitor_once()
        self.assertExit(result, 0)
        self.assertRequestCount(1, context=result)
        body = self.server.bodies[0]
        self.assertIn("victim", body["title"])
        self.assertRegex(body["title"], r"SIGKILL|\bKILL\b")
        self.assertIn("SIGKILL", body["content"])
        self.assertIn("dying", body["content"])

    def test_monitor_report_fits_max_chars_cutting_the_log_tail_from_the_top(self):
        self.configure_xxtui(overrides={"report": {"max_chars": "400"}})
        run_id, record = self.finished_run(
            'for i in $(seq 1 80); do echo "long tail line $i ................................"; '
            "done", name="chatty", expect=0)
        result = self.monitor_once()
        self.assertExit(result, 0)
        self.assertRequestCount(1, context=result)
        content = self.server.bodies[0]["content"]
        self.assertLessEqual(len(content), 400, content)
        self.assertIn(record["command"], content)
        self.assertIn(record["log_file"], content)
        numbers = tail_numbers("long tail line", content)
        self.assertIn(80, numbers, content)
        self.assertNotIn(1, numbers, content)

    def test_monitor_once_does_not_report_a_run_that_is_still_running(self):
        self.configure_xxtui()
        background = self.start_wrap(sys.executable, "-c", WAIT_FOR_GO, extra=["--name", "slow"])
        self.assertTrue(wait_for(lambda: record_names(self.sb.work, "running"), timeout=10),
                        "no running record appeared")
        early = self.monitor_once()
        open(os.path.join(self.sb.work, "go"), "w").close()
        self.assertExit(self.finish(background), 0)
        self.assertExit(early, 0)
        self.assertRequestCount(0, context=early)
        late = self.monitor_once()
        self.assertExit(late, 0)
        self.assertRequestCount(1, context=late)
        self.assertIn("slow", self.server.bodies[0]["title"])

    def test_monitor_once_serves_several_work_dirs(self):
        self.configure_xxtui()
        first, second = self.sb.make_dir("first"), self.sb.make_dir("second")
        self.finished_run("echo one", name="in-first", work=first, expect=0)
        self.finished_run("echo two", name="in-second", work=second, expect=0)
        result = self.monitor_once(first, second)
        self.assertExit(result, 0)
        self.assertServerClean()
        self.assertEqual(sorted(b["title"].count("in-first") > 0 for b in self.server.bodies),
                         [False, True], self.server.describe())
        self.assertEqual(len(read_records(first, "sent")), 1)
        self.assertEqual(len(read_records(second, "sent")), 1)

    def test_monitor_passes_from_and_channel_through_as_configured(self):
        self.configure_xxtui(overrides={"xxtui": {"from": "lab-gpu-3", "channel": "WX_MP"}})
        self.finished_run("echo hi", expect=0)
        result = self.monitor_once()
        self.assertExit(result, 0)
        self.assertServerClean()
        self.assertRequestCount(1, context=result)
        self.assertEqual(self.server.bodies[0]["from"], "lab-gpu-3")
        self.assertEqual(self.server.bodies[0]["channel"], "WX_MP")

    def test_monitor_quotes_a_key_with_reserved_characters_as_one_path_segment(self):
        odd_key = "k/ey+with %20 spaces&\u00fc"
        server = self.start_server(key=odd_key)
        self.configure_xxtui(server, key=odd_key)
        self.finished_run("echo hi", expect=0)
        result = self.monitor_once()
        self.assertExit(result, 0)
        self.assertServerClean()
        self.assertRequestCount(1, context=result)
        self.assertSecretsKept()

    def test_monitor_counts_code_0_given_as_a_string_as_success(self):
        self.configure_xxtui()
        self.server.queue(Reply.json({"code": "0", "msg": "ok"}))
        run_id, _ = self.finished_run("echo hi", expect=0)
        result = self.monitor_once()
        self.assertExit(result, 0)
        self.assertRequestCount(1, context=result)
        self.assertEqual(list(read_records(self.sb.work, "sent")), [run_id])
        self.assertEqual(read_records(self.sb.work, "done"), {})


class MonitorFailureTest(MonitorTestCase):
    """A failed push keeps the record, exits 1 naming why; the next poll delivers it once."""

    def check_kept_then_delivered(self, reply=None, needles=(), timeout=None, refuse=False):
        server = self.start_server()
        overrides = {"xxtui": {"timeout": str(timeout)}} if timeout else None
        self.configure_xxtui(server, overrides=overrides)
        run_id, _ = self.finished_run("echo fragile output", name="fragile", expect=0)
        if refuse:
            self.configure_xxtui(server, overrides={"xxtui": {
                "url": "http://127.0.0.1:%d/xxtui/{key}" % refused_port()}})
        if reply is not None:
            server.queue(reply)

        started = time.monotonic()
        failed = self.monitor_once(env=self.retry_now_env())
        elapsed = time.monotonic() - started
        self.assertExit(failed, 1)
        self.assertNoTraceback(failed)
        output = failed.out + failed.err
        for needle in needles:
            self.assertRegex(output, needle, failed.describe())
        self.assertEqual(list(read_records(self.sb.work, "done")), [run_id], failed.describe())
        self.assertEqual(read_records(self.sb.work, "sent"), {})
        self.assertEqual(record_names(self.sb.work, "claimed"), [])
        requests_before = len(server.requests)
        self.assertEqual(requests_before, 0 if refuse else 1, server.describe())

        if refuse:
            self.configure_xxtui(server, overrides=overrides)
        delivered = self.monitor_once(env=self.retry_now_env())
        self.assertExit(delivered, 0)
        self.assertTrue(server.wait_for_requests(requests_before + 1, timeout=1))
        self.assertRequestCount(requests_before + 1, context=delivered)
        self.assertIn("fragile", server.requests[-1].json["title"])
        self.assertEqual(list(read_records(self.sb.work, "sent")), [run_id])
        self.assertEqual(read_records(self.sb.work, "done"), {})

        quiet = self.monitor_once(env=self.retry_now_env())
        self.assertExit(quiet, 0)
        self.assertRequestCount(requests_before + 1, context=quiet)
        self.assertServerClean()
        self.assertEqual([r.method for r in server.requests], ["POST"] * len(server.requests))
        self.assertSecretsKept()
        return elapsed

    def test_monitor_keeps_the_record_when_the_service_answers_http_500(self):
        self.check_kept_then_delivered(
            Reply.json({"code": 50077, "msg": "internal boom at /xxtui/" + KEY}, 500),
            needles=[r"\b500\b", r"\b50077\b", "internal boom"])

    def test_monitor_keeps_the_record_when_the_service_answers_code_not_0_with_msg(self):
        self.check_kept_then_delivered(Reply.json({"code": 40123, "msg": "bad key here: " + KEY}),
                                       needles=[r"\b40123\b", "bad key here"])

    def test_monitor_keeps_the_record_when_the_service_answers_code_not_0_with_message(self):
        self.check_kept_then_delivered(Reply.json({"code": 40124, "message": "quota used up"}),
                                       needles=[r"\b40124\b", "quota used up"])

    def test_monitor_keeps_the_record_when_the_service_answers_200_without_a_code(self):
        self.check_kept_then_delivered(Reply.json({"msg": "who knows"}))

    def test_monitor_keeps_the_record_when_the_connection_is_refused(self):
        self.check_kept_then_delivered(refuse=True, needles=[r"(?i)refused"])

    def test_monitor_keeps_the_record_when_the_service_does_not_answer_in_time(self):
        elapsed = self.check_kept_then_delivered(Reply.hang(8), timeout=1,
                                                 needles=[r"(?i)time|no answer"])
        self.assertLess(elapsed, 5, "[xxtui] timeout = 1 not honoured")

    def test_monitor_keeps_the_record_when_the_service_closes_without_answering(self):
        self.check_kept_then_delivered(Reply.drop())

    def test_monitor_treats_a_non_json_200_answer_as_a_failure(self):
        self.check_kept_then_delivered(Reply.raw(200, "<<this is not json>>"))

    def test_monitor_treats_an_html_error_page_as_a_failure_naming_the_status(self):
        page = ("<html><body><h1>502 Bad Gateway</h1> POST /xxtui/%s"
                "<p>upstream failed</p></body></html>" % KEY)
        self.check_kept_then_delivered(Reply.raw(502, page, "text/html"), needles=[r"\b502\b"])

    def test_monitor_does_not_follow_a_redirect_of_the_push(self):
        self.check_kept_then_delivered(Reply.redirect(302), needles=[r"\b302\b"])

    def test_monitor_waits_before_retrying_a_failed_push_by_default(self):
        self.configure_xxtui()
        self.server.queue(Reply.json({"code": 50077, "msg": "internal boom"}, 500))
        run_id, _ = self.finished_run("echo hi", expect=0)
        self.assertExit(self.monitor_once(), 1)
        again = self.monitor_once()
        self.assertExit(again, 1)
        self.assertRequestCount(1, context=again)
        self.assertEqual(list(read_records(self.sb.work, "done")), [run_id])
        self.assertSecretsKept()


class LongRunningMonitorTest(MonitorTestCase):

    def test_monitor_delivers_a_run_finishing_while_it_runs_and_stops_soon_after_sigterm(self):
        self.configure_xxtui()
        monitor = self.start("monitor", "--work-dir", self.sb.work, "--interval", "1")
        wrapper = self.start_wrap(sys.executable, "-c", WAIT_FOR_GO, extra=["--name", "live-run"])
        self.assertTrue(wait_for(lambda: record_names(self.sb.work, "running"), timeout=10),
                        "no running record appeared")
        open(os.path.join(self.sb.work, "go"), "w").close()
        self.assertExit(self.finish(wrapper), 0)

        delivered = self.server.wait_for_requests(1, timeout=10)
        archived = wait_for(lambda: read_records(self.sb.work, "sent"), timeout=5)
        logged = wait_for(lambda: any(ISO_LINE_RE.match(line) and "live-run" in line
                                      for line in monitor.read_stdout().decode(
                                          "utf-8", "replace").splitlines()), timeout=5)
        self.assertTrue(monitor.proc.poll() is None, "monitor ended early" +
                        monitor.result().describe())
        monitor.proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        result = self.finish(monitor, timeout=10)
        stopped_after = time.monotonic() - started

        self.assertTrue(delivered, "no push within 10 s" + result.describe())
        self.assertTrue(archived, "record not archived" + result.describe())
        self.assertTrue(logged, "no timestamped line about the run" + result.describe())
        self.assertLess(stopped_after, 2.0, result.describe())
        self.assertIn(result.returncode, (0, 128 + signal.SIGTERM), result.describe())
        self.assertNoTraceback(result)
        self.assertServerClean()
        self.assertRequestCount(1, context=result)
        self.assertIn("live-run", self.server.bodies[0]["title"])
        for line in result.out.splitlines():
            if line.strip():
                self.assertRegex(line, ISO_LINE_RE, result.describe())
        self.assertSecretsKept()

    def test_monitor_stops_within_a_second_of_sigterm_or_sigint_during_a_long_interval(self):
        self.configure_xxtui()
        cases = []
        for number in (signal.SIGTERM, signal.SIGINT):
            work = self.sb.make_dir("work-%d" % number)
            self.finished_run("echo before", work=work, expect=0)
            cases.append((number, self.start("monitor", "--work-dir", work,
                                             "--interval", "60")))
        # each monitor has delivered its run: it is in its 60 s sleep
        self.assertTrue(self.server.wait_for_requests(2, timeout=10), self.server.describe())
        for number, monitor in cases:
            with self.subTest(signal.Signals(number).name):
                wait_for(lambda: read_records(monitor.argv[monitor.argv.index("--work-dir") + 1],
                                              "sent"), timeout=5)
                monitor.proc.send_signal(number)
                started = time.monotonic()
                result = self.finish(monitor, timeout=10)
                stopped_after = time.monotonic() - started
                self.assertLess(stopped_after, 2.0, result.describe())
                self.assertIn(result.returncode, (0, 128 + number), result.describe())
                self.assertNoTraceback(result)


if __name__ == "__main__":
    unittest.main()
