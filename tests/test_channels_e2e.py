"""Every push channel's report of a wrapped run: the real hpcrun.py wraps a training (the relay
writes the log the report is cut from), then `monitor --once` (in process: what is tested is
what each service gets) pushes its report to local fakes that check each request the way
reference/notify-apis.md describes the service. Long Chinese logs within each service's limit,
each documented error named and retried as fits, several channels at once, long titles,
e-mail.

The channels' definitions and the tests that need no wrap are in test_channels.py."""

import sys
import unittest

from support import Reply, merge_sections, read_records, record_names, refused_port
from fakes import sent_text, start_smtp
from test_channels import (AT_ONCE, Bark, CHINESE_LOG_LINES, CHINESE_NAME, ChannelTestCase,
                           DingTalk, Discord, EmailTestCase, Feishu, Gotify, Ntfy, NtfyBasic,
                           PERMANENT, PushPlus, Pushover, ServerChan3, ServerChanTurbo, Slack,
                           Telegram, WeCom, Webhook, chinese_line)

LAYER = "process"


class HttpChannelTests(object):
    """Mixed into one TestCase per channel below (its notify test: test_channels.py)."""

    def test_monitor_report_of_long_chinese_lines_fits_the_limit_cutting_the_tail_from_the_top(self):
        setup, sections, keys = self.start_channel(self.channel)
        self.configure(sections, keys, self.channel.kind, report={
            "include_last_n_lines": str(CHINESE_LOG_LINES),
            "max_chars": str(self.channel.max_chars)})
        run_id, record = self.chinese_run()
        result = self.monitor_once()
        self.assertExit(result, 0)
        self.assertServerClean(setup.server)
        self.assertRequestCount(1, setup.server, result)
        request = setup.server.requests[0]
        self.assertLimits(self.channel.kind, self.channel.limits, request)
        title, text = sent_text(self.channel.kind, request)
        self.assertIn(CHINESE_NAME, title if title is not None else text.split("\n")[0])
        self.assertIn(record["command"], text)
        self.assertIn(chinese_line(CHINESE_LOG_LINES), text)
        self.assertNotIn(chinese_line(1), text)
        self.assertEqual(list(read_records(self.sb.work, "sent")), [run_id])
        self.assertSecretsKept()

    def test_monitor_names_status_code_and_text_of_each_documented_error_and_retries_as_fits(self):
        setup, sections, keys = self.start_channel(self.channel)
        self.configure(sections, keys, self.channel.kind)
        for number, case in enumerate(self.channel.errors):
            with self.subTest(case.label):
                work = self.sb.make_dir("work-%d" % number)
                run_id, _ = self.finished_run("echo 训练结束", "错误%d" % number, work)
                setup.server.queue(case.reply)
                result = self.monitor_once(work)
                self.assertExit(result, 1)
                self.assertNoTraceback(result)
                line = self.assertTimestampedLine(result.out + result.err, "push failed")
                self.assertIn("via %s:" % self.channel.kind, line)
                for needle in case.needles:
                    self.assertRegex(line, needle)
                self.assertIn("next in %s)" % case.delay, line)
                self.assertEqual(list(read_records(work, "done")), [run_id])
                self.assertEqual(record_names(work, "sent"), [])
        self.assertServerClean(setup.server)
        self.assertRequestCount(len(self.channel.errors), setup.server)
        self.assertSecretsKept()


def channel_test(channel_class):
    """A TestCase class running HttpChannelTests against one channel."""
    name = channel_class.__name__ + "ChannelTest"
    return type(name, (HttpChannelTests, ChannelTestCase), {"channel": channel_class(),
                                                            "__module__": __name__})


class ChannelSpecificsTest(ChannelTestCase):

    def one_request(self, channel, log_lines, name="specifics"):
        setup, sections, keys = self.start_channel(channel)
        self.configure(sections, keys, channel.kind)
        script = self.sb.write_file("log.py", "".join(
            "print(%r)\n" % line for line in log_lines), secret=False)
        self.finished_run("%s %s" % (sys.executable, script), name)
        result = self.monitor_once()
        self.assertExit(result, 0)
        self.assertServerClean(setup.server)
        self.assertRequestCount(1, setup.server, result)
        self.assertSecretsKept()
        return setup.server.requests[0]

    def test_webhook_body_template_gets_the_named_fields_with_their_types(self):
        request = self.one_request(Webhook(), ["最后一行"], name="网钩")
        body = request.json
        self.assertEqual((body["name"], body["status"], body["exit_code"]), ("网钩", "success", 0))
        self.assertIn("网钩", body["title"])
        self.assertTrue(body["content"].endswith("最后一行"), body["content"])
        self.assertTrue(body["host"])

    def test_slack_gets_a_traceback_escaped_so_that_module_is_not_read_as_a_link(self):
        lines = ["Traceback (most recent call last):",
                 '  File "train.py", line 3, in <module>', "ValueError: a < b & c > d"]
        request = self.one_request(Slack(), lines)
        self.assertIn("in &lt;module&gt;", request.json["text"])
        self.assertIn("a &lt; b &amp; c &gt; d", request.json["text"])
        self.assertIn(lines[1], sent_text("slack", request)[1])

    def test_discord_does_not_let_an_everyone_in_the_log_ping_the_server(self):
        request = self.one_request(Discord(), ["@everyone look at this loss"])
        self.assertIn("@everyone look at this loss", request.json["content"])
        self.assertEqual(request.json.get("allowed_mentions"), {"parse": []})


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


class SeveralChannelsTest(ChannelTestCase):

    def test_three_channels_one_failing_deliver_to_the_two_once_and_retry_only_the_third(self):
        wecom, wecom_sections, wecom_keys = self.start_channel(WeCom())
        telegram, telegram_sections, telegram_keys = self.start_channel(Telegram())
        feishu, feishu_sections, feishu_keys = self.start_channel(Feishu(), "feishu:lab")
        sections = merge_sections(merge_sections(wecom_sections, telegram_sections), feishu_sections)
        keys = merge_sections(merge_sections(wecom_keys, telegram_keys), feishu_keys)
        self.configure(sections, keys, "wecom, telegram, feishu:lab")
        run_id, _ = self.finished_run("echo 三个通道", "三通道")
        telegram.server.queue(Reply.json({"ok": False, "error_code": 500,
                                          "description": "Internal Server Error"}, 500))

        failed = self.monitor_once()
        self.assertExit(failed, 1)
        line = self.assertTimestampedLine(failed.out + failed.err, "push failed")
        self.assertIn("via telegram:", line)
        self.assertRegex(line, r"\b500\b.*Internal Server Error")
        self.assertNotIn("via wecom", failed.out + failed.err)
        self.assertEqual([len(s.requests) for s in (wecom.server, telegram.server, feishu.server)],
                         [1, 1, 1])
        self.assertEqual(list(read_records(self.sb.work, "done")), [run_id])

        delivered = self.monitor_once()
        self.assertExit(delivered, 0)
        self.assertEqual([len(s.requests) for s in (wecom.server, telegram.server, feishu.server)],
                         [1, 2, 1], delivered.describe())
        self.assertEqual(list(read_records(self.sb.work, "sent")), [run_id])

        quiet = self.monitor_once()
        self.assertExit(quiet, 0)
        self.assertEqual([len(s.requests) for s in (wecom.server, telegram.server, feishu.server)],
                         [1, 2, 1], quiet.describe())
        for setup in (wecom, telegram, feishu):
            self.assertServerClean(setup.server)
            _, text = sent_text(setup.server.name, setup.server.requests[-1])
            self.assertIn("三通道", text)
        self.assertSecretsKept()


class LongTitleTest(ChannelTestCase):
    """The title counts against each service's limit (issue 12): a 1200-character job name must
    not make WeCom drop the body or Bark overflow its APNs payload; the cause always survives."""

    NAME = "超长的作业名" * 200       # 1200 characters, 3600 bytes of UTF-8
    CASES = (("wecom", WeCom, 2048, "bytes"), ("bark", Bark, 3000, "bytes"),
             ("discord", Discord, 2000, "chars"), ("telegram", Telegram, 4096, "chars"))

    def test_a_1200_character_job_name_leaves_room_for_the_cause_and_header(self):
        for kind, channel, limit, unit in self.CASES:
            with self.subTest(kind):
                work = self.sb.make_dir("work-" + kind)
                setup, sections, keys = self.start_channel(channel())
                self.configure(sections, keys, kind)
                self.finished_failure(work)
                self.assertExit(self.monitor_once(work), 0)
                self.assertServerClean(setup.server)
                title, text = sent_text(kind, setup.server.requests[-1])
                whole = (title + "\n" if title is not None else "") + text
                size = len(whole.encode("utf-8")) if unit == "bytes" else len(whole)
                self.assertLessEqual(size, limit, "%s: title and text take %d %s" % (kind, size, unit))
                self.assertIn("原因: CUDA 显存不足", text)
                self.assertIn("状态: 失败", text)
                self.assertIn("超长的作业名" * 5, whole)

    def finished_failure(self, work):
        result = self.wrap("echo 'RuntimeError: CUDA out of memory. Tried to allocate 2 GiB'; exit 1",
                           work=work, extra=["--name", self.NAME])
        self.assertExit(result, 1)


class EmailTest(EmailTestCase):

    def test_monitor_mails_the_report_of_long_chinese_lines_within_max_chars(self):
        smtp = start_smtp(self, user=self.user, password=self.password)
        self.configure_email(smtp, extra={"from": self.user})
        run_id, record = self.chinese_run()
        result = self.monitor_once()
        self.assertExit(result, 0)
        message = self.only_message(smtp, result)
        self.assertIn(CHINESE_NAME, message.subject)
        self.assertLessEqual(len(message.body.rstrip("\n")), 5000)
        self.assertIn(record["command"], message.body)
        self.assertIn(chinese_line(CHINESE_LOG_LINES), message.body)
        self.assertNotIn(chinese_line(1), message.body)
        self.assertEqual(list(read_records(self.sb.work, "sent")), [run_id])
        self.assertSecretsKept()

    def test_smtp_refusals_are_named_and_only_temporary_ones_retried_soon(self):
        smtp = start_smtp(self, user=self.user, password=self.password)
        self.configure_email(smtp)
        cases = [
            # (stage, times: smtplib tries each AUTH method and each recipient, code, text, ...)
            ("auth", 2, 535, "Login fail. 请使用授权码登录".encode("gbk"), ["535", "请使用授权码登录"],
             PERMANENT),
            ("mail", 1, 501, b"mail from address must be same as authorization user",
             ["501", "must be same as authorization user"], PERMANENT),
            ("rcpt", 2, 450, b"mailbox busy", ["450", "mailbox busy", "you@example.org"], AT_ONCE),
            ("data", 1, 451, b"local error in processing", ["451", "local error"], AT_ONCE),
        ]
        for number, (stage, times, code, text, needles, delay) in enumerate(cases):
            with self.subTest(stage):
                work = self.sb.make_dir("work-%d" % number)
                self.finished_run("echo 邮件", "邮件%d" % number, work)
                for _ in range(times):
                    smtp.queue_failure(stage, code, text)
                result = self.monitor_once(work)
                self.assertExit(result, 1)
                self.assertNoTraceback(result)
                line = self.assertTimestampedLine(result.out, "push failed")
                self.assertIn("via email:", line)
                for needle in needles:
                    self.assertIn(needle, line)
                self.assertIn("next in %s)" % delay, line)
        self.assertEqual(smtp.messages, [])
        self.assertSecretsKept()

    def test_a_refused_connection_is_retried_soon(self):
        self.configure({"email": {"host": "127.0.0.1", "port": str(refused_port()),
                                  "security": "none", "to": "you@example.org", "from": "a@b.example"}},
                       {}, "email")
        self.finished_run("echo 邮件", "无连接")
        result = self.monitor_once()
        self.assertExit(result, 1)
        line = self.assertTimestampedLine(result.out, "push failed")
        self.assertRegex(line, r"(?i)refused")
        self.assertIn("next in 0s)", line)


if __name__ == "__main__":
    unittest.main()
