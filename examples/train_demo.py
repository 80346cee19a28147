#!/usr/bin/env python3
"""A pretend training run for trying hpcrun without a GPU or a real model.

Prints a tqdm-like progress bar redrawn with carriage returns, one line per epoch
with a falling loss, and a final "done" line.  With --fail it dies the way a real
training often does: a Python traceback ending in a CUDA out-of-memory error,
exit status 1.

    python3 examples/train_demo.py [--epochs 3] [--steps 20] [--sleep 0.05]
    python3 examples/train_demo.py --fail [--fail-at 2]

Python 3.6+, standard library only.
"""

import argparse
import math
import os
import random
import sys
import time

BAR_WIDTH = 10


def parse_args(argv):
    parser = argparse.ArgumentParser(description="Pretend to train a model.")
    parser.add_argument("--epochs", type=int, default=3, help="number of epochs (default 3)")
    parser.add_argument("--steps", type=int, default=20, help="steps per epoch (default 20)")
    parser.add_argument("--sleep", type=float, default=0.05,
                        help="seconds per step (default 0.05)")
    parser.add_argument("--fail", action="store_true",
                        help="crash with a CUDA out-of-memory traceback")
    parser.add_argument("--fail-at", type=int, metavar="EPOCH",
                        help="epoch to crash in (implies --fail; default 2, or 1 for one epoch)")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.steps < 1:
        parser.error("--epochs and --steps must be at least 1")
    if args.fail_at is not None:
        if not 1 <= args.fail_at <= args.epochs:
            parser.error("--fail-at must be an epoch between 1 and --epochs")
        args.fail = True
    elif args.fail:
        args.fail_at = min(2, args.epochs)
    return args


def bar_symbols(stream):
    """Block characters if the stream can encode them (not under LANG=C on 3.6), else '#'."""
    try:
        "\u2588\u258c".encode(stream.encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return "#", ""
    return "\u2588", " \u258f\u258e\u258d\u258c\u258b\u258a\u2589"


def format_bar(done, total, symbols):
    full, partials = symbols
    filled = BAR_WIDTH * done / total
    whole = int(filled)
    bar = full * whole
    if whole < BAR_WIDTH:
        if partials:
            bar += partials[int((filled - whole) * len(partials))]
        bar = bar.ljust(BAR_WIDTH)
    return "{:3d}%|{}|".format(100 * done // total, bar)


def loss_at(progress, rng):
    """A loss that falls from about 2.3 towards 0.3, with a little noise."""
    return 0.3 + 2.0 * math.exp(-2.5 * progress) + rng.uniform(-0.02, 0.02)


def allocate_activations(gib):
    raise RuntimeError(
        "CUDA out of memory. Tried to allocate {:.2f} GiB (GPU 0; 23.65 GiB total capacity; "
        "21.02 GiB already allocated; 1.12 GiB free; 21.80 GiB reserved in total by "
        "PyTorch)".format(gib))


def forward(batch_size):
    return allocate_activations(batch_size / 16.0)


def train(args, out=sys.stdout):
    rng = random.Random(0)
    symbols = bar_symbols(out)
    total_steps = args.epochs * args.steps
    print("train_demo: {} epoch(s) x {} steps, pid {}".format(
        args.epochs, args.steps, os.getpid()), file=out, flush=True)
    loss = None
    for epoch in range(1, args.epochs + 1):
        for step in range(1, args.steps + 1):
            time.sleep(args.sleep)
            if args.fail and epoch == args.fail_at and step > args.steps // 2:
                out.write("\n")
                out.flush()
                forward(batch_size=32)
            loss = loss_at(((epoch - 1) * args.steps + step) / total_steps, rng)
            out.write("\repoch {}/{} step {}/{} {} loss={:.4f}".format(
                epoch, args.epochs, step, args.steps,
                format_bar(step, args.steps, symbols), loss))
            out.flush()
        out.write("\n")
        out.flush()
    print("done: {} epoch(s), final loss={:.4f}".format(args.epochs, loss), file=out, flush=True)


def main(argv=None):
    train(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
