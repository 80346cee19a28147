"""A fake `nvidia-smi` that replays rows in the real `--query-gpu` CSV format.

The test writes the rows it wants seen into FAKE_GPU_DIR/rows, in the format of
`nvidia-smi --query-gpu=timestamp,index,uuid,name,utilization.gpu,memory.used,memory.total,
power.draw,power.limit --format=csv,noheader,nounits` (one row per GPU, ", " between fields,
[N/A] and [Not Supported] where a board has no value). The timestamps in the rows are the test
clock: the fake prints each row as soon as it is in the file, so a test appends one sample and
waits for wrap to have read it, instead of sleeping. `-l N` is accepted and not slept on.

FAKE_GPU_DIR/mode changes the behaviour: `hang` prints nothing and ignores SIGTERM, `fail`
prints the driver error and exits 9 as nvidia-smi does without a driver, `loop` prints the rows
every N seconds stamped with the time (make bench). `-L` prints
FAKE_GPU_DIR/list (the GPU and MIG list). Every start is appended to FAKE_GPU_DIR/calls
(pid and argv), so a test can tell how many nvidia-smi ran and whether they are gone.
"""

import os
import signal
import sys
import time

# nvidia-smi's message when it cannot reach the driver (its exit status is 9)
NO_DRIVER = ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
             "Make sure that the latest NVIDIA driver is installed and running.\n")


def read(path, default=""):
    try:
        with open(path, encoding="utf-8") as stream:
            return stream.read()
    except OSError:
        return default


def replay(path):
    """Print every complete line of path, then each line appended later, until killed."""
    offset = 0
    while True:
        try:
            with open(path, "rb") as stream:
                stream.seek(offset)
                data = stream.read()
        except OSError:
            data = b""
        complete = data[:data.rfind(b"\n") + 1]
        if complete:
            sys.stdout.buffer.write(complete)
            sys.stdout.flush()
            offset += len(complete)
        time.sleep(0.02)


def loop(path, interval):
    """As the real one does with -l N: the rows of path every N seconds, stamped with the time."""
    rows = [line.split(", ", 1)[1] for line in read(path).splitlines() if ", " in line]
    while True:
        now = time.time()
        stamp = time.strftime("%Y/%m/%d %H:%M:%S", time.localtime(now)) + ".%03d" % (now % 1 * 1000)
        sys.stdout.write("".join("%s, %s\n" % (stamp, row) for row in rows))
        sys.stdout.flush()
        time.sleep(interval)


def main():
    directory = os.environ["FAKE_GPU_DIR"]
    mode = read(os.path.join(directory, "mode")).strip()
    if mode == "hang":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)   # before it says it runs: a test relies on it
    with open(os.path.join(directory, "calls"), "a", encoding="utf-8") as calls:
        calls.write("%d %s\n" % (os.getpid(), " ".join(sys.argv[1:])))
    if mode == "fail":
        sys.stdout.write(NO_DRIVER)
        return 9
    if "-L" in sys.argv[1:]:
        sys.stdout.write(read(os.path.join(directory, "list")))
        return 0
    if mode == "loop":
        loop(os.path.join(directory, "rows"), int(sys.argv[sys.argv.index("-l") + 1]))
    if mode == "hang":
        while True:
            time.sleep(1)
    try:
        replay(os.path.join(directory, "rows"))
    except (BrokenPipeError, KeyboardInterrupt):
        return 0


if __name__ == "__main__":
    sys.exit(main())
