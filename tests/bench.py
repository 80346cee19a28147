#!/usr/bin/env python3
"""make bench: what hpcrun costs a training, measured side by side with the plain tools.

    python3 tests/bench.py [--quick]

Every figure runs hpcrun and its reference (tee, a bare run, the bare interpreter) in the
same benchmark, several times and interleaved, and compares medians. Prints one table
(figure, hpcrun, reference, ratio, target, within target) and exits 1 when a figure misses
its target. --quick uses smaller sizes to check the benchmark itself, not hpcrun.

CPython compiles a script named on its command line on every start, so every
`python3 hpcrun.py` pays a fixed cost that one file cannot avoid (issue 13). Figures 2 and 3
are judged net of it: the relay's time less that of `wrap true` (2b), both medians of the
same interleaved series, against tee; figure 7 is judged against its floor, the bare
interpreter compiling hpcrun.py. The gross ratios are printed beside them, and 7c records
the compile time per 1000 lines so that growth shows.
"""

import argparse
import json
import os
import platform
import random
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
HPCRUN = os.path.join(os.path.dirname(HERE), "hpcrun.py")
PYTHON = sys.executable
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import hpcrun  # noqa: E402
from support import FakeXxtui  # noqa: E402

KEY = "bench-key-0123456789"
BUSY = 0.25  # other processes' share of all CPUs above which wall times are not to be trusted


def sh(command, capture=False, **kwargs):
    """Run a shell command line; (wall seconds, rusage of it and its waited-for children),
    and with capture=True what it printed as a third item."""
    started = time.monotonic()
    process = subprocess.Popen(["bash", "-c", command], stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
                               **kwargs)
    output = process.stdout.read() if capture else None
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.monotonic() - started
    process.returncode = os.waitstatus_to_exitcode(status) if hasattr(os, "waitstatus_to_exitcode") \
        else (status >> 8)
    if capture:
        process.stdout.close()
    if process.returncode:
        raise SystemExit("bench: '%s' exited %d" % (command, process.returncode))
    return (elapsed, usage, output) if capture else (elapsed, usage)


def median_time(command, repeat, env=None):
    return statistics.median(sh(command, env=env)[0] for _ in range(repeat))


def interleaved(sides, rounds, estimate=None, target=None, most=None, tolerance=0.03):
    """Run each of sides (functions that time one run) once per round, the order rotated from
    round to round, so that every side sees the same machine and none always follows another
    (a run can leave work behind for the next one: written-back pages, a busier cache).

    With estimate (the figure, from every side's samples) it goes on 10 rounds at a time, up
    to most, while the figure is unsettled: while the middle 90 % of it over rounds resampled
    at random is wider than +-tolerance and holds target. Returns each side's samples, round by
    round, that 90 % range (None without estimate) and the share of the machine's CPU that
    other processes took meanwhile (OtherLoad)."""
    samples, load, done, spread = [[] for _ in sides], OtherLoad(), 0, None
    while True:
        for number in range(done, done + rounds):
            for offset in range(len(sides)):
                index = (number + offset) % len(sides)
                samples[index].append(sides[index]())
        done += rounds
        if estimate is None:
            break
        spread = resampled(estimate, samples)
        if spread[1] - spread[0] <= 2 * tolerance or not spread[0] <= target <= spread[1] or done >= most:
            break
        rounds = min(10, most - done)
    share = load.share()
    print("    %d rounds; other processes took %s meanwhile%s"
          % (done, load.text(share), "" if spread is None else "; 90%% of resampled figures %.2f-%.2f" % spread))
    return samples, spread, share


def resampled(estimate, samples, times=300):
    """The 5th and 95th percentiles of estimate over samples' rounds drawn at random with
    replacement (a bootstrap; rounds are kept whole, so the pairing holds)."""
    draw, count = random.Random(13), len(samples[0])
    figures = []
    for _ in range(times):
        rounds = [draw.randrange(count) for _ in range(count)]
        figures.append(estimate([[side[index] for index in rounds] for side in samples]))
    figures.sort()
    return figures[int(0.05 * times)], figures[int(0.95 * times) - 1]


class Bench(object):
    def __init__(self, quick):
        self.quick = quick
        self.rows = []
        self.busy = []  # figures measured while other processes took more than BUSY of the CPUs
        self.tmp = tempfile.mkdtemp(prefix="hpcrun-bench-")
        self.env = dict(os.environ, HOME=os.path.join(self.tmp, "home"),
                        HPCRUN_HOME=os.path.join(self.tmp, "home", ".hpcrun"), HPCRUN_CONFIG=os.devnull)
        for name in list(self.env):
            if name.startswith("SLURM_") or name.endswith("_proxy") or name.endswith("_PROXY"):
                del self.env[name]
        os.makedirs(self.env["HOME"])
        self.repeat = 1 if quick else 3
        self.rounds = self.repeat * 3  # pairs of figure 1; single runs vary by 2x on a shared VM
        # figures 2, 3 and 7: 21 rounds, more (to 61) while the verdict is unsettled; 2 and 3 are
        # judged on a difference of two medians, each with its own noise
        self.net_rounds = 5 if quick else 21
        self.most_rounds = 5 if quick else 61

    def note_load(self, figure, share):
        """Remember a figure whose runs shared the machine with other work: on 2 cores a pipeline
        that loses one stretches toward its CPU time, tee's more than wrap's, which flatters
        figure 2."""
        if share is not None and share > BUSY:
            self.busy.append("%s (%.0f%%)" % (figure.split()[0], 100 * share))

    def row(self, figure, value, reference, ratio, target, ok):
        self.rows.append((figure, value, reference, ratio, target, "yes" if ok else "NO"))
        print("  %s: %s vs %s -> %s (target %s)" % (figure, value, reference, ratio, target))
        sys.stdout.flush()

    def work_dir(self, name):
        path = os.path.join(self.tmp, name)
        os.makedirs(path, exist_ok=True)
        return path

    def wrap_line(self, work, child):
        return "%s %s wrap --work-dir %s -- %s > /dev/null" % (PYTHON, HPCRUN, work, child)

    def compare_relay(self, figure, child, target=1.10, net=False):
        """Time child piped through tee against child wrapped, interleaved round by round.
        With net=True each round also times `wrap true` (the fixed cost of any wrapped run)
        and the figure is judged on the relay's median less that median; returns the work dir
        and, with net=True, the fixed cost."""
        work = self.work_dir("relay-%d" % len(self.rows))
        fixed_work = self.work_dir("relay-%d-fixed" % len(self.rows))
        log = os.path.join(self.tmp, "tee.log")

        # each side writes a new log with nothing of the last run left to write back: a
        # kept log's dirty pages are written back during the next run, truncating a cached
        # one costs the truncating side (tee overwriting one file while wrap kept five
        # skewed this by 10 %, either way)
        def teed():
            remove_logs(log)
            os.sync()
            return sh("%s | tee %s > /dev/null" % (child, log))[0]

        def wrapped():
            remove_logs(os.path.join(work, "logs"))
            os.sync()
            return sh(self.wrap_line(work, child), env=self.env)[0]

        def fixed():  # its own work dir, so that only wrap's logs of child are left in work
            remove_logs(os.path.join(fixed_work, "logs"))
            os.sync()
            return sh(self.wrap_line(fixed_work, "true"), env=self.env)[0]

        if not net:
            (wrap_times, tee_times), _, share = interleaved([wrapped, teed], self.rounds)
            self.note_load(figure, share)
            wrap, tee = statistics.median(wrap_times), statistics.median(tee_times)
            ratio = wrap / tee
            self.row(figure, "%.2fs" % wrap, "%.2fs tee" % tee, "%.2f" % ratio, "<= %.2f" % target,
                     ratio <= target)
            return work, None

        def net_ratio(samples):
            wrap, fixed_cost, tee = (statistics.median(times) for times in samples)
            return (wrap - fixed_cost) / tee

        (wrap_times, fixed_times, tee_times), _, share = interleaved(
            [wrapped, fixed, teed], self.net_rounds, net_ratio, target, self.most_rounds)
        self.note_load(figure, share)
        wrap, fixed_cost, tee = (statistics.median(times) for times in (wrap_times, fixed_times, tee_times))
        ratio, gross = (wrap - fixed_cost) / tee, wrap / tee
        self.row(figure, "%.2fs - %.2fs = %.2fs" % (wrap, fixed_cost, wrap - fixed_cost), "%.2fs tee" % tee,
                 "%.2f (gross %.2f)" % (ratio, gross), "<= %.2f net" % target, ratio <= target)
        return work, fixed_cost

    def relay_throughput(self):
        count = 1024 if self.quick else 16384
        child = "dd if=/dev/zero bs=64K count=%d status=none" % count
        work, _ = self.compare_relay("1 relay %s in 64 KiB writes" % ("64 MiB" if self.quick else "1 GiB"), child)
        process = subprocess.Popen([PYTHON, HPCRUN, "wrap", "--work-dir", work, "--"] + child.split(),
                                   env=self.env, stdout=subprocess.DEVNULL)
        self.peak_wrap_rss = 0
        while process.poll() is None:  # VmHWM of the wrapper itself, sampled until it exits
            self.peak_wrap_rss = max(self.peak_wrap_rss, vm_hwm(process.pid))
            time.sleep(0.02)

    def line_heavy(self):
        lines = 1000000 if self.quick else 20000000
        _, fixed_cost = self.compare_relay("2 %d million short lines" % (lines // 1000000), "seq 1 %d" % lines,
                                           net=True)
        # what every wrapped run pays once, however short: the interpreter, compiling hpcrun.py,
        # the records; the median of figure 2's own series, subtracted there (and figure 3 takes
        # its own). Figure 2's output lasts a fraction of a second, so this is most of its gross ratio.
        bare = median_time("true", self.repeat + 2)
        self.row("2b fixed cost: wrap of true", "%.2fs" % fixed_cost, "%.3fs bare true" % bare, "-",
                 "(taken off 2, 3)", True)

    def progress_bar(self):
        size = (5 if self.quick else 50) * 1000 * 1000
        bar_file = os.path.join(self.tmp, "bar.txt")
        frame = b"\r 37%|\xe2\x96\x88\xe2\x96\x88\xe2\x96\x88\xe2\x96\x8b      | 370/1000 [00:10<00:20, loss=0.312]"
        with open(bar_file, "wb") as stream:
            for _ in range(size // len(frame) // 1000):
                stream.write(frame * 1000)
        # a tqdm-like writer: one unbuffered write per redraw
        child = ("%s -c 'import os, sys; data = open(sys.argv[1], \"rb\").read(); n = %d\n"
                 "for i in range(0, len(data), n): os.write(1, data[i:i + n])' %s" % (PYTHON, len(frame), bar_file))
        work, _ = self.compare_relay("3 %d MB of \\r redraws" % (size // 1000000), child, net=True)
        logs = [os.path.join(work, "logs", name) for name in os.listdir(os.path.join(work, "logs"))]
        intact = all(os.path.getsize(log) == os.path.getsize(bar_file) for log in logs)
        self.row("3b log holds every byte", "%d logs" % len(logs), "%d B each" % os.path.getsize(bar_file),
                 "-", "identical", intact)

    def idle_cost(self):
        seconds = 10 if self.quick else 60
        work = self.work_dir("idle")
        wrapper = subprocess.Popen(self.wrap_line(work, "sleep %d" % seconds), shell=True, env=self.env)
        self.wrap_rss = 0   # what the node pays while the training runs, sampled after start-up
        deadline = time.monotonic() + seconds - 1
        while wrapper.poll() is None and time.monotonic() < deadline:
            if time.monotonic() > deadline - seconds + 3:
                self.wrap_rss = max(self.wrap_rss, vm_rss(wrapper_pid(work)))
            time.sleep(0.5)
        wrapper.wait()
        record = hpcrun.read_json_file(os.path.join(work, ".hpcrun", "done", os.listdir(
            os.path.join(work, ".hpcrun", "done"))[0]))
        share = 100.0 * record["wrapper_cpu_while_running"] / record["duration"]
        self.row("4 idle cost, %ds silent sleep" % seconds, "%.3fs CPU" % record["wrapper_cpu_while_running"],
                 "%.0fs wall" % record["duration"], "%.3f%%" % share, "<= 0.1%", share <= 0.1)
        total = 100.0 * record["wrapper_cpu"] / record["duration"]
        self.row("4b same with start-up and record", "%.3fs CPU" % record["wrapper_cpu"],
                 "%.0fs wall" % record["duration"], "%.3f%%" % total, "(see 7)", True)

    def gpu_cost(self):
        """4c: the wrapper's CPU while a silent training runs on 8 GPUs sampled every second
        (30 times the default [gpu] sample_interval): reading and counting nvidia-smi's rows."""
        seconds = 10 if self.quick else 60
        work = self.work_dir("gpu")
        fake = self.work_dir("fake-gpu")
        tools = self.work_dir("gpu-bin")
        with open(os.path.join(tools, "nvidia-smi"), "w") as stream:
            stream.write("#!/bin/sh\nexec '%s' '%s' \"$@\"\n" % (PYTHON, os.path.join(HERE, "fake_nvidia_smi.py")))
        os.chmod(os.path.join(tools, "nvidia-smi"), 0o755)
        with open(os.path.join(fake, "mode"), "w") as stream:
            stream.write("loop")
        with open(os.path.join(fake, "rows"), "w") as stream:
            stream.write("".join("2026/11/30 06:10:02.417, %d, GPU-8932f937-d72c-4106-c12f-20bd9faed9f%d, "
                                 "NVIDIA A100-SXM4-80GB, 97, 61234, 81920, 312.45, 400.00\n" % (i, i) for i in range(8)))
        config = os.path.join(fake, "config.ini")
        with open(config, "w") as stream:
            stream.write("[gpu]\nsample_interval = 1\n")
        env = dict(self.env, PATH=tools + os.pathsep + self.env.get("PATH", ""), FAKE_GPU_DIR=fake,
                   CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7", HPCRUN_CONFIG=config)
        subprocess.call(self.wrap_line(work, "sleep %d" % seconds), shell=True, env=env)
        record = hpcrun.read_json_file(os.path.join(work, ".hpcrun", "done", os.listdir(
            os.path.join(work, ".hpcrun", "done"))[0]))
        samples = min(gpu["samples"] for gpu in (record.get("gpu_stats") or {}).get("gpus") or [{"samples": 0}])
        share = 100.0 * record["wrapper_cpu_while_running"] / record["duration"]
        self.row("4c idle cost, 8 GPUs sampled every 1s", "%.3fs CPU, %d samples" % (
            record["wrapper_cpu_while_running"], samples), "%.0fs wall" % record["duration"], "%.3f%%" % share,
            "<= 0.1%", share <= 0.1 and samples >= seconds - 3)

    def report_cost(self):
        small = self.make_log("small.log", 5 * 1000 * 1000)
        large = self.make_log("large.log", 5 * 1000 * 1000 * 1000)
        script = (("import sys, time, resource; sys.path.insert(0, %r); import hpcrun\n"
                  "config = hpcrun.load_config(%r, env={})\n"
                  "record = {'status': 'failed', 'exit_code': 1, 'log_file': sys.argv[1], 'name': 'bench'}\n"
                  "started = time.perf_counter()\n"
                  "for _ in range(5): hpcrun.build_report(record, config, '/')\n"
                  "print((time.perf_counter() - started) / 5, " + HWM + ")")
                  % (os.path.dirname(HPCRUN), os.devnull))
        results = {}
        for name, path in (("small", small), ("large", large)):
            runs = [subprocess.check_output([PYTHON, "-c", script, path]).split() for _ in range(self.repeat)]
            results[name] = (statistics.median(float(r[0]) for r in runs), max(int(r[1]) for r in runs) * 1024)
        ratio = results["large"][0] / results["small"][0]
        self.row("5 report of a 5 GB log", "%.1fms" % (results["large"][0] * 1000),
                 "%.1fms for 5 MB" % (results["small"][0] * 1000), "%.2f" % ratio, "<= 1.5", ratio <= 1.5)
        peak = max(results["large"][1], results["small"][1])
        self.row("5b peak memory of that step", megabytes(peak), "-", "-", "<= 50 MB", peak <= 50e6)

    def make_log(self, name, size):
        """A sparse log of size bytes whose end is a real training's end."""
        path = os.path.join(self.tmp, name)
        ending = "".join("epoch 3/10 step %d/1000 loss=%.3f\n" % (i, 1.0 / (i + 1)) for i in range(2000))
        ending += "Traceback (most recent call last):\n  File \"train.py\", line 1\n"
        ending += "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n"
        with open(path, "wb") as stream:
            stream.truncate(size - len(ending))
            stream.seek(0, os.SEEK_END)
            stream.write(ending.encode("ascii"))
        return path

    def poll_cost(self):
        counts = (10, 100, 1000) if self.quick else (10, 100, 1000, 10000)
        per_run = []
        for total in counts:
            dirs = self.make_running(total)
            script = (("import sys, time; sys.path.insert(0, %r); import hpcrun\n"
                      "config = hpcrun.load_config(%r, env={})\n"
                      "monitor = hpcrun.Monitor(config, [], lambda line: None)\n"
                      "dirs = sys.argv[1:]\n"
                      "monitor.poll(dirs)\n"
                      "started = time.perf_counter()\n"
                      "for _ in range(3): monitor.poll(dirs)\n"
                      "print((time.perf_counter() - started) / 3, " + HWM + ")")
                      % (os.path.dirname(HPCRUN), os.devnull))
            output = subprocess.check_output([PYTHON, "-c", script] + dirs).split()
            seconds = float(output[0])
            per_run.append(seconds / total)
            if total == counts[-1]:
                self.monitor_rss = int(output[1]) * 1024
            self.row("6 poll, %d runs in %d dirs" % (total, len(dirs)), "%.1fms" % (seconds * 1000),
                     "-", "%.0fus/run" % (seconds / total * 1e6), "linear", True)
        growth = per_run[-1] / per_run[-2]
        self.row("6b per-run cost, %dx more runs" % (counts[-1] // counts[-2]), "%.0fus" % (per_run[-1] * 1e6),
                 "%.0fus" % (per_run[-2] * 1e6), "%.2f" % growth, "<= 1.5 (linear)", growth <= 1.5)
        self.syscalls_per_run()

    def array_cost(self):
        """A poll where 10 tasks of an array end: its cost must grow with the tasks that ended,
        not with the array (100 000 tasks counted already against 100). Rounds alternate."""
        sizes = (100, 10000) if self.quick else (100, 100000)
        arrays = [self.make_array(size) for size in sizes]
        script = (("import sys, time; sys.path.insert(0, %r); import hpcrun\n"
                   "config = hpcrun.load_config(%r, env={})\n"
                   "monitor = hpcrun.Monitor(config, [], lambda line: None, env={'HPCRUN_HOME': sys.argv[1]})\n"
                   "started = time.perf_counter()\n"
                   "monitor.poll([sys.argv[2]])\n"
                   "print(time.perf_counter() - started)")
                  % (os.path.dirname(HPCRUN), os.devnull))
        times = [[], []]
        for round_number in range(ARRAY_ROUNDS):
            for which, (home, work, counted) in enumerate(arrays):
                self.end_array_tasks(work, counted + 10 * round_number, counted)
                times[which].append(float(subprocess.check_output([PYTHON, "-c", script, home, work],
                                                                  env=self.env)))
        small, large = (statistics.median(series) for series in times)
        ratio = large / small
        self.row("6e poll, 10 array tasks ending, %d counted" % sizes[1], "%.1fms" % (large * 1000),
                 "%.1fms with %d counted" % (small * 1000, sizes[0]), "%.2f" % ratio, "<= 1.5", ratio <= 1.5)

    def make_array(self, counted):
        """An array of counted tasks in its ledger already (as the monitor leaves them), and room
        for ARRAY_ROUNDS x 10 more, so that the poll never completes it (a digest reads every
        task, once)."""
        home = self.work_dir("array-home-%d" % counted)
        work = self.work_dir("array-work-%d" % counted)
        hpcrun.make_state_dirs(work)
        tasks = os.path.join(home, "arrays", "slurm-4242", "tasks")
        os.makedirs(tasks)
        size = counted + 10 * ARRAY_ROUNDS + 10
        for index in range(counted):
            with open(os.path.join(tasks, "%d.json" % index), "w") as out:
                json.dump({"task": str(index), "index": index, "status": "success", "failed": False,
                           "duration": 60.0, "end_time": time.time(), "run_id": "t%d" % index}, out)
        with open(os.path.join(home, "arrays", "slurm-4242", "info.json"), "w") as out:
            json.dump({"key": "slurm-4242", "scheduler": "slurm", "id": "4242", "name": "bench", "size": size,
                       "first": 0, "last": size - 1, "job": array_job(size), "work_dir": work}, out)
        with open(os.path.join(home, "arrays", "slurm-4242", "tally.json"), "w") as out:
            json.dump({"reported": counted, "ok": counted, "failed": 0, "lost": 0, "labels": []}, out)
        return home, work, counted

    def end_array_tasks(self, work, first, counted):
        """Ten task records in done/, as ten wrappers leave them."""
        now = time.time()
        for index in range(first, first + 10):
            record = {"run_id": "task-%d" % index, "name": "bench", "status": "success", "exit_code": 0,
                      "final": True, "start_time": now - 60, "end_time": now, "duration": 60.0,
                      "job": dict(array_job(counted + 10 * ARRAY_ROUNDS + 10), id=str(5000 + index),
                                  array_index=index)}
            with open(os.path.join(work, ".hpcrun", "done", "task-%d.json" % index), "w") as out:
                json.dump(record, out)

    def make_running(self, total):
        base = self.work_dir("poll-%d" % total)
        dir_count = min(100, total)
        dirs = []
        for index in range(dir_count):
            work = os.path.join(base, "dir%03d" % index)
            hpcrun.make_state_dirs(work)
            dirs.append(work)
        now = time.time()
        for index in range(total):
            run_id = "bench-%05d" % index
            record = {"run_id": run_id, "name": run_id, "seq": 1, "written_at": now, "start_time": now,
                      "heartbeat_interval": 60, "log_size": 0, "host": "bench", "pid": 1}
            with open(os.path.join(dirs[index % dir_count], ".hpcrun", "running", run_id + ".json"), "w") as out:
                json.dump(record, out)
        for index in range(total // 10):  # delivered completions: never to be read again
            sent = os.path.join(dirs[index % dir_count], ".hpcrun", "sent", "old-%05d.json" % index)
            with open(sent, "w") as out:
                json.dump({"run_id": "old", "status": "success"}, out)
        return dirs

    def syscalls_per_run(self):
        """File opens per running record and per delivered record in one --once poll (strace)."""
        if not shutil.which("strace"):
            self.row("6c file opens per run and poll", "strace not installed", "-", "-", "-", True)
            return
        dirs = self.make_running(1000)
        trace = os.path.join(self.tmp, "strace.txt")
        sh("strace -f -e trace=open,openat -o %s %s %s monitor --once %s 2>/dev/null"
           % (trace, PYTHON, HPCRUN, " ".join("--work-dir " + d for d in dirs)), env=self.env)
        with open(trace, encoding="utf-8", errors="replace") as stream:
            opens = [line for line in stream if "openat(" in line or "open(" in line]
        # by name, with or without a directory: hpcrun opens records relative to their
        # directory's descriptor, openat(4, "bench-00001.json", ...)
        running = sum(1 for line in opens if re.search(r'["/]bench-\d{5}\.json"', line))
        sent = sum(1 for line in opens if re.search(r'["/]old-\d{5}\.json"', line))
        self.row("6c opens per running record", "%.2f" % (running / 1000.0), "-", "-", "<= 1",
                 running <= 1000)
        self.row("6d opens of delivered records", "%d" % sent, "-", "-", "0", sent == 0)

    def startup(self):
        """--help against its floor, the bare interpreter compiling hpcrun.py (what any
        `python3 hpcrun.py` pays: CPython compiles a script it is given on every run and caches
        only imported modules), and against `import argparse` (gross), interleaved."""
        with open(HPCRUN, "rb") as stream:
            lines = stream.read().count(b"\n")
        # the floor prints the CPU its compile took, for 7c: CPU time, because other processes
        # on the machine stretch wall time and 7c is there to show hpcrun.py's own growth
        floor_line = "%s -c %s" % (PYTHON, shlex.quote(
            "import time; source = open(%r, 'rb').read(); started = time.process_time()\n"
            "compile(source, %r, 'exec'); print(time.process_time() - started)" % (HPCRUN, HPCRUN)))
        compiling = []

        def floor():
            elapsed, _, output = sh(floor_line, capture=True)
            compiling.append(float(output))
            return elapsed

        commands = ("%s %s --help" % (PYTHON, HPCRUN), "%s -c pass" % PYTHON, "%s -c 'import argparse'" % PYTHON)
        sides = [floor] + [lambda command=command: sh(command)[0] for command in commands]
        (floor_times, help_times, bare_times, argparse_times), _, share = interleaved(
            sides, self.net_rounds, lambda samples: statistics.median(samples[1]) / statistics.median(samples[0]),
            1.3, self.most_rounds)
        self.note_load("7 start-up: --help", share)
        ours, floor_time, bare, argparse_time = (statistics.median(times) for times in
                                                 (help_times, floor_times, bare_times, argparse_times))
        ratio = ours / floor_time
        self.row("7 start-up: --help", "%.0fms" % (ours * 1000),
                 "%.0fms floor, %.0fms import argparse" % (floor_time * 1000, argparse_time * 1000),
                 "%.2f (gross %.2f)" % (ratio, ours / argparse_time), "<= 1.3 floor", ratio <= 1.3)
        heavy = subprocess.check_output([PYTHON, "-c", "import sys; sys.argv = ['hpcrun', '--help']\n"
                                         "sys.path.insert(0, %r); import hpcrun\n"
                                         "print(' '.join(sorted(m for m in ('ssl', 'email', 'urllib.request', "
                                         "'smtplib', 'http.client', 'hashlib') if m in sys.modules)))"
                                         % os.path.dirname(HPCRUN)]).decode().strip()
        self.row("7b heavy modules at start-up", heavy or "none", "-", "-", "none", not heavy)
        compile_cpu = statistics.median(compiling)
        self.row("7c compiling hpcrun.py", "%.0fms CPU" % (compile_cpu * 1000), "%d lines" % lines,
                 "%.1fms/1000 lines" % (compile_cpu * 1000 * 1000 / lines), "not to grow", True)
        self.row("7d floor: python3 compiling hpcrun.py", "%.0fms" % (floor_time * 1000),
                 "%.0fms python3 -c pass" % (bare * 1000), "-", "(reference of 7)", True)

    def memory(self):
        self.row("8 RSS of wrap while the training runs", megabytes(self.wrap_rss), "-", "-", "<= 30 MB",
                 0 < self.wrap_rss <= 30e6)
        floor = int(subprocess.check_output([PYTHON, "-c", "compile(open(%r).read(), 'x', 'exec'); print(%s)"
                                             % (HPCRUN, HWM)]).split()[0]) * 1024
        self.row("8c peak RSS of wrap relaying", megabytes(self.peak_wrap_rss),
                 "%s floor" % megabytes(floor), "%.2f" % (self.peak_wrap_rss / floor), "<= 1.10 floor",
                 self.peak_wrap_rss <= 1.10 * floor)
        self.row("8b peak RSS of a monitor, most runs", megabytes(self.monitor_rss), "-", "-", "<= 80 MB",
                 self.monitor_rss <= 80e6)

    def latency(self):
        server = FakeXxtui(KEY).start()
        try:
            config = os.path.join(self.tmp, "latency.ini")
            with open(config, "w") as out:
                out.write("[notify]\nchannels = xxtui\n[xxtui]\nurl = %s\napi_key = %s\n" % (server.url, KEY))
            env = dict(self.env, HPCRUN_CONFIG=config)
            exit_file = os.path.join(self.tmp, "exited")
            child = "%s -c 'import time; open(\"%s\", \"w\").write(repr(time.monotonic()))'" % (PYTHON, exit_file)
            samples = []
            for _ in range(self.repeat):
                count = len(server.requests)
                sh("%s %s run --work-dir %s -- %s" % (PYTHON, HPCRUN, self.work_dir("latency-run"), child), env=env,
                   stderr=subprocess.DEVNULL)
                samples.append(self.arrival(server, count) - float(open(exit_file).read()))
            run_latency = statistics.median(samples)
            self.row("9 latency exit -> push, run", "%.2fs" % run_latency, "-", "-", "<= 0.5s", run_latency <= 0.5)
            work = self.work_dir("latency-monitor")
            monitor = subprocess.Popen([PYTHON, HPCRUN, "monitor", "--interval", "1", "--work-dir", work],
                                       env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                samples = []
                for _ in range(self.repeat):
                    count = len(server.requests)
                    sh(self.wrap_line(work, child), env=env)
                    samples.append(self.arrival(server, count) - float(open(exit_file).read()))
            finally:
                monitor.terminate()
                monitor.wait()
            monitor_latency = statistics.median(samples)
            self.row("9b latency exit -> push, monitor --interval 1", "%.2fs" % monitor_latency, "-", "-",
                     "<= 2s", monitor_latency <= 2.0)
        finally:
            server.stop()

    @staticmethod
    def arrival(server, count):
        server.wait_for_requests(count + 1, timeout=30)
        return server.request_times[count]

    def table(self):
        header = ("figure", "hpcrun", "reference", "ratio", "target", "within")
        widths = [max(len(str(row[i])) for row in self.rows + [header]) for i in range(len(header))]
        lines = ["| " + " | ".join(str(cell).ljust(width) for cell, width in zip(row, widths)) + " |"
                 for row in [header] + self.rows]
        lines.insert(1, "|" + "|".join("-" * (width + 2) for width in widths) + "|")
        return "\n".join(lines)


def remove_logs(path):
    """Delete a log file, or every log file in a directory."""
    if os.path.isdir(path):
        for name in os.listdir(path):
            os.unlink(os.path.join(path, name))
    elif os.path.exists(path):
        os.unlink(path)


ARRAY_ROUNDS = 5


def array_job(size):
    return {"scheduler": "slurm", "id": "4243", "array_id": "4242", "array_count": size, "array_first": 0,
            "array_last": size - 1}


def megabytes(size):
    """Memory in MB (10^6 bytes, as the targets are given) with MiB beside it."""
    return "%.1f MB (%.1f MiB)" % (size / 1e6, size / 2.0 ** 20)


def vm_hwm(pid="self"):
    """Peak resident memory (bytes) of a live process since its exec."""
    try:
        with open("/proc/%s/status" % pid, encoding="ascii") as stream:
            for line in stream:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


HWM = ("open('/proc/self/status').read().split('VmHWM:')[1].split()[0]")


def vm_rss(pid):
    """Resident memory (bytes) of a live process now."""
    try:
        with open("/proc/%s/status" % pid, encoding="ascii") as stream:
            for line in stream:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def wrapper_pid(work):
    """The pid of the wrapper of a work dir, from its heartbeat record."""
    try:
        running = os.path.join(work, ".hpcrun", "running")
        name = [n for n in os.listdir(running) if n.endswith(".json")][0]
        return hpcrun.read_json_file(os.path.join(running, name))["pid"]
    except (OSError, IndexError, KeyError, hpcrun.HpcrunError):
        return "none"


class OtherLoad(object):
    """How much of the machine's CPU went to processes other than this benchmark and what it
    waited for since it was made (the hypervisor's steal counts, and so does the kernel writing
    back the benchmark's logs: 0-5 % during figures 1-3 on a quiet VM). On a shared 2-core VM
    other processes are what stretch wall times; the load average lags a minute behind, counts
    the benchmark itself and tasks waiting on the disk."""

    def __init__(self):
        self.started = self.snapshot()

    @staticmethod
    def snapshot():
        own = sum(getattr(resource.getrusage(who), field) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                  for field in ("ru_utime", "ru_stime"))
        try:
            with open("/proc/stat", encoding="ascii") as stream:
                fields = [int(value) for value in stream.readline().split()[1:9]]
            # user nice system idle iowait irq softirq steal: all but idle and iowait is busy
            busy = (sum(fields) - fields[3] - fields[4]) / float(os.sysconf("SC_CLK_TCK"))
        except (OSError, ValueError, IndexError):
            busy = None
        return time.monotonic(), busy, own

    def share(self):
        """Other processes' CPU as a share of all CPUs, None where /proc/stat is missing."""
        now, busy, own = self.snapshot()
        then, busy_then, own_then = self.started
        if busy is None or busy_then is None or now <= then:
            return None
        return max(0.0, (busy - busy_then) - (own - own_then)) / ((now - then) * (os.cpu_count() or 1))

    def text(self, share=None):
        share = self.share() if share is None else share
        return "?" if share is None else "%.0f%% of %d CPUs" % (100 * share, os.cpu_count() or 1)


def file_digest(path):
    with open(path, "rb") as stream:
        return zlib.crc32(stream.read())


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as stream:
            names = [line.split(":", 1)[1].strip() for line in stream if line.startswith("model name")]
        cpu = "%s x %d" % (names[0], len(names)) if names else cpu
    except OSError:
        pass
    return "%s, Python %s, %s" % (cpu, platform.python_version(), platform.platform(terse=True))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: check the benchmark itself")
    args = parser.parse_args()
    bench = Bench(args.quick)
    started, load, script = time.monotonic(), OtherLoad(), file_digest(HPCRUN)
    try:
        for step in (bench.relay_throughput, bench.line_heavy, bench.progress_bar, bench.idle_cost,
                     bench.gpu_cost, bench.report_cost, bench.poll_cost, bench.array_cost, bench.startup, bench.memory,
                     bench.latency):
            print("%s ..." % step.__name__.replace("_", " "))
            sys.stdout.flush()
            step()
    finally:
        shutil.rmtree(bench.tmp, ignore_errors=True)
    # other work on the machine stretches every wall time: say how much there was
    busy = load.share()
    print("\nmake bench on %s, %.0fs; other processes took %s meanwhile\n"
          % (machine(), time.monotonic() - started, load.text(busy)))
    if (busy or 0) > BUSY or bench.busy:
        print("the machine was busy (other processes took more than %.0f%% of its CPUs)%s: wall times are "
              "stretched and ratios skewed; rerun on a quiet machine\n"
              % (100 * BUSY, " while figures %s ran" % ", ".join(bench.busy) if bench.busy else ""))
    if file_digest(HPCRUN) != script:
        print("hpcrun.py changed while it was measured: the figures mix two versions\n")
    print(bench.table())
    missed = [row[0] for row in bench.rows if row[5] != "yes"]
    if missed:
        print("\nmissed: %s" % "; ".join(missed))
    return 1 if missed else 0


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    sys.exit(main())
