"""The test support itself: the fake xxtui must reject what the real one would; the one
report_kind reads every title hpcrun writes; hpcrun in process behaves as in a subprocess."""

import http.client
import json
import os
import re
import shutil
import signal
import socket
import tempfile
import time
import unittest
import urllib.parse

import support
from support import KEY, FakeXxtui, Reply, refused_port, sealed_env, wait_for
from fakes import FakeService, Services

LAYER = "fast"

GOOD_HEADERS = {"Content-Type": "application/json; charset=utf-8", "User-Agent": "hpcrun/0.1.0"}
GOOD_BODY = {"title": "t", "content": "c", "from": "hpcrun"}


class FakeXxtuiTest(unittest.TestCase):

    def setUp(self):
        self.server = FakeXxtui(KEY).start()
        self.addCleanup(self.server.stop)

    def send(self, method="POST", path=None, headers=None, body=None, timeout=5):
        connection = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=timeout)
        self.addCleanup(connection.close)
        if path is None:
            path = "/xxtui/" + urllib.parse.quote(KEY, safe="")
        if body is None:
            body = GOOD_BODY
        data = body if isinstance(body, bytes) else json.dumps(body).encode("utf-8")
        connection.putrequest(method, path, skip_accept_encoding=True)
        for name, value in (GOOD_HEADERS if headers is None else headers).items():
            connection.putheader(name, value)
        connection.putheader("Content-Length", str(len(data)))
        connection.endheaders(data)
        response = connection.getresponse()
        return response.status, response.getheader("Location"), response.read()

    def test_a_valid_request_is_recorded_and_answered_ok(self):
        status, _, body = self.send()
        self.assertEqual((status, json.loads(body.decode())), (200, {"code": 0, "msg": "ok"}))
        self.assertEqual(self.server.errors, [])
        self.assertEqual(self.server.bodies, [GOOD_BODY])
        self.assertEqual(self.server.requests[0].key, KEY)

    def test_invalid_requests_are_recorded_as_errors_and_answered_400(self):
        quoted = "/xxtui/" + urllib.parse.quote(KEY, safe="")
        cases = [
            ("GET", dict(method="GET")),
            ("wrong key", dict(path="/xxtui/other")),
            ("key in two segments", dict(path="/xxtui/%s/x" % KEY)),
            ("wrong path", dict(path="/push")),
            ("query string", dict(path=quoted + "?key=1")),
            ("no user agent", dict(headers={"Content-Type": "application/json"})),
            ("default user agent", dict(headers={"Content-Type": "application/json",
                                                 "User-Agent": "Python-urllib/3.11"})),
            ("form content type", dict(headers={"Content-Type": "application/x-www-form-urlencoded",
                                                "User-Agent": "hpcrun/0"})),
            ("other charset", dict(headers={"Content-Type": "application/json; charset=gbk",
                                            "User-Agent": "hpcrun/0"})),
            ("not json", dict(body=b"title=t&content=c")),
            ("not utf-8", dict(body=b'{"title": "\xff", "content": "c", "from": "f"}')),
            ("json array", dict(body=[GOOD_BODY])),
            ("extra field", dict(body=dict(GOOD_BODY, type="markdown"))),
            ("empty content", dict(body=dict(GOOD_BODY, content=""))),
            ("no title", dict(body={"content": "c", "from": "f"})),
            ("no from", dict(body={"content": "c", "title": "t"})),
            ("channel not a string", dict(body=dict(GOOD_BODY, channel=["WX_MP"]))),
        ]
        for index, (label, request) in enumerate(cases):
            with self.subTest(label):
                status, _, _ = self.send(**request)
                self.assertEqual(status, 400)
                self.assertEqual(len(self.server.requests), index + 1)
                self.assertTrue(self.server.requests[-1].problems)
        self.assertGreaterEqual(len(self.server.errors), len(cases))

    def test_scripted_replies_come_in_order_then_the_default(self):
        self.server.queue(Reply.json({"code": 1, "msg": "bad key"}),
                          Reply.json({"code": 5}, 500), Reply.raw(200, "not json"))
        answers = [self.send()[::2] for _ in range(4)]
        self.assertEqual(answers, [(200, b'{"code": 1, "msg": "bad key"}'), (500, b'{"code": 5}'),
                                   (200, b"not json"), (200, b'{"code": 0, "msg": "ok"}')])

    def test_a_redirect_points_at_the_same_path_under_moved(self):
        self.server.queue(Reply.redirect())
        status, location, _ = self.send()
        self.assertEqual(status, 302)
        self.assertEqual(location, self.server.base + "/moved/xxtui/" + KEY)

    def test_a_dropped_connection_gets_no_answer(self):
        self.server.queue(Reply.drop())
        with self.assertRaises((http.client.HTTPException, ConnectionError)):
            self.send()

    def test_a_hang_outlasts_the_client_timeout(self):
        self.server.queue(Reply.hang(5))
        started = time.monotonic()
        with self.assertRaises(socket.timeout):
            self.send(timeout=0.2)
        self.assertLess(time.monotonic() - started, 2)

    def test_wait_for_requests_times_out_when_nothing_comes(self):
        started = time.monotonic()
        self.assertFalse(self.server.wait_for_requests(1, timeout=0.1))
        self.assertLess(time.monotonic() - started, 1)

    def test_stop_is_quick_even_with_a_request_hanging(self):
        self.server.queue(Reply.hang(30))
        with self.assertRaises(socket.timeout):
            self.send(timeout=0.1)
        started = time.monotonic()
        self.server.stop()
        self.assertLess(time.monotonic() - started, 2)


class HelpersTest(unittest.TestCase):

    def test_refused_port_refuses(self):
        with self.assertRaises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", refused_port()), timeout=2).close()

    def test_sealed_env_drops_hpcrun_keys_proxies_and_scheduler_variables(self):
        outer = {"PATH": "/bin", "HPCRUN_CONFIG": "x", "XXTUI_KEY": "k", "https_proxy": "p",
                 "HTTP_PROXY": "p", "SLURM_JOB_ID": "1", "PBS_JOBID": "2", "LSB_JOBID": "3",
                 "JOB_ID": "4", "PYTHONUNBUFFERED": "1", "HOME": "/root"}
        env = sealed_env(outer, "/tmp/h", "/tmp/h/s")
        self.assertEqual(env["PATH"], "/bin")
        self.assertEqual(env["HOME"], "/tmp/h")
        self.assertEqual(env["HPCRUN_HOME"], "/tmp/h/s")
        self.assertEqual(env["no_proxy"], "*")
        for name in ("HPCRUN_CONFIG", "XXTUI_KEY", "https_proxy", "HTTP_PROXY", "SLURM_JOB_ID",
                     "PBS_JOBID", "LSB_JOBID", "JOB_ID", "PYTHONUNBUFFERED"):
            self.assertNotIn(name, env)

    def test_wait_for_returns_the_last_value_after_the_timeout(self):
        started = time.monotonic()
        self.assertEqual(wait_for(lambda: [], timeout=0.05), [])
        self.assertLess(time.monotonic() - started, 1)
        self.assertEqual(wait_for(lambda: "yes", timeout=5), "yes")


class FakeServerTest(unittest.TestCase):

    def test_every_fake_service_is_a_fake_server(self):
        check, success = Services.gotify("t")
        service = FakeService("gotify", check, success).start()
        self.addCleanup(service.stop)
        for fake in (FakeXxtui(KEY), service):
            with self.subTest(type(fake).__name__):
                self.assertIsInstance(fake, support.FakeServer)
                self.assertIs(type(fake).handle, support.FakeServer.handle)
        connection = http.client.HTTPConnection("127.0.0.1", service.port, timeout=5)
        self.addCleanup(connection.close)
        connection.request("POST", "/message", b"{}", {"Content-Type": "application/json"})
        response = connection.getresponse()
        self.assertEqual(response.status, 400)
        self.assertEqual(json.loads(response.read().decode())["fake"], "gotify")
        self.assertTrue(service.errors)


class ReportKindTest(unittest.TestCase):
    """The one table: each English title hpcrun writes reads as the kind the tests call it."""

    KINDS = {"success": "success", "failed": "failed", "killed": "killed",
             "terminated": "terminated", "time_limit": "time_limit", "unknown": "unknown",
             "lost": "lost", "recovered": "recovered", "stalled": "stalled", "resumed": "resumed",
             "start": "start", "time_limit_warning": "warning", "release_reminder": "reminder",
             "gpu_idle": "gpu_idle", "gpu_unused": "gpu_unused",
             "deadline_forecast": "deadline_forecast"}

    def title(self, status, **extra):
        messages = support.load_hpcrun().MESSAGES["en"]

        class Anything(dict):
            def __missing__(self, key):
                return "run-1" if key == "name" else "5s"
        return messages["title_" + status].format_map(Anything(extra))

    def test_each_title_reads_as_its_kind(self):
        messages = support.load_hpcrun().MESSAGES["en"]
        for status, kind in sorted(self.KINDS.items()):
            if "title_" + status not in messages:
                continue          # not (or no longer) a report hpcrun writes
            with self.subTest(status):
                self.assertEqual(support.report_kind(self.title(status, release="scancel 42")),
                                 kind)

    def test_labels_and_prefixes_do_not_change_the_kind_where_the_tests_rely_on_it(self):
        cases = [(self.title("terminated") + " · cancelled · SIGTERM", "terminated"),
                 (self.title("killed") + " · cancelled · SIGKILL", "killed"),
                 (self.title("failed") + " · cancelled · exit 143", "cancelled"),
                 (self.title("failed") + " · cannot start · exit 127", "failed"),
                 ("[test] " + self.title("success"), "test"),
                 ("a title of no kind", "other")]
        for title, kind in cases:
            with self.subTest(title):
                self.assertEqual(support.report_kind(title), kind)


class InProcessTest(unittest.TestCase):
    """hpcrun.main([...]) in this process gives what the process would: output, exit status,
    and this process as it was."""

    def setUp(self):
        self.sb = support.Sandbox()
        self.addCleanup(self.sb.cleanup)

    def fake_hpcrun(self, body):
        """A module standing in for hpcrun.py: main(argv) does body."""
        return self.sb.write_file("fake_hpcrun.py", "import os, signal, sys, time\n\n"
                                  "def main(argv):\n" + "".join("    %s\n" % line
                                                                  for line in body), secret=False)

    def test_output_exit_status_and_usage_errors_come_back_as_from_a_process(self):
        version = support.run_in_process(["--version"], self.sb.env)
        self.assertEqual(version.returncode, 0, version.describe())
        self.assertRegex(version.out, r"^hpcrun \S+ \(sha256 [0-9a-f]{12}\)\n$")
        usage = support.run_in_process(["monitor", "--no-such-flag"], self.sb.env)
        self.assertEqual(usage.returncode, 2, usage.describe())
        self.assertIn("usage: hpcrun", usage.err)
        self.assertIn("ran in process", usage.describe())

    def test_environment_cwd_and_signal_handlers_are_restored(self):
        handler = signal.getsignal(signal.SIGTERM)
        before, cwd = dict(os.environ), os.getcwd()
        script = self.fake_hpcrun([
            "print(os.environ['HOME'], os.getcwd(), 'HPCRUN_X' in os.environ)",
            "os.environ['LEFT_BEHIND'] = '1'",
            "signal.signal(signal.SIGTERM, lambda n, f: None)",
            "return 3"])
        result = support.run_in_process(["x"], dict(self.sb.env, HPCRUN_X="1"), cwd=self.sb.work,
                                        script=script)
        self.assertEqual(result.returncode, 3)
        self.assertEqual(result.out, "%s %s True\n" % (self.sb.home, self.sb.work))
        self.assertEqual(dict(os.environ), before)
        self.assertEqual(os.getcwd(), cwd)
        self.assertIs(signal.getsignal(signal.SIGTERM), handler)

    def test_an_uncaught_exception_is_a_traceback_and_status_1(self):
        script = self.fake_hpcrun(["raise RuntimeError('boom')"])
        result = support.run_in_process([], self.sb.env, script=script)
        self.assertEqual(result.returncode, 1)
        self.assertIn("Traceback (most recent call last)", result.err)
        self.assertIn("RuntimeError: boom", result.err)

    def test_a_run_past_its_time_is_cut_and_fails_the_test(self):
        script = self.fake_hpcrun(["time.sleep(30)"])
        started = time.monotonic()
        with self.assertRaisesRegex(AssertionError, r"did not finish within 0\.3s"):
            support.run_in_process([], self.sb.env, timeout=0.3, script=script)
        self.assertLess(time.monotonic() - started, 5)

    def test_a_fast_test_cannot_wrap_or_start_a_background_hpcrun(self):
        class Probe(support.InProcess, support.HpcrunTestCase):
            def runTest(self):
                pass
        probe = Probe()
        probe.setUp()
        self.addCleanup(probe.doCleanups)
        for call in (lambda: probe.hpcrun("wrap", "--work-dir", probe.sb.work, "--command", "true"),
                     lambda: probe.hpcrun("run", "--work-dir", probe.sb.work, "--command", "true"),
                     lambda: probe.start("monitor")):
            with self.assertRaisesRegex(AssertionError, "real process"):
                call()

    def test_import_hpcrun_loads_the_file_under_test_and_a_copy_is_a_module_of_its_own(self):
        import hpcrun
        self.assertIs(support.load_hpcrun(), hpcrun)
        self.assertEqual(os.path.abspath(hpcrun.__file__), support.HPCRUN)
        directory = tempfile.mkdtemp(prefix="hpcrun-copy-")
        self.addCleanup(shutil.rmtree, directory, True)
        copy = os.path.join(directory, "hpcrun.py")
        shutil.copy(support.HPCRUN, copy)
        other = support.load_hpcrun(copy)
        self.assertIsNot(other, hpcrun)
        self.assertEqual(other.__file__, copy)


class TickingMonitorTest(support.InProcess, support.HpcrunTestCase):

    def test_each_tick_moves_both_clocks_by_the_interval_and_polls_once(self):
        server = self.start_server()
        self.configure_xxtui(server)
        monitor = support.TickingMonitor([self.sb.work], self.env, interval=0.5).watch(server)
        first = monitor.time.now()
        monitor.start()
        os.makedirs(os.path.join(self.sb.work, ".hpcrun", "done"))
        with open(os.path.join(self.sb.work, ".hpcrun", "done", "r1.json"), "w") as out:
            json.dump({"run_id": "r1", "name": "r1", "status": "success", "exit_code": 0,
                       "start_time": time.time() - 60, "end_time": time.time(), "duration": 60.0},
                      out)
        monitor.tick(2)
        self.assertEqual(monitor.polls, 3)
        self.assertEqual(monitor.time.now() - first, 1.0)
        self.assertEqual(monitor.time.clock(), 1001.0)
        self.assertEqual(len(server.requests), 1, server.describe())
        self.assertEqual(monitor.arrivals(server), [first + 0.5])
        self.assertEqual(monitor.until(lambda: False, 1.0), False)
        self.assertEqual(monitor.polls, 5)


class LayerTest(unittest.TestCase):

    def test_every_hpcrun_test_case_of_a_fast_module_runs_hpcrun_in_process(self):
        tests_dir = os.path.dirname(os.path.abspath(__file__))
        fast = [name[:-3] for name in sorted(os.listdir(tests_dir))
                if name.startswith("test_") and name.endswith(".py") and
                re.search(r'^LAYER = "fast"$', read_text(os.path.join(tests_dir, name)), re.M)]
        self.assertIn("test_support", fast)
        for name in fast:
            module = __import__(name)
            for value in vars(module).values():
                if isinstance(value, type) and issubclass(value, support.HpcrunTestCase) and \
                        value.__module__ == name and unittest.TestLoader().getTestCaseNames(value):
                    with self.subTest(module=name, test_case=value.__name__):
                        self.assertTrue(issubclass(value, support.InProcess),
                                        "a fast module runs hpcrun in process: mix InProcess in")


def read_text(path):
    with open(path, encoding="utf-8") as stream:
        return stream.read()


if __name__ == "__main__":
    unittest.main()
