"""Will it finish in time (issue 16): the deadline forecast, the advice each scheduler allows,
the last checkpoint in end and time-limit reports.

End to end, the real wrap runs a training that prints `epoch i/100` at a pace the test sets,
in a Slurm job whose end time a fake `scontrol show job` gives (and changes, as `scontrol
update` would); a monitor polls beside it. The progress parser's own tests, on recorded
streams with the clock injected, are in test_progress.py."""

import json
import os
import sys
import time
import unittest

from support import read_records, wait_for
from test_operations import OperationsTestCase, report_kind, slurm_time

import hpcrun

LAYER = "process"

# A training that prints epoch i/100 every PACE seconds (PACE read from the file `pace` at each
# epoch, so the test can slow it down), says it saved a checkpoint at epoch 5, and stops when
# the file `stop` appears.
PACED_TRAINING = (
    "import os, time\n"
    "for epoch in range(1, 101):\n"
    "    print('epoch %d/100 loss 0.5' % epoch, flush=True)\n"
    "    if epoch == 5:\n"
    "        print('Saving model checkpoint to out/checkpoint-500', flush=True)\n"
    "    if os.path.exists('stop'):\n"
    "        break\n"
    "    time.sleep(float(open('pace').read()))\n")


class ForecastTestCase(OperationsTestCase):

    BASE = {"notify": {"channels": "xxtui", "language": "en", "time_limit_margin": "1"},
            "wrap": {"heartbeat_interval": "1"},
            "monitor": {"forecast_after": "1.5"}}

    def setUp(self):
        OperationsTestCase.setUp(self)
        self.install_fake_slurm()

    def reports(self, name=None):
        return [(report_kind(body["title"]), body) for body in self.server.bodies
                if name is None or name in body["title"]]

    def set_job(self, job_id, end_time, limit=600):
        """What `scontrol show job ID` answers from now on: running, ending at end_time."""
        self.sb.write_file(os.path.join(self.bin, "job-%s" % job_id), (
            "JobId={id} JobName=fakejob\n"
            "   JobState=RUNNING Reason=None Dependency=(null)\n"
            "   RunTime=00:00:01 TimeLimit={limit} TimeMin=N/A\n"
            "   StartTime={start} EndTime={end} Deadline=N/A\n"
            "   Partition=gpu NodeList=node01\n").format(
                id=job_id, limit=hpcrun.clock_text(limit), start=slurm_time(end_time - limit),
                end=slurm_time(end_time)), secret=False)

    def pace(self, work, seconds):
        with open(os.path.join(work, "pace"), "w") as stream:
            stream.write(str(seconds))

    def start_paced(self, work, name, job_id, pace):
        self.pace(work, pace)
        env = self.slurm_env(job_id)
        training = self.start_wrap(sys.executable, "-c", PACED_TRAINING, work=work, env=env,
                                   extra=["--name", name], cwd=work)
        self.assertTrue(wait_for(lambda: read_records(work, "running"), timeout=15),
                        "the training did not start" + training.result().describe())
        return training

    def running(self, work):
        records = list(read_records(work, "running").values())
        return records[0] if records else {}

    def stop_training(self, work, training):
        open(os.path.join(work, "stop"), "w").close()
        self.assertExit(self.finish(training), 0)


class DeadlineForecastTest(ForecastTestCase):

    def test_a_slow_run_gets_one_forecast_a_raised_limit_is_followed_and_falling_behind_again_warns_again(self):
        self.configure(cost={"gpu_hour": "9"})
        work = self.sb.make_dir("slow")
        self.set_job(501, time.time() + 9, limit=30)
        monitor = self.monitor(work)
        training = self.start_paced(work, "slow-run", 501, 0.2)   # 100 epochs need 20 s; 9 s left
        self.wait_for_reports("deadline_forecast", name="slow-run", timeout=20)
        first = self.bodies("deadline_forecast", "slow-run")[0]
        self.assertRegex(first["title"], r"^⏳ slow-run will not finish: needs ≈ \d+s more, \d+s left → "
                                         r"stops near epoch (\d+)/100 \(\1 %\)$")
        stops = int(first["title"].rsplit("epoch ", 1)[1].split("/")[0])
        self.assertTrue(20 <= stops <= 70, first["title"])
        self.assertIn("What to do: only an administrator can raise a running job's limit: ask for "
                      "scontrol update JobId=501 TimeLimit=00:10:00", first["content"])
        self.assertIn("What to do: next time ask for enough time: sbatch --time=00:10:00", first["content"])
        self.assertRegex(first["content"], r"Last checkpoint: out/checkpoint-500 \(epoch 5/100\), \d+s ago")
        # the administrator raised the limit: wrap sees it, the run is in time again
        self.set_job(501, time.time() + 120, limit=900)
        self.assertTrue(wait_for(lambda: os.path.exists(os.path.join(
            work, ".hpcrun", "running", "%s.deadline_forecast-1-ok" % self.run_id(work))), timeout=20),
            "the monitor never saw the raised limit: %r" % self.running(work).get("job"))
        status = self.hpcrun("status", "--work-dir", work).out.splitlines()
        self.assertRegex(status[1], r"^slow-run +running .* \d+s$")   # the ETA, and in time
        as_json = json.loads(self.hpcrun("status", "--json", "--work-dir", work).out)[0]
        self.assertRegex(as_json["eta"], r"^\d+s more \([\d.]+ epochs/s\), finishes before the limit with "
                                         r"\d+m\d+s to spare$")
        self.assertIs(as_json["finishes_in_time"], True)
        self.assertEqual(as_json["forecast"]["unit"], "epoch")
        # then the training slows down (a data loader starved): behind again, a second forecast
        self.pace(work, 5)
        self.wait_for_reports("deadline_forecast", count=2, name="slow-run", timeout=30)
        self.stop_training(work, training)
        self.wait_for_reports("success", name="slow-run")
        self.stop(monitor)
        self.assertEqual(self.kinds("slow-run"), ["deadline_forecast", "deadline_forecast", "success"],
                         self.server.describe())
        end = self.bodies("success", "slow-run")[0]["content"]
        self.assertRegex(end, r"Last checkpoint: out/checkpoint-500 \(epoch 5/100\), \d+s before the end")

    def run_id(self, work):
        return list(read_records(work, "running"))[0]

    def test_a_run_that_finishes_in_time_gets_no_forecast(self):
        self.configure()
        work = self.sb.make_dir("fast")
        self.set_job(502, time.time() + 300)
        monitor = self.monitor(work)
        training = self.start_paced(work, "fast-run", 502, 0.04)   # 4 s for 100 epochs; 5 minutes left
        self.assertExit(self.finish(training), 0)
        self.wait_for_reports("success", name="fast-run")
        self.stop(monitor)
        self.assertEqual(self.kinds("fast-run"), ["success"], self.server.describe())
        # the run was watched long enough for a forecast to be made, and it said: in time
        record = list(self.sent(work).values())[0]
        self.assertGreaterEqual(record["forecast"]["observed"], 1.5, record["forecast"])


class AdviceTest(unittest.TestCase):
    """What each scheduler lets a user do about a limit that is too short."""

    def test_each_scheduler_names_only_what_it_allows_a_user(self):
        need = 26 * 3600 + 30 * 60
        job = {"id": "123"}
        self.assertEqual(hpcrun.Slurm().limit_advice(job, need), [
            ("admin", "scontrol update JobId=123 TimeLimit=1-02:30:00"), ("resubmit", "sbatch --time=1-02:30:00")])
        self.assertEqual(hpcrun.PBS().limit_advice(job, need), [
            ("admin", "qalter -l walltime=26:30:00 123"), ("resubmit", "qsub -l walltime=26:30:00")])
        self.assertEqual(hpcrun.LSF().limit_advice(job, need), [
            ("site", "bmod -W 1590 123"), ("resubmit", "bsub -W 26:30")])
        self.assertEqual(hpcrun.GridEngine().limit_advice(job, need), [("resubmit", "qsub -l h_rt=26:30:00")])

    def test_the_needed_limit_counts_the_whole_job_with_room_to_spare(self):
        now = 1800000000.0
        running = {"written_at": now, "start_time": now - 3000,
                   "job": {"end_time": now + 600, "time_limit": 3600.0}}
        # used 3000 s of the job, needs 3000 s more: 6000 s, 15 % more is 6900, rounded up to 7200
        self.assertEqual(hpcrun.needed_limit(running, 3000), 7200)

    def test_where_the_run_stops_when_its_time_is_up(self):
        forecast = {"fraction": 0.3, "done": 30.0, "total": 100, "unit": "epoch", "label": "epoch 30/100",
                    "rate": 0.01 / 60, "eta": 420 * 60, "observed": 3600}
        # one epoch a minute, 31 minutes left: 31 more epochs
        self.assertEqual(hpcrun.stop_label(forecast, 31 * 60), "epoch 61/100 (61 %)")


class CheckpointTest(unittest.TestCase):

    def setUp(self):
        import tempfile
        import shutil
        self.dir = os.path.realpath(tempfile.mkdtemp(prefix="hpcrun-ckpt-"))
        self.addCleanup(shutil.rmtree, self.dir, True)

    def make(self, path, mtime, directory=False):
        full = os.path.join(self.dir, path)
        if directory:
            os.makedirs(full, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(full), exist_ok=True)
            open(full, "w").close()
        os.utime(full, (mtime, mtime))
        return full

    def test_the_newest_checkpoint_written_since_the_start_is_found(self):
        start = 1800000000.0
        self.make("out/checkpoint-11000", start + 100, directory=True)
        self.make("out/checkpoint-12000", start + 200, directory=True)
        self.make("lightning_logs/version_0/checkpoints/epoch=5-step=3000.ckpt", start + 150)
        self.make("old/model.pt", start - 10)                  # before the run: not its checkpoint
        self.make(".git/objects/x.pt", start + 900)             # hidden dirs are not searched
        self.make("notes.txt", start + 999)
        os.symlink("/", os.path.join(self.dir, "root-link"))   # links are not followed
        os.symlink(os.path.join(self.dir, "out"), os.path.join(self.dir, "link.pt"))
        found = hpcrun.newest_checkpoint_file(self.dir, start)
        self.assertEqual(found, {"path": "out/checkpoint-12000", "mtime": start + 200})

    def test_the_search_stops_at_its_depth_and_entry_bounds(self):
        start = 1800000000.0
        self.make("a/b/c/d/e/deep.pt", start + 500)
        self.assertIsNone(hpcrun.newest_checkpoint_file(self.dir, start))
        os.rename(os.path.join(self.dir, "a"), os.path.join(self.dir, "..", os.path.basename(self.dir) + "-a"))
        self.addCleanup(__import__("shutil").rmtree, self.dir + "-a", True)
        for index in range(50):
            self.make("d1/file-%02d.txt" % index, start)
        self.make("d1/d2/model.pt", start + 10)
        # 20 entries: the work dir's one and 19 of d1's 51: d2 is never opened
        self.assertIsNone(hpcrun.newest_checkpoint_file(self.dir, start, limits=(4, 20, 5.0)))
        self.assertEqual(hpcrun.newest_checkpoint_file(self.dir, start)["path"], "d1/d2/model.pt")
        # out of time after the first directory
        ticks = iter([0.0, 0.0, 10.0, 10.0, 10.0])
        self.assertIsNone(hpcrun.newest_checkpoint_file(self.dir, start, clock=lambda: next(ticks, 10.0)))

    def test_checkpoint_lines_of_the_common_trainers(self):
        lines = {
            "Saving model checkpoint to out/checkpoint-12000": "out/checkpoint-12000",
            "[2024-05-01 10:00:00,123] [INFO] [engine.py:3500:save] Saving model checkpoint: /ckpt/global_step900/"
            "mp_rank_00_model_states.pt": "/ckpt/global_step900/mp_rank_00_model_states.pt",
            "Epoch 5, global step 3000: 'val_loss' reached 0.31000 (best 0.31000), saving model to "
            "'/w/lightning_logs/version_0/checkpoints/epoch=5-step=3000.ckpt' as top 1":
                "/w/lightning_logs/version_0/checkpoints/epoch=5-step=3000.ckpt",
            "Epoch 3: val_loss improved from 0.40000 to 0.31000, saving model to model.keras": "model.keras",
            "05/01 10:00:00 - mmengine - INFO - Saving checkpoint at 55 epochs": "55 epochs",
            "[rank0]: Saved checkpoint at epoch 55": "epoch 55",
            "checkpoint saved to runs/exp1/last.pt": "runs/exp1/last.pt",
        }
        for line, name in lines.items():
            with self.subTest(line=line):
                sampler = hpcrun.MetricSampler("loss", clock=lambda: 0.0, wall=lambda: 1000.0)
                self.relay(sampler, ("epoch 1/2\n" + line + "\nepoch 2/2\n").encode("utf-8"))
                self.assertEqual(sampler.checkpoint and sampler.checkpoint["name"], name)
        sampler = hpcrun.MetricSampler("loss", checkpoint=r"torch\.save -> (\S+\.bin)")
        sampler.look(b"step 10\ntorch.save -> weights/step10.bin\n")
        self.assertEqual(sampler.checkpoint["name"], "weights/step10.bin")
        sampler = hpcrun.MetricSampler("loss")
        sampler.find_checkpoint(b"no checkpointing configured\nloading checkpoint from a.pt\n")
        self.assertIsNone(sampler.checkpoint)

    @staticmethod
    def relay(sampler, data):
        """What the relay does with a chunk: hands it over when it holds the hint, and looks."""
        if hpcrun.CHECKPOINT_HINT in data:
            sampler.find_checkpoint(data)
        sampler.look(data)

    def test_a_checkpoint_line_keeps_its_time_while_later_looks_still_show_it(self):
        now = [1000.0]
        sampler = hpcrun.MetricSampler("loss", clock=lambda: now[0], wall=lambda: now[0])
        sampler.look(b"epoch 3/10\nEpoch 3: saving model to model.keras\n")
        now[0] += 60
        sampler.look(b"epoch 3/10\nEpoch 3: saving model to model.keras\nepoch 4/10\n")
        self.assertEqual((sampler.checkpoint["name"], sampler.checkpoint["at"]), ("model.keras", 1000.0))
        now[0] += 60   # the same line again, a new save
        sampler.look(b"epoch 4/10\nEpoch 4: saving model to model.keras\n")
        self.assertEqual((sampler.checkpoint["at"], sampler.checkpoint["progress"]), (1120.0, "epoch 4/10"))
        self.assertEqual(hpcrun.new_lines(["a", "b", "c"], ["b", "c", "d", "e"]), ["d", "e"])
        self.assertEqual(hpcrun.new_lines(["a", "b"], ["a", "b"]), [])
        self.assertEqual(hpcrun.new_lines(["x"], ["a", "b"]), ["a", "b"])

    def test_the_relay_searches_a_bounded_amount_of_output_a_second(self):
        relay = hpcrun.Relay(-1, None, None, hpcrun.MetricSampler("loss"))
        budget = hpcrun.CHECKPOINT_SEARCH_BYTES
        self.assertTrue(relay.may_search(100.0, budget - 10))
        self.assertTrue(relay.may_search(100.2, 10))
        self.assertFalse(relay.may_search(100.9, 1), "a flood past the budget is left to the looks")
        self.assertTrue(relay.may_search(101.0, 65536), "a new second, a new budget")

    def test_the_report_line_and_a_time_limit_without_checkpoint(self):
        messages = hpcrun.MESSAGES["en"]
        end = {"status": "terminated", "end_time": 10000.0,
               "checkpoint": {"name": "out/checkpoint-12000", "at": 10000.0 - 720, "progress": "epoch 55/100",
                              "line": "Saving model checkpoint to out/checkpoint-12000"}}
        self.assertEqual(hpcrun.checkpoint_text(end, messages),
                         "out/checkpoint-12000 (epoch 55/100), 12m00s before the end")
        # a newer file than the last line the log showed wins
        end["checkpoint_file"] = {"path": "out/checkpoint-13000", "mtime": 10000.0 - 120}
        self.assertEqual(hpcrun.checkpoint_text(end, messages), "out/checkpoint-13000, 2m00s before the end")


class ReportLinesTest(unittest.TestCase):
    """The ETA line in the reports of a running training, the checkpoint line in end reports."""

    def config(self):
        return hpcrun.load_config(os.devnull, {"notify": {"language": "en"}}, env={})

    def running(self, status, **fields):
        now = 1800000000.0
        record = {"schema": 1, "run_id": "r~%s" % status, "name": "resnet50", "status": status, "final": True,
                  "start_time": now - 3600, "last_heartbeat": now, "host": "gpu017", "command": "python train.py",
                  "job": {"scheduler": "slurm", "id": "123", "end_time": now + 1800, "time_limit": 5400.0},
                  "forecast": {"fraction": 0.4, "done": 40.0, "total": 100, "unit": "epoch", "label": "epoch 40/100",
                               "rate": 0.4 / 3600, "eta": 5400.0, "observed": 1800.0},
                  "checkpoint": {"name": "out/checkpoint-4000", "at": now - 600, "progress": "epoch 38/100",
                                 "line": "Saving model checkpoint to out/checkpoint-4000"}}
        record.update(fields)
        return record

    def header(self, record):
        return hpcrun.build_report(record, self.config(), "/nonexistent").header

    def test_reports_of_a_running_training_carry_the_eta_and_the_last_checkpoint(self):
        for status, extra in (("stalled", {"silence": 1900.0}), ("lost", {"silence": 400.0}),
                              ("time_limit_warning", {"remaining": 1800.0})):
            with self.subTest(status=status):
                header = self.header(self.running(status, **extra))
                self.assertIn("ETA: 1h30m more (40 epochs/h), does not finish before the limit: short by 1h00m",
                              header)
                self.assertIn("Last checkpoint: out/checkpoint-4000 (epoch 38/100), 10m00s ago", header)

    def test_a_time_limit_end_without_a_checkpoint_says_the_run_is_lost(self):
        end = self.running("terminated", cause="time_limit", end_time=1800000000.0, exit_code=143,
                           signal="SIGTERM", checkpoint=None)
        header = self.header(end)
        self.assertIn(hpcrun.MESSAGES["en"]["no_checkpoint"], header)
        end["checkpoint_file"] = {"path": "out/last.ckpt", "mtime": 1800000000.0 - 300}
        header = self.header(end)
        self.assertIn("Last checkpoint: out/last.ckpt, 5m00s before the end", header)
        self.assertNotIn(hpcrun.MESSAGES["en"]["no_checkpoint"], header)


if __name__ == "__main__":
    unittest.main()
