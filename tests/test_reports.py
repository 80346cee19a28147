"""Reports that say why (issue 5), in process: the log corpus, progress and metric trend, log
cleaning, secrets, titles, templates and channel-sized text.

The corpus is tests/data/logs/ (written by tests/make_corpus.py) with expected.json. The
tests use the hpcrun.py under test (HPCRUN_TEST_SCRIPT or the repository's) through
support.load_hpcrun; the end-to-end ones, which wrap a training and run monitor --once, are
in test_reports_e2e.py.
"""

import collections
import json
import math
import os
import re
import shutil
import string
import tempfile
import unittest

from support import (FakeClock, HpcrunTestCase, InProcess, load_hpcrun, merge_sections,
                     render_ini)

LAYER = "fast"

hpcrun = load_hpcrun()

CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "logs")
with open(os.path.join(CORPUS, "expected.json"), encoding="utf-8") as _stream:
    EXPECTED = json.load(_stream, object_pairs_hook=collections.OrderedDict)

# Every cause issue 5 names, and what the corpus must show of the log pitfalls.
CAUSES = {"cuda_oom", "accelerator_oom", "host_oom", "nan_loss", "disk_full", "shm", "segfault",
          "cpp_abort", "cuda_error", "nccl_error", "nccl_timeout", "fs_error", "exception",
          "interrupted", "time_limit", "preempted", "node_fail", "cancelled", "killed",
          "child_failed", None}
GiB = 1 << 30


def corpus_path(name):
    return os.path.join(CORPUS, name)


def read_bytes(path):
    with open(path, "rb") as stream:
        return stream.read()


def tail_lines(path):
    """What the report classifies: the cleaned tail hpcrun reads from a log."""
    return hpcrun.read_tail(path, hpcrun.CLASSIFY_LINES)


def sample_log(path, name, seconds_per_line=1.0):
    """A MetricSampler fed the log one line per chunk, one chunk every seconds_per_line."""
    clock = FakeClock()
    sampler = hpcrun.MetricSampler(name, clock=clock)
    for line in read_bytes(path).splitlines(True):
        sampler.feed(line)
        clock.advance(seconds_per_line)
    return sampler


def report_progress(path):
    """The progress a report shows: from the log's tail, else what the wrapper sampled."""
    return (hpcrun.parse_progress(tail_lines(path)[-200:])
            or sample_log(path, "loss").progress)


def is_nan(value):
    return isinstance(value, float) and math.isnan(value)


class TempDirTestCase(unittest.TestCase):

    def setUp(self):
        self.dir = os.path.realpath(tempfile.mkdtemp(prefix="hpcrun-reports-"))
        self.addCleanup(shutil.rmtree, self.dir, True)

    def write(self, name, data):
        path = os.path.join(self.dir, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as stream:
            stream.write(data if isinstance(data, bytes) else data.encode("utf-8"))
        return path

    def config(self, sections=None, language="en"):
        """A Config read from a file in the temp dir, no user or repository config involved."""
        merged = merge_sections({"notify": {"channels": "console", "language": language}}, sections)
        path = self.write("config-%s.ini" % language, render_ini(merged))
        return hpcrun.load_config(path, env={"HOME": self.dir}, script_dir=self.dir)

    def record(self, **fields):
        """A completion record as wrap writes it, with a log in the temp dir."""
        record = {"schema": 1, "run_id": "20240501_090000_gpu-a017_4242", "name": "resnet50",
                  "status": "failed", "exit_code": 1, "signal": None, "cause": "exit_code",
                  "final": True, "start_time": 1714525200.0, "end_time": 1714525500.0,
                  "duration": 300.0, "host": "gpu-a017", "work_dir": self.dir,
                  "command": "python train.py", "log_file": "logs/train.log"}
        record.update(fields)
        return record


# --- the corpus ---

class CorpusTest(unittest.TestCase):

    def test_corpus_holds_at_least_25_small_logs_each_with_an_expectation(self):
        logs = sorted(name for name in os.listdir(CORPUS) if name.endswith(".log"))
        self.assertGreaterEqual(len(logs), 25)
        self.assertEqual(logs, sorted(EXPECTED), "every log needs an entry in expected.json")
        for name in logs:
            with self.subTest(name):
                self.assertLess(os.path.getsize(corpus_path(name)), 16 * 1024, "keep logs small")
                self.assertIn(EXPECTED[name]["cause"], CAUSES)
                self.assertEqual(EXPECTED[name]["cause"] == "exception",
                                 bool(EXPECTED[name].get("exception")),
                                 "an exception cause names its exception")

    def test_corpus_covers_every_cause_and_every_log_pitfall(self):
        self.assertEqual({entry["cause"] for entry in EXPECTED.values()}, CAUSES)
        data = {name: read_bytes(corpus_path(name)) for name in EXPECTED}

        def undecodable(raw):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return True
            return False

        pitfalls = [
            ("tqdm \\r redraws", lambda raw: b"\r" in raw.replace(b"\r\n", b"")),
            ("ANSI colour", lambda raw: b"\x1b[" in raw),
            ("invalid UTF-8", undecodable),
            ("[rankN]: prefixes", lambda raw: b"[rank0]:" in raw),
            ("[defaultN]: prefixes", lambda raw: b"[default0]:" in raw),
            ("srun --label prefixes", lambda raw: re.search(rb"(?m)^0: ", raw)),
            ("ChildFailedError", lambda raw: b"ChildFailedError" in raw),
            ("chained exceptions", lambda raw: b"The above exception was the direct cause" in raw),
            ("Chinese output", lambda raw: "训练".encode("utf-8") in raw),
            ("secrets", lambda raw: b"Authorization: Bearer" in raw),
        ]
        for label, present in pitfalls:
            with self.subTest(label):
                self.assertTrue([name for name, raw in data.items() if present(raw)],
                                "no corpus log shows " + label)

    def test_every_corpus_log_is_classified_as_expected(self):
        for name, expected in EXPECTED.items():
            with self.subTest(name):
                cause, line = hpcrun.classify_log(tail_lines(corpus_path(name)))
                found = cause if cause != "exception" else "exception %s" % hpcrun.exception_name(line)
                wanted = expected["cause"] if expected["cause"] != "exception" else \
                    "exception %s" % expected["exception"]
                self.assertEqual(found, wanted, "%s\nmatched line: %r\nwhy: %s"
                                 % (name, line, expected["why"]))

    def test_every_corpus_log_shows_the_expected_progress(self):
        for name, expected in EXPECTED.items():
            with self.subTest(name):
                self.assertEqual(report_progress(corpus_path(name)), expected["progress"],
                                 "%s\nwhy: %s" % (name, expected["why"]))

    def test_metric_trend_of_corpus_logs_shows_first_last_best_and_course(self):
        with_metric = [(name, e["metric"]) for name, e in EXPECTED.items() if e.get("metric")]
        self.assertGreaterEqual(len(with_metric), 8)
        for name, metric in with_metric:
            with self.subTest(name):
                values = sample_log(corpus_path(name), metric["name"]).values
                trend = hpcrun.format_metric_trend(metric["name"], values)
                self.assertIsNotNone(trend, "no %s value sampled" % metric["name"])
                self.assertTrue(trend.startswith(metric["trend"] + " "), trend)
                spark = trend[len(metric["trend"]) + 1:]
                self.assertEqual(len(spark), min(20, len(values)), trend)
                self.assertTrue(set(spark) <= set(hpcrun.SPARK_CHARS + "×↑"), trend)
                self.assertEqual("×" in spark, any(is_nan(v) for v in values), trend)


# --- progress and the metric trend ---

class ProgressAndTrendTest(unittest.TestCase):

    def test_progress_in_its_common_forms(self):
        bar = " 37%|███▋      | 370/1000 [01:40<02:50,  3.70it/s, loss=0.31]"
        cases = [
            ("epoch and tqdm bar", ["Epoch 12/100", bar], "epoch 12/100 · 37% 370/1000"),
            ("epoch of N", ["epoch 3 of 20"], "epoch 3/20"),
            ("step with total", ["step 4000/10000 loss=0.3"], "step 4000/10000"),
            ("global_step", ["global_step=4000"], "step 4000"),
            ("iter", ["iter 1200: loss 2.91"], "step 1200"),
            ("scaled tqdm counts", [" 37%|███▋      | 3.70k/10.0k [01:40<02:50]"], "37% 3.70k/10.0k"),
            ("rank prefix", ["[rank0]: epoch 2/10 step 50/400"], "epoch 2/10 · step 50/400"),
            ("the latest of each", ["epoch 1/9", "epoch 2/9", "step 7", "step 8"], "epoch 2/9 · step 8"),
            ("nothing", ["hello", "done"], None),
        ]
        for label, lines, expected in cases:
            with self.subTest(label):
                self.assertEqual(hpcrun.parse_progress(lines), expected)

    def test_metric_is_read_in_its_common_forms_and_not_from_other_names(self):
        cases = [
            ("loss", "step 3 loss=0.31 lr=1e-4", "0.31"),
            ("loss", "step 3 | loss: 0.31", "0.31"),
            ("loss", "{'loss': 0.31, 'epoch': 0.5}", "0.31"),
            ("loss", '{"loss": 0.31}', "0.31"),
            ("loss", "Epoch: [1][ 10/100]  Loss 3.1e-01 (3.2e-01)", "3.1e-01"),
            ("loss", "loss: tensor(0.3100, device='cuda:0')", "0.3100"),
            ("loss", "loss=nan", "nan"),
            ("loss", "loss: inf", "inf"),
            ("loss", "val_loss=0.52 train_loss=0.41", None),
            ("loss", "loss_scale: 65536", None),
            ("val_acc", "val_acc=0.91", "0.91"),
        ]
        for name, line, expected in cases:
            with self.subTest(line=line):
                matches = hpcrun.metric_regex(name).findall(line)
                self.assertEqual(matches[-1] if matches else None, expected)

    def test_trend_line_shows_first_last_best_and_nan_and_inf_as_such(self):
        nan, inf = float("nan"), float("inf")
        cases = [
            ("loss", [2.31], "loss 2.31 → 2.31 ▁"),
            ("loss", [2.31, 0.12], "loss 2.31 → 0.12 (best 0.12) █▁"),
            ("loss", [2.31, 0.11, 0.12], "loss 2.31 → 0.12 (best 0.11) █▁▁"),
            ("loss", [1.0, 0.5, nan], "loss 1 → nan (best 0.5) █▁×"),
            ("loss", [1.0, 0.5, inf], "loss 1 → inf (best 0.5) █▁↑"),
            ("loss", [nan, nan], "loss nan → nan ××"),
            ("val_acc", [0.5, 0.9, 0.8], "val_acc 0.5 → 0.8 (best 0.9) ▁█▆"),
            ("loss", [], None),
        ]
        for name, values, expected in cases:
            with self.subTest(values=values):
                self.assertEqual(hpcrun.format_metric_trend(name, values), expected)

    def test_sparkline_of_a_long_course_is_twenty_characters_falling_like_the_metric(self):
        values = [3.0 - i * 0.01 for i in range(290)]
        spark = hpcrun.sparkline(values)
        self.assertEqual(len(spark), 20)
        self.assertEqual(spark[0], "█")
        self.assertEqual(spark[-1], "▁")
        ranks = [hpcrun.SPARK_CHARS.index(char) for char in spark]
        self.assertEqual(ranks, sorted(ranks, reverse=True), spark)


class MetricSamplerTest(unittest.TestCase):

    def feed_run(self, sampler, clock, seconds, value_at):
        """One chunk of output per second for `seconds` seconds."""
        for second in range(seconds):
            sampler.feed(b"step %d loss=%.6f\n" % (second, value_at(second)))
            clock.advance(1.0)

    def test_a_ten_hour_run_is_sampled_evenly_over_its_whole_course(self):
        seconds = 10 * 3600

        def value_at(second):
            return 0.1 + 3.0 * math.exp(-second / 12000.0)

        clock = FakeClock()
        sampler = hpcrun.MetricSampler("loss", clock=clock)
        self.feed_run(sampler, clock, seconds, value_at)
        values = sampler.values
        self.assertLessEqual(len(values), hpcrun.METRIC_POINTS)
        self.assertGreaterEqual(len(values), hpcrun.METRIC_POINTS // 2)
        when = [round(-12000.0 * math.log((v - 0.1) / 3.0)) for v in values]
        self.assertEqual(when[0], 0, "the sample starts at the start of the run")
        gaps = {b - a for a, b in zip(when[:-2], when[1:-1])}   # the newest value may be nearer
        self.assertEqual(len(gaps), 1, "an even sample, got gaps %s" % sorted(gaps))
        gap = gaps.pop()
        self.assertLessEqual(0, when[-1] - when[-2])
        self.assertLessEqual(when[-1] - when[-2], gap)
        self.assertGreaterEqual(when[-1], seconds - 1 - gap, "the sample reaches the end")
        trend = hpcrun.format_metric_trend("loss", values)
        self.assertTrue(trend.startswith("loss 3.1 → "), trend)
        spark = trend.split(" ")[-1]
        self.assertEqual(spark[0], "█")
        self.assertEqual(spark[-1], "▁")

    def test_the_trend_ends_with_the_last_value_the_run_printed(self):
        for seconds in (255, 1002, 3001, 7779):
            with self.subTest(seconds=seconds):
                clock = FakeClock()
                sampler = hpcrun.MetricSampler("loss", clock=clock)
                self.feed_run(sampler, clock, seconds, lambda second: 10.0 - second / 1000.0)
                last = hpcrun.format_number(10.0 - (seconds - 1) / 1000.0)
                trend = hpcrun.format_metric_trend("loss", sampler.values)
                self.assertIn(" → %s " % last, trend, "the last value printed was %s" % last)

    def test_fast_output_is_looked_at_once_per_sample_interval(self):
        clock = FakeClock()
        sampler = hpcrun.MetricSampler("loss", clock=clock)
        for step in range(1000):
            sampler.feed(b"loss=%d.5\n" % step)
            clock.advance(0.01)
        self.assertLessEqual(len(sampler.values), 11)
        self.assertEqual(sampler.values[0], 0.5)

    def test_sampled_progress_keeps_the_epoch_when_the_bar_comes_in_later_chunks(self):
        clock = FakeClock()
        sampler = hpcrun.MetricSampler("loss", clock=clock)
        sampler.feed(b"Epoch 3/100\n")
        for n in (10, 200, 370):
            clock.advance(1.0)
            sampler.feed(("\r 37%%|███▋      | %d/1000 [01:40<02:50,  3.70it/s]" % n).encode("utf-8"))
        self.assertEqual(sampler.progress, "epoch 3/100 · 37% 370/1000")


# --- reading and cleaning the log ---

class LogCleaningTest(TempDirTestCase):

    def huge_log(self, name, tail, size=5 * GiB, head=b""):
        """A sparse multi-GB log: head at the start, nothing in between, tail at the end."""
        path = os.path.join(self.dir, name)
        with open(path, "wb") as stream:
            stream.write(head)
            stream.truncate(size)
        with open(path, "ab") as stream:
            stream.write(b"\n" + tail)
        return path

    def test_a_multi_gigabyte_log_is_classified_from_its_tail(self):
        decoy = (b"Traceback (most recent call last):\n  File \"old.py\", line 1, in <module>\n"
                 b"OSError: [Errno 28] No space left on device\n")
        for name in ("pytorch_cuda_oom_new.log", "torchrun_rank3_oom_nccl_timeouts.log",
                     "slurm_oom_kill.log", "chained_exception_hf_offline.log"):
            with self.subTest(name):
                path = self.huge_log(name, read_bytes(corpus_path(name)), head=decoy)
                self.assertGreater(os.path.getsize(path), 5 * GiB)
                lines = tail_lines(path)
                self.assertLess(sum(len(line) for line in lines), 2 * hpcrun.TAIL_MAX_BYTES)
                cause, line = hpcrun.classify_log(lines)
                self.assertEqual(cause, EXPECTED[name]["cause"], line)
                self.assertEqual(hpcrun.parse_progress(lines[-200:]), EXPECTED[name]["progress"])

    def test_a_huge_log_ending_in_megabytes_of_tqdm_redraws_keeps_the_last_bar_state(self):
        redraws = b"".join(("\r 37%%|███▋      | %d/100000 [1:01:40<2:50:00,  9.70it/s, loss=0.31]"
                            % n).encode("utf-8") for n in range(30000))
        path = self.huge_log("bar.log", b"Epoch 3/10\n" + redraws, size=3 * GiB)
        lines = hpcrun.read_tail(path, 50)
        self.assertTrue(lines, "no tail at all from a log that ends in a progress bar")
        self.assertEqual(lines[-1], " 37%|███▋      | 29999/100000 [1:01:40<2:50:00,  9.70it/s, loss=0.31]")

    def test_invalid_utf8_bytes_are_replaced_not_fatal(self):
        lines = tail_lines(corpus_path("invalid_utf8.log"))
        self.assertIn("skipping /data/raw/caf\ufffd_menu.jpg: not an image", lines)
        self.assertIn("a lone byte \ufffd in the middle", lines)
        self.assertTrue(any(line.startswith("half a character at the end: \ufffd") for line in lines))
        self.assertEqual(hpcrun.classify_log(lines)[0], "exception")
        garbage = bytes(range(256)) * 64 + b"\n\xc3\n\xf0\x9f\x98\n"
        path = self.write("garbage.log", garbage)
        lines = hpcrun.read_tail(path, 10)
        self.assertTrue(lines)
        for line in lines:
            line.encode("utf-8")        # every line is valid text

    def test_tqdm_redraws_collapse_to_their_last_state(self):
        path = corpus_path("pytorch_single_gpu_success.log")
        lines = tail_lines(path)
        self.assertEqual(len(lines), read_bytes(path).count(b"\n"), "one line per \\n, none per \\r")
        for line in lines:
            self.assertNotIn("\r", line)
        bars = [line for line in lines if line.startswith("train: ")]
        self.assertEqual(len(bars), 3, lines)
        for bar in bars:
            self.assertRegex(bar, r"^train: 100%\|██████████\| 391/391 \[")

    def test_ansi_colour_and_cursor_codes_are_removed(self):
        lines = tail_lines(corpus_path("ansi_colour_cuda_assert.log"))
        for line in lines:
            self.assertNotIn("\x1b", line)
            self.assertNotRegex(line, r"\[(?:\d+;)*\d+m|\[\?25[lh]")
        self.assertIn("RuntimeError: CUDA error: device-side assert triggered", lines)
        self.assertIn("2024-05-01 10:00:22 | INFO     | train:88 - epoch 7/30 step 220/500 loss=0.7280",
                      lines)

    def test_rank_prefixes_stay_in_the_text_but_are_ignored_for_matching(self):
        lines = tail_lines(corpus_path("torchrun_rank3_oom_nccl_timeouts.log"))
        self.assertTrue([line for line in lines if line.startswith("[rank3]: torch.OutOfMemoryError")])
        cause, line = hpcrun.classify_log(lines)
        self.assertEqual(cause, "cuda_oom")
        self.assertTrue(line.startswith("torch.OutOfMemoryError: CUDA out of memory"), line)
        cases = [
            ("[rank0]: Traceback (most recent call last):", "Traceback (most recent call last):"),
            ("[rank12]:[E501 11:52:18 ProcessGroupNCCL.cpp:616] x", "[E501 11:52:18 ProcessGroupNCCL.cpp:616] x"),
            ("[default3]:RuntimeError: boom", "RuntimeError: boom"),
            ("0: epoch 1/3", "epoch 1/3"),
            ("[1,0]<stdout>: step 5", "step 5"),
            ("[default3]:[rank3]: RuntimeError: boom", "RuntimeError: boom"),
            ("12:30:01 INFO started", "12:30:01 INFO started"),
            ("[INFO] started", "[INFO] started"),
        ]
        for raw, stripped in cases:
            with self.subTest(raw):
                self.assertEqual(hpcrun.strip_rank(raw), stripped)

    def test_very_long_lines_are_cut_with_a_visible_mark(self):
        long_line = "CUDA out of memory. " + "x" * 100000
        path = self.write("long.log", "before\n" + long_line + "\nafter\n")
        lines = hpcrun.read_tail(path, 10)
        self.assertEqual(lines[0], "before")
        self.assertEqual(lines[1], long_line[:hpcrun.LINE_MAX_CHARS] + "…")
        self.assertEqual(lines[2], "after")
        self.assertEqual(hpcrun.classify_log(lines)[0], "cuda_oom")


# --- secrets ---

class SecretsTest(InProcess, HpcrunTestCase):

    SECRETS = EXPECTED["secrets.log"]["secrets"]

    def test_the_secrets_log_holds_its_secrets(self):
        text = read_bytes(corpus_path("secrets.log")).decode("utf-8")
        for secret in self.SECRETS:
            self.assertIn(secret, text)

    def test_no_secret_of_the_secrets_log_survives_masking(self):
        masked = "\n".join(hpcrun.mask_secrets(line) for line in tail_lines(corpus_path("secrets.log")))
        for secret in self.SECRETS:
            with self.subTest(secret):
                self.assertNotIn(secret, masked)
        self.assertIn("epoch 1/30 step 40/800 loss=2.514", masked, "ordinary lines stay readable")



# --- titles and messages ---

class TitleTest(TempDirTestCase):

    def report(self, language, log=None, **fields):
        if log is not None:
            self.write("logs/train.log", log)
        return hpcrun.build_report(self.record(**fields), self.config(language=language), self.dir)

    def test_titles_in_both_languages(self):
        oom_log = read_bytes(corpus_path("pytorch_cuda_oom_new.log"))
        cases = [
            ("success", dict(status="success", exit_code=0, duration=3 * 3600 + 12 * 60), b"done\n",
             "✅ 训练完成 resnet50 · 3h12m", "✅ Training finished resnet50 · 3h12m"),
            ("failure with a label", dict(), oom_log,
             "❌ 训练失败 resnet50 · CUDA OOM · exit 1", "❌ Training failed resnet50 · CUDA OOM · exit 1"),
            ("failure without a label", dict(exit_code=3), b"bye\n",
             "❌ 训练失败 resnet50 · exit 3", "❌ Training failed resnet50 · exit 3"),
            ("time limit", dict(status="terminated", exit_code=143, signal="SIGTERM", cause="time_limit",
                                duration=12 * 3600), b"step 5\n",
             "⏰ 超时被终止 resnet50 · 12h00m", "⏰ Time limit reached resnet50 · 12h00m"),
            ("killed", dict(status="killed", exit_code=137, signal="SIGKILL", cause="oom"), b"step 5\n",
             "💀 训练被杀死 resnet50 · 内存不足 · SIGKILL", "💀 Training killed resnet50 · OOM · SIGKILL"),
            ("terminated", dict(status="terminated", exit_code=143, signal="SIGTERM", cause="cancelled"),
             b"step 5\n",
             "🛑 训练被终止 resnet50 · 被取消 · SIGTERM", "🛑 Training terminated resnet50 · cancelled · SIGTERM"),
        ]
        for label, fields, log, zh, en in cases:
            for language, title in (("zh", zh), ("en", en)):
                with self.subTest(label, language=language):
                    self.assertEqual(self.report(language, log, **fields).title, title)

    def test_the_first_header_line_is_the_cause_in_both_languages(self):
        oom_log = read_bytes(corpus_path("pytorch_cuda_oom_new.log"))
        for language, start in (("zh", "原因: CUDA 显存不足 — torch.OutOfMemoryError: "),
                                ("en", "Cause: CUDA out of memory — torch.OutOfMemoryError: ")):
            with self.subTest(language):
                header = self.report(language, oom_log).header
                self.assertTrue(header[0].startswith(start), header)

    def test_every_message_exists_in_both_languages_with_the_same_fields(self):
        self.assertEqual(sorted(hpcrun.LANGUAGES), ["en", "zh"])
        self.assertEqual(sorted(hpcrun.MESSAGES["zh"]), sorted(hpcrun.MESSAGES["en"]))

        def fields(text):
            return sorted(name for _, name, _, _ in string.Formatter().parse(text) if name)

        for key in hpcrun.MESSAGES["en"]:
            with self.subTest(key):
                self.assertTrue(hpcrun.MESSAGES["zh"][key] and hpcrun.MESSAGES["en"][key])
                self.assertEqual(fields(hpcrun.MESSAGES["zh"][key]), fields(hpcrun.MESSAGES["en"][key]))

    def test_every_cause_has_a_sentence_and_a_short_label_in_both_languages(self):
        causes = sorted({cause for cause, _, _ in hpcrun.FAILURE_PATTERNS} - {"exception"}
                        | set(hpcrun.TRUSTED_CAUSES))
        for language in hpcrun.LANGUAGES:
            for cause in causes:
                with self.subTest(language=language, cause=cause):
                    self.assertIn("cause_" + cause, hpcrun.MESSAGES[language])
                    self.assertIn("label_" + cause, hpcrun.MESSAGES[language])


# --- [report] templates ---

class TemplateTest(TempDirTestCase):

    def test_title_and_header_templates_use_named_fields(self):
        self.write("logs/train.log", read_bytes(corpus_path("pytorch_cuda_oom_new.log")))
        config = self.config({"report": {
            "title_template": "{status}: {name} [{cause}] exit {exit_code} after {duration}",
            "header_template": "run {run_id} on {host}\\nprogress {progress}\\nlog {log_file}"}})
        report = hpcrun.build_report(self.record(), config, self.dir)
        self.assertEqual(report.title, "failed: resnet50 [cuda_oom] exit 1 after 5m00s")
        self.assertEqual(report.header, ["run 20240501_090000_gpu-a017_4242 on gpu-a017",
                                         "progress epoch 1/50 · 7% 58/782", "log logs/train.log"])

    def test_every_documented_template_field_can_be_used(self):
        self.write("logs/train.log", b"epoch 1/2\n")
        everything = " ".join("{%s}" % name for name in hpcrun.TEMPLATE_FIELDS)
        config = self.config({"report": {"title_template": everything, "header_template": everything}})
        report = hpcrun.build_report(self.record(), config, self.dir)
        self.assertIn("resnet50", report.title)
        self.assertIn("gpu-a017", report.header[0])
        for name in ("name", "status", "cause", "duration", "exit_code", "host", "job_id", "progress"):
            self.assertIn(name, hpcrun.TEMPLATE_FIELDS, "issue 5 names {%s}" % name)


class TemplateConfigErrorTest(InProcess, HpcrunTestCase):

    def test_a_bad_template_is_a_config_error_naming_the_template_not_a_crash(self):
        cases = [
            ("title_template", "{name} {nmae}", "nmae"),
            ("header_template", "{name}\\n{exitcode}", "exitcode"),
            ("title_template", "{name", "title_template"),
            ("header_template", "{} {name}", "header_template"),
        ]
        for key, template, needle in cases:
            with self.subTest(key=key, template=template):
                config = self.sb.write_config({"notify": {"channels": "console"},
                                               "report": {key: template}})
                result = self.hpcrun("monitor", "--once", "--work-dir", self.sb.work)
                self.assertExit(result, 2)
                line = self.assertOneErrorLine(result, "[report] " + key, needle)
                self.assertIn(config, line)


# --- fitting a channel's limit ---

CHANNEL_LIMITS = [("xxtui", 4000, "chars"), ("wecom", 2048, "bytes"), ("ntfy", 4096, "bytes"),
                  ("telegram", 4096, "chars"), ("discord", 2000, "chars")]
CHINESE_LINE = "第%03d步：训练损失稳步下降，验证集准确率持续提升，显存占用保持平稳。" * 5


class FitTextTest(TempDirTestCase):

    def chinese_report(self, max_chars=100000, lines=50):
        log = "".join((CHINESE_LINE % ((i,) * 5)) + "\n" for i in range(1, 121))
        log += ("Traceback (most recent call last):\n"
                '  File "/home/张三/项目/train.py", line 120, in <module>\n'
                "    batch = next(loader_iter)\n"
                "RuntimeError: 数据加载失败：第 7 号分片损坏\n")
        self.write("logs/train.log", log)
        config = self.config({"report": {"max_chars": str(max_chars), "include_last_n_lines": str(lines)}},
                             language="zh")
        return hpcrun.build_report(self.record(), config, self.dir)

    def size(self, text, unit):
        return len(text.encode("utf-8")) if unit == "bytes" else len(text)

    def cut_text(self, report, text, limit, unit):
        """(log lines kept, the number the marker says were cut) of a text that must fit."""
        self.assertLessEqual(self.size(text, unit), limit)
        head = "\n".join(report.header)
        self.assertTrue(text.startswith(head), "the header does not survive whole")
        self.assertTrue(report.header[0].startswith("原因: Python 异常 — RuntimeError: 数据加载失败"),
                        report.header[0])
        rest = text[len(head):].split("\n")
        self.assertGreaterEqual(len(rest), 3, "no cut marker after the header: %r" % text[len(head):])
        self.assertEqual(rest[:2], ["", ""], "a blank line between header and tail")
        marker = re.match(r"^…（已截断 (\d+) 行）$", rest[2])
        self.assertTrue(marker, "no visible cut marker in %r" % rest[:3])
        kept = rest[3:]
        log_lines = report.tail[1:]
        self.assertEqual(kept, log_lines[len(log_lines) - len(kept):] if kept else [],
                         "the newest lines are kept, in order")
        return kept, int(marker.group(1))

    def test_each_channel_limit_is_kept_with_header_cause_and_the_newest_lines(self):
        report = self.chinese_report()
        self.assertGreater(self.size("\n".join(report.tail), "chars"), 5000)
        for channel, limit, unit in CHANNEL_LIMITS:
            with self.subTest(channel):
                kept, _ = self.cut_text(report, report.text(limit, unit), limit, unit)
                self.assertTrue(kept, "no log line left at all")
                self.assertEqual(kept[-1], "RuntimeError: 数据加载失败：第 7 号分片损坏")

    def test_the_cut_marker_counts_the_log_lines_cut(self):
        report = self.chinese_report()
        for channel, limit, unit in CHANNEL_LIMITS:
            with self.subTest(channel):
                kept, said = self.cut_text(report, report.text(limit, unit), limit, unit)
                self.assertEqual(said, len(report.tail) - 1 - len(kept),
                                 "%d log lines shown of %d" % (len(kept), len(report.tail) - 1))

    def test_max_chars_bounds_the_text_too(self):
        report = self.chinese_report(max_chars=1500)
        kept, _ = self.cut_text(report, report.text(4000), 1500, "chars")
        self.assertTrue(kept)

    def test_a_limit_with_no_room_for_any_log_line_still_shows_the_marker(self):
        report = self.chinese_report()
        head = "\n".join(report.header)
        limit = self.size(head, "bytes") + 40
        kept, _ = self.cut_text(report, report.text(limit, "bytes"), limit, "bytes")
        self.assertEqual(kept, [])

    def test_a_header_longer_than_the_limit_keeps_the_cause_first(self):
        report = self.chinese_report()
        self.assertGreater(self.size("\n".join(report.header), "bytes"), 200)
        text = report.text(150, "bytes")
        self.assertLessEqual(self.size(text, "bytes"), 150)
        self.assertTrue(text.startswith(report.header[0] + "\n"), text)


if __name__ == "__main__":
    unittest.main()
