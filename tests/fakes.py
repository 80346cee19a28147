"""Fakes of the push services and a small SMTP server, all on 127.0.0.1.

Each fake checks a request the way reference/notify-apis.md describes the service: method,
path, query, headers, body fields and signatures. Python 3.6+, standard library only.
"""

import base64
import collections
import email
import email.header
import hashlib
import hmac
import json
import os
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.parse

from support import FakeServer, Reply


# --- a generic fake HTTP service ---

ServiceRequest = collections.namedtuple(
    "ServiceRequest", "method path query raw_query headers body json form proxied_host problems")


class FakeService(FakeServer):
    """A push service on 127.0.0.1 (HTTPS when given a TLS context).

    check(request) returns the problems of one request; valid requests get the next queued
    Reply or the service's success answer, invalid ones a 400 naming the problems."""

    def __init__(self, name, check, success, tls_context=None):
        FakeServer.__init__(self, tls_context)
        self.name = name
        self.check_request = check
        self.success = success

    def parse_request(self, method, path, headers, body):
        request = self.parse(method, path, headers, body)
        return request._replace(problems=list(request.problems) + self.check_request(request))

    def ok_reply(self):
        return self.success()

    def refusal_reply(self, problems):
        return Reply.json({"fake": self.name, "problems": problems}, 400)

    def describe_request(self, request):
        shown = request.json if request.json is not None else (
            request.form if request.form is not None else request.body[:3000])
        return "  %s %s?%s %r problems=%r" % (request.method, request.path, request.raw_query,
                                              shown, request.problems)

    @staticmethod
    def parse(method, path, headers, body):
        problems = []
        proxied_host = None
        if path.startswith(("http://", "https://")):      # a request to a proxy
            parts = urllib.parse.urlsplit(path)
            proxied_host = parts.netloc
            path = urllib.parse.urlunsplit(("", "", parts.path, parts.query, ""))
        agent = headers.get("User-Agent") or ""
        if not agent.startswith("hpcrun/"):
            problems.append("User-Agent %r, expected hpcrun/<version>" % agent)
        if headers.get("Transfer-Encoding"):
            problems.append("chunked body, expected Content-Length")
        split = urllib.parse.urlsplit(path)
        query = urllib.parse.parse_qs(split.query, keep_blank_values=True)
        content_type = (headers.get("Content-Type") or "").lower().replace(" ", "")
        data = form = None
        if content_type.startswith("application/json"):
            if content_type not in ("application/json", "application/json;charset=utf-8"):
                problems.append("Content-Type %r" % headers.get("Content-Type"))
            try:
                data = json.loads(body.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as error:
                problems.append("body is not UTF-8 JSON: %s" % error)
        elif content_type.startswith("application/x-www-form-urlencoded"):
            try:
                form = urllib.parse.parse_qs(body.decode("ascii"), keep_blank_values=True,
                                             strict_parsing=True, errors="strict")
            except (UnicodeDecodeError, ValueError) as error:
                problems.append("body is not a URL-encoded form: %s" % error)
        return ServiceRequest(method, split.path, query, split.query,
                              dict((k.lower(), v) for k, v in headers.items()), body, data, form,
                              proxied_host, problems)


def start_service(test, name, check, success, tls_context=None):
    service = FakeService(name, check, success, tls_context).start()
    test.addCleanup(service.stop)
    return service


# --- checking requests ---

def expect(problems, condition, message):
    if not condition:
        problems.append(message)


def check_post_json(request, path, fields, required, query=None):
    """POST, exactly this path and query, a JSON object with only `fields`, all `required` there."""
    problems = []
    expect(problems, request.method == "POST", "method %s, expected POST" % request.method)
    expect(problems, request.path == path, "path %r, expected %r" % (request.path, path))
    expect(problems, request.query == (query or {}),
           "query %r, expected %r" % (request.query, query or {}))
    data = request.json
    if not isinstance(data, dict):
        return problems + ["body is not a JSON object (Content-Type %r)"
                           % request.headers.get("content-type")]
    extra = sorted(set(data) - set(fields))
    expect(problems, not extra, "unexpected fields %s" % extra)
    missing = sorted(set(required) - set(data))
    expect(problems, not missing, "missing fields %s" % missing)
    return problems


def check_text(problems, value, name):
    expect(problems, isinstance(value, str) and value.strip(), "%s missing, empty or not a string"
           % name)


def feishu_expected_sign(secret, timestamp):
    """notify-apis.md §5: key = "timestamp\\nsecret", message empty, base64."""
    key = ("%s\n%s" % (timestamp, secret)).encode("utf-8")
    return base64.b64encode(hmac.new(key, b"", hashlib.sha256).digest()).decode("ascii")


def dingtalk_expected_sign(secret, timestamp):
    """notify-apis.md §5: key = secret, message "timestamp\\nsecret", base64, quote_plus once."""
    message = ("%s\n%s" % (timestamp, secret)).encode("utf-8")
    digest = hmac.new(secret.encode("utf-8"), message, hashlib.sha256).digest()
    return urllib.parse.quote_plus(base64.b64encode(digest).decode("ascii"))


def check_timestamp(problems, value, unit_seconds):
    """A string of digits within an hour of now (the window Feishu and DingTalk allow)."""
    if not (isinstance(value, str) and value.isdigit()):
        problems.append("timestamp %r is not a string of digits" % (value,))
        return
    seconds = int(value) / unit_seconds
    expect(problems, abs(seconds - time.time()) < 3600,
           "timestamp %s is not within an hour of now (unit wrong?)" % value)


def raw_query_value(raw_query, name):
    """The still-encoded value of name in a query string, or None."""
    for pair in raw_query.split("&"):
        key, _, value = pair.partition("=")
        if key == name:
            return value
    return None


# --- the services (notify-apis.md §3, §4, §6) ---

class Services(object):
    """The check and the answers of each service, for fakes expecting the given secrets."""

    @staticmethod
    def serverchan(key, path):
        def check(request):
            problems = check_post_json(request, path, ("title", "desp"), ("title", "desp"))
            if isinstance(request.json, dict):
                check_text(problems, request.json.get("title"), "title")
                check_text(problems, request.json.get("desp"), "desp")
                expect(problems, len(request.json.get("title") or "") <= 32,
                       "title longer than 32 characters")
            return problems
        return check, lambda: Reply.json({"code": 0, "message": "", "data": {
            "pushid": "1", "readkey": "r", "error": "SUCCESS", "errno": 0}})

    @staticmethod
    def pushplus(token):
        def check(request):
            problems = check_post_json(request, "/send", ("token", "title", "content", "template",
                                                          "channel", "topic"),
                                       ("token", "title", "content"))
            if isinstance(request.json, dict):
                expect(problems, request.json.get("token") == token, "wrong token in the body")
                check_text(problems, request.json.get("content"), "content")
                expect(problems, request.json.get("template") in (None, "txt", "html", "markdown"),
                       "template %r" % request.json.get("template"))
            return problems
        return check, lambda: Reply.json({"code": 200, "msg": "请求成功", "data": "4b1c2d"})

    @staticmethod
    def bark(device_key):
        def check(request):
            problems = check_post_json(request, "/push", ("device_key", "title", "body", "group",
                                                          "level", "sound"),
                                       ("device_key", "title", "body"))
            if isinstance(request.json, dict):
                expect(problems, request.json.get("device_key") == device_key,
                       "wrong device_key in the body")
                check_text(problems, request.json.get("body"), "body")
            return problems
        return check, lambda: Reply.json({"code": 200, "message": "success",
                                          "timestamp": int(time.time())})

    @staticmethod
    def feishu(token, secret=None):
        def check(request):
            fields = ("msg_type", "content") + (("timestamp", "sign") if secret else ())
            problems = check_post_json(request, "/open-apis/bot/v2/hook/" + token, fields, fields)
            data = request.json
            if not isinstance(data, dict):
                return problems
            expect(problems, data.get("msg_type") == "text", "msg_type %r" % data.get("msg_type"))
            content = data.get("content")
            expect(problems, isinstance(content, dict) and set(content) == {"text"},
                   "content is not {\"text\": ...}")
            check_text(problems, (content or {}).get("text") if isinstance(content, dict) else None,
                       "content.text")
            if secret:
                check_timestamp(problems, data.get("timestamp"), 1)
                expect(problems, data.get("sign") == feishu_expected_sign(secret, data.get("timestamp")),
                       "sign does not match (key timestamp\\nsecret over an empty message)")
            return problems
        return check, lambda: Reply.json({"StatusCode": 0, "StatusMessage": "success", "code": 0,
                                          "data": {}, "msg": "success"})

    @staticmethod
    def dingtalk(access_token, secret=None):
        def check(request):
            problems = check_post_json(request, "/robot/send", ("msgtype", "text"),
                                       ("msgtype", "text"), query=request.query)
            expected = {"access_token"} | ({"timestamp", "sign"} if secret else set())
            expect(problems, set(request.query) == expected,
                   "query names %s, expected %s" % (sorted(request.query), sorted(expected)))
            expect(problems, request.query.get("access_token") == [access_token],
                   "wrong access_token in the query")
            if secret:
                timestamp = (request.query.get("timestamp") or [None])[0]
                check_timestamp(problems, timestamp, 1000)
                raw_sign = raw_query_value(request.raw_query, "sign")
                expect(problems, raw_sign == dingtalk_expected_sign(secret, timestamp),
                       "sign %r does not match (must be URL-encoded exactly once)" % raw_sign)
            data = request.json
            if isinstance(data, dict):
                expect(problems, data.get("msgtype") == "text", "msgtype %r" % data.get("msgtype"))
                text = data.get("text")
                expect(problems, isinstance(text, dict) and set(text) == {"content"},
                       "text is not {\"content\": ...}")
                check_text(problems, text.get("content") if isinstance(text, dict) else None,
                           "text.content")
            return problems
        return check, lambda: Reply.json({"errcode": 0, "errmsg": "ok"})

    @staticmethod
    def wecom(key):
        def check(request):
            problems = check_post_json(request, "/cgi-bin/webhook/send", ("msgtype", "text"),
                                       ("msgtype", "text"), query={"key": [key]})
            data = request.json
            if isinstance(data, dict):
                expect(problems, data.get("msgtype") == "text", "msgtype %r" % data.get("msgtype"))
                text = data.get("text")
                expect(problems, isinstance(text, dict) and "content" in text
                       and set(text) <= {"content", "mentioned_list", "mentioned_mobile_list"},
                       "text is not {\"content\": ...}")
                check_text(problems, text.get("content") if isinstance(text, dict) else None,
                           "text.content")
            return problems
        return check, lambda: Reply.json({"errcode": 0, "errmsg": "ok"})

    @staticmethod
    def ntfy(topic, authorization=None):
        def check(request):
            problems = check_post_json(request, "/", ("topic", "title", "message", "priority",
                                                      "tags"), ("topic", "title", "message"))
            expect(problems, request.headers.get("authorization") == authorization,
                   "Authorization %r, expected %r" % (request.headers.get("authorization"),
                                                      authorization))
            for name in ("title", "x-title", "t"):
                expect(problems, name not in request.headers, "title sent as header %s" % name)
            data = request.json
            if isinstance(data, dict):
                expect(problems, data.get("topic") == topic, "wrong topic")
                check_text(problems, data.get("message"), "message")
                priority = data.get("priority", 3)
                expect(problems, isinstance(priority, int) and 1 <= priority <= 5,
                       "priority %r not 1-5" % (priority,))
                expect(problems, isinstance(data.get("tags", []), list), "tags is not a list")
            return problems

        def success():
            return Reply.json({"id": "hT5yq2", "time": int(time.time()), "expires": 0,
                               "event": "message", "topic": topic, "message": "..."})
        return check, success

    @staticmethod
    def slack(path):
        def check(request):
            problems = check_post_json(request, path, ("text",), ("text",))
            if isinstance(request.json, dict):
                text = request.json.get("text")
                check_text(problems, text, "text")
                expect(problems, "<" not in (text or "") and ">" not in (text or ""),
                       "unescaped < or > in text (Slack reads them as links)")
            return problems
        return check, lambda: Reply.raw(200, "ok", "text/html")

    @staticmethod
    def discord(path):
        def check(request):
            problems = check_post_json(request, path, ("content", "username", "allowed_mentions"),
                                       ("content",))
            if isinstance(request.json, dict):
                check_text(problems, request.json.get("content"), "content")
            return problems
        return check, lambda: Reply("http", 204, b"", "text/plain")

    @staticmethod
    def telegram(token, chat_id):
        def check(request):
            problems = check_post_json(request, "/bot%s/sendMessage" % token,
                                       ("chat_id", "text", "disable_web_page_preview"),
                                       ("chat_id", "text"))
            if isinstance(request.json, dict):
                expect(problems, request.json.get("chat_id") == chat_id,
                       "chat_id %r, expected %r" % (request.json.get("chat_id"), chat_id))
                check_text(problems, request.json.get("text"), "text")
            return problems
        return check, lambda: Reply.json({"ok": True, "result": {"message_id": 7, "date": 0}})

    @staticmethod
    def pushover(token, user):
        def check(request):
            problems = []
            expect(problems, request.method == "POST", "method %s" % request.method)
            expect(problems, request.path == "/1/messages.json", "path %r" % request.path)
            expect(problems, not request.query, "unexpected query")
            form = request.form
            if form is None:
                return problems + ["body is not a form (Content-Type %r)"
                                   % request.headers.get("content-type")]
            extra = sorted(set(form) - {"token", "user", "message", "title", "priority", "sound",
                                        "device", "retry", "expire"})
            expect(problems, not extra, "unexpected fields %s" % extra)
            expect(problems, all(len(values) == 1 for values in form.values()), "repeated field")
            # pushover.net/api#priority: 2 (emergency) needs retry >= 30 and expire <= 10800
            if form.get("priority") == ["2"]:
                retry, expire = (form.get("retry") or ["0"])[0], (form.get("expire") or ["0"])[0]
                expect(problems, retry.isdigit() and int(retry) >= 30, "retry %r with priority 2" % retry)
                expect(problems, expire.isdigit() and 0 < int(expire) <= 10800,
                       "expire %r with priority 2" % expire)
            expect(problems, form.get("token") == [token], "wrong token")
            expect(problems, form.get("user") == [user], "wrong user")
            check_text(problems, (form.get("message") or [None])[0], "message")
            return problems
        return check, lambda: Reply.json({"status": 1,
                                          "request": "647d2300-702c-4b38-8b2f-d56326ae460b"})

    @staticmethod
    def gotify(token):
        def check(request):
            problems = check_post_json(request, "/message", ("title", "message", "priority",
                                                             "extras"), ("message",))
            expect(problems, request.headers.get("x-gotify-key") == token,
                   "X-Gotify-Key header missing or wrong")
            expect(problems, "authorization" not in request.headers, "token also as Authorization")
            if isinstance(request.json, dict):
                check_text(problems, request.json.get("message"), "message")
                expect(problems, isinstance(request.json.get("priority", 0), int),
                       "priority not a number")
            return problems

        def success():
            return Reply.json({"id": 25, "appid": 5, "message": "...", "title": "...",
                               "priority": 5, "date": "2026-01-01T00:00:00Z"})
        return check, success

    @staticmethod
    def webhook(method, path, headers, fields):
        """A generic receiver: method, path, the given headers, and a JSON body with these fields."""
        def check(request):
            problems = []
            expect(problems, request.method == method, "method %s, expected %s"
                   % (request.method, method))
            expect(problems, request.path == path, "path %r, expected %r" % (request.path, path))
            for name, value in headers.items():
                expect(problems, request.headers.get(name.lower()) == value,
                       "header %s %r, expected %r" % (name, request.headers.get(name.lower()), value))
            if fields is not None:
                expect(problems, isinstance(request.json, dict) and set(request.json) == set(fields),
                       "body fields %r, expected %r" % (sorted(request.json or {}), sorted(fields)))
            return problems
        return check, lambda: Reply.json({"received": True})


# --- text of a request, per service: (title, text, measured text) ---

def sent_text(kind, request):
    """(title or None, text) of what a request carries, as the reader will see it."""
    data, form = request.json or {}, request.form or {}
    if kind == "serverchan":
        return data.get("title"), data.get("desp", "").replace("\n\n", "\n")
    if kind in ("pushplus", "xxtui"):
        return data.get("title"), data.get("content")
    if kind == "bark":
        return data.get("title"), data.get("body")
    if kind == "feishu":
        return None, data.get("content", {}).get("text")
    if kind in ("dingtalk", "wecom"):
        return None, data.get("text", {}).get("content")
    if kind in ("ntfy", "gotify"):
        return data.get("title"), data.get("message")
    if kind == "slack":
        text = data.get("text", "")
        return None, text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
    if kind == "discord":
        return None, data.get("content")
    if kind == "telegram":
        return None, data.get("text")
    if kind == "pushover":
        return (form.get("title") or [None])[0], (form.get("message") or [None])[0]
    if kind == "webhook":
        return data.get("title"), data.get("content")
    raise KeyError(kind)


# --- TLS for the HTTPS and SMTP fakes ---

def make_certificate(directory):
    """A self-signed certificate for localhost and 127.0.0.1: (cert path, key path), or None."""
    cert = os.path.join(directory, "cert.pem")
    key = os.path.join(directory, "key.pem")
    config = os.path.join(directory, "openssl.cnf")
    with open(config, "w") as handle:
        handle.write("[req]\ndistinguished_name = dn\nx509_extensions = ext\nprompt = no\n"
                     "[dn]\nCN = localhost\n"
                     "[ext]\nsubjectAltName = DNS:localhost, IP:127.0.0.1\n"
                     "basicConstraints = critical, CA:TRUE\n")
    try:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                        "-keyout", key, "-out", cert, "-config", config],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return cert, key


def server_tls_context(cert, key):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER) if hasattr(ssl, "PROTOCOL_TLS_SERVER") \
        else ssl.SSLContext(ssl.PROTOCOL_TLSv1_2)
    context.load_cert_chain(cert, key)
    return context


# --- a small SMTP server ---

SmtpMessage = collections.namedtuple(
    "SmtpMessage", "mail_from rcpt_to data message subject body login tls")


class FakeSmtp(object):
    """An ESMTP server on 127.0.0.1: EHLO/HELO, STARTTLS (with a TLS context), AUTH PLAIN and
    LOGIN, MAIL, RCPT, DATA, RSET, NOOP, QUIT; implicit TLS with mode="ssl".

    `messages` holds every accepted message, `errors` every protocol problem. `fail` maps a
    stage ("auth", "mail", "rcpt", "data") to the (code, bytes) reply to give instead of
    success, once per queued entry."""

    def __init__(self, user=None, password=None, mode="plain", tls_context=None,
                 auth_methods=("PLAIN", "LOGIN")):
        self.user = user
        self.password = password
        self.mode = mode
        self.tls_context = tls_context
        self.auth_methods = auth_methods
        self.messages = []
        self.errors = []
        self.connections = 0
        self.fail = collections.defaultdict(collections.deque)
        self._lock = threading.Condition()
        self._sock = None
        self._stopping = threading.Event()

    def start(self):
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(8)
        self._sock.settimeout(0.1)
        thread = threading.Thread(target=self._serve)
        thread.daemon = True
        thread.start()
        return self

    def stop(self):
        self._stopping.set()
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    @property
    def port(self):
        return self._sock.getsockname()[1]

    def queue_failure(self, stage, code, text):
        with self._lock:
            self.fail[stage].append((code, text if isinstance(text, bytes) else text.encode()))

    def describe(self):
        with self._lock:
            return "fake SMTP: %d connection(s), %d message(s), errors %r" % (
                self.connections, len(self.messages), self.errors)

    def wait_for_messages(self, count, timeout=10.0):
        with self._lock:
            return self._lock.wait_for(lambda: len(self.messages) >= count, timeout)

    def _serve(self):
        while not self._stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with self._lock:
                self.connections += 1
            thread = threading.Thread(target=self._session, args=(conn,))
            thread.daemon = True
            thread.start()

    def _problem(self, text):
        with self._lock:
            self.errors.append(text)

    def _failure(self, stage):
        with self._lock:
            return self.fail[stage].popleft() if self.fail[stage] else None

    def _session(self, conn):
        conn.settimeout(10)
        try:
            if self.mode == "ssl":
                conn = self.tls_context.wrap_socket(conn, server_side=True)
            session = _SmtpSession(self, conn)
            try:
                session.run()
            finally:
                session.conn.close()
        except (OSError, ssl.SSLError, ValueError):
            pass
        finally:
            conn.close()


class _SmtpSession(object):

    def __init__(self, server, conn):
        self.server = server
        self.conn = conn
        self.buffer = b""
        self.tls = server.mode == "ssl"
        self.greeted = False
        self.login = None
        self.mail_from = None
        self.rcpt_to = []

    def send(self, code, text):
        lines = text.split(b"\n") if isinstance(text, bytes) else text.encode().split(b"\n")
        out = b"".join(b"%d%s%s\r\n" % (code, b"-" if i < len(lines) - 1 else b" ", line)
                       for i, line in enumerate(lines))
        self.conn.sendall(out)

    def read_line(self):
        while b"\r\n" not in self.buffer:
            chunk = self.conn.recv(65536)
            if not chunk:
                raise EOFError
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def run(self):
        self.send(220, "fake.smtp ESMTP ready")
        try:
            while True:
                line = self.read_line()
                verb, _, argument = line.partition(b" ")
                handler = getattr(self, "do_" + verb.decode("ascii", "replace").upper(), None)
                if handler is None:
                    self.server._problem("unknown command %r" % line[:40])
                    self.send(500, "unknown command")
                    continue
                if handler(argument) == "quit":
                    return
        except EOFError:
            return

    def do_EHLO(self, argument):
        self.greeted = True
        lines = ["fake.smtp", "8BITMIME"]
        if self.server.mode == "starttls" and not self.tls:
            lines.append("STARTTLS")
        if self.tls or self.server.mode == "plain":
            lines.append("AUTH " + " ".join(self.server.auth_methods))
        self.send(250, "\n".join(lines))

    def do_HELO(self, argument):
        self.greeted = True
        self.send(250, "fake.smtp")

    def do_STARTTLS(self, argument):
        if self.server.mode != "starttls" or self.tls:
            self.server._problem("STARTTLS not offered")
            self.send(454, "TLS not available")
            return
        self.send(220, "ready to start TLS")
        self.conn = self.server.tls_context.wrap_socket(self.conn, server_side=True)
        self.tls = True
        self.greeted = False

    def do_AUTH(self, argument):
        if not self.greeted:
            self.server._problem("AUTH before EHLO")
        if self.server.mode == "starttls" and not self.tls:
            self.server._problem("AUTH before STARTTLS: the password would travel in clear")
            self.send(530, "must issue a STARTTLS command first")
            return
        method, _, initial = argument.partition(b" ")
        method = method.decode("ascii", "replace").upper()
        if method not in self.server.auth_methods:
            self.server._problem("AUTH %s not offered" % method)
            self.send(504, "unrecognized authentication type")
            return
        if method == "PLAIN":
            if not initial:
                self.send(334, "")
                initial = self.read_line()
            parts = base64.b64decode(initial).split(b"\0")
            user, password = (parts[1], parts[2]) if len(parts) == 3 else (b"", b"")
        else:
            if initial:
                user = base64.b64decode(initial)
            else:
                self.send(334, base64.b64encode(b"Username:"))
                user = base64.b64decode(self.read_line())
            self.send(334, base64.b64encode(b"Password:"))
            password = base64.b64decode(self.read_line())
        user, password = user.decode("utf-8"), password.decode("utf-8")
        failure = self.server._failure("auth")
        if failure:
            self.send(*failure)
            return
        if (user, password) != (self.server.user, self.server.password):
            self.server._problem("wrong login %r" % user)
            self.send(535, "authentication failed")
            return
        self.login = user
        self.send(235, "authentication successful")

    def do_MAIL(self, argument):
        if self.server.user and not self.login:
            self.server._problem("MAIL before AUTH")
            self.send(530, "authentication required")
            return
        failure = self.server._failure("mail")
        if failure:
            self.send(*failure)
            return
        self.mail_from = self.address(argument, b"FROM:")
        self.rcpt_to = []
        self.send(250, "ok")

    def do_RCPT(self, argument):
        if self.mail_from is None:
            self.server._problem("RCPT before MAIL")
            self.send(503, "need MAIL first")
            return
        failure = self.server._failure("rcpt")
        if failure:
            self.send(*failure)
            return
        self.rcpt_to.append(self.address(argument, b"TO:"))
        self.send(250, "ok")

    def do_DATA(self, argument):
        if not self.rcpt_to:
            self.server._problem("DATA before RCPT")
            self.send(503, "need RCPT first")
            return
        self.send(354, "end data with <CR><LF>.<CR><LF>")
        lines = []
        while True:
            line = self.read_line()
            if line == b".":
                break
            lines.append(line[1:] if line.startswith(b".") else line)
        data = b"\r\n".join(lines) + b"\r\n"
        failure = self.server._failure("data")
        if failure:
            self.send(*failure)
            return
        self.record(data)
        self.send(250, "queued as 1")

    def do_RSET(self, argument):
        self.mail_from, self.rcpt_to = None, []
        self.send(250, "ok")

    def do_NOOP(self, argument):
        self.send(250, "ok")

    def do_QUIT(self, argument):
        self.send(221, "bye")
        return "quit"

    @staticmethod
    def address(argument, prefix):
        text = argument.decode("utf-8", "replace")
        if not text.upper().startswith(prefix.decode()):
            return None
        text = text[len(prefix):].strip()
        return text.split(">", 1)[0].lstrip("<")

    def record(self, data):
        message = email.message_from_bytes(data)
        subject = str(email.header.make_header(email.header.decode_header(message["Subject"] or "")))
        charset = message.get_content_charset() or "ascii"
        payload = message.get_payload(decode=True) or b""
        try:
            body = payload.decode(charset)
        except (LookupError, UnicodeDecodeError) as error:
            self.server._problem("body does not decode as %s: %s" % (charset, error))
            body = payload.decode("utf-8", "replace")
        problems = []
        expect(problems, message.get_content_type() == "text/plain",
               "Content-Type %s" % message.get_content_type())
        expect(problems, charset == "utf-8", "charset %s" % charset)
        expect(problems, message["From"] and self.mail_from in message["From"],
               "From %r is not the envelope sender %r" % (message["From"], self.mail_from))
        if self.login is not None:
            expect(problems, self.mail_from == self.login,
                   "envelope sender %r is not the login %r (QQ Mail refuses that)"
                   % (self.mail_from, self.login))
        for address in self.rcpt_to:
            expect(problems, address in (message["To"] or ""), "To lacks %s" % address)
        for name in ("Date", "Message-ID"):
            expect(problems, message[name], "no %s header" % name)
        for problem in problems:
            self.server._problem(problem)
        with self.server._lock:
            self.server.messages.append(SmtpMessage(self.mail_from, list(self.rcpt_to), data,
                                                    message, subject, body, self.login, self.tls))
            self.server._lock.notify_all()


def start_smtp(test, **options):
    server = FakeSmtp(**options).start()
    test.addCleanup(server.stop)
    return server


def temp_certificate(test):
    """A self-signed certificate in a temp dir (removed after the test), or skip the test."""
    directory = tempfile.mkdtemp(prefix="hpcrun-cert-")
    test.addCleanup(lambda: __import__("shutil").rmtree(directory, True))
    made = make_certificate(directory)
    if made is None:
        test.skipTest("openssl cannot make a self-signed certificate here")
    return made
