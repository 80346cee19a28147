#!/usr/bin/env python3
"""Run the test modules in parallel processes and print one summary line.

    python3 tests/run.py [-j JOBS] [MODULE ...]

Each tests/test_*.py module runs in its own `python -m unittest` process with the
interpreter that runs this script; most of the suite waits on real processes, signals
and servers, so a few modules at a time finish much sooner than one after another. The
slow real-Slurm module starts first. A failing module's whole output is printed; the last
line is "N passed, N failed, N skipped".
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
SLOW_FIRST = ("test_slurm", "test_sge", "test_operations", "test_reliability", "test_channels", "test_arrays",
              "test_hostile", "test_monitor", "test_wrap_faults", "test_wrap")


def find_modules():
    names = sorted(name[:-3] for name in os.listdir(TESTS_DIR)
                   if name.startswith("test_") and name.endswith(".py"))
    return sorted(names, key=lambda name: SLOW_FIRST.index(name) if name in SLOW_FIRST else len(SLOW_FIRST))


def start(module):
    """The module's test process, its output going to a file: a pipe nobody reads while it runs
    would block a module that prints more than the pipe holds."""
    output = tempfile.TemporaryFile()
    process = subprocess.Popen([sys.executable, "-m", "unittest", "-v", module], cwd=TESTS_DIR,
                               stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return process, output


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


def run_all(modules, jobs):
    pending, running, results = list(modules), {}, []
    while pending or running:
        while pending and len(running) < jobs:
            module = pending.pop(0)
            running[module] = start(module) + (time.time(),)
        for module, (process, stream, started) in list(running.items()):
            if process.poll() is None:
                continue
            stream.seek(0)
            output = stream.read().decode("utf-8", errors="replace")
            stream.close()
            del running[module]
            ran, failed, skipped = counts(output)
            no_tests = process.returncode == 5 and "NO TESTS RAN" in output  # 3.12+: all skipped
            failed = failed or (1 if process.returncode and not no_tests else 0)
            results.append((module, ran, failed, skipped))
            print("%-28s %3d tests  %3d failed  %3d skipped  %5.1fs"
                  % (module, ran, failed, skipped, time.time() - started))
            if failed:
                print(output)
            sys.stdout.flush()
        time.sleep(0.05)
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-j", "--jobs", type=int, default=3, help="modules at a time (default 3)")
    parser.add_argument("modules", nargs="*", help="test modules (default: all tests/test_*.py)")
    args = parser.parse_args()
    began = time.time()
    print("Python %s (%s)" % (sys.version.split()[0], sys.executable))
    results = run_all(args.modules or find_modules(), max(1, args.jobs))
    ran = sum(r[1] for r in results)
    failed = sum(r[2] for r in results)
    skipped = sum(r[3] for r in results)
    print("%d tests in %.0fs" % (ran, time.time() - began))
    print("%d passed, %d failed, %d skipped" % (ran - failed - skipped, failed, skipped))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
