"""Reports that say why (issue 5), end to end: the real hpcrun.py wraps a training (a corpus
log, a loss gone NaN, a traceback, evaluation output), then monitor --once reports it on the
console or to xxtui. The rest of the report tests run in process: test_reports.py."""

import os
import sys
import unittest

from support import HpcrunTestCase, read_records
from test_reports import EXPECTED, corpus_path, is_nan

LAYER = "process"


class MetricEndToEndTest(HpcrunTestCase):

    def test_wrap_keeps_a_nan_printed_just_before_the_training_dies(self):
        self.sb.write_config({"notify": {"channels": "console"}})
        script = self.sb.write_file("train.py", (
            "import sys\n"
            "print('step 1 loss=2.31', flush=True)\n"
            "print('step 2 loss=1.52', flush=True)\n"
            "print('step 3 loss=nan', flush=True)\n"
            "sys.exit(1)\n"), secret=False)
        result = self.wrap(sys.executable, script)
        self.assertExit(result, 1)
        record = list(read_records(self.sb.work, "done").values())[0]
        values = (record.get("metric") or {}).get("values") or []
        self.assertTrue(values and is_nan(values[-1]),
                        "the record's loss sample %r misses the final nan" % values)

    # Each burst reaches the relay as a read of its own: the training waits until its log
    # (HPCRUN_LOG_FILE) holds the burst before it prints the next one. All of it within the
    # wrapper's one-second sample interval, as a fast run or a crash does.
    BURSTS = (
        "import os, sys, time\n"
        "def burst(text):\n"
        "    sys.stdout.write(text)\n"
        "    sys.stdout.flush()\n"
        "    deadline = time.time() + 10\n"
        "    while time.time() < deadline:\n"
        "        with open(os.environ['HPCRUN_LOG_FILE']) as log:\n"
        "            if log.read().endswith(text):\n"
        "                return\n"
        "        time.sleep(0.005)\n")

    def wrapped_report(self, bursts, exit_code):
        self.sb.write_config({"notify": {"channels": "console", "language": "en"}})
        script = self.sb.write_file("train.py", self.BURSTS + "".join(
            "burst(%r)\n" % text for text in bursts) + "sys.exit(%d)\n" % exit_code, secret=False)
        self.assertExit(self.wrap(sys.executable, script), exit_code)
        record = list(read_records(self.sb.work, "done").values())[0]
        report = self.hpcrun("monitor", "--once", "--work-dir", self.sb.work)
        return record, report.out

    def test_the_last_loss_before_a_traceback_is_the_last_value_of_the_trend(self):
        record, report = self.wrapped_report(
            ["step 1 loss=1.0\n", "step 2 loss=0.5\n",
             "Traceback (most recent call last):\n  File \"t.py\", line 1, in <module>\n"
             "ValueError: bad batch\n"], 1)
        self.assertEqual(record["metric"]["values"][-1], 0.5, record)
        self.assertIn("loss 1 → 0.5", report)
        self.assertIn("Progress: step 2", report)

    def test_progress_and_loss_are_the_last_ones_before_evaluation_output(self):
        training = "".join("epoch %d step %d loss=%.4f\n" % (step // 1000, step, 3.0 - step / 1000.0)
                           for step in range(3000))
        evaluation = "".join("eval batch %d/200 acc=0.9\n" % i for i in range(1, 201))
        record, report = self.wrapped_report([training, evaluation], 0)
        self.assertEqual(record["progress"], "epoch 2 · step 2999", record)
        self.assertEqual(record["metric"]["values"][-1], 0.001, record)
        self.assertIn("Progress: epoch 2 · step 2999", report)
        self.assertRegex(report, r"loss 3 → 0\.001 ")


class SecretsTest(HpcrunTestCase):

    SECRETS = EXPECTED["secrets.log"]["secrets"]

    def test_no_secret_reaches_any_report_through_console_or_xxtui(self):
        server = self.start_server()
        self.configure_xxtui(server, overrides={
            "notify": {"channels": "console, xxtui", "language": "en"},
            "report": {"include_last_n_lines": "200", "max_chars": "100000"}})
        result = self.wrap("cat %s; exit 1" % corpus_path("secrets.log"), extra=["--name", "leaky"])
        self.assertExit(result, 1)
        result = self.hpcrun("monitor", "--once", "--work-dir", self.sb.work)
        self.assertExit(result, 0)
        self.assertRequestCount(1, context=result)
        self.assertServerClean()
        body = server.bodies[0]
        console = result.out
        self.assertIn("❌ Training failed leaky · HTTPError · exit 1", console)
        self.assertEqual(body["title"], "❌ Training failed leaky · HTTPError · exit 1")
        for where, text in (("console", console), ("xxtui title", body["title"]),
                            ("xxtui content", body["content"])):
            for secret in self.SECRETS:
                with self.subTest(where=where, secret=secret):
                    self.assertNotIn(secret, text)
        self.assertIn("***", body["content"])
        self.assertIn("loss=2.514", body["content"], "the tail is in the report")
        self.assertSecretsKept()


# --- wrap, then monitor --once on the console ---

class ReportEndToEndTest(HpcrunTestCase):

    CASES = [
        # (log, how the wrapped command ends, name, language, title, first header line starts with)
        ("pytorch_cuda_oom_new.log", "exit 1", "vit-large", "zh",
         "❌ 训练失败 vit-large · CUDA OOM · exit 1",
         "原因: CUDA 显存不足 — torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.53 GiB."),
        ("torchrun_rank3_oom_nccl_timeouts.log", "exit 1", "llama-pretrain", "en",
         "❌ Training failed llama-pretrain · CUDA OOM · exit 1",
         "Cause: CUDA out of memory — torch.OutOfMemoryError: CUDA out of memory. Tried to allocate "
         "3.91 GiB. GPU 3 "),
        ("chained_exception_hf_offline.log", "exit 1", "bert-offline", "en",
         "❌ Training failed bert-offline · TimeoutError · exit 1",
         "Cause: Python exception — TimeoutError: timed out"),
        ("nan_loss.log", "exit 1", "gpt-small", "zh",
         "❌ 训练失败 gpt-small · NaN loss · exit 1",
         "原因: loss 变成 NaN（训练发散） — iter 4190: loss nan"),
        ("host_oom_bash_killed.log", "kill -KILL $$", "bigmem", "en",
         "💀 Training killed bigmem · killed · SIGKILL",
         "Cause: killed (often: out of memory) — /var/spool/slurmd/job884213/slurm_script: line 24: "
         "48213 Killed"),
    ]

    def test_title_carries_the_short_label_and_the_header_starts_with_the_cause(self):
        for log, ending, name, language, _, _ in self.CASES:
            self.wrap("cat %s; %s" % (corpus_path(log), ending), work=self.work_for(language),
                      extra=["--name", name])
        outputs = {}
        for language in ("zh", "en"):
            self.sb.write_config({"notify": {"channels": "console", "language": language}})
            result = self.hpcrun("monitor", "--once", "--work-dir", self.work_for(language))
            self.assertExit(result, 0)
            outputs[language] = result.out.splitlines()
        for log, _, name, language, title, cause in self.CASES:
            with self.subTest(log):
                lines = outputs[language]
                self.assertIn(title, lines)
                header = lines[lines.index(title) + 1]
                self.assertTrue(header.startswith(cause), "first header line: %r" % header)

    def test_rank_prefixes_stay_in_the_reported_tail(self):
        self.sb.write_config({"notify": {"channels": "console", "language": "en"},
                              "report": {"include_last_n_lines": "400", "max_chars": "100000"}})
        self.wrap("cat %s; exit 1" % corpus_path("torchrun_rank3_oom_nccl_timeouts.log"))
        result = self.hpcrun("monitor", "--once", "--work-dir", self.sb.work)
        self.assertExit(result, 0)
        self.assertIn("\n[rank3]: torch.OutOfMemoryError: CUDA out of memory.", result.out)
        self.assertIn("\n[rank5]:[E501 11:52:18.901233824 ProcessGroupNCCL.cpp:616] [Rank 5] Watchdog",
                      result.out)

    def test_time_limit_from_the_scheduler_line_gives_the_time_limit_title(self):
        self.sb.write_config({"notify": {"channels": "console", "language": "zh"}})
        self.wrap("cat %s; exit 143" % corpus_path("slurm_time_limit.log"), extra=["--name", "llm"])
        result = self.hpcrun("monitor", "--once", "--work-dir", self.sb.work)
        self.assertExit(result, 0)
        lines = result.out.splitlines()
        titles = [line for line in lines if line.startswith("⏰ 超时被终止 llm · ")]
        self.assertEqual(len(titles), 1, result.out)
        self.assertRegex(titles[0], r"^⏰ 超时被终止 llm · \d+s$")
        self.assertTrue(lines[lines.index(titles[0]) + 1].startswith(
            "原因: 达到作业时间上限 — slurmstepd: error: *** STEP 884213.0 ON gpu-a017 CANCELLED"))

    def work_for(self, language):
        path = os.path.join(self.sb.root, "work-" + language)
        os.makedirs(path, exist_ok=True)
        return path


class TemplateConfigErrorTest(HpcrunTestCase):

    def test_a_template_that_cannot_format_a_real_value_never_crashes_the_monitor(self):
        # "{exit_code:.3}" formats the empty string the check uses, but not the integer 1.
        self.sb.write_config({"notify": {"channels": "console"},
                              "report": {"title_template": "{name} exit {exit_code:.3}"}})
        self.wrap("echo hi; exit 1")
        result = self.hpcrun("monitor", "--once", "--work-dir", self.sb.work)
        self.assertNoTraceback(result)
        if result.returncode == 2:
            self.assertOneErrorLine(result, "[report] title_template")
        else:
            self.assertExit(result, 0)
            self.assertEqual(len(read_records(self.sb.work, "sent")), 1, "the run was not reported")


if __name__ == "__main__":
    unittest.main()
