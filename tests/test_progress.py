"""The progress tracker on recorded streams: each form with a total, nested bars, evaluation and
validation bars, restarts, rank prefixes, hostile numbers, and a month of looks. The clock is
injected: the streams are lists of (seconds, line) fed at ticks, as the wrapper would; no sleeping."""

import random
import time
import unittest

import support  # noqa: F401  (puts hpcrun.py on the path)

import hpcrun as progress   # the tracker is part of hpcrun.py

LAYER = "fast"

TAIL = 20   # lines the wrapper hands at each look


def tqdm_line(count, total, description="", ascii_bar=False, postfix=""):
    """A bar as tqdm's format_meter draws it by default."""
    filled = 10 * count // total
    bar = ("#" if ascii_bar else "█") * filled + " " * (10 - filled)
    prefix = description + ": " if description else ""
    return "%s%3d%%|%s| %d/%d [00:10<00:20,  1.30it/s%s]" % (prefix, 100 * count // total, bar, count, total,
                                                              postfix)


def keras_line(count, total):
    """Keras 2's step bar, in progress or at the epoch's end."""
    if count < total:
        filled = 30 * count // total
        return "%d/%d [%s>%s] - ETA: 0:01 - loss: 0.3100" % (count, total, "=" * filled, "." * (29 - filled))
    return "%d/%d [==============================] - 3s 6ms/step - loss: 0.3100" % (count, total)


class Log(object):
    """The log as the wrapper hands it: cleaned lines, a bar redrawn in place being one line."""

    def __init__(self):
        self.lines = []
        self.drawing = False

    def apply(self, action, line):
        if action == "draw" and self.drawing:
            self.lines[-1] = line
        else:
            self.lines.append(line)
        self.drawing = action == "draw"

    def tail(self):
        return self.lines[-TAIL:]


def looks(events, every, until):
    """(tick, the log's last lines, true fraction) at each tick of `every` seconds up to until,
    of events (seconds, action, line, true fraction after it)."""
    log, index, tick, truth = Log(), 0, 0.0, None
    while tick <= until:
        while index < len(events) and events[index][0] <= tick:
            log.apply(*events[index][1:3])
            truth = events[index][3]
            index += 1
        yield tick, log.tail(), truth
        tick += every


def play(tracker, events, every, until, check=None):
    """Feed a tracker the looks at a stream, calling check(tick, true fraction) after each."""
    for tick, lines, truth in looks(events, every, until):
        tracker.feed(lines, tick)
        if check:
            check(tick, truth)
    return tracker


def hf_events(max_steps, warmup=0.0, train_seconds=None, pause=0.0, eval_total=20):
    """HF Trainer: a plain bar to max_steps, still for `warmup` seconds, then a step a second;
    after each `train_seconds` of training an evaluation of `pause` seconds draws a short plain
    bar and writes its dict."""
    events, now, trained = [(0.0, "draw", tqdm_line(0, max_steps), 0.0)], float(warmup), 0.0
    for step in range(1, max_steps + 1):
        now, trained = now + 1.0, trained + 1.0
        truth = step / float(max_steps)
        events.append((now, "draw", tqdm_line(step, max_steps), truth))
        if train_seconds and trained >= train_seconds and step < max_steps:
            events.append((now, "write", "{'loss': 0.31, 'learning_rate': 4.9e-05, 'epoch': 0.5}", truth))
            for done in range(eval_total + 1):
                events.append((now + pause * done / eval_total, "write", tqdm_line(done, eval_total), truth))
            metrics = "{'eval_loss': 0.35, 'eval_runtime': 120.0, 'epoch': 0.5}"
            events.append((now + pause, "write", metrics, truth))
            now, trained = now + pause, 0.0
    return events


def keras_events(epochs, steps, step_seconds=1.0):
    """Keras fit, verbose=1: `Epoch i/N`, then the step bar redrawn in place."""
    events, now = [], 0.0
    for epoch in range(epochs):
        events.append((now, "write", "Epoch %d/%d" % (epoch + 1, epochs), epoch / float(epochs)))
        for step in range(1, steps + 1):
            now += step_seconds
            events.append((now, "draw", keras_line(step, steps), (epoch + step / float(steps)) / epochs))
    return events


def nested_tqdm_events(epochs, steps):
    """An outer tqdm bar counting epochs (`Epoch`) around an inner one per epoch (`Iteration`),
    nested bars: each redraw a new line in the log."""
    events, now = [(0.0, "write", tqdm_line(0, epochs, "Epoch"), 0.0)], 0.0
    for epoch in range(epochs):
        for step in range(steps + 1):
            now += 1.0
            truth = (epoch + step / float(steps)) / epochs
            events.append((now, "write", tqdm_line(step, steps, "Iteration"), truth))
        events.append((now, "write", tqdm_line(epoch + 1, epochs, "Epoch"), (epoch + 1.0) / epochs))
    return events


def lightning_events(epochs, steps, validation_steps, hint=True):
    """Lightning's TQDMProgressBar: `Epoch e:` (0-based) bars, a validation bar after each epoch;
    hint: the script prints its arguments first (max_epochs)."""
    events = [(0.0, "write", "Namespace(batch_size=32, lr=0.001, max_epochs=%d)" % epochs, None)] if hint else []
    now = 0.0
    for epoch in range(epochs):
        for step in range(steps + 1):
            now += 1.0
            line = tqdm_line(step, steps, "Epoch %d" % epoch, postfix=", v_num=10")
            events.append((now, "draw", line, (epoch + step / float(steps)) / epochs))
        for step in range(validation_steps + 1):
            now += 1.0
            line = tqdm_line(step, validation_steps, "Validation DataLoader 0")
            events.append((now, "write", line, (epoch + 1.0) / epochs))
    return events


def step_events(start, stop, total, first_second=0.0, template="step %d/%d loss 0.31"):
    """A step count printed once a second, each on its own line."""
    return [(first_second + i, "write", template % (step, total), step / float(total))
            for i, step in enumerate(range(start, stop))]


def feed_once(lines, now=0.0):
    tracker = progress.ProgressTracker(clock=lambda: now)
    tracker.feed(lines, now)
    return tracker.snapshot(now)


class FormsTest(unittest.TestCase):

    CASES = [
        # lines, fraction, unit, total, label
        (["47%|████▋     | 470/1000 [12:01<13:33, 1.30it/s]"], 0.47, "it", 1000, "it 470/1000"),
        (["Training:  47%|████▋     | 470/1000 [12:01<13:33, 1.30it/s]"], 0.47, "it", 1000, "it 470/1000"),
        (["  2%|▏         | 1.20k/50.0k [12:01<13:33,  1.23s/it]"], 0.024, "it", 50000, "it 1200/50000"),
        (["Train:  47%|████▋     | 470/1000 [12:01<13:33,  1.23s/it, loss=0.31]"], 0.47, "it", 1000,
         "it 470/1000"),
        ([" 47%|####      | 470/1000 [12:01<13:33, 1.30it/s]"], 0.47, "it", 1000, "it 470/1000"),
        (["Epoch 3/100:  47%|████▋     | 470/1000 [12:01<13:33, 1.30it/s]"], 0.0247, "epoch", 100, "epoch 2/100"),
        (["max_epochs=10", "Epoch 3:  47%|████▋     | 470/1000 [12:01<13:33, 1.30it/s]"], 0.347, "epoch", 10,
         "epoch 3/10"),
        (["Epoch:  30%|███       | 3/10 [01:00<02:20, 20.00s/it]",
          "Iteration:  47%|████▋     | 470/1000 [00:10<00:11, 47.00it/s]"], 0.347, "epoch", 10, "epoch 3/10"),
        (["epoch 3/100"], 0.02, "epoch", 100, "epoch 2/100"),
        (["Epoch [3/100]"], 0.02, "epoch", 100, "epoch 2/100"),
        (["Epoch 3 of 100"], 0.02, "epoch", 100, "epoch 2/100"),
        (["Epoch: 3/100"], 0.02, "epoch", 100, "epoch 2/100"),
        (["Epoch 3/100", "469/469 ━━━━━━━━━━━━━━━━━━━━ 3s 6ms/step - loss: 0.3100"], 0.03, "epoch", 100,
         "epoch 3/100"),
        (["Epoch 3/100", "120/469 [=====>........] - ETA: 1:23 - loss: 0.31"], (2 + 120 / 469.0) / 100, "epoch",
         100, "epoch 2/100"),
        (["Epoch 3/100", "469/469 - 3s - 6ms/step - loss: 0.3100"], 0.03, "epoch", 100, "epoch 3/100"),
        (["Epoch [3/100] Step [120/469] loss: 0.3100"], (2 + 120 / 469.0) / 100, "epoch", 100, "epoch 2/100"),
        (["Epoch 3/100 - loss: 0.3100 - acc: 0.9100"], 0.03, "epoch", 100, "epoch 3/100"),
        (["step 1200/50000"], 0.024, "step", 50000, "step 1200/50000"),
        (["Step: [1200/50000] lr 0.1"], 0.024, "step", 50000, "step 1200/50000"),
        (["iter 1200/50000"], 0.024, "iter", 50000, "iter 1200/50000"),
        (["Iteration 1200/50000"], 0.024, "iter", 50000, "iter 1200/50000"),
        (["global_step 1200/50000"], 0.024, "step", 50000, "step 1200/50000"),
        (["{'loss': 0.5234, 'grad_norm': 1.93, 'learning_rate': 4.9e-05, 'epoch': 0.12}",
          "  Num Epochs = 3", "  5%|▌         | 500/10000 [02:10<41:15,  3.84it/s]"], 0.05, "it", 10000,
         "it 500/10000"),
        (["Namespace(max_epochs=10)", "Epoch 5:   4%|▎         | 40/1000 [00:03<01:37, 10.84it/s, v_num=10]",
          "Validation DataLoader 0:  45%|████▌     | 45/100 [00:01<00:01, 30.00it/s]"], 0.504, "epoch", 10,
         "epoch 5/10"),
        (["Epoch 5/9  ━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━ 450/1000 0:01:23 • 0:01:40 5.41it/s v_num: 0 "
          "train_loss: 0.310"], 0.545, "epoch", 10, "epoch 5/10"),
        (["2024/05/01 10:00:00 - mmengine - INFO - Iter(train) [ 5/10000]  lr: 1.0000e-02  eta: 1:23:45"],
         0.0005, "iter", 10000, "iter 5/10000"),
        (["train_cfg = dict(by_epoch=True, max_epochs=12, val_interval=1)",
          "2024/05/01 10:00:00 - mmengine - INFO - Epoch(train)  [10][100/270]  lr: 1.0000e-02  eta: 1:23:45",
          "2024/05/01 10:00:09 - mmengine - INFO - Epoch(val)  [10][ 50/100]    eta: 0:00:05"],
         (9 + 100 / 270.0) / 12, "epoch", 12, "epoch 9/12"),
        (["runner = dict(type='EpochBasedRunner', max_epochs=12)",
          "Epoch [10][100/270]\tlr: 1.000e-02, eta: 1:23:45"],
         (9 + 100 / 270.0) / 12, "epoch", 12, "epoch 9/12"),
    ]

    def test_each_form_with_a_total_gives_the_runs_fraction_unit_and_label(self):
        for lines, fraction, unit, total, label in self.CASES:
            with self.subTest(lines=lines):
                snapshot = feed_once(lines)
                self.assertIsNotNone(snapshot)
                self.assertAlmostEqual(snapshot["fraction"], fraction, places=9)
                self.assertEqual((snapshot["unit"], snapshot["total"], snapshot["label"]), (unit, total, label))
                self.assertAlmostEqual(snapshot["done"], fraction * total, places=6)
                self.assertEqual((snapshot["rate"], snapshot["eta"], snapshot["observed"]), (None, None, 0.0))

    def test_forms_without_the_runs_total_give_nothing(self):
        for lines in (["Epoch 5:   4%|▎         | 40/1095 [00:03<01:37, 10.84it/s, v_num=10]"],
                      ["Epoch(train)  [ 10][100/270]  lr: 1.0000e-02"],
                      ["Validation DataLoader 0:  45%|████▌     | 45/100 [00:01<00:01, 30.00it/s]"],
                      ["469/469 ━━━━━━━━━━━━━━━━━━━━ 3s 6ms/step - loss: 0.3100"],
                      ["Loading checkpoint shards: 100%|██████████| 2/2 [00:03<00:00,  1.50s/it]",
                       "Map: 100%|██████████| 50000/50000 [00:10<00:00, 5000.00 examples/s]"],
                      ["857366it [00:03, 246471.31it/s]", "epoch 3", "step=1200, skipped=0, lr=[0.0001]",
                       "Saving checkpoint at 3 epochs", "{'loss': 0.5, 'epoch': 0.12}"]):
            with self.subTest(lines=lines):
                self.assertIsNone(feed_once(lines))

    def test_the_kinds_table_and_the_parsers_agree(self):
        self.assertEqual(sorted(kind for kind, pattern in progress.PROGRESS_TOTAL_PATTERNS),
                         sorted(progress.PROGRESS_PARSERS))


class EpochCountingTest(unittest.TestCase):

    def test_an_epoch_header_starts_its_epoch_and_a_summary_ends_it(self):
        for lines, fraction in ((["Epoch 1/4"], 0.0), (["Epoch 4/4"], 0.75),
                                (["Epoch 1/4 loss=0.3 acc=0.9"], 0.25), (["Epoch 4/4 finished"], 1.0),
                                (["Epoch 0/4", "Epoch 1/4"], 0.25), (["Epoch 0/4 train_loss: 0.5"], 0.25),
                                (["Epoch 7/4"], 1.0)):
            with self.subTest(lines=lines):
                self.assertEqual(feed_once(lines)["fraction"], fraction)

    def test_the_label_counts_what_is_done_in_whole_units(self):
        cases = (("epoch", 60.3, 100, "epoch 60/100"), ("epoch", 61.0, 100, "epoch 61/100"),
                 ("epoch", 0.0, 100, "epoch 0/100"), ("epoch", 100.0, 100, "epoch 100/100"),
                 ("epoch", 0.61 * 100, 100, "epoch 61/100"), ("step", 0.61 * 50000, 50000, "step 30500/50000"),
                 ("it", 469.99, 1000, "it 469/1000"))
        for unit, done, total, label in cases:
            with self.subTest(done=done):
                self.assertEqual(progress.progress_label(unit, done, total), label)

    def test_a_newest_line_cut_in_its_total_waits_for_the_rest(self):
        tracker = progress.ProgressTracker()
        tracker.feed(["Epoch 3/100", "120/469 [=====>........] - ETA: 1:23 - loss: 0.31"], 0.0)
        tracker.feed(["Epoch 3/100", "469/469 [==============================] - 3s", "Epoch 4/10"], 10.0)
        self.assertEqual((tracker.snapshot(10.0)["label"], tracker.points[0][0]), ("epoch 3/100", 0.0))
        tracker.feed(["Epoch 3/100", "469/469 [==============================] - 3s", "Epoch 4/100"], 20.0)
        self.assertEqual(tracker.snapshot(20.0)["fraction"], 0.03)
        self.assertEqual(tracker.points, [(0.0, (2 + 120 / 469.0) / 100), (10.0, 0.03)])


class NestedBarsTest(unittest.TestCase):

    def assert_follows(self, events, until, every=1.0):
        """Every look gives the true fraction, it never goes back, and the history never restarts."""
        tracker = progress.ProgressTracker()
        fractions, starts = [], set()

        def check(tick, truth):
            snapshot = tracker.snapshot(tick)
            if truth is None:
                return
            self.assertAlmostEqual(snapshot["fraction"], truth, places=9, msg="at %s s" % tick)
            starts.add(tracker.points[0][0])
            self.assertEqual(len(starts), 1, "the history restarted at %s s" % tick)
            fractions.append(snapshot["fraction"])
        play(tracker, events, every, until, check)
        self.assertEqual(fractions, sorted(fractions))
        return tracker

    def test_keras_header_and_step_bar_restarting_each_epoch(self):
        tracker = self.assert_follows(keras_events(epochs=5, steps=40), until=205)
        self.assertEqual(tracker.snapshot(205)["label"], "epoch 5/5")
        self.assertEqual(tracker.snapshot(205)["eta"], 0.0)

    def test_outer_epoch_bar_around_an_inner_bar_that_restarts(self):
        tracker = self.assert_follows(nested_tqdm_events(epochs=3, steps=30), until=100)
        self.assertEqual(tracker.snapshot(100)["unit"], "epoch")

    def test_an_inner_bar_restarting_before_its_epoch_line_does_not_go_back(self):
        tracker = progress.ProgressTracker()
        tracker.feed(["Epoch:  33%|███▎      | 1/3 [00:10<00:20, 10.00s/it]",
                      "Iteration: 100%|██████████| 30/30 [00:10<00:00,  3.00it/s]"], 0.0)
        tracker.feed(["Epoch:  33%|███▎      | 1/3 [00:10<00:20, 10.00s/it]",
                      "Iteration: 100%|██████████| 30/30 [00:10<00:00,  3.00it/s]",
                      "Iteration:   3%|▎         | 1/30 [00:00<00:10,  3.00it/s]"], 5.0)
        self.assertEqual((tracker.snapshot(5.0)["fraction"], len(tracker.points)), (2 / 3.0, 1))
        tracker.feed(["Epoch:  67%|██████▋   | 2/3 [00:20<00:10, 10.00s/it]",
                      "Iteration:   3%|▎         | 1/30 [00:00<00:10,  3.00it/s]"], 10.0)
        self.assertAlmostEqual(tracker.snapshot(10.0)["fraction"], (2 + 1 / 30.0) / 3, places=9)
        self.assertEqual(tracker.points[0], (0.0, 2 / 3.0))

    def test_hf_eval_bars_are_not_the_runs_progress(self):
        events = hf_events(max_steps=600, train_seconds=100, pause=30, eval_total=25)
        tracker = self.assert_follows(events, until=events[-1][0] + 10, every=2.0)
        self.assertEqual(tracker.snapshot(events[-1][0])["label"], "it 600/600")

    def test_lightning_validation_bars_do_not_count(self):
        self.assert_follows(lightning_events(epochs=3, steps=50, validation_steps=30), until=250)

    def test_lightning_without_max_epochs_gives_no_fraction(self):
        tracker = play(progress.ProgressTracker(), lightning_events(3, 50, 30, hint=False), 1.0, 250)
        self.assertIsNone(tracker.snapshot(250))


class RateTest(unittest.TestCase):

    def test_warm_up_drops_out_of_the_rate(self):
        # 5 minutes at 0, then a step a second: the run ends at 300 + 3600 s
        checked = []

        def check(tick, truth):
            snapshot = tracker.snapshot(tick)
            if 900 <= tick <= 3800:
                self.assertLessEqual(abs(snapshot["eta"] / (3900 - tick) - 1), 0.10, "at %s s" % tick)
                self.assertGreaterEqual(snapshot["observed"], 600)
                checked.append(tick)
        tracker = progress.ProgressTracker()
        play(tracker, hf_events(3600, warmup=300), 5.0, 3900, check)
        self.assertEqual(len(checked), 581)
        self.assertAlmostEqual(tracker.snapshot(3800)["rate"], 1 / 3600.0, places=9)

    def test_evaluation_pauses_are_averaged_in(self):
        # 480 s of training a step a second, then 120 s of evaluation: 0.8 steps a second in the long run
        worst = []

        def check(tick, truth):
            remaining = 6000 * (1 - truth)
            if tick >= 600 and remaining >= 1800:
                eta = tracker.snapshot(tick)["eta"]
                worst.append(abs(eta / (remaining / 0.8) - 1))
        tracker = progress.ProgressTracker()
        play(tracker, hf_events(6000, train_seconds=480, pause=120, eval_total=30), 5.0, 7500, check)
        self.assertGreater(len(worst), 840)
        self.assertLessEqual(max(worst), 0.15)

    def test_a_stall_lowers_the_rate_until_it_is_zero(self):
        tracker = play(progress.ProgressTracker(), step_events(0, 1801, 10000), 10.0, 1800)
        rates = [tracker.snapshot(now)["rate"] for now in range(1800, 3661, 60)]
        self.assertAlmostEqual(rates[0], 1 / 10000.0, places=15)
        self.assertEqual(tracker.snapshot(1801.5)["rate"], rates[0])   # not looked at since: not a stall yet
        self.assertTrue(all(later < earlier for earlier, later in zip(rates, rates[1:-1])), rates)
        self.assertEqual(rates[-1], 0.0)
        self.assertIsNone(tracker.snapshot(3660)["eta"])
        self.assertEqual(tracker.snapshot(3660)["label"], "step 1800/10000")

    def test_the_window_is_the_recent_half_but_ten_minutes_at_least(self):
        windows = {}

        def check(tick, truth):
            if tick in (0, 300, 900, 1500, 4000):
                windows[tick] = tracker.snapshot(tick)["observed"]
        tracker = progress.ProgressTracker()
        play(tracker, step_events(0, 4001, 10000), 10.0, 4000, check)
        self.assertEqual(windows, {0: 0.0, 300: 300.0, 900: 600.0, 1500: 750.0, 4000: 2000.0})

    def test_a_slowdown_shows_once_it_is_half_the_history_with_a_short_minimum_window(self):
        # hpcrun's tests compress time (forecast_after 1.5 s): 5 steps a second for 10 s, then one per 2 s
        events = [(i / 5.0, "write", "step %d/1000 loss 0.3" % i, None) for i in range(51)]
        events += [(10 + 2.0 * i, "write", "step %d/1000 loss 0.3" % (50 + i), None) for i in range(1, 20)]
        for min_window, rate in ((1.5, 0.5 / 1000), (600.0, 55 / 20.0 / 1000)):
            with self.subTest(min_window=min_window):
                tracker = play(progress.ProgressTracker(min_window=min_window), events, 1.0, 20)
                self.assertAlmostEqual(tracker.snapshot(20.5)["rate"], rate, places=12)
                self.assertEqual(tracker.snapshot(20.5)["observed"], 10.0 if min_window < 10 else 20.0)

    def test_a_run_level_count_going_back_starts_the_rate_history_again(self):
        # a new run from 0, a run resumed from step 500, a second phase of 1000 steps
        for first, total in ((0, 3000), (500, 3000), (0, 1000)):
            with self.subTest(first=first, total=total):
                events = step_events(0, 1000, 3000) + step_events(first, first + 200, total, 1000)
                tracker = play(progress.ProgressTracker(), events, 5.0, 1100)
                snapshot = tracker.snapshot(1100)
                self.assertAlmostEqual(snapshot["fraction"], (first + 100.0) / total, places=9)
                self.assertEqual((snapshot["observed"], tracker.points[0][0]), (100.0, 1000.0))
                self.assertAlmostEqual(snapshot["rate"], 1.0 / total, places=9)

    def test_progress_point_projects_at_the_rate(self):
        snapshot = {"fraction": 0.3, "done": 30.0, "total": 100, "unit": "epoch", "label": "epoch 30/100",
                    "rate": 0.01 / 60, "eta": 420 * 60, "observed": 3600}
        self.assertEqual(progress.progress_point(snapshot, 31 * 60), (0.61, "epoch 61/100"))
        self.assertEqual(progress.progress_point(snapshot, 10 ** 9), (1.0, "epoch 100/100"))
        self.assertEqual(progress.progress_point(dict(snapshot, rate=None), 600), (0.3, "epoch 30/100"))
        steps = dict(snapshot, unit="step", total=50000, fraction=0.5, rate=0.11 / 3600)
        self.assertEqual(progress.progress_point(steps, 3600)[1], "step 30500/50000")


class InputTest(unittest.TestCase):

    def test_rank_prefixes_are_stripped_and_other_ranks_left_out(self):
        for prefix, fraction in (("[rank0]: ", 0.024), ("[rank0]:", 0.024), ("0: ", 0.024),
                                 ("[1,0]<stdout>: ", 0.024), ("[default0]:", 0.024), ("node12: ", 0.024),
                                 ("[rank1]: ", None), ("3: ", None), ("[1,2]<stderr>: ", None)):
            with self.subTest(prefix=prefix):
                snapshot = feed_once([prefix + "step 1200/50000 loss 0.31"])
                self.assertEqual(snapshot and snapshot["fraction"], fraction)

    def test_interleaved_ranks_follow_rank_0_without_restarting(self):
        events = []
        for second in range(300):
            events.append((second, "write", "[rank1]: step %d/1000 loss 0.3" % max(0, second - 2), None))
            events.append((second, "write", "[rank0]: step %d/1000 loss 0.3" % second, second / 1000.0))
        tracker = play(progress.ProgressTracker(), events, 1.0, 299)
        self.assertEqual((tracker.snapshot(299)["fraction"], tracker.points[0][0]), (0.299, 0.0))

    def test_feeding_the_same_lines_again_changes_nothing(self):
        events = keras_events(epochs=3, steps=40)
        once = play(progress.ProgressTracker(), events, 1.0, 130)
        twice = progress.ProgressTracker()
        for tick, lines, truth in looks(events, 1.0, 130):
            twice.feed(lines, tick)
            twice.feed(list(lines), tick)
            twice.feed(lines, tick + 0.5)
            twice.feed(lines[-5:], tick + 0.6)   # fewer of the same lines
        self.assertEqual(len(once.points), 121)
        self.assertEqual(once.points, twice.points)
        self.assertEqual(once.snapshot(200), twice.snapshot(200))
        self.assertAlmostEqual(once.snapshot(200)["fraction"], 1.0)

    def test_the_injected_clock_times_looks_and_snapshots_without_a_time(self):
        now = [100.0]
        tracker = progress.ProgressTracker(clock=lambda: now[0])
        tracker.feed(["step 10/100 loss 0.3", "x"])
        now[0] = 160.0
        tracker.feed(["step 10/100 loss 0.3", "x", "step 40/100 loss 0.3", "x"])
        now[0] = 161.0
        self.assertEqual(tracker.points, [(100.0, 0.1), (160.0, 0.4)])
        self.assertAlmostEqual(tracker.snapshot()["rate"], 0.3 / 60, places=15)
        self.assertEqual(tracker.snapshot()["observed"], 60.0)

    def test_garbage_never_raises_nor_leaves_0_to_1(self):
        garbage = ["999999999999/0", "step 999999999999/0", "epoch 3/0", "Epoch 0/0", "step 0/0",
                   "250%|██████████| 5/2 [00:01<00:00, 1.00it/s]", "step 7/3", "epoch 9999999999999999/2",
                   "step %s/%s" % ("9" * 400, "9" * 401), " 47%|█| 1.2.3/4 [", "Epoch(train) [0][5/0]",
                   "Iter(train) [ 5/0]", "max_epochs=0", "[rank0]: ", "", "%|", "Epoch [", "0: 0: 0: step 1/1e9",
                   "Epoch 3/100 Step [999999999999999999/1]", "Namespace(max_epochs=99999999999999999999)",
                   "Epoch 3:  47%|████▋| 470/1000 [", "1/1 ━", "Epoch 1/1 ━━ 5/0 x"]
        for line in garbage:
            with self.subTest(line=line):
                self.assert_sane(feed_once([line]))
                self.assert_sane(feed_once(["Epoch 2/4", line, "step 3/10"]))
                self.assert_sane(feed_once(["Epoch 2/4", line]))

    def test_seeded_mutations_of_real_lines_stay_sane(self):
        lines = [case[0][-1] for case in FormsTest.CASES]
        randomness = random.Random(1234)
        for attempt in range(300):
            tracker = progress.ProgressTracker()
            window = []
            for now in range(8):
                line = list(randomness.choice(lines))
                for _ in range(randomness.randint(1, 4)):
                    place = randomness.randrange(len(line) + 1)
                    line[place:place + randomness.randint(0, 3)] = randomness.choice(
                        ["0", "9" * randomness.randint(1, 30), "/", "%|", "|", " ", ".", "k", "/0", "[", "]"])
                window = (window + ["".join(line)])[-TAIL:]
                tracker.feed(window, float(now))
                self.assert_sane(tracker.snapshot(now + 1.0), window)

    def assert_sane(self, snapshot, lines=None):
        if snapshot is None:
            return
        self.assertTrue(0.0 <= snapshot["fraction"] <= 1.0, (snapshot, lines))
        self.assertTrue(0.0 <= snapshot["done"] <= snapshot["total"] + 1e-6, (snapshot, lines))
        self.assertIsInstance(snapshot["total"], int)
        self.assertGreater(snapshot["total"], 0)
        for name in ("rate", "eta"):
            value = snapshot[name]
            self.assertTrue(value is None or 0.0 <= value < float("inf"), (snapshot, lines))
        self.assertIsInstance(snapshot["label"], str)


class BoundsTest(unittest.TestCase):

    def test_a_month_of_looks_keeps_at_most_points_history_points(self):
        month, every, total = 30 * 86400, 600, 30 * 86400
        tracker = progress.ProgressTracker(points=256)
        longest = 0
        for now in range(0, month + 1, every):
            tracker.feed(["step %d/%d loss 0.31" % (now, total), "lr 0.001"], float(now))
            longest = max(longest, len(tracker.points))
        self.assertEqual(longest, 256)
        self.assertGreaterEqual(len(tracker.points), 128)
        self.assertEqual((tracker.points[0][0], tracker.points[-1][0]), (0.0, float(month)))
        gaps = [later[0] - earlier[0] for earlier, later in zip(tracker.points, tracker.points[1:])]
        self.assertLessEqual(max(gaps[:-1]) / min(gaps[:-1]), 2.0)
        snapshot = tracker.snapshot(float(month))
        self.assertEqual((snapshot["fraction"], snapshot["observed"]), (1.0, month / 2.0))
        self.assertAlmostEqual(snapshot["rate"], 1.0 / total, places=12)
        started = time.perf_counter()
        for _ in range(1000):
            tracker.snapshot(float(month) + 30)
        self.assertLess(time.perf_counter() - started, 0.5)

    def test_a_small_history_keeps_the_first_and_newest_points(self):
        tracker = progress.ProgressTracker(points=8)
        for now in range(100):
            tracker.feed(["step %d/100 loss 0.3" % now, "x"], float(now))
            self.assertLessEqual(len(tracker.points), 8)
        self.assertEqual((tracker.points[0], tracker.points[-1]), ((0.0, 0.0), (99.0, 0.99)))


if __name__ == "__main__":
    unittest.main()
