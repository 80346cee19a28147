"""GPU-waste guard (issue 15): one long-lived nvidia-smi per run, gpu_idle and gpu_unused while
the training runs, the NCCL-hang note of a stalled report, the end-of-run card, the cost.

A fake nvidia-smi (tests/fake_nvidia_smi.py) is first on PATH. It prints rows in the real
`--query-gpu ... --format=csv,noheader,nounits` format as the test appends them; the rows'
timestamps are the test's clock, so an hour of idle GPUs takes as long as writing the rows.
"""

import json
import os
import sys
import threading
import time
import tracemalloc
import unittest
from unittest import mock

from support import read_records, wait_for
from support import names_in
from test_operations import HOST, OperationsTestCase, report_kind

import hpcrun

LAYER = "process"

FAKE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_nvidia_smi.py")
# 2026-11-02 10:00:00 local time: a day far from any daylight-saving change
T0 = time.mktime((2026, 11, 2, 10, 0, 0, 0, 0, -1))
A100 = "NVIDIA A100-SXM4-80GB"
UUIDS = ["GPU-8932f937-d72c-4106-c12f-20bd9faed9f6", "GPU-3e34e62f-d88e-f448-415e-be2cbf2c6178",
         "GPU-7fdaf0a5-179b-f636-d15d-daf243e3ff16", "GPU-67a571b1-79ee-1016-8ea3-c1fff3f1c1d2"]
# nvidia-smi -L of a node whose GPU 2 is split into MIG devices
MIG_LIST = ("GPU 0: NVIDIA A100-SXM4-80GB (UUID: GPU-8932f937-d72c-4106-c12f-20bd9faed9f6)\n"
            "GPU 1: NVIDIA A100-SXM4-80GB (UUID: GPU-3e34e62f-d88e-f448-415e-be2cbf2c6178)\n"
            "GPU 2: NVIDIA A100-SXM4-80GB (UUID: GPU-7fdaf0a5-179b-f636-d15d-daf243e3ff16)\n"
            "  MIG 1g.10gb     Device  0: (UUID: MIG-feb88891-0321-5fef-9c87-d4af3b54259e)\n"
            "  MIG 1g.10gb     Device  1: (UUID: MIG-2c1b4f0e-8e3a-5d3c-9a51-0f1e2d3c4b5a)\n"
            "GPU 3: NVIDIA A100-SXM4-80GB (UUID: GPU-67a571b1-79ee-1016-8ea3-c1fff3f1c1d2)\n")


def row(when, index, util, mem=61234, power=312.45, total=81920, limit=400.0, name=A100, uuid=None):
    """One row as nvidia-smi prints it: its own millisecond timestamp, [N/A] for None."""
    stamp = time.strftime("%Y/%m/%d %H:%M:%S", time.localtime(when)) + ".%03d" % (417 + 2 * index)
    shown = ["[N/A]" if value is None else value for value in (util, mem, total)]
    watts = ["[N/A]" if value is None else "%.2f" % value for value in (power, limit)]
    return "%s, %d, %s, %s, %s, %s, %s, %s, %s" % (stamp, index, uuid or UUIDS[index], name, shown[0], shown[1],
                                                   shown[2], watts[0], watts[1])


class GpuTestCase(OperationsTestCase):
    """A fake nvidia-smi on PATH, a job with four GPUs, samples a minute apart on the test clock."""

    BASE = {"notify": {"channels": "xxtui", "language": "en"},
            "wrap": {"heartbeat_interval": "1"},
            # five seconds between rows: a run with no row for 25 s is a hung nvidia-smi
            "gpu": {"sample_interval": "5"}}

    def setUp(self):
        OperationsTestCase.setUp(self)
        self.fake = self.sb.make_dir("fake-gpu")
        tools = self.sb.make_dir("gpu-bin")
        script = self.sb.write_file(os.path.join(tools, "nvidia-smi"), "#!/bin/sh\nexec '%s' '%s' \"$@\"\n" % (
            sys.executable, FAKE), secret=False)
        os.chmod(script, 0o755)
        self.env["PATH"] = tools + os.pathsep + self.env.get("PATH", "/usr/bin:/bin")
        self.env["FAKE_GPU_DIR"] = self.fake
        self.env["CUDA_VISIBLE_DEVICES"] = "0,1,2,3"
        self.clock = T0
        self.sample_count = 0
        self.rows("")

    def reports(self, name=None):
        """(kind, body) of every push (about name), the GPU events by their titles."""
        return [(report_kind(body["title"]), body) for body in self.server.bodies
                if name is None or names_in(body["title"], name)]

    def rows(self, text, mode="a"):
        with open(os.path.join(self.fake, "rows"), mode, encoding="utf-8") as stream:
            stream.write(text)

    def set_mode(self, mode):
        with open(os.path.join(self.fake, "mode"), "w") as stream:
            stream.write(mode)

    def sample(self, utils, count=1, step=60, **values):
        """count samples, step seconds apart on the test clock: utils[i] is GPU i's utilisation."""
        lines = []
        for _ in range(count):
            lines += [row(self.clock, index, util, **values) for index, util in enumerate(utils)]
            self.clock += step
            self.sample_count += 1
        self.rows("\n".join(lines) + "\n")

    def calls(self):
        try:
            with open(os.path.join(self.fake, "calls"), encoding="utf-8") as stream:
                return [line.split(" ", 1) for line in stream.read().splitlines()]
        except OSError:
            return []

    def gpu_stats(self, work):
        records = list(read_records(work, "running").values())
        return records[0].get("gpu_stats") if records else None

    def wait_samples(self, work, count=None, background=None):
        """Wait until wrap's heartbeat holds count samples (all written so far) of every GPU it
        watches."""
        count = self.sample_count if count is None else count

        def seen():
            stats = self.gpu_stats(work)
            return stats and all(gpu["samples"] >= count for gpu in stats["gpus"])
        self.assertTrue(wait_for(seen, timeout=20), "wrap's heartbeat never held %d samples: %r%s" % (
            count, self.gpu_stats(work), background.result().describe() if background else ""))
        return self.gpu_stats(work)

    def monitor_once(self, work):
        result = self.hpcrun("monitor", "--once", "--work-dir", work)
        self.assertExit(result, 0)
        return result

    def start_gpu_training(self, work, name):
        return self.start_training(work, name)


class IdleTest(GpuTestCase):

    def test_idle_gpus_get_one_alert_per_streak_and_one_more_after_as_long_again(self):
        self.configure(cost={"gpu_hour": "8"})
        work = self.sb.make_dir("idle")
        training = self.start_gpu_training(work, "stuck-loader")
        # 40 samples a minute apart, every GPU at 0 %: idle for 39 minutes (idle_after: 30)
        self.sample([0, 0, 0, 0], count=41)
        self.wait_samples(work, background=training)
        self.monitor_once(work)
        self.monitor_once(work)
        alerts = self.bodies("gpu_idle", "stuck-loader")
        self.assertEqual(len(alerts), 1, self.server.describe())
        text = alerts[0]["title"] + "\n" + alerts[0]["content"]
        self.assertIn("all 4 GPUs of the job at or below 5% for 40m00s", text)
        # the cost burned idle: 4 GPUs for 40 minutes at 8 an hour
        self.assertIn("Cost: 2.7 GPU-h ≈ ¥21", text)
        self.assertRegex(text, r"Last output: epoch 3/10 loss 0\.42 \(\d+s ago\)")
        self.assertIn("Cancel the job: ssh %s kill " % HOST, text)
        # idle for another 30 minutes (70 in all): the second and last alert of this streak
        self.sample([0, 0, 0, 0], count=30)
        self.wait_samples(work, background=training)
        self.monitor_once(work)
        self.assertEqual(len(self.bodies("gpu_idle", "stuck-loader")), 2, self.server.describe())
        self.assertIn("for 1h10m", self.bodies("gpu_idle", "stuck-loader")[1]["content"])
        self.sample([0, 0, 0, 0], count=40)
        self.wait_samples(work, background=training)
        self.monitor_once(work)
        self.assertEqual(len(self.bodies("gpu_idle", "stuck-loader")), 2, self.server.describe())
        # the GPUs worked for a minute and fell idle again: a new streak, a new alert
        self.sample([90, 90, 90, 90])
        self.sample([0, 0, 0, 0], count=35)
        self.wait_samples(work, background=training)
        self.monitor_once(work)
        self.assertEqual(len(self.bodies("gpu_idle", "stuck-loader")), 3, self.server.describe())
        self.assertIn("for 34m00s", self.bodies("gpu_idle", "stuck-loader")[2]["content"])
        self.go(work)
        self.assertExit(self.finish(training), 0)
        self.monitor_once(work)
        self.assertEqual(self.kinds("stuck-loader").count("success"), 1, self.server.describe())
        self.assertNotIn("gpu_unused", self.kinds("stuck-loader"))
        self.assertSecretsKept()

    def test_one_gpu_of_four_busy_gets_one_gpu_unused_and_the_card_names_the_idle_ones(self):
        self.configure()
        work = self.sb.make_dir("ddp")
        training = self.start_gpu_training(work, "cuda0-only")
        self.sample([97, 0, 0, 0], count=26)
        self.wait_samples(work, background=training)
        self.monitor_once(work)
        self.sample([97, 0, 0, 0], count=60)
        self.wait_samples(work, background=training)
        self.monitor_once(work)
        alerts = self.bodies("gpu_unused", "cuda0-only")
        self.assertEqual(len(alerts), 1, self.server.describe())
        self.assertIn("3 of 4 GPUs unused for 25m00s: is the launch using all devices?", alerts[0]["content"])
        self.assertIn("3 of 4 idle", alerts[0]["title"])
        self.assertIn("Cost: 1.2 GPU-h\n", alerts[0]["content"])   # 3 GPUs idle for 25 minutes
        self.assertNotIn("gpu_idle", self.kinds("cuda0-only"))
        self.go(work)
        self.assertExit(self.finish(training), 0)
        self.monitor_once(work)
        end = self.bodies("success", "cuda0-only")[0]["content"]
        self.assertRegex(end, r"GPUs: 4× A100-SXM4-80GB · util 24 % avg \(min GPU 1: 0 %\) · .* · "
                              r"unused: GPU 1, 2, 3")

    def test_a_busy_job_gets_no_alert_and_a_card_with_the_replayed_numbers(self):
        self.configure()
        work = self.sb.make_dir("busy")
        training = self.start_gpu_training(work, "busy")
        utils = [[97, 88, 91, 40], [95, 90, 93, 44], [99, 86, 89, 36]]
        memory = [[61234, 70012, 72704, 30000], [61300, 70100, 72000, 30100], [61000, 69000, 72500, 29000]]
        power = [[312.45, 298.10, 305.00, 150.25], [320.00, None, 301.55, 149.75], [318.20, 290.40, 299.95, None]]
        rows = []
        for k in range(60):   # an hour: the three samples above, over and over
            rows += [row(self.clock, i, utils[k % 3][i], mem=memory[k % 3][i], power=power[k % 3][i])
                     for i in range(4)]
            self.clock += 60
            self.sample_count += 1
        self.rows("\n".join(rows) + "\n")
        self.sample([90, 90, 90, 40], mem=10, power=300.0)
        self.wait_samples(work, background=training)
        self.monitor_once(work)
        self.assertEqual(self.kinds("busy"), [], self.server.describe())
        self.go(work)
        self.assertExit(self.finish(training), 0)
        self.monitor_once(work)
        self.assertEqual(self.kinds("busy"), ["success"], self.server.describe())
        # what the card must say, worked out from the rows ([N/A] is unknown, not zero)
        stats = self.done_stats(work)
        count = len(stats["gpus"])
        per_gpu = [(sum(utils[k % 3][i] for k in range(60)) + (40 if i == 3 else 90)) / 61.0 for i in range(4)]
        watts = []
        for i in range(4):
            known = [power[k % 3][i] for k in range(60) if power[k % 3][i] is not None] + [300.0]
            watts.append(sum(known) / len(known))
        self.assertEqual(count, 4)
        self.assertEqual([gpu["samples"] for gpu in stats["gpus"]], [61] * 4)
        card = "GPUs: 4× A100-SXM4-80GB · util %d %% avg (min GPU 3: %d %%) · memory max %d/80 GiB · " \
               "power %d/400 W avg" % (round(sum(round(u, 1) for u in per_gpu) / 4), round(round(per_gpu[3], 1)),
                                       round(72704 / 1024.0), round(sum(round(w, 1) for w in watts) / 4))
        self.assertIn(card + "\n", self.bodies("success", "busy")[0]["content"])

    def done_stats(self, work):
        records = list(read_records(work, "sent").values()) + list(read_records(work, "done").values())
        return [record for record in records if record.get("gpu_stats")][0]["gpu_stats"]

    def test_a_mig_slice_reads_unknown_utilisation_and_is_never_called_idle(self):
        with open(os.path.join(self.fake, "list"), "w") as stream:
            stream.write(MIG_LIST)
        self.env["CUDA_VISIBLE_DEVICES"] = "MIG-feb88891-0321-5fef-9c87-d4af3b54259e"
        self.configure()
        work = self.sb.make_dir("mig")
        training = self.start_gpu_training(work, "mig-slice")
        # the MIG-enabled parent (GPU 2) reads [N/A] utilisation; the others are someone else's
        for _ in range(41):
            self.rows("".join(row(self.clock, i, None if i == 2 else 0, mem=36537 if i == 2 else 4,
                                  power=87.0 if i == 2 else 61.02) + "\n" for i in range(4)))
            self.clock += 60
            self.sample_count += 1
        stats = self.wait_samples(work, background=training)
        self.assertEqual([gpu["uuid"] for gpu in stats["gpus"]], [UUIDS[2]])
        self.assertIsNone(stats["gpus"][0]["util_mean"])
        self.monitor_once(work)
        self.assertEqual(self.kinds("mig-slice"), [], self.server.describe())
        self.go(work)
        self.assertExit(self.finish(training), 0)
        self.monitor_once(work)
        end = self.bodies("success", "mig-slice")[0]["content"]
        self.assertIn("GPUs: 1× A100-SXM4-80GB · memory max 36/80 GiB · power 87/400 W avg\n", end)

    def test_gpus_named_by_uuid_prefix_are_the_only_ones_counted(self):
        self.env["CUDA_VISIBLE_DEVICES"] = "GPU-3e34e62f,GPU-67a571b1"
        self.configure()
        work = self.sb.make_dir("uuid")
        training = self.start_gpu_training(work, "by-uuid")
        self.sample([99, 0, 98, 0], count=3)
        stats = self.wait_samples(work, background=training)
        self.assertEqual([gpu["index"] for gpu in stats["gpus"]], [1, 3])
        self.go(work)
        self.assertExit(self.finish(training), 0)


class StalledTest(GpuTestCase):

    def stalled_report(self, name, utils, power):
        self.configure(monitor={"stall_after": "1"})
        work = self.sb.make_dir(name)
        self.sample(utils, count=3, power=power)
        training = self.start_gpu_training(work, name)
        self.wait_samples(work, background=training)
        monitor = self.monitor(work)   # the log is silent from now on, the GPUs' state on disk
        self.wait_for_reports("stalled", name=name, timeout=30)
        self.go(work)
        self.assertExit(self.finish(training), 0)
        self.wait_for_reports("success", name=name)
        self.stop(monitor)
        return self.bodies("stalled", name)[0]["content"]

    def test_full_utilisation_at_idle_power_and_a_silent_log_reads_probable_nccl_hang(self):
        text = self.stalled_report("allreduce", [100, 100, 100, 100], 71.5)
        self.assertIn("GPUs now: GPU0 100 % 72 W · GPU1 100 % 72 W · GPU2 100 % 72 W · GPU3 100 % 72 W", text)
        self.assertIn("probable NCCL hang", text)

    def test_full_utilisation_at_full_power_is_work_not_a_hang(self):
        text = self.stalled_report("long-eval", [100, 100, 100, 100], 350.0)
        self.assertIn("GPUs now: GPU0 100 % 350 W", text)
        self.assertNotIn("NCCL", text)


class FaultTest(GpuTestCase):
    """nvidia-smi missing, failing, hanging or printing garbage: one warning, the training untouched."""

    TRAINING = "echo 'epoch 1/1 loss 0.5'; exit 3"
    # ends once nvidia-smi has started (and, for a nvidia-smi that exits, once wrap reaped it)
    AFTER_NVIDIA_SMI = ('while [ ! -s "$FAKE_GPU_DIR/calls" ]; do sleep 0.02; done; '
                        'pid=$(cut -d" " -f1 "$FAKE_GPU_DIR/calls"); ')
    AFTER_EXIT = 'while kill -0 "$pid" 2>/dev/null; do sleep 0.02; done; '

    def assert_untouched(self, result):
        self.assertExit(result, 3)
        self.assertIn("epoch 1/1 loss 0.5", result.out)
        record = self.only_record()[1]
        self.assertEqual((record["status"], record["exit_code"]), ("failed", 3))
        return record

    def warnings(self, result):
        return [line for line in result.err.splitlines() if "GPU sampling off" in line]

    def test_nvidia_smi_without_a_driver_is_one_warning(self):
        self.set_mode("fail")
        result = self.wrap(self.AFTER_NVIDIA_SMI + self.AFTER_EXIT + self.TRAINING)
        record = self.assert_untouched(result)
        self.assertEqual(self.warnings(result), ["hpcrun: warning: GPU sampling off: nvidia-smi exited "
                                                 "with status 9"], result.describe())
        self.assertIsNone(record.get("gpu_stats"))

    def test_a_hanging_nvidia_smi_is_stopped_with_the_training(self):
        self.set_mode("hang")
        result = self.wrap(self.AFTER_NVIDIA_SMI + self.TRAINING)
        self.assert_untouched(result)
        calls = self.calls()
        self.assertEqual(len(calls), 1, calls)
        # it ignores SIGTERM: wrap killed it before it exited
        self.assertFalse(os.path.exists("/proc/%s" % calls[0][0]) and
                         "fake_nvidia_smi" in open("/proc/%s/cmdline" % calls[0][0]).read(), calls)

    def test_no_nvidia_smi_on_a_gpu_job_is_one_warning_and_on_a_cpu_job_none(self):
        self.env["PATH"] = os.pathsep.join(part for part in self.env["PATH"].split(os.pathsep)
                                           if not part.endswith("gpu-bin"))
        result = self.wrap(self.TRAINING)
        self.assert_untouched(result)
        self.assertEqual(len(self.warnings(result)), 1, result.describe())
        self.assertIn("nvidia-smi is not on PATH", self.warnings(result)[0])
        for visible in (None, "", "NoDevFiles"):
            with self.subTest(CUDA_VISIBLE_DEVICES=visible):
                env = dict(self.env)
                env.pop("CUDA_VISIBLE_DEVICES")
                if visible is not None:
                    env["CUDA_VISIBLE_DEVICES"] = visible
                result = self.wrap(self.TRAINING, env=env, work=self.sb.make_dir("cpu-%r" % visible))
                self.assertExit(result, 3)
                self.assertEqual(self.warnings(result), [], result.describe())

    def test_enabled_no_starts_no_nvidia_smi(self):
        self.configure(gpu={"enabled": "no"})
        self.sample([0, 0, 0, 0], count=3)
        result = self.wrap(self.TRAINING)
        self.assert_untouched(result)
        self.assertEqual(self.calls(), [])

    def test_one_nvidia_smi_for_the_whole_run_with_the_documented_query(self):
        self.configure(gpu={"sample_interval": "7"})
        self.sample([50, 50, 50, 50], count=3)
        training = self.start_training(self.sb.work, "one-smi")
        self.wait_samples(self.sb.work, background=training)
        self.go(self.sb.work)
        self.assertExit(self.finish(training), 0)
        record = self.only_record()[1]
        self.assertEqual([args for _, args in self.calls()], [
            "--query-gpu=timestamp,index,uuid,name,utilization.gpu,memory.used,memory.total,power.draw,"
            "power.limit --format=csv,noheader,nounits -l 7"])
        self.assertEqual(record["gpu_stats"]["interval"], 7)
        self.assertGreaterEqual(min(gpu["samples"] for gpu in record["gpu_stats"]["gpus"]), 2)


class SamplerTest(unittest.TestCase):
    """GpuSampler in-process with the fake nvidia-smi and an injected clock."""

    def setUp(self):
        self.dir = os.path.realpath(__import__("tempfile").mkdtemp(prefix="hpcrun-gpu-"))
        self.addCleanup(__import__("shutil").rmtree, self.dir, True)
        tools = os.path.join(self.dir, "bin")
        os.mkdir(tools)
        with open(os.path.join(tools, "nvidia-smi"), "w") as stream:
            stream.write("#!/bin/sh\nexec '%s' '%s' \"$@\"\n" % (sys.executable, FAKE))
        os.chmod(os.path.join(tools, "nvidia-smi"), 0o755)
        patcher = mock.patch.dict(os.environ, {"PATH": tools + os.pathsep + os.environ.get("PATH", ""),
                                               "FAKE_GPU_DIR": self.dir})
        patcher.start()
        self.addCleanup(patcher.stop)
        self.now = [1000.0]
        self.warned = []
        self.warning = threading.Event()

    def warn(self, message):
        self.warned.append(message)
        self.warning.set()

    def write(self, name, text):
        with open(os.path.join(self.dir, name), "w") as stream:
            stream.write(text)

    def sampler(self):
        sampler = hpcrun.GpuSampler(["0"], 1, 5.0, self.warn, clock=lambda: self.now[0])
        self.addCleanup(sampler.stop)
        self.assertTrue(sampler.start())
        return sampler

    def assert_stopped_after_silence(self, sampler):
        self.now[0] += 3 * 1 + hpcrun.GPU_START_SLACK + 1
        self.assertTrue(self.warning.wait(15), "no warning")
        self.assertEqual(self.warned, ["GPU sampling off: nvidia-smi printed no row for 3s"])
        self.assertTrue(wait_for(lambda: sampler.process.poll() is not None, timeout=10))

    def test_silence_for_three_intervals_stops_a_hung_nvidia_smi(self):
        self.write("mode", "hang")
        sampler = self.sampler()
        self.assert_stopped_after_silence(sampler)

    def test_garbage_is_skipped_and_only_garbage_is_silence(self):
        self.write("rows", "Xid (PCI:0000:3b:00): 79, GPU has fallen off the bus.\n"
                           "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n"
                           "\x00\xff, 0, 1, 2\n" + row(T0, 0, 42) + "\n" + row(T0 + 30, 0, 44) + "\n")
        sampler = self.sampler()
        self.assertTrue(wait_for(lambda: (sampler.summary() or {"gpus": [{"samples": 0}]})["gpus"][0]["samples"] == 2,
                                 timeout=10))
        self.assertEqual(sampler.summary()["gpus"][0]["util_mean"], 43.0)
        self.assert_stopped_after_silence(sampler)
        self.assertEqual(sampler.summary()["gpus"][0]["samples"], 2)


class UnitTest(unittest.TestCase):

    def test_rows_in_the_real_format_with_unknown_fields(self):
        parsed = hpcrun.parse_gpu_row("2026/11/30 06:10:02.421, 2, GPU-7fdaf0a5-179b-f636-d15d-daf243e3ff16, "
                                      "NVIDIA A100-SXM4-80GB, [N/A], 36537, 81920, 87.00, 400.00\n")
        self.assertEqual((parsed["index"], parsed["util"], parsed["mem_used"], parsed["power"]),
                         (2, None, 36537.0, 87.0))
        old = hpcrun.parse_gpu_row("2026/11/30 06:10:02.422, 3, GPU-67a571b1-79ee-1016-8ea3-c1fff3f1c1d2, "
                                   "Quadro K2000, 12, 800, 2048, [Not Supported], [Not Supported]")
        self.assertEqual((old["name"], old["util"], old["power"], old["power_limit"]), ("Quadro K2000", 12.0, None, None))
        for line in ("", "Xid (PCI:0000:3b:00): 79", "2026/11/30 06:10:02.422, 3, x", "index, uuid",
                     "2026/13/45 06:10:02.422, 0, GPU-1, A100, 1, 2, 3, 4.00, 5.00"):
            self.assertIsNone(hpcrun.parse_gpu_row(line), line)

    def test_the_job_gpus_by_index_uuid_mig_and_renumbered_cgroup(self):
        rows = [hpcrun.parse_gpu_row(row(T0, i, 10 * i)) for i in range(4)]
        parents = hpcrun.mig_parents(MIG_LIST)
        pick = lambda tokens, visible=rows: [r["index"] for r in hpcrun.pick_gpu_rows(visible, tokens, parents)]
        self.assertEqual(pick(["1", "3"]), [1, 3])
        self.assertEqual(pick(["GPU-67a571b1", "GPU-8932f937-d72c-4106-c12f-20bd9faed9f6"]), [3, 0])
        self.assertEqual(pick(["MIG-feb88891-0321-5fef-9c87-d4af3b54259e"]), [2])
        self.assertEqual(pick(["MIG-GPU-3e34e62f-d88e-f448-415e-be2cbf2c6178/1/0"]), [1])
        # a device cgroup shows the job's two GPUs renumbered 0 and 1, whatever Slurm's ids were
        self.assertEqual(pick(["2", "3"], rows[:2]), [0, 1])
        self.assertEqual(pick(["0", "1"], rows[:2]), [0, 1])
        self.assertEqual(hpcrun.job_gpu_tokens({"CUDA_VISIBLE_DEVICES": "GPU-1,GPU-2"}), ["GPU-1", "GPU-2"])
        self.assertEqual(hpcrun.job_gpu_tokens({"SLURM_JOB_GPUS": "4,5"}), ["4", "5"])
        self.assertIsNone(hpcrun.job_gpu_tokens({"CUDA_VISIBLE_DEVICES": "NoDevFiles"}))
        self.assertIsNone(hpcrun.job_gpu_tokens({}))

    def test_a_month_of_samples_stays_within_constant_memory(self):
        sampler = hpcrun.GpuSampler(["0", "1", "2", "3"], 30, 5.0, print)
        rows = [hpcrun.parse_gpu_row(row(T0, i, 50)) for i in range(4)]

        def feed(first, last):
            for k in range(first, last):
                batch = [dict(r, time=T0 + 30 * k, util=float(k % 100)) for r in rows]
                sampler.take(batch)
        month = 30 * 24 * 120   # 30 days of one sample every 30 s
        feed(0, month - 5000)
        tracemalloc.start()
        try:   # the month's last 5000 samples (20000 rows) add nothing that stays
            before = tracemalloc.get_traced_memory()[0]
            feed(month - 5000, month)
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        summary = sampler.summary()
        self.assertEqual(summary["gpus"][0]["samples"], 30 * 24 * 120)
        self.assertLess(grown, 4096, "memory grew by %d bytes over a month of samples" % grown)
        self.assertLess(len(json.dumps(summary)), 3000)

    def test_cost_with_and_without_prices(self):
        config = lambda **cost: hpcrun.load_config(os.devnull, {"cost": cost}, env={})
        messages = hpcrun.MESSAGES["en"]
        job = {"scheduler": "slurm", "id": "42", "gpus": 4, "cpus": 32}
        gpu, cpu = hpcrun.billed_hours(job, None, 3 * 3600 + 7.5 * 60)
        self.assertEqual((gpu, cpu), (12.5, 100.0))
        self.assertEqual(hpcrun.cost_text(gpu, cpu, config(), messages), "12.5 GPU-h")
        self.assertEqual(hpcrun.cost_text(gpu, cpu, config(gpu_hour="9"), messages), "12.5 GPU-h ≈ ¥112")
        self.assertEqual(hpcrun.cost_text(gpu, cpu, config(gpu_hour="9", cpu_hour="0.05", currency="$"), messages),
                         "12.5 GPU-h · 100 core-h ≈ $118")
        self.assertEqual(hpcrun.cost_text(0, cpu, config(), messages), "100 core-h")
        self.assertEqual(hpcrun.cost_text(0, 0.5, config(cpu_hour="0.04"), messages), "0.50 core-h ≈ ¥0.02")
        self.assertIsNone(hpcrun.cost_text(0, 0, config(gpu_hour="9"), messages))
        # the allocation, not the use: no scheduler entry, the GPUs the job was given
        self.assertEqual(hpcrun.billed_hours(None, {"gpus": [{}, {}]}, 1800), (1.0, 0.0))
        # a gpu_idle alert counts the idle time, a release reminder the time since the end
        idle = {"status": "gpu_idle", "job": job, "idle_for": 5400}
        self.assertEqual(hpcrun.report_hours(idle, 99999), (6.0, 0.0))
        reminder = {"status": "release_reminder", "job": job, "since": 1800}
        self.assertEqual(hpcrun.report_hours(reminder, 99999), (2.0, 16.0))
        self.assertEqual(hpcrun.slurm_cpus("72(x2),36"), 180)
        env = {"SLURM_JOB_ID": "7", "SLURM_JOB_GPUS": "0,1,2,3", "SLURM_JOB_NUM_NODES": "2",
               "SLURM_JOB_CPUS_PER_NODE": "64(x2)"}
        self.assertEqual((hpcrun.Slurm().detect(env)["gpus"], hpcrun.Slurm().detect(env)["cpus"]), (8, 128))

    def test_the_array_digest_sums_the_tasks_hours(self):
        config = hpcrun.load_config(os.devnull, {"cost": {"gpu_hour": "10"}, "notify": {"language": "en"}}, env={})
        job = {"scheduler": "slurm", "id": "9", "array_id": "9", "array_index": 0, "gpus": 2, "cpus": 8}
        summaries = [hpcrun.task_summary({"job": dict(job, array_index=i), "status": "success",
                                          "duration": 1800.0 * (i + 1)}, {}, "/w", "r%d" % i) for i in range(3)]
        info = {"key": "slurm-9", "scheduler": "slurm", "id": "9", "size": 3, "first": 0, "last": 2, "step": 1,
                "job": job}
        facts, _ = hpcrun.digest_facts(info, summaries, {}, False)
        self.assertEqual((facts["gpu_hours"], facts["cpu_hours"]), (6.0, 24.0))
        record = {"status": "array_done", "run_id": "x", "name": "sweep", "array": facts}
        report = hpcrun.array_report(record, config, "/nonexistent")
        self.assertIn("Cost: 6.0 GPU-h ≈ ¥60", report.header)


if __name__ == "__main__":
    unittest.main()
