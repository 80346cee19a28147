#!/usr/bin/env python3
"""Run the test modules in parallel processes and print one summary line.

    python3 tests/run.py [-j JOBS] [--layer LAYER] [--slowest N] [MODULE ...]

Each tests/test_*.py module declares its layer with a module-level LAYER constant:

    fast       pure functions, the senders against the fake services and hpcrun.main([...]),
               all in the test process
    process    the real hpcrun.py in subprocesses: signals, the relay, files between
               processes, wrap and monitor racing
    scheduler  a real Slurm or Grid Engine (they skip themselves when there is none)

A module without LAYER counts as process. --layer (repeatable) runs only those modules;
the default is all of them. Each module runs in its own process with the interpreter that
runs this script (unittest, verbose). The scheduler modules, which mostly wait for their
jobs, start at once; the others run JOBS at a time, the slowest first (as long as they took
last time, kept in tests/__pycache__/durations.json; else in SLOW_FIRST's order): much of
the process layer waits on processes, signals and servers. A failing module's whole output
is printed; --slowest N lists the N slowest tests; the last line is
"N passed, N failed, N skipped".
"""

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import unittest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
LAYERS = ("scheduler", "process", "fast")          # also the order in which they start
DEFAULT_LAYER = "process"
LAYER_RE = re.compile(r"""^LAYER\s*=\s*["'](\w+)["']\s*$""", re.M)
# The slowest modules first when no earlier run said how long they take (then by name).
SLOW_FIRST = ("test_slurm", "test_sge", "test_slurm_reminders", "test_slurm_arrays", "test_forecast", "test_operations",
              "test_reliability", "test_gpu", "test_channels_e2e", "test_arrays",
              "test_wrap_faults", "test_monitor", "test_hostile", "test_wrap")
DURATIONS = os.path.join(TESTS_DIR, "__pycache__", "durations.json")
MODULE_TIMEOUT = 900      # seconds: a module still running then is killed and counts as failed
DURATION_RE = re.compile(r"^duration (\d+\.\d+)s (\S+)$", re.M)


def module_source(name):
    with open(os.path.join(TESTS_DIR, name + ".py"), encoding="utf-8") as stream:
        return stream.read()


def module_layer(name):
    """The LAYER a module declares (read from its source, not imported), or DEFAULT_LAYER."""
    match = LAYER_RE.search(module_source(name))
    return match.group(1) if match else DEFAULT_LAYER


def find_modules(layers):
    """[(module, layer)] of tests/test_*.py in the given layers."""
    names = sorted(name[:-3] for name in os.listdir(TESTS_DIR)
                   if name.startswith("test_") and name.endswith(".py"))
    found = [(name, module_layer(name)) for name in names]
    unknown = sorted(set(layer for _, layer in found) - set(LAYERS))
    if unknown:
        raise SystemExit("run.py: unknown LAYER %s (known: %s)"
                         % (", ".join(unknown), ", ".join(LAYERS)))
    return [item for item in found if item[1] in layers]


def read_durations():
    try:
        with open(DURATIONS, encoding="utf-8") as stream:
            durations = json.load(stream)
        return durations if isinstance(durations, dict) else {}
    except (OSError, ValueError):
        return {}


def write_durations(durations):
    """Remember how long each module took (best effort; another run may write at the same time)."""
    try:
        os.makedirs(os.path.dirname(DURATIONS), exist_ok=True)
        temp = "%s.%d" % (DURATIONS, os.getpid())
        with open(temp, "w", encoding="utf-8") as stream:
            json.dump(durations, stream, indent=1, sort_keys=True)
        os.replace(temp, DURATIONS)
    except OSError:
        pass


def start_order(modules, durations):
    """The scheduler layer first, then the slowest first: as long as they took last time, else
    SLOW_FIRST's order, else by name."""
    def order(item):
        name, layer = item
        slow = SLOW_FIRST.index(name) if name in SLOW_FIRST else len(SLOW_FIRST)
        return layer != "scheduler", -float(durations.get(name, -1)), slow, name
    return sorted(modules, key=order)


def start(module):
    """The module's test process, its output going to a file: a pipe nobody reads while it runs
    would block a module that prints more than the pipe holds."""
    output = tempfile.TemporaryFile()
    process = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--one", module],
                               cwd=TESTS_DIR, stdout=output, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, start_new_session=True)
    return process, output


def stop(process):
    """Kill a module's test process and whatever it started in its session."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except OSError:
        pass
    process.wait()


def counts(output):
    """(ran, failed, skipped) from unittest's output: failed counts tests, not their subtests."""
    ran = re.search(r"^Ran (\d+) tests?", output, re.M)
    closing = re.search(r"^(OK|FAILED|NO TESTS RAN)\b(.*)$", output, re.M)
    numbers = dict((key, int(value)) for key, value in re.findall(r"(failures|errors|skipped)=(\d+)",
                                                                  closing.group(2) if closing else ""))
    failed = len(set(re.findall(r"^(?:FAIL|ERROR): (\S+ \([\w.]+\))", output, re.M)))
    if numbers.get("failures") or numbers.get("errors"):
        failed = max(failed, 1)
    if not ran or not closing:
        failed = max(failed, 1)  # crashed before unittest could summarise
    return (int(ran.group(1)) if ran else 0), failed, numbers.get("skipped", 0)


def run_all(modules, jobs, timeout):
    """Run the modules (the scheduler ones at once, the others jobs at a time); return their
    (module, ran, failed, skipped) and every test's (seconds, test id)."""
    pending, running, results, durations = list(modules), {}, [], []
    took = read_durations()
    while pending or running:
        for item in list(pending):
            slots = len([1 for entry in running.values() if entry[2] != "scheduler"])
            if item[1] == "scheduler" or slots < jobs:
                pending.remove(item)
                running[item[0]] = start(item[0]) + (item[1], time.time())
        for module, (process, stream, layer, started) in list(running.items()):
            timed_out = process.poll() is None and time.time() - started > timeout
            if timed_out:
                stop(process)
            elif process.poll() is None:
                continue
            stream.seek(0)
            output = stream.read().decode("utf-8", errors="replace")
            stream.close()
            del running[module]
            ran, failed, skipped = counts(output)
            failed = failed or (1 if process.returncode else 0)
            results.append((module, ran, failed, skipped))
            durations.extend((float(seconds), test)
                             for seconds, test in DURATION_RE.findall(output))
            took[module] = round(time.time() - started, 1)
            print("%-28s %-9s %3d tests  %3d failed  %3d skipped  %5.1fs%s"
                  % (module, layer, ran, failed, skipped, time.time() - started,
                     "  (killed after %ds)" % timeout if timed_out else ""))
            if failed:
                print(output)
            sys.stdout.flush()
        time.sleep(0.05)
    write_durations(took)
    return results, durations


class TimedResult(unittest.TextTestResult):
    """unittest's verbose result, noting how long each test took."""

    def __init__(self, *args, **kwargs):
        super(TimedResult, self).__init__(*args, **kwargs)
        self.durations = []
        self.started = None

    def startTest(self, test):
        self.started = time.monotonic()
        super(TimedResult, self).startTest(test)

    def stopTest(self, test):
        super(TimedResult, self).stopTest(test)
        self.durations.append((time.monotonic() - self.started, test.id()))


def run_one(module):
    """--one MODULE: what `python -m unittest -v MODULE` does, then one line per test saying
    how long it took."""
    sys.path.insert(0, TESTS_DIR)
    runner = unittest.TextTestRunner(verbosity=2, resultclass=TimedResult)
    program = unittest.main(module=None, argv=[sys.argv[0], module], testRunner=runner, exit=False)
    result = program.result
    sys.stderr.flush()
    for seconds, test in result.durations:
        print("duration %.2fs %s" % (seconds, test))
    sys.stdout.flush()
    return 0 if result.wasSuccessful() else 1


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-j", "--jobs", type=int, default=4, help="modules at a time (default 4)")
    parser.add_argument("--layer", action="append", choices=LAYERS,
                        help="run only this layer's modules (repeatable; default: all)")
    parser.add_argument("--slowest", type=int, default=0, metavar="N",
                        help="list the N slowest tests at the end")
    parser.add_argument("--timeout", type=float, default=MODULE_TIMEOUT, metavar="SECONDS",
                        help="kill a module still running after this long (default %d)"
                             % MODULE_TIMEOUT)
    parser.add_argument("--one", metavar="MODULE", help=argparse.SUPPRESS)
    parser.add_argument("modules", nargs="*", help="test modules (default: all tests/test_*.py)")
    args = parser.parse_args()
    if args.one:
        return run_one(args.one)
    began = time.time()
    layers = args.layer or LAYERS
    print("Python %s (%s), layers: %s" % (sys.version.split()[0], sys.executable, ", ".join(
        layer for layer in LAYERS if layer in layers)))
    if args.modules:
        modules = [(name, module_layer(name)) for name in args.modules]
    else:
        modules = find_modules(layers)
    undeclared = [name for name, _ in modules if not LAYER_RE.search(module_source(name))]
    if undeclared:
        print("no LAYER in %s: run as %s" % (", ".join(undeclared), DEFAULT_LAYER))
    modules = start_order(modules, read_durations())
    results, durations = run_all(modules, max(1, args.jobs), args.timeout)
    ran = sum(r[1] for r in results)
    failed = sum(r[2] for r in results)
    skipped = sum(r[3] for r in results)
    if args.slowest:
        print("the %d slowest tests:" % min(args.slowest, len(durations)))
        for seconds, test in sorted(durations, reverse=True)[:args.slowest]:
            print("  %6.2fs %s" % (seconds, test))
    print("%d tests in %.0fs" % (ran, time.time() - began))
    print("%d passed, %d failed, %d skipped" % (ran - failed - skipped, failed, skipped))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
