"""The test support itself: the fake xxtui must reject what the real one would."""

import http.client
import json
import socket
import time
import unittest
import urllib.parse

from support import KEY, FakeXxtui, Reply, refused_port, sealed_env, wait_for

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


if __name__ == "__main__":
    unittest.main()
