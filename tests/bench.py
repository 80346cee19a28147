#!/usr/bin/env python3
"""make bench: what hpcrun costs a training, measured side by side with the plain tools.

    python3 tests/bench.py [--quick]

Every figure runs hpcrun and its reference (tee, a bare run, python -c "import argparse")
in the same benchmark, several times, and compares medians. Prints one table (figure,
hpcrun, reference, ratio, target, within target) and exits 1 when a figure misses its
target. --quick uses smaller sizes to check the benchmark itself, not hpcrun.
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
HPCRUN = os.path.join(os.path.dirname(HERE), "hpcrun.py")
PYTHON = sys.executable
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import hpcrun  # noqa: E402
from support import FakeXxtui  # noqa: E402

KEY = "bench-key-0123456789"


def sh(command, **kwargs):
    """Run a shell command line; (wall seconds, rusage of it and its waited-for children)."""
    started = time.monotonic()
    process = subprocess.Popen(["bash", "-c", command], stdout=subprocess.DEVNULL, **kwargs)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status) if hasattr(os, "waitstatus_to_exitcode") \
        else (status >> 8)
    if process.returncode:
        raise SystemExit("bench: '%s' exited %d" % (command, process.returncode))
    return time.monotonic() - started, usage


def median_time(command, repeat, env=None):
    return statistics.median(sh(command, env=env)[0] for _ in range(repeat))


class Bench(object):
    def __init__(self, quick):
        self.quick = quick
        self.rows = []
        self.tmp = tempfile.mkdtemp(prefix="hpcrun-bench-")
        self.env = dict(os.environ, HOME=os.path.join(self.tmp, "home"),
                        HPCRUN_HOME=os.path.join(self.tmp, "home", ".hpcrun"), HPCRUN_CONFIG=os.devnull)
        for name in list(self.env):
            if name.startswith("SLURM_") or name.endswith("_proxy") or name.endswith("_PROXY"):
                del self.env[name]
        os.makedirs(self.env["HOME"])
        self.repeat = 1 if quick else 3

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

    def compare_relay(self, figure, child, target=1.10):
        work = self.work_dir("relay-%d" % len(self.rows))
        log = os.path.join(self.tmp, "tee.log")
        wrap_times, tee_times = [], []
        for _ in range(self.repeat * 3):  # interleaved, so both see the same machine
            # each side writes a new log with nothing of the last run left to write back: a
            # kept log's dirty pages are written back during the next run, truncating a cached
            # one costs the truncating side (tee overwriting one file while wrap kept five
            # skewed this by 10 %, either way)
            remove_logs(log)
            os.sync()
            tee_times.append(sh("%s | tee %s > /dev/null" % (child, log))[0])
            remove_logs(os.path.join(work, "logs"))
            os.sync()
            wrap_times.append(sh(self.wrap_line(work, child), env=self.env)[0])
        wrapped, teed = statistics.median(wrap_times), statistics.median(tee_times)
        ratio = wrapped / teed
        self.row(figure, "%.2fs" % wrapped, "%.2fs tee" % teed, "%.2f" % ratio, "<= %.2f" % target,
                 ratio <= target)
        return work

    def relay_throughput(self):
        count = 1024 if self.quick else 16384
        child = "dd if=/dev/zero bs=64K count=%d status=none" % count
        work = self.compare_relay("1 relay %s in 64 KiB writes" % ("64 MiB" if self.quick else "1 GiB"), child)
        process = subprocess.Popen([PYTHON, HPCRUN, "wrap", "--work-dir", work, "--"] + child.split(),
                                   env=self.env, stdout=subprocess.DEVNULL)
        self.peak_wrap_rss = 0
        while process.poll() is None:  # VmHWM of the wrapper itself, sampled until it exits
            self.peak_wrap_rss = max(self.peak_wrap_rss, vm_hwm(process.pid))
            time.sleep(0.02)

    def line_heavy(self):
        lines = 1000000 if self.quick else 20000000
        self.compare_relay("2 %d million short lines" % (lines // 1000000), "seq 1 %d" % lines)
        # what every wrapped run pays once, however short: the interpreter, compiling hpcrun.py,
        # the records; figure 2's output lasts a fraction of a second, so this shows in its ratio
        work = self.work_dir("fixed")
        wrapped = median_time(self.wrap_line(work, "true"), self.repeat + 2, env=self.env)
        bare = median_time("true", self.repeat + 2)
        self.row("2b fixed cost: wrap of true", "%.2fs" % wrapped, "%.3fs bare true" % bare, "-", "(see 7)", True)

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
        work = self.compare_relay("3 %d MB of \\r redraws" % (size // 1000000), child)
        logs = [os.path.join(work, "logs", name) for name in os.listdir(os.path.join(work, "logs"))]
        intact = all(os.path.getsize(log) == os.path.getsize(bar_file) for log in logs)
        self.row("3b log holds every byte", "%d logs" % len(logs), "%d B each" % os.path.getsize(bar_file),
                 "-", "identical", intact)

    def idle_cost(self):
        seconds = 10 if self.quick else 60
        work = self.work_dir("idle")
        sh(self.wrap_line(work, "sleep %d" % seconds), env=self.env)
        record = hpcrun.read_json_file(os.path.join(work, ".hpcrun", "done", os.listdir(
            os.path.join(work, ".hpcrun", "done"))[0]))
        share = 100.0 * record["wrapper_cpu_while_running"] / record["duration"]
        self.row("4 idle cost, %ds silent sleep" % seconds, "%.3fs CPU" % record["wrapper_cpu_while_running"],
                 "%.0fs wall" % record["duration"], "%.3f%%" % share, "<= 0.1%", share <= 0.1)
        total = 100.0 * record["wrapper_cpu"] / record["duration"]
        self.row("4b same with start-up and record", "%.3fs CPU" % record["wrapper_cpu"],
                 "%.0fs wall" % record["duration"], "%.3f%%" % total, "(see 7)", True)

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
        running = sum(1 for line in opens if "/running/bench-" in line)
        sent = sum(1 for line in opens if "/sent/" in line)
        self.row("6c opens per running record", "%.2f" % (running / 1000.0), "-", "-", "<= 1",
                 running <= 1000)
        self.row("6d opens of delivered records", "%d" % sent, "-", "-", "0", sent == 0)

    def startup(self):
        repeat = 5 if self.quick else 15
        ours = median_time("%s %s --help" % (PYTHON, HPCRUN), repeat)
        reference = median_time("%s -c 'import argparse'" % PYTHON, repeat)
        ratio = ours / reference
        self.row("7 start-up: --help", "%.0fms" % (ours * 1000), "%.0fms import argparse" % (reference * 1000),
                 "%.2f" % ratio, "<= 1.5", ratio <= 1.5)
        heavy = subprocess.check_output([PYTHON, "-c", "import sys; sys.argv = ['hpcrun', '--help']\n"
                                         "sys.path.insert(0, %r); import hpcrun\n"
                                         "print(' '.join(sorted(m for m in ('ssl', 'email', 'urllib.request', "
                                         "'smtplib', 'http.client', 'hashlib') if m in sys.modules)))"
                                         % os.path.dirname(HPCRUN)]).decode().strip()
        self.row("7b heavy modules at start-up", heavy or "none", "-", "-", "none", not heavy)
        # CPython compiles a script it is given on every run (it caches only imported modules)
        script = ("import time; source = open(%r, 'rb').read(); started = time.perf_counter()\n"
                  "compile(source, 'hpcrun.py', 'exec'); print(time.perf_counter() - started)" % HPCRUN)
        compiling = statistics.median(float(subprocess.check_output([PYTHON, "-c", script]))
                                      for _ in range(repeat))
        self.row("7c start-up less compiling hpcrun.py", "%.0fms" % ((ours - compiling) * 1000),
                 "%.0fms compile" % (compiling * 1000), "%.2f" % ((ours - compiling) / reference), "(see 7)", True)

    def memory(self):
        self.row("8 peak RSS of wrap relaying", megabytes(self.peak_wrap_rss), "-", "-", "<= 30 MB",
                 self.peak_wrap_rss <= 30e6)
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
    started = time.monotonic()
    try:
        for step in (bench.relay_throughput, bench.line_heavy, bench.progress_bar, bench.idle_cost,
                     bench.report_cost, bench.poll_cost, bench.startup, bench.memory, bench.latency):
            print("%s ..." % step.__name__.replace("_", " "))
            sys.stdout.flush()
            step()
    finally:
        shutil.rmtree(bench.tmp, ignore_errors=True)
    print("\nmake bench on %s, %.0fs\n" % (machine(), time.monotonic() - started))
    print(bench.table())
    missed = [row[0] for row in bench.rows if row[5] != "yes"]
    if missed:
        print("\nmissed: %s" % "; ".join(missed))
    return 1 if missed else 0


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    sys.exit(main())
