"""Every push channel in process: notify --test through hpcrun.main([...]) against local fakes
that check each request the way reference/notify-apis.md describes the service, several
channels and labels, TLS and proxies, e-mail, settings a service would refuse, and the
signing and sending helpers.

The reports of wrapped runs, which need the real wrap, are in test_channels_e2e.py."""

import base64
import collections
import configparser
import email.header
import email.utils
import json
import os
import re
import sys
import unittest

from support import (HpcrunTestCase, InProcess, Reply, load_hpcrun, merge_sections, read_records,
                     run_in_process)
from fakes import (Services, dingtalk_expected_sign, feishu_expected_sign, sent_text,
                   server_tls_context, start_service, start_smtp, temp_certificate)

LAYER = "fast"

# A log of long Chinese lines: 240 lines of 205 characters, about 49 000 characters or
# 147 KB of UTF-8, more than any channel takes.
CHINESE_LOG_LINES = 240
CHINESE_LOG = (
    "import sys\n"
    "for i in range(1, %d):\n"
    "    sys.stdout.buffer.write(('第%%03d行：' %% i + '训练损失稳步下降，验证集准确率持续提升。' * 10"
    " + '\\n').encode('utf-8'))\n" % (CHINESE_LOG_LINES + 1))
CHINESE_NAME = "长日志训练"


def chinese_line(number):
    return "第%03d行：" % number + "训练损失稳步下降，验证集准确率持续提升。" * 10


# --- what each channel is, where its fake listens, and how the service answers errors ---

ErrorCase = collections.namedtuple("ErrorCase", "label reply needles retryable delay")
Setup = collections.namedtuple("Setup", "server section keys secrets")
PERMANENT = "1h23m"      # retry_max 5000 s: an answer no retry will fix
AT_ONCE = "0s"           # retry_base 0: a retryable failure is retried at the next poll


def error(label, reply, needles, retryable, delay=None):
    return ErrorCase(label, reply, needles, retryable, delay or (AT_ONCE if retryable else PERMANENT))


class Channel(object):
    """One channel type: its fake, its settings and secrets, its limits, its error answers."""

    kind = None
    limits = ()          # (what, number, unit): what is "text", "title" or "body"
    max_chars = 100000   # [report] max_chars for the limit test
    errors = ()

    def start(self, test):
        raise NotImplementedError


def service(test, kind, *args):
    check, success = getattr(Services, kind)(*args)
    return start_service(test, kind, check, success)


class ServerChanTurbo(Channel):
    kind = "serverchan"
    key = "SCT4242TESTSENDKEYq9"
    limits = (("title", 32, "chars"), ("desp", 32768, "bytes"))
    errors = (
        error("bad key", Reply.json({"message": "[AUTH]错误的Key", "code": 40001, "info": "错误的Key",
                                     "args": [None], "scode": 461}, 400),
              [r"\b400\b", r"\b40001\b", "错误的Key"], False),
        error("empty title", Reply.json({"message": "[INPUT]title 不能为空", "code": 20001,
                                         "scode": 460}, 400),
              [r"\b400\b", r"\b20001\b", "title 不能为空"], False),
        error("server error", Reply.raw(502, "<html>502 Bad Gateway</html>", "text/html"),
              [r"\b502\b"], True),
    )

    def start(self, test):
        server = service(test, "serverchan", self.key, "/%s.send" % self.key)
        return Setup(server, {"url": server.base + "/{key}.send"}, {"key": self.key}, [self.key])


class ServerChan3(ServerChanTurbo):
    key = "sctp90210tTESTSENDKEYz3"
    errors = ServerChanTurbo.errors[:1]

    def start(self, test):
        server = service(test, "serverchan", self.key, "/u90210/send/%s.send" % self.key)
        return Setup(server, {"url": server.base + "/u{uid}/send/{key}.send"}, {"key": self.key},
                     [self.key])


class PushPlus(Channel):
    kind = "pushplus"
    token = "pp7TESTTOKEN5a1f"
    limits = (("text", 20000, "chars"), ("title", 200, "chars"))
    errors = (
        error("invalid token", Reply.json({"code": 903, "msg": "无效的用户token", "data": None}),
              [r"HTTP 200", r"\b903\b", "无效的用户token"], False),
        error("too many requests", Reply.json({"code": 900, "msg": "用户账号使用受限", "data": None}),
              [r"\b900\b", "用户账号使用受限"], False),
        error("system error", Reply.json({"code": 500, "msg": "系统错误", "data": None}),
              [r"\b500\b", "系统错误"], True),
    )

    def start(self, test):
        server = service(test, "pushplus", self.token)
        return Setup(server, {"url": server.base + "/send"}, {"token": self.token}, [self.token])


class Bark(Channel):
    kind = "bark"
    device_key = "barkTESTDEVICEk3y9"
    limits = (("text", 3000, "bytes"), ("body", 4096, "bytes"))
    errors = (
        error("bad device key", Reply.json({"code": 400, "message": "failed to get device token: "
                                            "device not registered", "timestamp": 1700000000}, 400),
              [r"\b400\b", "failed to get device token"], False),
        error("push failed", Reply.json({"code": 500, "message": "push failed: APNs down",
                                         "timestamp": 1700000000}, 500),
              [r"\b500\b", "push failed: APNs down"], True),
    )

    def start(self, test):
        server = service(test, "bark", self.device_key)
        return Setup(server, {"url": server.base}, {"device_key": self.device_key},
                     [self.device_key])


class Feishu(Channel):
    kind = "feishu"
    token = "fs-TEST-0a1b-hook-77"
    secret = "SECfeishuTEST99"
    limits = (("body", 20480, "bytes"),)
    errors = (
        error("bad signature", Reply.json({"code": 19021, "data": {}, "msg": "sign match fail or "
                                           "timestamp is not within one hour from current time"}),
              [r"HTTP 200", r"\b19021\b", "sign match fail"], False),
        error("bad token", Reply.json({"code": 19001, "data": {}, "msg": "param invalid: incoming "
                                       "webhook access token invalid"}),
              [r"\b19001\b", "access token invalid"], False),
        error("frequency limit", Reply.json({"code": 11232, "data": {}, "msg": "frequency limited"}),
              [r"\b11232\b", "frequency limited"], True),
    )

    def start(self, test):
        server = service(test, "feishu", self.token, self.secret)
        return Setup(server, {"url": server.base + "/open-apis/bot/v2/hook/{token}"},
                     {"token": self.token, "secret": self.secret}, [self.token, self.secret])


class DingTalk(Channel):
    kind = "dingtalk"
    access_token = "dtTESTACCESStoken42"
    secret = "SECdingTEST+/=88"
    limits = (("body", 20480, "bytes"),)
    errors = (
        error("keyword missing", Reply.json({"errcode": 310000, "errmsg": "keywords not in content"}),
              [r"HTTP 200", r"\b310000\b", "keywords not in content"], False),
        error("bad token", Reply.json({"errcode": 300005, "errmsg": "token is not exist"}),
              [r"\b300005\b", "token is not exist"], False),
        error("too fast", Reply.json({"errcode": 130101, "errmsg": "send too fast, exceed 20 "
                                      "times per minute"}),
              [r"\b130101\b", "send too fast"], True),
    )

    def start(self, test):
        server = service(test, "dingtalk", self.access_token, self.secret)
        return Setup(server, {"url": server.base + "/robot/send"},
                     {"access_token": self.access_token, "secret": self.secret},
                     [self.access_token, self.secret])


class WeCom(Channel):
    kind = "wecom"
    key = "wc-TEST-KEY-693a91"
    limits = (("text", 2048, "bytes"),)
    errors = (
        error("invalid url", Reply.json({"errcode": 93000, "errmsg": "invalid webhook url, hint: "
                                         "[1700000000_1_abc]"}),
              [r"HTTP 200", r"\b93000\b", "invalid webhook url"], False),
        error("invalid key", Reply.json({"errcode": 40058, "errmsg": "invalid param 'key'"}),
              [r"\b40058\b", "invalid param"], False),
        error("frequency", Reply.json({"errcode": 45009, "errmsg": "api freq out of limit"}),
              [r"\b45009\b", "api freq out of limit"], True),
    )

    def start(self, test):
        server = service(test, "wecom", self.key)
        return Setup(server, {"url": server.base + "/cgi-bin/webhook/send"}, {"key": self.key},
                     [self.key])


class Ntfy(Channel):
    kind = "ntfy"
    topic = "hpcrun-TESTTOPIC-x81"
    token = "tk_TESTntfytoken00001"
    limits = (("text", 4096, "bytes"),)
    errors = (
        error("forbidden", Reply.json({"code": 40301, "http": 403, "error": "forbidden",
                                       "link": "https://ntfy.sh/docs/publish/#authentication"}, 403),
              [r"\b403\b", r"\b40301\b", "forbidden"], False),
        error("quota", Reply.with_headers(Reply.json({"code": 42908, "http": 429, "error": "limit "
                                                      "reached: daily message quota reached"}, 429),
                                          Retry_After="45"),
              [r"\b429\b", r"\b42908\b", "daily message quota"], True, "45s"),
        error("too large", Reply.json({"code": 41303, "http": 413, "error": "JSON body too large"},
                                      413),
              [r"\b413\b", r"\b41303\b", "JSON body too large"], False),
    )

    def start(self, test):
        server = service(test, "ntfy", self.topic, "Bearer " + self.token)
        return Setup(server, {"url": server.base}, {"topic": self.topic, "token": self.token},
                     [self.topic, self.token])


class NtfyBasic(Ntfy):
    user = "alice"
    password = "pwTESTntfy77"
    errors = Ntfy.errors[:1]

    def start(self, test):
        basic = "Basic " + base64.b64encode(b"alice:pwTESTntfy77").decode("ascii")
        server = service(test, "ntfy", self.topic, basic)
        return Setup(server, {"url": server.base + "/"},
                     {"topic": self.topic, "user": self.user, "password": self.password},
                     [self.topic, self.password])


class Slack(Channel):
    kind = "slack"
    path = "/services/T000TEST/B000TEST/SLACKTESTsecret99"
    limits = (("text", 40000, "chars"),)
    errors = (
        error("invalid token", Reply.raw(403, "invalid_token"), [r"\b403\b", "invalid_token"], False),
        error("no service", Reply.raw(404, "no_service"), [r"\b404\b", "no_service"], False),
        error("server error", Reply.raw(500, "internal_error"), [r"\b500\b", "internal_error"], True),
    )

    def start(self, test):
        server = service(test, "slack", self.path)
        url = server.base + self.path
        return Setup(server, {}, {"url": url}, [url, "SLACKTESTsecret99"])


class Discord(Channel):
    kind = "discord"
    path = "/api/webhooks/123456/DISCORDTESTtoken77"
    limits = (("text", 2000, "chars"),)
    errors = (
        error("invalid token", Reply.json({"message": "Invalid Webhook Token", "code": 50027}, 401),
              [r"\b401\b", r"\b50027\b", "Invalid Webhook Token"], False),
        error("unknown webhook", Reply.json({"message": "Unknown Webhook", "code": 10015}, 404),
              [r"\b404\b", r"\b10015\b", "Unknown Webhook"], False),
        error("rate limited", Reply.json({"message": "You are being rate limited.",
                                          "retry_after": 90.0, "global": False}, 429),
              [r"\b429\b", "rate limited"], True, "1m30s"),
    )

    def start(self, test):
        server = service(test, "discord", self.path)
        url = server.base + self.path
        return Setup(server, {}, {"url": url}, [url, "DISCORDTESTtoken77"])


class Telegram(Channel):
    kind = "telegram"
    token = "123456:TESTtelegramTOKENab"
    limits = (("text", 4096, "chars"),)
    errors = (
        error("unauthorized", Reply.json({"ok": False, "error_code": 401,
                                          "description": "Unauthorized"}, 401),
              [r"\b401\b", "Unauthorized"], False),
        error("chat not found", Reply.json({"ok": False, "error_code": 400,
                                            "description": "Bad Request: chat not found"}, 400),
              [r"\b400\b", "chat not found"], False),
        error("flood", Reply.json({"ok": False, "error_code": 429,
                                   "description": "Too Many Requests: retry after 120",
                                   "parameters": {"retry_after": 120}}, 429),
              [r"\b429\b", "Too Many Requests"], True, "2m00s"),
    )

    def start(self, test):
        server = service(test, "telegram", self.token, -100200300)
        return Setup(server, {"url": server.base, "chat_id": "-100200300"},
                     {"token": self.token}, [self.token])


class Pushover(Channel):
    kind = "pushover"
    token = "poTESTapptoken55"
    user = "uTESTuserkey66"
    limits = (("text", 1024, "chars"), ("title", 250, "chars"))
    errors = (
        error("invalid token", Reply.json({"token": "invalid", "errors": [
            "application token is invalid, see https://pushover.net/api"], "status": 0,
            "request": "5042853c-402d-4a18-abcb-168734a801de"}, 400),
            [r"\b400\b", "application token is invalid"], False),
        error("server error", Reply.raw(503, "Service Unavailable"), [r"\b503\b"], True),
    )

    def start(self, test):
        server = service(test, "pushover", self.token, self.user)
        return Setup(server, {"url": server.base + "/1/messages.json"},
                     {"token": self.token, "user": self.user}, [self.token, self.user])


class Gotify(Channel):
    kind = "gotify"
    token = "AgTESTgotifyTok"
    max_chars = 3000
    limits = (("text", 3000, "chars"),)
    errors = (
        error("unauthorized", Reply.json({"error": "Unauthorized", "errorCode": 401,
                                          "errorDescription": "you need to provide a valid access "
                                          "token or user credentials to access this api"}, 401),
              [r"\b401\b", "valid access token"], False),
        error("server error", Reply.json({"error": "Internal Server Error", "errorCode": 500,
                                          "errorDescription": "database locked"}, 500),
              [r"\b500\b", "database locked"], True),
    )

    def start(self, test):
        server = service(test, "gotify", self.token)
        return Setup(server, {"url": server.base}, {"token": self.token}, [self.token])


class Webhook(Channel):
    kind = "webhook"
    bearer = "WHTESTbearer55"
    max_chars = 3000
    limits = (("text", 3000, "chars"),)
    fields = ("title", "content", "name", "status", "exit_code", "host")
    errors = (
        error("not found", Reply.raw(404, "no such hook"), [r"\b404\b", "no such hook"], False),
        error("server error", Reply.json({"code": 17, "message": "queue full"}, 500),
              [r"\b500\b", r"\b17\b", "queue full"], True),
    )

    def start(self, test):
        check, success = Services.webhook("PUT", "/hooks/TESTwebhookPATH9",
                                          {"Authorization": "Bearer " + self.bearer,
                                           "X-Source": "hpcrun"}, self.fields)
        server = start_service(test, "webhook", check, success)
        url = server.base + "/hooks/TESTwebhookPATH9"
        body = json.dumps({"title": "{title}", "content": "{content}", "name": "{name}",
                           "status": "{status}", "exit_code": "{exit_code}", "host": "{host}"})
        headers = "\n    Authorization: Bearer %s\n    X-Source: hpcrun" % self.bearer
        return Setup(server, {"method": "PUT", "body": body},
                     {"url": url, "headers": headers}, [url, self.bearer, "TESTwebhookPATH9"])


# --- the tests every HTTP channel passes ---

class ChannelTestCase(HpcrunTestCase):

    channel = None

    def setUp(self):
        HpcrunTestCase.setUp(self)
        self.retry_env = dict(self.env, HPCRUN_MONITOR_RETRY_BASE="0", HPCRUN_MONITOR_RETRY_MAX="5000")

    def configure(self, sections, keys, channels, report=None, language="zh", config_extra=None):
        """Config with [notify] channels and the given sections; secrets go to the keys file."""
        base = collections.OrderedDict([
            ("notify", collections.OrderedDict([("channels", channels), ("language", language)])),
            ("report", collections.OrderedDict(report or {})),
        ])
        self.sb.write_config(merge_sections(merge_sections(base, sections), config_extra))
        self.sb.write_keys(keys)

    def start_channel(self, channel, section=None):
        setup = channel.start(self)
        self.secrets.extend(setup.secrets)
        name = section or channel.kind
        return setup, {name: dict(setup.section, timeout="5")}, {name: setup.keys}

    def finished_run(self, command, name, work=None):
        work = work or self.sb.work
        before = set(read_records(work, "done"))
        result = self.wrap(command, work=work, extra=["--name", name])
        self.assertExit(result, 0)
        new = sorted(set(read_records(work, "done")) - before)
        self.assertEqual(len(new), 1, "no new completion record" + result.describe())
        return new[0], read_records(work, "done")[new[0]]

    def chinese_run(self, work=None):
        script = self.sb.write_file("chinese_log.py", CHINESE_LOG, secret=False)
        return self.finished_run("%s %s" % (sys.executable, script), CHINESE_NAME, work)

    def monitor_once(self, work=None, env=None):
        """monitor --once in this process (hpcrun.main), also after a real wrap: these tests
        look at what each service got; the monitor's own process is test_monitor.py's."""
        result = run_in_process(["monitor", "--once", "--work-dir", work or self.sb.work],
                                env or self.retry_env, cwd=self.sb.root)
        self.results.append(result)
        return result

    def assertLimits(self, kind, limits, request):
        title, text = sent_text(kind, request)
        for what, number, unit in limits:
            value = {"text": text, "title": title, "body": request.body,
                     "desp": (request.json or {}).get("desp")}[what]
            size = len(value) if unit == "chars" or isinstance(value, bytes) else \
                len(value.encode("utf-8"))
            self.assertLessEqual(size, number, "%s %s is %d %s, over %d" % (kind, what, size, unit,
                                                                            number))



class HttpChannelTests(object):
    """Mixed into one TestCase per channel below (its monitor reports: test_channels_e2e.py)."""

    def test_notify_test_sends_one_request_the_service_accepts_with_chinese_intact(self):
        setup, sections, keys = self.start_channel(self.channel)
        self.configure(sections, keys, self.channel.kind)
        result = self.hpcrun("notify", "--test")
        self.assertExit(result, 0)
        self.assertIn("%s: ok" % self.channel.kind, result.out)
        self.assertServerClean(setup.server)
        self.assertRequestCount(1, setup.server, result)
        title, text = sent_text(self.channel.kind, setup.server.requests[0])
        self.assertIn("🔔 hpcrun 测试消息", title if title is not None else text.split("\n")[0])
        self.assertIn("hpcrun 测试消息：通道 %s 工作正常" % self.channel.kind, text)
        self.assertSecretsKept()


def channel_test(channel_class):
    """A TestCase class running HttpChannelTests in process against one channel."""
    name = channel_class.__name__ + "ChannelTest"
    return type(name, (HttpChannelTests, InProcess, ChannelTestCase),
                {"channel": channel_class(), "__module__": __name__})


ServerChanTurboChannelTest = channel_test(ServerChanTurbo)
ServerChan3ChannelTest = channel_test(ServerChan3)
PushPlusChannelTest = channel_test(PushPlus)
BarkChannelTest = channel_test(Bark)
FeishuChannelTest = channel_test(Feishu)
DingTalkChannelTest = channel_test(DingTalk)
WeComChannelTest = channel_test(WeCom)
NtfyChannelTest = channel_test(Ntfy)
NtfyBasicChannelTest = channel_test(NtfyBasic)
SlackChannelTest = channel_test(Slack)
DiscordChannelTest = channel_test(Discord)
TelegramChannelTest = channel_test(Telegram)
PushoverChannelTest = channel_test(Pushover)
GotifyChannelTest = channel_test(Gotify)
WebhookChannelTest = channel_test(Webhook)


# --- several channels at once, labels, TLS, proxies ---

class SeveralChannelsTest(InProcess, ChannelTestCase):

    def test_two_labelled_feishu_bots_each_get_the_report_with_their_own_token_and_signature(self):
        lab = service(self, "feishu", "fs-LAB-token-0001", "SEClabTEST0001")
        me = service(self, "feishu", "fs-ME-token-0002")        # no signature set on this bot
        self.secrets.extend(["fs-LAB-token-0001", "SEClabTEST0001", "fs-ME-token-0002"])
        self.configure({"feishu:lab": {"url": lab.base + "/open-apis/bot/v2/hook/{token}"},
                        "feishu:me": {"url": me.base + "/open-apis/bot/v2/hook/{token}"}},
                       {"feishu:me": {"token": "fs-ME-token-0002"}}, "feishu:lab, feishu:me")
        env = dict(self.env, HPCRUN_FEISHU_LAB_TOKEN="fs-LAB-token-0001",
                   HPCRUN_FEISHU_LAB_SECRET="SEClabTEST0001")
        result = self.hpcrun("notify", "--test", env=env)
        self.assertExit(result, 0)
        self.assertIn("feishu:lab: ok", result.out)
        self.assertIn("feishu:me: ok", result.out)
        for server in (lab, me):
            self.assertServerClean(server)
            self.assertRequestCount(1, server, result)
        self.assertIn("timestamp", lab.requests[0].json)
        self.assertNotIn("sign", me.requests[0].json)
        self.assertSecretsKept()

    def test_a_missing_required_key_names_the_section_and_where_to_put_it(self):
        self.configure({"feishu:lab": {}, "email": {"to": "a@example.org"}}, {}, "feishu:lab")
        result = self.hpcrun("notify", "--test")
        self.assertOneErrorLine(result, "[feishu:lab] token", "HPCRUN_FEISHU_LAB_TOKEN", "keys file")
        self.configure({"email": {"to": "a@example.org"}}, {}, "email")
        result = self.hpcrun("notify", "--test")
        self.assertOneErrorLine(result, "[email] host", "HPCRUN_EMAIL_HOST", "config")

    def test_an_unknown_channel_type_is_named_with_the_known_ones(self):
        self.configure({}, {}, "wecom, pager:duty")
        result = self.hpcrun("notify", "--test")
        line = self.assertOneErrorLine(result, "pager:duty")
        for kind in ("serverchan", "pushplus", "bark", "feishu", "dingtalk", "wecom", "ntfy",
                     "slack", "discord", "telegram", "pushover", "gotify", "webhook", "email"):
            self.assertIn(kind, line)

    def test_webhook_get_puts_the_fields_url_quoted_into_the_url_and_sends_no_body(self):
        check, success = Services.webhook("GET", "/notify", {}, None)
        server = start_service(self, "webhook", check, success)
        self.configure({"webhook": {"url": server.base + "/notify?t={title}&s={status}",
                                    "method": "GET"}}, {}, "webhook")
        result = self.hpcrun("notify", "--test")
        self.assertExit(result, 0)
        self.assertServerClean(server)
        request = server.requests[0]
        self.assertEqual(request.query, {"t": ["🔔 hpcrun 测试消息"], "s": ["test"]})
        self.assertEqual(request.body, b"")

    def test_webhook_with_a_broken_body_template_fails_saying_so_without_retrying_soon(self):
        server = service(self, "gotify", "x")    # never reached
        self.configure({"webhook": {"url": server.base + "/x", "body": "{title: oops"}}, {},
                       "webhook")
        result = self.hpcrun("notify", "--test")
        self.assertExit(result, 1)
        self.assertRegex(result.out, r"webhook: failed: .*body template")
        self.assertRequestCount(0, server, result)

    def test_pushes_go_through_the_proxy_from_the_environment(self):
        check, success = Services.gotify("AgTESTgotifyTok")
        proxy = start_service(self, "gotify", check, success)
        self.secrets.append("AgTESTgotifyTok")
        self.configure({"gotify": {"url": "http://gotify.example.invalid"}},
                       {"gotify": {"token": "AgTESTgotifyTok"}}, "gotify")
        env = dict(self.env, http_proxy=proxy.base)
        for name in ("no_proxy", "NO_PROXY"):
            env.pop(name, None)
        result = self.hpcrun("notify", "--test", env=env)
        self.assertExit(result, 0)
        self.assertServerClean(proxy)
        self.assertEqual(proxy.requests[0].proxied_host, "gotify.example.invalid")
        self.assertEqual(proxy.requests[0].path, "/message")
        self.assertSecretsKept()


class CertificateTest(InProcess, ChannelTestCase):
    """A cluster with its own certificate authority: ca_file or SSL_CERT_FILE, never no check."""

    def start_https_gotify(self):
        cert, key = temp_certificate(self)
        check, success = Services.gotify("AgTESTgotifyTok")
        server = start_service(self, "gotify", check, success, server_tls_context(cert, key))
        self.secrets.append("AgTESTgotifyTok")
        return server, cert

    def test_an_unknown_certificate_authority_fails_the_push(self):
        server, cert = self.start_https_gotify()
        self.configure({"gotify": {"url": server.base}}, {"gotify": {"token": "AgTESTgotifyTok"}},
                       "gotify")
        result = self.hpcrun("notify", "--test")
        self.assertExit(result, 1)
        self.assertRegex(result.out, r"gotify: failed: .*(?i:certificate)")
        self.assertRequestCount(0, server, result)
        self.assertSecretsKept()

    def test_ca_file_relative_to_the_config_lets_the_push_through(self):
        server, cert = self.start_https_gotify()
        self.configure({"gotify": {"url": server.base}}, {"gotify": {"token": "AgTESTgotifyTok"}},
                       "gotify", config_extra={"notify": {"ca_file": "site-ca.pem"}})
        os.rename(cert, os.path.join(os.path.dirname(self.sb.config_path), "site-ca.pem"))
        result = self.hpcrun("notify", "--test")
        self.assertExit(result, 0)
        self.assertServerClean(server)
        self.assertRequestCount(1, server, result)

    def test_ssl_cert_file_from_the_environment_lets_the_push_through(self):
        server, cert = self.start_https_gotify()
        self.configure({"gotify": {"url": server.base}}, {"gotify": {"token": "AgTESTgotifyTok"}},
                       "gotify")
        result = self.hpcrun("notify", "--test", env=dict(self.env, SSL_CERT_FILE=cert))
        self.assertExit(result, 0)
        self.assertRequestCount(1, server, result)

    def test_a_missing_ca_file_is_named(self):
        self.configure({"gotify": {"url": "https://localhost:1"}},
                       {"gotify": {"token": "AgTESTgotifyTok"}}, "gotify",
                       config_extra={"notify": {"ca_file": "no-such-ca.pem"}})
        result = self.hpcrun("notify", "--test")
        self.assertExit(result, 1)
        self.assertIn("no-such-ca.pem", result.out)


class ChannelSettingsTest(InProcess, ChannelTestCase):
    """Settings a service would refuse at 3 a.m. are config errors when the monitor starts."""

    def test_ntfy_priority_takes_1_to_5_or_names_and_refuses_others(self):
        for value, good in (("4", True), ("high", True), ("MAX", True), ("0", False), ("7", False),
                            ("loud", False)):
            with self.subTest(value=value):
                self.configure({"ntfy": {"url": "http://127.0.0.1:9", "priority": value}},
                               {"ntfy": {"topic": "hpcrun-topic-TEST77"}}, "ntfy")
                result = self.hpcrun("monitor", "--once", "--work-dir", self.sb.work)
                if good:
                    self.assertNoTraceback(result)
                    self.assertNotIn("priority", result.err)
                else:
                    self.assertExit(result, 2)
                    self.assertOneErrorLine(result, "[ntfy] priority", value)

    def test_pushover_emergency_priority_needs_retry_and_expire(self):
        cases = [({"priority": "2"}, "retry"), ({"priority": "2", "retry": "60"}, "expire"),
                 ({"priority": "2", "retry": "10", "expire": "600"}, "retry"),
                 ({"priority": "2", "retry": "60", "expire": "99999"}, "expire"),
                 ({"priority": "3"}, "priority"), ({"priority": "2", "retry": "60", "expire": "600"}, None),
                 ({"priority": "-1"}, None)]
        for settings, missing in cases:
            with self.subTest(settings=settings):
                section = dict(settings, url="http://127.0.0.1:9")
                self.configure({"pushover": section}, {"pushover": {"token": "aTESTtoken", "user": "uTESTuser"}},
                               "pushover")
                result = self.hpcrun("monitor", "--once", "--work-dir", self.sb.work)
                if missing:
                    self.assertExit(result, 2)
                    self.assertOneErrorLine(result, "[pushover]", missing)
                else:
                    self.assertNoTraceback(result)
                    self.assertNotIn("[pushover]", result.err)

    def test_pushover_emergency_sends_retry_and_expire(self):
        setup, sections, keys = self.start_channel(Pushover())
        sections["pushover"].update(priority="2", retry="60", expire="3600")
        self.configure(sections, keys, "pushover")
        self.assertExit(self.hpcrun("notify", "--test"), 0)
        form = setup.server.requests[-1].form
        self.assertEqual((form["priority"], form["retry"], form["expire"]), (["2"], ["60"], ["3600"]))


# --- e-mail ---

class EmailTestCase(ChannelTestCase):

    user = "me@qq.example"
    password = "QQTESTauthcode77"

    def configure_email(self, smtp, security="none", extra=None, notify=None):
        section = {"host": "127.0.0.1", "port": str(smtp.port), "security": security,
                   "to": "you@example.org, advisor@example.org", "timeout": "5"}
        section.update(extra or {})
        keys = {"user": self.user, "password": self.password}
        self.secrets.append(self.password)
        self.configure({"email": section}, {"email": keys}, "email",
                       report={"include_last_n_lines": str(CHINESE_LOG_LINES), "max_chars": "5000"},
                       config_extra={"notify": notify or {}})

    def only_message(self, smtp, result):
        self.assertTrue(smtp.wait_for_messages(1, 2), smtp.describe() + result.describe())
        self.assertEqual(smtp.errors, [], smtp.describe())
        self.assertEqual(len(smtp.messages), 1, smtp.describe())
        return smtp.messages[0]


class EmailTest(InProcess, EmailTestCase):

    def test_notify_test_logs_in_and_sends_utf8_subject_and_body_from_the_login(self):
        smtp = start_smtp(self, user=self.user, password=self.password)
        self.configure_email(smtp)
        result = self.hpcrun("notify", "--test")
        self.assertExit(result, 0)
        self.assertIn("email: ok", result.out)
        message = self.only_message(smtp, result)
        self.assertEqual(message.login, self.user)
        self.assertEqual(message.mail_from, self.user)
        self.assertEqual(message.rcpt_to, ["you@example.org", "advisor@example.org"])
        self.assertEqual(message.subject, "🔔 hpcrun 测试消息")
        self.assertIn("hpcrun 测试消息：通道 email 工作正常", message.body)
        self.assertSecretsKept()

    def test_chinese_display_names_are_encoded_around_each_address(self):
        smtp = start_smtp(self, user=self.user, password=self.password)
        self.configure_email(smtp, extra={"from": "训练通知 <%s>" % self.user,
                                          "to": "张三 <you@example.org>; \"Doe, John\" <advisor@example.org>"})
        result = self.hpcrun("notify", "--test")
        self.assertExit(result, 0)
        message = self.only_message(smtp, result)
        self.assertEqual(message.mail_from, self.user)
        self.assertEqual(message.rcpt_to, ["you@example.org", "advisor@example.org"])
        head = message.data.split(b"\r\n\r\n", 1)[0]
        head.decode("ascii")                 # RFC 5322 headers: ASCII, names as RFC 2047 words
        names = [(str(email.header.make_header(email.header.decode_header(name))), address)
                 for name, address in email.utils.getaddresses(message.message.get_all("To"))]
        self.assertEqual(names, [("张三", "you@example.org"), ("Doe, John", "advisor@example.org")])
        sender = email.utils.parseaddr(message.message["From"])
        self.assertEqual(str(email.header.make_header(email.header.decode_header(sender[0]))), "训练通知")
        self.assertTrue(message.message["Message-ID"].endswith("@qq.example>"), message.message["Message-ID"])

    def test_login_works_with_auth_login_as_well_as_plain(self):
        smtp = start_smtp(self, user=self.user, password=self.password, auth_methods=("LOGIN",))
        self.configure_email(smtp)
        result = self.hpcrun("notify", "--test")
        self.assertExit(result, 0)
        self.assertEqual(self.only_message(smtp, result).login, self.user)

    def test_starttls_with_the_site_ca_file_before_login(self):
        cert, key = temp_certificate(self)
        smtp = start_smtp(self, user=self.user, password=self.password, mode="starttls",
                          tls_context=server_tls_context(cert, key))
        self.configure_email(smtp, security="starttls", extra={"host": "localhost"},
                             notify={"ca_file": cert})
        result = self.hpcrun("notify", "--test")
        self.assertExit(result, 0)
        self.assertTrue(self.only_message(smtp, result).tls)

    def test_implicit_tls_checks_the_certificate(self):
        cert, key = temp_certificate(self)
        smtp = start_smtp(self, user=self.user, password=self.password, mode="ssl",
                          tls_context=server_tls_context(cert, key))
        self.configure_email(smtp, security="ssl", extra={"host": "localhost"})
        refused = self.hpcrun("notify", "--test")
        self.assertExit(refused, 1)
        self.assertRegex(refused.out, r"email: failed: .*(?i:certificate)")
        self.assertEqual(smtp.messages, [])
        accepted = self.hpcrun("notify", "--test", env=dict(self.env, SSL_CERT_FILE=cert))
        self.assertExit(accepted, 0)
        self.assertTrue(self.only_message(smtp, accepted).tls)
        self.assertSecretsKept()


# --- the helpers, in process ---

class SigningTest(unittest.TestCase):
    """reference/notify-apis.md §5 test vectors."""

    @classmethod
    def setUpClass(cls):
        cls.hpcrun = load_hpcrun()

    def test_feishu_sign_matches_the_reference_vector(self):
        self.assertEqual(self.hpcrun.feishu_sign("SECfake", "1700000000"),
                         "Zdj5LaCly1y2xyMLfzdvtJCJU4nSsd37F4/iSAQ3+3g=")
        self.assertEqual(feishu_expected_sign("SECfake", "1700000000"),
                         "Zdj5LaCly1y2xyMLfzdvtJCJU4nSsd37F4/iSAQ3+3g=")

    def test_dingtalk_sign_matches_the_reference_vector_and_is_url_encoded_once(self):
        self.assertEqual(self.hpcrun.dingtalk_sign("SECfake", "1700000000000"),
                         "stL8JpxOChrDWUKKBhnJJGK7/vGzirY/DjP66KVSfJk=")
        self.assertEqual(dingtalk_expected_sign("SECfake", "1700000000000"),
                         "stL8JpxOChrDWUKKBhnJJGK7%2FvGzirY%2FDjP66KVSfJk%3D")
        url = self.hpcrun.dingtalk_url({"url": "https://oapi.dingtalk.com/robot/send",
                                        "access_token": "tok", "secret": "SECfake"},
                                       now=lambda: 1700000000.0)
        self.assertEqual(url, "https://oapi.dingtalk.com/robot/send?access_token=tok"
                              "&timestamp=1700000000000"
                              "&sign=stL8JpxOChrDWUKKBhnJJGK7%2FvGzirY%2FDjP66KVSfJk%3D")

    def test_dingtalk_url_without_a_secret_has_only_the_access_token(self):
        url = self.hpcrun.dingtalk_url({"url": "https://oapi.dingtalk.com/robot/send",
                                        "access_token": "a/b", "secret": ""})
        self.assertEqual(url, "https://oapi.dingtalk.com/robot/send?access_token=a%2Fb")


class ChannelHelpersTest(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.hpcrun = load_hpcrun()

    def test_serverchan_keys_choose_their_endpoint(self):
        cases = [
            ("SCT123abc", "", "https://sctapi.ftqq.com/SCT123abc.send"),
            ("sctp4567tXYZ", "", "https://4567.push.ft07.com/send/sctp4567tXYZ.send"),
            ("sctp4567tXYZ", "http://127.0.0.1:9/u{uid}/{key}.send",
             "http://127.0.0.1:9/u4567/sctp4567tXYZ.send"),
            ("SCT/odd", "", "https://sctapi.ftqq.com/SCT%2Fodd.send"),
        ]
        for key, url, expected in cases:
            with self.subTest(key=key, url=url):
                self.assertEqual(self.hpcrun.serverchan_url(key, url), expected)

    def test_smtp_security_is_ssl_on_465_and_starttls_elsewhere_unless_told(self):
        cases = [({"port": 465}, "ssl"), ({"port": 587}, "starttls"), ({"port": 25}, "starttls"),
                 ({"port": 25, "security": "none"}, "none"), ({"port": 587, "security": "SSL"}, "ssl")]
        for settings, expected in cases:
            with self.subTest(settings=settings):
                self.assertEqual(self.hpcrun.smtp_security(settings), expected)
        with self.assertRaises(self.hpcrun.ChannelError) as caught:
            self.hpcrun.smtp_security({"security": "tls-please"})
        self.assertFalse(caught.exception.retryable)

    def test_parse_headers_reads_json_objects_and_name_value_lines(self):
        cases = [
            ('{"Authorization": "Bearer x", "X-N": 3}', {"Authorization": "Bearer x", "X-N": "3"}),
            ("\nAuthorization: Bearer x\nX-Url: http://a:b", {"Authorization": "Bearer x",
                                                              "X-Url": "http://a:b"}),
            ("", {}),
        ]
        for text, expected in cases:
            with self.subTest(text=text):
                self.assertEqual(self.hpcrun.parse_headers(text), expected)
        for bad in ("{not json", "just words", "[1, 2]"):
            with self.subTest(bad=bad):
                with self.assertRaises(ValueError):
                    self.hpcrun.parse_headers(bad)
                self.hpcrun.parse_headers(bad, strict=False)

    def test_fill_fields_keeps_types_of_whole_placeholders_and_unknown_ones_as_they_are(self):
        template = {"t": "{title}", "n": "{exit_code}", "s": "run {name} ended: {status}",
                    "keep": "{unknown} {", "list": ["{name}"], "number": 5}
        fields = {"title": "标题", "exit_code": 3, "name": "甲", "status": "failed"}
        self.assertEqual(self.hpcrun.fill_fields(template, fields),
                         {"t": "标题", "n": 3, "s": "run 甲 ended: failed", "keep": "{unknown} {",
                          "list": ["甲"], "number": 5})

    def test_secrets_include_webhook_urls_header_values_ntfy_topics_and_pushover_users(self):
        is_secret = self.hpcrun.is_secret_setting
        for section, key in (("slack", "url"), ("discord", "url"), ("feishu:lab", "url"),
                             ("dingtalk", "url"), ("wecom", "url"), ("webhook", "url"),
                             ("webhook", "headers"), ("ntfy", "topic"), ("pushover", "user"),
                             ("telegram", "token"), ("email", "password"), ("bark", "device_key"),
                             ("serverchan", "key"), ("dingtalk", "access_token")):
            with self.subTest(section=section, key=key):
                self.assertTrue(is_secret(section, key))
        for section, key in (("ntfy", "url"), ("gotify", "url"), ("telegram", "chat_id"),
                             ("email", "host"), ("ntfy", "user"), ("bark", "url")):
            with self.subTest(section=section, key=key):
                self.assertFalse(is_secret(section, key))

        class FakeConfig(object):
            sections = {"webhook": {"url": "https://h.example/hook/abcd1234",
                                    "headers": "Authorization: Bearer SEKRET99\nX-Env: hpc"},
                        "ntfy": {"url": "https://ntfy.sh", "topic": "mytopic123"}}
        secrets = self.hpcrun.collect_secrets(FakeConfig())
        for value in ("https://h.example/hook/abcd1234", "Bearer SEKRET99", "SEKRET99",
                      "mytopic123"):
            self.assertIn(value, secrets)
        for value in ("https://ntfy.sh", "hpc"):
            self.assertNotIn(value, secrets)

    def test_refusal_retries_network_like_answers_and_documented_temporary_codes_only(self):
        refusal = self.hpcrun.refusal
        cases = [
            ("500", 500, {"code": 1}, None, True),
            ("429", 429, {}, None, True),
            ("408", 408, {}, None, True),
            ("403", 403, {}, None, False),
            ("302", 302, {}, None, False),
            ("2xx, undocumented codes", 200, {"code": 7}, None, True),
            ("2xx, documented lasting code", 200, {"code": 903}, (500,), False),
            ("2xx, documented temporary code", 200, {"code": 500}, (500,), True),
            ("2xx, code given as a string", 200, {"code": "500"}, (500,), True),
        ]
        for label, status, answer, temporary, retryable in cases:
            with self.subTest(label):
                failure = refusal(status, json.dumps(answer).encode(), {}, set(),
                                  temporary_codes=temporary)
                self.assertEqual(failure.retryable, retryable)

    def test_retry_after_comes_from_the_header_telegram_parameters_or_discord_body(self):
        retry_after = self.hpcrun.retry_after
        self.assertEqual(retry_after({"Retry-After": "12"}), 12.0)
        self.assertEqual(retry_after({}, {"parameters": {"retry_after": 30}}), 30.0)
        self.assertEqual(retry_after({}, {"retry_after": 1.5}), 1.5)
        self.assertIsNone(retry_after({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, {}))
        self.assertIsNone(retry_after(None))

    def test_describe_answer_reads_each_service_fields(self):
        describe = self.hpcrun.describe_answer
        self.assertEqual(describe(200, b'{"errcode": 310000, "errmsg": "sign not match"}', set(),
                                  "errcode", ("errmsg",)),
                         "HTTP 200, errcode 310000, sign not match")
        self.assertEqual(describe(400, b'{"status": 0, "errors": ["a is bad", "b too"]}', set(),
                                  "status", ("errors",)),
                         "HTTP 400, status 0, a is bad; b too")
        self.assertEqual(describe(403, b"invalid_token", set()),
                         "HTTP 403, non-JSON answer: invalid_token")

    def test_every_channel_type_has_defaults_a_sender_and_a_text_limit(self):
        for kind, channel in self.hpcrun.CHANNELS.items():
            with self.subTest(kind=kind):
                self.assertEqual(channel.name, kind)
                self.assertIsNotNone(channel.defaults())
                self.assertIsNot(type(channel).send, self.hpcrun.Channel.send, "no sender")
                if kind != "console":
                    limit, unit = channel.text_limit
                    self.assertIn(unit, ("chars", "bytes"))
                    self.assertGreater(limit, 0)
                    self.assertIn("timeout", channel.defaults())
                for key in channel.required:
                    self.assertIn(key, channel.defaults())

    def test_config_example_shows_every_channel_key_with_its_default(self):
        from support import REPO
        parser = configparser.ConfigParser(interpolation=None)
        with open(os.path.join(REPO, "config.ini.example"), encoding="utf-8") as stream:
            parser.read_file(stream)
        with open(os.path.join(REPO, "api_keys.ini.example"), encoding="utf-8") as stream:
            keys = configparser.ConfigParser(interpolation=None)
            keys.read_file(stream)
        self.assertIn("ca_file", parser["notify"])
        for kind, channel in self.hpcrun.CHANNELS.items():
            if kind == "console":
                continue
            with self.subTest(kind=kind):
                defaults = channel.defaults()
                self.assertEqual(set(parser[kind]), set(defaults))
                for key, value in defaults.items():
                    self.assertEqual(parser[kind][key], "%g" % value if isinstance(value, float)
                                     else str(value), "[%s] %s" % (kind, key))
                secret = [key for key in defaults if self.hpcrun.is_secret_setting(kind, key)
                          and key != "url" or key in channel.required
                          and self.hpcrun.is_secret_setting(kind, key)]
                self.assertTrue(set(secret) <= set(keys[kind]), "%s: %s" % (kind, secret))

    def test_both_readmes_list_every_channel_in_their_channel_table(self):
        from support import REPO
        for readme in ("README.md", "README.zh-CN.md"):
            with open(os.path.join(REPO, readme), encoding="utf-8") as stream:
                rows = re.findall(r"(?m)^\| `(\w+)` \|", stream.read())
            for kind in self.hpcrun.CHANNELS:
                with self.subTest(readme=readme, kind=kind):
                    self.assertIn(kind, rows)

    def test_titled_text_keeps_title_and_body_within_one_limit(self):
        report = self.hpcrun.Report("标题", ["头部"], ["行%d" % i + "字" * 50 for i in range(100)],
                                    "zh", 100000)
        for limit, unit in ((2048, "bytes"), (2000, "chars"), (300, "chars")):
            with self.subTest(limit=limit, unit=unit):
                text = self.hpcrun.titled_text(report, limit, unit)
                size = len(text.encode("utf-8")) if unit == "bytes" else len(text)
                self.assertLessEqual(size, limit)
                self.assertTrue(text.startswith("标题\n头部"), text[:20])
                self.assertTrue(text.endswith("行99" + "字" * 50), text[-20:])


if __name__ == "__main__":
    unittest.main()
