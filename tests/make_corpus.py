#!/usr/bin/env python3
"""Write tests/data/logs/: realistic training log excerpts and expected.json.

    python3 tests/make_corpus.py            # rewrite the corpus next to this script

Each log is an excerpt as a launcher, framework or scheduler really prints it (wordings taken
from the tools' sources and public bug reports), kept to a few KB. Logs are bytes: tqdm's
`\\r` redraws, ANSI colour and invalid UTF-8 are written as the real bytes. expected.json
says, for each log, what hpcrun should find in it:

    cause      hpcrun's cause key (cuda_oom, exception, time_limit, ...) or null for success
    exception  for cause "exception": the short exception name the title shows
    progress   the exact progress string of the report, or null
    metric     for logs that print one: name and the start of its trend line
    secrets    values that must never leave the machine
    why        what makes the log interesting (and, where hpcrun gets it wrong, why)

Python 3.6+, standard library only. The output is deterministic: running it twice gives the
same bytes.
"""

import collections
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "data", "logs")

LOGS = collections.OrderedDict()


def log(name, cause, progress, why, exception=None, metric=None, secrets=None):
    """Register a log writer: its function returns the log as text (str) or bytes."""
    def register(function):
        LOGS[name] = {"write": function, "cause": cause, "exception": exception,
                      "progress": progress, "metric": metric, "secrets": secrets, "why": why}
        return function
    return register


# --- helpers that print like the tools do ---

def clock(seconds):
    """tqdm's elapsed/remaining format: 05:03 or 1:02:03."""
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return "%d:%02d:%02d" % (hours, minutes, secs) if hours else "%02d:%02d" % (minutes, secs)


def tqdm_bar(n, total, seconds_per_it, desc="", postfix="", width=10):
    """One tqdm state line, as tqdm formats it (l_bar, bar, r_bar)."""
    fraction = float(n) / total
    filled = fraction * width
    full = int(filled)
    partial = " ▏▎▍▌▋▊▉"[int((filled - full) * 8)] if full < width else ""
    bar = ("█" * full + partial.strip()).ljust(width)
    elapsed = n * seconds_per_it
    remaining = (total - n) * seconds_per_it
    rate = ("%.2fs/it" % seconds_per_it) if seconds_per_it >= 1 else ("%.2fit/s" % (1.0 / seconds_per_it))
    if n == 0:
        return "%s%3d%%|%s| %d/%d [00:00<?, ?it/s%s]" % (desc, 0, " " * width, n, total, postfix)
    return "%s%3.0f%%|%s| %d/%d [%s<%s, %s%s]" % (desc, fraction * 100, bar, n, total,
                                                 clock(elapsed), clock(remaining), rate, postfix)


def tqdm_run(states, total, seconds_per_it, desc="", postfix=None, close=True):
    """The bytes tqdm writes to a pipe: '\\r' + state for each refresh, '\\n' on close."""
    text = ""
    for n in states:
        extra = ", " + postfix(n) if postfix else ""
        text += "\r" + tqdm_bar(n, total, seconds_per_it, desc, extra)
    return text + ("\n" if close else "")


def tqdm_write(message, bar_width=60):
    """tqdm.write() while a bar is shown: clear the bar, print the message, the bar comes back."""
    return "\r" + " " * bar_width + "\r" + message + "\n"


def frames(*entries):
    """Traceback frames: (file, line, function, source) -> the two-line CPython form."""
    lines = []
    for path, number, function, source in entries:
        lines.append('  File "%s", line %d, in %s' % (path, number, function))
        if source:
            lines.append("    " + source)
    return "\n".join(lines)


def prefixed(prefix, text):
    return "\n".join(prefix + line for line in text.split("\n"))


SITE = "/opt/conda/lib/python3.10/site-packages"
TORCH = SITE + "/torch"

TORCHRUN_BANNER = """\
W0501 {t} 140211 torch/distributed/run.py:793] 
W0501 {t} 140211 torch/distributed/run.py:793] *****************************************
W0501 {t} 140211 torch/distributed/run.py:793] Setting OMP_NUM_THREADS environment variable for each process to be 1 in default, to avoid your system being overloaded, please further tune the variable for optimal performance in your application as needed. 
W0501 {t} 140211 torch/distributed/run.py:793] *****************************************
"""


def torchrun_failure(python, script, host, rank, local_rank, pid, when, exitcode, traceback):
    """torchrun's own traceback and ChildFailedError block (torch/distributed/launcher/api.py)."""
    launcher = frames(
        (os.path.dirname(python) + "/torchrun", 8, "<module>", "sys.exit(main())"),
        (TORCH + "/distributed/elastic/multiprocessing/errors/__init__.py", 348, "wrapper",
         "return f(*args, **kwargs)"),
        (TORCH + "/distributed/run.py", 901, "main", "run(args)"),
        (TORCH + "/distributed/run.py", 892, "run", "elastic_launch("),
        (TORCH + "/distributed/launcher/api.py", 133, "__call__",
         "return launch_agent(self._config, self._entrypoint, list(args))"),
        (TORCH + "/distributed/launcher/api.py", 264, "launch_agent", "raise ChildFailedError("),
    )
    return """\
Traceback (most recent call last):
{launcher}
torch.distributed.elastic.multiprocessing.errors.ChildFailedError: 
============================================================
{script} FAILED
------------------------------------------------------------
Failures:
  <NO_OTHER_FAILURES>
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : {when}
  host      : {host}
  rank      : {rank} (local_rank: {local_rank})
  exitcode  : {exitcode} (pid: {pid})
  error_file: <N/A>
  traceback : {traceback}
============================================================
""".format(launcher=launcher, script=script, when=when, host=host, rank=rank,
           local_rank=local_rank, exitcode=exitcode, pid=pid, traceback=traceback)


ELASTIC_HINT = "To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html"


def watchdog_timeout(rank, seq, ran_ms, stamp, timeout_ms=600000):
    """What ProcessGroupNCCL prints when its watchdog gives up, then the C++ abort."""
    work = ("WorkNCCL(SeqNum=%d, OpType=ALLREDUCE, NumelIn=1, NumelOut=1, Timeout(ms)=%d) ran for %d "
            "milliseconds before timing out." % (seq, timeout_ms, ran_ms))
    p = "[rank%d]:[E501 %s ProcessGroupNCCL.cpp:" % (rank, stamp)
    return "\n".join([
        p + "616] [Rank %d] Watchdog caught collective operation timeout: %s" % (rank, work),
        p + "1785] [PG 0 (default_pg) Rank %d] Exception (either an error or timeout) detected by "
            "watchdog at work: %d, last enqueued NCCL work: %d, last completed NCCL work: %d."
            % (rank, seq, seq, seq - 1),
        p + "630] [Rank %d] Some NCCL operations have failed or timed out. Due to the asynchronous "
            "nature of CUDA kernels, subsequent GPU operations might run on corrupted/incomplete data."
            % rank,
        p + "636] [Rank %d] To avoid data inconsistency, we are taking the entire process down." % rank,
        p + "1595] [PG 0 (default_pg) Rank %d] Process group watchdog thread terminated with "
            "exception: [Rank %d] Watchdog caught collective operation timeout: %s" % (rank, rank, work),
        "Exception raised from checkTimeout at ../torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:618 "
        "(most recent call first):",
        "frame #0: c10::Error::Error(c10::SourceLocation, std::string) + 0x96 (0x7f1b3c36bf86 in "
        + TORCH + "/lib/libc10.so)",
        "frame #1: c10d::ProcessGroupNCCL::WorkNCCL::checkTimeout(std::optional<std::chrono::duration"
        "<long, std::ratio<1l, 1000l> > >) + 0x1d2 (0x7f1aee1c8a12 in " + TORCH + "/lib/libtorch_cuda.so)",
        "frame #2: c10d::ProcessGroupNCCL::watchdogHandler() + 0x233 (0x7f1aee1cfe53 in "
        + TORCH + "/lib/libtorch_cuda.so)",
        "frame #3: c10d::ProcessGroupNCCL::ncclCommWatchdog() + 0x14d (0x7f1aee1d18dd in "
        + TORCH + "/lib/libtorch_cuda.so)",
        "frame #4: <unknown function> + 0xdc253 (0x7f1b3bab0253 in /lib/x86_64-linux-gnu/libstdc++.so.6)",
        "frame #5: <unknown function> + 0x94ac3 (0x7f1b3d494ac3 in /lib/x86_64-linux-gnu/libc.so.6)",
        "frame #6: <unknown function> + 0x126850 (0x7f1b3d526850 in /lib/x86_64-linux-gnu/libc.so.6)",
        "",
        "terminate called after throwing an instance of 'c10::DistBackendError'",
        "  what():  [PG 0 (default_pg) Rank %d] Process group watchdog thread terminated with "
        "exception: [Rank %d] Watchdog caught collective operation timeout: %s" % (rank, rank, work),
    ]) + "\n"


# --- PyTorch, single GPU ---

@log("pytorch_single_gpu_success.log", None, "epoch 100/100 · 100% 391/391",
     "ResNet-18 on CIFAR-10 that finishes: tqdm bars with \\r redraws, epoch summaries, and a "
     "closing 'best ... at epoch 96' line after the last 'Epoch 100/100'",
     metric={"name": "loss", "trend": "loss 0.0311 → 0.0205 (best 0.0205)"})
def pytorch_single_gpu_success():
    out = ["Using device: cuda:0 (NVIDIA A100-SXM4-40GB)",
           "Files already downloaded and verified",
           "Files already downloaded and verified",
           "Resuming from checkpoints/resnet18_epoch097.pt (epoch 97, best val_acc 0.9431)"]
    text = "\n".join(out) + "\n"
    losses = {98: (0.0311, 0.0262), 99: (0.0248, 0.0231), 100: (0.0224, 0.0205)}
    for epoch in (98, 99, 100):
        first, last = losses[epoch]
        text += "Epoch %d/100\n" % epoch
        states = [0, 1, 40, 120, 200, 280, 360, 391]
        values = dict(zip(states, [first, first, first, (first + last) / 2, (first + last) / 2,
                                   last + 0.001, last, last]))
        text += tqdm_run(states, 391, 0.0745, desc="train: ",
                         postfix=lambda n: "loss=%.4f" % values[n])
        text += ("Epoch %d/100: train_loss=%.4f val_loss=0.28%02d val_acc=0.94%02d lr=%.2e\n"
                 % (epoch, last, 74 - epoch % 10, epoch - 88, 0.1 * (100 - epoch + 1) / 100))
    text += ("Training finished in 3h12m. Best val_acc 0.9431 at epoch 96.\n"
             "Saved final model to checkpoints/resnet18_final.pt\n")
    return text


OOM_NEW = ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.53 GiB. GPU 0 has a total "
           "capacity of 39.38 GiB of which 1.12 GiB is free. Including non-PyTorch memory, this process "
           "has 38.25 GiB memory in use. Of the allocated memory 36.71 GiB is allocated by PyTorch, and "
           "1.02 GiB is reserved by PyTorch but unallocated. If reserved but unallocated memory is large "
           "try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See "
           "documentation for Memory Management  (https://pytorch.org/docs/stable/notes/cuda.html"
           "#environment-variables)")


@log("pytorch_cuda_oom_new.log", "cuda_oom", "epoch 1/50 · 7% 58/782",
     "torch >= 2.4 wording: torch.OutOfMemoryError ... GPU 0 has a total capacity of ...")
def pytorch_cuda_oom_new():
    head = ("[2024-05-01 09:12:03,114][__main__][INFO] - Model: vit_large_patch16_224, 304.33M parameters\n"
            "[2024-05-01 09:12:03,115][__main__][INFO] - Mixed precision: bf16, batch size 256, "
            "grad accumulation 1\n"
            "[2024-05-01 09:12:05,872][__main__][INFO] - Dataset: 200,192 train / 10,000 val images\n"
            "Epoch 1/50\n")
    bar = tqdm_run([0, 1, 10, 30, 50, 58], 782, 0.709, postfix=lambda n: "loss=%.2f" % (6.91 - n * 0.001))
    trace = "Traceback (most recent call last):\n" + frames(
        ("/home/liwei/vit/train.py", 214, "<module>", "main()"),
        ("/home/liwei/vit/train.py", 198, "main", "train_one_epoch(model, loader, optimizer, scaler, epoch)"),
        ("/home/liwei/vit/train.py", 121, "train_one_epoch", "loss = criterion(model(images), targets)"),
        (TORCH + "/nn/modules/module.py", 1553, "_wrapped_call_impl", "return self._call_impl(*args, **kwargs)"),
        (TORCH + "/nn/modules/module.py", 1562, "_call_impl", "return forward_call(*args, **kwargs)"),
        (SITE + "/timm/models/vision_transformer.py", 852, "forward", "x = self.forward_features(x)"),
        (SITE + "/timm/models/vision_transformer.py", 833, "forward_features", "x = self.blocks(x)"),
        (SITE + "/timm/layers/mlp.py", 44, "forward", "x = self.act(x)"),
        (TORCH + "/nn/modules/activation.py", 734, "forward", "return F.gelu(input, approximate=self.approximate)"),
    ) + "\n" + OOM_NEW + "\n"
    return head + bar + trace


@log("pytorch_cuda_oom_old.log", "cuda_oom", "epoch 12 · step 370/1000",
     "torch 1.x wording (RuntimeError: CUDA out of memory ... (GPU 0; ... total capacity ...)); "
     "progress in the pytorch/examples ImageNet form 'Epoch: [12][ 370/1000]', whose batch "
     "counter hpcrun drops (it reports only 'epoch 12')",
     metric={"name": "loss", "trend": "loss 2.45 → 2.313 (best 2.313)"})
def pytorch_cuda_oom_old():
    lines = ["=> creating model 'resnet152'", "=> loading checkpoint 'checkpoint.pth.tar'",
             "=> loaded checkpoint 'checkpoint.pth.tar' (epoch 12)"]
    for step, loss in ((300, 2.4501), (310, 2.4377), (320, 2.4012), (330, 2.3890), (340, 2.3701),
                       (350, 2.3544), (360, 2.3390), (370, 2.3127)):
        lines.append("Epoch: [12][ %d/1000]\tTime  0.512 ( 0.530)\tData  0.012 ( 0.015)\t"
                     "Loss %.4e (2.4012e+00)\tAcc@1  45.31 ( 44.12)\tAcc@5  70.31 ( 69.87)" % (step, loss))
    lines.append("Traceback (most recent call last):")
    lines.append(frames(
        ("main.py", 512, "<module>", "main()"),
        ("main.py", 118, "main", "main_worker(args.gpu, ngpus_per_node, args)"),
        ("main.py", 262, "main_worker", "train(train_loader, model, criterion, optimizer, epoch, device, args)"),
        ("main.py", 317, "train", "output = model(images)"),
        ("/usr/local/lib/python3.8/dist-packages/torch/nn/modules/module.py", 1102, "_call_impl",
         "return forward_call(*input, **kwargs)"),
        ("/usr/local/lib/python3.8/dist-packages/torchvision/models/resnet.py", 249, "forward",
         "return self._forward_impl(x)"),
        ("/usr/local/lib/python3.8/dist-packages/torch/nn/modules/batchnorm.py", 168, "forward",
         "return F.batch_norm("),
        ("/usr/local/lib/python3.8/dist-packages/torch/nn/functional.py", 2282, "batch_norm",
         "return torch.batch_norm("),
    ))
    lines.append("RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 15.78 GiB total "
                 "capacity; 12.91 GiB already allocated; 1.30 GiB free; 13.42 GiB reserved in total by "
                 "PyTorch) If reserved memory is >> allocated memory try setting max_split_size_mb to "
                 "avoid fragmentation.  See documentation for Memory Management and PYTORCH_CUDA_ALLOC_CONF")
    return "\n".join(lines) + "\n"


# --- torchrun ---

@log("torchrun_rank3_oom_nccl_timeouts.log", "cuda_oom", "epoch 2/10 · step 1500/4000",
     "two nodes (srun + torchrun, [rankN]: prefixes): rank 3 runs out of CUDA memory first; its "
     "node's agent prints a ChildFailedError; ten minutes later the other node's ranks 4-7 hit "
     "NCCL watchdog timeouts, abort in C++ and print their own ChildFailedError (SIGABRT)",
     metric={"name": "loss", "trend": "loss 2.912 → 2.811 (best 2.811)"})
def torchrun_rank3_oom_nccl_timeouts():
    python = "/lustre/home/zhangsan/.conda/envs/llm/bin/python"
    text = TORCHRUN_BANNER.format(t="10:00:01.123000") + TORCHRUN_BANNER.format(t="10:00:01.402000")
    text += ("[rank0]:[W501 10:00:14.118231442 Utils.hpp:164] Warning: Environment variable "
             "NCCL_ASYNC_ERROR_HANDLING is deprecated; use TORCH_NCCL_ASYNC_ERROR_HANDLING instead "
             "(function operator())\n"
             "model: llama-1.3b, 1.35B parameters, world size 8, micro batch 8, seq len 2048\n")
    for step, loss in ((1460, 2.9120), (1470, 2.8905), (1480, 2.8871), (1490, 2.8402), (1500, 2.8113)):
        text += ("epoch 2/10 step %d/4000 loss=%.4f lr=2.95e-04 grad_norm=0.91 tok/s=412303\n"
                 % (step, loss))
    worker = "Traceback (most recent call last):\n" + frames(
        ("/lustre/home/zhangsan/llm/pretrain.py", 301, "<module>", "main()"),
        ("/lustre/home/zhangsan/llm/pretrain.py", 277, "main", "loss.backward()"),
        (TORCH + "/_tensor.py", 521, "backward", "torch.autograd.backward("),
        (TORCH + "/autograd/__init__.py", 289, "backward", "_engine_run_backward("),
        (TORCH + "/autograd/graph.py", 768, "_engine_run_backward",
         "return Variable._execution_engine.run_backward(  # Calls into the C++ engine to run the backward pass"),
    ) + "\n" + OOM_NEW.replace("GPU 0", "GPU 3").replace("1.53 GiB", "3.91 GiB")
    text += prefixed("[rank3]: ", worker) + "\n"
    text += ("W0501 11:42:17.882000 140211 torch/distributed/elastic/multiprocessing/api.py:897] "
             "Sending process 51021 closing signal SIGTERM\n"
             "W0501 11:42:17.883000 140211 torch/distributed/elastic/multiprocessing/api.py:897] "
             "Sending process 51022 closing signal SIGTERM\n"
             "W0501 11:42:17.883000 140211 torch/distributed/elastic/multiprocessing/api.py:897] "
             "Sending process 51023 closing signal SIGTERM\n"
             "E0501 11:42:18.377000 140211 torch/distributed/elastic/multiprocessing/api.py:869] "
             "failed (exitcode: 1) local_rank: 3 (pid: 51024) of binary: %s\n" % python)
    text += torchrun_failure(python, "pretrain.py", "gpu-a017", 3, 3, 51024, "2024-05-01_11:42:17", 1,
                             ELASTIC_HINT)
    text += "srun: error: gpu-a017: task 0: Exited with exit code 1\n"
    text += watchdog_timeout(5, 90211, 600041, "11:52:18.901233824")
    text += ("[rank4]:[E501 11:52:18.902871190 ProcessGroupNCCL.cpp:616] [Rank 4] Watchdog caught "
             "collective operation timeout: WorkNCCL(SeqNum=90211, OpType=ALLREDUCE, NumelIn=1, "
             "NumelOut=1, Timeout(ms)=600000) ran for 600043 milliseconds before timing out.\n")
    text += ("W0501 11:52:21.004000 98133 torch/distributed/elastic/multiprocessing/api.py:897] "
             "Sending process 73111 closing signal SIGTERM\n"
             "E0501 11:52:22.190000 98133 torch/distributed/elastic/multiprocessing/api.py:869] "
             "failed (exitcode: -6) local_rank: 1 (pid: 73112) of binary: %s\n" % python)
    text += torchrun_failure(python, "pretrain.py", "gpu-a018", 5, 1, 73112, "2024-05-01_11:52:21", -6,
                             "Signal 6 (SIGABRT) received by PID 73112")
    text += "srun: error: gpu-a018: task 1: Exited with exit code 1\n"
    return text


@log("torchrun_tee_double_prefix.log", "exception", "epoch 1/3 · step 400/1250",
     "torchrun --tee 3: every worker line starts with [defaultN]:, and torch >= 2.2 adds its own "
     "[rankN]: to tracebacks, so the root cause reads '[default3]:[rank3]: RuntimeError: ...'; "
     "hpcrun strips only one prefix, misses the worker's traceback and reports torchrun's "
     "ChildFailedError instead", exception="RuntimeError",
     metric={"name": "loss", "trend": "loss 2.31 → 2.104 (best 2.104)"})
def torchrun_tee_double_prefix():
    python = "/home/kim/venv/bin/python"
    text = TORCHRUN_BANNER.format(t="14:20:00.001000")
    text += "[default0]:Loaded 40,000 training images from /scratch/kim/imagenet-subset\n"
    for step, loss in ((360, 2.3100), (370, 2.2533), (380, 2.2012), (390, 2.1580), (400, 2.1040)):
        text += "[default0]:epoch 1/3 step %d/1250 loss %.4f lr 0.0100\n" % (step, loss)
    worker = "Traceback (most recent call last):\n" + frames(
        ("/home/kim/cls/train.py", 150, "<module>", "main()"),
        ("/home/kim/cls/train.py", 121, "main", "for images, labels in loader:"),
        (TORCH + "/utils/data/dataloader.py", 630, "__next__", "data = self._next_data()"),
        (TORCH + "/utils/data/dataloader.py", 1344, "_next_data", "return self._process_data(data)"),
        (TORCH + "/utils/data/dataloader.py", 1370, "_process_data", "data.reraise()"),
        (TORCH + "/_utils.py", 706, "reraise", "raise exception"),
    ) + "\nRuntimeError: Caught RuntimeError in DataLoader worker process 2.\n" \
        "Original Traceback (most recent call last):\n" + frames(
        (TORCH + "/utils/data/_utils/worker.py", 309, "_worker_loop", "data = fetcher.fetch(index)"),
        (TORCH + "/utils/data/_utils/fetch.py", 55, "fetch", "return self.collate_fn(data)"),
        (TORCH + "/utils/data/_utils/collate.py", 317, "default_collate",
         "return collate(batch, collate_fn_map=default_collate_fn_map)"),
        (TORCH + "/utils/data/_utils/collate.py", 214, "collate",
         "return elem_type([collate(samples, collate_fn_map=collate_fn_map) for samples in transposed])"),
        (TORCH + "/utils/data/_utils/collate.py", 155, "collate",
         "return collate_fn_map[elem_type](batch, collate_fn_map=collate_fn_map)"),
        (TORCH + "/utils/data/_utils/collate.py", 272, "collate_tensor_fn",
         "return torch.stack(batch, 0, out=out)"),
    ) + "\nRuntimeError: stack expects each tensor to be equal size, but got [3, 224, 224] at entry 0 " \
        "and [1, 224, 224] at entry 17"
    text += prefixed("[default3]:[rank3]: ", worker) + "\n"
    text += ("W0501 14:31:07.550000 60210 torch/distributed/elastic/multiprocessing/api.py:897] "
             "Sending process 60301 closing signal SIGTERM\n"
             "W0501 14:31:07.551000 60210 torch/distributed/elastic/multiprocessing/api.py:897] "
             "Sending process 60302 closing signal SIGTERM\n"
             "W0501 14:31:07.551000 60210 torch/distributed/elastic/multiprocessing/api.py:897] "
             "Sending process 60303 closing signal SIGTERM\n"
             "E0501 14:31:08.012000 60210 torch/distributed/elastic/multiprocessing/api.py:869] "
             "failed (exitcode: 1) local_rank: 3 (pid: 60304) of binary: %s\n" % python)
    text += torchrun_failure(python, "train.py", "gpu-b03", 3, 3, 60304, "2024-05-01_14:31:07", 1,
                             ELASTIC_HINT)
    return text


@log("torchrun_sigkill_root_cause.log", "killed", "epoch 3/8 · 64% 1408/2200",
     "a worker killed by the kernel (host OOM): no worker traceback, only torchrun's "
     "ChildFailedError whose root cause says 'Signal 9 (SIGKILL) received by PID'; hpcrun takes "
     "the ChildFailedError line for a plain Python exception")
def torchrun_sigkill_root_cause():
    python = "/home/yan/anaconda3/envs/llama2/bin/python"
    text = TORCHRUN_BANNER.format(t="16:01:10.000000")
    text += "loading shards: 100%|██████████| 4/4 [01:12<00:00, 18.04s/it]\n"
    text += "Epoch 3/8\n"
    text += tqdm_run([1300, 1350, 1400, 1408], 2200, 1.21, postfix=lambda n: "loss=1.07")
    text += ("W0501 16:50:50.101000 11100 torch/distributed/elastic/multiprocessing/api.py:897] "
             "Sending process 11126 closing signal SIGTERM\n"
             "E0501 16:50:50.740000 11100 torch/distributed/elastic/multiprocessing/api.py:869] "
             "failed (exitcode: -9) local_rank: 1 (pid: 11127) of binary: %s\n" % python)
    text += torchrun_failure(python, "finetune.py", "yan-ml", 1, 1, 11127, "2024-05-01_16:50:50", -9,
                             "Signal 9 (SIGKILL) received by PID 11127")
    return text


@log("torchrun_child_failed_redirected.log", "child_failed", None,
     "torchrun --redirects 3: the workers' output went to files, so the log holds only the "
     "agent's lines and a ChildFailedError with exitcode 1; hpcrun takes the ChildFailedError "
     "line for a plain Python exception, so child_failed can never match")
def torchrun_child_failed_redirected():
    python = "/usr/bin/python3"
    text = TORCHRUN_BANNER.format(t="08:00:00.500000")
    text += ("I0501 08:00:00.900000 7001 torch/distributed/elastic/agent/server/api.py:681] "
             "[default] Starting worker group\n"
             "I0501 08:00:01.020000 7001 torch/distributed/elastic/multiprocessing/api.py:263] "
             "log directory set to: /scratch/u42/torchelastic/none_2k3x_f9q/attempt_0\n"
             "E0501 08:14:52.211000 7001 torch/distributed/elastic/multiprocessing/api.py:869] "
             "failed (exitcode: 1) local_rank: 0 (pid: 7013) of binary: %s\n" % python)
    text += torchrun_failure(python, "train.py", "cn0412", 0, 0, 7013, "2024-05-01_08:14:52", 1, ELASTIC_HINT)
    return text


@log("nccl_timeout_srun_label.log", "nccl_timeout", "epoch 4/10 · step 2100/5000",
     "srun --label (4 tasks, '0: ' prefixes) with no torchrun: rank 3 hangs reading from a dead NFS "
     "mount, ranks 0-2 hit the NCCL watchdog after 30 minutes and abort with "
     "\"terminate called after throwing an instance of 'c10::DistBackendError'\"; hpcrun calls it a "
     "C++ abort although the root cause is the collective timeout")
def nccl_timeout_srun_label():
    text = ""
    for step in (2080, 2090, 2100):
        text += "0: epoch 4/10 step %d/5000 loss=1.9%02d lr=1.0e-04\n" % (step, 2100 - step + 2)
    text += "3: warning: slow read of /nfs/datasets/laion/shard-01733.tar (41.2 s)\n"
    for rank in (0, 1, 2):
        text += prefixed("%d: " % rank, watchdog_timeout(rank, 31877, 1800512 + rank, "12:33:0%d.41%d"
                                                          % (rank, rank), timeout_ms=1800000).rstrip("\n")) + "\n"
    text += ("srun: error: gpu-c009: tasks 0-2: Aborted (core dumped)\n"
             "srun: Terminating StepId=551902.0\n"
             "slurmstepd: error: *** STEP 551902.0 ON gpu-c009 CANCELLED AT 2024-05-01T12:34:02 DUE TO "
             "TASK FAILURE ***\n"
             "srun: error: gpu-c009: task 3: Terminated\n")
    return text


# --- DeepSpeed, Accelerate / HF Trainer ---

DS = "[2024-05-01 %s] [%s] [%s] %s"


@log("deepspeed_nccl_error.log", "nccl_error", "epoch 1 · step 1200/5000",
     "deepspeed launcher on one node: worker raises DistBackendError with ncclSystemError; the "
     "launcher then kills the other ranks",
     metric={"name": "loss", "trend": "loss 1.902 → 1.842 (best 1.842)"})
def deepspeed_nccl_error():
    lines = [
        DS % ("08:00:01,234", "INFO", "real_accelerator.py:203:get_accelerator",
              "Setting ds_accelerator to cuda (auto detect)"),
        DS % ("08:00:03,512", "WARNING", "runner.py:212:fetch_hostfile",
              "Unable to find hostfile, will proceed with training with local resources only."),
        DS % ("08:00:03,513", "INFO", "runner.py:585:main",
              "cmd = /opt/conda/bin/python -u -m deepspeed.launcher.launch "
              "--world_info=eyJsb2NhbGhvc3QiOiBbMCwgMSwgMiwgM119 --master_addr=127.0.0.1 "
              "--master_port=29500 --enable_each_rank_log=None train.py --deepspeed ds_config.json"),
        DS % ("08:00:05,001", "INFO", "launch.py:146:main", "WORLD INFO DICT: {'localhost': [0, 1, 2, 3]}"),
        DS % ("08:00:05,001", "INFO", "launch.py:152:main", "nnodes=1, num_local_procs=4, node_rank=0"),
    ]
    for rank in range(4):
        lines.append(DS % ("08:00:05,002", "INFO", "launch.py:256:main",
                           "process %d spawned with command: ['/opt/conda/bin/python', '-u', 'train.py', "
                           "'--local_rank=%d', '--deepspeed', 'ds_config.json']" % (11201 + rank, rank)))
    lines.append(DS % ("08:00:21,410", "INFO", "config.py:1000:print", "DeepSpeedEngine configuration:"))
    lines.append(DS % ("08:00:21,411", "INFO", "config.py:1004:print", "  zero_optimization_stage ...... 2"))
    for step, loss in ((1150, 1.9021), (1175, 1.8790), (1200, 1.8421)):
        lines.append(DS % ("09:41:02,118", "INFO", "logging.py:96:log_dist",
                           "[Rank 0] step=%d, skipped=3, lr=[2.9e-05], mom=[(0.9, 0.95)]" % step))
        lines.append(DS % ("09:41:02,119", "INFO", "timer.py:260:stop",
                           "epoch=1/micro_step=%d/global_step=%d, RunningAvgSamplesPerSec=58.1, "
                           "CurrSamplesPerSec=57.9, MemAllocated=21.4GB, MaxMemAllocated=34.9GB"
                           % (step * 4, step)))
        lines.append("epoch 1 | step %d/5000 | loss %.4f | lr 2.90e-05" % (step, loss))
    lines.append("Traceback (most recent call last):")
    lines.append(frames(
        ("/workspace/train.py", 188, "<module>", "main()"),
        ("/workspace/train.py", 171, "main", "model_engine.backward(loss)"),
        (SITE + "/deepspeed/utils/nvtx.py", 15, "wrapped_fn", "ret_val = func(*args, **kwargs)"),
        (SITE + "/deepspeed/runtime/engine.py", 1976, "backward",
         "self.optimizer.backward(loss, retain_graph=retain_graph)"),
        (SITE + "/deepspeed/runtime/zero/stage_1_and_2.py", 2056, "backward",
         "self.loss_scaler.backward(loss.float(), retain_graph=retain_graph)"),
        (SITE + "/deepspeed/runtime/zero/stage_1_and_2.py", 1012, "reduce_ipg_grads",
         "self.average_tensor(extra_large_grad_reduc.view(-1))"),
        (TORCH + "/distributed/distributed_c10d.py", 2195, "all_reduce", "work = group.allreduce([tensor], opts)"),
    ))
    lines.append("torch.distributed.DistBackendError: NCCL error in: ../torch/csrc/distributed/c10d/"
                 "ProcessGroupNCCL.cpp:1970, unhandled system error (run with NCCL_DEBUG=INFO for details), "
                 "NCCL version 2.20.5")
    lines.append("ncclSystemError: System call (e.g. socket, malloc) or external library call failed or "
                 "device error. ")
    lines.append("Last error:")
    lines.append("socketStartConnect: Connect to 10.1.4.22<53107> failed : Software caused connection abort")
    for rank in range(4):
        lines.append(DS % ("09:41:09,552", "INFO", "launch.py:319:sigkill_handler",
                           "Killing subprocess %d" % (11201 + rank)))
    lines.append(DS % ("09:41:11,020", "ERROR", "launch.py:325:sigkill_handler",
                       "['/opt/conda/bin/python', '-u', 'train.py', '--local_rank=3', '--deepspeed', "
                       "'ds_config.json'] exits with return code = 1"))
    return "\n".join(lines) + "\n"


@log("deepspeed_pdsh_multinode.log", "exception", None,
     "deepspeed on two nodes through pdsh: every line carries the host name ('worker-0: '), "
     "which hpcrun does not treat as a prefix, so neither the traceback nor its final "
     "AssertionError line is recognised", exception="AssertionError")
def deepspeed_pdsh_multinode():
    lines = [DS % ("07:59:58,100", "INFO", "multinode_runner.py:80:get_cmd",
                   "Running on the following workers: worker-0,worker-1"),
             DS % ("07:59:58,101", "INFO", "runner.py:585:main",
                   "cmd = pdsh -S -f 1024 -w worker-0,worker-1 export PYTHONPATH=/workspace; "
                   "cd /workspace; /opt/conda/bin/python -u -m deepspeed.launcher.launch "
                   "--world_info=eyJ3b3JrZXItMCI6IFswLCAxLCAyLCAzXX0= --node_rank=%n "
                   "--master_addr=10.0.3.11 --master_port=29500 train.py --deepspeed ds_config.json")]
    for host in ("worker-0", "worker-1"):
        lines.append(host + ": " + DS % ("08:00:04,420", "INFO", "launch.py:146:main",
                                         "WORLD INFO DICT: {'worker-0': [0, 1, 2, 3], 'worker-1': [0, 1, 2, 3]}"))
    worker = "Traceback (most recent call last):\n" + frames(
        ("/workspace/train.py", 140, "<module>", "main()"),
        ("/workspace/train.py", 96, "main", "model_engine, optimizer, _, _ = deepspeed.initialize("),
        (SITE + "/deepspeed/__init__.py", 181, "initialize", "config_class = DeepSpeedConfig(config, mpu)"),
        (SITE + "/deepspeed/runtime/config.py", 797, "__init__", "self._configure_train_batch_size()"),
        (SITE + "/deepspeed/runtime/config.py", 980, "_configure_train_batch_size", "self._batch_assertion()"),
        (SITE + "/deepspeed/runtime/config.py", 915, "_batch_assertion", "assert train_batch == micro_batch * grad_acc * self.world_size, ("),
    ) + ("\nAssertionError: Check batch related parameters. train_batch_size is not equal to "
         "micro_batch_per_gpu * gradient_acc_step * world_size 256 != 8 * 4 * 8")
    lines.append(prefixed("worker-1: ", worker))
    lines.append(prefixed("worker-0: ", worker))
    lines.append("worker-1: " + DS % ("08:00:19,871", "INFO", "launch.py:319:sigkill_handler",
                                      "Killing subprocess 20411"))
    lines.append("worker-1: " + DS % ("08:00:20,002", "ERROR", "launch.py:325:sigkill_handler",
                                      "['/opt/conda/bin/python', '-u', 'train.py', '--local_rank=3', "
                                      "'--deepspeed', 'ds_config.json'] exits with return code = 1"))
    lines.append("pdsh@worker-0: worker-1: ssh exited with exit code 1")
    lines.append("pdsh@worker-0: worker-0: ssh exited with exit code 1")
    return "\n".join(lines) + "\n"


@log("accelerate_hf_trainer_bar_traceback.log", "exception", "8% 390/4875",
     "accelerate launch + HF Trainer: the Trainer's tqdm bar is never closed, so the worker's "
     "'Traceback (most recent call last):' is glued to the last bar state on the same line; "
     "hpcrun does not see that traceback start and blames accelerate's CalledProcessError",
     exception="RuntimeError",
     metric={"name": "loss", "trend": "loss 1.421 → 1.094 (best 1.094)"})
def accelerate_hf_trainer_bar_traceback():
    python = "/home/wang/.conda/envs/hf/bin/python"
    text = ("The following values were not passed to `accelerate launch` and had defaults used instead:\n"
            "\t`--num_machines` was set to a value of `1`\n"
            "\t`--mixed_precision` was set to a value of `'no'`\n"
            "\t`--dynamo_backend` was set to a value of `'no'`\n"
            "To avoid this warning pass in values for each of the problematic parameters or run "
            "`accelerate config`.\n")
    for number, message in ((2134, "***** Running training *****"), (2135, "  Num examples = 52,002"),
                            (2136, "  Num Epochs = 3"),
                            (2137, "  Instantaneous batch size per device = 8"),
                            (2140, "  Total train batch size (w. parallel, distributed & accumulation) = 32"),
                            (2141, "  Gradient Accumulation steps = 4"),
                            (2142, "  Total optimization steps = 4,875"),
                            (2143, "  Number of trainable parameters = 6,738,415,616")):
        text += "[INFO|trainer.py:%d] 2024-05-01 10:00:00,000 >> %s\n" % (number, message)
    n = 0
    losses = [1.4213, 1.3520, 1.2871, 1.2212, 1.1904, 1.1580, 1.1302, 1.0940]
    for index, loss in enumerate(losses):
        states = [n + 1, n + 20, n + 40, n + 50]
        n += 50
        text += "".join("\r" + tqdm_bar(s, 4875, 4.49) for s in states)
        text += tqdm_write("{'loss': %.4f, 'grad_norm': 2.%02d, 'learning_rate': 1.99%02de-05, "
                           "'epoch': %.2f}" % (loss, 31 - index, 79 - index, n / 1625.0))
    text += "".join("\r" + tqdm_bar(s, 4875, 4.49) for s in (n + 1, n + 20, 390))
    text += "Traceback (most recent call last):\n" + frames(
        ("/home/wang/alpaca/train.py", 222, "<module>", "train()"),
        ("/home/wang/alpaca/train.py", 216, "train", "trainer.train()"),
        (SITE + "/transformers/trainer.py", 1938, "train", "return inner_training_loop("),
        (SITE + "/transformers/trainer.py", 2279, "_inner_training_loop",
         "tr_loss_step = self.training_step(model, inputs)"),
        (SITE + "/transformers/trainer.py", 3318, "training_step",
         "loss = self.compute_loss(model, inputs)"),
        (SITE + "/transformers/models/llama/modeling_llama.py", 1189, "forward", "outputs = self.model("),
        (SITE + "/transformers/models/llama/modeling_llama.py", 945, "forward",
         "causal_mask = self._update_causal_mask("),
        (SITE + "/transformers/models/llama/modeling_llama.py", 1079, "_update_causal_mask",
         "causal_mask = causal_mask[None, None, :, :].expand(input_tensor.shape[0], 1, -1, -1)"),
    ) + ("\nRuntimeError: The size of tensor a (4096) must match the size of tensor b (2048) at "
         "non-singleton dimension 3\n")
    text += "Traceback (most recent call last):\n" + frames(
        (os.path.dirname(python) + "/accelerate", 8, "<module>", "sys.exit(main())"),
        (SITE + "/accelerate/commands/accelerate_cli.py", 48, "main", "args.func(args)"),
        (SITE + "/accelerate/commands/launch.py", 1097, "launch_command", "simple_launcher(args)"),
        (SITE + "/accelerate/commands/launch.py", 703, "simple_launcher",
         "raise subprocess.CalledProcessError(returncode=process.returncode, cmd=cmd)"),
    ) + ("\nsubprocess.CalledProcessError: Command '['%s', 'train.py', '--model_name_or_path', "
         "'meta-llama/Llama-2-7b-hf', '--model_max_length', '4096']' returned non-zero exit status 1.\n"
         % python)
    return text


# --- TensorFlow, JAX ---

TF_FRAMES = frames(
    ("/home/park/unet/train.py", 88, "<module>", "model.fit(train_ds, epochs=20, validation_data=val_ds)"),
    ("/usr/local/lib/python3.10/dist-packages/keras/utils/traceback_utils.py", 70, "error_handler",
     "raise e.with_traceback(filtered_tb) from None"),
    ("/usr/local/lib/python3.10/dist-packages/tensorflow/python/eager/execute.py", 53, "quick_execute",
     "tensors = pywrap_tfe.TFE_Py_Execute(ctx._handle, device_name, op_name,"),
)
TF_TAIL = """\
tensorflow.python.framework.errors_impl.ResourceExhaustedError: Graph execution error:

Detected at node 'model/conv2d_3/Relu' defined at (most recent call last):
    File "/home/park/unet/train.py", line 88, in <module>
      model.fit(train_ds, epochs=20, validation_data=val_ds)
    File "/usr/local/lib/python3.10/dist-packages/keras/engine/training.py", line 1685, in fit
      tmp_logs = self.train_function(iterator)
Node: 'model/conv2d_3/Relu'
OOM when allocating tensor with shape[64,256,128,128] and type float on /job:localhost/replica:0/task:0/device:GPU:0 by allocator GPU_0_bfc
\t [[{{node model/conv2d_3/Relu}}]]
Hint: If you want to see a list of allocated tensors when OOM happens, add report_tensor_allocations_upon_oom to RunOptions for current allocation info. This isn't available when running in Eager mode.
 [Op:__inference_train_function_8731]
"""


def keras_epochs(count, total):
    text = ""
    for epoch in range(1, count + 1):
        loss = 0.9 - 0.1 * epoch
        text += ("Epoch %d/%d\n1563/1563 [==============================] - 112s 71ms/step - "
                 "loss: %.4f - accuracy: 0.%d - val_loss: %.4f - val_accuracy: 0.%d\n"
                 % (epoch, total, loss, 6500 + 200 * epoch, loss + 0.09, 6300 + 190 * epoch))
    return text


@log("tf_keras_oom.log", "accelerator_oom", "epoch 4/20",
     "TensorFlow/Keras: the BFC allocator's warning and the op_kernel line 'RESOURCE_EXHAUSTED: "
     "OOM when allocating tensor' come before the Python traceback",
     metric={"name": "loss", "trend": "loss 0.8 → 0.6 (best 0.6)"})
def tf_keras_oom():
    text = ("2024-05-01 11:00:02.118233: I tensorflow/core/common_runtime/gpu/gpu_device.cc:1886] "
            "Created device /job:localhost/replica:0/task:0/device:GPU:0 with 38246 MB memory:  -> "
            "device: 0, name: NVIDIA A100-SXM4-40GB, pci bus id: 0000:07:00.0, compute capability: 8.0\n")
    text += keras_epochs(3, 20) + "Epoch 4/20\n"
    text += ("2024-05-01 11:06:12.510114: W tensorflow/tsl/framework/bfc_allocator.cc:485] Allocator "
             "(GPU_0_bfc) ran out of memory trying to allocate 1.00GiB (rounded to 1073741824)requested "
             "by op model/conv2d_3/Relu\n"
             "If the cause is memory fragmentation maybe the environment variable "
             "'TF_GPU_ALLOCATOR=cuda_malloc_async' will improve the situation. \n"
             "Current allocation summary follows.\n"
             "2024-05-01 11:06:12.510398: I tensorflow/tsl/framework/bfc_allocator.cc:1039] BFCAllocator "
             "dump for GPU_0_bfc\n"
             "2024-05-01 11:06:12.510412: I tensorflow/tsl/framework/bfc_allocator.cc:1046] Bin (256): "
             "\tTotal Chunks: 212, Chunks in use: 211. 53.0KiB allocated for chunks. 52.8KiB in use in "
             "bin. 11.6KiB client-requested in use in bin.\n"
             "2024-05-01 11:06:12.511820: W tensorflow/tsl/framework/bfc_allocator.cc:497] "
             + "*" * 100 + "\n"
             "2024-05-01 11:06:12.511901: W tensorflow/core/framework/op_kernel.cc:1828] OP_REQUIRES "
             "failed at conv_ops_fused_impl.h:625 : RESOURCE_EXHAUSTED: OOM when allocating tensor with "
             "shape[64,256,128,128] and type float on /job:localhost/replica:0/task:0/device:GPU:0 by "
             "allocator GPU_0_bfc\n")
    return text + "Traceback (most recent call last):\n" + TF_FRAMES + "\n" + TF_TAIL


@log("tf_keras_oom_quiet.log", "accelerator_oom", "epoch 4/20",
     "the same TensorFlow OOM with TF_CPP_MIN_LOG_LEVEL=2 (a common setting): the warnings are "
     "gone, the traceback's 'ResourceExhaustedError: Graph execution error:' comes before 'OOM "
     "when allocating tensor', and hpcrun reports a plain Python exception")
def tf_keras_oom_quiet():
    return keras_epochs(3, 20) + "Epoch 4/20\nTraceback (most recent call last):\n" + TF_FRAMES + "\n" + TF_TAIL


JAX_FRAMES = frames(
    ("/home/ito/flax-lm/train.py", 301, "<module>", "app.run(main)"),
    (SITE + "/absl/app.py", 308, "run", "_run_main(main, args)"),
    ("/home/ito/flax-lm/train.py", 288, "main", "state, metrics = p_train_step(state, batch, rngs)"),
)


@log("jax_resource_exhausted.log", "accelerator_oom", "step 2000/500000",
     "JAX/XLA wording: XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory while trying to allocate",
     metric={"name": "loss", "trend": "loss 2.412 → 2.311 (best 2.311)"})
def jax_resource_exhausted():
    text = ("I0501 09:00:00.101010 140012 train.py:210] JAX devices: [cuda(id=0), cuda(id=1), cuda(id=2), "
            "cuda(id=3)]\n")
    for step, loss in ((1800, 2.4120), (1900, 2.3508), (2000, 2.3107)):
        text += "Step %d/500000: loss=%.4f, lr=6.0e-04, 1.21 steps/s\n" % (step, loss)
    text += ("2024-05-01 09:41:33.120318: W external/xla/xla/tsl/framework/bfc_allocator.cc:482] "
             "Allocator (GPU_0_bfc) ran out of memory trying to allocate 16.00GiB (rounded to "
             "17179869184)requested by op \n"
             "2024-05-01 09:41:33.121994: E external/xla/xla/pjrt/pjrt_stream_executor_client.cc:2732] "
             "Execution of replica 0 failed: RESOURCE_EXHAUSTED: Out of memory while trying to allocate "
             "17179869184 bytes.\n"
             "Traceback (most recent call last):\n" + JAX_FRAMES + "\n"
             "jaxlib.xla_extension.XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory while trying to "
             "allocate 17179869184 bytes.\n"
             "--------------------\n"
             "For simplicity, JAX has removed its internal frames from the traceback of the following "
             "exception. Set JAX_TRACEBACK_FILTERING=off to include these.\n")
    return text


@log("jax_failed_to_allocate.log", "accelerator_oom", "step 400/100000",
     "newer JAX/PjRt wording: 'RESOURCE_EXHAUSTED: Failed to allocate request for 32.00GiB ... on "
     "device ordinal 0', which hpcrun's accelerator_oom pattern does not know")
def jax_failed_to_allocate():
    text = ""
    for step in (300, 350, 400):
        text += "Step %d/100000: loss=%.4f\n" % (step, 3.1 - step / 1000.0)
    text += ("Traceback (most recent call last):\n" + JAX_FRAMES + "\n"
             "jaxlib.xla_extension.XlaRuntimeError: RESOURCE_EXHAUSTED: Failed to allocate request for "
             "32.00GiB (34359738368B) on device ordinal 0\n"
             "--------------------\n"
             "For simplicity, JAX has removed its internal frames from the traceback of the following "
             "exception. Set JAX_TRACEBACK_FILTERING=off to include these.\n")
    return text


# --- host memory, shared memory, crashes ---

def plain_progress(epoch, total_epochs, steps, total_steps, loss=2.0):
    return "".join("epoch %d/%d step %d/%d loss=%.3f\n" % (epoch, total_epochs, s, total_steps,
                                                           loss - s / 10000.0) for s in steps)


@log("host_oom_bash_killed.log", "killed", "epoch 2/30 · step 900/1200",
     "the kernel's OOM killer: bash reports '... Killed  python train.py' and nothing else")
def host_oom_bash_killed():
    return ("Loading feature cache into RAM: /scratch/u42/features_fp32.npy (212.4 GB)\n"
            + plain_progress(2, 30, (700, 800, 900), 1200)
            + "/var/spool/slurmd/job884213/slurm_script: line 24: 48213 Killed                  "
              "python train.py --config configs/big.yaml\n")


@log("slurm_oom_kill.log", "host_oom", "epoch 2/30 · step 900/1200",
     "the same kill inside Slurm: slurmstepd's 'Detected 1 oom_kill event' (23.02+ wording) "
     "tells it was the memory limit")
def slurm_oom_kill():
    return (host_oom_bash_killed()
            + "slurmstepd: error: Detected 1 oom_kill event in StepId=884213.batch. Some of the step "
              "tasks have been OOM Killed.\n")


@log("dataloader_worker_killed.log", "host_oom", "epoch 5/90 · 23% 1160/5005",
     "a DataLoader worker killed by the OOM killer: 'DataLoader worker (pid 48812) is killed by "
     "signal: Killed.' chained into 'exited unexpectedly'")
def dataloader_worker_killed():
    text = "Epoch 5/90\n" + tqdm_run([1000, 1100, 1160], 5005, 0.35, close=True)
    text += "Traceback (most recent call last):\n" + frames(
        (TORCH + "/utils/data/dataloader.py", 1133, "_try_get_data", "data = self._data_queue.get(timeout=timeout)"),
        ("/opt/conda/lib/python3.10/multiprocessing/queues.py", 113, "get", "if not self._poll(timeout):"),
        ("/opt/conda/lib/python3.10/multiprocessing/connection.py", 257, "poll", "return self._poll(timeout)"),
        ("/opt/conda/lib/python3.10/multiprocessing/connection.py", 424, "_poll", "r = wait([self], timeout)"),
        ("/opt/conda/lib/python3.10/multiprocessing/connection.py", 931, "wait", "ready = selector.select(timeout)"),
        ("/opt/conda/lib/python3.10/selectors.py", 416, "select", "fd_event_list = self._selector.poll(timeout)"),
        (TORCH + "/utils/data/_utils/signal_handling.py", 66, "handler", "_error_if_any_worker_fails()"),
    ) + ("\nRuntimeError: DataLoader worker (pid 48812) is killed by signal: Killed. \n\n"
         "The above exception was the direct cause of the following exception:\n\n"
         "Traceback (most recent call last):\n") + frames(
        ("train_imagenet.py", 402, "<module>", "main()"),
        ("train_imagenet.py", 251, "train", "for i, (images, target) in enumerate(train_loader):"),
        (TORCH + "/utils/data/dataloader.py", 1146, "_try_get_data",
         "raise RuntimeError(f'DataLoader worker (pid(s) {pids_str}) exited unexpectedly') from e"),
    ) + "\nRuntimeError: DataLoader worker (pid(s) 48812) exited unexpectedly\n"
    return text


@log("memoryerror_numpy.log", "host_oom", None,
     "numpy's own MemoryError subclass: 'numpy.core._exceptions._ArrayMemoryError: Unable to "
     "allocate 74.5 GiB ...'; hpcrun's \\bMemoryError\\b does not match inside _ArrayMemoryError")
def memoryerror_numpy():
    return ("Reading 1,000,000 x 10,000 design matrix from /scratch/u42/genotypes.parquet\n"
            "Traceback (most recent call last):\n" + frames(
                ("/home/u42/gwas/fit.py", 61, "<module>", "X = np.zeros((n_samples, n_snps), dtype=np.float64)"),
            ) + "\nnumpy.core._exceptions._ArrayMemoryError: Unable to allocate 74.5 GiB for an array "
                "with shape (1000000, 10000) and data type float64\n")


@log("memoryerror_plain.log", "host_oom", None, "a bare MemoryError from pickle.load")
def memoryerror_plain():
    return ("loading cached dataset from /scratch/u42/cache/train.pkl (61 GB)\n"
            "Traceback (most recent call last):\n" + frames(
                ("/home/u42/nlp/prep.py", 33, "<module>", "data = pickle.load(f)"),
            ) + "\nMemoryError\n")


@log("shm_bus_error.log", "shm", "epoch 1/100 · 2% 31/1563",
     "PyTorch DataLoader in a container with a 64 MB /dev/shm: 'Unexpected bus error ... "
     "insufficient shared memory (shm)'")
def shm_bus_error():
    text = "Epoch 1/100\n" + tqdm_run([0, 10, 31], 1563, 0.42)
    text += ("ERROR: Unexpected bus error encountered in worker. This might be caused by insufficient "
             "shared memory (shm).\n"
             "ERROR: Unexpected bus error encountered in worker. This might be caused by insufficient "
             "shared memory (shm).\n"
             "Traceback (most recent call last):\n") + frames(
        (TORCH + "/utils/data/dataloader.py", 1133, "_try_get_data", "data = self._data_queue.get(timeout=timeout)"),
        (TORCH + "/utils/data/_utils/signal_handling.py", 66, "handler", "_error_if_any_worker_fails()"),
    ) + ("\nRuntimeError: DataLoader worker (pid 3121) is killed by signal: Bus error. It is possible "
         "that dataloader's workers are out of shared memory. Please try to raise your shared memory "
         "limit.\n")
    return text


@log("segfault_faulthandler.log", "segfault", "epoch 7/40 · step 310/625",
     "a native crash with faulthandler on: 'Fatal Python error: Segmentation fault', the Python "
     "stack, then bash's 'Segmentation fault (core dumped)'")
def segfault_faulthandler():
    return (plain_progress(7, 40, (290, 300, 310), 625)
            + "Fatal Python error: Segmentation fault\n\n"
              "Thread 0x00007f3a5cff9700 (most recent call first):\n"
              "  File \"/opt/conda/lib/python3.10/threading.py\", line 324 in wait\n"
              "  File \"/opt/conda/lib/python3.10/threading.py\", line 600 in wait\n\n"
              "Current thread 0x00007f3b8e5a1740 (most recent call first):\n"
              "  File \"" + SITE + "/spconv/pytorch/ops.py\", line 122 in get_indice_pairs\n"
              "  File \"" + SITE + "/spconv/pytorch/conv.py\", line 287 in forward\n"
              "  File \"/home/u42/det3d/train.py\", line 144 in train_step\n"
              "  File \"/home/u42/det3d/train.py\", line 201 in <module>\n\n"
              "Extension modules: numpy.core._multiarray_umath, torch._C, torch._C._fft, spconv.core_cc "
              "(total: 41)\n"
              "run.sh: line 7: 23817 Segmentation fault      (core dumped) python train.py\n")


@log("cpp_terminate_abort.log", "cpp_abort", "epoch 11/60 · 47% 92/196",
     "a C++ exception escaping a video decoder thread: 'terminate called after throwing an "
     "instance of ...', then 'Aborted (core dumped)'")
def cpp_terminate_abort():
    return ("Epoch 11/60\n" + tqdm_run([80, 90, 92], 196, 2.1, close=False)
            + "terminate called after throwing an instance of 'std::system_error'\n"
              "  what():  Resource temporarily unavailable\n"
              "run.sh: line 9: 40211 Aborted                 (core dumped) python train_video.py\n")


@log("nan_loss.log", "nan_loss", "step 4210",
     "nanoGPT-style loop: the loss turns nan, the eval says 'train loss nan, val loss nan', then "
     "the script gives up with FloatingPointError",
     metric={"name": "loss", "trend": "loss 2.941 → nan (best 2.911)"})
def nan_loss():
    text = ""
    for number, loss in ((4150, "2.9410"), (4160, "2.9232"), (4170, "2.9180"), (4180, "2.9107"),
                         (4190, "nan"), (4200, "nan")):
        text += "iter %d: loss %s, time 412.33ms, mfu 41.20%%\n" % (number, loss)
    text += "step 4200: train loss nan, val loss nan\n"
    text += "iter 4210: loss nan, time 411.98ms, mfu 41.22%\n"
    text += "Traceback (most recent call last):\n" + frames(
        ("train.py", 331, "<module>", "raise FloatingPointError('loss became nan; lower the learning rate "
                                      "or enable gradient clipping')"),
    ) + "\nFloatingPointError: loss became nan; lower the learning rate or enable gradient clipping\n"
    return text


# --- file systems ---

@log("disk_full.log", "disk_full", "epoch 12/100",
     "the scratch file system fills up while the best checkpoint is copied")
def disk_full():
    return ("Epoch 12/100: train_loss=0.4121 val_loss=0.4410 val_acc=0.8712\n"
            "New best val_acc 0.8712, copying checkpoint to /scratch/u42/runs/exp7/best.pt\n"
            "Traceback (most recent call last):\n" + frames(
                ("/home/u42/seg/train.py", 233, "<module>", "shutil.copyfile(last_path, best_path)"),
                ("/opt/conda/lib/python3.10/shutil.py", 267, "copyfile", "_fastcopy_sendfile(fsrc, fdst)"),
                ("/opt/conda/lib/python3.10/shutil.py", 156, "_fastcopy_sendfile", "raise err from None"),
                ("/opt/conda/lib/python3.10/shutil.py", 142, "_fastcopy_sendfile",
                 "sent = os.sendfile(outfd, infd, offset, blocksize)"),
            ) + "\nOSError: [Errno 28] No space left on device: '/scratch/u42/runs/exp7/last.pt' -> "
                "'/scratch/u42/runs/exp7/best.pt'\n")


@log("quota_exceeded.log", "disk_full", "50% 1/2",
     "HF downloads into a home directory with a quota: 'Disk quota exceeded' (EDQUOT); the only "
     "progress is the download bar (hpcrun drops its 'Downloading shards' label)")
def quota_exceeded():
    return ("Downloading shards:  50%|█████     | 1/2 [02:31<02:31, 151.20s/it]\n"
            "Traceback (most recent call last):\n" + frames(
                ("/home/u42/llm/sft.py", 40, "<module>", "model = AutoModelForCausalLM.from_pretrained(args.model)"),
                (SITE + "/huggingface_hub/file_download.py", 1752, "_download_to_tmp_and_move",
                 "http_get("),
                (SITE + "/huggingface_hub/file_download.py", 497, "http_get", "temp_file.write(chunk)"),
            ) + "\nOSError: [Errno 122] Disk quota exceeded\n")


@log("stale_file_handle.log", "fs_error", "epoch 3/50 · 61% 610/1000",
     "the NFS server was restarted under a running job: 'Stale file handle' (ESTALE)")
def stale_file_handle():
    return ("Epoch 3/50\n" + tqdm_run([500, 600, 610], 1000, 0.9)
            + "Traceback (most recent call last):\n" + frames(
                ("/home/u42/asr/train.py", 180, "<module>", "for batch in loader:"),
                ("/home/u42/asr/data.py", 77, "__getitem__", "with open(self.paths[index], 'rb') as f:"),
            ) + "\nOSError: [Errno 116] Stale file handle: '/nfs/corpora/librispeech/train-960/1034/121119/1034-121119-0051.flac'\n")


# --- Python exceptions ---

@log("chained_exception_hf_offline.log", "exception", None,
     "a compute node without internet: five chained exceptions; the root cause is the first "
     "one printed (TimeoutError), not the last (OSError)", exception="TimeoutError")
def chained_exception_hf_offline():
    u3 = SITE + "/urllib3"
    cause = "\n\nThe above exception was the direct cause of the following exception:\n\n"
    during = "\n\nDuring handling of the above exception, another exception occurred:\n\n"
    connect = ("(<urllib3.connection.HTTPSConnection object at 0x7f2c1c2b3d90>, 'Connection to "
               "huggingface.co timed out. (connect timeout=10)')")
    retry = ("HTTPSConnectionPool(host='huggingface.co', port=443): Max retries exceeded with url: "
             "/bert-base-uncased/resolve/main/config.json (Caused by ConnectTimeoutError%s)" % connect)
    tb = "Traceback (most recent call last):\n"
    return ("Some weights of the model checkpoint were not used when initializing: []\n"
            + tb + frames((u3 + "/connection.py", 198, "_new_conn", "sock = connection.create_connection("),
                          (u3 + "/util/connection.py", 85, "create_connection", "raise err"),
                          (u3 + "/util/connection.py", 73, "create_connection", "sock.connect(sa)"))
            + "\nTimeoutError: timed out" + cause
            + tb + frames((u3 + "/connectionpool.py", 793, "urlopen", "response = self._make_request("),
                          (u3 + "/connection.py", 207, "_new_conn", "raise ConnectTimeoutError("))
            + "\nurllib3.exceptions.ConnectTimeoutError: " + connect + cause
            + tb + frames((SITE + "/requests/adapters.py", 486, "send", "resp = conn.urlopen("),
                          (u3 + "/util/retry.py", 515, "increment",
                           "raise MaxRetryError(_pool, url, reason) from reason  # type: ignore[arg-type]"))
            + "\nurllib3.exceptions.MaxRetryError: " + retry + during
            + tb + frames((SITE + "/huggingface_hub/file_download.py", 1722, "_get_metadata_or_catch_error",
                           "metadata = get_hf_file_metadata("),
                          (SITE + "/requests/adapters.py", 507, "send", "raise ConnectTimeout(e, request=request)"))
            + "\nrequests.exceptions.ConnectTimeout: (MaxRetryError(\"" + retry + "\"), '(Request ID: "
              "5f7d1e2a-9c41-4b7e-8d2f-0a1b2c3d4e5f)')" + cause
            + tb + frames((SITE + "/transformers/utils/hub.py", 402, "cached_file", "resolved_file = hf_hub_download("),
                          (SITE + "/huggingface_hub/file_download.py", 1826, "_raise_on_head_call_error",
                           "raise LocalEntryNotFoundError("))
            + "\nhuggingface_hub.errors.LocalEntryNotFoundError: An error happened while trying to locate "
              "the file on the Hub and we cannot find the requested files in the local cache. Please check "
              "your connection and try again or make sure your Internet connection is on." + cause
            + tb + frames(("/home/chen/bert/finetune.py", 57, "<module>",
                           "tokenizer = AutoTokenizer.from_pretrained(args.model)"),
                          (SITE + "/transformers/utils/hub.py", 445, "cached_file", "raise EnvironmentError("))
            + "\nOSError: We couldn't connect to 'https://huggingface.co' to load this file, couldn't find "
              "it in the cached files and it looks like bert-base-uncased is not the path to a directory "
              "containing a file named config.json.\n"
              "Checkout your internet connection or see how to run the library in offline mode at "
              "'https://huggingface.co/docs/transformers/installation#offline-mode'.\n")


@log("keyboard_interrupt.log", "interrupted", "epoch 2/10 · 35% 175/500",
     "Ctrl-C in an interactive srun session: KeyboardInterrupt")
def keyboard_interrupt():
    return ("Epoch 2/10\n" + tqdm_run([100, 150, 175], 500, 0.3)
            + "Traceback (most recent call last):\n" + frames(
                ("train.py", 95, "<module>", "loss.backward()"),
                (TORCH + "/_tensor.py", 521, "backward", "torch.autograd.backward("),
            ) + "\nKeyboardInterrupt\n")


# --- schedulers ---

@log("slurm_time_limit.log", "time_limit", "epoch 37/100 · step 4100/6250",
     "Slurm's time limit reaches an srun step: slurmstepd's line, then torchrun's own "
     "SignalException traceback, which must not win over the scheduler's words")
def slurm_time_limit():
    return (plain_progress(37, 100, (4000, 4050, 4100), 6250)
            + "srun: Job step aborted: Waiting up to 32 seconds for job step to finish.\n"
              "slurmstepd: error: *** STEP 884213.0 ON gpu-a017 CANCELLED AT 2024-05-02T09:00:12 DUE TO "
              "TIME LIMIT ***\n"
              "W0502 09:00:12.330000 140211 torch/distributed/elastic/agent/server/api.py:704] Received "
              "Signals.SIGTERM death signal, shutting down workers\n"
              "Traceback (most recent call last):\n" + frames(
                  ("/lustre/home/zhangsan/.conda/envs/llm/bin/torchrun", 8, "<module>", "sys.exit(main())"),
                  (TORCH + "/distributed/elastic/multiprocessing/api.py", 79, "_terminate_process_handler",
                   "raise SignalException(f\"Process {os.getpid()} got signal: {sigval}\", sigval=sigval)"),
              ) + "\ntorch.distributed.elastic.multiprocessing.api.SignalException: Process 140211 got "
                  "signal: 15\n"
              "slurmstepd: error: *** JOB 884213 ON gpu-a017 CANCELLED AT 2024-05-02T09:00:12 DUE TO TIME "
              "LIMIT ***\n")


@log("slurm_preempted.log", "preempted", "epoch 5/20 · step 800/2000",
     "preemption on a scavenger partition; the training catches SIGTERM and saves a checkpoint")
def slurm_preempted():
    return (plain_progress(5, 20, (700, 750, 800), 2000)
            + "slurmstepd: error: *** JOB 990127 ON gpu-s003 CANCELLED AT 2024-05-02T03:14:55 DUE TO "
              "PREEMPTION ***\n"
              "Caught SIGTERM: saving checkpoint to /scratch/u42/ckpt/last.pt ... done (12.4 s)\n")


@log("slurm_cancelled.log", "cancelled", "epoch 1/10 · step 20/900",
     "scancel on Slurm 25.05+: 'CANCELLED AT ... DUE to SIGNAL Terminated' (lower-case 'to')")
def slurm_cancelled():
    return (plain_progress(1, 10, (10, 20), 900)
            + "slurmstepd: error: *** JOB 990311 ON gpu-s004 CANCELLED AT 2024-05-02T10:00:00 DUE to SIGNAL "
              "Terminated ***\n")


@log("slurm_node_fail.log", "node_fail", "epoch 2/12 · step 640/3000",
     "a two-node job loses a node: srun's node-failure lines, then slurmstepd's 'DUE TO NODE "
     "FAILURE, SEE SLURMCTLD LOG FOR DETAILS'")
def slurm_node_fail():
    return (plain_progress(2, 12, (600, 620, 640), 3000)
            + "srun: error: Node failure on gpu-a018\n"
              "srun: error: Nodes gpu-a018 are still not responding\n"
              "srun: Job step aborted: Waiting up to 32 seconds for job step to finish.\n"
              "slurmstepd: error: *** JOB 884377 ON gpu-a017 CANCELLED AT 2024-05-02T04:41:09 DUE TO NODE "
              "FAILURE, SEE SLURMCTLD LOG FOR DETAILS ***\n")


@log("pbs_walltime.log", "time_limit", "epoch 58/200 · step 120/390",
     "PBS Pro / Torque MoM's walltime kill line")
def pbs_walltime():
    return (plain_progress(58, 200, (100, 110, 120), 390)
            + "=>> PBS: job killed: walltime 172837 exceeded limit 172800\n")


@log("lsf_term_runlimit.log", "time_limit", "epoch 9/90 · step 3300/5004",
     "an LSF job output file: the job report with TERM_RUNLIMIT comes first, the program's output "
     "follows it")
def lsf_term_runlimit():
    return ("Sender: LSF System <lsfadmin@gpu-c12>\n"
            "Subject: Job 771204: <train_vit> in cluster <hpc> Exited\n\n"
            "Job <train_vit> was submitted from host <login02> by user <liu> in cluster <hpc> at Wed May  1 "
            "08:00:02 2024\n"
            "Job was executed on host(s) <gpu-c12>, in queue <gpu>, as user <liu> in cluster <hpc> at Wed "
            "May  1 08:00:05 2024\n"
            "</home/liu> was used as the home directory.\n"
            "</home/liu/vit> was used as the working directory.\n"
            "Started at Wed May  1 08:00:05 2024\n"
            "Terminated at Thu May  2 08:00:07 2024\n"
            "Results reported at Thu May  2 08:00:07 2024\n\n"
            "Your job looked like:\n\n"
            "------------------------------------------------------------\n"
            "# LSBATCH: User input\n"
            "#BSUB -J train_vit\n#BSUB -W 24:00\n#BSUB -q gpu\n#BSUB -gpu num=1\n"
            "python train.py --epochs 90\n"
            "------------------------------------------------------------\n\n"
            "TERM_RUNLIMIT: job killed after reaching LSF run time limit.\n"
            "Exited with exit code 140.\n\n"
            "Resource usage summary:\n\n"
            "    CPU time :                                   310021.00 sec.\n"
            "    Max Memory :                                 48213 MB\n"
            "    Average Memory :                             40112.31 MB\n"
            "    Run time :                                   86402 sec.\n\n"
            "The output (if any) follows:\n\n"
            + plain_progress(9, 90, (3100, 3200, 3300), 5004))


# --- success ---

@log("success_sklearn_plain.log", None, None,
     "a plain scikit-learn script that succeeds; its 'Iter  Train Loss' table is no progress")
def success_sklearn_plain():
    text = ("Loading data from /home/u42/churn/data.csv ... 500000 rows, 48 columns\n"
            "Fitting GradientBoostingClassifier(n_estimators=500, learning_rate=0.05)\n"
            "      Iter       Train Loss   Remaining Time \n")
    for it, loss, left in ((1, 1.2345, "8.31m"), (2, 1.2011, "8.25m"), (100, 0.6123, "6.60m"),
                           (200, 0.5210, "4.92m"), (300, 0.4802, "3.30m"), (400, 0.4611, "1.64m"),
                           (500, 0.4529, "0.00s")):
        text += "%10d %16.4f %14s\n" % (it, loss, left)
    return text + ("Accuracy on held-out set: 0.9123\nSaved model to models/gbc.joblib\nDone in 8m22s\n")


@log("success_keras_early_stopping.log", None, "epoch 20/100",
     "Keras with EarlyStopping(restore_best_weights=True): after 'Epoch 20/100' it prints "
     "'... best epoch: 17.' and 'Epoch 20: early stopping'; the bare epoch numbers without "
     "their total win over 'Epoch 20/100'",
     metric={"name": "val_accuracy", "trend": "val_accuracy 0.649 → 0.879 (best 0.881)"})
def success_keras_early_stopping():
    text = ""
    for epoch in range(15, 21):
        acc = {15: "0.6490", 16: "0.8620", 17: "0.8810", 18: "0.8790", 19: "0.8750", 20: "0.8790"}[epoch]
        text += ("Epoch %d/100\n1563/1563 - 112s - loss: 0.2%03d - accuracy: 0.9254 - val_loss: 0.4012 - "
                 "val_accuracy: %s - 112s/epoch - 71ms/step\n" % (epoch, 200 - epoch, acc))
    return text + ("Restoring model weights from the end of the best epoch: 17.\n"
                   "Epoch 20: early stopping\n"
                   "313/313 - 3s - loss: 0.3998 - accuracy: 0.8810 - 3s/epoch - 9ms/step\n"
                   "Test accuracy: 0.8810\n")


# --- cleaning: colour, invalid bytes, secrets, Chinese ---

def ansi(code, text):
    return "\x1b[%sm%s\x1b[0m" % (code, text)


@log("ansi_colour_cuda_assert.log", "cuda_error", "epoch 7/30 · step 220/500",
     "colorlog/rich-style output with colour codes and cursor hiding, and a Python 3.13 coloured "
     "traceback ending in 'CUDA error: device-side assert triggered'")
def ansi_colour_cuda_assert():
    text = "\x1b[?25l"
    for step in (200, 210, 220):
        text += (ansi("32", "2024-05-01 10:00:%02d" % (step // 10)) + " | " + ansi("1", "INFO    ") + " | "
                 + ansi("36", "train") + ":" + ansi("36", "88") + " - "
                 + ansi("1", "epoch 7/30 step %d/500 loss=0.7%03d" % (step, 500 - step)) + "\n")
    text += (ansi("33;1", "WARNING ") + " | class weights computed from a sample of 10000 labels\n"
             "../aten/src/ATen/native/cuda/Loss.cu:250: nll_loss_forward_reduce_cuda_kernel_2d: block: "
             "[0,0,0], thread: [7,0,0] Assertion `t >= 0 && t < n_classes` failed.\n"
             "Traceback (most recent call last):\n"
             '  File ' + ansi("35", '"/home/u42/seg/train.py"') + ", line " + ansi("35", "131")
             + ", in " + ansi("35", "<module>") + "\n"
             "    loss = criterion(logits, target)\n"
             '  File ' + ansi("35", '"' + TORCH + '/nn/functional.py"') + ", line " + ansi("35", "3104")
             + ", in " + ansi("35", "cross_entropy") + "\n"
             "    return torch._C._nn.cross_entropy_loss(input, target, weight, _Reduction.get_enum(reduction), "
             "ignore_index, label_smoothing)\n"
             "           " + ansi("31", "^" * 40) + "\n"
             + ansi("1;35", "RuntimeError") + ": " + ansi("35", "CUDA error: device-side assert triggered") + "\n"
             + ansi("35", "CUDA kernel errors might be asynchronously reported at some other API call, so the "
                          "stacktrace below might be incorrect.") + "\n"
             + ansi("35", "For debugging consider passing CUDA_LAUNCH_BLOCKING=1") + "\n"
             + ansi("35", "Compile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.") + "\n"
             "\x1b[?25h")
    return text


@log("invalid_utf8.log", "exception", "step 1200/5000",
     "preprocessing that meets GBK- and Latin-1-named files: the log holds invalid UTF-8 bytes "
     "(also a multi-byte sequence cut in half) and the run dies of UnicodeDecodeError",
     exception="UnicodeDecodeError")
def invalid_utf8():
    return (b"step 1100/5000: 1100 files converted\n"
            b"skipping /data/raw/caf\xe9_menu.jpg: not an image\n"
            b"reading /data/raw/\xd1\xb5\xc1\xb7\xbc\xaf/labels.txt\n"     # GBK for a Chinese name
            b"step 1200/5000: 1200 files converted\n"
            b"half a character at the end: \xe8\xae\n"
            b"a lone byte \xff in the middle\n"
            b"Traceback (most recent call last):\n"
            b'  File "/home/u42/prep/convert.py", line 48, in <module>\n'
            b"    text = raw.decode('utf-8')\n"
            b"UnicodeDecodeError: 'utf-8' codec can't decode byte 0xd1 in position 0: invalid "
            b"continuation byte\n")


SECRETS = [
    "5f3c9e2a7b1d4c6e8f0a2b4c6d8e0f1a3b5c7d9e",                          # WANDB_API_KEY=
    "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzq8Tx2Lm4V",                          # AWS_SECRET_ACCESS_KEY=
    "hf_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789",                           # --token hf_...
    "Pa55w0rdXq7",                                                       # --db-password ...
    "Qm9XaWt3ZnRzR2hUcE1wVmFk",                                          # api_key=...
    "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJydW4tNDIifQ.Zk3mQ9vX2pL7nR4tY8wB1cE6",  # Authorization: Bearer
    "eyJhbGciOiJSUzI1NiJ9.eyJzY29wZSI6InVwbG9hZCJ9.c2lnbmF0dXJlLXBhcnQ",   # 'Authorization': 'Bearer ...'
    "Tr0ub4dor3xK",                                                      # https://user:pass@host
    "S3cretPassw0rd",                                                    # mysql://user:pass@host
    "sk-proj-Jx8vQ2mN5pR7tY1wZ3aB6cD9eF0gH4iK",                          # sk-...
    "9c1d7e5b3a2f4e6d8c0b1a3e5f7d9b2c",                                  # ?api_key= in the cause line
]


@log("secrets.log", "exception", "epoch 1/30 · step 40/800",
     "a batch script run with `set -x` and a chatty uploader: keys in exports, command lines, "
     "HTTP headers (also as a Python dict), URLs and config dumps; the run dies of an HTTPError "
     "whose URL carries a key", exception="HTTPError", secrets=SECRETS)
def secrets_log():
    s = SECRETS
    return ("+ export WANDB_API_KEY=%s\n"
            "+ export AWS_SECRET_ACCESS_KEY=%s\n"
            "+ huggingface-cli login --token %s\n"
            "+ python train.py --db-url mysql+pymysql://optuna:%s@db.internal:3306/optuna "
            "--db-password %s\n"
            "comet_ml: Experiment(api_key=%s, project_name='vit')\n"
            "judge: {'provider': 'openai', 'model': 'gpt-4o-mini', 'key': '%s'}\n"
            "Downloading https://ml-bot:%s@artifacts.example.org/datasets/imagenet-subset.tar\n"
            "epoch 1/30 step 40/800 loss=2.514\n"
            "> POST /v1/runs/upload HTTP/1.1\n"
            "> Host: api.example-tracker.io\n"
            "> Authorization: Bearer %s\n"
            "uploader: request headers {'User-Agent': 'python-requests/2.31.0', 'Authorization': 'Bearer %s'}\n"
            "Traceback (most recent call last):\n" % (s[0], s[1], s[2], s[8], s[3], s[4], s[9], s[7], s[5], s[6])
            + frames(("/home/u42/vit/train.py", 77, "<module>", "tracker.upload(metrics)"),
                     (SITE + "/requests/models.py", 1024, "raise_for_status",
                      "raise HTTPError(http_error_msg, response=self)"))
            + "\nrequests.exceptions.HTTPError: 401 Client Error: Unauthorized for url: "
              "https://api.example-tracker.io/v1/runs/upload?run=vit-b16&api_key=%s\n" % s[10])


@log("chinese_output.log", "exception", "epoch 3/100 · step 370/1000",
     "a training that prints in Chinese, dies of a RuntimeError with a Chinese message",
     exception="RuntimeError",
     metric={"name": "loss", "trend": "loss 0.5631 → 0.5231 (best 0.5231)"})
def chinese_output():
    text = "加载数据集：/data/标注/train（共 32000 条样本）\n模型参数量：25.6M，使用 GPU：0\n"
    for step, loss in ((340, 0.5631), (350, 0.5502), (360, 0.5390), (370, 0.5231)):
        text += ("Epoch 3/100 | Step %d/1000 | 训练损失 loss=%.4f | 学习率 lr=1.0e-03 | 已用时 12分31秒\n"
                 % (step, loss))
    text += "Traceback (most recent call last):\n" + frames(
        ("/home/张三/项目/train.py", 120, "<module>", "batch = next(loader_iter)"),
        ("/home/张三/项目/dataset.py", 58, "__getitem__",
         "raise RuntimeError(f'数据加载失败：文件 {path} 第 {line} 行格式错误')"),
    ) + "\nRuntimeError: 数据加载失败：文件 /data/标注/train_0042.json 第 17 行格式错误\n"
    return text


# --- writing ---

def expected_entry(meta):
    entry = collections.OrderedDict()
    for key in ("cause", "exception", "progress", "metric", "secrets", "why"):
        if meta[key] is not None or key in ("cause", "progress"):
            entry[key] = meta[key]
    return entry


def main(argv=None):
    out = (argv or sys.argv[1:] or [OUT])[0]
    os.makedirs(out, exist_ok=True)
    expected = collections.OrderedDict()
    for name, meta in LOGS.items():
        data = meta["write"]()
        if not isinstance(data, bytes):
            data = data.encode("utf-8")
        with open(os.path.join(out, name), "wb") as stream:
            stream.write(data)
        expected[name] = expected_entry(meta)
    with open(os.path.join(out, "expected.json"), "w", encoding="utf-8") as stream:
        json.dump(expected, stream, ensure_ascii=False, indent=2)
        stream.write("\n")
    print("wrote %d logs and expected.json to %s" % (len(LOGS), out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
