"""Shared test support: the fake push servers, a sealed environment, running hpcrun.

Python 3.6+, standard library only. Nothing here talks to anything but 127.0.0.1.

hpcrun runs two ways, one per layer (each test module says which with LAYER):

- the fast layer calls hpcrun.main([...]) in this process (run_in_process, InProcess),
  and pure functions and hpcrun.Monitor directly (load_hpcrun, FakeClock, MonitorTime);
- the process layer runs the real hpcrun.py with subprocess (run_hpcrun, Background).

Both use the file under test: HPCRUN_TEST_SCRIPT, else the repository's hpcrun.py. After
`import support`, `import hpcrun` anywhere loads that file too.
"""

import collections
import contextlib
import errno
import hashlib
import http.server
import importlib.abc
import importlib.util
import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import traceback
import unittest
import urllib.parse
from unittest import mock


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The file under test; HPCRUN_TEST_SCRIPT points the tests at another copy.
HPCRUN = os.path.abspath(os.environ.get("HPCRUN_TEST_SCRIPT") or os.path.join(REPO, "hpcrun.py"))


class _UnderTestFinder(importlib.abc.MetaPathFinder):
    """`import hpcrun` loads HPCRUN, whatever sys.path holds."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "hpcrun":
            return importlib.util.spec_from_file_location("hpcrun", HPCRUN)
        return None


if not any(isinstance(finder, _UnderTestFinder) for finder in sys.meta_path):
    sys.meta_path.insert(0, _UnderTestFinder())

_COPIES = {}


def load_hpcrun(script=HPCRUN):
    """hpcrun imported in this process: the file under test, or a copy of it at `script` (a
    module of its own, e.g. to find the config beside it)."""
    script = os.path.abspath(script)
    if script == HPCRUN:
        import hpcrun
        return hpcrun
    if script not in _COPIES:
        name = "hpcrun_copy_%s" % hashlib.sha256(script.encode("utf-8")).hexdigest()[:12]
        spec = importlib.util.spec_from_file_location(name, script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _COPIES[script] = module
    return _COPIES[script]


# A key that cannot turn up in any output by accident.
KEY = "xk7Q2TESTKEYm9Zp4v8W"
LOG_NAME_RE = re.compile(r"^train_(\d{8}_\d{6}).*\.log$")
ISO_LINE_RE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:[.,]\d+)?(?:Z|[+-]\d\d:?\d\d)(?=\s|$)")
RECORD_TIME_RE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d$")
# How an English title may say at a glance that a run succeeded.
SUCCESS_WORDS = r"(?i)succe|finished|complete|done|\bok\b|\u2705"
# What an English report's title says it is, by kind: the first match wins. The one table of
# every test module; each title hpcrun writes reads as one kind (recovered before lost: a lost
# run's heartbeat came back; terminated and killed before cancelled, the label they may carry).
REPORT_KINDS = (
    ("gpu_idle", r"GPUs idle"),
    ("gpu_unused", r"GPUs unused"),
    ("deadline_forecast", r"will not finish"),
    ("test", r"^\[test\]"),
    ("reminder", r"(?i)still billed|scancel"),
    ("warning", r"(?i)time limit near"),
    ("time_limit", r"(?i)time limit"),
    ("start", r"(?i)\bstarted\b"),
    ("recovered", r"(?i)heartbeat back|recover"),
    ("resumed", r"(?i)resum"),
    ("stalled", r"(?i)stall"),
    ("lost", r"(?i)\blost\b"),
    ("terminated", r"(?i)terminat"),
    ("killed", r"(?i)\bkill"),
    ("cancelled", r"(?i)cancel"),
    ("unknown", r"(?i)unreadable|unknown"),
    ("failed", r"(?i)\bfail"),
    ("success", SUCCESS_WORDS),
)


def report_kind(title):
    """The kind of report a title says it is ("other" when none)."""
    for kind, pattern in REPORT_KINDS:
        if re.search(pattern, title):
            return kind
    return "other"


ALLOWED_FIELDS = {"title", "content", "from", "channel"}
SCHEDULER_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "PBS_", "LSB_", "LSF_", "SGE_")
SCHEDULER_NAMES = ("JOB_ID", "JOB_NAME", "SGE_TASK_ID", "LSB_JOBID", "PBS_JOBID",
                   "PE_HOSTFILE", "NSLOTS", "QUEUE")
PROXY_NAMES = ("http_proxy", "https_proxy", "ftp_proxy", "all_proxy", "no_proxy")

# A training that says it started, then waits (bounded) until the file `go` appears in DIR.
WAIT_FOR_GO = (
    "import os, time\n"
    "print('started')\n"
    "print('step two')\n"
    "deadline = time.time() + 30\n"
    "while not os.path.exists('go') and time.time() < deadline:\n"
    "    time.sleep(0.01)\n"
    "print('finished')\n")


# --- waiting on events ---

def names_in(text, name):
    """Whether text names name as a whole word (a run called a-1 is not a-10)."""
    return re.search(r"(?<![\w-])%s(?![\w-])" % re.escape(name), text) is not None


def pass_time(seconds):
    """Let a clock move on: the feature under test is a duration (stale_after, forget_after)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))


COMMAND_TIMEOUT = 30           # seconds for one scheduler command (sbatch, qstat, ...)


def run_command(argv, env, timeout=COMMAND_TIMEOUT, cwd=None):
    """(exit status, stdout, stderr) of a command; status None when it could not run."""
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=env, timeout=timeout, cwd=cwd,
                              universal_newlines=True)
    except (OSError, subprocess.TimeoutExpired) as error:
        return None, "", str(error)
    return proc.returncode, proc.stdout, proc.stderr


def clip(text, limit=3000):
    """text's last limit characters, saying how many were cut (what a failing test shows)."""
    return text if len(text) <= limit else "[... %d chars cut ...]\n%s" % (
        len(text) - limit, text[-limit:])


def read_text(path):
    """A file's text, or a line saying why it cannot be read (what a failing test shows)."""
    try:
        return read_bytes(path).decode("utf-8", "replace")
    except OSError as error:
        return "(cannot read '%s': %s)" % (path, error.strerror)


def wait_for(predicate, timeout=10.0, interval=0.01):
    """Poll predicate until it returns something true or timeout passes; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def refused_port():
    """A port on 127.0.0.1 where nothing listens (bound, then closed)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
    finally:
        sock.close()


# --- the fake push services: one base, FakeXxtui here, the others in fakes.py ---

class Reply(object):
    """One scripted answer of a fake server to a valid request."""

    def __init__(self, kind, status=200, body=b"", content_type="application/json",
                 seconds=0.0, location=None, headers=()):
        self.kind = kind
        self.status = status
        self.body = body
        self.content_type = content_type
        self.seconds = seconds
        self.location = location
        self.headers = tuple(headers)    # extra (name, value) response headers

    def __repr__(self):
        return "Reply(%s, %s, %r)" % (self.kind, self.status, self.body[:60])

    @classmethod
    def json(cls, data, status=200):
        return cls("http", status, json.dumps(data).encode("utf-8"))

    @classmethod
    def with_headers(cls, reply, **headers):
        """The same reply with extra response headers: Reply.with_headers(r, Retry_After="2")."""
        reply.headers += tuple((name.replace("_", "-"), str(value))
                               for name, value in sorted(headers.items()))
        return reply

    @classmethod
    def ok(cls):
        return cls.json({"code": 0, "msg": "ok"})

    @classmethod
    def raw(cls, status, body, content_type="text/plain; charset=utf-8"):
        if not isinstance(body, bytes):
            body = body.encode("utf-8")
        return cls("http", status, body, content_type)

    @classmethod
    def redirect(cls, status=302, location=None):
        """A redirect; location defaults to the same path (key included) under /moved."""
        return cls("redirect", status, b"", "text/html", location=location)

    @classmethod
    def hang(cls, seconds=8.0):
        """Answer nothing for `seconds` (cut short when the server stops), then 200 ok."""
        return cls("hang", seconds=seconds)

    @classmethod
    def drop(cls):
        """Close the connection without any answer."""
        return cls("drop")

    @classmethod
    def drip(cls, body=None, seconds=1.0, status=200):
        """Status line and headers at once, then the body one byte every `seconds` (cut short
        when the server stops or the client goes away): each read of the client gets a byte
        well within any timeout, the whole answer takes len(body) * seconds. The default body
        is a 60-byte success answer."""
        if body is None:
            body = b'{"code": 0, "msg": "ok", "pad": "' + b"." * 25 + b'"}'
        return cls("drip", status, body, seconds=seconds)


Request = collections.namedtuple("Request", "method path headers body json key problems")


class _HttpServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    block_on_close = False       # Python 3.7+: server_close() must not wait for a hung handler
    allow_reuse_address = True


class _Handler(http.server.BaseHTTPRequestHandler):
    server_version = "FakeXxtui/1.0"

    def log_message(self, *args):
        pass

    def do_POST(self):
        self.server.fake.handle(self)

    do_GET = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = do_POST


class FakeServer(object):
    """A push service stand-in on 127.0.0.1 (HTTPS when given a TLS context), the base of every
    fake service (FakeXxtui here, fakes.FakeService for the others).

    `requests` holds every request (valid or not), `errors` every problem found in one.
    parse_request() reads a request and says its problems; a valid one gets the next queued
    Reply, or ok_reply() when none is queued; an invalid one gets refusal_reply() and is not
    answered from the queue."""

    name = "service"

    def __init__(self, tls_context=None):
        self.tls_context = tls_context
        self.requests = []
        self.request_times = []      # time.monotonic() at the arrival of each request
        self.errors = []
        self._replies = collections.deque()
        self._condition = threading.Condition()
        self._stopping = threading.Event()
        self._httpd = None
        self._thread = None

    # what each service says (subclasses)
    def parse_request(self, method, path, headers, body):
        """The request as recorded: a namedtuple with at least json and problems."""
        raise NotImplementedError

    def ok_reply(self):
        return Reply.ok()

    def refusal_reply(self, problems):
        return Reply.json({"code": 400, "msg": "fake %s: %s" % (self.name, "; ".join(problems))},
                          400)

    def describe_request(self, request):
        return "  %s %s %r problems=%r" % (request.method, request.path, request.json,
                                          request.problems)

    # lifecycle
    def start(self):
        self._httpd = _HttpServer(("127.0.0.1", 0), _Handler)
        if self.tls_context is not None:
            self._httpd.socket = self.tls_context.wrap_socket(self._httpd.socket, server_side=True)
        self._httpd.fake = self
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": 0.05})
        self._thread.daemon = True
        self._thread.start()
        return self

    def stop(self):
        if self._httpd is None:
            return
        self._stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)
        self._httpd = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # addresses
    @property
    def port(self):
        return self._httpd.server_address[1]

    @property
    def base(self):
        if self.tls_context is not None:
            return "https://localhost:%d" % self.port
        return "http://127.0.0.1:%d" % self.port

    # scripting and inspection
    def queue(self, *replies):
        with self._condition:
            self._replies.extend(replies)

    def wait_for_requests(self, count, timeout=10.0):
        with self._condition:
            return self._condition.wait_for(lambda: len(self.requests) >= count, timeout)

    @property
    def valid_requests(self):
        with self._condition:
            return [request for request in self.requests if not request.problems]

    @property
    def bodies(self):
        return [request.json for request in self.valid_requests]

    def describe(self):
        with self._condition:
            lines = ["fake %s got %d request(s), errors %r" % (self.name, len(self.requests),
                                                                self.errors)]
            lines.extend(self.describe_request(request) for request in self.requests)
        return "\n".join(lines)

    # the request handler (runs in the server's threads)
    def handle(self, handler):
        arrived = time.monotonic()
        body = self._read_body(handler)
        request = self.parse_request(handler.command, handler.path, handler.headers, body)
        with self._condition:
            number = len(self.requests) + 1
            self.requests.append(request)
            self.request_times.append(arrived)
            self.errors.extend("request %d: %s" % (number, p) for p in request.problems)
            reply = None
            if not request.problems and self._replies:
                reply = self._replies.popleft()
            self._condition.notify_all()
        if request.problems:
            reply = self.refusal_reply(request.problems)
        self._answer(handler, reply or self.ok_reply())

    @staticmethod
    def _read_body(handler):
        length = handler.headers.get("Content-Length")
        if length is None or not length.strip().isdigit():
            return b""
        return handler.rfile.read(int(length))

    def _answer(self, handler, reply):
        try:
            if reply.kind == "drop":
                handler.close_connection = True
                handler.connection.shutdown(socket.SHUT_RDWR)
                return
            if reply.kind == "hang":
                if self._stopping.wait(reply.seconds):
                    handler.close_connection = True
                    return
                reply = Reply.ok()
            handler.send_response(reply.status)
            if reply.kind == "redirect":
                location = reply.location or self.base + "/moved" + handler.path
                handler.send_header("Location", location)
            handler.send_header("Content-Type", reply.content_type)
            for name, value in reply.headers:
                handler.send_header(name, value)
            handler.send_header("Content-Length", str(len(reply.body)))
            handler.end_headers()
            if reply.kind == "drip":
                handler.wfile.flush()
                for index in range(len(reply.body)):
                    if self._stopping.wait(reply.seconds):
                        handler.close_connection = True
                        return
                    handler.wfile.write(reply.body[index:index + 1])
                    handler.wfile.flush()
                return
            handler.wfile.write(reply.body)
        except OSError:
            pass    # the client went away (timeout tests): nothing to answer


class FakeXxtui(FakeServer):
    """An xxtui stand-in on 127.0.0.1 that checks each request as notify-apis.md §2 says.

    Valid requests get the next queued Reply, or 200 {"code":0,"msg":"ok"} when none is
    queued; invalid ones get 400 and are not answered from the queue."""

    name = "xxtui"

    def __init__(self, key=KEY):
        FakeServer.__init__(self)
        self.key = key

    @property
    def url(self):
        """The `[xxtui] url` template pointing at this server."""
        return self.base + "/xxtui/{key}"

    def parse_request(self, method, path, headers, body):
        data, key, problems = self.check(method, path, headers, body)
        return Request(method, path, dict((k.lower(), v) for k, v in headers.items()),
                       body, data, key, problems)

    def check(self, method, path, headers, body):
        """Return (parsed body, key from the path, list of problems)."""
        problems = []
        if method != "POST":
            problems.append("method %s, expected POST" % method)
        key = None
        parts = urllib.parse.urlsplit(path)
        if parts.query:
            problems.append("unexpected query string")
        if not parts.path.startswith("/xxtui/"):
            problems.append("path does not start with /xxtui/")
        else:
            segment = parts.path[len("/xxtui/"):]
            if "/" in segment or not segment:
                problems.append("key is not exactly one path segment")
            try:
                key = urllib.parse.unquote(segment, errors="strict")
            except UnicodeDecodeError:
                problems.append("key segment is not UTF-8 when unquoted")
            if key != self.key:
                problems.append("wrong key in the path")
        problems.extend(self._check_headers(headers))
        if headers.get("Transfer-Encoding"):
            problems.append("chunked body, expected Content-Length")
        data = None
        try:
            data = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as error:
            problems.append("body is not UTF-8 JSON: %s" % error)
        if data is not None:
            problems.extend(self._check_fields(data))
        return data, key, problems

    @staticmethod
    def _check_headers(headers):
        problems = []
        content_type = headers.get("Content-Type") or ""
        parts = [part.strip().lower() for part in content_type.split(";")]
        if parts[0] != "application/json":
            problems.append("Content-Type %r, expected application/json" % content_type)
        for parameter in parts[1:]:
            if parameter.replace('"', "").replace(" ", "") not in ("charset=utf-8", ""):
                problems.append("Content-Type parameter %r" % parameter)
        agent = headers.get("User-Agent")
        if not agent:
            problems.append("no User-Agent")
        elif agent.startswith("Python-urllib"):
            problems.append("default User-Agent %r" % agent)
        return problems

    @staticmethod
    def _check_fields(data):
        if not isinstance(data, dict):
            return ["body is %s, expected a JSON object" % type(data).__name__]
        problems = []
        extra = sorted(set(data) - ALLOWED_FIELDS)
        if extra:
            problems.append("unexpected fields %s" % extra)
        if not isinstance(data.get("content"), str) or not data.get("content"):
            problems.append("content missing, empty or not a string")
        for name in ("title", "from"):
            if not isinstance(data.get(name), str):
                problems.append("%s missing or not a string" % name)
        if "channel" in data and not isinstance(data["channel"], str):
            problems.append("channel not a string")
        return problems


# --- a sealed environment per test ---

def sealed_env(base_env, home, hpcrun_home):
    """A copy of base_env with nothing of the user's hpcrun setup, proxies or scheduler."""
    env = {}
    for name, value in base_env.items():
        upper = name.upper()
        if upper.startswith("HPCRUN_") or upper == "XXTUI_KEY":
            continue
        if name.lower() in PROXY_NAMES:
            continue
        if upper.startswith(SCHEDULER_PREFIXES) or upper in SCHEDULER_NAMES:
            continue
        if upper in ("PYTHONUNBUFFERED", "PYTHONPATH", "PYTHONSTARTUP", "PYTHONIOENCODING",
                     "PYTHONUTF8", "PYTHONWARNINGS", "PYTHONDONTWRITEBYTECODE"):
            continue
        env[name] = value
    env.update({
        "HOME": home,
        "HPCRUN_HOME": hpcrun_home,
        "no_proxy": "*",
        "NO_PROXY": "*",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
    })
    env.setdefault("PATH", "/usr/bin:/bin")
    return env


def render_ini(sections):
    """{"section": {"key": "value"}} -> INI text."""
    lines = []
    for section, values in sections.items():
        lines.append("[%s]" % section)
        for key, value in values.items():
            lines.append("%s = %s" % (key, value))
        lines.append("")
    return "\n".join(lines)


def merge_sections(base, overrides):
    merged = collections.OrderedDict()
    for source in (base, overrides or {}):
        for section, values in source.items():
            merged.setdefault(section, collections.OrderedDict()).update(values)
    return merged


class Sandbox(object):
    """A temp dir with HOME, HPCRUN_HOME, a work dir and a sealed environment inside."""

    def __init__(self):
        self.root = os.path.realpath(tempfile.mkdtemp(prefix="hpcrun-test-"))
        self.home = self.path("home")
        self.work = self.path("work")
        self.hpcrun_home = self.path("home", ".hpcrun-state")
        os.makedirs(self.home)
        os.makedirs(self.work)
        self.config_dir = self.path("home", ".config", "hpcrun")
        self.config_path = os.path.join(self.config_dir, "config.ini")
        self.keys_path = os.path.join(self.config_dir, "api_keys.ini")
        self.secret_files = set()
        self.env = sealed_env(os.environ, self.home, self.hpcrun_home)

    def path(self, *parts):
        return os.path.join(self.root, *parts)

    def cleanup(self):
        shutil.rmtree(self.root, ignore_errors=True)

    def make_dir(self, *parts):
        path = self.path(*parts)
        os.makedirs(path, exist_ok=True)
        return path

    def write_file(self, path, text, mode=None, secret=True):
        if not os.path.isabs(path):
            path = self.path(path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        data = text if isinstance(text, bytes) else textwrap.dedent(text).encode("utf-8")
        with open(path, "wb") as handle:
            handle.write(data)
        if mode is not None:
            os.chmod(path, mode)
        if secret:
            self.secret_files.add(os.path.realpath(path))
        return path

    def write_config(self, text, path=None):
        """Write a config (default: ~/.config/hpcrun/config.ini, found without --config)."""
        if not isinstance(text, str):
            text = render_ini(text)
        return self.write_file(path or self.config_path, text)

    def write_keys(self, text, path=None, mode=0o600):
        if not isinstance(text, str):
            text = render_ini(text)
        return self.write_file(path or self.keys_path, text, mode=mode)

    def files(self):
        """Every file in the sandbox the test did not write as config or keys."""
        found = []
        for directory, _, names in os.walk(self.root):
            for name in names:
                path = os.path.realpath(os.path.join(directory, name))
                if path not in self.secret_files and os.path.isfile(path):
                    found.append(path)
        return found


# --- running hpcrun.py ---

class Result(collections.namedtuple("Result", "returncode stdout stderr")):
    """What a finished hpcrun printed (bytes) and its exit status."""

    argv = ()
    cwd = None
    env_notes = ()
    in_process = False

    @property
    def out(self):
        return self.stdout.decode("utf-8", "replace")

    @property
    def err(self):
        return self.stderr.decode("utf-8", "replace")

    def describe(self, limit=6000):
        def clip(text):
            return text if len(text) <= limit else "[... %d chars cut ...]\n%s" % (
                len(text) - limit, text[-limit:])
        if self.in_process:
            how, command = "ran in process", "hpcrun.main(%r)" % (list(self.argv[1:]),)
        else:
            how, command = "ran", " ".join(shlex.quote(arg) for arg in self.argv)
        return ("\n%s: (cd %s && %s%s)\nexit status: %s\n--- stdout ---\n%s\n--- stderr ---\n%s"
                "\n--- end ---" % (how, shlex.quote(self.cwd or "."), "".join(
                    "%s=%s " % (n, shlex.quote(v)) for n, v in self.env_notes),
                    command, self.returncode, clip(self.out), clip(self.err)))


def _make_result(argv, cwd, env, returncode, stdout, stderr, in_process=False):
    result = Result(returncode, stdout, stderr)
    result.argv = argv
    result.cwd = cwd
    result.in_process = in_process
    result.env_notes = sorted((n, v) for n, v in (env or {}).items()
                              if n.startswith("HPCRUN_") or n in ("XXTUI_KEY", "HOME"))
    return result


def hpcrun_argv(args, script=HPCRUN, python=sys.executable):
    return [python, script] + [str(arg) for arg in args]


def run_hpcrun(args, env, timeout=30, cwd=None, script=HPCRUN, preexec_fn=None):
    """Run hpcrun.py to the end; return Result(returncode, stdout, stderr).

    preexec_fn runs in the child before hpcrun.py starts (limits, capabilities)."""
    argv = hpcrun_argv(args, script)
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, cwd=cwd, start_new_session=True,
                            preexec_fn=preexec_fn)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        stdout, stderr = proc.communicate()
        result = _make_result(argv, cwd, env, None, stdout, stderr)
        raise AssertionError("hpcrun did not finish within %ss%s" % (timeout, result.describe()))
    return _make_result(argv, cwd, env, proc.returncode, stdout, stderr)


def kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError as error:
        if error.errno != errno.ESRCH:
            raise


# --- running hpcrun.main in this process (the fast layer) ---

# The signals whose handlers hpcrun sets (and restores); the in-process runner restores them too.
HPCRUN_SIGNALS = tuple(getattr(signal, name) for name in (
    "SIGTERM", "SIGINT", "SIGHUP", "SIGXCPU", "SIGUSR1", "SIGUSR2") if hasattr(signal, name))
# Commands that need a real process: the relay of the training's output, signals, a subreaper.
PROCESS_COMMANDS = ("wrap", "run")


class InProcessTimeout(BaseException):
    """hpcrun.main in this process ran past its time (a BaseException: hpcrun catches Exception)."""


@contextlib.contextmanager
def process_env(env, cwd=None):
    """This process as hpcrun in a subprocess would see it: os.environ is env and nothing else
    (HOME, HPCRUN_HOME, PATH...), cwd the working directory; both, and the handlers of the
    signals hpcrun handles, are restored afterwards."""
    handlers = dict((number, signal.getsignal(number)) for number in HPCRUN_SIGNALS)
    saved_cwd = os.getcwd()
    try:
        with mock.patch.dict(os.environ, env, clear=True):
            if cwd is not None:
                os.chdir(cwd)
            try:
                yield
            finally:
                os.chdir(saved_cwd)
    finally:
        for number, handler in handlers.items():
            if handler is not None:
                signal.signal(number, handler)


@contextlib.contextmanager
def time_limit(seconds):
    """InProcessTimeout in the main thread once `seconds` passed (SIGALRM; a wait in a system
    call is cut, a long computation in C is not: what must not hang belongs to the process
    layer, where a hang is killed)."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(number, frame):
        raise InProcessTimeout()
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def exit_status(code, stderr):
    """The exit status of a process that raised SystemExit(code)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    stderr.write("%s\n" % (code,))
    return 1


def run_in_process(args, env, timeout=30, cwd=None, script=HPCRUN):
    """hpcrun.main(args) in this process; Result(returncode, stdout, stderr) as a subprocess
    would give it: stdout and stderr captured as bytes (emit() writes to sys.stdout.buffer),
    SystemExit turned into the exit status, an uncaught exception into a traceback on stderr
    and status 1. Not for a wrap or run that starts a training (PROCESS_COMMANDS: the relay,
    signal handlers, a child subreaper): InProcess refuses those; a usage error is fine."""
    args = [str(arg) for arg in args]
    module = load_hpcrun(script)
    out, err = io.BytesIO(), io.BytesIO()
    stdout = io.TextIOWrapper(out, encoding="utf-8", errors="surrogateescape", write_through=True)
    stderr = io.TextIOWrapper(err, encoding="utf-8", errors="surrogateescape", write_through=True)
    saved = sys.stdout, sys.stderr
    returncode, timed_out = None, False
    sys.stdout, sys.stderr = stdout, stderr
    try:
        with process_env(env, cwd), time_limit(timeout):
            try:
                returncode = module.main(args)
            except SystemExit as stop:
                returncode = exit_status(stop.code, stderr)
            except Exception:
                traceback.print_exc(file=stderr)
                returncode = 1
    except InProcessTimeout:
        timed_out = True
    finally:
        stdout.flush()
        stderr.flush()
        sys.stdout, sys.stderr = saved
    result = _make_result(["hpcrun.main"] + args, cwd, env, returncode, out.getvalue(),
                          err.getvalue(), in_process=True)
    if timed_out:
        raise AssertionError("hpcrun did not finish within %ss%s" % (timeout, result.describe()))
    return result


class InProcess(object):
    """Mixed into an HpcrunTestCase (before it): self.hpcrun(...) calls hpcrun.main([...]) in
    this process instead of running hpcrun.py. A background hpcrun, wrap and run need a real
    process: they fail here."""

    def hpcrun(self, *args, **options):
        if args and str(args[0]) in PROCESS_COMMANDS:
            raise AssertionError("hpcrun %s needs a real process (the relay, signals, a child "
                                 "subreaper): it belongs to a process-layer test" % args[0])
        env = options.pop("env", None) or self.env
        options.setdefault("cwd", self.sb.root)
        result = run_in_process(args, env, **options)
        self.results.append(result)
        return result

    def start(self, *args, **options):
        raise AssertionError("a background hpcrun needs a real process: it belongs to a "
                             "process-layer test")


# --- clocks a test moves by hand ---

class FakeClock(object):
    """A clock the test moves: call it for the time, advance() moves it on."""

    def __init__(self, start=1000.0):
        self.now = start

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


class MonitorTime(object):
    """The two clocks of a hpcrun.Monitor moved together: now (epoch seconds, for time limits,
    reminders and retries) and clock (monotonic seconds, for heartbeats and output)."""

    def __init__(self, epoch=None):
        self.now = FakeClock(time.time() if epoch is None else epoch)
        self.clock = FakeClock(1000.0)

    def advance(self, seconds):
        self.now.advance(seconds)
        self.clock.advance(seconds)


class TickingMonitor(object):
    """A long-running monitor in this process, its clocks moved by the test: hpcrun.Monitor
    built as `hpcrun monitor --work-dir ...` builds it (the config found from env, its
    channels), polled first by start(), then once per tick() after `interval` seconds pass on
    its clocks, as the monitor's loop does. What it logs is in `lines`; arrivals() says when,
    on its clock, each push of a fake server arrived."""

    def __init__(self, work_dirs, env, cwd=None, interval=0.25, config=None, clocks=None,
                 marks=None):
        self.hpcrun = load_hpcrun()
        self.env = dict(env)
        self.cwd = cwd
        self.work_dirs = [os.path.abspath(work) for work in work_dirs]
        self.interval = float(interval)
        self.time = clocks or MonitorTime()      # a MonitorTime several monitors may share
        self.lines = []
        self.polls = 0
        # (fake server, requests it had after a poll, now() then): monitors sharing clocks
        # share these too, so that arrivals() knows every poll that may have pushed
        self.marks = [] if marks is None else marks
        self.servers = []
        with process_env(self.env, cwd):
            self.config = self.hpcrun.load_config(config, {"monitor": {"interval": self.interval}})
            channels = self.hpcrun.resolve_channels(self.config)
        self.monitor = self.hpcrun.Monitor(self.config, channels, self.lines.append,
                                           now=self.time.now, clock=self.time.clock, env=self.env)

    def watch(self, *servers):
        """Note, after each poll, the pushes these fake servers got (for arrivals())."""
        self.servers.extend(servers)
        return self

    def start(self):
        return self.poll()

    def poll(self):
        with process_env(self.env, self.cwd):
            counts = self.monitor.poll(self.work_dirs)
        self.polls += 1
        for server in self.servers:
            self.marks.append((server, len(server.requests), self.time.now()))
        return counts

    def tick(self, count=1):
        """`count` times: interval seconds pass on the monitor's clocks, then it polls."""
        for _ in range(count):
            self.time.advance(self.interval)
            counts = self.poll()
        return counts

    def until(self, predicate, seconds):
        """Tick until predicate() is true or `seconds` passed on the monitor's clocks; return
        predicate's last value."""
        value = predicate()
        for _ in range(int(seconds / self.interval)):
            if value:
                break
            self.tick()
            value = predicate()
        return value

    def arrivals(self, server):
        """now() of the poll that sent each request `server` got, in order."""
        times = []
        for watched, count, when in self.marks:
            if watched is server:
                times.extend([when] * (count - len(times)))
        return times

    @property
    def log(self):
        return "".join(line + "\n" for line in self.lines)

    def result(self):
        """What it logged, as the Result of a monitor process that ended well."""
        return _make_result(["hpcrun.Monitor"] + ["--work-dir=" + w for w in self.work_dirs],
                            self.cwd, self.env, 0, self.log.encode("utf-8"), b"", in_process=True)


class Background(object):
    """hpcrun.py running in the background, output going to files in the sandbox."""

    def __init__(self, args, env, cwd, out_dir, script=HPCRUN, preexec_fn=None, prefix=()):
        self.argv = list(prefix) + hpcrun_argv(args, script)
        self.env = env
        self.cwd = cwd
        fd, self.stdout_path = tempfile.mkstemp(prefix="stdout-", dir=out_dir)
        os.close(fd)
        fd, self.stderr_path = tempfile.mkstemp(prefix="stderr-", dir=out_dir)
        os.close(fd)
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=err, env=env, cwd=cwd,
                                         start_new_session=True, preexec_fn=preexec_fn)

    def read_stdout(self):
        with open(self.stdout_path, "rb") as handle:
            return handle.read()

    def read_stderr(self):
        with open(self.stderr_path, "rb") as handle:
            return handle.read()

    def result(self):
        return _make_result(self.argv, self.cwd, self.env, self.proc.returncode,
                            self.read_stdout(), self.read_stderr())

    def finish(self, timeout=30):
        """Wait for the end; return the Result (fails the test on timeout)."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            kill_group(self.proc)
            self.proc.wait()
            raise AssertionError("hpcrun did not finish within %ss%s"
                                 % (timeout, self.result().describe()))
        return self.result()

    def kill(self):
        if self.proc.poll() is None:
            kill_group(self.proc)
            self.proc.wait()


# --- records on disk ---

def state_dir(work_dir, state):
    return os.path.join(work_dir, ".hpcrun", state)


def record_names(work_dir, state):
    try:
        return sorted(os.listdir(state_dir(work_dir, state)))
    except OSError:
        return []


def read_records(work_dir, state):
    """{run_id: record} for the *.json files in DIR/.hpcrun/<state>/."""
    records = {}
    for name in record_names(work_dir, state):
        if name.endswith(".json"):
            with open(os.path.join(state_dir(work_dir, state), name), "rb") as handle:
                records[name[:-len(".json")]] = json.loads(handle.read().decode("utf-8"))
    return records


def log_files(work_dir, log_dir="logs"):
    try:
        return sorted(os.listdir(os.path.join(work_dir, log_dir)))
    except OSError:
        return []


def read_bytes(path):
    with open(path, "rb") as handle:
        return handle.read()


def sha256_of(path):
    return hashlib.sha256(read_bytes(path)).hexdigest()


# --- the base test case ---

class HpcrunTestCase(unittest.TestCase):
    """A sandbox per test; helpers that explain themselves when they fail."""

    maxDiff = None

    def setUp(self):
        self.sb = Sandbox()
        self.addCleanup(self.sb.cleanup)
        self.env = self.sb.env
        self.results = []
        self.secrets = []
        self.server = None
        self.failureException = self._failure_with_context()

    def _failure_with_context(self):
        """Every failed assertion also shows what this test ran and what that printed."""
        test = self

        class HpcrunFailure(AssertionError):
            def __init__(self, message=""):
                message = str(message)
                if "\nran: (" not in message and "\nran in process: (" not in message:
                    message += test.context()
                super(HpcrunFailure, self).__init__(message)
        HpcrunFailure.__module__ = "builtins"
        HpcrunFailure.__qualname__ = HpcrunFailure.__name__ = "AssertionError"
        return HpcrunFailure

    def context(self):
        results = self.results + [b.result() for b in self.background_runs
                                  if b.proc.poll() is not None]
        if not results:
            return ""
        earlier = "".join("\nalso ran (exit %s): %s" % (r.returncode, " ".join(
            shlex.quote(a) for a in r.argv[1:])) for r in results[:-1])
        return earlier + "\nlast run:" + results[-1].describe(limit=3000)

    # running
    def hpcrun(self, *args, **options):
        env = options.pop("env", None) or self.env
        options.setdefault("cwd", self.sb.root)
        result = run_hpcrun(args, env, **options)
        self.results.append(result)
        return result

    def start(self, *args, **options):
        env = options.pop("env", None) or self.env
        options.setdefault("cwd", self.sb.root)
        background = Background(args, env, options.pop("cwd"), self.sb.root, **options)
        self.addCleanup(background.kill)
        self.background_runs.append(background)
        return background

    @property
    def background_runs(self):
        if not hasattr(self, "_background_runs"):
            self._background_runs = []
        return self._background_runs

    def finish(self, background, timeout=30):
        result = background.finish(timeout)
        self.results.append(result)
        return result

    def wrap(self, *command, **options):
        """wrap --work-dir WORK (--command CMD | -- PROGRAM ARG...) and return the Result."""
        work = options.pop("work", self.sb.work)
        extra = list(options.pop("extra", ()))
        return self.hpcrun("wrap", "--work-dir", work, *(extra + self._command_args(command)),
                           **options)

    def start_wrap(self, *command, **options):
        work = options.pop("work", self.sb.work)
        extra = list(options.pop("extra", ()))
        return self.start("wrap", "--work-dir", work, *(extra + self._command_args(command)),
                          **options)

    @staticmethod
    def _command_args(command):
        if len(command) == 1:
            return ["--command", command[0]]
        return ["--"] + list(command)

    # the fake service and its config
    def start_server(self, key=KEY):
        server = FakeXxtui(key).start()
        self.addCleanup(server.stop)
        self.server = server
        return server

    def configure_xxtui(self, server=None, key=KEY, overrides=None, key_in="keys"):
        """Write config (and keys file) sending to the fake server; returns the config path."""
        server = server or self.server or self.start_server(key)
        sections = collections.OrderedDict([
            ("notify", collections.OrderedDict([("channels", "xxtui"), ("language", "en")])),
            ("xxtui", collections.OrderedDict([("url", server.url), ("timeout", "5")])),
        ])
        if key_in == "config":
            sections["xxtui"]["api_key"] = key
        elif key_in == "keys":
            self.sb.write_keys({"xxtui": {"api_key": key}})
        elif key_in == "env":
            self.env["XXTUI_KEY"] = key
        self.secrets.append(key)
        return self.sb.write_config(merge_sections(sections, overrides))

    # assertions
    def assertExit(self, result, code):
        if result.returncode != code:
            self.fail("exit status %s, expected %s%s"
                      % (result.returncode, code, result.describe()))

    def assertNoTraceback(self, result):
        for stream in (result.out, result.err):
            self.assertNotIn("Traceback (most recent call last)", stream, result.describe())

    def assertOneErrorLine(self, result, *needles):
        """stderr holds exactly one `hpcrun: error: ...` line, containing every needle."""
        self.assertNoTraceback(result)
        lines = [line for line in result.err.splitlines() if line.startswith("hpcrun: error: ")]
        self.assertEqual(len(lines), 1, "expected one 'hpcrun: error: ' line" + result.describe())
        for needle in needles:
            self.assertIn(needle, lines[0], result.describe())
        return lines[0]

    def assertServerClean(self, server=None):
        server = server or self.server
        self.assertEqual(server.errors, [], server.describe())

    def assertRequestCount(self, count, server=None, context=None):
        server = server or self.server
        explanation = server.describe() + (context.describe() if context is not None else "")
        self.assertEqual(len(server.requests), count, explanation)

    def assertSecretsKept(self, secrets=None):
        """No key (raw or url-quoted) in any output of this test or any file it did not write."""
        forms = set()
        for secret in secrets or self.secrets:
            forms.add(secret.encode("utf-8"))
            forms.add(urllib.parse.quote(secret, safe="").encode("ascii"))
        self.assertTrue(forms, "no secret to look for")
        results = self.results + [b.result() for b in self.background_runs]
        for result in results:
            for form in forms:
                for name, stream in (("stdout", result.stdout), ("stderr", result.stderr)):
                    if form in stream:
                        self.fail("key in %s of a run%s" % (name, result.describe()))
        for path in self.sb.files():
            try:
                data = read_bytes(path)
            except FileNotFoundError:
                continue  # a temporary file renamed away while we looked (a monitor still runs)
            for form in forms:
                if form in data:
                    self.fail("key in the file %s:\n%r" % (path, data[:2000]))

    def assertTimestampedLine(self, text, *needles):
        """Some line of text starts with an ISO-8601 timestamp and contains one of needles."""
        for line in text.splitlines():
            if ISO_LINE_RE.match(line) and any(n in line for n in needles):
                return line
        self.fail("no timestamped line mentioning %r in:\n%s" % (needles, text))

    # records
    def done(self, work=None):
        return read_records(work or self.sb.work, "done")

    def sent(self, work=None):
        return read_records(work or self.sb.work, "sent")

    def only_record(self, state="done", work=None, result=None):
        records = read_records(work or self.sb.work, state)
        context = result.describe() if result is not None else ""
        self.assertEqual(len(records), 1, "records in %s/: %r%s" % (state, records, context))
        return list(records.items())[0]

    def only_log(self, work=None, log_dir="logs", result=None):
        names = log_files(work or self.sb.work, log_dir)
        context = result.describe() if result is not None else ""
        self.assertEqual(len(names), 1, "logs in %s/: %r%s" % (log_dir, names, context))
        self.assertRegex(names[0], LOG_NAME_RE)
        return os.path.join(work or self.sb.work, log_dir, names[0])
