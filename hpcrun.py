#!/usr/bin/env python3
"""hpcrun: never miss the end of a training on an HPC cluster.

wrap runs the training on the compute node, tees its output into DIR/logs/ and leaves a
completion record in DIR/.hpcrun/ however the run ends; monitor runs on the login node, turns
each record into a short report and pushes it to the phone (xxtui and 15 other channels). The
two halves talk only through the shared file system. A record's life, under DIR/.hpcrun/:

    running/<run>.json   wrap's heartbeat, rewritten every minute (markers <run>.lost, .stalled, ...)
    done/<run>.json      wrap's completion record, or a monitor's event report (<run>~lost.json)
    claimed/<run>.json.<host>.<pid>   one monitor took it (rename) and pushes it
    sent/<run>.json      every channel accepted it (delivery/<run>.json until then)

    python3 hpcrun.py wrap     --work-dir DIR --command "python train.py"
    python3 hpcrun.py monitor  [--work-dir DIR] [--interval 60] [--once]
    python3 hpcrun.py run      --work-dir DIR -- python train.py
    python3 hpcrun.py status   [--work-dir DIR] [--json] [--all] [--tasks] [--monitors]
    python3 hpcrun.py selftest [--work-dir DIR] [--show-config]
    python3 hpcrun.py notify   --test
    python3 hpcrun.py config   [--json]

Python 3.6+, standard library only.
"""

import argparse
import collections
import errno
import json
import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import threading
import time
# Heavier modules (ssl, urllib, email, configparser, socket, hashlib) are imported inside the
# functions that need them: wrap starts in a few milliseconds and stays small on the node.

__version__ = "0.1.0"

# --- constants and defaults ---

SCHEMA_VERSION = 1
STATE_DIR = ".hpcrun"
STATE_SUBDIRS = ("running", "done", "claimed", "delivery", "sent")
ALL_STATE_SUBDIRS = STATE_SUBDIRS + ("reminders", "then", "held")
LEGACY_RECORD = ".train_complete.json"
RUN_ID_RE = r"^[A-Za-z0-9_][A-Za-z0-9._~-]{0,199}\Z"   # file names under .hpcrun/ are run ids
BAD_NAME_PREFIX = "badname-"
JOB_ID_RE = r"^[A-Za-z0-9_][A-Za-z0-9_.@\[\]-]{0,99}\Z"
# One vocabulary: every status a record can have. group: "end" (a run ended; wrap's record)
# or "event" (a report about a run that goes on; the monitor's); event: the [notify] events name
# that lets it out; marker: the suffix of the file in running/ that says it was reported (a
# time-limit warning's ends in -END, one per end time); shown: what status says of a running
# run with that marker; failure: whether it says something went wrong; extras: what its title
# adds after the name. MESSAGES has "title_<status>" (with its icon) and "status_<status>".
STATUS_TABLE = (
    # status              group    event                 marker                failure extras
    ("success",           "end",   "end",                None,                 False, ("duration",)),
    ("failed",            "end",   "end",                None,                 True,  ("label", "exit")),
    ("killed",            "end",   "end",                None,                 True,  ("label", "signal")),
    ("terminated",        "end",   "end",                None,                 True,  ("label", "signal")),
    ("lost",              "event", "lost",               "lost",               True,  ()),
    ("recovered",         "event", "lost",               "recovered",          False, ()),
    ("stalled",           "event", "stalled",            "stalled",            True,  ()),
    ("resumed",           "event", "stalled",            None,                 False, ()),
    ("start",             "event", "start",              "start",              False, ()),
    ("time_limit_warning", "event", "time_limit_warning", "time_limit_warning", False, ()),
    ("release_reminder",  "event", "release_reminder",   None,                 False, ()),
    ("array_done",        "event", "array_done",         None,                 False, ()),
    ("array_failing",     "event", "array_failing",      None,                 True,  ()),
    ("gpu_idle",          "event", "gpu_idle",           "gpu_idle",           True,  ()),
    ("gpu_unused",        "event", "gpu_unused",         "gpu_unused",         True,  ()),
    ("deadline_forecast", "event", "deadline_forecast",  "deadline_forecast",  True,  ()),
)
STATUSES = tuple(row[0] for row in STATUS_TABLE if row[1] == "end")
EVENT_STATUSES = tuple(row[0] for row in STATUS_TABLE if row[1] == "event")
EVENTS = tuple(collections.OrderedDict((row[2], None) for row in STATUS_TABLE))
EVENT_OF_STATUS = {row[0]: row[2] for row in STATUS_TABLE}
MARKER_OF_STATUS = {row[0]: "." + row[3] for row in STATUS_TABLE if row[3]}
FAILURE_STATUSES = tuple(row[0] for row in STATUS_TABLE if row[4])
TITLE_EXTRAS = {row[0]: row[5] for row in STATUS_TABLE}
CAUSE_STATUSES = ("failed", "killed", "terminated", "lost")
FORECAST_ROUNDS = 10         # deadline forecasts a run may get (each after a raised limit put it back in time)
RUNNING_REPORTS = ("stalled", "lost", "time_limit_warning", "deadline_forecast")   # they show the ETA   # reports that say why it ended
# What status shows for a running run, by the first of its markers found (a lost run that beats
# again has both .lost and .recovered).
SHOWN_BY_MARKER = (("recovered", "running (heartbeat back after lost)"), ("lost", "lost (no heartbeat)"),
                   ("stalled", "running, stalled (no output)"))
USER_AGENT = "hpcrun/" + __version__

# config.ini.example mirrors this dict key by key, and each channel's settings (CHANNELS);
# the type of each default is the type of the setting.
DEFAULTS = {
    "notify": {
        "channels": "",
        "language": "zh",
        "keys_file": "api_keys.ini",
        "events": "end, lost, stalled, time_limit_warning, release_reminder, array_done, array_failing, "
                  "gpu_idle, gpu_unused, deadline_forecast",
        "only_failures": False,
        "min_duration": 0.0,
        "skip_short_failures": False,
        "time_limit_margin": 600.0,
        "ca_file": "",
        "arrays": "digest",
        "array_timeout": 86400.0,
        "array_fail_fast_after": 5,
        "array_fail_fast": 0.5,
    },
    "report": {
        "include_last_n_lines": 50,
        "max_chars": 4000,
        "metric": "loss",
        "checkpoint": "",
        "title_template": "",
        "header_template": "",
    },
    "monitor": {
        "interval": 60.0,
        "retry_base": 30.0,
        "retry_max": 3600.0,
        "claim_timeout": 600.0,
        "stale_after": 0.0,
        "stall_after": 1800.0,
        "reminder_interval": 1800.0,
        "reminder_max": 6,
        "forget_after": 604800.0,
        "forecast_after": 600.0,
    },
    "wrap": {
        "log_dir": "logs",
        "heartbeat_interval": 60.0,
        "grace": 0.0,
        "group": "",
        "group_size": 0,
    },
    "gpu": {
        "enabled": "auto",
        "sample_interval": 30,
        "idle_threshold": 5.0,
        "idle_after": 1800.0,
        "unused_after": 1200.0,
    },
    "cost": {
        "gpu_hour": 0.0,
        "cpu_hour": 0.0,
        "currency": "¥",
    },
}
SECRET_KEYS = ("api_key", "key", "token", "access_token", "device_key", "secret", "password")
TITLE_SHARE = 4              # a title takes at most a quarter of a channel's limit: the header fits
SERVERCHAN_TURBO_URL = "https://sctapi.ftqq.com/{key}.send"          # SCT... keys
SERVERCHAN3_URL = "https://{uid}.push.ft07.com/send/{key}.send"      # sctp{uid}t... keys
# Webhook headers whose values are credentials (other header values are not secret: redacting
# a value such as "hpcrun" would garble every report that mentions it).
SECRET_HEADER_RE = r"(?i)auth|token|key|secret|passw|cookie|sign"
JSON_TYPE = "application/json; charset=utf-8"
FORM_TYPE = "application/x-www-form-urlencoded"
LEGACY_ENV = {("xxtui", "api_key"): "XXTUI_KEY", ("wrap", "group"): "HPCRUN_GROUP",
              ("wrap", "group_size"): "HPCRUN_GROUP_SIZE"}
ARRAY_MODES = ("digest", "failures", "each")
LANGUAGES = ("zh", "en")

TERMINATING_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGXCPU")
WARNING_SIGNALS = ("SIGUSR1", "SIGUSR2")
CRASH_SIGNALS = ("SIGSEGV", "SIGBUS", "SIGABRT", "SIGFPE", "SIGILL")
DEFAULT_GRACE = 8.0          # seconds between SIGTERM and SIGKILL off Slurm (PBS Pro 10, LSF 10)
TIME_LIMIT_MARGIN_SHARE = 0.2  # a short job is warned at most this share of its limit before the end
WARNING_NOT_BEFORE = 300.0   # seconds: no time-limit warning in a job's first minutes
TIME_LIMIT_SLACK = 60.0      # a SIGTERM this close to (or after) the job's end time is the time limit
DEADLINE_STEP = 0.1          # seconds between two looks of a push's watchdog at the stop flag
FORWARD_DELAY = 1.0          # seconds before a signal is forwarded to a training still alive
PROVISIONAL_MARGIN = 30.0    # seconds a monitor on another host waits beyond the wrapper's grace
DRAIN_IDLE = 1.0             # after the training exits, stop relaying once its pipe is idle this long
DRAIN_MAX = 3.0              # ... or after this long, whatever a grandchild holding the pipe writes
DRAIN_STEP = 0.05
LEFTOVER_GRACE = 1.0         # seconds between SIGTERM and SIGKILL for what the training left running
FINAL_RETRY_DELAY = 0.2      # seconds before the completion record is written a second time
PR_SET_CHILD_SUBREAPER = 36
READ_CHUNK = 1 << 18
RECENT_BYTES = 4096
PIPE_SIZE = 1 << 20
TAIL_BLOCK = 1 << 16
TAIL_MAX_BYTES = 1 << 20
CLASSIFY_LINES = 2000        # log lines looked at for the cause, from a tail of at most 1 MiB
ARRAY_TAIL_LINES = 20        # log lines of an array's first failure in its digest
ARRAY_CLAIM_TIMEOUT = 600.0  # a digest claimed by a monitor that died is taken over after this
ARRAY_INDEX_MAX = 100000     # indices listed of an array's tasks that never reported
GPU_START_SLACK = 10.0       # seconds nvidia-smi may take to print its first row (driver start-up)
GPU_SPREAD = 10.0            # a GPU this many points below the mean is named in the card
GPU_UNUSED_UTIL = 5.0        # a GPU that never went above this % was not used at all
IDLE_POWER_SHARE = 0.35      # power below this share of its limit is a GPU at rest, whatever util says
LOCK_STALE = 60.0            # seconds after which a monitors' lock is taken as left by a dead one
LOCK_WAIT = 10.0
LINE_MAX_CHARS = 500
NAME_MAX_CHARS = 200         # a run's name as reports show it
LOG_NAME_TRIES = 1000
SELFTEST_PROGRAM = ("import platform, sys; print('hpcrun selftest on %s, Python %s' "
                    "% (platform.node(), sys.version.split()[0]))")
SCHEDULER_TIMEOUT = 10       # seconds for one squeue/scontrol/qstat/bjobs call
MEMORY_SAMPLE_INTERVAL = 10.0  # seconds between two samples of the training's memory
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

RANK_PREFIX_RE = r"^(?:\[[A-Za-z_]*\d+\]:\s?|\d+:\s|\[\d+,\d+\]<\w+>:\s?|[A-Za-z][\w-]*\d: )+"
# The failure catalogue (reference hpc-facts §7): (cause, tier, pattern). Tier 1: the
# scheduler's own words (each scheduler's kill_lines, put first); 2: root causes; 3: secondary
# errors, used only when nothing else matched. Within a tier the earliest line wins: later
# ranks repeat secondary errors.
FAILURE_PATTERNS = (
    ("cuda_oom", 2, r"CUDA out of memory|CUDA error: out of memory|CUBLAS_STATUS_ALLOC_FAILED|OutOfMemoryError"),
    ("accelerator_oom", 2, r"OOM when allocating tensor|RESOURCE_EXHAUSTED: (?:Out of memory|Failed to allocate)|ResourceExhaustedError"),
    ("host_oom", 2, r"(?:\b|_Array)MemoryError\b|std::bad_alloc|DataLoader worker \(pid \d+\) is killed by signal: Killed"),
    ("nan_loss", 2, r"(?i)\bloss\W{0,3}(?:is\s)?nan\b|returned nan values in its \d+\w* output"),
    ("disk_full", 2, r"No space left on device|Disk quota exceeded"),
    ("shm", 2, r"insufficient shared memory|\bBus error\b"),
    ("segfault", 2, r"Segmentation fault|segmentation fault encountered in worker"),
    ("cpp_abort", 2, r"terminate called after throwing an instance of '(?!c10::DistBackendError)"),
    ("cuda_error", 2, r"CUDA error: |device-side assert triggered|illegal memory access"),
    ("nccl_error", 2, r"NCCL error in:|\bnccl(?:System|Internal|Remote|UnhandledCuda|InvalidUsage)Error\b|(?<!instance of 'c10::)DistBackendError"),
    ("fs_error", 2, r"Stale file handle"),
    ("exception", 2, r"^(?!.*ChildFailedError)(?:[A-Za-z_][\w]*\.)*_?[A-Z]\w*(?:Error|Exception|Interrupt|Failure)\b(?::.*)?$"),
    ("nccl_timeout", 3, r"Watchdog caught collective operation timeout|NCCL (?:communicator|operation) .*timed? ?out"),
    ("child_failed", 3, r"ChildFailedError|Root Cause \(first observed failure\)"),
    ("killed", 2, r"Signal 9 \(SIGKILL\) received by PID"),
    ("killed", 3, r"\bKilled\b"),
)
TRACEBACK_RE = r"Traceback \(most recent call last\):\s*$"
FRAME_RE = r'^\s+File "[^"]*", line \d+'        # a traceback frame; its source line follows
PROGRESS_PATTERNS = (
    ("batch", r"(?i)\bepoch\W{0,3}\[\s*(\d+)\]\s*\[\s*(\d+)\s*/\s*(\d+)\]"),
    ("epoch", r"(?i)\bepoch\b\s*[:=]?\s*\[?\s*(\d+)(?:\s*(?:/|of)\s*(\d+))?"),
    ("bar", r"(\d{1,3})%\|[^|\n]*\|\s*(\d+(?:\.\d+)?[kMG]?)/(\d+(?:\.\d+)?[kMG]?)"),
    ("step", r"(?i)(?<!\*\*\* )\b(?:global[_ ])?(?:step|iter(?:ation)?)s?\b\s*[:=]?\s*\[?\s*(\d+)(?:\s*(?:/|of)\s*(\d+))?"),
)
# Lines that say a checkpoint was written (reference gpu-arrays-forecast §3): what was saved is
# the first group. HF Trainer, DeepSpeed, Lightning and Keras (verbose), mmengine, and the usual
# hand-written forms; [report] checkpoint adds a pattern of the user's own.
CHECKPOINT_PATTERNS = (
    r"Saving model checkpoint (?:to|:) ?(\S+)",
    r"[Ss]aving model to '([^']+)'",
    r"[Ss]aving model to (\S+)",
    r"(?i)saving checkpoint at (\d+ (?:epochs?|iterations?))",
    r"(?i)\bcheckpoint (?:saved|written|stored)(?: (?:to|at|in))?:? ?(\S*)",
    r"(?i)\b(?:saved|saving|wrote|writing) (?:a |the )?(?:model )?checkpoint(?: (?:to|at|in|as))?:? ?([^,;]*)",
)
CHECKPOINT_HINT = b"heckpoint"   # the output is searched for it as it passes; other lines at the looks
CHECKPOINT_SEARCH_BYTES = 4 << 20   # bytes a second searched for it (a flood's rest: the looks only)
CHECKPOINT_FILE_RE = r"^(?:checkpoint-\d+|global_step\d+)$|\.(?:ckpt|pt|pth|safetensors)$"
CHECKPOINT_SEARCH = (4, 5000, 1.0)   # depth, entries and seconds the search for checkpoint files may take
SECRET_PATTERNS = (
    r"(?i)((?<![a-z0-9])(?:api[_-]?key|access[_-]?key|secret(?:[_-]?key)?|token|passw(?:or)?d|passwd|pwd)"
    r"[\"']?\s*[:=]\s*[\"']?)([^\s\"',;&]+)",
    r"(?i)(\bauthorization[\"']?\s*[:=]\s*[\"']?(?:bearer|basic|token)?\s*)([^\s\"']+)",
    r"(?i)(--?[\w-]{0,40}(?:api[_-]?key|token|secret|passw(?:or)?d)[ =])(\S+)",
    r"(\b[a-z][\w+.-]{0,30}://[^/\s:@]{1,200}:)([^@\s/]+)(?=@)",
    r"()\b(sk-[A-Za-z0-9_-]{16,}|gh[pousr]_[A-Za-z0-9]{20,}|hf_[A-Za-z0-9]{20,}"
    r"|xox[abprs]-[A-Za-z0-9-]{10,}|AKIA[0-9A-Z]{16}|tk_[a-z0-9]{20,})\b",
)
PRIVATE_KEY_BEGIN_RE = r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----"
PRIVATE_KEY_END_RE = r"-----END [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----"
PRIVATE_KEY_MASK = "*** private key masked ***"
SPARK_CHARS = "▁▂▃▄▅▆▇█"
METRIC_POINTS = 256          # values kept over a whole run (thinned evenly as it grows)
SAMPLE_INTERVAL = 1.0        # seconds between two looks at the output for metrics and progress
HIGHER_IS_BETTER_RE = r"(?i)acc|f1|auc|bleu|rouge|score|precision|recall|map|iou|reward"
CONTROL_RE = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]"
ANSI_RE = r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]"

MESSAGES = {
    "zh": {
        "title_success": "✅ 训练完成 {name}",
        "title_failed": "❌ 训练失败 {name}",
        "title_time_limit": "⏰ 超时被终止 {name}",
        "title_killed": "💀 训练被杀死 {name}",
        "title_terminated": "🛑 训练被终止 {name}",
        "title_unknown": "❓ 训练记录异常 {name}",
        "title_lost": "⚠️ 训练失联 {name} · 心跳已停 {silence}",
        "title_recovered": "🔄 训练心跳恢复 {name}",
        "title_stalled": "⏸️ 训练无输出 {name} · 已 {silence}",
        "title_resumed": "▶️ 训练恢复输出 {name}",
        "title_start": "🚀 训练开始 {name}",
        "title_time_limit_warning": "⏳ 即将超时 {name} · 剩 {remaining}",
        "title_release_reminder": "⚠️ 训练已结束 {since}，节点仍在计费: {release}",
        "title_array_done": "📦 作业数组 {name}：{ok}/{total} 成功{causes}",
        "title_array_failing": "🚨 作业数组 {name} 正在大量失败：已结束 {reported} 个，失败 {failed} 个{causes}",
        "status_array_done": "作业数组的所有任务都已结束",
        "status_array_failing": "作业数组里失败的任务太多",
        "array_tasks": "任务：{total} · 成功 {ok} · 失败 {failed} · 未启动 {never}",
        "array_lost": " · 失联 {n}",
        "array_ended": "已结束：{reported}/{total} · 成功 {ok} · 失败 {failed}",
        "array_failed": "失败：{list}",
        "array_never_started": "未启动：{list}",
        "array_never_reported": "没有报告（超时）：{list}",
        "array_resubmit": "重新提交：{line}",
        "array_cancel": "取消整个数组：{cancel}",
        "array_durations": "时长：中位数 {median} · 最快 {fastest}（任务 {fastest_task}） · 最慢 {slowest}（任务 {slowest_task}） · 合计 {total}",
        "array_cost": "费用：{cost}",
        "array_first": "首个失败：任务 {task} · {label}",
        "array_tail": "--- 任务 {task}，日志最后 {n} 行 ---",
        "label_lost": "失联",
        "title_gpu_idle": "💤 GPU 空闲 {name} · {idle} 没有工作",
        "title_gpu_unused": "🪫 GPU 没用上 {name} · {gpus_total} 块中 {gpus_idle} 块空闲",
        "status_gpu_idle": "作业的 {gpus_total} 块 GPU 利用率都不超过 {threshold}%，已持续 {idle}（数据加载卡死？进程挂起？）",
        "status_gpu_unused": "{gpus_total} 块 GPU 中有 {gpus_idle} 块没在用，已持续 {idle}：启动时用上所有设备了吗？",
        "field_gpu_state": "GPU 现状",
        "field_last_output": "最后输出",
        "field_cancel": "取消作业",
        "field_cost": "费用",
        "ago": "{line}（{age} 前）",
        "nccl_hang": "所有 GPU 利用率 ≥90% 但功耗接近空闲，日志也没有输出：很可能是 NCCL 通信卡死",
        "gpu_hours": "{hours} GPU 卡时",
        "cpu_hours": "{hours} 核时",
        "gpu_util": "利用率平均 {util}%",
        "gpu_util_min": "（最低 GPU {index}：{util}%）",
        "gpu_memory": "显存峰值 {used}/{total} GiB",
        "gpu_power": "功耗平均 {power}/{limit} W",
        "gpu_unused_flag": "未使用：GPU {list}",
        "gpu_all_unused": "GPU 全程未使用",
        "title_deadline_forecast": "⏳ {name} 跑不完：还需约 {needs}，只剩 {left} → 大约停在 {stops}",
        "status_deadline_forecast": "按目前的速度（{rate}）还需要 {needs}，但作业只剩 {left}",
        "field_eta": "预计完成",
        "eta_text": "还需 {eta}（{rate}），{verdict}",
        "eta_in_time": "能在时间上限前跑完，富余 {spare}",
        "eta_late": "时间上限前跑不完，差 {late}",
        "eta_no_limit": "作业时间上限未知",
        "field_advice": "怎么办",
        "advice_admin": "运行中的作业只有管理员能延长时间上限，请他们执行 {command}",
        "advice_user": "自己延长时间上限：{command}",
        "advice_site": "如果你的集群允许（LSB_MOD_ALL_JOBS=Y）：{command}",
        "advice_resubmit": "下次提交时申请足够的时间：{command}",
        "advice_checkpoint": "趁还来得及保存检查点",
        "field_cost_forecast": "费用",
        "cost_forecast": "到现在 {now}，跑完约 {end}",
        "field_checkpoint": "最后的检查点",
        "checkpoint_text": "{name}{progress}，结束前 {age}",
        "checkpoint_running": "{name}{progress}，{age} 前",
        "no_checkpoint": "日志和工作目录里都没有检查点：整个运行白跑了，下次要么保存检查点，要么申请更长的时间",
        "rate_per_hour": "{n} {unit}/小时",
        "rate_per_second": "{n} {unit}/秒",
        "eta_late_short": "(超时)",
        "col_name": "名称", "col_state": "状态", "col_time": "时长", "col_progress": "进度",
        "col_detail": "原因 / 最后一行", "col_eta": "预计完成",
        "phase_running": "运行中", "phase_stalled": "运行中，无输出", "phase_lost": "失联",
        "phase_waiting": "已结束，待推送", "phase_delivering": "推送中", "phase_held": "已结束，等数组汇总",
        "phase_reported": "已推送", "phase_push_failed": "推送失败，将重试",
        "array_failed_count": "{n} 个任务失败",
        "no_runs": "没有运行记录",
        "test_prefix": "[测试] ",
        "status_start": "开始运行",
        "status_time_limit_warning": "作业时间上限还剩 {remaining}：保存检查点或延长作业",
        "status_release_reminder": "训练已结束 {since}，作业仍在运行（计费中）",
        "field_release": "释放节点",
        "field_time_left": "剩余时间",
        "outlives": "训练结束后作业（分配）可能仍在计费，释放：{release}",
        "status_lost": "失联（没有完成记录，心跳停止）",
        "status_recovered": "心跳恢复（之前报告过失联）",
        "status_stalled": "心跳正常但日志 {silence} 没有增长（可能卡住）",
        "status_resumed": "日志重新开始增长",
        "field_scheduler": "调度器",
        "field_last_heartbeat": "最后心跳",
        "field_last_line": "最后一行",
        "cause_time_limit": "达到作业时间上限",
        "cause_cancelled": "被取消（scancel/qdel 或收到终止信号）",
        "cause_preempted": "被抢占",
        "cause_oom": "内存不足（OOM）",
        "cause_crash": "程序崩溃",
        "cause_interrupted": "被中断（Ctrl-C）",
        "cause_signal": "被信号杀死",
        "cause_node_fail": "节点故障",
        "cause_cpu_limit": "达到 CPU 时间上限",
        "cause_start_failed": "无法启动命令",
        "cause_unknown": "未知",
        "cause_host_oom": "主机内存不足",
        "cause_cuda_oom": "CUDA 显存不足",
        "cause_accelerator_oom": "显存不足（TF/JAX）",
        "cause_nan_loss": "loss 变成 NaN（训练发散）",
        "cause_disk_full": "磁盘已满或超出配额",
        "cause_shm": "共享内存不足（/dev/shm）",
        "cause_segfault": "段错误",
        "cause_cpp_abort": "C++ 异常终止",
        "cause_cuda_error": "CUDA 错误",
        "cause_nccl_error": "NCCL 通信错误",
        "cause_nccl_timeout": "NCCL 集合通信超时（某个 rank 卡住或先失败）",
        "cause_fs_error": "文件系统错误",
        "cause_exception": "Python 异常",
        "cause_child_failed": "torchrun 子进程失败",
        "cause_killed": "被杀死（常见原因：内存不足）",
        "label_time_limit": "超时",
        "label_oom": "内存不足",
        "label_host_oom": "内存不足",
        "label_cuda_oom": "CUDA OOM",
        "label_accelerator_oom": "显存不足",
        "label_nan_loss": "NaN loss",
        "label_disk_full": "磁盘已满",
        "label_shm": "共享内存不足",
        "label_segfault": "段错误",
        "label_cpp_abort": "C++ abort",
        "label_cuda_error": "CUDA 错误",
        "label_nccl_error": "NCCL 错误",
        "label_nccl_timeout": "NCCL 超时",
        "label_fs_error": "文件系统错误",
        "label_child_failed": "子进程失败",
        "label_killed": "被杀",
        "label_cancelled": "被取消",
        "label_preempted": "被抢占",
        "label_interrupted": "Ctrl-C",
        "label_node_fail": "节点故障",
        "label_cpu_limit": "CPU 时限",
        "label_start_failed": "无法启动",
        "label_crash": "崩溃",
        "field_progress": "进度",
        "no_log_empty": "日志为空",
        "start_error": "无法启动 {command}：{reason}",
        "errno_ENOENT": "找不到这个程序",
        "errno_EACCES": "没有执行权限",
        "errno_ENOEXEC": "不是可执行文件",
        "errno_ENOTDIR": "路径中有一段不是目录",
        "errno_E2BIG": "参数太长",
        "errno_ENOMEM": "内存不足",
        "field_metric": "指标",
        "field_memory": "峰值内存",
        "field_gpus": "GPU",
        "job_partition": "分区",
        "job_nodes": "节点",
        "job_limit": "时限 {limit}（已用 {used}%）",
        "title_test": "🔔 hpcrun 测试消息",
        "status_success": "成功",
        "status_failed": "失败",
        "status_killed": "被信号杀死",
        "status_terminated": "被终止",
        "status_unknown": "未知",
        "field_status": "状态",
        "field_exit_code": "退出码",
        "field_signal": "信号",
        "field_cause": "原因",
        "field_name": "名称",
        "field_command": "命令",
        "field_work_dir": "目录",
        "field_host": "主机",
        "field_job": "作业",
        "field_start": "开始",
        "field_end": "结束",
        "field_duration": "时长",
        "field_log": "日志",
        "provisional": "（临时记录：包装进程在收到信号后没能写完最终记录）",
        "foreign_author": "记录由 {user} 写入：它指向的文件（日志、作业输出）未被读取",
        "tail_header": "--- 日志最后 {n} 行 ---",
        "tail_cut": "…（已截断 {n} 行）",
        "no_log": "（没有日志：{reason}）",
        "test_body": "hpcrun 测试消息：通道 {channel} 工作正常。主机 {host}，时间 {time}。",
    },
    "en": {
        "title_success": "✅ Training finished {name}",
        "title_failed": "❌ Training failed {name}",
        "title_time_limit": "⏰ Time limit reached {name}",
        "title_killed": "💀 Training killed {name}",
        "title_terminated": "🛑 Training terminated {name}",
        "title_unknown": "❓ Unreadable run record {name}",
        "title_lost": "⚠️ Training lost {name} · no heartbeat for {silence}",
        "title_recovered": "🔄 Training heartbeat back {name}",
        "title_stalled": "⏸️ Training stalled {name} · no output for {silence}",
        "title_resumed": "▶️ Training output resumed {name}",
        "title_start": "🚀 Training started {name}",
        "title_time_limit_warning": "⏳ Time limit near {name} · {remaining} left",
        "title_release_reminder": "⚠️ Training ended {since} ago, node still billed: {release}",
        "title_array_done": "📦 Array {name}: {ok}/{total} ok{causes}",
        "title_array_failing": "🚨 Array {name} failing: {failed} of {reported} ended tasks failed{causes}",
        "status_array_done": "every task of the array has ended",
        "status_array_failing": "too many tasks of the array failed",
        "array_tasks": "Tasks: {total} · ok {ok} · failed {failed} · never started {never}",
        "array_lost": " · lost {n}",
        "array_ended": "Ended: {reported} of {total} · ok {ok} · failed {failed}",
        "array_failed": "Failed: {list}",
        "array_never_started": "Never started: {list}",
        "array_never_reported": "Never reported (timed out): {list}",
        "array_resubmit": "Resubmit: {line}",
        "array_cancel": "Cancel the array: {cancel}",
        "array_durations": "Durations: median {median} · fastest {fastest} (task {fastest_task}) · slowest {slowest} (task {slowest_task}) · total {total}",
        "array_cost": "Cost: {cost}",
        "array_first": "First failure: task {task} · {label}",
        "array_tail": "--- task {task}, last {n} log lines ---",
        "label_lost": "lost",
        "title_gpu_idle": "💤 GPUs idle {name} · {idle} without work",
        "title_gpu_unused": "🪫 GPUs unused {name} · {gpus_idle} of {gpus_total} idle",
        "status_gpu_idle": "all {gpus_total} GPUs of the job at or below {threshold}% for {idle} (a stuck data loader? a hung process?)",
        "status_gpu_unused": "{gpus_idle} of {gpus_total} GPUs unused for {idle}: is the launch using all devices?",
        "field_gpu_state": "GPUs now",
        "field_last_output": "Last output",
        "field_cancel": "Cancel the job",
        "field_cost": "Cost",
        "ago": "{line} ({age} ago)",
        "nccl_hang": "every GPU at >= 90% utilisation but near idle power, and a silent log: probable NCCL hang",
        "gpu_hours": "{hours} GPU-h",
        "cpu_hours": "{hours} core-h",
        "gpu_util": "util {util} % avg",
        "gpu_util_min": " (min GPU {index}: {util} %)",
        "gpu_memory": "memory max {used}/{total} GiB",
        "gpu_power": "power {power}/{limit} W avg",
        "gpu_unused_flag": "unused: GPU {list}",
        "gpu_all_unused": "no GPU was used",
        "title_deadline_forecast": "⏳ {name} will not finish: needs ≈ {needs} more, {left} left → stops near {stops}",
        "status_deadline_forecast": "at the current rate ({rate}) the run needs {needs} more, and the job has {left} left",
        "field_eta": "ETA",
        "eta_text": "{eta} more ({rate}), {verdict}",
        "eta_in_time": "finishes before the limit with {spare} to spare",
        "eta_late": "does not finish before the limit: short by {late}",
        "eta_no_limit": "the job's time limit is unknown",
        "field_advice": "What to do",
        "advice_admin": "only an administrator can raise a running job's limit: ask for {command}",
        "advice_user": "raise the limit yourself: {command}",
        "advice_site": "where your site allows it (LSB_MOD_ALL_JOBS=Y): {command}",
        "advice_resubmit": "next time ask for enough time: {command}",
        "advice_checkpoint": "save a checkpoint while there is time",
        "field_cost_forecast": "Cost",
        "cost_forecast": "{now} so far, ≈ {end} at the end",
        "field_checkpoint": "Last checkpoint",
        "checkpoint_text": "{name}{progress}, {age} before the end",
        "checkpoint_running": "{name}{progress}, {age} ago",
        "no_checkpoint": "no checkpoint in the log or under the work dir: the whole run is lost; the next one needs checkpoints or a longer time limit",
        "rate_per_hour": "{n} {unit}s/h",
        "rate_per_second": "{n} {unit}s/s",
        "eta_late_short": "(too late)",
        "col_name": "NAME", "col_state": "STATE", "col_time": "TIME", "col_progress": "PROGRESS",
        "col_detail": "CAUSE / LAST LINE", "col_eta": "ETA",
        "phase_running": "running", "phase_stalled": "running, silent", "phase_lost": "lost",
        "phase_waiting": "ended, to report", "phase_delivering": "reporting", "phase_held": "ended, held for digest",
        "phase_reported": "reported", "phase_push_failed": "push failed, retrying",
        "array_failed_count": "{n} task(s) failed",
        "no_runs": "no runs",
        "test_prefix": "[test] ",
        "status_start": "started",
        "status_time_limit_warning": "{remaining} left before the job's time limit: save a checkpoint or extend the job",
        "status_release_reminder": "training ended {since} ago, the job still runs (billed)",
        "field_release": "Release the node",
        "field_time_left": "Time left",
        "outlives": "the job (allocation) may still be billed after the training: release it with {release}",
        "status_lost": "lost (no completion record, heartbeat stopped)",
        "status_recovered": "heartbeat back (reported lost before)",
        "status_stalled": "heartbeat alive but no log output for {silence} (hung?)",
        "status_resumed": "log output resumed",
        "field_scheduler": "Scheduler",
        "field_last_heartbeat": "Last heartbeat",
        "field_last_line": "Last line",
        "cause_time_limit": "time limit reached",
        "cause_cancelled": "cancelled (scancel/qdel or a stop signal)",
        "cause_preempted": "preempted",
        "cause_oom": "out of memory (OOM)",
        "cause_crash": "crash",
        "cause_interrupted": "interrupted (Ctrl-C)",
        "cause_signal": "killed by a signal",
        "cause_node_fail": "node failure",
        "cause_cpu_limit": "CPU time limit reached",
        "cause_start_failed": "the command could not be started",
        "cause_unknown": "unknown",
        "cause_host_oom": "host out of memory",
        "cause_cuda_oom": "CUDA out of memory",
        "cause_accelerator_oom": "accelerator out of memory (TF/JAX)",
        "cause_nan_loss": "loss became NaN (training diverged)",
        "cause_disk_full": "disk full or quota exceeded",
        "cause_shm": "shared memory too small (/dev/shm)",
        "cause_segfault": "segmentation fault",
        "cause_cpp_abort": "C++ abort",
        "cause_cuda_error": "CUDA error",
        "cause_nccl_error": "NCCL communication error",
        "cause_nccl_timeout": "NCCL collective timed out (a rank hung or failed first)",
        "cause_fs_error": "file system error",
        "cause_exception": "Python exception",
        "cause_child_failed": "a torchrun worker failed",
        "cause_killed": "killed (often: out of memory)",
        "label_time_limit": "time limit",
        "label_oom": "OOM",
        "label_host_oom": "host OOM",
        "label_cuda_oom": "CUDA OOM",
        "label_accelerator_oom": "accelerator OOM",
        "label_nan_loss": "NaN loss",
        "label_disk_full": "disk full",
        "label_shm": "shm too small",
        "label_segfault": "segfault",
        "label_cpp_abort": "C++ abort",
        "label_cuda_error": "CUDA error",
        "label_nccl_error": "NCCL error",
        "label_nccl_timeout": "NCCL timeout",
        "label_fs_error": "file system error",
        "label_child_failed": "worker failed",
        "label_killed": "killed",
        "label_cancelled": "cancelled",
        "label_preempted": "preempted",
        "label_interrupted": "Ctrl-C",
        "label_node_fail": "node failure",
        "label_cpu_limit": "CPU limit",
        "label_start_failed": "cannot start",
        "label_crash": "crash",
        "field_progress": "Progress",
        "no_log_empty": "empty",
        "start_error": "cannot start {command}: {reason}",
        "errno_ENOENT": "no such program",
        "errno_EACCES": "permission denied",
        "errno_ENOEXEC": "not an executable",
        "errno_ENOTDIR": "a part of the path is not a directory",
        "errno_E2BIG": "argument list too long",
        "errno_ENOMEM": "out of memory",
        "field_metric": "Metric",
        "field_memory": "Peak memory",
        "field_gpus": "GPUs",
        "job_partition": "partition",
        "job_nodes": "nodes",
        "job_limit": "limit {limit} ({used}% used)",
        "title_test": "🔔 hpcrun test message",
        "status_success": "success",
        "status_failed": "failed",
        "status_killed": "killed by a signal",
        "status_terminated": "terminated",
        "status_unknown": "unknown",
        "field_status": "Status",
        "field_exit_code": "Exit code",
        "field_signal": "Signal",
        "field_cause": "Cause",
        "field_name": "Name",
        "field_command": "Command",
        "field_work_dir": "Directory",
        "field_host": "Host",
        "field_job": "Job",
        "field_start": "Start",
        "field_end": "End",
        "field_duration": "Duration",
        "field_log": "Log",
        "provisional": "(provisional record: the wrapper was stopped before it wrote the final one)",
        "foreign_author": "Record written by {user}: the files it names (log, job output) were not read",
        "tail_header": "--- last {n} log lines ---",
        "tail_cut": "… ({n} lines cut)",
        "no_log": "(no log: {reason})",
        "test_body": "hpcrun test message: channel {channel} works. Host {host}, time {time}.",
    },
}


# --- errors ---

class HpcrunError(Exception):
    """An expected failure: main prints it as one line and exits with exit_code."""
    exit_code = 1


class ConfigError(HpcrunError):
    exit_code = 2


class UnsafeFile(HpcrunError):
    """A file a record names that is not read: not a regular file, or not the author's to show."""


class Stopped(Exception):
    """SIGTERM or SIGINT reached the monitor in the middle of a push: stop at once."""


class ChannelError(HpcrunError):
    """A push that a service did not accept; retryable unless the service said no for good."""

    def __init__(self, message, retryable=True, retry_after=None, timed_out=False):
        HpcrunError.__init__(self, message)
        self.retryable = retryable
        self.retry_after = retry_after
        self.timed_out = timed_out


# --- pure helpers: formatting, parsing, tail reading, log cleaning ---

def host_name():
    """This machine's name (what socket.gethostname() says, without importing socket)."""
    return os.uname()[1]


def find_program(name):
    import shutil
    return shutil.which(name)


def emit(text, stream=None):
    """Write a line as UTF-8 whatever the locale (LANG=C on Python 3.6 would refuse Chinese).

    A closed stream (started with >&-, as cron jobs are) swallows the line."""
    stream = stream or sys.stdout
    if stream is None:
        return
    data = (text + "\n").encode("utf-8", errors="replace")
    try:
        stream.flush()
        buffer = getattr(stream, "buffer", None)
        if buffer is not None:
            buffer.write(data)
            buffer.flush()
        else:
            stream.write(data.decode("utf-8"))
            stream.flush()
    except BrokenPipeError:
        raise
    except (OSError, ValueError):
        pass  # stderr of a detached job: nowhere to say it


def format_duration(seconds):
    """Compact duration: 42s, 5m03s, 3h12m, 24h00m (time limits read in hours), 5d04h."""
    seconds = int(max(0, round(seconds or 0)))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days >= 4:
        return "%dd%02dh" % (days, hours)
    hours += 24 * days
    if hours:
        return "%dh%02dm" % (hours, minutes)
    if minutes:
        return "%dm%02ds" % (minutes, secs)
    return "%ds" % secs


def format_local_time(epoch):
    if epoch is None:
        return "-"
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))
    except (OverflowError, ValueError, OSError):
        return "?"


def format_log_time(epoch):
    """ISO 8601 with the UTC offset: 2026-11-28T18:30:00+08:00."""
    text = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(epoch))
    return text[:-2] + ":" + text[-2:]


def is_number(value):
    """An int or float from JSON (true and false are not numbers here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_local_time(text):
    """Epoch seconds of "YYYY-MM-DD HH:MM:SS" (local time), or None."""
    try:
        return time.mktime(time.strptime(str(text).strip()[:19], "%Y-%m-%d %H:%M:%S"))
    except (ValueError, OverflowError):
        return None


def redact(text, secrets):
    """Replace every secret (and its URL-quoted form) in text by ***."""
    text = str(text)
    for secret in sorted(secrets, key=len, reverse=True):
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


def secret_forms(value):
    from urllib.parse import quote
    return {value, quote(value, safe=""), quote(value)} if value else set()


def signal_name(number):
    try:
        return signal.Signals(number).name
    except ValueError:
        return "SIG%d" % number


def signal_number(name):
    name = name.upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return int(getattr(signal.Signals, name))
    except AttributeError:
        raise HpcrunError("unknown signal '%s'" % name)


def clean_log_text(text):
    """One log line per element: ANSI codes and control bytes removed, \\r redraws collapsed."""
    text = re.sub(CONTROL_RE, "", re.sub(ANSI_RE, "", text.replace("\r\n", "\n")))
    lines = []
    for line in text.split("\n"):
        if "\r" in line:
            parts = [part for part in line.split("\r") if part.strip()]
            line = parts[-1] if parts else ""
        line = line.rstrip()
        if len(line) > LINE_MAX_CHARS:
            line = line[:LINE_MAX_CHARS] + "…"
        lines.append(line)
    return lines


def read_tail(source, line_count, max_bytes=TAIL_MAX_BYTES):
    """The last line_count cleaned lines of a log (a path, or a binary stream opened already),
    reading backwards in blocks up to max_bytes."""
    if line_count <= 0:
        return []
    if isinstance(source, str):
        with open_regular_file(source) as stream:
            return read_tail(stream, line_count, max_bytes)
    source.seek(0, os.SEEK_END)
    position = source.tell()
    data = b""
    while position > 0 and len(data) < max_bytes:
        step = min(TAIL_BLOCK, position, max_bytes - len(data))
        position -= step
        source.seek(position)
        data = source.read(step) + data
        if data.count(b"\n") > line_count:
            break
    if position > 0:
        cut = [i for i in (data.find(b"\n"), data.find(b"\r")) if i >= 0]
        data = data[min(cut) + 1:] if cut else b""   # the first (partial) segment is cut
    lines = clean_log_text(data.decode("utf-8", errors="replace"))
    while lines and not lines[-1]:
        lines.pop()
    return lines[-line_count:]


def open_regular_file(path, follow=True, dir_fd=None):
    """A binary stream of a regular file, opened so that nothing can block or trick the reader:
    O_NONBLOCK (a FIFO does not wait for a writer), O_NOCTTY, fstat before any read. A FIFO,
    device, directory or symlink loop raises UnsafeFile; follow=False refuses any symlink."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0)
    if not follow:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, dir_fd=dir_fd)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise UnsafeFile("a symbolic link" if not follow else "a symbolic link loop")
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise UnsafeFile("not a regular file (%s)" % file_kind(mode))
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def file_kind(mode):
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a file"


def strip_rank(line):
    return re.sub(RANK_PREFIX_RE, "", line, count=1)


def mask_secrets(line):
    """Lines that look like they hold a token, key or password, with the value masked."""
    for pattern in SECRET_PATTERNS:
        line = re.sub(pattern, lambda match: match.group(1) + "***", line)
    return line


def mask_key_blocks(lines):
    """Lines with every private-key block (-----BEGIN ... PRIVATE KEY----- to its END line)
    replaced by one line; a block cut by the start or the end of the tail is masked too."""
    ends = [i for i, line in enumerate(lines) if re.search(PRIVATE_KEY_END_RE, line)]
    begins = [i for i, line in enumerate(lines) if re.search(PRIVATE_KEY_BEGIN_RE, line)]
    if not ends and not begins:
        return lines
    masked, inside = [], bool(ends) and (not begins or ends[0] < begins[0])
    for index, line in enumerate(lines):
        starts = re.search(PRIVATE_KEY_BEGIN_RE, line)
        if starts or inside:
            if not masked or masked[-1] != PRIVATE_KEY_MASK:
                masked.append(PRIVATE_KEY_MASK)
            inside = not re.search(PRIVATE_KEY_END_RE, line)
            continue
        masked.append(line)
    return masked


def classify_log(lines):
    """(cause, line) of the likeliest root cause in a log tail, or (None, None)."""
    best = None
    in_traceback = in_frame = False
    patterns = [(cause, tier, re.compile(pattern))
                for cause, tier, pattern in scheduler_kill_lines() + FAILURE_PATTERNS]
    for index, raw in enumerate(lines):
        unranked = strip_rank(raw)
        if in_frame and unranked.startswith((" ", "\t")) and not re.match(FRAME_RE, unranked):
            continue  # a frame's source line: `raise RuntimeError("CUDA out of memory")` is not the error
        in_frame = bool(re.match(FRAME_RE, unranked))
        line = unranked.strip()
        if re.search(TRACEBACK_RE, line):
            in_traceback = True
            continue
        for cause, tier, pattern in patterns:
            if cause == "exception" and (not in_traceback or raw.startswith((" ", "\t"))):
                continue
            if pattern.search(line):
                if cause == "exception" and line.startswith("KeyboardInterrupt"):
                    cause = "interrupted"
                if best is None or (tier, index) < best[0]:
                    best = ((tier, index), cause, line)
                break
    if best is None:
        return None, None
    return best[1], best[2][:300]


def exception_name(line):
    """ValueError of 'ValueError: bad value' (the short label of a Python exception)."""
    return line.split(":", 1)[0].strip().rsplit(".", 1)[-1][:40]


def parse_progress(lines):
    """'epoch 12/100 · 37% 370/1000' from the last lines that show progress, or None."""
    found = {}
    for line in reversed(lines):
        line = strip_rank(line)
        for kind, pattern in PROGRESS_PATTERNS:
            matches = list(re.finditer(pattern, line))
            if kind == "epoch":
                if matches and "epoch" not in found:
                    found["epoch"] = matches[-1]
                with_total = [m for m in matches if m.group(2)]
                if with_total and "epoch_total" not in found:
                    found["epoch_total"] = with_total[-1]
                continue
            if kind in found:
                continue
            if matches:
                found[kind] = matches[-1]
        if "batch" in found and "epoch" not in found:
            break
        if "epoch_total" in found and ("bar" in found or "step" in found):
            break
    if "batch" in found and "epoch_total" not in found:
        match = found["batch"]
        return "epoch %s · step %s/%s" % match.groups()
    if "epoch_total" in found:
        found["epoch"] = found["epoch_total"]
    parts = []
    if "epoch" in found:
        match = found["epoch"]
        parts.append("epoch %s" % (match.group(1) + ("/" + match.group(2) if match.group(2) else "")))
    if "bar" in found:
        match = found["bar"]
        parts.append("%s%% %s/%s" % match.groups())
    elif "step" in found:
        match = found["step"]
        parts.append("step %s" % (match.group(1) + ("/" + match.group(2) if match.group(2) else "")))
    return " · ".join(parts) or None


def metric_regex(name):
    return re.compile(r"(?i)(?<![\w.])['\"]?" + re.escape(name) +
                      r"['\"]?\s*[:=]?\s*(?:tensor\()?([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:e[-+]?\d+)?|nan|[-+]?inf)\b")


def format_number(value):
    if value != value:
        return "nan"
    if value in (float("inf"), float("-inf")):
        return "inf" if value > 0 else "-inf"
    return "%.4g" % value


def sparkline(values, width=20):
    """▇▆▅▄▃▂▁ of a series: one character per bucket (its last value); × for nan, ↑ for inf."""
    if not values:
        return ""
    count = min(width, len(values))
    buckets = [values[int(i * len(values) / count)] for i in range(count)]
    buckets[-1] = values[-1]
    finite = [v for v in buckets if v == v and abs(v) != float("inf")]
    low, high = (min(finite), max(finite)) if finite else (0.0, 0.0)
    chars = []
    for value in buckets:
        if value != value:
            chars.append("×")
        elif abs(value) == float("inf"):
            chars.append("↑")
        elif high == low:
            chars.append(SPARK_CHARS[0])
        else:
            chars.append(SPARK_CHARS[int((value - low) / (high - low) * (len(SPARK_CHARS) - 1))])
    return "".join(chars)


def format_metric_trend(name, values):
    """'loss 2.31 → 0.12 (best 0.11) ▇▆▅▄▃▃▂▂▁▁', or None without values."""
    if not values:
        return None
    finite = [v for v in values if v == v and abs(v) != float("inf")]
    best = (max if re.search(HIGHER_IS_BETTER_RE, name) else min)(finite) if finite else None
    text = "%s %s → %s" % (name, format_number(values[0]), format_number(values[-1]))
    if best is not None and len(values) > 1:
        text += " (best %s)" % format_number(best)
    return text + " " + sparkline(values)


# --- progress: the run's fraction and rate, from progress lines with totals ---

# A progress line gives readings, tuples (role, numbers...): "epoch_line" (epoch i/N as printed),
# "epochs" (epochs done, N), "epoch_total" (N alone, from a config line), "inner" (count, total,
# epochs done or None: a bar within one epoch), "bar" (count, total, description: a tqdm bar that
# is the run's or, beside an epoch count, the epoch's), "steps" (count, total, unit: a standalone
# step or iter count, the same two roles), "run" (count, total, unit: global_step, Iter(train)).
# Kinds in the order they are tried; the first that matches a line reads it.
PROGRESS_COUNT_RE = (r"(?i)\b(global[_ ]step|step|iter(?:ation)?|batch)(?:e?s)?\b"
                     r"\s*[:=]?\s*\[?\s*(\d+)\s*(?:/|of)\s*(\d+)")
PROGRESS_TOTAL_PATTERNS = (
    ("tqdm", r"^(.*?)(\d+)%\|[^|]*\|\s*(\d+(?:\.\d+)?)([kMGTP]?)/(\d+(?:\.\d+)?)([kMGTP]?)(?![\d.])"),
    ("rich", r"(?i)^\s*epoch\s+(\d+)/(\d+)\s+[━╸╺]+\s+(\d+)/(\d+)"),   # Lightning's RichProgressBar
    ("mmengine_epoch", r"\bEpoch(?:\((\w+)\))?\s*\[\s*(\d+)(?:\s*/\s*(\d+))?\]\s*\[\s*(\d+)\s*/\s*(\d+)\]"),
    ("mmengine_iter", r"\bIter\((\w+)\)\s*\[\s*(\d+)\s*/\s*(\d+)\]"),
    ("keras", r"^\s*(\d+)/(\d+)\s+(?:\[[=>.]*\]|[━─]+|-\s)"),
    ("epoch", r"(?i)\bepochs?\b\s*[:=]?\s*\[?\s*(\d+)\s*(?:/|of)\s*(\d+)"),
    ("count", PROGRESS_COUNT_RE),
    ("epoch_total", r"(?i)\b(?:(?:max|num|num_train|n|total)_epochs\s*[=:]|epochs\s*=|num epochs\s*=)\s*(\d+)\b"),
)
PROGRESS_RANK_RE = r"^(?:\[[A-Za-z_]*(\d+)\]:|(\d+):\s|\[\d+,(\d+)\]<\w+>:)"
PROGRESS_SKIPPED_BAR_RE = (r"(?i)\b(?:valid|val\b|eval|test|predict|sanity|inferenc|generat|load|download|upload"
                           r"|map\b|token|filter|fetch|extract|sav|cach|shard|resolv|convert|preprocess)")
PROGRESS_EPOCH_DESC_RE = r"(?i)\bepochs?\b\s*(?:(\d+)(?:\s*(?:/|of)\s*(\d+))?)?"
PROGRESS_SUMMARY_RE = r"(?i)\b(?:\w*loss|\w*acc(?:uracy)?|finished|completed?|done|ended)\b"
PROGRESS_CUT_RE = r"[\d.kMGTP]+$"  # a number the newest line may end in the middle of
PROGRESS_SI = {"": 1.0, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15}
PROGRESS_MAX_COUNT = 1e15      # a larger count or total is garbage
PROGRESS_LOOK_GRACE = 2.0      # seconds after a look (about one a second) that count as seen, not stalled
PROGRESS_BAR_KEYS = 16         # bar descriptions whose largest total is remembered
PROGRESS_WINDOW_MIN = 600.0    # seconds: the shortest rate window, once there is that much history
                               # (monitor's forecast_after: the history a forecast needs)


def progress_line_text(line):
    """A log line without its rank prefix, or None when the prefix names a rank other than 0."""
    rank = re.match(PROGRESS_RANK_RE, line)
    if rank and any(group.strip("0") for group in rank.groups() if group):
        return None
    return re.sub(RANK_PREFIX_RE, "", line, count=1)


def progress_number(digits, prefix=""):
    """1200.0 of ('1.20', 'k'): a tqdm count, scaled by its SI prefix."""
    return float(digits) * PROGRESS_SI[prefix]


def progress_fraction(count, total):
    """count/total within 0..1, or None when either is not a sane number."""
    if not (0 <= count <= PROGRESS_MAX_COUNT and 0 < total <= PROGRESS_MAX_COUNT):
        return None   # also nan and inf
    return min(1.0, count / total)


def parse_progress_totals(line, cut=False):
    """The readings of one cleaned log line (see PROGRESS_TOTAL_PATTERNS), [] for none;
    cut: without the number the line ends in (it may be cut short: `Epoch 3/10` of `Epoch 3/100`)."""
    line = progress_line_text(line)
    if line is None:
        return []
    if cut:
        line = re.sub(PROGRESS_CUT_RE, "", line.rstrip())
    for kind, pattern in PROGRESS_TOTAL_PATTERNS:
        match = re.search(pattern, line)
        if match:
            return PROGRESS_PARSERS[kind](match)
    return []


def parse_progress_tqdm(match):
    """A tqdm bar, by its description: the epoch count (`Epoch: 3/10`), one epoch's bar
    (`Epoch 3/10:`, Lightning's 0-based `Epoch 3:`), nothing (evaluation, loading), or a bar."""
    description = match.group(1).strip(" :")
    count, total = progress_number(*match.group(3, 4)), progress_number(*match.group(5, 6))
    if re.search(PROGRESS_SKIPPED_BAR_RE, description):
        return []
    epoch = re.search(PROGRESS_EPOCH_DESC_RE, description)
    if not epoch:
        return [("bar", count, total, re.sub(r"\d+", "#", description)[:40])]  # Step 3, GPU0: one bar
    if epoch.group(2):
        return [("epoch_line", float(epoch.group(1)), float(epoch.group(2)), False),
                ("inner", count, total, None)]
    if epoch.group(1):
        return [("inner", count, total, float(epoch.group(1)))]
    return [("epochs", count, total)]


def parse_progress_rich(match):
    """Lightning's RichProgressBar, `Epoch 5/9 ━━━ 450/1000`: 0-based, and 9 is max_epochs - 1."""
    epoch, last_epoch, count, total = (float(group) for group in match.groups())
    return [("epochs", epoch, last_epoch + 1), ("inner", count, total, None)]


def parse_progress_mmengine_epoch(match):
    """mmengine's `Epoch(train) [10][100/270]` (mmcv: `Epoch [10][100/270]`): 1-based epoch."""
    mode, epoch, epochs, count, total = match.groups()
    if mode not in (None, "train"):
        return []
    readings = [("epoch_total", float(epochs))] if epochs else []
    return readings + [("inner", float(count), float(total), float(epoch) - 1)]


def parse_progress_mmengine_iter(match):
    """mmengine's `Iter(train) [5/10000]`: the run's iterations."""
    mode, count, total = match.groups()
    return [("run", float(count), float(total), "iter")] if mode == "train" else []


def parse_progress_keras(match):
    """Keras's step bar within an epoch, `120/469 [===>...]` or `469/469 ━━━━ 3s 6ms/step`."""
    return [("inner", float(match.group(1)), float(match.group(2)), None)]


def parse_progress_epoch(match):
    """`Epoch 3/100`, `Epoch [3/100]`, `epoch 3 of 100`, with a step or batch count of the
    epoch on the same line, or metrics (an end-of-epoch summary: epoch 3 is done)."""
    line = match.string[:match.start()] + " " + match.string[match.end():]
    count = re.search(PROGRESS_COUNT_RE, line)
    summary = not count and bool(re.search(PROGRESS_SUMMARY_RE, line))
    readings = [("epoch_line", float(match.group(1)), float(match.group(2)), summary)]
    return readings + ([progress_count_reading(count, within_epoch=True)] if count else [])


def parse_progress_count(match):
    """`step 1200/50000`, `Iteration 1200/50000`, `global_step 1200/50000`, `Batch 120/469`."""
    return [progress_count_reading(match)]


def progress_count_reading(match, within_epoch=False):
    """global_step counts the run; a batch, or a step beside an epoch count, the epoch."""
    word, count, total = match.group(1).lower(), float(match.group(2)), float(match.group(3))
    if word.startswith("global"):
        return ("run", count, total, "step")
    if within_epoch or word == "batch":
        return ("inner", count, total, None)
    return ("steps", count, total, "iter" if word.startswith("iter") else "step")


def parse_progress_epoch_total(match):
    """`max_epochs=12` of a config dump, `Num Epochs = 3`: how many epochs the run has."""
    return [("epoch_total", float(match.group(1)))]


PROGRESS_PARSERS = {"tqdm": parse_progress_tqdm, "rich": parse_progress_rich,
                    "mmengine_epoch": parse_progress_mmengine_epoch, "mmengine_iter": parse_progress_mmengine_iter,
                    "keras": parse_progress_keras, "epoch": parse_progress_epoch, "count": parse_progress_count,
                    "epoch_total": parse_progress_epoch_total}


def progress_reading_sane(reading):
    """Whether a reading's numbers are sane: finite, in range, its total (the second number, or
    the only one) positive."""
    numbers = [value for value in reading[1:] if isinstance(value, float)]
    total = numbers[1] if len(numbers) > 1 else numbers[0]
    return all(0 <= value <= PROGRESS_MAX_COUNT for value in numbers) and total > 0


def progress_label(unit, done, total):
    """'epoch 61/100', 'step 30500/50000': what is done, whole units (61 while 61 <= done < 62,
    so that it agrees with the percentage beside it)."""
    return "%s %d/%d" % (unit, int(done + 1e-9 * max(1.0, total)), total)


def progress_eta(fraction, rate):
    """Seconds to the end at rate (fraction per second): 0 once done, None without progress."""
    if fraction >= 1.0:
        return 0.0
    return (1.0 - fraction) / rate if rate else None


def progress_point(snapshot, seconds):
    """What the progress will be `seconds` later at the snapshot's rate: (fraction, label),
    e.g. (0.61, "epoch 61/100")."""
    fraction = snapshot["fraction"]
    if snapshot["rate"]:
        fraction = min(1.0, fraction + snapshot["rate"] * max(0.0, seconds))
    return fraction, progress_label(snapshot["unit"], fraction * snapshot["total"], snapshot["total"])


class ProgressTracker(object):
    """The run's progress fraction and rate, from the last lines of its log, looked at now and
    then; snapshot() is cheap and the memory bounded: at most `points` (time, fraction) points
    (4 at least), thinned evenly as the run grows, and a few readings.

    Which measure is the run's, first that applies: a run-level count (global_step,
    Iter(train)); epochs, (epochs done + the epoch's inner fraction) / N, once N and the epochs
    done are known; a standalone step or iter count; a tqdm bar. An epoch line or bar is the
    outer measure; the inner one is the latest bar or count within the epoch printed after it
    (an epoch's bar, Keras's step bar, a batch or step count beside an epoch, and any other bar
    or count while epochs are known). `Epoch 3/100` as printed starts epoch 3 (2 done) unless
    the same line has metrics (an end-of-epoch summary, 3 done) or the log once showed
    `epoch 0/N` (0-based). Lightning's tqdm bar `Epoch 5:` (0-based, 5 done) and mmengine's
    `Epoch(train) [10]` (1-based) carry their own epoch but not N: the run's fraction stays
    unknown until N comes from an `epoch i/N` line or a config line (`max_epochs=12`).

    Among bars with the same description, a shorter total is an evaluation or a sub-loop (the
    HF Trainer's eval bar beside its max_steps bar) and is left out. The fraction does not go
    back while the run-level count does not (an inner bar restarting before its epoch line);
    when that count goes back, or the measure changes (a new run, a resumed one, a second
    phase), the rate history starts again. Lines are read whole at each look, so lines seen
    before read the same again."""

    def __init__(self, clock=time.monotonic, points=256, min_window=PROGRESS_WINDOW_MIN):
        self.clock = clock
        self.capacity = max(4, int(points))
        self.min_window = min_window
        self.window = []          # the lines of the last look
        self.looked_at = None     # when
        self.epochs = None        # (epochs done, epoch total) of the last epoch line or epoch bar
        self.epoch_total = None   # epochs from a config line
        self.zero_based = False   # an `epoch 0/N` line was seen: epoch lines count from 0
        self.inner = None         # (fraction of the epoch, epochs done or None, total) since its epoch line
        self.bar = None           # (count, total, "it", description) of the last bar taken
        self.bar_totals = collections.OrderedDict()  # description -> largest total seen
        self.steps = None         # (count, total, unit) of the last standalone step count
        self.run = None           # (count, total, unit) of the last run-level count
        self.current = None       # (key, count, fraction, done, unit, total) of the run's measure
        self.points = []          # (time, fraction) since the measure started, thinned
        self.spacing = 0.0        # seconds kept between points

    def feed(self, lines, now=None):
        """Look at cleaned log lines (oldest first)."""
        now = self.clock() if now is None else now
        lines = list(lines)
        self.looked_at = now
        if lines == self.window:
            return
        self.window = lines
        for index, line in enumerate(lines):
            cut = index == len(lines) - 1 and not self.may_end(line)
            for reading in parse_progress_totals(line, cut):
                if progress_reading_sane(reading):
                    getattr(self, "take_" + reading[0])(*reading[1:])
        self.record(now)

    def may_end(self, line):
        """Whether the newest line, which the training may still be writing (a flush in the
        middle of `Epoch 3/100`), can be read whole: it does not end in a number, or the number
        is a total already known (or none is known yet)."""
        ending = re.search(r"(\d+)$", line.rstrip())
        totals = [taken[1] for taken in (self.epochs, self.steps, self.run, self.bar) if taken]
        totals += [self.epoch_total, self.inner and self.inner[2]]
        return not ending or not any(totals) or float(ending.group(1)) in totals

    def take_epoch_line(self, epoch, total, summary):
        if epoch == 0:
            self.zero_based = True
        done = epoch - (0 if self.zero_based else 1) + (1 if summary else 0)
        self.take_epochs(max(0.0, done), total)

    def take_epochs(self, done, total):
        epochs = (min(done, total), total)
        if epochs != self.epochs:
            self.inner = None    # a new epoch: what came before was the last one's
        self.epochs = epochs

    def take_epoch_total(self, total):
        self.epoch_total = total

    def take_inner(self, count, total, done=None):
        self.inner = (progress_fraction(count, total), done, total)

    def take_bar(self, count, total, description):
        largest = self.bar_totals.pop(description, 0.0)
        self.bar_totals[description] = max(largest, total)
        if len(self.bar_totals) > PROGRESS_BAR_KEYS:
            self.bar_totals.popitem(last=False)
        if total >= largest:
            self.bar = (count, total, "it", description)
            self.take_inner(count, total)

    def take_steps(self, count, total, unit):
        self.steps = (count, total, unit)
        self.take_inner(count, total)

    def take_run(self, count, total, unit):
        self.run = (count, total, unit)

    def measure(self):
        """The run's measure now: (key, count, fraction, done, unit, total), or None."""
        epochs = self.epoch_measure()
        if epochs and not self.run:
            return epochs
        for name, taken in (("run", self.run), ("steps", self.steps), ("bar", self.bar)):
            if taken:
                count, total, unit = taken[:3]
                fraction = progress_fraction(count, total)
                return ((name,) + taken[1:], count, fraction, min(count, total), unit, total)
        return None

    def epoch_measure(self):
        """The epochs' measure, or None until the epoch total and the epochs done are known."""
        total = self.epochs[1] if self.epochs else self.epoch_total
        inner_fraction, inner_done = self.inner[:2] if self.inner else (0.0, None)
        done = inner_done if inner_done is not None else (self.epochs[0] if self.epochs else None)
        if total is None or done is None:
            return None
        done = min(done, total)
        fraction = min(1.0, (done + inner_fraction) / total)
        return (("epoch", total), done, fraction, fraction * total, "epoch", total)

    def record(self, now):
        """Keep the measure; a point in the history when it moved on, a new history when its
        run-level count went back or it is another measure."""
        measure = self.measure()
        if measure is None:
            return
        key, count, fraction = measure[:3]
        current = self.current
        if current is None or key != current[0] or count < current[1]:
            self.points, self.spacing = [(now, fraction)], 0.0
        elif fraction > current[2]:
            self.add_point(now, fraction)
        else:
            measure = measure[:2] + current[2:4] + measure[4:]   # held: see the class docstring
        self.current = measure

    def add_point(self, now, fraction):
        """Append (now, fraction); the newest point stands in for all since the one before it
        until `spacing` has passed."""
        last_time = self.points[-1][0]
        if now <= last_time or (len(self.points) > 1 and now - self.points[-2][0] < self.spacing):
            self.points[-1] = (max(now, last_time), fraction)
            return
        self.points.append((now, fraction))
        if len(self.points) > self.capacity:
            self.thin()

    def thin(self):
        """Drop every other point (never the newest); later points come as far apart as those kept."""
        kept = self.points[::2]
        if kept[-1] is not self.points[-1]:
            kept.append(self.points[-1])
        self.points = kept
        self.spacing = (kept[-1][0] - kept[0][0]) / (len(kept) - 1)

    def rate(self, now):
        """(fraction per second, seconds it rests on) up to now, or (None, 0.0) before any history.

        The window is the most recent half of the history, but at least min_window seconds (ten
        minutes) when there is that much: half, so that a slow start (loading, compilation,
        warm-up) drops out as the run goes on while the rate still rests on a long stretch, and a
        slowdown shows within about as long as the run had gone before it; ten minutes at least,
        so that it spans a whole cycle of training and evaluation pauses rather than the burst
        between two pauses. It ends at now, not at the last progress, so that a stall lowers the
        rate; but at the last look if that is at most PROGRESS_LOOK_GRACE old (what came after
        it is not known yet, and not a stall)."""
        if not self.points:
            return None, 0.0
        end = max(self.looked_at, now - PROGRESS_LOOK_GRACE, self.points[-1][0])
        history = end - self.points[0][0]
        if history <= 0:
            return None, 0.0
        window = min(history, max(history / 2.0, self.min_window))
        gained = self.current[2] - self.fraction_at(end - window)
        return max(0.0, gained) / window, window

    def fraction_at(self, moment):
        """The fraction at a moment of the history, interpolated between the points around it."""
        points = self.points
        index = len(points) - 1
        while index > 0 and points[index][0] > moment:
            index -= 1
        (time_before, before) = points[index]
        if index == len(points) - 1 or moment <= time_before:
            return before
        time_after, after = points[index + 1]
        return before + (after - before) * (moment - time_before) / (time_after - time_before)

    def snapshot(self, now=None):
        """None, or a dict: fraction (0..1), done (float, in the unit), total (int), unit ("epoch",
        "step", "iter", or "it" for a bare tqdm bar), label ("epoch 61/100"), rate (fraction per
        second, or None while unknown), eta (seconds to the end at that rate, or None), observed
        (seconds of progress history the rate rests on)."""
        if self.current is None:
            return None
        now = self.clock() if now is None else now
        fraction, done, unit, total = self.current[2:]
        rate, observed = self.rate(now)
        return {"fraction": fraction, "done": done, "total": int(total), "unit": unit,
                "label": progress_label(unit, done, total), "rate": rate,
                "eta": progress_eta(fraction, rate), "observed": observed}


def new_lines(before, now):
    """The lines of a look that the look before did not show: after the longest run of its last
    lines that the new look starts with."""
    for overlap in range(min(len(before), len(now)), 0, -1):
        if now[:overlap] == before[-overlap:]:
            return now[overlap:]
    return now


class MetricSampler(object):
    """A bounded, evenly thinned sample of one metric over a whole run, plus the last progress.

    It looks at the output at most once per SAMPLE_INTERVAL, so its cost does not grow with
    the output rate."""

    def __init__(self, name, clock=time.monotonic, checkpoint=None, wall=time.time,
                 forecast_after=PROGRESS_WINDOW_MIN):
        self.name = name
        self.pattern = re.compile(metric_regex(name).pattern.encode("ascii"))
        self.values = []
        self.stride = 1
        self.seen = 0
        self.progress = None
        self.clock = clock
        self.next_look = 0.0
        self.pending = b""
        self.provisional = False
        self.progress_lines = {}
        self.lock = threading.Lock()  # the relay looks while the wrapper may settle at the end
        self.tracker = ProgressTracker(clock, min_window=forecast_after)
        self.wall = wall
        self.checkpoint = None        # the last checkpoint the output named: name, line, at, progress
        # the user's pattern first: where it names the checkpoint, it knows best
        self.checkpoint_patterns = [re.compile(pattern) for pattern in ([checkpoint] if checkpoint else [])
                                    + list(CHECKPOINT_PATTERNS)]
        self.looked_lines = []        # the lines of the last look: only lines after them are new

    def feed(self, chunk):
        now = self.clock()
        if now < self.next_look:
            self.pending = chunk  # a reference, not a copy: the relay's hot path stays cheap
            return
        self.next_look = now + SAMPLE_INTERVAL
        self.pending = b""
        # until a first value is seen, the whole chunk: the trend starts at the run's first value
        self.look(chunk if not self.seen else chunk[-65536:])

    def settle(self, lines):
        """At the run's end: the last value and progress from the log's tail (cleaned lines), which
        the once-a-second looks may have missed (a burst of output, then evaluation lines)."""
        value = last_metric_value(lines, self.name)
        progress = parse_progress(lines)
        with self.lock:
            if value is not None and not (self.values and same_number(self.values[-1], value)):
                self.add(value)
            self.progress = progress or self.progress

    def flush(self):
        """Look at the output that came after the last look (the run's end: a final nan)."""
        if self.pending:
            self.look(self.pending[-65536:])
            self.pending = b""

    def look(self, window):
        window = bytes(window)  # the relay passes views of a buffer it reuses
        with self.lock:
            self.look_locked(window)

    def look_locked(self, window):
        matches = self.pattern.findall(window)
        if matches and not self.seen and len(matches) > 1:
            self.add(float(matches[0].decode("ascii")))
        if matches:
            self.add(float(matches[-1].decode("ascii")))
        lines = clean_log_text(window[-8192:].decode("utf-8", errors="replace"))[-20:]
        for line in lines:
            for kind, pattern in PROGRESS_PATTERNS:
                if re.search(pattern, strip_rank(line)):
                    self.progress_lines.pop(kind, None)
                    self.progress_lines[kind] = line
        progress = parse_progress(list(self.progress_lines.values()))
        if progress:
            self.progress = progress
        self.tracker.feed(lines, self.clock())
        shown = [line for line in lines if line]
        fresh = new_lines(self.looked_lines, shown)
        for index in range(len(shown) - len(fresh), len(shown)):
            if "heckpoint" not in shown[index]:   # those the relay hands over from every chunk
                self.saw_checkpoint(shown[index], self.checkpoint_patterns, parse_progress(shown[:index]))
        self.looked_lines = shown

    def forecast(self):
        """The progress tracker's snapshot (progress, rate, ETA) for the heartbeat."""
        with self.lock:
            return self.tracker.snapshot()

    def find_checkpoint(self, data, before=b""):
        """A chunk that may name a checkpoint (it holds a hint): the last one it names, with the
        progress the output showed before it (before: the output that came before the chunk)."""
        with self.lock:
            lines = clean_log_text(data.decode("utf-8", errors="replace"))
            earlier = clean_log_text(before.decode("utf-8", errors="replace"))[-20:] if before else []
            for index, line in enumerate(lines):
                if "heckpoint" in line:
                    context = (earlier + lines[:index])[-20:]
                    self.saw_checkpoint(line, self.checkpoint_patterns, parse_progress(context))

    def saw_checkpoint(self, line, patterns, progress=None):
        for pattern in patterns:
            match = pattern.search(strip_rank(line))
            if match:
                name = (match.group(1) if match.groups() and match.group(1) else match.group(0)).strip(" '\".:")
                snapshot = self.tracker.snapshot()
                self.checkpoint = {"name": one_line(name or line, LINE_MAX_CHARS), "at": self.wall(),
                                   "line": one_line(mask_secrets(line.strip()), LINE_MAX_CHARS),
                                   "progress": progress or (snapshot["label"] if snapshot else self.progress)}
                return

    def add(self, value):
        self.seen += 1
        if self.provisional:
            self.values.pop()
            self.provisional = False
        self.values.append(value)
        if (self.seen - 1) % self.stride:
            self.provisional = True
            return
        if len(self.values) >= METRIC_POINTS:
            self.values = self.values[::2]
            self.stride *= 2


def last_metric_value(lines, name):
    """The last value of a metric in cleaned log lines, or None."""
    pattern = metric_regex(name)
    for line in reversed(lines):
        matches = pattern.findall(line)
        if matches:
            return float(matches[-1])
    return None


def same_number(a, b):
    return a == b or (a != a and b != b)


def settled_values(values, lines, name):
    """A sampled series ending with the last value the log shows (a report of a run that ended
    between two heartbeats, or of a record from a wrap that missed it)."""
    last = last_metric_value(lines, name)
    if last is None or (values and same_number(values[-1], last)):
        return values
    return list(values) + [last]


def last_line_of(chunk):
    """The last non-empty cleaned line of a chunk of raw log bytes."""
    lines = [line for line in clean_log_text(chunk[-4096:].decode("utf-8", errors="replace")) if line]
    return lines[-1] if lines else ""


def fit_text(header, tail, limit, unit, messages):
    """Header and as many of the last tail lines as fit in limit characters (or UTF-8 bytes)."""
    def size(text):
        return len(text.encode("utf-8")) if unit == "bytes" else len(text)

    head = "\n".join(header)
    if size(head) > limit:
        return cut_to_size(head, limit, unit)
    text = "\n".join(header + [""] + list(tail))
    if size(text) <= limit:
        return text
    lines = list(tail[1:])
    kept = list(lines)
    while True:
        marker = messages["tail_cut"].format(n=len(lines) - len(kept))
        text = "\n".join(header + ["", marker] + kept)
        if size(text) <= limit or not kept:
            return text if size(text) <= limit else head
        kept.pop(0)


def cut_to_size(text, limit, unit):
    if unit == "bytes":
        return text.encode("utf-8")[:max(0, limit - 3)].decode("utf-8", errors="ignore") + "…"
    return text[:max(0, limit - 1)] + "…"


# --- config: load, merge (flag > HPCRUN_* env > keys file > config file > default), validate ---

class Config(object):
    """Merged settings, checked, where they came from, and every secret value to keep out of
    output. ConfigError when a setting is wrong."""

    def __init__(self, path, keys_path, sections, origins, warnings):
        self.path = path
        self.keys_path = keys_path
        self.sections = sections
        self.origins = origins      # (section, key) -> where its value came from
        self.warnings = warnings
        check_config(self)
        self.secrets = collect_secrets(self)

    def get(self, section, key):
        return self.sections.get(section, {}).get(key, (section_defaults(section) or {}).get(key))

    def where(self, section=None, key=None):
        origin = self.origins.get((section, key))
        if origin:
            return origin
        return "config '%s'" % self.path if self.path else "settings"


def find_config_path(flag, env, script_dir):
    if flag:
        return flag
    if env.get("HPCRUN_CONFIG"):
        return env["HPCRUN_CONFIG"]
    home = env.get("HOME") or os.path.expanduser("~")
    for candidate in (os.path.join(home, ".config", "hpcrun", "config.ini"),
                      os.path.join(script_dir, "config.ini")):
        if os.path.isfile(candidate):
            return candidate
    return None


def read_ini(path, what):
    import configparser
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    try:
        with open(path, encoding="utf-8") as stream:
            parser.read_file(stream)
    except OSError as error:
        raise ConfigError("cannot read %s '%s': %s" % (what, path, error.strerror or error))
    except (configparser.Error, UnicodeDecodeError) as error:
        first = str(error).strip().splitlines()[0]
        raise ConfigError("cannot parse %s '%s': %s" % (what, path, first))
    return {name: dict(parser.items(name)) for name in parser.sections()}


def channel_type(section):
    return section.split(":", 1)[0]


def env_key(section, key):
    return "HPCRUN_%s_%s" % (re.sub(r"[^A-Za-z0-9]", "_", section).upper(), key.upper())


def load_config(flag_path=None, overrides=None, env=None, script_dir=None):
    """Read and merge every layer of settings; overrides are the command-line flags."""
    env = os.environ if env is None else env
    script_dir = script_dir or os.path.dirname(os.path.abspath(__file__))
    path = find_config_path(flag_path, env, script_dir)
    file_sections = read_ini(path, "config") if path else {}
    keys_path, key_sections, warnings = read_keys_file(path, file_sections, env)
    names = set(DEFAULTS) | set(CHANNELS) | set(file_sections) | set(key_sections)
    names |= set(parse_list(env.get(env_key("notify", "channels"))
                            or file_sections.get("notify", {}).get("channels")))
    sections, origins = {}, {}
    for name in names:
        merged = dict(section_defaults(name) or {})
        layers = ((file_sections.get(name, {}), lambda key: "config '%s'" % path),
                  (key_sections.get(name, {}), lambda key: "keys file '%s'" % keys_path),
                  (env_layer(env, name), lambda key: "environment %s" % env_key(name, key)),
                  ((overrides or {}).get(name, {}), lambda key: "option --%s" % key.replace("_", "-")))
        for values, origin in layers:
            merged.update(values)
            origins.update(((name, key), origin(key)) for key in values)
        sections[name] = merged
    return Config(path, keys_path, sections, origins, warnings)


def env_layer(env, section):
    layer = {}
    for key in set(section_defaults(section) or {}) | set(SECRET_KEYS):
        legacy = LEGACY_ENV.get((section, key))
        if legacy and env.get(legacy):
            layer[key] = env[legacy]
        if env.get(env_key(section, key)):
            layer[key] = env[env_key(section, key)]
    return layer


def read_keys_file(config_path, file_sections, env):
    """The secrets file: explicit keys_file must exist; the default one beside the config may not."""
    explicit = explicit_keys_file(file_sections, env)
    keys_path = keys_file_path(config_path, file_sections, env)
    if not explicit and not os.path.exists(keys_path):
        return None, {}, []
    sections = read_ini(keys_path, "keys file")
    warnings = []
    if os.stat(keys_path).st_mode & 0o077:
        warnings.append("keys file '%s' is readable by group or others: chmod 600 '%s'"
                        % (keys_path, keys_path))
    return keys_path, sections, warnings


def explicit_keys_file(file_sections, env):
    explicit = env.get(env_key("notify", "keys_file")) or file_sections.get("notify", {}).get("keys_file")
    return None if explicit == DEFAULTS["notify"]["keys_file"] else explicit  # the default spelt out


def keys_file_path(config_path, file_sections, env):
    """The keys file: [notify] keys_file relative to the config's directory (default
    api_keys.ini beside it, or in ~/.config/hpcrun without a config)."""
    home = env.get("HOME") or os.path.expanduser("~")
    base = os.path.dirname(os.path.abspath(config_path)) if config_path else \
        os.path.join(home, ".config", "hpcrun")
    explicit = explicit_keys_file(file_sections, env)
    return os.path.join(base, os.path.expanduser(explicit or DEFAULTS["notify"]["keys_file"]))


def check_config(config):
    """Numbers are numbers, the language is known, unknown keys get a warning."""
    for name, values in sorted(config.sections.items()):
        defaults = section_defaults(name)
        if defaults is None:
            continue
        for key, value in sorted(values.items()):
            default = defaults.get(key)
            if key not in defaults and key not in SECRET_KEYS:
                config.warnings.append("%s: unknown key [%s] %s" % (config.where(name, key), name, key))
            elif isinstance(default, bool) and not isinstance(value, bool):
                values[key] = parse_bool(value, config, name, key)
            elif isinstance(default, (int, float)) and not isinstance(value, (int, float)):
                values[key] = parse_number(value, type(default), config, name, key)
    for name, values in sorted(config.sections.items()):
        if channel_type(name) in CHANNELS and name not in DEFAULTS:
            CHANNELS[channel_type(name)].check(config, name, values)
    parse_events(config)
    check_templates(config)
    if config.get("notify", "arrays") not in ARRAY_MODES:
        raise ConfigError("%s: [notify] arrays: '%s' is not one of %s" % (
            config.where("notify", "arrays"), config.get("notify", "arrays"), ", ".join(ARRAY_MODES)))
    if config.get("gpu", "enabled") not in ("auto", "no"):
        raise ConfigError("%s: [gpu] enabled: '%s' is not auto or no" % (config.where("gpu", "enabled"),
                                                                         config.get("gpu", "enabled")))
    if config.get("gpu", "sample_interval") < 1:
        raise ConfigError("%s: [gpu] sample_interval: %s is not a whole number of seconds >= 1"
                          % (config.where("gpu", "sample_interval"), config.get("gpu", "sample_interval")))
    if config.get("notify", "array_fail_fast") > 1:
        raise ConfigError("%s: [notify] array_fail_fast: %g is not a share from 0 to 1" % (
            config.where("notify", "array_fail_fast"), config.get("notify", "array_fail_fast")))
    if config.get("report", "include_last_n_lines") > CLASSIFY_LINES:
        raise ConfigError("%s: [report] include_last_n_lines: %d is more than the %d log lines a "
                          "report reads" % (config.where("report", "include_last_n_lines"),
                                            config.get("report", "include_last_n_lines"), CLASSIFY_LINES))
    if not re.match(r"^[A-Za-z_][\w./-]*$", str(config.get("report", "metric"))):
        raise ConfigError("%s: [report] metric: '%s' is not a metric name"
                          % (config.where("report", "metric"), config.get("report", "metric")))
    check_pattern(config, "report", "checkpoint")
    language = config.get("notify", "language")
    if language not in LANGUAGES:
        raise ConfigError("%s: [notify] language: '%s' is not one of %s"
                          % (config.where("notify", "language"), language, ", ".join(LANGUAGES)))


def check_pattern(config, section, key):
    """A regular expression setting: it must compile (what it matches is the user's business)."""
    pattern = str(config.get(section, key) or "")
    try:
        re.compile(pattern)
    except (re.error, OverflowError, RecursionError) as error:
        raise ConfigError("%s: [%s] %s: not a regular expression: %s" % (
            config.where(section, key), section, key, error))


def parse_bool(value, config, section, key):
    text = str(value).strip().lower()
    if text in ("1", "yes", "true", "on"):
        return True
    if text in ("0", "no", "false", "off", ""):
        return False
    raise ConfigError("%s: [%s] %s: '%s' is not yes or no" % (config.where(section, key), section, key, value))


def parse_events(config):
    events = parse_list(config.get("notify", "events"))
    unknown = [event for event in events if event not in EVENTS]
    if unknown:
        raise ConfigError("%s: [notify] events: unknown event '%s' (known: %s)"
                          % (config.where("notify", "events"), unknown[0], ", ".join(EVENTS)))
    return set(events)


def check_templates(config):
    """A [report] template may use only the named fields: a typo is a config error, not a crash."""
    for key in ("title_template", "header_template"):
        template = config.get("report", key)
        if not template:
            continue
        try:
            template.format(**dict.fromkeys(TEMPLATE_FIELDS, ""))
        except KeyError as error:
            raise ConfigError("%s: [report] %s: unknown field {%s} (known: %s)" % (
                config.where("report", key), key, error.args[0], ", ".join(TEMPLATE_FIELDS)))
        except (ValueError, IndexError) as error:
            raise ConfigError("%s: [report] %s: %s" % (config.where("report", key), key, error))


def parse_number(value, kind, config, section, key):
    try:
        number = kind(str(value).strip())
    except ValueError:
        raise ConfigError("%s: [%s] %s: '%s' is not a number"
                          % (config.where(section, key), section, key, value))
    if number < 0:
        raise ConfigError("%s: [%s] %s: '%s' must not be negative"
                          % (config.where(section, key), section, key, value))
    return number


def collect_secrets(config):
    """Every secret value of every section, with its URL-quoted forms, to keep out of output."""
    secrets = set()
    for name, values in config.sections.items():
        for key, value in values.items():
            if is_secret_setting(name, key) and isinstance(value, str):
                secrets |= secret_forms(value.strip())
                secrets |= secret_header_values(key, value)
                secrets |= secret_url_parts(value)
    return secrets


def secret_url_parts(value):
    """The parts of a secret URL that carry its token (Slack's /services/T../B../XXXX, Discord's
    /api/webhooks/ID/TOKEN, a key in the query): an error page that repeats the path alone
    must not show them."""
    from urllib.parse import parse_qsl, urlsplit
    try:
        parts = urlsplit(value.strip())
    except ValueError:
        return set()
    if not parts.scheme or not parts.netloc:
        return set()
    segments = [segment for segment in parts.path.split("/") if segment]
    tokens = [index for index, segment in enumerate(segments) if looks_like_token(segment)]
    secrets = set()
    if tokens:
        secrets |= secret_forms(parts.path) | secret_forms("/".join(segments[tokens[0]:]))
        for index in tokens:
            secrets |= secret_forms(segments[index])
    for _, item in parse_qsl(parts.query):
        if looks_like_token(item):
            secrets |= secret_forms(item)
    return secrets


def looks_like_token(text):
    """A path segment or query value that may be a credential rather than a word of the API."""
    if "{" in text:
        return False  # a template placeholder such as {token}
    return len(text) >= 16 or (len(text) >= 6 and bool(re.search(r"\d", text)) and
                               bool(re.search(r"[A-Za-z]", text)))


def secret_header_values(key, value):
    """The values of a webhook's credential headers (Authorization, X-Api-Key, ...), bare too."""
    if key != "headers":
        return set()
    secrets = set()
    for name, header in parse_headers(value, strict=False).items():
        if re.search(SECRET_HEADER_RE, name):
            secrets |= secret_forms(header) | secret_forms(header.split(None, 1)[-1])
    return secrets


def is_secret_setting(section, key):
    channel = CHANNELS.get(channel_type(section))
    return key in SECRET_KEYS or bool(channel and key in channel.secret)


def parse_headers(text, strict=True):
    """HTTP headers from a JSON object or from `Name: value` lines; {} for nothing.

    strict: raise ValueError on anything else (the sender); otherwise keep what parses."""
    text = str(text or "").strip()
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except ValueError:
            if strict:
                raise
            return {}
        if not isinstance(value, dict):
            raise ValueError("not a JSON object")
        return {str(name): str(item) for name, item in value.items()}
    headers = {}
    for line in text.splitlines():
        name, colon, value = line.partition(":")
        if line.strip() and (not colon or not name.strip()):
            if strict:
                raise ValueError("'%s' is not 'Name: value'" % line.strip()[:40])
            continue
        if colon:
            headers[name.strip()] = value.strip()
    return headers


def parse_list(text):
    return [item.strip() for item in str(text or "").replace(";", ",").split(",") if item.strip()]


def key_place(config, section, key):
    """Where a missing setting belongs, naming the keys file that was looked for."""
    if not is_secret_setting(section, key):
        return "the config '%s'" % config.path if config.path else "a config file"
    path = config.keys_path or keys_file_path(config.path, {"notify": config.sections.get("notify", {})},
                                              os.environ)
    return "the keys file '%s' (%s)" % (path, "found, no such key" if os.path.exists(path) else "not found")


def pushes_to_phone(config, channels):
    """Whether any report would leave this machine: a channel other than the console."""
    return any(kind != "console" for _, kind, _ in channels)


def resolve_channels(config):
    """The channel sections to push through, each checked: [(section, type, settings)]."""
    names = parse_list(config.get("notify", "channels"))
    if not names:
        names = ["xxtui"] if config.get("xxtui", "api_key") else ["console"]
    for name in names:
        if channel_type(name) not in CHANNELS:
            raise ConfigError("%s: [notify] channels: unknown channel '%s' (known: %s)"
                              % (config.where("notify", "channels"), name, ", ".join(CHANNELS)))
    channels = []
    for name in names:
        kind = channel_type(name)
        settings = dict(config.sections.get(name) or CHANNELS[kind].defaults())
        for key in CHANNELS[kind].required:
            settings[key] = str(settings.get(key) or "").strip()
            if not settings[key]:
                raise ConfigError("%s: [%s] %s is not set (put it in %s or %s)"
                                  % (config.where(), name, key, key_place(config, name, key), env_key(name, key)))
        channels.append((name, kind, settings))
    return channels


# --- records: the files wrap and monitor exchange ---

def state_dir(work_dir, sub):
    return os.path.join(work_dir, STATE_DIR, sub)


def make_state_dirs(work_dir):
    """DIR/.hpcrun and its subdirectories, as real directories: a symlink someone planted in
    the place of one is replaced, never written through."""
    for path in [os.path.join(work_dir, STATE_DIR)] + [state_dir(work_dir, sub) for sub in STATE_SUBDIRS]:
        if os.path.islink(path):
            print_warning("'%s' was a symbolic link: replaced by a directory" % path)
            os.unlink(path)
        os.makedirs(path, exist_ok=True)


def json_bytes(data):
    return json.dumps(data, ensure_ascii=True, indent=1, sort_keys=True).encode("ascii") + b"\n"


def write_json_atomic(path, data, dir_fd=None):
    """Temporary file in the same directory, flush, fsync, rename: readers see all or nothing.
    With dir_fd, path is a name in that directory. A failed write leaves no temporary file."""
    directory = os.path.dirname(path)
    temp = os.path.join(directory, ".tmp-%s-%d-%s" % (os.path.basename(path), os.getpid(),
                                                      os.urandom(3).hex()))
    payload = json_bytes(data)
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=dir_fd)
    try:
        try:
            write_all(fd, payload)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        remove_quietly(temp, dir_fd)
        raise
    fsync_dir(directory, dir_fd)


def fsync_dir(directory, dir_fd=None):
    if dir_fd is not None:
        try:
            os.fsync(dir_fd)
        except OSError:
            pass
        return
    try:
        fd = os.open(directory or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_all(fd, data):
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def remove_quietly(path, dir_fd=None):
    try:
        os.unlink(path, dir_fd=dir_fd)
    except OSError:
        pass


def read_json_file(path, max_bytes=1 << 20):
    """A JSON object from a regular file; symlinks, huge files and bad JSON are HpcrunErrors."""
    return read_json_owned(path, max_bytes)[0]


def read_json_owned(path, max_bytes=1 << 20, dir_fd=None, shown=None):
    """(JSON object, uid of the file's owner) of a record: never follows a symlink, never
    blocks on a FIFO, never recurses without bound. shown: the path to name in errors."""
    shown = shown or path
    try:
        stream = open_regular_file(path, follow=False, dir_fd=dir_fd)
    except UnsafeFile as error:
        raise HpcrunError("record '%s' is %s: not read" % (shown, error))
    except OSError as error:
        raise HpcrunError("cannot read record '%s': %s" % (shown, error.strerror))
    path = shown
    with stream:
        owner = os.fstat(stream.fileno()).st_uid
        data = stream.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise HpcrunError("record '%s' is larger than %d bytes" % (path, max_bytes))
    if not data.strip():
        raise HpcrunError("record '%s' is empty" % path)
    try:
        value = json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise HpcrunError("record '%s' is not valid JSON: %s" % (path, str(error).splitlines()[0][:200]))
    except RecursionError:
        raise HpcrunError("record '%s' is not valid JSON: nested too deeply" % path)
    if not isinstance(value, dict):
        raise HpcrunError("record '%s' is not a JSON object" % path)
    return value, owner


# The fields a record may hold, by kind. Everything read from the shared file system is checked
# field by field before use: text (str), int, number (finite int or float), bool, texts (list
# of str), values (list of numbers; nan and inf allowed: a diverging loss), or a nested table.
NUMBER_MAX = 1e15             # the largest number a record may hold (seconds, bytes)
# An array digest's facts (status array_done, array_failing): counts, ranges, durations.
ARRAY_FIELDS = {
    "key": "text", "scheduler": "text", "id": "text", "name": "text", "size": "index",
    "reported": "index", "ok": "index", "failed": "index", "lost": "index", "never_started": "index",
    "causes": "rows", "unfinished": "text", "lost_tasks": "text", "resubmit": "texts", "cancel": "text",
    "timed_out": "bool",
    "median": "number", "fastest": "number", "fastest_task": "text", "slowest": "number",
    "slowest_task": "text", "total": "number", "first_task": "text", "first_label": "text",
    "first_line": "text", "gpu_hours": "number", "cpu_hours": "number",
}
GPU_FIELDS = {
    "index": "int", "uuid": "text", "name": "text", "samples": "int", "util_mean": "number", "util_max": "number",
    "util_last": "number", "mem_max": "number", "mem_total": "number", "power_mean": "number",
    "power_last": "number", "power_limit": "number", "idle_for": "number", "idle_since": "number",
    "busy_for": "number",
}
JOB_FIELDS = {
    "scheduler": "text", "id": "id", "name": "text", "array_id": "id", "array_index": "index",
    "array_first": "index", "array_last": "index", "array_step": "index", "array_count": "index",
    "partition": "text", "nodes": "text", "restart_count": "id", "end_time": "number",
    "time_limit": "number", "output_file": "text", "outlives": "bool", "release": "text",
    "cpus": "index", "gpus": "index", "script": "text", "variant": "text", "binary": "bool",
}
RECORD_FIELDS = {
    "run_id": "text", "name": "text", "command": "text", "work_dir": "text", "host": "text",
    "status": "text", "signal": "text", "cause": "text", "log_file": "text", "timestamp": "text",
    "started": "text", "log_error": "text", "start_error": "text", "hpcrun_version": "text", "last_line": "text",
    "progress": "text", "note": "text", "base_run_id": "text", "scheduler_state": "text",
    "release": "text", "exit_code": "int", "pid": "int", "schema": "int", "seq": "int",
    "child_returncode": "int", "log_size": "int", "author_uid": "int", "start_time": "number",
    "end_time": "number", "duration": "number", "written_at": "number",
    "heartbeat_interval": "number", "grace": "number", "silence": "number", "remaining": "number",
    "since": "number", "last_heartbeat": "number", "peak_rss": "number", "wrapper_cpu": "number",
    "wrapper_cpu_while_running": "number", "final": "bool", "test": "bool", "legacy": "bool",
    "warnings": "texts", "job": JOB_FIELDS, "metric": {"name": "text", "values": "values"},
    "gpus": {"visible": "text", "names": "texts"}, "gpu_stats": {"interval": "index", "gpus": ("list", GPU_FIELDS)},
    "output_at": "number", "gpu_hours": "number", "cpu_hours": "number", "idle_for": "number",
    "checkpoint": {"name": "text", "line": "text", "at": "number", "progress": "text"},
    "checkpoint_file": {"path": "text", "mtime": "number"},
    "forecast": {"fraction": "number", "done": "number", "total": "number", "unit": "text", "label": "text",
                 "rate": "number", "eta": "number", "observed": "number"},
    "late": "number", "left": "number", "stops": "text", "needed_limit": "number", "forecast_round": "index",
    "gpus_idle": "int", "gpus_total": "int", "idle_threshold": "number",
    "group": {"name": "text", "size": "index"}, "array": ARRAY_FIELDS,
}
REMINDER_FIELDS = dict(RECORD_FIELDS, ended="number", next_check="number", sent="int",
                       unanswered="int")
DELIVERY_FIELDS = {"accepted": "texts", "failures": "int", "next_try": "number", "last_error": "text"}
WATCH_FIELDS = {"seq": "int", "size": "int", "seq_at": "number", "size_at": "number"}


def check_fields(data, fields, where):
    """data with every known field checked (HpcrunError naming the first wrong one) and its
    text made safe to encode (a lone surrogate from JSON would break UTF-8 output)."""
    checked = dict(data)
    for key, kind in fields.items():
        value = data.get(key)
        if value is None:
            continue
        if isinstance(kind, dict):
            if not isinstance(value, dict):
                raise HpcrunError("%s: field '%s' has the wrong type" % (where, key))
            checked[key] = check_fields(value, kind, "%s: field '%s'" % (where, key))
            continue
        if isinstance(kind, tuple):   # ("list", fields): a short list of tables
            if not (isinstance(value, list) and len(value) <= 64 and all(isinstance(item, dict) for item in value)):
                raise HpcrunError("%s: field '%s' has the wrong type" % (where, key))
            checked[key] = [check_fields(item, kind[1], "%s: field '%s'" % (where, key)) for item in value]
            continue
        checked[key] = check_value(value, kind)
        if checked[key] is None:
            raise HpcrunError("%s: field '%s' has the wrong type or is not finite" % (where, key))
    return checked


def check_value(value, kind):
    """The value if it is of the kind (text cleaned, ids as text), else None."""
    if kind == "text" or (kind == "id" and isinstance(value, str)):
        return clean_text(value) if isinstance(value, str) else None
    if kind == "id":
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else None
    if kind == "int":
        return value if isinstance(value, int) and not isinstance(value, bool) and abs(value) < 1 << 63 else None
    if kind == "index":  # a whole number; older records wrote array indices as text
        value = int(value) if isinstance(value, str) and re.match(r"^-?\d{1,18}$", value) else value
        return check_value(value, "int")
    if kind == "number":  # finite, and small enough for any arithmetic on times and sizes
        return value if is_number(value) and abs(value) <= NUMBER_MAX else None
    if kind == "bool":
        return value if isinstance(value, bool) else None
    if kind == "texts":
        ok = isinstance(value, list) and all(isinstance(item, str) for item in value)
        return [clean_text(item) for item in value] if ok else None
    if kind == "rows":  # [[text, text, text], ...]: a small table
        ok = isinstance(value, list) and all(isinstance(item, list) and len(item) == 3 and
                                             all(isinstance(part, str) for part in item) for item in value)
        return [[clean_text(part) for part in item] for item in value] if ok else None
    if kind == "values":
        return value if isinstance(value, list) and all(is_number(item) for item in value) else None
    return None


def clean_text(text):
    """Text that encodes as UTF-8 (lone surrogates, which JSON allows, become U+FFFD)."""
    return re.sub("[\ud800-\udfff]", "\ufffd", text)


def check_record(data, path, running=False):
    """A record with every field checked; a wrong one is an HpcrunError naming the field."""
    record = check_fields(data, RECORD_FIELDS, "record '%s'" % path)
    job = record.get("job")
    if job == {}:
        record["job"] = None
    elif job and not (job.get("scheduler") and job.get("id")):
        raise HpcrunError("record '%s': field 'job' has no scheduler or id" % path)
    if not running and record.get("status") not in STATUSES + EVENT_STATUSES:
        raise HpcrunError("record '%s': unknown status '%s'" % (path, one_line(record.get("status"), 40)))
    if (record.get("schema") or 1) > SCHEMA_VERSION:
        record["note"] = "record schema %s is newer than this hpcrun (%d)" % (record.get("schema"),
                                                                             SCHEMA_VERSION)
    return record


def legacy_to_record(data, work_dir, run_id):
    """A .train_complete.json of the original design, in either of its two forms."""
    record = {"run_id": run_id, "work_dir": work_dir, "schema": 0, "final": True,
              "name": os.path.basename(os.path.abspath(work_dir)), "legacy": True}
    exit_code = data.get("exit_code", data.get("return_code"))
    if check_value(exit_code, "number") is not None:
        record["exit_code"] = int(exit_code)
    status = data.get("status")
    if status not in STATUSES:
        status = "success" if record.get("exit_code") == 0 else "failed"
    record["status"] = status
    for key in ("log_file", "command"):
        if isinstance(data.get(key), str):
            record[key] = data[key]
    start = parse_epoch(data.get("start_time"))
    end = parse_epoch(data.get("end_time")) or parse_epoch(data.get("timestamp"))
    record.update(start_time=start, end_time=end)
    elapsed = data.get("elapsed_seconds")
    if check_value(elapsed, "number") is not None:
        record["duration"] = float(elapsed)
    elif start and end:
        record["duration"] = end - start
    return record


def parse_epoch(value):
    if is_number(value):
        return float(value)
    if isinstance(value, str):
        return parse_local_time(value.replace("T", " "))
    return None


def marker(run_id, status):
    """The name of a run's marker in running/ that says this status was reported."""
    return run_id + MARKER_OF_STATUS[status]


def valid_run_id(name):
    """Whether a name can be a run id: it becomes part of file names under .hpcrun/."""
    return bool(re.match(RUN_ID_RE, name)) and ".json" not in name


def stand_in_id(filename):
    """A valid run id for a record whose file name is not one (reported as unreadable)."""
    import zlib
    return "%s%08x" % (BAD_NAME_PREFIX, zlib.crc32(os.fsencode(filename)))


def open_directory(path, dir_fd=None, create=False, shown=None):
    """A descriptor of a real directory, never reached through a symlink; None when it does not
    exist (and create is false)."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0)
    shown = shown or path
    for attempt in (1, 2):
        try:
            return os.open(path, flags, dir_fd=dir_fd)
        except FileNotFoundError:
            if not create or attempt == 2:
                return None
            try:
                os.mkdir(path, 0o755, dir_fd=dir_fd)
            except FileExistsError:
                pass
        except OSError as error:
            if error.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            what = "a symbolic link" if os.path.islink(shown) else "not a directory"
            raise HpcrunError("'%s' is %s: refused (hpcrun never moves or deletes files through "
                              "one; remove it)" % (shown, what))


class StateDir(object):
    """A work dir's .hpcrun/ and its subdirectories, held open while a monitor works on them.

    Every name is resolved relative to these descriptors (openat), so a directory swapped for a
    symlink by someone else in the group cannot redirect a move, a write, a read or a delete;
    one that is a symlink already is refused with an error naming it."""

    def __init__(self, work_dir):
        self.work_dir = work_dir
        self.top = open_directory(os.path.join(work_dir, STATE_DIR))
        self.fds = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        for fd in [self.top] + list(self.fds.values()):
            if fd is not None:
                os.close(fd)
        self.top, self.fds = None, {}

    def path(self, sub, name=""):
        """The path of a name, for messages."""
        return os.path.join(self.work_dir, STATE_DIR, *[part for part in (sub, name) if part])

    def fd(self, sub, create=False):
        """The descriptor of a subdirectory (of .hpcrun/ itself for sub ""), or None."""
        if self.top is None:
            if not create:
                return None
            self.top = open_directory(os.path.join(self.work_dir, STATE_DIR), create=True)
        if not sub:
            return self.top
        if self.fds.get(sub) is None:
            self.fds[sub] = open_directory(sub, self.top, create, self.path(sub))
        return self.fds[sub]

    def names(self, sub):
        fd = self.fd(sub)
        return sorted(os.listdir(fd)) if fd is not None else []

    def existing_fd(self, sub):
        """The descriptor of a subdirectory that must exist: a name is never looked up relative
        to the current directory instead."""
        fd = self.fd(sub)
        if fd is None:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", self.path(sub))
        return fd

    def exists(self, sub, name):
        fd = self.fd(sub)
        try:
            return fd is not None and bool(os.stat(name, dir_fd=fd, follow_symlinks=False))
        except OSError:
            return False

    def read_json(self, sub, name):
        """(JSON object, owner uid) of a file here; HpcrunError for anything else."""
        fd = self.fd(sub)
        if fd is None:
            raise HpcrunError("cannot read record '%s': No such file or directory" % self.path(sub, name))
        return read_json_owned(name, dir_fd=fd, shown=self.path(sub, name))

    def write_json(self, sub, name, data):
        write_json_atomic(name, data, dir_fd=self.fd(sub, create=True))

    def create_marker(self, sub, name, data):
        """Create a marker once across monitors (O_EXCL); False when it already exists."""
        try:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=self.fd(sub, create=True))
        except FileExistsError:
            return False
        try:
            write_all(fd, json.dumps(data).encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def rename(self, sub, name, to_sub, to_name):
        """Move a file; sub None: name is a path outside .hpcrun/ (the legacy record)."""
        source_fd = self.existing_fd(sub) if sub is not None else None
        os.rename(name, to_name, src_dir_fd=source_fd, dst_dir_fd=self.fd(to_sub, create=True))

    def remove(self, sub, name):
        """Remove a file quietly; True when it was there."""
        try:
            os.unlink(name, dir_fd=self.existing_fd(sub))
        except OSError:
            return False
        return True

    def age(self, sub, name, now):
        """Seconds since a file last changed (its ctime), or 0."""
        try:
            return now - os.stat(name, dir_fd=self.existing_fd(sub), follow_symlinks=False).st_ctime
        except OSError:
            return 0

    def claim(self, sub, name, run_id, host, pid):
        """Rename a record into claimed/ under this monitor's name; None when another monitor won."""
        target = "%s.json.%s.%d" % (run_id, host, pid)
        try:
            self.rename(sub, name, "claimed", target)
        except OSError as error:
            if error.errno == errno.ENOENT and self.exists("claimed", target):
                return target  # NFS: a retransmitted rename that did succeed
            if error.errno in (errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY):
                return None
            shown = self.path(sub, name) if sub is not None else name
            raise HpcrunError("cannot claim record '%s': %s" % (shown, error.strerror))
        return target


def parse_claim_name(filename):
    """(run_id, host, pid) of claimed/<run_id>.json.<host>.<pid>, or None."""
    run_id, sep, owner = filename.partition(".json.")
    host, _, pid = owner.rpartition(".")
    if not sep or not host or not pid.isdigit():
        return None
    return run_id, host, int(pid)


def pid_alive(pid):
    """Whether a process runs (pid from a record: 0 and negatives would name process groups)."""
    if not 0 < pid < 1 << 31:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def list_dir(path):
    try:
        return sorted(os.listdir(path))
    except FileNotFoundError:
        return []


def hpcrun_home(env=None):
    """~/.hpcrun (HPCRUN_HOME): shared between compute and login nodes on clusters."""
    env = os.environ if env is None else env
    return env.get("HPCRUN_HOME") or os.path.join(env.get("HOME") or os.path.expanduser("~"), ".hpcrun")


def registry_entry(work_dir, env=None):
    """A fixed name per work dir. zlib, not hashlib: loading OpenSSL would cost the wrapper 4 MiB."""
    import zlib
    path = os.path.abspath(work_dir).encode("utf-8")
    digest = "%08x%08x" % (zlib.crc32(path), zlib.adler32(path))
    return os.path.join(hpcrun_home(env), "registry", digest + ".json")


def register_work_dir(work_dir, now, env=None):
    """Let an argument-free monitor find this work dir."""
    path = registry_entry(work_dir, env)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_json_atomic(path, {"work_dir": os.path.abspath(work_dir), "registered": now,
                             "host": host_name()})


def forget_work_dir(entry, registered):
    """Remove a registry entry read as registered at `registered`, unless a wrap has registered
    its dir again since: the entry is parked under a name of this process first, so a wrap's
    new entry is either the parked one (put back) or a new file (left alone)."""
    parked = os.path.join(os.path.dirname(entry), ".forget-%d-%s" % (os.getpid(), os.path.basename(entry)))
    try:
        os.rename(entry, parked)
    except OSError:
        return False  # another monitor forgot it first
    try:
        again = registered_at(read_json_file(parked)) != registered
    except HpcrunError:
        again = False
    if again:
        try:
            os.rename(parked, entry)
        except OSError:
            pass
        return False
    remove_quietly(parked)
    return True


def registered_work_dirs(env=None):
    """[(work_dir, registered epoch, entry path)] of every registered work dir."""
    directory = os.path.join(hpcrun_home(env), "registry")
    entries = []
    for filename in list_dir(directory):
        if not filename.endswith(".json") or filename.startswith("."):
            continue
        try:
            entry = read_json_file(os.path.join(directory, filename))
        except HpcrunError:
            continue
        if isinstance(entry.get("work_dir"), str):
            entries.append((entry["work_dir"], registered_at(entry), os.path.join(directory, filename)))
    return entries


def registered_at(entry):
    """When a registry entry was written (epoch); 0 for a broken one, which ages at once."""
    return float(entry["registered"]) if is_number(entry.get("registered")) else 0.0


def has_work(work_dir):
    """Anything left to watch or deliver in a work dir (a run reported lost is not)."""
    running = list_dir(state_dir(work_dir, "running"))
    for name in running:
        run_id = name[:-5]
        if name.endswith(".json") and (marker(run_id, "lost") not in running or
                                       marker(run_id, "recovered") in running):
            return True
    return any(name.endswith(".json") or sub == "claimed"
               for sub in ("done", "claimed", "reminders")
               for name in list_dir(state_dir(work_dir, sub)) if not name.startswith("."))


# --- schedulers: one entry each, holding every fact hpcrun needs of one batch system ---

class Scheduler(object):
    """What hpcrun asks of a batch system. wrap and monitor never name a scheduler: they ask the
    entry of the job (scheduler_of). Adding one (Flux, HTCondor) is one subclass in SCHEDULERS.

    A job is a dict of facts (JSON in every record): scheduler, id, name, array_id, array_index,
    array_first, array_last, array_step, array_count, partition, nodes, cpus, gpus, time_limit,
    end_time, output_file, script, restart_count, outlives, release."""

    name = None
    release_command = None   # ends a job: "scancel"
    client = None            # what a login node asks about a job; reminders need it on PATH
    kill_lines = ()          # (cause, pattern): what the scheduler writes into the job's output
    warning_signals = {}     # signal name -> what the scheduler means by it (see warning_cause)
    launch_check = False     # whether selftest checks how the wrapper was started (launch_warning)

    def detect(self, env):
        """The job's facts from its environment, or None when this is not such a job."""
        return None

    def add_facts(self, job, start_time, env, runner):
        """Facts the environment lacks (end time, time limit, output file), asked once at start."""

    def follow_end(self, job, runner):
        """(end time, time limit) after a change while the job runs (a raised limit), or None."""
        return None

    def grace(self, default, runner):
        """Seconds the wrapper may wait for the training after the scheduler's stop signal."""
        return default

    def limit_advice(self, job, seconds):
        """How a run that needs a time limit of seconds gets it, as this scheduler lets a user:
        (kind, command) pairs; kind is user (raise it yourself), admin (only an administrator
        may), site (where the site allows it) or resubmit (ask for it next time)."""
        return []

    def outlives(self, env, parent_comm):
        """Whether the job (and its bill) may go on after the wrapper exits."""
        return False

    def launch_warning(self, env, parent_comm):
        """A warning when the wrapper was started so that the scheduler's signals miss it."""
        return None

    def query(self, job_id, runner):
        """The scheduler's word on a job: a Verdict, or None when it knows nothing."""
        return None

    def warning_cause(self, name, when, job):
        """What a warning signal (USR1, USR2) that also killed the training says: a cause, or
        None when it says nothing (the training just died of a signal)."""
        return None

    def array_active(self, job, runner):
        """Whether any task of the job's array still waits or runs: True, False, or None when
        the scheduler cannot tell."""
        return None

    def task_label(self, array_id, index):
        """How the scheduler names one task of an array (Slurm 123_4, Grid Engine 123.4)."""
        return "%s_%s" % (array_id, index)

    def stop_notice(self, name, when, job):
        """The cause of a training that ended (any exit status) after this warning signal, when
        the scheduler sends it to announce a stop (Grid Engine's -notify): it was stopped, it did
        not finish. None for a warning that announces nothing of the kind."""
        return None

    def resubmit(self, indices, target, job):
        """The commands that submit these tasks of an array again (target: the batch script)."""
        return []


class Verdict(object):
    """A scheduler's answer about a job: whether it still runs (or waits), its own state word,
    why it ended in hpcrun's terms (cause), and the reason and exit code it gives."""

    def __init__(self, running, state, cause=None, reason=None, exit_code=None):
        self.running = running
        self.state = state
        self.cause = cause
        self.reason = reason
        self.exit_code = exit_code

    def describe(self):
        parts = [self.state]
        if self.reason and self.reason not in ("None", "(null)"):
            parts.append("reason %s" % self.reason)
        if self.exit_code:
            parts.append("exit %s" % self.exit_code)
        return ", ".join(parts)


def int_or_none(text):
    """An index or count from the environment (SGE writes "undefined" where none applies)."""
    text = str(text or "").strip()
    return int(text) if re.match(r"^-?\d+$", text) else None


def array_facts(array_id, index, first=None, last=None, step=None, count=None):
    """The array fields of a job; all None for a job that is not an array task."""
    index = int_or_none(index)
    if index is None or not array_id:
        return {}
    first, last, step, count = (int_or_none(v) for v in (first, last, step, count))
    if count is None and first is not None and last is not None:
        count = (last - first) // (step or 1) + 1
    return {"array_id": str(array_id), "array_index": index, "array_first": first,
            "array_last": last, "array_step": step, "array_count": count}


def slurm_cpus(text):
    """The job's CPUs on all its nodes from SLURM_JOB_CPUS_PER_NODE (72(x2),36 is 180)."""
    total = 0
    for count, times in re.findall(r"(\d+)(?:\(x(\d+)\))?", text or ""):
        total += int(count) * int(times or 1)
    return total or None


class Slurm(Scheduler):
    name = "slurm"
    launch_check = True
    release_command = "scancel"
    client = "scontrol"
    kill_lines = (
        ("time_limit", r"\*\*\* (?:JOB|STEP) \S+ ON \S+ CANCELLED AT \S+ DUE TO TIME LIMIT"),
        ("preempted", r"\*\*\* (?:JOB|STEP) \S+ ON \S+ CANCELLED AT \S+ DUE TO (?:PREEMPTION|JOB REQUEUE)"),
        ("node_fail", r"\*\*\* (?:JOB|STEP) \S+ ON \S+ CANCELLED AT \S+ DUE TO NODE FAIL"),
        ("cancelled", r"\*\*\* (?:JOB|STEP) \S+ ON \S+ CANCELLED AT \S+(?: DUE to SIGNAL \w+)? \*\*\*"),
        ("host_oom", r"Detected \d+ oom[-_]kill event|srun: error: \S+: tasks? [\d,-]+: Out Of Memory"),
    )
    running_states = ("RUNNING", "PENDING", "CONFIGURING", "SUSPENDED", "REQUEUED", "RESIZING",
                      "COMPLETING", "STAGE_OUT")
    causes = {"TIMEOUT": "time_limit", "DEADLINE": "time_limit", "OUT_OF_MEMORY": "oom",
              "NODE_FAIL": "node_fail", "BOOT_FAIL": "node_fail", "CANCELLED": "cancelled",
              "PREEMPTED": "preempted"}

    def detect(self, env):
        if not env.get("SLURM_JOB_ID"):
            return None
        job = {"scheduler": self.name, "id": env["SLURM_JOB_ID"], "name": env.get("SLURM_JOB_NAME"),
               "partition": env.get("SLURM_JOB_PARTITION"), "nodes": env.get("SLURM_JOB_NODELIST"),
               "restart_count": env.get("SLURM_RESTART_COUNT"),
               "cpus": slurm_cpus(env.get("SLURM_JOB_CPUS_PER_NODE")) or int_or_none(env.get("SLURM_CPUS_ON_NODE")),
               "gpus": (len(parse_list(env.get("SLURM_JOB_GPUS"))) or int_or_none(env.get("SLURM_GPUS_ON_NODE")) or 0)
               * (int_or_none(env.get("SLURM_JOB_NUM_NODES")) or 1) or None,
               "end_time": parse_epoch_text(env.get("SLURM_JOB_END_TIME"))}
        job.update(array_facts(env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID"),
                               env.get("SLURM_ARRAY_TASK_MIN"), env.get("SLURM_ARRAY_TASK_MAX"),
                               env.get("SLURM_ARRAY_TASK_STEP"), env.get("SLURM_ARRAY_TASK_COUNT")))
        return job

    def job_fields(self, job_id, runner):
        """Fields of `scontrol show job` (JobState=RUNNING ...) as a dict."""
        text = run_quietly(["scontrol", "show", "job", job_id], runner) or ""
        return dict(re.findall(r"\b(JobState|EndTime|TimeLimit|StdOut|StartTime|Command|Reason|"
                               r"ExitCode)=(\S+)", text))

    def add_facts(self, job, start_time, env, runner):
        fields = self.job_fields(job["id"], runner)
        job["end_time"] = job.get("end_time") or parse_slurm_time(fields.get("EndTime"))
        job["time_limit"] = parse_time_limit(fields.get("TimeLimit"))
        job["output_file"] = fields.get("StdOut")
        if fields.get("Command") not in (None, "(null)"):
            job["script"] = fields["Command"]

    def limit_advice(self, job, seconds):
        """A user can lower a running job's limit, never raise it (scontrol.1)."""
        limit = "%d-%s" % (seconds // 86400, clock_text(seconds % 86400)) if seconds >= 86400 else clock_text(seconds)
        return [("admin", "scontrol update JobId=%s TimeLimit=%s" % (job["id"], limit)),
                ("resubmit", "sbatch --time=%s" % limit)]

    def follow_end(self, job, runner):
        # Only a running job's EndTime is its limit; once it is cancelled it is the cancel time.
        fields = self.job_fields(job["id"], runner)
        end_time = parse_slurm_time(fields.get("EndTime"))
        if end_time and fields.get("JobState") == "RUNNING":
            return end_time, parse_time_limit(fields.get("TimeLimit")) or job.get("time_limit")
        return None

    def grace(self, default, runner):
        """max(KillWait, 5) - 3 seconds: Slurm SIGKILLs KillWait seconds after its SIGTERM."""
        try:
            result = runner(["scontrol", "show", "config"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, universal_newlines=True, timeout=5)
        except (OSError, subprocess.SubprocessError):
            return default
        match = re.search(r"^KillWait\s*=\s*(\d+)", result.stdout or "", re.M)
        return max(int(match.group(1)), 5) - 3 if match else default

    def outlives(self, env, parent_comm):
        batch_top = (parent_comm or "").strip() == "slurmstepd" and not env.get("SLURM_STEP_ID")
        return not batch_top

    def launch_warning(self, env, parent_comm):
        """The wrapper must be the step's top process, or the time limit SIGKILLs it silently."""
        if parent_comm is None or parent_comm.strip() in ("slurmstepd", "srun"):
            return None
        return ("the wrapper is not the job step's top process (parent: %s): at the time limit Slurm "
                "kills it without warning. Start it with 'exec python3 hpcrun.py wrap ...' or "
                "'srun python3 hpcrun.py wrap ...' in the batch script" % parent_comm.strip())

    def query(self, job_id, runner):
        text = run_quietly(["scontrol", "show", "job", job_id], runner)
        state = re.search(r"\bJobState=(\S+)", text or "")
        if state:
            reason = re.search(r"\bReason=(\S+)", text)
            exit_code = re.search(r"\bExitCode=(\S+)", text)
            return self.verdict(state.group(1), reason.group(1) if reason else None,
                                exit_code.group(1) if exit_code else None)
        lines = (run_quietly(["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "State,ExitCode"], runner)
                 or "").splitlines()
        fields = [line for line in lines if line.strip()][:1]
        if not fields:
            return None
        fields = fields[0].split("|")
        return self.verdict(fields[0].split()[0], None, fields[1] if len(fields) > 1 else None)

    def verdict(self, state, reason=None, exit_code=None):
        return Verdict(state in self.running_states, state, self.causes.get(state), reason, exit_code)

    def array_active(self, job, runner):
        result = run_command(["squeue", "-h", "-j", job["array_id"], "-o", "%T"], runner)
        if result is None:
            return None
        code, out, err = result
        if code == 0:
            return bool(out.strip())
        return False if "Invalid job id" in err else None   # ended longer ago than MinJobAge

    def resubmit(self, indices, target, job):
        return ["sbatch --array=%s %s" % (format_ranges(indices), shlex.quote(target))]


class PBS(Scheduler):
    """PBS Pro, OpenPBS and Torque."""

    name = "pbs"
    release_command = "qdel"
    client = "qstat"
    kill_lines = (
        ("time_limit", r"=>> PBS: job killed: (?:walltime|cput) .* exceeded limit"),
        ("host_oom", r"=>> PBS: job killed: v?mem .* exceeded limit"),
    )

    def detect(self, env):
        if not env.get("PBS_JOBID"):
            return None
        job = {"scheduler": self.name, "id": env["PBS_JOBID"], "name": env.get("PBS_JOBNAME"),
               "partition": env.get("PBS_QUEUE"), "nodes": None,
               "cpus": int_or_none(env.get("NCPUS") or env.get("PBS_NUM_PPN"))}
        array_id = env.get("PBS_ARRAY_ID") or re.sub(r"\[\d+\]", "[]", env["PBS_JOBID"])
        job.update(array_facts(array_id, env.get("PBS_ARRAY_INDEX") or env.get("PBS_ARRAYID")))
        if job.get("array_id"):
            job["variant"] = "torque" if env.get("PBS_ARRAYID") else "pbspro"
        return job

    def array_active(self, job, runner):
        text = run_quietly(["qstat", "-x", "-f", job["array_id"]], runner)
        state = re.search(r"job_state = (\S+)", text or "")
        if not state:
            return None
        return state.group(1) not in ("F", "X")

    def task_label(self, array_id, index):
        return str(array_id).replace("[]", "[%s]" % index, 1)

    def resubmit(self, indices, target, job):
        """Torque takes a list (-t 5,17-18); PBS Pro one range X-Y (X < Y) a submission, so a lone
        index runs as a plain job with the index it would have had."""
        if job.get("variant") == "torque":
            return ["qsub -t %s %s" % (format_ranges(indices), shlex.quote(target))]
        return ["qsub -J %d-%d %s" % (first, last, shlex.quote(target)) if first < last else
                "qsub -v PBS_ARRAY_INDEX=%d %s" % (first, shlex.quote(target))
                for first, last in contiguous_ranges(indices)]

    def limit_advice(self, job, seconds):
        """A user can only lower a running job's walltime (qalter.1B)."""
        return [("admin", "qalter -l walltime=%s %s" % (clock_text(seconds), job["id"])),
                ("resubmit", "qsub -l walltime=%s" % clock_text(seconds))]

    def add_facts(self, job, start_time, env, runner):
        """PBS_WALLTIME; its end counts from the job's start: its shell's under pbs_mom, else the
        wrapper's."""
        walltime = env.get("PBS_WALLTIME")
        if walltime and walltime.isdigit():
            job["time_limit"] = int(walltime)
            job["end_time"] = (ancestor_start("pbs_mom", below=True) or start_time) + int(walltime)

    def outlives(self, env, parent_comm):
        return env.get("PBS_ENVIRONMENT") == "PBS_INTERACTIVE"

    def query(self, job_id, runner):
        text = run_quietly(["qstat", "-x", "-f", job_id], runner) or run_quietly(["qstat", "-f", job_id], runner)
        state = re.search(r"job_state = (\S+)", text or "")
        if not state:
            return None
        exit_status = re.search(r"Exit_status = (-?\d+)", text)
        code = exit_status.group(1) if exit_status else None
        word = {"R": "RUNNING", "Q": "PENDING", "H": "PENDING", "S": "SUSPENDED", "E": "RUNNING",
                "B": "RUNNING"}.get(state.group(1), "FINISHED")
        if code == "-29":  # JOB_EXEC_KILL_WALLTIME
            return Verdict(False, "TIMEOUT", "time_limit", None, code)
        return Verdict(word in ("RUNNING", "PENDING", "SUSPENDED"), word, None, None, code)


class LSF(Scheduler):
    name = "lsf"
    release_command = "bkill"
    client = "bjobs"
    kill_lines = (
        ("time_limit", r"TERM_RUNLIMIT"),
        ("host_oom", r"TERM_MEMLIMIT"),
        ("cancelled", r"TERM_OWNER|TERM_ADMIN"),
        ("preempted", r"TERM_PREEMPT"),
    )
    causes = {"TERM_RUNLIMIT": "time_limit", "TERM_MEMLIMIT": "oom", "TERM_OWNER": "cancelled",
              "TERM_ADMIN": "cancelled", "TERM_PREEMPT": "preempted"}

    def detect(self, env):
        if not env.get("LSB_JOBID"):
            return None
        job = {"scheduler": self.name, "id": env["LSB_JOBID"], "name": env.get("LSB_JOBNAME"),
               "partition": env.get("LSB_QUEUE"), "nodes": env.get("LSB_HOSTS"),
               "cpus": int_or_none(env.get("LSB_DJOB_NUMPROC")), "script": env.get("LSB_JOBFILENAME")}
        index = env.get("LSB_JOBINDEX")
        if index not in (None, "", "0"):
            job.update(array_facts(env["LSB_JOBID"], index, None, env.get("LSB_JOBINDEX_END"),
                                   env.get("LSB_JOBINDEX_STEP")))
        return job

    def limit_advice(self, job, seconds):
        """bmod -W on a running job needs LSB_MOD_ALL_JOBS=Y on the site (lsf.conf)."""
        minutes = int(-(-seconds // 60))
        return [("site", "bmod -W %d %s" % (minutes, job["id"])),
                ("resubmit", "bsub -W %d:%02d" % (minutes // 60, minutes % 60))]

    def add_facts(self, job, start_time, env, runner):
        job["output_file"] = env.get("LSB_OUTPUTFILE")

    def outlives(self, env, parent_comm):
        return env.get("LSB_INTERACTIVE") == "Y"

    def task_label(self, array_id, index):
        return "%s[%s]" % (array_id, index)

    def resubmit(self, indices, target, job):
        name = re.sub(r"\[.*$", "", job.get("name") or "array") or "array"
        return ['bsub -J "%s[%s]" %s' % (name, format_ranges(indices), shlex.quote(target))]

    def query(self, job_id, runner):
        text = run_quietly(["bjobs", "-l", job_id], runner)
        status = re.search(r"Status <(\w+)>", text or "")
        if not status:
            return None
        term = re.search(r"\b(TERM_\w+)", text)
        if term:
            return Verdict(False, term.group(1), self.causes.get(term.group(1)))
        word = {"RUN": "RUNNING", "PEND": "PENDING"}.get(status.group(1), status.group(1))
        running = status.group(1) in ("RUN", "PEND", "PSUSP", "USUSP", "SSUSP")
        return Verdict(running, word)


class GridEngine(Scheduler):
    """Son of Grid Engine and its kin. Never SIGTERM: qdel and h_rt SIGKILL the job's process
    group; with -notify, SIGUSR2 reaches the whole group `notify` seconds before the kill;
    s_rt sends SIGUSR1 (reference sge-facts.md)."""

    name = "sge"
    release_command = "qdel"
    client = "qstat"
    warning_signals = {"SIGUSR2": "kill_notice", "SIGUSR1": "soft_limit"}

    def detect(self, env):
        if not (env.get("JOB_ID") and (env.get("SGE_TASK_ID") or env.get("SGE_ROOT"))):
            return None
        job = {"scheduler": self.name, "id": env["JOB_ID"], "name": env.get("JOB_NAME"),
               "partition": env.get("QUEUE"), "nodes": env.get("HOSTNAME"),
               "cpus": int_or_none(env.get("NSLOTS")), "script": env.get("JOB_SCRIPT"),
               "output_file": env.get("SGE_STDOUT_PATH")}
        job.update(array_facts(env["JOB_ID"], env.get("SGE_TASK_ID"), env.get("SGE_TASK_FIRST"),
                               env.get("SGE_TASK_LAST"), env.get("SGE_TASK_STEPSIZE")))
        return job

    def limit_advice(self, job, seconds):
        """Whether qalter changes a running task's h_rt is not documented: ask for it next time."""
        return [("resubmit", "qsub -l h_rt=%s" % clock_text(seconds))]

    def add_facts(self, job, start_time, env, runner):
        """h_rt (the hard limit, the kill) from `qstat -j`; its end counts from the job's start:
        its sge_shepherd's, else the wrapper's."""
        text = run_quietly(["qstat", "-j", job["id"]], runner) or ""
        fields = dict(re.findall(r"^(job_type|script_file|job_args):\s*(.*)$", text, re.M))
        if "binary" in fields.get("job_type", "") and fields.get("script_file"):
            argv = [fields["script_file"]] + [arg for arg in fields.get("job_args", "").split(",") if arg]
            job["script"] = "-b y -shell no " + " ".join(shlex.quote(arg) for arg in argv)
            job["binary"] = True
        elif fields.get("script_file"):
            job["script"] = fields["script_file"]
        limits = re.search(r"^hard resource_list:\s*(.*)$", text, re.M)
        h_rt = re.search(r"(?:^|,)h_rt=([\d:]+)", limits.group(1)) if limits else None
        if h_rt:
            job["time_limit"] = parse_sge_time(h_rt.group(1))
            job["end_time"] = (ancestor_start("sge_shepherd") or start_time) + job["time_limit"]

    def query(self, job_id, runner):
        if run_quietly(["qstat", "-j", job_id], runner):
            return Verdict(True, "RUNNING")
        text = run_quietly(["qacct", "-j", job_id], runner)
        if not text:
            return None
        failed = re.search(r"^failed\s+(.+)$", text, re.M)
        exit_status = re.search(r"^exit_status\s+(\d+)", text, re.M)
        reason = failed.group(1).strip() if failed else None
        code = exit_status.group(1) if exit_status else None
        number = int_or_none((reason or "0").split()[0])
        if number == 37:   # "qmaster enforced h_rt, h_cpu, or h_vmem limit"
            return Verdict(False, "TIMEOUT", "time_limit", reason, code)
        if number == 100 or code == "137":   # "assumedly after job": qdel's SIGKILL
            return Verdict(False, "CANCELLED", "cancelled", reason, code)
        return Verdict(False, "FAILED" if number else "COMPLETED", None, reason, code)

    def array_active(self, job, runner):
        result = run_command(["qstat", "-j", job["array_id"]], runner)
        if result is None:
            return None
        return result[0] == 0   # "Following jobs do not exist" once every task ended

    def task_label(self, array_id, index):
        return "%s.%s" % (array_id, index)   # qsub -sync y: "Job 7.2 exited with exit code 3"

    def resubmit(self, indices, target, job):
        """qsub -t takes one range n[-m] a submission: one line per range. target is the script,
        or for a binary job (-b y) its whole command, quoted already (add_facts)."""
        return ["qsub -t %s %s" % ("%d-%d" % (first, last) if first < last else "%d" % first,
                                   target if job.get("binary") else shlex.quote(target))
                for first, last in contiguous_ranges(indices)]

    def stop_notice(self, name, when, job):
        return self.warning_cause(name, when, job) if self.warning_signals.get(name) == "kill_notice" else None

    def warning_cause(self, name, when, job):
        """SIGUSR2 is the notice of a kill: at the hard limit (h_rt) a time limit, else a qdel;
        SIGUSR1 is the soft limit (s_rt)."""
        meaning = self.warning_signals.get(name)
        if meaning == "soft_limit":
            return "time_limit"
        if meaning == "kill_notice":
            end_time = (job or {}).get("end_time")
            near = end_time and when >= end_time - time_limit_slack(job)
            return "time_limit" if near else "cancelled"
        return None


SCHEDULERS = (Slurm(), PBS(), LSF(), GridEngine())   # asked in this order to detect a job
NO_SCHEDULER = Scheduler()


def scheduler_of(job):
    """The entry of a job's scheduler (a base entry that knows nothing for an unknown one)."""
    name = job.get("scheduler") if isinstance(job, dict) else None
    return next((entry for entry in SCHEDULERS if entry.name == name), NO_SCHEDULER)


def detect_job(env):
    """The facts of the batch job we run in, from its environment, or None."""
    for entry in SCHEDULERS:
        job = entry.detect(env)
        if job:
            return job
    return None


def query_scheduler(job, runner=subprocess.run):
    """The scheduler's Verdict on a job, or None when it knows nothing."""
    if not isinstance(job, dict) or not job.get("id"):
        return None
    job_id = str(job["id"])
    if not re.match(JOB_ID_RE, job_id):
        return None  # from a record: an argument, never an option of the scheduler's command
    return scheduler_of(job).query(job_id, runner)


def release_command(job):
    entry = scheduler_of(job)
    return "%s %s" % (entry.release_command, job["id"]) if entry.release_command and job else None


def scheduler_kill_lines():
    """(cause, tier 1, pattern) of every scheduler's own words in a job's output."""
    return tuple((cause, 1, pattern) for entry in SCHEDULERS for cause, pattern in entry.kill_lines)


def parse_sge_time(text):
    """Seconds of an SGE time (h_rt=0:0:20, 3600, 1:30:00)."""
    parts = [int(part) for part in text.split(":") if part.isdigit()]
    seconds = 0
    for part in parts:
        seconds = seconds * 60 + part
    return seconds or None


def parse_slurm_time(text):
    try:
        return time.mktime(time.strptime(text or "", "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return None


def parse_time_limit(text):
    """Seconds of a Slurm time limit (D-HH:MM:SS, HH:MM:SS, MM:SS, MM), None for UNLIMITED."""
    match = re.match(r"^(?:(\d+)-)?(?:(\d+):)?(\d+)(?::(\d+))?$", text or "")
    if not match:
        return None
    days, first, second, third = (int(part) if part else None for part in match.groups())
    if third is not None:
        hours, minutes, seconds = (first or 0), second, third
    elif first is not None:
        hours, minutes, seconds = (0, first, second) if days is None else (first, second, 0)
    else:
        hours, minutes, seconds = (second, 0, 0) if days is not None else (0, second, 0)
    return (days or 0) * 86400 + hours * 3600 + minutes * 60 + seconds


def parse_epoch_text(text):
    try:
        return float(text) if text else None
    except ValueError:
        return None


def time_limit_slack(job):
    """Schedulers' timers may fire up to a minute off; a short job gets a tenth of its limit."""
    limit = (job or {}).get("time_limit")
    return min(TIME_LIMIT_SLACK, 0.1 * limit) if limit else TIME_LIMIT_SLACK


def job_label(job):
    if not job:
        return None
    label = "%s %s" % (job.get("scheduler"), job.get("id"))
    if job.get("array_index") is not None and job.get("array_id"):
        label = "%s %s" % (job.get("scheduler"), scheduler_of(job).task_label(job["array_id"], job["array_index"]))
    return label + (" (%s)" % job["name"] if job.get("name") else "")


# --- wrap: child process, output relay, signals, heartbeat ---

def run_command(argv, runner=subprocess.run):
    """(exit status, stdout, stderr) of a scheduler command, or None when it is missing or hangs.
    An argument from a record must have passed JOB_ID_RE: never an option."""
    if not find_program(argv[0]):
        return None
    try:
        result = runner(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        universal_newlines=True, timeout=SCHEDULER_TIMEOUT)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.returncode, result.stdout or "", result.stderr or ""


def run_quietly(argv, runner=subprocess.run):
    """stdout of a scheduler command, or None when it is missing, fails or hangs."""
    if not find_program(argv[0]):
        return None
    try:
        result = runner(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                        universal_newlines=True, timeout=SCHEDULER_TIMEOUT)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout if result.returncode == 0 else None


def default_run_name(name, job, work_dir):
    if name:
        return name
    if job and job.get("name") and job["name"] not in ("bash", "sh", "interactive", "zsh"):
        return job["name"]
    return os.path.basename(os.path.abspath(work_dir)) or "run"


def new_run_id(now, host):
    return "%s-%s-%d-%s" % (time.strftime("%Y%m%d-%H%M%S", time.localtime(now)),
                            re.sub(r"[^A-Za-z0-9_-]", "_", host.split(".")[0]), os.getpid(),
                            os.urandom(2).hex())


def open_new_log(log_dir, now, job):
    """A log file that did not exist before: train_YYYYMMDD_HHMMSS[_job][_n].log, O_EXCL."""
    os.makedirs(log_dir, exist_ok=True)
    stem = "train_" + time.strftime("%Y%m%d_%H%M%S", time.localtime(now))
    if job:
        tag = job.get("id") if job.get("array_index") is None else \
            "%s_%s" % (job.get("array_id") or job["id"], job["array_index"])
        stem += "_" + re.sub(r"[^A-Za-z0-9_.-]", "_", str(tag))
    for attempt in range(LOG_NAME_TRIES):
        path = os.path.join(log_dir, stem + ("_%d" % attempt if attempt else "") + ".log")
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644), path
        except FileExistsError:
            continue
        except OSError as error:
            raise HpcrunError("cannot create log in '%s': %s" % (log_dir, error.strerror))
    raise HpcrunError("cannot create log in '%s': too many logs named %s*" % (log_dir, stem))


def child_argv(command, program):
    if program:
        return list(program)
    shell = find_program("bash") or "/bin/sh"
    return [shell, "-c", command]


def child_env(env, run_id, log_path):
    child = dict(env)
    child.setdefault("PYTHONUNBUFFERED", "1")
    child["HPCRUN_RUN_ID"] = run_id
    child["HPCRUN_LOG_FILE"] = log_path
    return child


def enlarge_pipe(fd):
    """A larger pipe buffer means fewer, larger reads (Linux F_SETPIPE_SZ; best effort)."""
    try:
        import fcntl
        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_SIZE)
    except (ImportError, OSError):
        pass


class Relay(threading.Thread):
    """Copies the training's output, as raw bytes in large chunks, to stdout and the log.

    A failing log write (disk full, quota) stops the log, never the relay: the training
    must not block on its wrapper.
    """

    def __init__(self, source_fd, log_fd, out_fd, sampler):
        threading.Thread.__init__(self, name="relay", daemon=True)
        self.source_fd = source_fd
        self.log_fd = log_fd
        self.out_fd = out_fd
        self.sampler = sampler
        self.bytes = 0
        self.recent = b""           # the last RECENT_BYTES of output, for the heartbeat's last line
        self.output_at = None       # wall time of the last output (how long a hung training is silent)
        self.search_until = self.searched = 0   # the second and the bytes searched for checkpoint lines in it
        self.log_error = None

    def run(self):
        # One buffer for the whole run: no allocation per chunk. The sampler may keep a view of
        # the last chunk; the read that ends the loop writes nothing into the buffer.
        buffer = bytearray(READ_CHUNK)
        buffers, view, readv, source = [buffer], memoryview(buffer), os.readv, self.source_fd
        while True:
            try:
                size = readv(source, buffers)
            except OSError:
                break
            if not size:
                break
            chunk = view[:size]
            self.bytes += size
            self.output_at = now = time.time()
            before, self.recent = self.recent, (self.recent + chunk[-RECENT_BYTES:])[-RECENT_BYTES:]
            self.write_out(chunk)
            self.write_log(chunk)
            self.sampler.feed(chunk)
            if self.may_search(now, size) and buffer.find(CHECKPOINT_HINT, 0, size) >= 0:
                self.sampler.find_checkpoint(bytes(chunk), before)
        self.sampler.flush()

    def may_search(self, now, size):
        """Whether this chunk is searched for a checkpoint line: the first CHECKPOINT_SEARCH_BYTES
        of each second are (a training's whole output, in practice); the rest of a flood is left
        to the once-a-second look, so the cost does not grow with the output rate."""
        if now >= self.search_until:
            self.search_until, self.searched = now + 1.0, 0
        self.searched += size
        return self.searched <= CHECKPOINT_SEARCH_BYTES

    def write_out(self, chunk):
        if self.out_fd is None:
            return
        try:
            write_all(self.out_fd, chunk)
        except OSError:
            self.out_fd = None  # stdout gone (closed pipe): keep logging

    def write_log(self, chunk):
        if self.log_fd is None:
            return
        try:
            write_all(self.log_fd, chunk)
        except OSError as error:
            self.log_error = "log incomplete: write failed after %d bytes: %s" % (
                self.bytes - len(chunk), error.strerror or error)
            self.log_fd = None

    def last_line(self):
        return last_line_of(self.recent)


def proc_stat(pid):
    """(name, the fields after it) of /proc/PID/stat (Linux): fields[0] is the state, [1] the
    parent, [2] the process group, [19] the start in clock ticks after boot. OSError when
    there is no such process, IndexError when the file is cut short."""
    with open("/proc/%s/stat" % pid, "rb") as stream:
        parts = stream.read().rsplit(b")", 1)
    return parts[0].split(b"(", 1)[1], parts[1].split()


def descendants(pid):
    """Pids of every process below pid, from /proc (best effort, Linux)."""
    children = {}
    for entry in list_dir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = proc_stat(entry)[1]
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(), ()):
            found.append(child)
            queue.append(child)
    return found


def signal_tree(pid, number):
    for target in [pid] + descendants(pid):
        try:
            os.kill(target, number)
        except OSError:
            pass


def read_cgroup_oom_kills(root="/sys/fs/cgroup"):
    """The oom_kill counter of this process's memory cgroup (v2 or v1), or None."""
    try:
        with open("/proc/self/cgroup", encoding="utf-8") as stream:
            lines = stream.read().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and not parts[1]:
            candidates = [os.path.join(root, parts[2].lstrip("/"), "memory.events")]
        elif "memory" in parts[1].split(","):
            candidates = [os.path.join(root, "memory", parts[2].lstrip("/"), "memory.oom_control")]
        else:
            continue
        for path in candidates:
            count = read_counter(path, "oom_kill")
            if count is not None:
                return count
    return None


def read_counter(path, name):
    try:
        with open(path, encoding="utf-8") as stream:
            for line in stream:
                key, _, value = line.partition(" ")
                if key == name and value.strip().isdigit():
                    return int(value)
    except OSError:
        pass
    return None


def classify_ending(returncode, wrapper_signal, signal_time, job, oom_before, oom_after, warnings=None):
    """(status, exit_code, signal name, cause) of a finished or stopped training.

    warnings: {signal name: when} of the warning signals the scheduler sent (SGE's SIGUSR2
    before a kill reaches the whole process group: a training without a handler dies of it)."""
    if wrapper_signal:
        name = signal_name(wrapper_signal)
        end_time = (job or {}).get("end_time")
        if name == "SIGINT":
            cause = "interrupted"
        elif end_time and signal_time >= end_time - time_limit_slack(job):
            cause = "time_limit"
        elif name == "SIGXCPU":
            cause = "cpu_limit"
        else:
            cause = "cancelled"
        return "terminated", 128 + wrapper_signal, name, cause
    if returncode is not None and returncode < 0:
        name = signal_name(-returncode)
        if name == "SIGKILL" and oom_before is not None and (oom_after or 0) > oom_before:
            cause = "oom"
        elif name in (warnings or {}):
            cause = scheduler_of(job).warning_cause(name, warnings[name], job) or "signal"
        else:
            cause = "crash" if name in CRASH_SIGNALS else "signal"
        return "killed", 128 - returncode, name, cause
    code = returncode if returncode is not None else 1
    for name, when in (warnings or {}).items():
        cause = scheduler_of(job).stop_notice(name, when, job)
        if cause:  # told to stop (a checkpoint saved, maybe): stopped, not finished
            return "terminated", code, name, cause
    return ("success" if code == 0 else "failed"), code, None, "exit_code"


class Wrapper(object):
    """One wrapped training: its records, its child, its signals."""

    def __init__(self, args, config, env, now=time.time, runner=subprocess.run, parent_comm=None):
        self.args = args
        self.config = config
        self.env = env
        self.now = now
        self.runner = runner
        self.work_dir = os.path.abspath(args.work_dir)
        self.host = host_name()
        self.start_time = now()
        self.job = job_facts(env, self.start_time, parent_comm, runner)
        self.scheduler = scheduler_of(self.job)
        self.group = run_group(config)
        self.grace = config.get("wrap", "grace") or (self.scheduler.grace(DEFAULT_GRACE, runner) if self.job
                                                     else DEFAULT_GRACE)
        self.run_id = new_run_id(self.start_time, self.host)
        self.name = default_run_name(args.name, self.job, self.work_dir)
        self.command = args.command if args.command else " ".join(shlex.quote(a) for a in args.program)
        self.child = None
        self.child_exit_time = None
        self.cpu_at_start = self.cpu_while_running = None  # CPU seconds: the cost of wrapping
        self.relay = None
        self.log_path = None
        self.seq = 0
        self.signals = []            # (signal number, wall time) in order of arrival
        self.warning_signals = {}    # signal name -> when the last warning signal (USR1, USR2) came
        self.warnings = []
        self.stopped = threading.Event()
        self.lock = threading.Lock()
        self.forward = set(signal_number(name) for name in (args.forward_signal or []))
        self.sampler = MetricSampler(config.get("report", "metric"), checkpoint=config.get("report", "checkpoint"),
                                     forecast_after=config.get("monitor", "forecast_after"))
        self.checkpoint_file = None
        self.rechecked_at = None   # when a run forecast to miss its limit last asked its scheduler
        self.peak_rss = 0
        self.gpu_tokens = job_gpu_tokens(env)
        self.gpu_sampler = GpuSampler(self.gpu_tokens, config.get("gpu", "sample_interval"),
                                      config.get("gpu", "idle_threshold"), self.warn_once) \
            if self.gpu_tokens and config.get("gpu", "enabled") != "no" else None
        self.warned = set()          # warnings printed once, not once per heartbeat
        self.oom_before = None       # the cgroup's OOM kill count when the training started
        self.subreaper = False       # orphans of the training become our children (Linux)

    def paths(self, sub):
        return os.path.join(state_dir(self.work_dir, sub), self.run_id + ".json")

    def base_record(self):
        return {
            "schema": SCHEMA_VERSION, "hpcrun_version": __version__, "run_id": self.run_id,
            "name": self.name, "command": self.command, "work_dir": self.work_dir,
            "host": self.host, "pid": os.getpid(), "start_time": self.start_time,
            "started": format_local_time(self.start_time), "job": self.job,
            "log_file": os.path.relpath(self.log_path, self.work_dir) if self.log_path else None,
            "test": bool(getattr(self.args, "selftest", False)), "group": self.group,
        }

    def start(self):
        if not os.path.isdir(self.work_dir):
            raise HpcrunError("work dir '%s' does not exist" % self.args.work_dir)
        try:
            make_state_dirs(self.work_dir)
        except OSError as error:
            raise HpcrunError("cannot create '%s': %s" % (os.path.join(self.work_dir, STATE_DIR),
                                                         error.strerror or error))
        log_dir = os.path.join(self.work_dir, self.args.log_dir or self.config.get("wrap", "log_dir"))
        self.log_fd, self.log_path = open_new_log(log_dir, self.start_time, self.job)
        self.write_running()
        self.oom_before = read_cgroup_oom_kills()
        self.subreaper = become_subreaper()
        if self.signals:  # stopped before the training could start: it never runs
            self.stopped.set()
            record = self.completion_record(None, True)
            self.write_final(record)
            os.close(self.log_fd)
            return record
        stdin = None if sys.stdin is not None and sys.stdin.isatty() else subprocess.DEVNULL
        try:
            self.child = subprocess.Popen(
                child_argv(self.args.command, self.args.program), cwd=self.work_dir,
                env=child_env(self.env, self.run_id, self.log_path), stdin=stdin,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        except OSError as error:
            return self.finish_without_child(error)
        self.cpu_at_start = own_cpu_seconds()
        enlarge_pipe(self.child.stdout.fileno())
        self.relay = Relay(self.child.stdout.fileno(), self.log_fd, stdout_fd(), self.sampler)
        self.relay.start()
        threading.Thread(target=self.heartbeat, name="heartbeat", daemon=True).start()
        if self.gpu_sampler and not self.gpu_sampler.start():
            self.gpu_sampler = None   # no nvidia-smi here
        release_memory()
        return None

    def running_record(self):
        record = self.base_record()
        record.update(seq=self.seq, written_at=self.now(),
                      heartbeat_interval=self.config.get("wrap", "heartbeat_interval"),
                      log_size=self.relay.bytes if self.relay else 0,
                      last_line=mask_secrets(self.relay.last_line()) if self.relay else "",
                      warnings=list(self.warnings))
        record.update(self.observations())
        return record

    def observations(self):
        """What the wrapper learnt of the training: progress, metric sample, memory, GPUs."""
        gpu_stats = self.gpu_sampler.summary() if self.gpu_sampler else None
        gpus = {"visible": ",".join(self.gpu_tokens),
                "names": [gpu["name"] for gpu in (gpu_stats or {}).get("gpus", [])]} if self.gpu_tokens else None
        return {"progress": self.sampler.progress, "peak_rss": self.peak_rss or None, "gpus": gpus,
                "gpu_stats": gpu_stats, "output_at": self.relay.output_at if self.relay else None,
                "checkpoint": self.sampler.checkpoint, "forecast": self.sampler.forecast(),
                "metric": {"name": self.sampler.name, "values": list(self.sampler.values)}
                if self.sampler.values else None}

    def write_running(self):
        with self.lock:
            if self.stopped.is_set() and self.seq:
                return
            self.seq += 1
            try:
                self.write_record("running", self.running_record())
            except OSError as error:
                self.warn_once("cannot write heartbeat: %s" % (error.strerror or error))

    def write_record(self, sub, record):
        """Write a record; state dirs removed meanwhile (a scratch purge, rm -rf) are made again."""
        try:
            write_json_atomic(self.paths(sub), record)
        except FileNotFoundError:
            make_state_dirs(self.work_dir)
            write_json_atomic(self.paths(sub), record)

    def warn_once(self, message):
        if message not in self.warned:
            self.warned.add(message)
            print_warning(message)

    def heartbeat(self):
        """Sample the training's memory every few seconds; rewrite the running record every interval."""
        interval = max(1.0, self.config.get("wrap", "heartbeat_interval"))
        step = min(interval, MEMORY_SAMPLE_INTERVAL)
        next_beat = time.monotonic() + interval
        recheck_before = self.config.get("notify", "time_limit_margin") + 2 * interval
        while not self.stopped.wait(step):
            self.peak_rss = max(self.peak_rss, tree_rss(self.child.pid) if self.child else 0)
            if self.subreaper:
                reap_orphans(self.child.pid)
            if time.monotonic() >= next_beat:
                next_beat += interval
                self.recheck_end_time(recheck_before)
                self.write_running()

    def recheck_end_time(self, recheck_before):
        """A job's time limit can be raised while it runs (Slurm: scontrol update). From just
        before the time-limit warning on, ask the scheduler again each heartbeat, so that the
        warning, status and the time-limit cause follow a new end (about 12 calls a job with the
        defaults). A run forecast to miss its limit is asked about every few minutes, so that a
        limit raised early is seen."""
        job = self.job
        if not job or not job.get("end_time") or self.signals:
            return
        left = job["end_time"] - self.now()
        if left > recheck_before and not self.behind_recheck_due(left):
            return
        followed = self.scheduler.follow_end(job, self.runner)
        if followed and not self.signals:
            with self.lock:
                job["end_time"], job["time_limit"] = followed

    def behind_recheck_due(self, left):
        snapshot = self.sampler.forecast()
        if not snapshot or snapshot.get("eta") is None or \
                snapshot["eta"] <= left - self.config.get("notify", "time_limit_margin"):
            return False
        every = max(self.config.get("wrap", "heartbeat_interval"), min(300.0, self.config.get("monitor", "forecast_after")))
        if self.rechecked_at is not None and time.monotonic() - self.rechecked_at < every:
            return False
        self.rechecked_at = time.monotonic()
        return True

    def on_signal(self, number, frame):
        name = signal_name(number)
        if number in [signal_number(s) for s in WARNING_SIGNALS]:
            self.warning_signals[name] = self.now()
            self.warnings.append(signal_warning(name, self.now(), (self.job or {}).get("end_time")))
            if number in self.forward and self.child:
                signal_tree(self.child.pid, number)
            threading.Thread(target=self.write_running, daemon=True).start()
            return
        self.signals.append((number, self.now()))
        if self.stopped.is_set():
            return
        if len(self.signals) == 1:
            # the forward and the kill come whatever happens to the record: never an orphan
            threading.Thread(target=self.forward_and_wait, args=(number,), daemon=True).start()
            try:
                self.write_completion(final=False)
            except OSError as error:
                self.warn_once("cannot write the provisional record: %s" % (error.strerror or error))
        elif self.child and self.child.returncode is None:
            signal_tree(self.child.pid, number if len(self.signals) == 2 else signal.SIGKILL)

    def forward_and_wait(self, number):
        """Forward once to a training still alive after a second, then kill it after the grace."""
        if self.child is None or self.child_exits_within(FORWARD_DELAY):
            return
        if not (number == signal.SIGINT and terminal_delivered_sigint()):
            signal_tree(self.child.pid, number)
        if not self.child_exits_within(self.grace):
            print_warning("training still running %.0fs after %s: killing it" % (self.grace, signal_name(number)))
            signal_tree(self.child.pid, signal.SIGKILL)

    def child_exits_within(self, seconds):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.child.returncode is not None or not process_running(self.child.pid):
                return True
            time.sleep(0.05)
        return False

    def wait(self):
        returncode = self.child.wait()
        self.child_exit_time = self.now()
        self.cpu_while_running = own_cpu_seconds() - self.cpu_at_start
        self.drain()
        return returncode

    def drain(self):
        """Let the relay finish what the training wrote: until its pipe is idle for DRAIN_IDLE,
        DRAIN_MAX at most (a daemon grandchild may hold the pipe open and write for ever), and
        not at all once a signal came (the job is being stopped)."""
        started = idle_since = time.monotonic()
        seen = self.relay.bytes
        while self.relay.is_alive() and not self.signals:
            now = time.monotonic()
            if self.relay.bytes != seen:
                seen, idle_since = self.relay.bytes, now
            if now - idle_since >= DRAIN_IDLE or now - started >= DRAIN_MAX:
                break
            self.relay.join(DRAIN_STEP)

    def completion_record(self, returncode, final):
        signals = [(n, t) for n, t in self.signals if t <= (self.child_exit_time or t)]
        number, when = signals[0] if signals else (None, None)
        oom_after = read_cgroup_oom_kills() if final else None
        status, exit_code, sig, cause = classify_ending(
            returncode, number, when, self.job, self.oom_before, oom_after, dict(self.warning_signals))
        end_time = self.now()
        record = self.base_record()
        record.update(status=status, exit_code=exit_code, signal=sig, cause=cause, final=final,
                      end_time=end_time, timestamp=format_local_time(end_time),
                      duration=end_time - self.start_time, log_size=self.relay.bytes if self.relay else 0)
        if returncode is not None:
            record["child_returncode"] = returncode
        if final and self.child is not None:
            self.peak_rss = max(self.peak_rss, children_max_rss())
            record["wrapper_cpu"] = own_cpu_seconds()
            record["wrapper_cpu_while_running"] = self.cpu_while_running
        record.update(self.observations())
        if final and self.checkpoint_file:
            record["checkpoint_file"] = self.checkpoint_file
        if self.relay and self.relay.log_error:
            record["log_error"] = self.relay.log_error
        if self.warnings:
            record["warnings"] = list(self.warnings)
        return record

    def write_completion(self, final, returncode=None):
        record = self.completion_record(returncode, final)
        if not final:
            record["grace"] = self.grace
        self.write_record("done", record)
        return record

    def final_look(self):
        """Settle the metric and progress on the log's tail before the final record: the relay's
        looks are a second apart, and its last one may not have come yet (an orphan holds the
        pipe). A log that could not be written fully is not trusted over the relay's look."""
        self.sampler.flush()
        self.checkpoint_file = newest_checkpoint_file(self.work_dir, self.start_time)
        if self.relay and self.relay.log_error:
            return
        try:
            self.sampler.settle(read_tail(self.log_path, CLASSIFY_LINES))
        except (OSError, HpcrunError):
            pass

    def finish(self, returncode):
        self.stopped.set()
        if self.gpu_sampler:
            self.gpu_sampler.stop()
        self.final_look()
        with self.lock:
            record = self.completion_record(returncode, final=True)
            self.write_final(record)
        if self.subreaper:
            kill_leftovers(self.child.pid)
        if not self.relay.is_alive():
            os.close(self.log_fd)  # else a grandchild still writes: the log stays open until we exit
        return record

    def finish_without_child(self, error):
        """The record of a training that could not be started (no such program, not executable)."""
        self.stopped.set()
        record = self.completion_record(127, True)
        record.update(status="failed", exit_code=127, cause="start_failed",
                      log_error="cannot start '%s': %s" % (self.command, error.strerror),
                      start_error=errno.errorcode.get(error.errno, ""))
        self.write_final(record)
        os.close(self.log_fd)
        return record

    def write_final(self, record):
        """The completion record, however full the disk: the whole record (tried twice), a
        smaller one, and last the smaller one written over the running record in place (its
        blocks are allocated already) and renamed into done/. One warning when that was needed;
        if nothing can be written the running record stays, and the run is reported lost."""
        small = small_record(record)
        attempts = ((record, None), (record, FINAL_RETRY_DELAY), (small, None))
        errors = []
        for data, delay in attempts:
            if delay:
                time.sleep(delay)
            try:
                self.write_record("done", data)
            except OSError as error:
                errors.append(error.strerror or str(error))
                continue
            remove_quietly(self.paths("running"))
            if data is small:
                print_warning("cannot write the completion record (%s): wrote a smaller one" % errors[0])
            return True
        try:
            overwrite_in_place(self.paths("running"), small, self.paths("done"))
        except OSError as error:
            print_warning("cannot write the completion record (%s; %s): the monitor will report this "
                          "run as lost" % (errors[0], error.strerror or error))
            return False
        print_warning("cannot write the completion record (%s): wrote a smaller one over the "
                      "heartbeat record" % errors[0])
        return True


def small_record(record):
    """The completion record without what a full disk cannot take: the ending and its times."""
    small = {key: record.get(key) for key in (
        "schema", "hpcrun_version", "run_id", "name", "work_dir", "host", "pid", "start_time",
        "started", "end_time", "timestamp", "duration", "status", "exit_code", "signal", "cause",
        "final", "log_file", "log_error", "test")}
    small["note"] = "smaller completion record: the disk was full"
    return small


def overwrite_in_place(running_path, record, done_path):
    """Write record over the running record's own bytes, padded with spaces to its size (no new
    block is needed), then rename it to done_path. OSError when it does not fit or fails."""
    payload = json.dumps(record, ensure_ascii=True, sort_keys=True).encode("ascii")
    fd = os.open(running_path, os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        size = os.fstat(fd).st_size
        if len(payload) > size:
            raise OSError(errno.ENOSPC, "no room: the heartbeat record is smaller than the record")
        write_all(fd, payload + b" " * (size - len(payload)))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(running_path, done_path)
    fsync_dir(os.path.dirname(done_path))


def become_subreaper():
    """Make the training's orphans (children of a process that exited: 'cmd &' in its script)
    our children, so that they can be found and stopped at its end (Linux 3.4+; best effort)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (ImportError, OSError, AttributeError):
        return False


def release_memory():
    """Give back to the system what compiling this file took (about 14 MB the allocator keeps
    after start-up): the wrapper then holds ~20 MB for the whole run (glibc; best effort)."""
    import gc
    gc.collect()
    try:
        import ctypes
        ctypes.CDLL(None).malloc_trim(0)
    except (ImportError, OSError, AttributeError):
        pass


def process_status(pid):
    """(state letter, parent pid, process group) of a process from /proc, or None."""
    try:
        fields = proc_stat(pid)[1]
        return fields[0].decode("ascii"), int(fields[1]), int(fields[2])
    except (OSError, IndexError, ValueError):
        return None


def ancestor_start(prefix, below=False, depth=8):
    """When the nearest ancestor (or this process) whose name starts with prefix started, or
    with below the one under it on the way here (epoch seconds, from /proc, Linux), or None.
    A scheduler's per-job process (sge_shepherd), or the job shell under its daemon (pbs_mom),
    started with the job; the wrapper perhaps minutes later (a script that stages data first)."""
    try:
        with open("/proc/stat", "rb") as stream:
            boot = float(re.search(br"(?m)^btime (\d+)", stream.read()).group(1))
        ticks, pid, child = float(os.sysconf("SC_CLK_TCK")), os.getpid(), None
        for _ in range(depth):
            name, fields = proc_stat(pid)
            started = boot + int(fields[19]) / ticks
            if name.decode("ascii", "replace").startswith(prefix):
                return child if below else started
            pid, child = int(fields[1]), started
            if pid <= 1:
                return None
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    return None


def reap_orphans(training_pid):
    """Collect the exit status of orphans that died as our children (they would stay zombies);
    never the training's, which its Popen waits for."""
    me = os.getpid()
    for entry in list_dir("/proc"):
        if entry.isdigit() and int(entry) != training_pid:
            status = process_status(int(entry))
            if status and status[0] == "Z" and status[1] == me:
                try:
                    os.waitpid(int(entry), os.WNOHANG)
                except OSError:
                    pass


def kill_leftovers(training_pid, grace=LEFTOVER_GRACE):
    """Processes the training left running in our process group ('cmd &' in its script) get
    SIGTERM, then SIGKILL after grace seconds, as a scheduler stops a finished job's step. A
    process that left the group on purpose (setsid: a daemon) is left alone."""
    group, left = os.getpgrp(), []
    for pid in descendants(os.getpid()):
        status = process_status(pid)
        if pid != training_pid and status and status[0] != "Z" and status[2] == group:
            left.append(pid)
    for number in (signal.SIGTERM, signal.SIGKILL):
        for pid in left:
            try:
                os.kill(pid, number)
            except OSError:
                pass
        deadline = time.monotonic() + grace
        while left and time.monotonic() < deadline:
            reap_orphans(training_pid)
            left = [pid for pid in left if process_running(pid)]
            time.sleep(0.02)
        if not left:
            break
    reap_orphans(training_pid)


def stdout_fd():
    """The descriptor of our stdout, or None when it is closed (cron: >&-)."""
    try:
        return sys.stdout.fileno() if sys.stdout is not None else None
    except (AttributeError, OSError, ValueError):
        return None


def reserve_std_fds():
    """Started with stdin, stdout or stderr closed: put /dev/null there, so that no file we
    open (the log, a record) gets descriptor 0, 1 or 2 and receives stray output."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            opened = os.open(os.devnull, os.O_RDWR)
            if opened != fd:
                os.dup2(opened, fd)
                os.close(opened)


def signal_warning(name, now, end_time):
    text = "%s received at %s" % (name, format_local_time(now))
    if end_time:
        text += " (time limit in ~%s)" % format_duration(max(0, end_time - now))
    return text


def tree_rss(pid):
    """Resident memory in bytes of a process and all below it (Linux /proc; 0 elsewhere)."""
    total = 0
    for member in [pid] + descendants(pid):
        try:
            with open("/proc/%d/statm" % member, "rb") as stream:
                total += int(stream.read().split()[1]) * PAGE_SIZE
        except (OSError, IndexError, ValueError):
            continue
    return total


def newest_checkpoint_file(work_dir, since, limits=CHECKPOINT_SEARCH, clock=time.monotonic):
    """The newest checkpoint the run wrote under its work dir (HF checkpoint-<step>/, DeepSpeed
    global_step<N>/, *.ckpt, *.pt, *.pth, *.safetensors modified after since): {path relative
    to the work dir, mtime}, or None. Breadth first, bounded in depth, entries and time; links
    are not followed; hidden dirs are skipped."""
    depth_max, entries_max, seconds = limits
    deadline, seen, best = clock() + seconds, 0, None
    level = [(work_dir, 0)]
    while level and seen < entries_max and clock() < deadline:
        directory, depth = level.pop(0)
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries[:entries_max - seen]:
            seen += 1
            best = newer_checkpoint(entry, since, best)
            if depth + 1 < depth_max and not entry.name.startswith(".") and entry.is_dir(follow_symlinks=False):
                level.append((entry.path, depth + 1))
    return {"path": os.path.relpath(best[1], work_dir), "mtime": best[0]} if best else None


def newer_checkpoint(entry, since, best):
    """(mtime, path) of entry when it is a checkpoint newer than since and than best, else best."""
    if not re.search(CHECKPOINT_FILE_RE, entry.name) or entry.is_symlink():
        return best
    try:
        mtime = entry.stat(follow_symlinks=False).st_mtime
    except OSError:
        return best
    return (mtime, entry.path) if mtime >= since and (best is None or mtime > best[0]) else best


def clock_text(seconds):
    """HH:MM:SS (hours past 24 kept), as schedulers take a time limit."""
    seconds = int(max(0, seconds))
    return "%02d:%02d:%02d" % (seconds // 3600, seconds // 60 % 60, seconds % 60)


def own_cpu_seconds():
    """CPU seconds (user + system) this process has used: what wrapping costs the node."""
    times = os.times()
    return times[0] + times[1]


def children_max_rss():
    """The largest resident size any waited-for child reached (bytes)."""
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    except (ImportError, OSError):
        return 0


def process_running(pid):
    """False once pid has exited (zombie included)."""
    try:
        return proc_stat(pid)[1][0] != b"Z"
    except (OSError, IndexError):
        return pid_alive(pid)


def terminal_delivered_sigint():
    """Ctrl-C at a terminal reaches the whole foreground group, the training included."""
    try:
        return os.isatty(0) and os.tcgetpgrp(0) == os.getpgrp()
    except OSError:
        return False


def install_signal_handlers(handler):
    previous = {}
    for name in TERMINATING_SIGNALS + WARNING_SIGNALS:
        number = getattr(signal, name, None)
        if number is not None:
            previous[number] = signal.signal(number, handler)
    return previous


def restore_signal_handlers(previous):
    for number, handler in previous.items():
        signal.signal(number, handler)


def read_parent_comm():
    try:
        with open("/proc/%d/comm" % os.getppid(), encoding="utf-8", errors="replace") as stream:
            return stream.read()
    except OSError:
        return None


def run_group(config):
    """{"name", "size"} of the sweep this run belongs to (wrap --group), or None."""
    name = str(config.get("wrap", "group") or "").strip()
    if not name:
        return None
    return {"name": name[:NAME_MAX_CHARS], "size": int(config.get("wrap", "group_size") or 0) or None}


def job_facts(env, start_time, parent_comm, runner=subprocess.run):
    """The batch job we run in, with every fact its scheduler gives at start, or None."""
    job = detect_job(env)
    if job:
        entry = scheduler_of(job)
        entry.add_facts(job, start_time, env, runner)
        job["outlives"] = entry.outlives(env, parent_comm)
        job["release"] = release_command(job)
    return job


def wrap_training(args, config, env):
    """Run the training under the wrapper; the completion record is on disk when this returns."""
    parent_comm = read_parent_comm()
    wrapper = Wrapper(args, config, env, parent_comm=parent_comm)
    warning = wrapper.scheduler.launch_warning(env, parent_comm) if wrapper.job else None
    if warning:
        print_warning(warning)
    try:
        register_work_dir(wrapper.work_dir, wrapper.start_time, env)
    except OSError as error:
        print_warning("cannot register '%s' in '%s': %s" % (wrapper.work_dir, hpcrun_home(env),
                                                           error.strerror or error))
    previous = install_signal_handlers(wrapper.on_signal)
    try:
        record = wrapper.start() or wrapper.finish(wrapper.wait())
    finally:
        restore_signal_handlers(previous)
    if record.get("cause") == "start_failed":
        emit("hpcrun: error: %s" % record["log_error"], sys.stderr)
    elif record.get("log_error"):
        print_warning(record["log_error"])
    return wrapper, record


def run_then(command, wrapper, record):
    """wrap --then: run CMD once the completion record is durable; its status never changes ours."""
    env = child_env(wrapper.env, wrapper.run_id, wrapper.log_path)
    env.update(HPCRUN_STATUS=record["status"], HPCRUN_EXIT_CODE=str(record["exit_code"]))
    started = time.time()
    previous = install_signal_handlers(lambda number, frame: None)  # e.g. the scancel it runs
    try:
        exit_code = subprocess.call(child_argv(command, None), cwd=wrapper.work_dir, env=env,
                                    stdin=subprocess.DEVNULL)
    except OSError as error:
        exit_code = 127
        print_warning("cannot run --then '%s': %s" % (command, error.strerror))
    finally:
        restore_signal_handlers(previous)
    if exit_code:
        print_warning("--then '%s' exited %d" % (command, exit_code))
    path = os.path.join(wrapper.work_dir, STATE_DIR, "then", wrapper.run_id + ".json")
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_json_atomic(path, {"run_id": wrapper.run_id, "command": command, "exit_code": exit_code,
                                 "start_time": started, "end_time": time.time()})
    except OSError as error:
        print_warning("cannot record the --then status: %s" % (error.strerror or error))
    return exit_code


# --- GPUs: one nvidia-smi for the whole run, what the job's GPUs did ---

GPU_QUERY = "timestamp,index,uuid,name,utilization.gpu,memory.used,memory.total,power.draw,power.limit"
GPU_TIME_RE = r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d(?:\.\d+)?$"


def parse_gpu_row(line):
    """A row of `nvidia-smi --query-gpu=GPU_QUERY --format=csv,noheader,nounits`, as a dict,
    or None for anything else (-l prints Xid and ECC events between rows). [N/A], [Not
    Supported], [Unknown Error] are unknown (None), never zero."""
    fields = [field.strip() for field in line.strip().split(", ")]
    if len(fields) > 9:   # a GPU name with ", " in it: the name is whatever lies between
        fields = fields[:3] + [", ".join(fields[3:len(fields) - 5])] + fields[len(fields) - 5:]
    if len(fields) != 9 or not re.match(GPU_TIME_RE, fields[0]) or not fields[1].isdigit():
        return None
    try:
        when = time.mktime(time.strptime(fields[0].split(".")[0], "%Y/%m/%d %H:%M:%S"))
    except (ValueError, OverflowError):
        return None
    when += float("0." + fields[0].split(".")[1]) if "." in fields[0] else 0.0
    numbers = [gpu_number(field) for field in fields[4:]]
    return {"time": when, "index": int(fields[1]), "uuid": fields[2], "name": fields[3],
            "util": numbers[0], "mem_used": numbers[1], "mem_total": numbers[2], "power": numbers[3],
            "power_limit": numbers[4]}


def gpu_number(field):
    try:
        value = float(field)
    except ValueError:
        return None   # [N/A], [Not Supported], [Unknown Error], [GPU is lost]
    return value if value == value and abs(value) != float("inf") else None


def job_gpu_tokens(env):
    """The GPUs given to the job as CUDA sees them (indices, UUIDs or MIG ids), or None when the
    job says nothing of its GPUs (a lab server: nvidia-smi would show other people's)."""
    for name in ("CUDA_VISIBLE_DEVICES", "GPU_DEVICE_ORDINAL"):
        if env.get(name) is not None and env.get(name).strip() not in ("", "NoDevFiles"):
            return parse_list(env[name])
    for name in ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):
        if env.get(name):
            return parse_list(env[name])   # global ids: matched only when nothing else says more
    return None


def pick_gpu_rows(rows, tokens, mig_parents=None):
    """The rows of the job's GPUs: by UUID (a prefix is enough), by the parent of a MIG id, by
    index. Integer tokens that do not all exist, or that name 0..n-1 of n visible rows, mean a
    device cgroup renumbered them: then every visible row is the job's (reference §1.5)."""
    picked = []
    for token in tokens:
        if token.startswith("MIG-"):
            parent = (mig_parents or {}).get(token) or (token[4:].split("/")[0] if token.startswith("MIG-GPU-")
                                                         else None)
            picked += [row for row in rows if parent and row["uuid"] == parent]
        elif token.startswith("GPU-"):
            picked += [row for row in rows if row["uuid"].startswith(token)]
    numbers = [int(token) for token in tokens if token.isdigit()]
    indices = set(row["index"] for row in rows)
    if numbers and (not set(numbers) <= indices or sorted(numbers) == list(range(len(rows)))):
        return list(rows)
    picked += [row for row in rows if row["index"] in numbers]
    unique = collections.OrderedDict((row["uuid"] or row["index"], row) for row in picked)
    return list(unique.values())


class GpuStats(object):
    """What one GPU did over the run, in constant memory: means, maxima, the last sample and
    the start of its current idle streak (times are nvidia-smi's own timestamps)."""

    def __init__(self, row):
        self.index, self.uuid, self.name = row["index"], row["uuid"], row["name"]
        self.samples = 0
        self.util_sum = self.util_count = self.power_sum = self.power_count = 0.0
        self.util_max = self.mem_max = None
        self.mem_total = self.power_limit = self.util_last = self.power_last = None
        self.idle_since = self.busy_since = None
        self.last_time = row["time"]

    def add(self, row, idle_threshold):
        self.samples += 1
        self.last_time = row["time"]
        self.mem_total = row["mem_total"] if row["mem_total"] is not None else self.mem_total
        self.power_limit = row["power_limit"] if row["power_limit"] is not None else self.power_limit
        if row["mem_used"] is not None:
            self.mem_max = max(self.mem_max or 0.0, row["mem_used"])
        self.power_last = row["power"]
        if row["power"] is not None:
            self.power_sum += row["power"]
            self.power_count += 1
        self.util_last = row["util"]
        if row["util"] is None:
            return   # unknown: neither idle nor busy
        self.util_sum += row["util"]
        self.util_count += 1
        self.util_max = max(self.util_max or 0.0, row["util"])
        if row["util"] <= idle_threshold:
            self.idle_since = self.idle_since if self.idle_since is not None else row["time"]
            self.busy_since = None
        else:
            self.busy_since = self.busy_since if self.busy_since is not None else row["time"]
            self.idle_since = None

    def summary(self):
        mean = lambda total, count: round(total / count, 1) if count else None
        return {"index": self.index, "uuid": self.uuid, "name": self.name, "samples": self.samples,
                "util_mean": mean(self.util_sum, self.util_count), "util_max": self.util_max,
                "util_last": self.util_last, "mem_max": self.mem_max, "mem_total": self.mem_total,
                "power_mean": mean(self.power_sum, self.power_count), "power_last": self.power_last,
                "power_limit": self.power_limit,
                "idle_for": self.last_time - self.idle_since if self.idle_since is not None else None,
                "idle_since": self.idle_since,
                "busy_for": self.last_time - self.busy_since if self.busy_since is not None else None}


class GpuSampler(object):
    """One long-lived `nvidia-smi --query-gpu=... -l N` for the whole run (not a fork per
    sample), read by a thread: each GPU of the job in constant memory. nvidia-smi missing,
    failing, silent for three intervals or printing nothing usable: one warning, sampling off,
    the training untouched. It is stopped with the training."""

    def __init__(self, tokens, interval, idle_threshold, warn, popen=subprocess.Popen, clock=time.monotonic):
        self.tokens = tokens
        self.interval = max(1, int(interval))
        self.idle_threshold = idle_threshold
        self.warn = warn
        self.popen = popen
        self.clock = clock
        self.stats = collections.OrderedDict()   # uuid or index -> GpuStats
        self.process = None
        self.lock = threading.Lock()
        self.heard = None     # our clock at the last usable row
        self.stopped = threading.Event()
        self.mig_parents = {}
        self.visible = None   # rows in one sample, once one was complete
        self.reader = None
        self.terminated = False   # stopped by us: its exit is no news

    def start(self):
        program = find_program("nvidia-smi")
        if not program:
            self.warn("GPU sampling off: the job has GPUs (%s) but nvidia-smi is not on PATH" % ",".join(self.tokens))
            return False
        if any(token.startswith("MIG-") for token in self.tokens):
            self.mig_parents = mig_parents(run_quietly([program, "-L"]))
        try:
            self.process = self.popen([program, "--query-gpu=" + GPU_QUERY, "--format=csv,noheader,nounits",
                                       "-l", str(self.interval)], stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        except OSError as error:
            self.warn("GPU sampling off: cannot run nvidia-smi: %s" % (error.strerror or error))
            return False
        self.heard = self.clock()
        self.reader = threading.Thread(target=self.read, name="nvidia-smi", daemon=True)
        self.reader.start()
        threading.Thread(target=self.watch, name="nvidia-smi-watch", daemon=True).start()
        return True

    def read(self):
        """Rows come one per GPU, each with its own millisecond timestamp: a sample is complete
        when as many rows came as the first sample had, or when an index comes again."""
        batch = []
        for raw in iter(self.process.stdout.readline, b""):
            row = parse_gpu_row(raw.decode("utf-8", errors="replace"))
            if row is None:
                continue
            if any(seen["index"] == row["index"] for seen in batch):
                self.take(batch)
                batch = []
            batch.append(row)
            if len(batch) == self.visible:
                self.take(batch)
                batch = []
        if batch:
            self.take(batch)
        code = self.process.wait()
        if not self.terminated:
            self.warn("GPU sampling off: nvidia-smi exited with status %s" % code)

    def take(self, rows):
        """One sample of every GPU (rows with one timestamp): the job's are counted."""
        with self.lock:
            self.visible = max(self.visible or 0, len(rows))
            for row in pick_gpu_rows(rows, self.tokens, self.mig_parents):
                key = row["uuid"] or row["index"]
                if key not in self.stats:
                    self.stats[key] = GpuStats(row)
                self.stats[key].add(row, self.idle_threshold)
            self.heard = self.clock()

    def watch(self):
        """A nvidia-smi that hangs (no row for three intervals) is stopped: sampling off."""
        while not self.stopped.wait(self.interval):
            if self.clock() - self.heard > 3 * self.interval + GPU_START_SLACK and self.process.poll() is None:
                self.warn("GPU sampling off: nvidia-smi printed no row for %ds" % (3 * self.interval))
                self.stop()
                return

    def stop(self):
        """Stop nvidia-smi (SIGTERM, SIGKILL after 2 s) and read what it printed until then."""
        self.stopped.set()
        if self.process and self.process.poll() is None:
            self.terminated = True
            self.process.terminate()
            try:
                self.process.wait(2)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.reader and self.reader is not threading.current_thread():
            self.reader.join(2)
            if not self.reader.is_alive():
                self.process.stdout.close()

    def summary(self):
        """The bounded summary that goes into the heartbeat and the completion record."""
        with self.lock:
            gpus = [stats.summary() for stats in self.stats.values()]
        return {"interval": self.interval, "gpus": gpus} if gpus else None


def mig_parents(text):
    """{MIG id: parent GPU-uuid} from `nvidia-smi -L` (MIG devices are listed under their GPU)."""
    parents, parent = {}, None
    for line in (text or "").splitlines():
        gpu = re.search(r"^GPU \d+: .*\(UUID: (GPU-[0-9a-fA-F-]+)\)", line)
        mig = re.search(r"^\s+MIG .*\(UUID: (MIG-[^)]+)\)", line)
        if gpu:
            parent = gpu.group(1)
        elif mig and parent:
            parents[mig.group(1)] = parent
    return parents


def gpu_verdict(stats, idle_threshold):
    """("idle", seconds) when every GPU is idle, ("unused", seconds, k, n) when some are busy and
    k of n idle, None otherwise; seconds: how long that has lasted."""
    gpus = (stats or {}).get("gpus") or []
    idle = [gpu for gpu in gpus if gpu.get("idle_for") is not None]
    if not gpus or not idle:
        return None
    if len(idle) == len(gpus):
        return ("idle", min(gpu["idle_for"] for gpu in idle), len(idle), len(gpus))
    busy = [gpu for gpu in gpus if gpu.get("busy_for") is not None]
    if busy:
        return ("unused", min(gpu["idle_for"] for gpu in idle), len(idle), len(gpus))
    return None


def nccl_hang_suspected(stats):
    """Every GPU at >= 90 % 'utilisation' with power near idle: a kernel spinning in a hung
    collective, not work (reference §1.7)."""
    gpus = (stats or {}).get("gpus") or []
    return bool(gpus) and all((gpu.get("util_last") or 0) >= 90 and gpu.get("power_last") is not None and
                              gpu.get("power_limit") and gpu["power_last"] < IDLE_POWER_SHARE * gpu["power_limit"]
                              for gpu in gpus)


def gpu_card(stats, messages):
    """GPUs: 4× A100-SXM4-80GB · util 87 % avg (min GPU 3: 12 %) · memory max 71/80 GiB · power 310/400 W avg"""
    gpus = (stats or {}).get("gpus") or []
    if not gpus:
        return None
    names = collections.Counter(gpu.get("name") or "GPU" for gpu in gpus)
    parts = [", ".join("%d× %s" % (count, name.replace("NVIDIA ", "")) for name, count in names.items())]
    utils = [gpu for gpu in gpus if gpu.get("util_mean") is not None]
    if utils:
        mean = sum(gpu["util_mean"] for gpu in utils) / len(utils)
        low = min(utils, key=lambda gpu: gpu["util_mean"])
        text = messages["gpu_util"].format(util=round(mean))
        if len(utils) > 1 and mean - low["util_mean"] >= GPU_SPREAD:
            text += messages["gpu_util_min"].format(index=low["index"], util=round(low["util_mean"]))
        parts.append(text)
    mems = [gpu for gpu in gpus if gpu.get("mem_max") is not None and gpu.get("mem_total")]
    if mems:
        parts.append(messages["gpu_memory"].format(
            used=round(max(gpu["mem_max"] for gpu in mems) / 1024.0), total=round(max(gpu["mem_total"] for gpu in mems) / 1024.0)))
    powers = [gpu for gpu in gpus if gpu.get("power_mean") is not None]
    if powers:
        limit = [gpu["power_limit"] for gpu in powers if gpu.get("power_limit")]
        parts.append(messages["gpu_power"].format(power=round(sum(g["power_mean"] for g in powers) / len(powers)),
                                                  limit=round(max(limit)) if limit else "?"))
    unused = [gpu for gpu in utils if (gpu.get("util_max") or 0) <= GPU_UNUSED_UTIL]
    if unused and len(unused) < len(gpus):
        parts.append(messages["gpu_unused_flag"].format(list=", ".join(str(gpu["index"]) for gpu in unused)))
    elif unused:
        parts.append(messages["gpu_all_unused"])
    return " · ".join(parts)


# --- report: title and body from a record ---

class Report(object):
    """What a channel sends: a title, header lines that always survive, a log tail, named fields."""

    def __init__(self, title, header, tail, language, max_chars, fields=None):
        self.title = title
        self.header = header
        self.tail = tail
        self.language = language
        self.max_chars = max_chars
        self.fields = fields or {}

    def text(self, limit, unit="chars"):
        """The body within a channel's limit and [report] max_chars: the tail is cut from the top."""
        if unit == "chars":
            return fit_text(self.header, self.tail, min(limit, self.max_chars), unit, MESSAGES[self.language])
        text = fit_text(self.header, self.tail, limit, unit, MESSAGES[self.language])
        if len(text) > self.max_chars:
            text = fit_text(self.header, self.tail, self.max_chars, "chars", MESSAGES[self.language])
        return text


TRUSTED_CAUSES = ("time_limit", "oom", "cancelled", "preempted", "interrupted", "node_fail",
                  "cpu_limit", "start_failed")
TEMPLATE_FIELDS = ("name", "status", "cause", "label", "duration", "exit_code", "signal", "host", "job_id",
                   "progress", "metric", "work_dir", "log_file", "command", "start", "end", "run_id",
                   "peak_memory", "gpus", "cost", "eta", "checkpoint")


def one_line(text, limit):
    text = " ⏎ ".join(line.strip() for line in str(text).strip().splitlines() if line.strip())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def format_bytes(count):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return ("%.1f %s" % (count, unit)) if unit != "B" else "%d B" % count
        count /= 1024.0


def user_label(uid):
    """'alice (uid 1000)', or 'uid 1000' for a uid this host cannot name."""
    import pwd
    try:
        return "%s (uid %d)" % (pwd.getpwuid(uid).pw_name, uid)
    except (KeyError, OverflowError):
        return "uid %d" % uid


def is_within(path, root):
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def foreign_symlink(path, uid):
    """The first symlink on the way to path that belongs to neither uid nor root, or None."""
    current = os.sep
    for part in os.path.abspath(path).split(os.sep)[1:]:
        current = os.path.join(current, part)
        try:
            info = os.lstat(current)
        except OSError:
            return None
        if stat.S_ISLNK(info.st_mode) and info.st_uid not in (uid, 0):
            return current
    return None


def open_named_file(name, work_dir, roots, author_uid, uid=None):
    """A file a record names (its log, the job's output file), opened only when showing it is
    safe: the record's author is this user, no symlink of another user leads there, it is a
    regular file, and it lies in the work dir or log dir or belongs to this user. Anyone in a
    group-writable project dir can plant a record naming ~/.ssh/id_ed25519; UnsafeFile says why
    not."""
    uid = os.geteuid() if uid is None else uid
    if author_uid is not None and author_uid != uid:
        raise UnsafeFile("the record was written by %s, files it names are not read" % user_label(author_uid))
    path = os.path.join(work_dir, name)
    link = foreign_symlink(path, uid)
    if link:
        raise UnsafeFile("'%s' is a symbolic link of %s" % (link, user_label(os.lstat(link).st_uid)))
    real = os.path.realpath(path)
    if os.path.islink(real):
        raise UnsafeFile("a symbolic link loop")
    stream = open_regular_file(real, follow=False)
    owner = os.fstat(stream.fileno()).st_uid
    if owner != uid and not any(is_within(real, os.path.realpath(root)) for root in roots):
        stream.close()
        raise UnsafeFile("outside the work dir and owned by %s" % user_label(owner))
    return stream


def read_named_tail(record, name, work_dir, line_count, roots, uid=None):
    """The last cleaned lines of a file a record names, under open_named_file's rules."""
    with open_named_file(name, work_dir, roots, record.get("author_uid"), uid) as stream:
        return read_tail(stream, line_count)


def named_file_roots(config, work_dir):
    """Where the files a record names may lie whoever owns them: the work dir and the log dir."""
    return [work_dir, os.path.join(work_dir, str(config.get("wrap", "log_dir") or "logs"))]


def read_log_lines(record, work_dir, messages, roots, uid=None):
    """Up to CLASSIFY_LINES cleaned lines from the end of the run's log, or ([], why not)."""
    log_file = record.get("log_file")
    if not log_file:
        return [], None
    try:
        lines = read_named_tail(record, log_file, work_dir, CLASSIFY_LINES, roots, uid)
    except (OSError, HpcrunError) as error:
        return [], messages["no_log"].format(reason=getattr(error, "strerror", None) or error)
    lines = [mask_secrets(line) for line in mask_key_blocks(lines)]
    return lines, None if lines else messages["no_log"].format(reason=messages["no_log_empty"])


def scheduler_output_lines(record, work_dir, roots, uid=None):
    """The end of the job's own output file (slurm-%j.out), where the scheduler writes why it killed."""
    path = (record.get("job") or {}).get("output_file")
    if not path or record.get("status") not in ("lost", "killed", "terminated"):  # the scheduler stopped it?
        return []
    try:
        return [mask_secrets(line) for line in mask_key_blocks(read_named_tail(record, path, work_dir, 50, roots, uid))]
    except (OSError, HpcrunError):
        return []


def resolve_cause(record, lines, scheduler_lines=()):
    """(cause, the log line that shows it): the ending's facts first, then the log; the
    scheduler's own output file (scheduler_lines) may say why it stopped a job."""
    recorded = record.get("cause")
    if record.get("status") not in CAUSE_STATUSES:
        return None, None
    if recorded == "cancelled":  # the scheduler's output file may say why: preemption, time limit
        cause, line = classify_log(list(scheduler_lines))
        if cause in ("preempted", "time_limit", "node_fail"):
            return cause, line
    if recorded in TRUSTED_CAUSES:
        return recorded, None
    cause, line = classify_log(list(scheduler_lines) + lines)
    if cause:
        return cause, line
    return (recorded if recorded not in ("exit_code", "unknown") else None), None


def cause_label(cause, line, messages):
    if cause == "exception" and line:
        return exception_name(line)
    return messages.get("label_" + str(cause)) if cause else None


def job_summary(job, duration, messages):
    if not job:
        return None
    parts = [job_label(job)]
    if job.get("partition"):
        parts.append("%s %s" % (messages["job_partition"], job["partition"]))
    if job.get("nodes"):
        parts.append("%s %s" % (messages["job_nodes"], job["nodes"]))
    if (job.get("time_limit") or 0) >= 1:
        used = int(round(100.0 * (duration or 0) / job["time_limit"]))
        parts.append(messages["job_limit"].format(limit=format_duration(job["time_limit"]), used=used))
    return " · ".join(parts)


def report_hours(record, duration):
    """(GPU hours, core hours) a report speaks of: of the run so far, of the idle GPUs for
    gpu_idle and gpu_unused, of the allocation since the training ended for a release reminder."""
    if record.get("status") == "gpu_idle":
        return billed_hours(record.get("job"), record.get("gpu_stats"), record.get("idle_for"), cpus=False)
    if record.get("status") == "gpu_unused":
        return (record.get("gpus_idle") or 0) * max(0.0, record.get("idle_for") or 0) / 3600.0, 0.0
    seconds = record.get("since") if record.get("status") == "release_reminder" else duration
    return billed_hours(record.get("job"), record.get("gpu_stats"), seconds)


def billed_hours(job, gpu_stats, seconds, cpus=True):
    """(GPU hours, core hours) billed for seconds of the allocation (not of use): the job's GPUs
    and CPUs from its scheduler, else the GPUs it was given."""
    hours = max(0.0, seconds or 0) / 3600.0
    gpus = (job or {}).get("gpus") or len((gpu_stats or {}).get("gpus") or [])
    return gpus * hours, ((job or {}).get("cpus") or 0) * hours if cpus else 0.0


def cost_text(gpu_hours, cpu_hours, config, messages):
    """12.5 GPU-h ≈ ¥112 (core hours when no GPU, or when they have a price); None for nothing."""
    if config is None:
        return None
    gpu_price, cpu_price = config.get("cost", "gpu_hour"), config.get("cost", "cpu_hour")
    parts = []
    gpu_hours, cpu_hours = (hours if hours >= 0.005 else 0.0 for hours in (gpu_hours, cpu_hours))
    if gpu_hours:
        parts.append(messages["gpu_hours"].format(hours=format_hours(gpu_hours)))
    if cpu_hours and (not gpu_hours or cpu_price):
        parts.append(messages["cpu_hours"].format(hours=format_hours(cpu_hours)))
    money = gpu_hours * gpu_price + cpu_hours * cpu_price
    if parts and money:
        return "%s ≈ %s%s" % (" · ".join(parts), config.get("cost", "currency"), format_money(money))
    return " · ".join(parts) or None


def format_hours(hours):
    return "%.2f" % hours if hours < 1 else "%.1f" % hours if hours < 100 else "%.0f" % hours


def format_money(amount):
    return "%.2f" % amount if amount < 10 else "%.0f" % amount


def gpu_state(stats):
    """GPU0 98 % 71 W · GPU1 97 % 70 W: what each GPU does now (a stalled or lost report)."""
    gpus = (stats or {}).get("gpus") or []
    return " · ".join("GPU%s %s %% %s W" % (gpu["index"], "?" if gpu.get("util_last") is None else
                                           "%g" % gpu["util_last"], "?" if gpu.get("power_last") is None else
                                           "%.0f" % gpu["power_last"]) for gpu in gpus) or None


def last_output(record, fields, messages):
    """The training's last line and how long ago it came (wrap's clock on both sides)."""
    line = fields.get("last_line")
    if not line:
        return None
    if record.get("output_at") and record.get("last_heartbeat"):
        age = max(0.0, record["last_heartbeat"] - record["output_at"])
        return messages["ago"].format(line=line, age=format_duration(age))
    return line


def gpu_summary(gpus):
    if not isinstance(gpus, dict):
        return None
    names = gpus.get("names") or []
    text = str(gpus.get("visible") or "")
    if names:
        text += (" " if text else "") + "(%s)" % ", ".join(
            "%s ×%d" % (name, names.count(name)) if names.count(name) > 1 else name
            for name in sorted(set(names)))
    return text or None


def forecast_of(record):
    forecast = record.get("forecast")
    return forecast if isinstance(forecast, dict) else {}


def format_rate(forecast, messages):
    """12.5 epochs/h, 3.2 steps/s: the forecast's rate in the unit the training counts in."""
    if not forecast.get("rate") or not forecast.get("total"):
        return "?"
    per_second = forecast["rate"] * forecast["total"]
    unit = forecast.get("unit") or "it"
    if per_second >= 1:
        return messages["rate_per_second"].format(n="%.3g" % per_second, unit=unit)
    return messages["rate_per_hour"].format(n="%.3g" % (per_second * 3600), unit=unit)


def deadline(record):
    """(seconds the run still needs, seconds the job has left), as of the record's heartbeat;
    None where the rate or the time limit is unknown."""
    forecast, job = forecast_of(record), record.get("job") or {}
    at = record.get("written_at") or record.get("last_heartbeat")
    if forecast.get("eta") is None or not job.get("end_time") or not at:
        return None
    return forecast["eta"], job["end_time"] - at


def eta_text(record, messages):
    """3h10m more (12.5 epochs/h), does not finish before the limit: short by 1h20m"""
    forecast = forecast_of(record)
    if forecast.get("eta") is None:
        return None
    times = deadline(record)
    if times is None:
        verdict = messages["eta_no_limit"]
    elif times[0] <= times[1]:
        verdict = messages["eta_in_time"].format(spare=format_duration(times[1] - times[0]))
    else:
        verdict = messages["eta_late"].format(late=format_duration(times[0] - times[1]))
    return messages["eta_text"].format(eta=format_duration(forecast["eta"]), rate=format_rate(forecast, messages),
                                       verdict=verdict)


def checkpoint_text(record, messages):
    """out/checkpoint-12000 (epoch 55), 12m00s before the end: the newer of the last checkpoint
    the log named and the newest checkpoint file the run wrote."""
    seen = record.get("checkpoint") if isinstance(record.get("checkpoint"), dict) else {}
    found = record.get("checkpoint_file") if isinstance(record.get("checkpoint_file"), dict) else {}
    if found.get("mtime") and (not seen.get("at") or found["mtime"] > seen["at"] + 60):
        seen = {"name": found.get("path"), "at": found["mtime"]}
    if not seen.get("name") or not seen.get("at"):
        return None
    progress = " (%s)" % seen["progress"] if seen.get("progress") else ""
    if record.get("status") in STATUSES and record.get("end_time"):
        return messages["checkpoint_text"].format(name=seen["name"], progress=progress,
                                                  age=format_duration(max(0, record["end_time"] - seen["at"])))
    at = record.get("last_heartbeat") or record.get("written_at") or seen["at"]
    return messages["checkpoint_running"].format(name=seen["name"], progress=progress,
                                                 age=format_duration(max(0, at - seen["at"])))


def report_fields(record, lines, messages, scheduler_lines=(), config=None):
    """Every named field a report (and a [report] template) can show."""
    duration = record.get("duration")
    if duration is None and record.get("start_time") and record.get("end_time"):
        duration = record["end_time"] - record["start_time"]
    if duration is None and record.get("start_time") and record.get("last_heartbeat"):
        duration = record["last_heartbeat"] - record["start_time"]   # a lost run: until its last beat
    job = record.get("job") if isinstance(record.get("job"), dict) else {}
    cause, cause_line = resolve_cause(record, lines, scheduler_lines)
    return {
        "name": one_line(record.get("name") or record.get("run_id") or "?", NAME_MAX_CHARS),
        "run_id": record.get("run_id") or "",
        "status": record.get("status") or "unknown", "cause": cause or "", "cause_line": cause_line,
        "label": cause_label(cause, cause_line, messages),
        "duration": format_duration(duration) if duration is not None else "?", "seconds": duration,
        "exit_code": record.get("exit_code", "?"), "signal": record.get("signal") or "",
        "host": record.get("host") or "", "job_id": job.get("id") or "",
        "progress": parse_progress(lines) or record.get("progress") or "",
        "metric": metric_line(record, lines) or "",
        "last_line": mask_secrets(one_line(lines[-1] if lines else record.get("last_line") or "", LINE_MAX_CHARS)),
        "work_dir": record.get("work_dir") or "", "log_file": record.get("log_file") or "",
        "command": mask_secrets(one_line(record.get("command") or "", 300)),
        "start": format_local_time(record["start_time"]) if record.get("start_time") else "",
        "end": format_local_time(record["end_time"]) if record.get("end_time") else "",
        "peak_memory": format_bytes(record["peak_rss"]) if record.get("peak_rss") else "",
        "gpus": gpu_card(record.get("gpu_stats"), messages) or gpu_summary(record.get("gpus")) or "",
        "cost": cost_text(*report_hours(record, duration), config=config, messages=messages) or "",
        "idle": format_duration(record.get("idle_for") or 0), "gpus_total": record.get("gpus_total") or 0,
        "gpus_idle": record.get("gpus_idle") or 0, "threshold": "%g" % (record.get("idle_threshold") or 0),
        "silence": format_duration(record.get("silence") or 0),
        "remaining": format_duration(record.get("remaining") or 0),
        "needs": format_duration(forecast_of(record).get("eta") or 0),
        "left": format_duration(record.get("left") or 0), "stops": record.get("stops") or "",
        "rate": format_rate(forecast_of(record), messages),
        "eta": eta_text(record, messages) or "", "checkpoint": checkpoint_text(record, messages) or "",
        "since": format_duration(record.get("since") or 0),
        "release": record.get("release") or job.get("release") or "?",
    }


def build_report(record, config, work_dir, uid=None):
    """The report of a record, in the configured language: title, header, log tail.

    uid: the user the monitor runs as; files the record names are read as open_named_file allows."""
    if record.get("status") in ("array_done", "array_failing"):
        return array_report(record, config, work_dir, uid)
    language = config.get("notify", "language")
    messages = MESSAGES[language]
    status = record.get("status") if record.get("status") in STATUSES + EVENT_STATUSES else "unknown"
    roots = named_file_roots(config, work_dir)
    lines, log_note = read_log_lines(record, work_dir, messages, roots, uid)
    fields = report_fields(record, lines, messages, scheduler_output_lines(record, work_dir, roots, uid), config)
    title, title_note = fill_report_template(config, "title_template", fields)
    title = title or report_title(status, fields, messages)
    if record.get("test"):
        title = messages["test_prefix"] + title
    header, header_note = fill_report_template(config, "header_template", fields)
    header = header.splitlines() if header else \
        report_header(record, messages, status, fields, [note for note in (title_note, header_note) if note], config)
    author = record.get("author_uid")
    if author is not None and author != (os.geteuid() if uid is None else uid):
        header.append(messages["foreign_author"].format(user=user_label(author)))
    line_count = config.get("report", "include_last_n_lines")
    tail = lines[-line_count:] if line_count else []
    tail = [messages["tail_header"].format(n=len(tail))] + tail if tail else ([log_note] if log_note else [])
    secrets = config.secrets
    return Report(redact(title, secrets), [redact(line, secrets) for line in header],
                  [redact(line, secrets) for line in tail], language, config.get("report", "max_chars"),
                  {key: redact(value, secrets) if isinstance(value, str) else value
                   for key, value in fields.items()})


def fill_report_template(config, key, fields):
    """(text, note): a [report] template filled with the report's fields; text None when unset
    or when a field's format does not fit its value (the built-in layout is used then, and the
    note says why)."""
    template = config.get("report", key)
    if not template:
        return None, None
    try:
        return template.replace("\\n", "\n").format(**fields), None
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as error:
        return None, "[report] %s: %s" % (key, error)


def array_report(record, config, work_dir, uid=None):
    """The report of an array digest (array_done) or of its fail-fast push (array_failing):
    counts by status and cause, failed tasks as ranges, the resubmit line, durations, and the
    first failure with its log tail."""
    language = config.get("notify", "language")
    messages = MESSAGES[language]
    facts = record.get("array") or {}
    status = record["status"]
    lines, _ = read_log_lines(record, work_dir, messages, named_file_roots(config, work_dir), uid)
    title = messages["title_" + status].format(**array_title_fields(facts, messages))
    cost = cost_text(facts.get("gpu_hours") or 0, facts.get("cpu_hours") or 0, config, messages)
    header = array_header(facts, messages, status, cost)
    tail = lines[-ARRAY_TAIL_LINES:] if facts.get("first_task") and status == "array_done" else []
    if tail:
        tail = [messages["array_tail"].format(task=facts["first_task"], n=len(tail))] + tail
    secrets = config.secrets
    fields = {"name": record.get("name") or "", "status": status, "run_id": record.get("run_id") or "",
              "work_dir": work_dir}
    return Report(redact(title, secrets), [redact(line, secrets) for line in header],
                  [redact(line, secrets) for line in tail], language, config.get("report", "max_chars"), fields)


def array_title_fields(facts, messages):
    name = str(facts.get("id") or "?")
    if facts.get("scheduler") and facts.get("name") and facts["name"] != name:
        name += " " + facts["name"]   # a job array: its id and its name; a sweep: its group name
    causes = "".join(" · %s %s" % (count, label) for label, _, count in facts.get("causes") or [])
    lost = " · %d %s" % (facts["lost"], messages["label_lost"]) if facts.get("lost") else ""
    return {"name": one_line(name, NAME_MAX_CHARS), "ok": facts.get("ok") or 0,
            "total": facts.get("size") or facts.get("reported") or 0, "reported": facts.get("reported") or 0,
            "failed": (facts.get("failed") or 0) + (facts.get("lost") or 0), "causes": causes + lost}


def array_header(facts, messages, status, cost=None):
    """The digest's lines: tasks, failed, unfinished, resubmit (or cancel), durations, first failure.
    A fail-fast push (array_failing) counts the tasks that ended so far and says how to cancel."""
    total = facts.get("size") or facts.get("reported") or 0
    if status == "array_failing":
        return array_failing_header(facts, messages, total)
    counts = messages["array_tasks"].format(total=total, ok=facts.get("ok") or 0, failed=facts.get("failed") or 0,
                                            never=facts.get("never_started") or 0)
    if facts.get("lost"):
        counts += messages["array_lost"].format(n=facts["lost"])
    header = [counts]
    if facts.get("causes"):
        header.append(messages["array_failed"].format(list=" · ".join(
            "%s (%s)" % (tasks, label) for label, tasks, _ in facts["causes"])))
    if facts.get("unfinished"):
        key = "array_never_reported" if facts.get("timed_out") else "array_never_started"
        header.append(messages[key].format(list=facts["unfinished"]))
    elif facts.get("timed_out") and facts.get("never_started"):
        header.append(messages["array_never_reported"].format(list=facts["never_started"]))
    header += [messages["array_resubmit"].format(line=line) for line in facts.get("resubmit") or []]
    if facts.get("median") is not None:
        header.append(messages["array_durations"].format(
            median=format_duration(facts["median"]), fastest=format_duration(facts["fastest"]),
            fastest_task=facts.get("fastest_task"), slowest=format_duration(facts["slowest"]),
            slowest_task=facts.get("slowest_task"), total=format_total(facts["total"])))
    if cost:
        header.append(messages["array_cost"].format(cost=cost))
    if facts.get("first_task"):
        line = messages["array_first"].format(task=facts["first_task"], label=facts.get("first_label") or "?")
        header.append(line + (" — " + facts["first_line"] if facts.get("first_line") else ""))
    return header


def array_failing_header(facts, messages, total):
    header = [messages["array_ended"].format(reported=facts.get("reported") or 0, total=total,
                                             ok=facts.get("ok") or 0, failed=facts.get("failed") or 0)]
    if facts.get("causes"):
        header.append(messages["array_failed"].format(list=" · ".join(
            "%s (%s)" % (tasks, label) for label, tasks, _ in facts["causes"])))
    if facts.get("cancel"):
        header.append(messages["array_cancel"].format(cancel=facts["cancel"]))
    if facts.get("first_task"):
        line = messages["array_first"].format(task=facts["first_task"], label=facts.get("first_label") or "?")
        header.append(line + (" — " + facts["first_line"] if facts.get("first_line") else ""))
    return header


def format_total(seconds):
    """Hours of many tasks together: 121h; below ten hours as a duration (3h12m)."""
    return "%dh" % round(seconds / 3600.0) if seconds >= 36000 else format_duration(seconds)


def report_title(status, fields, messages):
    """✅ 训练完成 resnet50 · 3h12m, ❌ 训练失败 resnet50 · CUDA OOM · exit 1, ⏰ 超时被终止 ..."""
    if status in STATUSES and fields["cause"] == "time_limit":
        return messages["title_time_limit"].format(**fields) + " · " + fields["duration"]
    title = messages["title_" + status].format(**fields)
    shown = {"duration": fields["duration"], "label": fields["label"], "signal": fields["signal"],
             # nothing ran when the command could not start: no exit code to show
             "exit": "exit %s" % fields["exit_code"] if fields["cause"] != "start_failed" else None}
    extras = [shown[extra] for extra in TITLE_EXTRAS.get(status, ())]
    return " · ".join([title] + [extra for extra in extras if extra])


def report_header(record, messages, status, fields, notes=(), config=None):
    """The lines that always survive: the cause first, then what happened, to what, where,
    then the notes (a [report] template that did not fit among them)."""
    header = ["%s: %s" % (messages[key], value) for key, value in header_rows(record, messages, status, fields, config)
              if value not in (None, "")]
    job = record.get("job") or None
    if record.get("final") is False:
        header.append(messages["provisional"])
    if status == "stalled" and nccl_hang_suspected(record.get("gpu_stats")):
        header.append(messages["nccl_hang"])
    if status in STATUSES and fields["cause"] == "time_limit" and not fields["checkpoint"]:
        header.append(messages["no_checkpoint"])
    if status in STATUSES and job and job.get("outlives") and job.get("release"):
        header.append(messages["outlives"].format(release=job["release"]))
    log_error = record.get("log_error")
    if fields["cause"] == "start_failed" and record.get("start_error") is not None:
        code = record["start_error"]
        log_error = messages["start_error"].format(command=fields["command"],
                                                   reason=messages.get("errno_" + code, code))
    notes = [log_error, record.get("note")] + list(notes) + list(record.get("warnings") or [])
    return header + [str(note) for note in notes if note]


def header_rows(record, messages, status, fields, config=None):
    """(message key, value) of each header line, in the order a reader wants them."""
    job = record.get("job") or None
    rows = [
        ("field_cause", cause_text(fields, messages)),
        ("field_status", messages["status_" + status].format(**fields)),
        ("field_exit_code", record.get("exit_code")),
        ("field_signal", record.get("signal")),
        ("field_progress", fields["progress"]),
        ("field_metric", fields["metric"]),
        ("field_name", fields["name"]),
        ("field_command", fields["command"]),
        ("field_work_dir", record.get("work_dir")),
        ("field_host", record.get("host")),
        ("field_job", job_summary(job, fields["seconds"], messages)),
        ("field_gpus", fields["gpus"]),
        ("field_gpu_state", gpu_state(record.get("gpu_stats")) if status in ("stalled", "lost") else None),
        ("field_last_output", last_output(record, fields, messages) if status.startswith("gpu_") else None),
        ("field_cancel", cancel_command(record) if status.startswith("gpu_") else None),
        ("field_cost", fields["cost"] if status != "deadline_forecast" else None),
        ("field_eta", fields["eta"] if status in RUNNING_REPORTS else None),
        ("field_checkpoint", fields["checkpoint"] if status in STATUSES + RUNNING_REPORTS else None),
    ] + [("field_advice", line) for line in advice_lines(record, messages)] + [
        ("field_cost_forecast", cost_forecast(record, config, messages) if status == "deadline_forecast" else None),
        ("field_memory", fields["peak_memory"]),
        ("field_scheduler", record.get("scheduler_state")),
        ("field_last_heartbeat", format_local_time(record["last_heartbeat"])
         if record.get("last_heartbeat") else None),
        ("field_last_line", fields["last_line"] if status in EVENT_STATUSES and not status.startswith("gpu_")
         else None),
        ("field_time_left", fields["remaining"] if status == "time_limit_warning" else None),
        ("field_release", record.get("release") if status == "release_reminder" else None),
        ("field_start", fields["start"]),
        ("field_end", fields["end"]),
        ("field_duration", fields["duration"] if fields["duration"] != "?" else None),
        ("field_log", record.get("log_file")),
    ]
    return gpu_alert_order(rows) if status.startswith("gpu_") else rows


def cause_text(fields, messages):
    """The cause in words, with the log line it came from."""
    cause = fields["cause"]
    text = messages.get("cause_" + cause, cause) if cause else None
    if text and fields["cause_line"]:
        text = "%s — %s" % (text, fields["cause_line"])
    return text


def gpu_alert_order(rows):
    """A GPU alert's rows: what it is about first (the GPUs, the log, the cost, the way out)."""
    first = ("field_gpus", "field_last_output", "field_cost", "field_cancel")
    return rows[:2] + [row for key in first for row in rows if row[0] == key] + \
        [row for row in rows[2:] if row[0] not in first]


def advice_lines(record, messages):
    """What to do about a run that will not finish: what the job's scheduler lets a user do."""
    if record.get("status") != "deadline_forecast" or not record.get("needed_limit"):
        return []
    job = record.get("job") or {}
    lines = [] if record.get("checkpoint") else [messages["advice_checkpoint"]]
    return lines + [messages["advice_" + kind].format(command=command)
                    for kind, command in scheduler_of(job).limit_advice(job, record["needed_limit"])]


def cost_forecast(record, config, messages):
    """¥180 so far, ≈ ¥310 at the end: only where [cost] has prices."""
    times = deadline(record)
    if config is None or times is None or not (config.get("cost", "gpu_hour") or config.get("cost", "cpu_hour")):
        return None
    elapsed = max(0.0, (record.get("last_heartbeat") or 0) - (record.get("start_time") or 0))
    now, end = (cost_text(*billed_hours(record.get("job"), record.get("gpu_stats"), seconds), config=config,
                          messages=messages) for seconds in (elapsed, elapsed + times[0]))
    return messages["cost_forecast"].format(now=now, end=end) if now and end else None


def stop_label(forecast, left):
    """epoch 61/100 (61 %): where the run stands when its time is up, at its rate."""
    fraction, label = progress_point(forecast, max(0.0, left))
    return "%s (%d %%)" % (label, int(fraction * 100))


def needed_limit(running, needs):
    """The time limit (seconds) the run needs: what the job used so far and what it still
    needs, 15 % more, rounded up to 10 minutes."""
    job = running.get("job") or {}
    at = running.get("written_at") or time.time()
    started = job["end_time"] - job["time_limit"] if job.get("end_time") and job.get("time_limit") else \
        running.get("start_time") or at
    return -(-((at - started) + needs) * 1.15 // 600) * 600


def cancel_command(record):
    """How to stop the billing: the scheduler's cancel command, or a signal to wrap (which stops
    the training and reports it) on the host where it runs."""
    job = record.get("job") or {}
    if job.get("release"):
        return job["release"]
    if record.get("pid") and record.get("host"):
        return "ssh %s kill %d" % (record["host"], record["pid"])
    return None


def test_report(config, channel):
    messages = MESSAGES[config.get("notify", "language")]
    body = messages["test_body"].format(channel=channel, host=host_name(),
                                        time=format_local_time(time.time()))
    return Report(messages["title_test"], [body], [], config.get("notify", "language"),
                  config.get("report", "max_chars"),
                  {"name": "test", "status": "test", "host": host_name()})


# --- channels: one small sender each, one shared HTTP helper ---

class Deadline(object):
    """One push bounded as a whole: [CHANNEL] timeout seconds however slowly the service
    answers (a socket timeout bounds each read only), and cut at once when the monitor is
    told to stop. A watchdog thread shuts the push's sockets down; the read blocked on them
    returns and the push fails."""

    def __init__(self, seconds, stop=None):
        self.seconds = seconds
        self.expires = time.monotonic() + seconds
        self.stop = stop
        self.sockets = []
        self.lock = threading.Lock()
        self.finished = threading.Event()
        self.expired = self.stopped = False

    def __enter__(self):
        threading.Thread(target=self.run, name="deadline", daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.finished.set()

    def run(self):
        while True:
            left = max(0.0, self.expires - time.monotonic())
            if self.finished.wait(left if self.stop is None else min(left, DEADLINE_STEP)):
                return
            if self.stop is not None and self.stop.is_set():
                self.stopped = True
            elif time.monotonic() >= self.expires:
                self.expired = True
            else:
                continue
            self.cut()
            return

    def watch(self, sock):
        """A socket of this push, to shut down when the deadline passes or the monitor stops."""
        with self.lock:
            self.sockets.append(sock)
        if self.expired or self.stopped:
            self.cut()

    def cut(self):
        import socket
        with self.lock:
            sockets = list(self.sockets)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def check(self):
        """After a failed push: Stopped when the monitor was told to stop, a timed-out
        ChannelError when the deadline passed, else nothing."""
        if self.stopped or (self.stop is not None and self.stop.is_set()):
            raise Stopped()
        if self.expired or time.monotonic() >= self.expires:
            raise ChannelError("no answer within %gs" % self.seconds, timed_out=True)


def request_handlers(deadline, context):
    """urllib handlers: no redirect is followed, and every connection hands its socket to the
    deadline's watchdog."""
    import http.client
    import urllib.request

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req, fp, code, msg, hdrs, newurl):
            return None

    def watched(base):
        class Connection(base):
            def connect(self):
                base.connect(self)
                deadline.watch(self.sock)
        return Connection

    class HTTPHandler(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(watched(http.client.HTTPConnection), req)

    class HTTPSHandler(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(watched(http.client.HTTPSConnection), req, context=context)

    return [NoRedirect(), HTTPHandler(), HTTPSHandler(context=context)]


def http_request(url, data, settings, secrets, headers=None, method="POST"):
    """Send one request; (status, body bytes, headers) for any HTTP answer. No redirect is followed.

    Proxies come from the environment as urllib does; certificates are always checked, against
    the system's authorities (and SSL_CERT_FILE) plus [notify] ca_file when set. The request as
    a whole ends within settings' timeout (settings["deadline"], or a deadline of its own)."""
    import http.client
    import urllib.error
    import urllib.request
    timeout = float(settings.get("timeout") or 10)
    deadline = settings.get("deadline")
    if deadline is None:
        with Deadline(timeout) as deadline:
            return http_request(url, data, dict(settings, deadline=deadline), secrets, headers, method)
    context = tls_context(settings["ca_file"]) if settings.get("ca_file") else None
    try:
        request = urllib.request.Request(url, data=data, method=method)
        request.add_header("User-Agent", USER_AGENT)
        for key, value in (headers or {}).items():
            request.add_header(key, value)
        opener = urllib.request.build_opener(*request_handlers(deadline, context))
        with opener.open(request, timeout=timeout) as response:
            return response.status, response.read(1 << 20), response.headers
    except urllib.error.HTTPError as error:
        try:
            body = error.read(1 << 20)
        except (OSError, http.client.HTTPException):
            deadline.check()
            body = b""
        return error.code, body, error.headers
    except (OSError, ValueError, http.client.HTTPException) as error:
        raise request_failure(error, timeout, deadline, secrets)


def request_failure(error, timeout, deadline, secrets):
    """The ChannelError of a request that got no HTTP answer (Stopped when the monitor stops)."""
    import socket
    import urllib.error
    deadline.check()
    reason = error.reason if isinstance(error, urllib.error.URLError) else error
    if isinstance(reason, socket.timeout):
        return ChannelError("no answer within %gs" % timeout, timed_out=True)
    if isinstance(error, urllib.error.URLError):
        return ChannelError(redact("cannot connect: %s" % (error.reason,), secrets))
    return ChannelError(redact("request failed: %s" % (error.__class__.__name__ + (
        ": %s" % error if str(error) else "")), secrets))


def http_post_json(url, payload, settings, secrets, headers=None):
    """POST a JSON object as UTF-8: Chinese travels as itself, not as \\u escapes."""
    data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
    headers = dict({"Content-Type": JSON_TYPE}, **(headers or {}))
    return http_request(url, data, settings, secrets, headers)


def tls_context(ca_file):
    """The default context (system authorities, SSL_CERT_FILE) trusting ca_file's authorities too."""
    import ssl
    context = ssl.create_default_context()
    if ca_file:
        try:
            context.load_verify_locations(cafile=ca_file)
        except (OSError, ssl.SSLError) as error:
            reason = getattr(error, "strerror", None) or error
            raise ChannelError("cannot read ca_file '%s': %s" % (ca_file, reason), retryable=False)
    return context


def retry_after(headers, answer=None):
    """Seconds to wait from a Retry-After header (delta form) or the answer's retry_after, or None."""
    values = [headers.get("Retry-After") if headers else None]
    if answer:
        parameters = answer.get("parameters")
        values.append(parameters.get("retry_after") if isinstance(parameters, dict) else None)
        values.append(answer.get("retry_after"))
    for value in values:
        try:
            return max(0.0, float(value))
        except (TypeError, ValueError):
            continue
    return None


def decode_json_body(body):
    try:
        value = json.loads(body.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def describe_answer(status, body, secrets, code_field="code", text_fields=("msg", "message")):
    """'HTTP 500', with the service's code and message when its body has them."""
    parts = ["HTTP %d" % status]
    answer = decode_json_body(body)
    if answer is None:
        snippet = " ".join(body.decode("utf-8", errors="replace").split())[:120]
        parts.append("non-JSON answer" + (": %s" % snippet if snippet else ""))
    else:
        if code_field in answer:
            parts.append("%s %s" % (code_field, answer.get(code_field)))
        message = next((answer[field] for field in text_fields if answer.get(field)), None)
        if isinstance(message, list):
            message = "; ".join(str(item) for item in message)
        if message:
            parts.append(str(message)[:200])
    return redact(", ".join(parts), secrets)


def is_retryable(status):
    """A redirect or a 4xx other than 408/429 will not fix itself: retried only rarely."""
    return not (300 <= status < 500) or status in (408, 429)


def refusal(status, body, headers, secrets, code_field="code", text_fields=("msg", "message"),
            temporary_codes=None):
    """The ChannelError for an answer that is not a success, naming status, code and text.

    temporary_codes: for a service that documents the codes of its 2xx answers, those a retry
    can fix; None for a service that documents none (any 2xx that is not a success is retried)."""
    answer = decode_json_body(body)
    retryable = is_retryable(status)
    if 200 <= status < 300 and temporary_codes is not None and answer is not None:
        retryable = str(answer.get(code_field)) in [str(code) for code in temporary_codes]
    return ChannelError(describe_answer(status, body, secrets, code_field, text_fields),
                        retryable=retryable, retry_after=retry_after(headers, answer))


def field_is(body, name, value):
    """The JSON answer's field name equals value (a number given as a string counts)."""
    answer = decode_json_body(body)
    return answer is not None and str(answer.get(name)).strip() == str(value)


def has_field(body, name):
    answer = decode_json_body(body)
    return answer is not None and answer.get(name) not in (None, "")


def titled_text(report, limit, unit):
    """Title line and body within one limit, for services that have no title field: the title
    takes at most a share of the limit, so that the header always fits."""
    title = fit_title(report.title, limit, unit)
    return title + "\n" + report.text(max(limit - text_size(title + "\n", unit), 1), unit)


def fit_title(title, limit, unit):
    share = limit // TITLE_SHARE
    return cut_to_size(title, share, unit) if text_size(title, unit) > share else title


def text_size(text, unit):
    return len(text.encode("utf-8")) if unit == "bytes" else len(text)


def fill_template(url, key, value):
    """url with {key} replaced by the URL-quoted value, or the value appended as a path segment."""
    from urllib.parse import quote
    placeholder = "{%s}" % key
    if placeholder in url:
        return url.replace(placeholder, quote(value, safe=""))
    return url.rstrip("/") + "/" + quote(value, safe="")


def is_2xx(status):
    return 200 <= status < 300


class Channel(object):
    """A push service and every fact about it: its [section] settings with their defaults
    (config.ini.example mirrors them), which must be set and which are secret, how long a
    message may be and in what unit, which refusals a retry can fix, how its settings are
    checked when the config loads, and how it sends (bottle's adapters: one class holds all of
    one service). CHANNELS names them; the rest of hpcrun asks the entry."""

    name = None
    settings = {}            # its keys and defaults; every channel also has timeout (seconds)
    required = ()            # keys that must be set
    secret = ()              # keys secret for this service beyond SECRET_KEYS (a URL with a token)
    text_limit = (4000, "chars")   # the longest text it takes, and in what unit
    title_limit = None       # its own title field's limit in characters, if it has one
    temporary_codes = None   # codes in a 2xx answer a retry can fix; None: any 2xx refusal retries

    def defaults(self):
        return dict(self.settings, timeout=10.0)

    def check(self, config, section, values):
        """Refuse settings the service would refuse (a ConfigError when the config loads)."""

    def send(self, settings, report, secrets=()):
        raise NotImplementedError

    def title(self, report):
        """The title within its field's limit and within a share of the text's limit."""
        title = fit_title(report.title, *self.text_limit)
        limit = self.title_limit
        return title if not limit or len(title) <= limit else cut_to_size(title, limit, "chars")

    def text(self, report):
        return report.text(*self.text_limit)

    def titled(self, report):
        """Title line and body within the one limit, for a service with no title field."""
        return titled_text(report, *self.text_limit)

    def refusal(self, status, body, headers, secrets, code_field="code", text_fields=("msg", "message")):
        return refusal(status, body, headers, secrets, code_field, text_fields, self.temporary_codes)


class Console(Channel):
    name = "console"

    def defaults(self):
        return {}

    def send(self, settings, report, secrets=()):
        emit("%s\n%s" % (report.title, report.text(report.max_chars)))


class Xxtui(Channel):
    name = "xxtui"
    settings = {"url": "https://www.xxtui.com/xxtui/{key}", "api_key": "", "from": "hpcrun", "channel": ""}
    required = ("api_key",)
    text_limit = (4000, "chars")     # allbot: content ≤ 4000 characters [T]
    title_limit = 100

    def send(self, settings, report, secrets=()):
        url = fill_template(settings.get("url") or self.settings["url"], "key", settings["api_key"])
        payload = {"title": self.title(report), "content": self.text(report),
                   "from": settings.get("from") or "hpcrun"}
        if settings.get("channel"):
            payload["channel"] = settings["channel"]
        status, body, headers = http_post_json(url, payload, settings, secrets)
        if not (is_2xx(status) and field_is(body, "code", 0)):
            raise self.refusal(status, body, headers, secrets)


class ServerChan(Channel):
    name = "serverchan"
    settings = {"key": "", "url": ""}
    required = ("key",)
    # desp ≤ 32 KB: 6000 characters with doubled newlines stay under it even at 4 bytes a character
    text_limit = (6000, "chars")
    title_limit = 32

    def send(self, settings, report, secrets=()):
        # desp is Markdown: a single newline would run the log lines together
        payload = {"title": self.title(report), "desp": self.text(report).replace("\n", "\n\n")}
        status, body, headers = http_post_json(serverchan_url(settings["key"], settings.get("url")),
                                               payload, settings, secrets)
        if not (is_2xx(status) and field_is(body, "code", 0)):
            raise self.refusal(status, body, headers, secrets, "code", ("message", "info"))


def serverchan_url(key, url=""):
    """Server酱³ keys sctp{uid}t... go to {uid}.push.ft07.com, Turbo (SCT...) keys to sctapi."""
    match = re.match(r"^sctp(\d+)t", key)
    uid = match.group(1) if match else ""
    if not url:
        url = SERVERCHAN3_URL if uid else SERVERCHAN_TURBO_URL
    return fill_template(url.replace("{uid}", uid), "key", key)


class PushPlus(Channel):
    name = "pushplus"
    settings = {"token": "", "url": "https://www.pushplus.plus/send", "template": "txt", "channel": "",
                "topic": ""}
    required = ("token",)
    text_limit = (20000, "chars")    # no figure published; Apprise uses 20000
    title_limit = 200
    temporary_codes = (500,)         # 500 system error (api.pushplus.plus/doc-3034446)

    def send(self, settings, report, secrets=()):
        payload = {"token": settings["token"], "title": self.title(report), "content": self.text(report),
                   "template": settings.get("template") or "txt"}
        for key in ("channel", "topic"):
            if settings.get(key):
                payload[key] = settings[key]
        status, body, headers = http_post_json(settings["url"], payload, settings, secrets)
        if not (is_2xx(status) and field_is(body, "code", 200)):
            raise self.refusal(status, body, headers, secrets)


class Bark(Channel):
    name = "bark"
    settings = {"device_key": "", "url": "https://api.day.app", "group": "hpcrun", "level": "", "sound": ""}
    required = ("device_key",)
    text_limit = (3000, "bytes")     # the APNs payload is ≤ 4 KB with the title and JSON around it

    def send(self, settings, report, secrets=()):
        title = self.title(report)   # one APNs payload holds title and body
        limit, unit = self.text_limit
        payload = {"device_key": settings["device_key"], "title": title,
                   "body": report.text(max(limit - text_size(title, unit), 1), unit)}
        for key in ("group", "level", "sound"):
            if settings.get(key):
                payload[key] = settings[key]
        status, body, headers = http_post_json(settings["url"].rstrip("/") + "/push", payload, settings,
                                               secrets)
        if not (is_2xx(status) and field_is(body, "code", 200)):
            raise self.refusal(status, body, headers, secrets)


class Feishu(Channel):
    """Feishu and Lark custom bots ([feishu] with a Lark url)."""

    name = "feishu"
    settings = {"token": "", "secret": "", "url": "https://open.feishu.cn/open-apis/bot/v2/hook/{token}"}
    required = ("token",)
    secret = ("url",)
    # request body ≤ 20 KB: 4000 characters are ≤ 16 KB of UTF-8 even at 4 bytes each
    text_limit = (4000, "chars")
    temporary_codes = (11232,)       # frequency limit [T]

    def send(self, settings, report, secrets=(), now=time.time):
        payload = {"msg_type": "text", "content": {"text": self.titled(report)}}
        if settings.get("secret"):
            timestamp = str(int(now()))
            payload.update(timestamp=timestamp, sign=feishu_sign(settings["secret"], timestamp))
        url = fill_template(settings["url"], "token", settings["token"])
        status, body, headers = http_post_json(url, payload, settings, secrets)
        answer = decode_json_body(body) or {}
        if not (is_2xx(status) and str(answer.get("code", answer.get("StatusCode"))) == "0"):
            raise self.refusal(status, body, headers, secrets)


def feishu_sign(secret, timestamp):
    """Feishu/Lark: base64 of HMAC-SHA256 keyed with "timestamp\\nsecret" over an empty message."""
    import base64
    import hashlib
    import hmac
    key = ("%s\n%s" % (timestamp, secret)).encode("utf-8")
    return base64.b64encode(hmac.new(key, b"", hashlib.sha256).digest()).decode("ascii")


class DingTalk(Channel):
    name = "dingtalk"
    settings = {"access_token": "", "secret": "", "url": "https://oapi.dingtalk.com/robot/send"}
    required = ("access_token",)
    secret = ("url",)
    text_limit = (4000, "chars")     # no figure found: the same bound as its sibling Feishu
    temporary_codes = (-1, 130101)   # system busy; "send too fast" (not in the reference)

    def send(self, settings, report, secrets=(), now=time.time):
        payload = {"msgtype": "text", "text": {"content": self.titled(report)}}
        status, body, headers = http_post_json(dingtalk_url(settings, now), payload, settings, secrets)
        if not (is_2xx(status) and field_is(body, "errcode", 0)):
            raise self.refusal(status, body, headers, secrets, "errcode", ("errmsg",))


def dingtalk_sign(secret, timestamp):
    """DingTalk: base64 of HMAC-SHA256 keyed with the secret over "timestamp\\nsecret"."""
    import base64
    import hashlib
    import hmac
    message = ("%s\n%s" % (timestamp, secret)).encode("utf-8")
    digest = hmac.new(secret.encode("utf-8"), message, hashlib.sha256).digest()
    return base64.b64encode(digest).decode("ascii")


def dingtalk_url(settings, now=time.time):
    """The robot URL with access_token, and timestamp (ms) and sign when a secret is set.

    Built by hand so that the signature is URL-encoded exactly once."""
    from urllib.parse import quote_plus
    url = "%s%saccess_token=%s" % (settings["url"], "&" if "?" in settings["url"] else "?",
                                  quote_plus(settings["access_token"]))
    if settings.get("secret"):
        timestamp = str(int(round(now() * 1000)))
        sign = dingtalk_sign(settings["secret"], timestamp)
        url += "&timestamp=%s&sign=%s" % (timestamp, quote_plus(sign))
    return url


class WeCom(Channel):
    name = "wecom"
    settings = {"key": "", "url": "https://qyapi.weixin.qq.com/cgi-bin/webhook/send"}
    required = ("key",)
    secret = ("url",)
    text_limit = (2048, "bytes")     # text content ≤ 2048 bytes (official)
    temporary_codes = (-1, 45009)    # system busy; "api freq out of limit" (not in the reference)

    def send(self, settings, report, secrets=()):
        from urllib.parse import quote
        url = "%s%skey=%s" % (settings["url"], "&" if "?" in settings["url"] else "?",
                              quote(settings["key"], safe=""))
        payload = {"msgtype": "text", "text": {"content": self.titled(report)}}
        status, body, headers = http_post_json(url, payload, settings, secrets)
        if not (is_2xx(status) and field_is(body, "errcode", 0)):
            raise self.refusal(status, body, headers, secrets, "errcode", ("errmsg",))


class Ntfy(Channel):
    name = "ntfy"
    settings = {"url": "https://ntfy.sh", "topic": "", "token": "", "user": "", "password": "",
                "priority": "3", "tags": ""}
    required = ("topic",)
    secret = ("topic",)              # the topic name is the password of a public topic
    text_limit = (4096, "bytes")     # a longer message becomes an attachment
    priorities = {"min": "1", "low": "2", "default": "3", "high": "4", "max": "5", "urgent": "5"}

    def check(self, config, section, values):
        """Priority 1-5 or its names: a typo is a config error now, not a refusal at 3 a.m."""
        priority = str(values.get("priority") or "3").strip().lower()
        if priority not in self.priorities and priority not in ("1", "2", "3", "4", "5"):
            raise ConfigError("%s: [%s] priority: '%s' is not 1 to 5 or one of %s" % (
                config.where(section, "priority"), section, values.get("priority"), ", ".join(self.priorities)))
        values["priority"] = self.priorities.get(priority, priority)

    def send(self, settings, report, secrets=()):
        # JSON to the server root: the title travels in the body, where UTF-8 is fine (headers are latin-1)
        payload = {"topic": settings["topic"], "title": self.title(report), "message": self.text(report),
                   "priority": int(self.priorities.get(str(settings.get("priority")), settings.get("priority") or 3))}
        if parse_list(settings.get("tags")):
            payload["tags"] = parse_list(settings["tags"])
        url = settings["url"].rstrip("/") + "/"
        status, body, headers = http_post_json(url, payload, settings, secrets, ntfy_auth(settings))
        if not (is_2xx(status) and has_field(body, "id")):
            raise self.refusal(status, body, headers, secrets, "code", ("error",))


def ntfy_auth(settings):
    """Authorization for a protected topic: a token, else user and password, else none."""
    import base64
    if settings.get("token"):
        return {"Authorization": "Bearer " + settings["token"]}
    if settings.get("user"):
        pair = ("%s:%s" % (settings["user"], settings.get("password") or "")).encode("utf-8")
        return {"Authorization": "Basic " + base64.b64encode(pair).decode("ascii")}
    return {}


class Slack(Channel):
    name = "slack"
    settings = {"url": ""}
    required = ("url",)
    secret = ("url",)
    text_limit = (35000, "chars")    # Apprise's figure; Slack cuts text at 40000

    def send(self, settings, report, secrets=()):
        payload = {"text": slack_escape(self.titled(report))}
        status, body, headers = http_post_json(settings["url"], payload, settings, secrets)
        if not (status == 200 and body.strip() == b"ok"):
            raise self.refusal(status, body, headers, secrets)


def slack_escape(text):
    """Slack reads <...> as links and mentions: a traceback's <module> must arrive as text."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class Discord(Channel):
    name = "discord"
    settings = {"url": "", "username": "hpcrun"}
    required = ("url",)
    secret = ("url",)
    text_limit = (2000, "chars")

    def send(self, settings, report, secrets=()):
        # allowed_mentions: an "@everyone" in the log must not ping the whole server
        payload = {"content": self.titled(report), "allowed_mentions": {"parse": []}}
        if settings.get("username"):
            payload["username"] = settings["username"]
        status, body, headers = http_post_json(settings["url"], payload, settings, secrets)
        if status not in (200, 204):
            raise self.refusal(status, body, headers, secrets, "code", ("message",))


class Telegram(Channel):
    name = "telegram"
    settings = {"token": "", "chat_id": "", "url": "https://api.telegram.org"}
    required = ("token", "chat_id")
    text_limit = (4096, "chars")

    def send(self, settings, report, secrets=()):
        from urllib.parse import quote
        chat_id = settings["chat_id"]
        payload = {"chat_id": int(chat_id) if re.match(r"^-?\d+$", chat_id) else chat_id,
                   "text": self.titled(report), "disable_web_page_preview": True}
        url = "%s/bot%s/sendMessage" % (settings["url"].rstrip("/"), quote(settings["token"], safe=":"))
        status, body, headers = http_post_json(url, payload, settings, secrets)
        answer = decode_json_body(body)
        if not (is_2xx(status) and answer is not None and answer.get("ok") is True):
            raise self.refusal(status, body, headers, secrets, "error_code", ("description",))


class Pushover(Channel):
    name = "pushover"
    settings = {"token": "", "user": "", "url": "https://api.pushover.net/1/messages.json", "priority": "",
                "retry": "", "expire": "", "sound": "", "device": ""}
    required = ("token", "user")
    secret = ("user",)               # the user key pairs with the token
    text_limit = (1024, "chars")
    title_limit = 250

    def check(self, config, section, values):
        """Priority -2 to 2; 2 (emergency) needs retry (>= 30 s) and expire (<= 10800 s)."""
        def number(key, low, high):
            text = str(values.get(key) or "").strip()
            if text and not (re.match(r"^-?\d+$", text) and low <= int(text) <= high):
                raise ConfigError("%s: [%s] %s: '%s' is not a whole number from %d to %d"
                                  % (config.where(section, key), section, key, text, low, high))
            return text
        if number("priority", -2, 2) == "2":
            for key, low, high in (("retry", 30, 10800), ("expire", 1, 10800)):
                if not number(key, low, high):
                    raise ConfigError("%s: [%s] priority 2 (emergency) needs %s (%d to %d seconds)"
                                      % (config.where(section, "priority"), section, key, low, high))

    def send(self, settings, report, secrets=()):
        from urllib.parse import urlencode
        fields = [("token", settings["token"]), ("user", settings["user"]),
                  ("title", self.title(report)), ("message", self.text(report))]
        keys = ("priority", "retry", "expire", "sound", "device") if str(settings.get("priority")) == "2" \
            else ("priority", "sound", "device")
        fields += [(key, str(settings[key]).strip()) for key in keys if settings.get(key)]
        status, body, headers = http_request(settings["url"], urlencode(fields).encode("ascii"), settings,
                                             secrets, {"Content-Type": FORM_TYPE})
        if not (is_2xx(status) and field_is(body, "status", 1)):
            raise self.refusal(status, body, headers, secrets, "status", ("errors",))


class Gotify(Channel):
    name = "gotify"
    settings = {"url": "", "token": "", "priority": 5}
    required = ("url", "token")
    text_limit = (20000, "chars")    # none documented; [report] max_chars bounds it anyway

    def send(self, settings, report, secrets=()):
        payload = {"title": self.title(report), "message": self.text(report),
                   "priority": int(settings.get("priority") or 0)}
        status, body, headers = http_post_json(settings["url"].rstrip("/") + "/message", payload, settings,
                                               secrets, {"X-Gotify-Key": settings["token"]})
        if not (is_2xx(status) and has_field(body, "id")):
            raise self.refusal(status, body, headers, secrets, "errorCode", ("errorDescription", "error"))


class Webhook(Channel):
    name = "webhook"
    settings = {"url": "", "method": "POST", "headers": "",
                "body": '{"title": "{title}", "content": "{content}"}'}
    required = ("url",)
    secret = ("url", "headers")
    text_limit = (100000, "chars")   # [report] max_chars bounds it

    def send(self, settings, report, secrets=()):
        url, data, headers = webhook_request(settings, report)
        method = (settings.get("method") or "POST").upper()
        status, body, answer_headers = http_request(url, data, settings, secrets, headers, method)
        if not is_2xx(status):
            raise self.refusal(status, body, answer_headers, secrets)


def fill_fields(value, fields):
    """A template value with each {field} replaced; a string that is one {field} takes its value."""
    if isinstance(value, dict):
        return {key: fill_fields(item, fields) for key, item in value.items()}
    if isinstance(value, list):
        return [fill_fields(item, fields) for item in value]
    if not isinstance(value, str):
        return value
    whole = re.match(r"^\{(\w+)\}$", value)
    if whole and whole.group(1) in fields:
        return fields[whole.group(1)]
    return re.sub(r"\{(\w+)\}", lambda match: str(fields[match.group(1)])
                  if match.group(1) in fields else match.group(0), value)


def webhook_fields(report):
    content = report.text(*CHANNELS["webhook"].text_limit)
    fields = {"host": host_name()}
    fields.update(getattr(report, "fields", None) or {})
    fields.update(title=report.title, content=content, text=report.title + "\n" + content)
    return fields


def webhook_request(settings, report):
    """(url, body bytes or None, headers) of a webhook: the templates filled with the report."""
    from urllib.parse import quote
    fields = webhook_fields(report)
    url = re.sub(r"\{(\w+)\}", lambda match: quote(str(fields[match.group(1)]), safe="")
                 if match.group(1) in fields else match.group(0), settings["url"])
    try:
        headers = parse_headers(settings.get("headers"))
        template = json.loads(settings.get("body") or "null")
    except ValueError as error:
        raise ChannelError("bad headers or body template: %s" % error, retryable=False)
    if settings.get("method", "POST").upper() in ("GET", "HEAD", "DELETE") or template is None:
        return url, None, headers
    data = json.dumps(fill_fields(template, fields), ensure_ascii=False).encode("utf-8")
    return url, data, dict({"Content-Type": JSON_TYPE}, **headers)


def smtp_security(settings):
    """ssl (port 465), starttls, or none (only when asked for: it sends the password in clear)."""
    security = str(settings.get("security") or "auto").strip().lower()
    if security == "auto":
        return "ssl" if int(settings.get("port") or 465) == 465 else "starttls"
    if security not in ("ssl", "starttls", "none"):
        raise ChannelError("[email] security: '%s' is not auto, ssl, starttls or none" % security,
                           retryable=False)
    return security


def open_smtp(settings):
    import smtplib
    security = smtp_security(settings)
    host, port = settings["host"], int(settings.get("port") or 465)
    timeout = float(settings.get("timeout") or 10)
    if security == "ssl":
        context = tls_context(settings.get("ca_file"))
        return smtplib.SMTP_SSL(host, port, timeout=timeout, context=context)
    smtp = smtplib.SMTP(host, port, timeout=timeout)
    try:
        if security == "starttls":
            smtp.starttls(context=tls_context(settings.get("ca_file")))
    except BaseException:
        smtp.close()
        raise
    return smtp


def email_addresses(text):
    """[(display name, address)] of an address list: '训练通知 <12345678@qq.com>; b@example.org'."""
    from email.utils import getaddresses
    return [(name, address) for name, address in getaddresses([str(text or "").replace(";", ",")])
            if address]


def email_message(report, sender, recipients, subject):
    """The message: display names that are not ASCII are encoded per RFC 2047 around each
    address (From and every recipient of To), the Message-ID domain is the sender's."""
    from email.header import Header
    from email.mime.text import MIMEText
    from email.utils import formataddr, formatdate, make_msgid
    message = MIMEText(report.text(report.max_chars), "plain", "utf-8")
    message["Subject"] = Header(subject, "utf-8")
    message["From"] = formataddr(sender, "utf-8")
    message["To"] = ", ".join(formataddr(recipient, "utf-8") for recipient in recipients)
    message["Date"] = formatdate(localtime=True)
    message["Message-ID"] = make_msgid("hpcrun", domain=sender[1].rpartition("@")[2] or "localhost")
    return message


def smtp_text(reply):
    """An SMTP reply as text: UTF-8, else GB18030 (QQ Mail answers in GBK)."""
    if not isinstance(reply, bytes):
        return str(reply)
    try:
        return reply.decode("utf-8")
    except UnicodeDecodeError:
        return reply.decode("gb18030", errors="replace")


def smtp_failure(error, timeout):
    """A ChannelError for what smtplib or the network raised: 4xx replies and network trouble retry."""
    import smtplib
    import socket
    if isinstance(error, smtplib.SMTPRecipientsRefused):
        codes = [(code, smtp_text(text), address)
                 for address, (code, text) in sorted(error.recipients.items())]
        return ChannelError("; ".join("SMTP %s %s (to %s)" % item for item in codes),
                            retryable=all(400 <= code < 500 for code, _, _ in codes))
    if isinstance(error, smtplib.SMTPResponseException):
        return ChannelError("SMTP %s %s" % (error.smtp_code, smtp_text(error.smtp_error)),
                            retryable=400 <= error.smtp_code < 500)
    if isinstance(error, smtplib.SMTPServerDisconnected):
        return ChannelError("SMTP server closed the connection: %s" % error)
    if isinstance(error, smtplib.SMTPException):
        return ChannelError("SMTP: %s" % error, retryable=False)
    if isinstance(error, socket.timeout):
        return ChannelError("no answer within %gs" % timeout)
    return ChannelError("cannot connect: %s" % (getattr(error, "strerror", None) or error))


class Email(Channel):
    name = "email"
    settings = {"host": "", "port": 465, "security": "auto", "user": "", "password": "", "from": "", "to": ""}
    required = ("host", "to")
    text_limit = (100000, "chars")   # [report] max_chars bounds it

    def send(self, settings, report, secrets=()):
        import smtplib
        senders = email_addresses(settings.get("from") or settings.get("user"))
        recipients = email_addresses(settings["to"])
        if not senders:
            raise ChannelError("[email] from is not set and there is no user to send as", retryable=False)
        if not recipients:
            raise ChannelError("[email] to: no address in '%s'" % settings["to"], retryable=False)
        deadline = settings.get("deadline")
        try:
            with open_smtp(settings) as smtp:
                if deadline is not None:
                    deadline.watch(smtp.sock)
                if settings.get("user"):
                    smtp.login(settings["user"], settings.get("password") or "")
                smtp.sendmail(senders[0][1], [address for _, address in recipients],
                              email_message(report, senders[0], recipients, self.title(report)).as_string())
        except (smtplib.SMTPException, OSError) as error:
            if deadline is not None:
                deadline.check()
            failure = smtp_failure(error, float(settings.get("timeout") or 10))
            raise ChannelError(redact(str(failure), secrets), failure.retryable)


# Every channel, in the order config.ini.example and the README list them.
CHANNELS = collections.OrderedDict((channel.name, channel) for channel in (
    Console(), Xxtui(), ServerChan(), PushPlus(), Bark(), Feishu(), DingTalk(), WeCom(), Ntfy(), Slack(),
    Discord(), Telegram(), Pushover(), Gotify(), Webhook(), Email()))


def section_defaults(section):
    """The defaults of a config section: a general one ([notify], [wrap], ...) or a channel's
    ([xxtui], [feishu:lab], ...); None for a section hpcrun does not know."""
    if section in DEFAULTS:
        return DEFAULTS[section]
    channel = CHANNELS.get(channel_type(section))
    return channel.defaults() if channel else None


def ca_file_path(config):
    """[notify] ca_file, relative to the config file's directory."""
    value = str(config.get("notify", "ca_file") or "").strip()
    if not value:
        return ""
    base = os.path.dirname(os.path.abspath(config.path)) if config.path else os.getcwd()
    return os.path.join(base, os.path.expanduser(value))


def send_report(name, kind, settings, report, config, stop=None):
    """Send through one channel within its timeout; ChannelError with the service's own words
    on failure, Stopped when stop is set meanwhile (SIGTERM to the monitor)."""
    with Deadline(float(settings.get("timeout") or 10), stop) as deadline:
        settings = dict(settings, ca_file=ca_file_path(config), deadline=deadline)
        try:
            CHANNELS[kind].send(settings, report, config.secrets)
        except ChannelError as error:
            raise ChannelError(redact(str(error), config.secrets), error.retryable, error.retry_after,
                               error.timed_out)


# --- monitor: scan, decide, deliver ---

def event_record(running, run_id, status, author_uid, **details):
    """A report-only record about a run that has not ended (lost, recovered, stalled, resumed).

    run_id is the run's file name, never a field of the record; author_uid is who wrote the
    running record, so that the report reads only what that user could read."""
    record = {key: running.get(key) for key in (
        "name", "command", "work_dir", "host", "pid", "start_time", "started", "job", "log_file", "gpus",
        "gpu_stats", "output_at", "progress", "forecast", "checkpoint")}
    record.update(schema=SCHEMA_VERSION, hpcrun_version=__version__, status=status, final=True,
                  run_id="%s~%s" % (run_id, status), base_run_id=run_id, author_uid=author_uid,
                  last_heartbeat=running.get("written_at"), last_line=running.get("last_line"),
                  timestamp=format_local_time(time.time()))
    record.update(details)
    return record


def broken_record(run_id, work_dir, note):
    """The stand-in report of a record that cannot be read or reported as it is."""
    return {"run_id": run_id, "name": run_id, "status": "unknown", "final": True,
            "work_dir": work_dir, "note": note}


def boot_id():
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as stream:
            return stream.read().strip()
    except OSError:
        return None


def nobody_uids():
    """The uids NFSv4 maps an owner it cannot name to (nobody, nfsnobody)."""
    import pwd
    uids = {65534, 4294967294}
    for name in ("nobody", "nfsnobody"):
        try:
            uids.add(pwd.getpwnam(name).pw_uid)
        except KeyError:
            pass
    return uids


class Delivery(object):
    """The monitor's delivery: claim each record due, build its report, push it to every channel
    that has not accepted it, retry with backoff, archive it once all have. A part of Monitor,
    which holds the state it uses (config, channels, clocks, log)."""

    def deliver_all(self, state, items, counts):
        for run_id, claimed in items:
            try:
                result = self.handle(state, run_id, claimed)
            except Stopped:
                self.release(state, run_id, claimed)
                raise
            except (HpcrunError, OSError) as error:
                self.log("error: %s: %s" % (run_id, redact(error, self.config.secrets)))
                result = "failed"
            except Exception:  # a bug must not cost this run its report, nor the others theirs
                self.log_exception("cannot report %s" % run_id)
                result = self.deliver_broken(state, run_id, claimed)
            counts[result] += 1
        return counts["delivered"], counts["failed"], counts["pending"]

    def deliver_broken(self, state, run_id, claimed):
        record = broken_record(run_id, state.work_dir, "hpcrun could not build this report "
                               "(an error in hpcrun: its monitor log has the details)")
        try:
            return self.deliver(state, run_id, claimed, record)
        except Stopped:
            self.release(state, run_id, claimed)
            raise
        except Exception:  # the report of last resort failed too: keep the record for later
            self.log_exception("cannot report %s" % run_id)
            self.release(state, run_id, claimed)
            return "failed"

    def claim_all(self, state):
        """Claim every record due for delivery: abandoned claims, legacy and new records.

        Returns the claims and how many records wait for a later retry."""
        items = self.take_over_claims(state)
        legacy = os.path.join(state.work_dir, LEGACY_RECORD)
        if os.path.lexists(legacy):
            run_id = "legacy-" + time.strftime("%Y%m%d-%H%M%S") + "-" + os.urandom(2).hex()
            target = state.claim(None, legacy, run_id, self.host, self.pid)
            if target:
                items.append((run_id, target))
        waiting = 0
        for filename in state.names("done"):
            if not filename.endswith(".json") or filename.startswith("."):
                continue
            run_id = filename[:-5]
            if not valid_run_id(run_id):
                run_id = stand_in_id(filename)
                self.bad_names[run_id] = filename
            if not self.due(state, run_id):
                waiting += 1
                if self.once:  # never exit silently while a report waits
                    self.log_waiting(state, filename, run_id)
                continue
            if self.provisional_held(state, filename):
                continue
            target = state.claim("done", filename, run_id, self.host, self.pid)
            if target:
                items.append((run_id, target))
        return items, waiting

    def log_waiting(self, state, filename, run_id):
        """One line for a report that waits for its retry: which run, which channels, when."""
        delivery = read_delivery_state(state, run_id)
        try:
            record = check_record(state.read_json("done", filename)[0], filename)
        except HpcrunError:
            record = {"run_id": run_id}
        channels = [name for name, _, _ in self.channels if name not in (delivery.get("accepted") or [])]
        self.log("waiting: %s via %s: retry in %s; last error: %s" % (
            describe_run(record), ", ".join(channels) or "-",
            format_duration((delivery.get("next_try") or 0) - self.now()),
            printable(delivery.get("last_error") or "-", 300)))

    def provisional_held(self, state, filename):
        """A provisional record (written on the first signal) waits while its wrapper may still
        replace it with the final one: on this host while the wrapper lives, elsewhere for its
        grace plus a margin for NFS."""
        try:
            record = check_record(state.read_json("done", filename)[0], filename)
        except HpcrunError:
            return False
        if record.get("final") is not False:
            return False
        end_time = record.get("end_time") or 0
        if end_time > self.now() + PROVISIONAL_MARGIN:
            return False  # an end in the future: not a record to wait for
        if record.get("host") == self.host and record.get("pid") is not None:
            return pid_alive(record["pid"]) and self.now() < end_time + 3600
        hold = (record.get("grace") or DEFAULT_GRACE) + FORWARD_DELAY + PROVISIONAL_MARGIN
        return self.now() < end_time + min(hold, 3600)

    def deliver_one(self, work_dir, run_id):
        """Deliver one run's record now (run mode): (delivered, failed, pending)."""
        with StateDir(work_dir) as state:
            claimed = state.claim("done", run_id + ".json", run_id, self.host, self.pid)
            items = [(run_id, claimed)] if claimed else []
            return self.deliver_all(state, items, {"delivered": 0, "failed": 0, "pending": 0})

    def take_over_claims(self, state):
        """Claims left by a monitor that died: on this host at once, elsewhere after claim_timeout."""
        items = []
        for filename in state.names("claimed"):
            parsed = parse_claim_name(filename)
            if not parsed or not valid_run_id(parsed[0]):
                continue
            run_id, host, pid = parsed
            if host == self.host and (pid == self.pid or not pid_alive(pid)):
                abandoned = True
            else:
                abandoned = self.claim_age(state, filename) > self.config.get("monitor", "claim_timeout")
            if abandoned:
                target = state.claim("claimed", filename, run_id, self.host, self.pid)
                if target:
                    items.append((run_id, target))
        return items

    def claim_age(self, state, filename):
        return state.age("claimed", filename, self.now())

    def due(self, state, run_id):
        return (read_delivery_state(state, run_id).get("next_try") or 0) <= self.now()

    def handle(self, state, run_id, claimed):
        return self.deliver(state, run_id, claimed, self.load(state, run_id, claimed))

    def deliver(self, state, run_id, claimed, record):
        """Push a claimed record's report to every channel that has not accepted it yet (a task
        of a job array is counted for the array's digest, and its report held for it)."""
        report = None
        if array_key(record):
            report = build_report(record, self.config, state.work_dir, self.uid)
            if self.holds(state, run_id, record, report.fields):
                self.hold(state, run_id, claimed, record)
                return "delivered"
        if not self.wanted(record):
            self.archive(state, run_id, claimed, record, sent=False)
            return "delivered"
        report = report or build_report(record, self.config, state.work_dir, self.uid)
        delivery = read_delivery_state(state, run_id)
        accepted = set(delivery.get("accepted") or [])
        errors = []
        for name, kind, settings in self.channels:
            if name in accepted:
                continue
            if name in self.timed_out:
                errors.append((name, ChannelError("not tried: it timed out earlier in this pass")))
                continue
            try:
                send_report(name, kind, settings, report, self.config, self.stop)
            except ChannelError as error:
                if error.timed_out:
                    self.timed_out.add(name)
                errors.append((name, error))
                continue
            accepted.add(name)
            delivery["accepted"] = sorted(accepted)
            write_delivery_state(state, run_id, delivery)
        if errors:
            return self.retry_later(state, run_id, claimed, record, delivery, errors)
        self.archive(state, run_id, claimed, record)
        return "delivered"

    def load(self, state, run_id, claimed):
        """The record behind a claim, checked field by field, with who wrote it; an unreadable
        one becomes a report of its own. Errors name the record by its own path."""
        if run_id.startswith(BAD_NAME_PREFIX):
            name = self.bad_names.get(run_id)
            error = "record %s in '%s': its file name is not a valid run id" % (
                "'%s'" % printable(name, 80) if name else "file", state.path("done"))
            self.log("error: %s" % error)
            return broken_record(run_id, state.work_dir, error)
        legacy = run_id.startswith("legacy-")
        shown = os.path.join(state.work_dir, LEGACY_RECORD) if legacy else state.path("done", run_id + ".json")
        try:
            data, owner = state.read_json("claimed", claimed)
            data = dict(data, author_uid=None) if owner != self.uid else data
            if legacy:
                data = legacy_to_record(data, state.work_dir, run_id)
            record = check_record(data, shown)
        except HpcrunError as error:
            message = str(error).replace(state.path("claimed", claimed), shown)
            self.log("error: %s" % message)
            return broken_record(run_id, state.work_dir, message)
        record["author_uid"] = self.author_of(record, owner, shown)
        if record.get("note"):
            self.log("warning: %s: %s" % (run_id, record["note"]))
        return record

    def retry_later(self, state, run_id, claimed, record, delivery, errors):
        failures = (delivery.get("failures") or 0) + 1
        retry_max = self.config.get("monitor", "retry_max")
        delay = min(retry_max, self.config.get("monitor", "retry_base") * 2 ** min(failures - 1, 64))
        hints = [e.retry_after for _, e in errors if e.retry_after]
        if hints:
            delay = max(delay, min(max(hints), retry_max))
        if not any(e.retryable for _, e in errors):
            delay = max(delay, retry_max)
        delivery.update(failures=failures, next_try=self.now() + delay,
                        last_error="; ".join("%s: %s" % (n, e) for n, e in errors))
        write_delivery_state(state, run_id, delivery)
        self.release(state, run_id, claimed)
        for name, error in errors:
            self.log("push failed: %s via %s: %s (attempt %d, next in %s)"
                     % (describe_run(record), name, error, failures, format_duration(delay)))
        return "failed"

    def release(self, state, run_id, claimed):
        """Give a claim back to done/ for a later pass (or another monitor)."""
        try:
            state.rename("claimed", claimed, "done", run_id + ".json")
        except (OSError, HpcrunError):
            pass  # a later poll takes over the claim

    def archive(self, state, run_id, claimed, record, sent=True):
        state.rename("claimed", claimed, "sent", run_id + ".json")
        state.remove("delivery", run_id + ".json")
        if record.get("status") in STATUSES and self.wrote_the_run(state, run_id, record):
            for name in state.names("running"):
                suffix = name[len(run_id):] if name.startswith(run_id + ".") else ""
                if suffix == ".json" or any(suffix.startswith(end) for end in MARKER_OF_STATUS.values()):
                    state.remove("running", name)
            self.schedule_reminder(state, run_id, record)
        self.release_tasks(record)
        if sent:
            self.log("delivered: %s via %s" % (describe_run(record), ", ".join(n for n, _, _ in self.channels)))
        else:
            self.log("not sent ([notify] settings): %s" % describe_run(record))

    def wrote_the_run(self, state, run_id, record):
        """Whether the author of a completion record wrote the run's heartbeat too: a record
        planted under someone else's run id must not end the watch of their run."""
        try:
            owner = os.stat(run_id + ".json", dir_fd=state.existing_fd("running"), follow_symlinks=False).st_uid
        except OSError:
            return True  # no heartbeat left to protect
        return record.get("author_uid") in (None, owner)


class Watcher(object):
    """The monitor's watch of running trainings: heartbeats that stop (lost), logs that stop
    growing (stalled), the start and time-limit events, and release reminders once a run has
    ended while its job goes on. Each event is written to done/ as a record of its own and
    delivered like any. A part of Monitor."""

    def watch_dir(self, state):
        """Read each running record once and turn silence into lost/stalled reports."""
        entries = state.names("running")
        lost = set(name[:-len(MARKER_OF_STATUS["lost"])] for name in entries
                   if name.endswith(MARKER_OF_STATUS["lost"]))
        names = [name for name in entries if name.endswith(".json") and name[0] != "."]
        watches = self.load_watches(state) if self.once else self.watches
        live = set()
        for filename in names:
            run_id = filename[:-5]
            if not valid_run_id(run_id):
                self.note_once("error: running record '%s': its file name is not a valid run id: "
                               "not watched" % state.path("running", printable(filename, 80)))
                continue
            live.add(run_id)
            try:
                data, owner = state.read_json("running", filename)
                running = check_record(dict(data, author_uid=None), state.path("running", filename), running=True)
            except HpcrunError as error:
                if "No such file" not in str(error):  # ended and removed between listdir and open
                    self.note_once("error: %s" % error)
                continue
            try:
                author = self.author_of(running, owner, state.path("running", filename))
                self.observe(state, run_id, running, author, watches, run_id in lost)
            except (HpcrunError, OSError) as error:
                self.log("error: %s: %s" % (run_id, redact(error, self.config.secrets)))
            except Exception:  # a bug must not stop the watch of the other runs
                self.log_exception("cannot watch %s" % run_id)
        if self.once:
            self.save_watches(state, {k: v for k, v in watches.items() if k in live})

    def observe(self, state, run_id, running, author, watches, reported_lost=False):
        now = self.clock()
        seq, size = running.get("seq"), running.get("log_size")
        first_sight = run_id not in watches
        watch = watches.setdefault(run_id, {"seq": seq, "seq_at": now, "size": size, "size_at": now})
        self.announce(state, run_id, running, author)
        if seq != watch["seq"] or first_sight:
            watch.update(seq=seq, seq_at=now)
            if reported_lost:
                self.heartbeat_back(state, run_id, running, author)
        if size != watch["size"]:
            watch.update(size=size, size_at=now)
            self.output_back(state, run_id, running, author)
        heartbeat = running.get("heartbeat_interval") or DEFAULTS["wrap"]["heartbeat_interval"]
        stale_after = self.config.get("monitor", "stale_after") or max(3 * heartbeat, heartbeat + 120)
        stall_after = self.config.get("monitor", "stall_after")
        if now - watch["seq_at"] > stale_after:
            if not self.declare_lost(state, run_id, running, author, now - watch["seq_at"]):
                watch["seq_at"] = now  # the scheduler says it runs: look again later
        elif stall_after and now - watch["size_at"] > stall_after:
            self.declare_stalled(state, run_id, running, author, now - watch["size_at"])
        self.check_gpus(state, run_id, running, author)
        self.check_forecast(state, run_id, running, author)

    def check_gpus(self, state, run_id, running, author):
        """gpu_idle: every GPU of the job idle for [gpu] idle_after, once a streak and once more
        after as long again; gpu_unused: some GPUs busy, others idle for unused_after, once."""
        stats = running.get("gpu_stats")
        verdict = gpu_verdict(stats, self.config.get("gpu", "idle_threshold"))
        if not verdict:
            return
        kind, seconds, idle, total = verdict
        details = dict(idle_for=seconds, gpus_idle=idle, gpus_total=total,
                       idle_threshold=self.config.get("gpu", "idle_threshold"))
        if kind == "idle" and "gpu_idle" in self.events:
            after = self.config.get("gpu", "idle_after")
            streak = int(max(gpu["idle_since"] for gpu in stats["gpus"] if gpu.get("idle_since") is not None))
            first = "%s-%d" % (marker(run_id, "gpu_idle"), streak)
            rounds = [(first, 1)] + ([(first + "-2", 2)] if state.exists("running", first) else [])
            for name, number in rounds:
                if seconds >= number * after and not state.exists("running", name):
                    record = event_record(running, run_id, "gpu_idle", author, **details)
                    record["run_id"] += "-%d-%d" % (streak, number)
                    self.emit_once(state, "running", name, {}, record, "GPUs idle: %s: %d GPU(s) idle for %s" % (
                        describe_run(running), total, format_duration(seconds)))
                    break
        elif kind == "unused" and "gpu_unused" in self.events and seconds >= self.config.get("gpu", "unused_after"):
            self.emit_once(state, "running", marker(run_id, "gpu_unused"), {},
                           event_record(running, run_id, "gpu_unused", author, **details),
                           "GPUs unused: %s: %d of %d GPUs idle for %s" % (
                               describe_run(running), idle, total, format_duration(seconds)))

    def check_forecast(self, state, run_id, running, author):
        """deadline_forecast: at its rate the run ends after the job's time limit (less
        time_limit_margin). Once; again only after a raised limit made it finish in time and it
        then fell behind again (markers <run>.deadline_forecast-N, and -N-ok for in time again)."""
        forecast, times = forecast_of(running), deadline(running)
        if "deadline_forecast" not in self.events or times is None or \
                (forecast.get("observed") or 0) < self.config.get("monitor", "forecast_after"):
            return
        needs, left = times
        end_time = running["job"]["end_time"]
        base = marker(run_id, "deadline_forecast")
        sent = 0
        while sent < FORECAST_ROUNDS and state.exists("running", "%s-%d" % (base, sent + 1)):
            sent += 1
        behind = needs > left - self.config.get("notify", "time_limit_margin")
        if sent and not behind:
            if not state.exists("running", "%s-%d-ok" % (base, sent)) and end_time != self.forecast_end(state, base, sent):
                state.create_marker("running", "%s-%d-ok" % (base, sent), {"end_time": end_time})
            return
        if not behind or sent >= FORECAST_ROUNDS or (sent and not state.exists("running", "%s-%d-ok" % (base, sent))):
            return
        record = event_record(running, run_id, "deadline_forecast", author, left=left, forecast_round=sent + 1,
                              stops=stop_label(forecast, left), needed_limit=needed_limit(running, needs))
        record["run_id"] += "-%d" % (sent + 1)
        self.emit_once(state, "running", "%s-%d" % (base, sent + 1), {"end_time": end_time}, record,
                       "will not finish: %s: needs %s more, %s left" % (
                           describe_run(running), format_duration(needs), format_duration(left)))

    def forecast_end(self, state, base, sent):
        """The job's end time when forecast round sent went out."""
        try:
            data = check_fields(state.read_json("running", "%s-%d" % (base, sent))[0], {"end_time": "number"}, base)
        except HpcrunError:
            return None
        return data.get("end_time")

    def emit_once(self, state, sub, marker, marker_data, record, message):
        """Queue an event report once across monitors: first the report, durable, then the
        marker that says it is done. A report that could not be written is tried again at the
        next pass; one written by a monitor that died before its marker is not written twice.
        False when the marker was there already."""
        if state.exists(sub, marker):
            return False
        if not self.ended(state, record["run_id"]):
            self.log(message)
            if self.wanted(record):
                state.write_json("done", record["run_id"] + ".json", record)
        return state.create_marker(sub, marker, marker_data)

    def announce(self, state, run_id, running, author):
        """The start and time-limit-warning events, each once per run."""
        if "start" in self.events and not state.exists("running", marker(run_id, "start")):
            if self.ended(state, run_id):
                state.create_marker("running", marker(run_id, "start"), {})
            else:
                self.emit_once(state, "running", marker(run_id, "start"), {},
                               event_record(running, run_id, "start", author),
                               "started: %s" % describe_run(running))
        job = running.get("job") or {}
        end_time = job.get("end_time")
        if not end_time or "time_limit_warning" not in self.events:
            return
        remaining = end_time - self.now()
        # once per end time: a job whose limit was raised after a warning is warned again
        warned = "%s-%d" % (marker(run_id, "time_limit_warning"), end_time)
        if warning_due(remaining, self.config.get("notify", "time_limit_margin"), job.get("time_limit"),
                       self.now() - (running.get("start_time") or self.now())):
            record = event_record(running, run_id, "time_limit_warning", author, remaining=remaining)
            record["run_id"] += "-%d" % end_time
            self.emit_once(state, "running", warned, {"end_time": end_time}, record,
                           "time limit near: %s: %s left" % (describe_run(running), format_duration(remaining)))

    def declare_lost(self, state, run_id, running, author, silence):
        """Report a run whose heartbeat stopped, once; False when the scheduler says it still runs."""
        if state.exists("running", marker(run_id, "lost")) or self.ended(state, run_id):
            return True
        verdict = self.scheduler(running.get("job"))
        if verdict and verdict.running:
            self.log("heartbeat of %s silent for %s, but the scheduler says %s"
                     % (describe_run(running), format_duration(silence), verdict.state))
            return False
        record = event_record(running, run_id, "lost", author, cause=(verdict and verdict.cause) or "unknown",
                              silence=silence, scheduler_state=verdict.describe() if verdict else None)
        self.emit_once(state, "running", marker(run_id, "lost"), {"seq": running.get("seq")}, record,
                       "lost: %s: no heartbeat for %s%s" % (
                           describe_run(running), format_duration(silence),
                           ", scheduler: " + verdict.describe() if verdict else ""))
        return True

    def heartbeat_back(self, state, run_id, running, author):
        """One recovered report when a run reported lost beats again (a newer seq than at the loss)."""
        try:
            lost = check_fields(state.read_json("running", marker(run_id, "lost"))[0], {"seq": "int"}, run_id)
        except HpcrunError:
            return  # never reported lost (the usual case)
        if (running.get("seq") or 0) > (lost.get("seq") or 0):
            self.emit_once(state, "running", marker(run_id, "recovered"), {},
                           event_record(running, run_id, "recovered", author),
                           "recovered: %s: heartbeat back" % describe_run(running))

    def declare_stalled(self, state, run_id, running, author, silence):
        record = event_record(running, run_id, "stalled", author, silence=silence)
        record["run_id"] += "-%d" % (running.get("seq") or 0)
        self.emit_once(state, "running", marker(run_id, "stalled"), {"log_size": running.get("log_size")}, record,
                       "stalled: %s: no output for %s" % (describe_run(running), format_duration(silence)))

    def output_back(self, state, run_id, running, author):
        if not state.exists("running", marker(run_id, "stalled")):
            return  # not stalled (the usual case)
        record = event_record(running, run_id, "resumed", author)
        record["run_id"] += "-%d" % (running.get("seq") or 0)
        if not self.ended(state, record["run_id"]):
            self.log("resumed: %s: log output again" % describe_run(running))
            if self.wanted(record):
                state.write_json("done", record["run_id"] + ".json", record)
        state.remove("running", marker(run_id, "stalled"))

    def watch_name(self):
        return "watch.%s.json" % self.host

    def load_watches(self, state):
        """What an earlier --once on this host saw; monotonic times hold until a reboot."""
        try:
            data = state.read_json("", self.watch_name())[0]
        except HpcrunError:
            return {}
        runs = data.get("runs") if data.get("boot_id") == boot_id() else None
        watches = {}
        for run_id, watch in (runs.items() if isinstance(runs, dict) else ()):
            try:
                watch = check_fields(watch, WATCH_FIELDS, "watch") if isinstance(watch, dict) else None
            except HpcrunError:
                watch = None
            if watch and watch.get("seq_at") is not None and watch.get("size_at") is not None:
                watches[run_id] = watch
        return watches

    def save_watches(self, state, watches):
        try:
            state.write_json("", self.watch_name(), {"boot_id": boot_id(), "runs": watches})
        except (OSError, HpcrunError) as error:
            self.log("error: cannot save watch state in '%s': %s"
                     % (state.work_dir, getattr(error, "strerror", None) or error))

    def schedule_reminder(self, state, run_id, record):
        """After a run of a scheduler job ends, watch whether its job (and the bill) goes on."""
        job = record.get("job")
        if not job or "release_reminder" not in self.events or not job.get("release") or \
                not find_program(scheduler_of(job).client or ""):
            return
        first = min(60.0, self.config.get("monitor", "reminder_interval"))
        reminder = {"run_id": run_id, "name": record.get("name"), "job": job, "work_dir": state.work_dir,
                    "host": record.get("host"), "start_time": record.get("start_time"),
                    "author_uid": record.get("author_uid"), "ended": record.get("end_time") or self.now(),
                    "sent": 0, "next_check": self.now() + first}
        state.write_json("reminders", run_id + ".json", reminder)

    def check_reminders(self, state):
        """Remind every reminder_interval while a finished run's job still runs, reminder_max times."""
        for filename in state.names("reminders"):
            run_id = filename[:-5]
            if not filename.endswith(".json") or not valid_run_id(run_id):
                continue
            try:
                data, owner = state.read_json("reminders", filename)
                reminder = check_fields(data, REMINDER_FIELDS, state.path("reminders", filename))
            except HpcrunError as error:
                self.note_once("error: %s" % error)
                continue
            if not reminder.get("job") or (reminder.get("next_check") or 0) > self.now():
                continue
            reminder["author_uid"] = self.author_of(reminder, owner, state.path("reminders", filename))
            verdict = self.scheduler(reminder["job"])
            unanswered = reminder.get("unanswered") or 0
            if verdict is None and unanswered < self.config.get("monitor", "reminder_max"):
                reminder["unanswered"] = unanswered + 1  # slurmctld busy?
                reminder["next_check"] = self.now() + self.config.get("monitor", "reminder_interval")
                state.write_json("reminders", filename, reminder)
                continue
            if not verdict or not verdict.running:
                self.forget_reminder(state, filename)
                if reminder.get("sent"):
                    self.log("job %s of %s is gone" % (reminder["job"].get("id"), printable(reminder.get("name"))))
                continue
            self.remind(state, run_id, filename, reminder)

    def forget_reminder(self, state, filename):
        for name in state.names("reminders"):
            if name.startswith(filename):
                state.remove("reminders", name)

    def remind(self, state, run_id, filename, reminder):
        reminder["sent"] = (reminder.get("sent") or 0) + 1
        since = self.now() - (reminder.get("ended") or self.now())
        record = event_record(reminder, run_id, "release_reminder", reminder["author_uid"],
                              since=since, release=reminder["job"].get("release"))
        record["run_id"] += "-%d" % reminder["sent"]
        if not self.emit_once(state, "reminders", "%s.%d" % (filename, reminder["sent"]), {}, record,
                              "job %s still runs %s after %s ended: %s" % (
                                  reminder["job"].get("id"), format_duration(since),
                                  printable(reminder.get("name")), record["release"])):
            return  # another monitor sent this one
        if reminder["sent"] >= self.config.get("monitor", "reminder_max"):
            self.forget_reminder(state, filename)
            return
        reminder["next_check"] = self.now() + self.config.get("monitor", "reminder_interval")
        state.write_json("reminders", filename, reminder)


# --- arrays: one digest per job array or sweep ---

def array_key(record):
    """The key of the array or sweep a run belongs to ("slurm-123456", "group-lr-sweep"), or None."""
    job = record.get("job") or {}
    if job.get("array_id") and job.get("array_index") is not None:
        raw = "%s-%s" % (job.get("scheduler"), job["array_id"])
    elif (record.get("group") or {}).get("name"):
        raw = "group-" + record["group"]["name"]
    else:
        return None
    key = re.sub(r"[^A-Za-z0-9_.-]", "_", raw)[:100].lstrip("._-")
    return key if valid_run_id(key) else None


def task_summary(record, fields, work_dir, run_id):
    """What an array digest needs of one task that ended (the report's fields give its cause)."""
    job = record.get("job") or {}
    index = job.get("array_index")
    failed = record.get("status") in FAILURE_STATUSES
    label = fields.get("label") or (("exit %s" % record.get("exit_code")) if failed and
                                    record.get("exit_code") is not None else None)
    gpu_hours, cpu_hours = billed_hours(job, record.get("gpu_stats"), record.get("duration"))
    return {"task": str(index) if index is not None else (record.get("name") or run_id),
            "index": index, "run_id": run_id, "status": record.get("status"), "failed": failed,
            "label": label if failed else None, "cause_line": fields.get("cause_line") if failed else None,
            "duration": record.get("duration"), "end_time": record.get("end_time") or time.time(),
            "work_dir": work_dir, "log_file": record.get("log_file"), "author_uid": record.get("author_uid"),
            "gpu_hours": gpu_hours, "cpu_hours": cpu_hours}


def array_info(record, key, work_dir):
    """The facts of an array, from its first task: id, name, size, index range, script, job."""
    job = dict(record.get("job") or {})
    group = record.get("group") or {}
    size = job.get("array_count") if job.get("array_id") else group.get("size")
    return {"key": key, "scheduler": job.get("scheduler") if job.get("array_id") else None,
            "id": job.get("array_id") or group.get("name"), "name": record.get("name"), "size": size,
            "first": job.get("array_first"), "last": job.get("array_last"), "step": job.get("array_step"),
            "script": job.get("script"), "job": job if job.get("array_id") else None, "work_dir": work_dir}


class ArrayLedger(object):
    """What the monitors know of one array, under ~/.hpcrun/arrays/<key>/ (the user's own, shared
    by the login nodes): one file per task that ended (tasks/<index>.json), a tally of counts
    changed under a lock, the array's facts (info.json) and once-only markers (digest, failing).
    A poll's cost grows with the tasks that ended, not with the array's size."""

    def __init__(self, home, key, now=time.time):
        self.key = key
        self.dir = os.path.join(home, "arrays", key)
        self.now = now

    def path(self, *parts):
        return os.path.join(self.dir, *parts)

    def read(self, *parts):
        try:
            return read_json_file(self.path(*parts))
        except HpcrunError:
            return {}

    def info(self):
        return self.read("info.json")

    def tally(self):
        return check_fields(self.read("tally.json"), TALLY_FIELDS, "tally") if self.read("tally.json") else {}

    def add(self, summary, info):
        """Count a task (a second record of the same task replaces the first); True when its
        failure label is new for the array."""
        os.makedirs(self.path("tasks"), exist_ok=True)
        if not os.path.exists(self.path("info.json")):
            write_json_atomic(self.path("info.json"), info)
        name = re.sub(r"[^A-Za-z0-9_.~-]", "_", summary["task"])[:120] + ".json"
        with self.locked():
            old = self.read("tasks", name)
            tally = self.tally()
            labels = set(tally.get("labels") or [])
            for item, sign in ((old, -1), (summary, 1)):
                if item:
                    for count in ("reported", "ok", "failed", "lost"):
                        if count == "reported" or task_outcome(item) == count:
                            tally[count] = (tally.get(count) or 0) + sign
            tally.update(last_report=self.now(), first_report=tally.get("first_report") or self.now())
            new_label = summary["failed"] and summary["label"] not in labels
            tally["labels"] = sorted(labels | ({summary["label"]} if summary["failed"] else set()))
            write_json_atomic(self.path("tasks", name), summary)
            write_json_atomic(self.path("tally.json"), tally)
        return new_label

    def summaries(self):
        """Every task's summary (read once, for the digest)."""
        found = []
        for name in list_dir(self.path("tasks")):
            if name.endswith(".json") and not name.startswith("."):
                summary = self.read("tasks", name)
                if summary:
                    found.append(summary)
        return found

    def locked(self):
        return FileLock(self.path("lock"), self.now)

    def has(self, marker_name):
        return os.path.exists(self.path(marker_name))

    def claim(self, marker_name):
        """Take the right to send a once-only report (digest, failing): False when another
        monitor has it, or sent it. A claim left by a monitor that died is taken after a while."""
        pending = self.path(marker_name + ".pending")
        if self.has(marker_name):
            return False
        try:
            os.close(os.open(pending, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            return True
        except FileExistsError:
            if self.now() - os.stat(pending).st_mtime < ARRAY_CLAIM_TIMEOUT:
                return False
            os.utime(pending)
            return True

    def done(self, marker_name):
        os.replace(self.path(marker_name + ".pending"), self.path(marker_name))

    def release_claim(self, marker_name):
        remove_quietly(self.path(marker_name + ".pending"))


TALLY_FIELDS = {"reported": "int", "ok": "int", "failed": "int", "lost": "int", "first_report": "number",
                "last_report": "number", "labels": "texts"}


def task_outcome(summary):
    """ok, failed or lost: how a task's summary counts."""
    if summary.get("status") == "lost":
        return "lost"
    return "failed" if summary.get("failed") else "ok"


class FileLock(object):
    """An exclusive lock between monitors (O_EXCL create); one older than a minute is broken."""

    def __init__(self, path, now=time.time):
        self.path = path
        self.now = now

    def __enter__(self):
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
                return self
            except FileExistsError:
                try:
                    if self.now() - os.stat(self.path).st_mtime > LOCK_STALE:
                        remove_quietly(self.path)  # its monitor died holding it
                        continue
                except OSError:
                    continue
            if time.monotonic() > deadline:
                raise HpcrunError("lock '%s' is held for too long" % self.path)
            time.sleep(0.01)

    def __exit__(self, *exc):
        remove_quietly(self.path)


def format_ranges(indices):
    """5,17-18,40-43 of sorted whole numbers."""
    ranges, start, end = [], None, None
    for index in sorted(set(indices)):
        if start is not None and index == end + 1:
            end = index
            continue
        if start is not None:
            ranges.append((start, end))
        start = end = index
    if start is not None:
        ranges.append((start, end))
    return ",".join(str(a) if a == b else "%d-%d" % (a, b) for a, b in ranges)


def contiguous_ranges(indices):
    """[(first, last), ...] of sorted whole numbers (one per submission where a scheduler takes
    one range only)."""
    return [tuple(int(n) for n in part.split("-")) if "-" in part else (int(part), int(part))
            for part in format_ranges(indices).split(",") if part]


def digest_facts(info, summaries, tally, timed_out, now=time.time):
    """The array block of a digest record: counts, failed ranges by cause, never started, the
    resubmit line, durations, the first failure."""
    indexed = info.get("scheduler") is not None
    failed = [s for s in summaries if s.get("failed") and s.get("status") != "lost"]
    lost = [s for s in summaries if s.get("status") == "lost"]
    size = info.get("size")
    unfinished_names, never = unfinished(info, summaries)
    causes = collections.OrderedDict()
    for summary in sorted(failed, key=lambda s: (s.get("index") is None, s.get("index"), s["task"])):
        causes.setdefault(summary.get("label") or "?", []).append(summary)
    durations = sorted((s["duration"], s["task"]) for s in summaries if is_number(s.get("duration")))
    first = min(failed, key=lambda s: s.get("end_time") or 0) if failed else None
    facts = {"key": info.get("key"), "scheduler": info.get("scheduler"), "id": info.get("id"),
             "name": info.get("name"), "size": size, "reported": len(summaries),
             "ok": len([s for s in summaries if task_outcome(s) == "ok"]), "failed": len(failed),
             "lost": len(lost), "never_started": never, "timed_out": timed_out,
             "causes": [[label, task_list(tasks, indexed), str(len(tasks))] for label, tasks in causes.items()],
             "unfinished": unfinished_names, "lost_tasks": task_list(lost, indexed),
             "resubmit": resubmit_lines(info, [s.get("index") for s in failed + lost] + never_indices(info, summaries))
             if indexed else [],
             "cancel": release_command(dict(info.get("job") or {}, id=info.get("id"))) if indexed else None}
    if durations:
        middle = durations[len(durations) // 2][0] if len(durations) % 2 else \
            (durations[len(durations) // 2 - 1][0] + durations[len(durations) // 2][0]) / 2
        facts.update(median=middle, fastest=durations[0][0], fastest_task=durations[0][1],
                     slowest=durations[-1][0], slowest_task=durations[-1][1],
                     total=sum(duration for duration, _ in durations))
    for hours in ("gpu_hours", "cpu_hours"):
        facts[hours] = sum(s[hours] for s in summaries if is_number(s.get(hours)))
    if first:
        facts.update(first_task=first["task"], first_label=first.get("label"), first_line=first.get("cause_line"))
    return facts, first


def task_list(summaries, indexed):
    if indexed:
        return format_ranges([s["index"] for s in summaries if s.get("index") is not None])
    return ", ".join(s["task"] for s in summaries)


def never_indices(info, summaries):
    """Indices of an array that never reported, where its index range is known."""
    first, last, step = info.get("first"), info.get("last"), info.get("step") or 1
    if first is None or last is None or not info.get("scheduler"):
        return []
    seen = set(s.get("index") for s in summaries)
    return [index for index in range(first, last + 1, step) if index not in seen][:ARRAY_INDEX_MAX]


def unfinished(info, summaries):
    """(their ranges as text, how many) of the tasks that never reported."""
    never = never_indices(info, summaries)
    if never:
        return format_ranges(never), len(never)
    count = max(0, (info.get("size") or 0) - len(summaries))
    return "", count


def resubmit_lines(info, indices):
    """The command to run the failed and unfinished tasks again, from the scheduler's entry."""
    indices = sorted(set(index for index in indices if index is not None))
    if not indices:
        return []
    target = info.get("script") or info.get("name") or "JOB_SCRIPT"
    return scheduler_of(info.get("job")).resubmit(indices, target, info.get("job") or {})


class Arrays(object):
    """The monitor's array digests: a task of a job array (or a wrap --group sweep) that ends is
    counted in its array's ledger and its report held; one digest goes out when every task has
    ended, when the scheduler says none is left, or after [notify] array_timeout without news.
    Fail fast: one array_failing push when enough tasks failed. A part of Monitor."""

    def ledger(self, key):
        return ArrayLedger(hpcrun_home(self.env), key, self.now)

    def holds(self, state, run_id, record, fields):
        """Count an array task's ending; True when its report waits for the digest."""
        key = array_key(record)
        mode = self.config.get("notify", "arrays")
        if not key or mode == "each" or record.get("test") or \
                record.get("status") not in STATUSES + ("lost",):
            return False
        ledger = self.ledger(key)
        if ledger.has("digest"):
            return False  # its digest went out already: a late task is reported on its own
        summary = task_summary(record, fields, state.work_dir, run_id)
        new_label = ledger.add(summary, array_info(record, key, state.work_dir))
        self.check_fail_fast(state, ledger)
        if record.get("status") == "lost":
            return False  # lost tasks need action now: reported at once, and counted
        return not (mode == "failures" and new_label)

    def check_fail_fast(self, state, ledger):
        """One array_failing push once enough tasks ended and too many of them failed."""
        share = self.config.get("notify", "array_fail_fast")
        tally = ledger.tally()
        reported, failed = tally.get("reported") or 0, (tally.get("failed") or 0) + (tally.get("lost") or 0)
        if not share or reported < self.config.get("notify", "array_fail_fast_after") or \
                failed < share * reported or not ledger.claim("failing"):
            return
        facts, _ = digest_facts(ledger.info(), ledger.summaries(), tally, False, self.now)
        record = array_record(ledger, facts, "array_failing", state.work_dir)
        try:
            self.queue(state, record, "array %s failing: %d of %d tasks failed" % (ledger.key, failed, reported))
        except (OSError, HpcrunError):
            ledger.release_claim("failing")
            raise
        ledger.done("failing")

    def check_arrays(self):
        """Queue the digests of the arrays whose tasks have all ended."""
        home = hpcrun_home(self.env)
        for key in list_dir(os.path.join(home, "arrays")):
            ledger = self.ledger(key)
            if not valid_run_id(key) or ledger.has("digest") or not ledger.has("info.json"):
                continue
            try:
                reason = self.digest_due(ledger)
                if reason:
                    self.send_digest(ledger, reason == "timeout")
            except (OSError, HpcrunError) as error:
                self.log("error: array %s: %s" % (key, error))

    def digest_due(self, ledger):
        """Why an array's digest is due ("all", "scheduler", "timeout"), or None."""
        info, tally = ledger.info(), ledger.tally()
        reported = tally.get("reported") or 0
        if info.get("size") and reported >= info["size"]:
            return "all"
        if self.now() - (tally.get("last_report") or self.now()) > self.config.get("notify", "array_timeout"):
            return "timeout"
        job = info.get("job") or {}
        if job and re.match(JOB_ID_RE, str(job.get("array_id"))) and \
                scheduler_of(job).array_active(job, self.runner) is False:
            return "scheduler"   # asked once a poll per open array: one short squeue
        return None

    def send_digest(self, ledger, timed_out):
        if not ledger.claim("digest"):
            return
        try:
            facts, first = digest_facts(ledger.info(), ledger.summaries(), ledger.tally(), timed_out, self.now)
            work_dir = (first or {}).get("work_dir") or ledger.info().get("work_dir")
            record = array_record(ledger, facts, "array_done", work_dir, first)
            with StateDir(work_dir) as state:
                self.queue(state, record, "array %s done: %d of %s tasks ok" % (
                    ledger.key, facts["ok"], facts.get("size") or facts["reported"]))
        except (OSError, HpcrunError):
            ledger.release_claim("digest")
            raise
        ledger.done("digest")

    def queue(self, state, record, message):
        """Write an array report into done/ (durable before its marker); it is delivered at the
        end of this pass (or archived unsent, as [notify] says, its tasks released then)."""
        self.log(message)
        state.write_json("done", record["run_id"] + ".json", record)
        self.queued.append((state.work_dir, record["run_id"]))

    def release_tasks(self, record):
        """Once the digest is accepted, the task records held for it go to sent/."""
        key = (record.get("array") or {}).get("key")
        if record.get("status") != "array_done" or not key or not valid_run_id(key):
            return
        ledger = self.ledger(key)
        by_dir = collections.defaultdict(list)
        for summary in ledger.summaries():
            if summary.get("held") and valid_run_id(summary["held"]):
                by_dir[summary.get("work_dir")].append(summary["held"])
        for work_dir, run_ids in by_dir.items():
            try:
                with StateDir(work_dir) as state:
                    for run_id in run_ids:
                        state.rename("held", run_id + ".json", "sent", run_id + ".json")
            except (OSError, HpcrunError) as error:
                self.log("error: array %s: cannot release its tasks in '%s': %s" % (key, work_dir, error))
        import shutil
        shutil.rmtree(ledger.path("tasks"), ignore_errors=True)

    def hold(self, state, run_id, claimed, record):
        """Keep a task's record in held/ until its array's digest is accepted."""
        state.rename("claimed", claimed, "held", run_id + ".json")
        key = array_key(record)
        ledger = self.ledger(key)
        name = re.sub(r"[^A-Za-z0-9_.~-]", "_", task_summary(record, {}, state.work_dir, run_id)["task"])[:120]
        with ledger.locked():
            summary = ledger.read("tasks", name + ".json")
            if summary:
                write_json_atomic(ledger.path("tasks", name + ".json"), dict(summary, held=run_id))
        self.log("held for the digest of array %s: %s" % (key, describe_run(record)))


def array_record(ledger, facts, status, work_dir, first=None):
    """A digest or fail-fast report as a record of its own; its log is the first failure's."""
    record = {"schema": SCHEMA_VERSION, "hpcrun_version": __version__, "status": status, "final": True,
              "run_id": "%s~%s" % (ledger.key, status), "name": facts.get("name") or facts.get("id"),
              "work_dir": work_dir, "array": facts, "timestamp": format_local_time(time.time())}
    if first:
        record.update(log_file=first.get("log_file"), author_uid=first.get("author_uid"))
    return record


class Monitor(Delivery, Watcher, Arrays):
    """Finds completion records in the work dirs and delivers each to every channel once.

    Anything under a work dir's .hpcrun/ may have been written by someone else in the group:
    file names come from listings and are checked (valid_run_id), contents field by field
    (check_record), directories are held open (StateDir), and the files a record names are read
    only as open_named_file allows."""

    def __init__(self, config, channels, log, now=time.time, clock=time.monotonic,
                 scheduler=query_scheduler, stop=None, once=False, env=None, runner=subprocess.run):
        self.config = config
        self.env = os.environ if env is None else env  # HPCRUN_HOME: the array ledgers
        self.runner = runner          # runs the scheduler's commands
        self.channels = channels
        self.log = log
        self.now = now
        self.clock = clock
        self.scheduler = scheduler
        self.stop = stop              # set by SIGTERM or SIGINT: a push under way is cut at once
        self.once = once  # cron --once: what was seen is kept on disk between runs, waiting reports listed
        self.host = host_name()
        self.pid = os.getpid()
        self.uid = os.geteuid()
        self.watches = {}            # run_id -> what this monitor saw of its heartbeat, when
        self.dir_errors = {}         # work dir -> its last error, logged once until it changes
        self.noted = set()           # problems of running records, logged once per monitor
        self.timed_out = set()       # channels that timed out in this pass: not tried again in it
        self.bad_names = {}          # stand-in run id -> the record's file name
        self.queued = []             # (work dir, run id) of array reports written in this pass
        self.events = parse_events(config)

    def poll(self, work_dirs):
        """One pass over every work dir: (delivered, failed, pending) counts."""
        totals = [0, 0, 0]
        self.timed_out = set()
        self.queued = []
        for work_dir in work_dirs:
            try:
                counts = self.poll_dir(work_dir)
            except (HpcrunError, OSError) as error:
                message = redact(error if isinstance(error, HpcrunError) else "cannot read work dir '%s': %s"
                                 % (work_dir, error.strerror or error), self.config.secrets)
                if self.dir_errors.get(work_dir) != message:
                    self.log("error: %s" % message)
                self.dir_errors[work_dir] = message
                totals[1] += 1
                continue
            if self.dir_errors.pop(work_dir, None):
                self.log("%s: readable again" % work_dir)
            totals = [a + b for a, b in zip(totals, counts)]
        self.check_arrays()
        for work_dir, run_id in self.queued:   # array reports written in this pass go out now
            totals = [a + b for a, b in zip(totals, self.deliver_one(work_dir, run_id))]
        return tuple(totals)

    def poll_dir(self, work_dir):
        """(delivered, failed, pending) for one work dir; one bad record never stops the others."""
        if not os.path.isdir(work_dir):
            raise HpcrunError("work dir '%s' is not a directory" % work_dir)
        with StateDir(work_dir) as state:
            for sub in ALL_STATE_SUBDIRS:
                state.fd(sub)          # a subdirectory that is a symlink refuses the whole dir
            counts = {"delivered": 0, "failed": 0, "pending": 0}
            self.watch_dir(state)
            self.check_reminders(state)
            items, counts["pending"] = self.claim_all(state)
            return self.deliver_all(state, items, counts)

    def note_once(self, message):
        if message not in self.noted:
            self.noted.add(message)
            self.log(message)

    def log_exception(self, what):
        """A failure no check foresaw (a bug): its traceback, secrets masked, so that it can be
        found; the monitor goes on with the other runs."""
        import traceback
        secrets = self.config.secrets
        self.log("error: %s: %s" % (what, redact(one_line(traceback.format_exc().splitlines()[-1], 300),
                                                 secrets)))
        for line in traceback.format_exc().rstrip().splitlines():
            self.log("  " + redact(line, secrets))

    def author_of(self, record, owner, shown):
        """Who wrote a record: its file's owner, or, for the monitor's own files (event reports,
        reminders), the author of the record they came from."""
        if owner == self.uid and record.get("author_uid") is not None:
            return record["author_uid"]
        if owner != self.uid and owner in nobody_uids():
            self.note_once("warning: '%s' is owned by nobody (uid %d): NFSv4 id mapping fails between "
                           "this host and the file server (their NFSv4 domains differ, see Domain in "
                           "/etc/idmapd.conf, or nfsidmap is not running); the files the record names "
                           "are not read" % (shown, owner))
        return owner

    def wanted(self, record):
        """Whether [notify] events, only_failures and min_duration let this report out."""
        status = record.get("status")
        if record.get("test"):
            return True  # a selftest asked for this push
        if EVENT_OF_STATUS.get(status, "end") not in self.events:
            return False
        if status == "array_done" and self.config.get("notify", "only_failures"):
            array = record.get("array") or {}
            return any(array.get(count) for count in ("failed", "lost", "never_started"))
        if status not in STATUSES:
            return True
        if status not in FAILURE_STATUSES and self.config.get("notify", "only_failures"):
            return False
        short = 0 <= (record.get("duration") or 0) < self.config.get("notify", "min_duration")
        return not short or (status != "success" and not self.config.get("notify", "skip_short_failures"))

    def ended(self, state, run_id):
        if state.exists("done", run_id + ".json") or state.exists("sent", run_id + ".json"):
            return True
        return any(name.startswith(run_id + ".json.") for name in state.names("claimed"))


def warning_due(remaining, margin, time_limit, run_elapsed):
    """Whether a time-limit warning can still help: within the margin, which is at most a fifth
    of a short job's limit, and never in the job's first minutes (a 5-minute debug job gets none)."""
    if time_limit:
        margin = min(margin, TIME_LIMIT_MARGIN_SHARE * time_limit)
        run_elapsed = time_limit - remaining
    return 0 < remaining <= margin and run_elapsed >= WARNING_NOT_BEFORE


def describe_run(record):
    return printable("%s (%s, %s)" % (record.get("name") or "?", record.get("run_id") or "?",
                                      record.get("status") or "?"), 300)


def printable(text, limit=200):
    """Text from a record made safe for a terminal or a log: one line, no escape sequences."""
    text = re.sub(CONTROL_RE, "?", re.sub(ANSI_RE, "", clean_text(str(text if text is not None else ""))))
    return one_line(text.replace("\r", " ").replace("\n", " "), limit) if text else text


def read_delivery_state(state, run_id):
    """Which channels accepted a report, how often it failed, when to try again ({} if new)."""
    if not state.exists("delivery", run_id + ".json"):
        return {}
    try:
        data = state.read_json("delivery", run_id + ".json")[0]
        return check_fields(data, DELIVERY_FIELDS, state.path("delivery", run_id + ".json"))
    except HpcrunError:
        return {}


def write_delivery_state(state, run_id, delivery):
    state.write_json("delivery", run_id + ".json", delivery)


def run_monitor(monitor, work_dirs, interval, once, stop):
    """Poll until stopped; with once, a single pass. Returns the exit status.

    work_dirs is a callable, asked every poll, so newly registered dirs are picked up."""
    seq = 0
    while True:
        try:
            delivered, failed, pending = monitor.poll(work_dirs())
            if not once:
                seq += 1
                write_monitor_heartbeat(monitor, seq, interval)
        except Stopped:
            return 0
        except Exception:  # the one place that must survive anything: log and go on
            monitor.log_exception("monitor pass failed")
            failed = 1
        if once:
            return 1 if failed or pending else 0
        if stop.wait(interval):
            return 0


def monitor_heartbeat_path(host, env=None):
    return os.path.join(hpcrun_home(env), "monitors", "%s.json" % host)


def write_monitor_heartbeat(monitor, seq, interval):
    """~/.hpcrun/monitors/<host>.json: lets status on another login node see this monitor."""
    path = monitor_heartbeat_path(monitor.host)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_json_atomic(path, {"host": monitor.host, "pid": monitor.pid, "seq": seq,
                                 "version": __version__, "interval": interval,
                                 "written_at": time.time()})
    except OSError as error:
        monitor.log("error: cannot write monitor heartbeat '%s': %s" % (path, error.strerror))


def registry_dirs(monitor, env=None):
    """The registered work dirs; idle ones drop out after [monitor] forget_after seconds."""
    def work_dirs():
        dirs, forgotten = [], []
        for work_dir, registered, entry in registered_work_dirs(env):
            idle = not os.path.isdir(work_dir) or not has_work(work_dir)
            old = time.time() - registered > monitor.config.get("monitor", "forget_after")
            if idle and old and forget_work_dir(entry, registered):
                if work_dir not in forgotten:  # entries an older hpcrun named differently
                    forgotten.append(work_dir)
                    monitor.log("forgot %s: nothing left to watch" % work_dir)
            elif os.path.isdir(work_dir) and work_dir not in dirs:
                dirs.append(work_dir)
        return dirs
    return work_dirs


def make_logger(stream=None):
    def log(message):
        text = re.sub(CONTROL_RE, "?", re.sub(ANSI_RE, "", str(message))).replace("\r", " ").replace("\n", " ")
        emit("%s %s" % (format_log_time(time.time()), text), stream)
    return log


# --- status ---

def collect_runs(work_dir, roots=None, now=None, config=None, archived=False):
    """Every run hpcrun knows of in work_dir that is not yet reported (archived: and those that
    were), newest first."""
    now = time.time() if now is None else now
    roots = roots or [work_dir]
    runs = []
    subs = (("running", "running"), ("done", "finished, waiting to be reported"), ("claimed", "being delivered"),
            ("held", "finished, held for its array's digest")) + ((("sent", "reported"),) if archived else ())
    with StateDir(work_dir) as state:
        for sub, label in subs:
            for filename in state.names(sub):
                if filename.startswith(".") or not (filename.endswith(".json") or sub == "claimed") or \
                        (sub == "sent" and "~" in filename):   # an event's report, not a run
                    continue
                run_id = (parse_claim_name(filename) or (filename,))[0] if sub == "claimed" else filename[:-5]
                record = read_status_record(state, sub, filename, run_id)
                delivery = read_delivery_state(state, run_id) if valid_run_id(run_id) else {}
                runs.append(status_entry(state, sub, label, run_id, record, delivery, roots, now, config))
    if os.path.lexists(os.path.join(work_dir, LEGACY_RECORD)):
        runs.append({"work_dir": work_dir, "run_id": LEGACY_RECORD, "name": LEGACY_RECORD,
                     "state": "finished, waiting to be reported", "start_time": None,
                     "elapsed": None, "last_line": ""})
    done_ids = {r["run_id"] for r in runs if r.get("phase") not in ("running", "stalled", "lost")}
    runs = [r for r in runs if r.get("phase") in ("waiting", "delivering", "held", "reported", "push_failed", None)
            or r["run_id"] not in done_ids]
    return sorted(runs, key=lambda r: -(r.get("start_time") or 0))


def read_status_record(state, sub, filename, run_id):
    """A record for status, checked like the monitor checks it; a stand-in with a note if bad."""
    try:
        data, owner = state.read_json(sub, filename)
        record = check_record(dict(data, author_uid=None), state.path(sub, filename), running=(sub == "running"))
    except HpcrunError as error:
        return {"note": str(error)}
    record["author_uid"] = owner
    return record


def status_entry(state, sub, label, run_id, record, delivery, roots, now, config=None):
    """One run as status shows it (and status --json prints it)."""
    start = record.get("start_time")
    end = record.get("end_time") if sub != "running" else None
    if sub == "running":
        for status, meaning in SHOWN_BY_MARKER:
            if state.exists("running", marker(run_id, status)):
                label = meaning
                break
    if delivery.get("failures"):
        label = "delivery failed %d time(s): %s" % (delivery["failures"], delivery.get("last_error", ""))
    last_line = record.get("last_line") if sub == "running" else ""
    if not last_line and record.get("log_file"):
        try:
            lines = read_named_tail(record, record["log_file"], state.work_dir, 1, roots)
            last_line = lines[-1] if lines else ""
        except (OSError, HpcrunError):
            last_line = ""
    job = record.get("job") or {}
    elapsed = ((end or now) - start) if start else None
    gpu_stats = record.get("gpu_stats")
    gpus = (gpu_state(gpu_stats) if sub == "running" else gpu_card(gpu_stats, MESSAGES["en"])) if gpu_stats else None
    return {"work_dir": state.work_dir, "run_id": run_id, "name": record.get("name"),
            "state": label, "status": record.get("status"), "start_time": start,
            "phase": run_phase(state, sub, run_id, delivery), "cause": record.get("cause"),
            "exit_code": record.get("exit_code"),
            "elapsed": elapsed,
            "host": record.get("host"), "log_file": record.get("log_file"),
            "last_line": last_line or "", "job": job_label(job),
            "time_left": job["end_time"] - now if sub == "running" and job.get("end_time") else None,
            "heartbeat_age": now - record["written_at"] if sub == "running" and record.get("written_at") else None,
            "delivery_failures": delivery.get("failures", 0), "delivery_error": delivery.get("last_error"),
            "progress": record.get("progress"), "metric": metric_line(record), "array": array_key(record),
            "gpus": gpus, "gpu_stats": gpu_stats, "checkpoint": checkpoint_text(record, MESSAGES["en"]),
            "forecast": forecast_of(record) or None, "eta": eta_text(record, MESSAGES["en"]) if sub == "running" else None,
            "finishes_in_time": (lambda times: None if times is None else times[0] <= times[1])(deadline(record))
            if sub == "running" else None,
            "cost": cost_text(*billed_hours(job, gpu_stats, elapsed), config=config, messages=MESSAGES["en"])}


def metric_line(record, lines=()):
    """The metric's trend from the record's sample, ending with the last value the log shows."""
    metric = record.get("metric") if isinstance(record.get("metric"), dict) else {}
    values = [float(v) for v in metric.get("values") or [] if isinstance(v, (int, float))]
    name = str(metric.get("name") or "loss")
    return format_metric_trend(name, settled_values(values, lines, name) if values else values)


PHASE_OF_SUB = {"running": "running", "done": "waiting", "claimed": "delivering", "held": "held", "sent": "reported"}
PHASE_OF_MARKER = (("recovered", "running"), ("lost", "lost"), ("stalled", "stalled"))
STATUS_COLUMNS = ("name", "state", "time", "progress", "detail", "eta")
STATUS_COLUMN_MAX = (28, 26, 8, 24, 200, 16)   # terminal columns each may take


def run_phase(state, sub, run_id, delivery):
    """Where a run stands: running, stalled, lost, waiting (to be reported), delivering, held
    (for its array's digest), reported, push_failed."""
    if delivery.get("failures") and sub not in ("running", "sent"):
        return "push_failed"
    if sub == "running":
        for status, phase in PHASE_OF_MARKER:
            if state.exists("running", marker(run_id, status)):
                return phase
    return PHASE_OF_SUB[sub]


def format_status_table(runs, messages, width):
    """An aligned table, one line per run, cut to the terminal's width (the detail column
    gives way first)."""
    rows = [[messages["col_" + column] for column in STATUS_COLUMNS]] + [status_cells(run, messages) for run in runs]
    widths = [min(max(text_width(row[index]) for row in rows), STATUS_COLUMN_MAX[index])
              for index in range(len(STATUS_COLUMNS))]
    lines = []
    for row in rows:
        cells = [fit_cell(cell, widths[index]) for index, cell in enumerate(row)]
        lines.append(fit_cell("  ".join(cells).rstrip(), width).rstrip())
    return lines


def status_cells(run, messages):
    """name, state, time, progress, cause or last line, ETA of one run (or array)."""
    status = run.get("status")
    state = messages.get("phase_" + (run.get("phase") or ""), run.get("state") or "?")
    if run.get("kind") == "array":
        state = run["shown"]
    elif status in STATUSES:
        state += " · " + messages["status_" + status]
    detail = run.get("last_line") or ""
    if status in FAILURE_STATUSES:
        cause = messages.get("cause_%s" % run.get("cause")) if run.get("cause") != "exit_code" else None
        code = "exit %s" % run["exit_code"] if run.get("exit_code") not in (None, 0) else None
        detail = " · ".join(part for part in (cause, code, detail) if part)
    if run.get("phase") == "push_failed":
        detail = "×%d: %s" % (run.get("delivery_failures") or 0, run.get("delivery_error") or "?")
    forecast = run.get("forecast") or {}
    eta = ""
    if forecast.get("eta") is not None and run.get("phase") in ("running", "stalled"):
        eta = format_duration(forecast["eta"]) + ("" if run.get("finishes_in_time") in (True, None)
                                                  else " " + messages["eta_late_short"])
    progress = run.get("progress") or forecast.get("label") or ""
    return [printable(str(run.get("name") or run.get("run_id") or "?"), 200), state,
            format_duration(run["elapsed"]) if run.get("elapsed") is not None else "-",
            printable(progress, 200), printable(detail, 500), eta]


def text_width(text):
    """Columns a text takes on a terminal: CJK and full-width characters take two."""
    import unicodedata
    return sum(2 if unicodedata.east_asian_width(char) in "WF" else 1 for char in text)


def fit_cell(text, width):
    """text cut (with …) or padded to width terminal columns."""
    if text_width(text) > width:
        while text and text_width(text) > width - 1:
            text = text[:-1]
        text += "…"
    return text + " " * (width - text_width(text))


def format_status_line(run):
    parts = [run.get("name") or run.get("run_id") or "?",
             run["state"] + (" (%s)" % run["status"] if run.get("status") else ""),
             "started %s" % (format_local_time(run["start_time"]) if run.get("start_time") else "-"),
             format_duration(run["elapsed"]) if run.get("elapsed") is not None else "-"]
    if run.get("time_left") is not None:
        parts.append("%s left" % format_duration(run["time_left"]))
    if run.get("heartbeat_age") is not None:
        parts.append("heartbeat %s ago" % format_duration(run["heartbeat_age"]))
    if run.get("eta"):
        parts.append("ETA " + run["eta"])
    for key in ("job", "progress", "metric", "gpus", "cost"):
        if run.get(key):
            parts.append(run[key])
    parts.append(run.get("last_line") or "")
    return printable("  ".join(str(part) for part in parts), 10000)  # names come from records


def collect_monitors(env=None):
    """Monitor heartbeats under ~/.hpcrun/monitors, one per login node."""
    directory = os.path.join(hpcrun_home(env), "monitors")
    monitors = []
    for filename in list_dir(directory):
        if filename.endswith(".json") and not filename.startswith("."):
            try:
                monitors.append(read_json_file(os.path.join(directory, filename)))
            except HpcrunError:
                continue
    return monitors


def format_monitor_line(monitor, now, host=None):
    """One line per monitor. On this host its pid says whether it runs; elsewhere "alive"
    compares two clocks, so it is only a hint."""
    written = monitor.get("written_at") if is_number(monitor.get("written_at")) else 0
    interval = monitor.get("interval") if is_number(monitor.get("interval")) else 60
    age = min(now - written, NUMBER_MAX)
    if monitor.get("host") == (host or host_name()) and isinstance(monitor.get("pid"), int):
        state = "alive" if is_monitor_process(monitor["pid"]) else "dead (its pid is gone)"
    else:
        state = "alive" if age <= 3 * interval + 60 else "silent"
    return "monitor on %s: pid %s, %s (last poll %s ago), hpcrun %s" % (
        monitor.get("host"), monitor.get("pid"), state, format_duration(age), monitor.get("version"))


# --- commands ---

def print_warning(message):
    emit("hpcrun: warning: %s" % message, sys.stderr)


def config_for(args, overrides=None):
    config = load_config(args.config, overrides or {})
    for warning in config.warnings:
        print_warning(warning)
    return config


def wrap_overrides(args):
    flags = {"log_dir": args.log_dir, "group": args.group, "group_size": args.group_size}
    return {"wrap": {key: value for key, value in flags.items() if value is not None}}


def wrap_config(args):
    """wrap runs the training whatever the notify settings say; only [wrap]'s own keys must be right."""
    try:
        return config_for(args, wrap_overrides(args))
    except ConfigError as error:
        if "[wrap]" in str(error) or "cannot read config" in str(error):
            raise
        print_warning("%s (ignored by wrap, which uses the defaults; the monitor will refuse it)" % error)
        return load_config(os.devnull, wrap_overrides(args), env={})


def cmd_wrap(args):
    config = wrap_config(args)
    wrapper, record = wrap_training(args, config, os.environ)
    if args.selftest:
        print_selftest_checks(wrapper, record)
    if args.then:
        run_then(args.then, wrapper, record)
    return record["exit_code"]


def print_selftest_checks(wrapper, record):
    """wrap --selftest in a batch job: what the compute node side looks like."""
    checks = [("record", "written to %s" % state_dir(wrapper.work_dir, "done")),
              ("log", "%s (%d bytes)" % (wrapper.log_path, record.get("log_size") or 0)),
              ("python", "%s %s" % (sys.executable, sys.version.split()[0])),
              ("job", job_label(wrapper.job) or "no scheduler job found in the environment")]
    if wrapper.job and wrapper.scheduler.launch_check:
        warning = wrapper.scheduler.launch_warning(wrapper.env, read_parent_comm())
        checks.append(("launch", warning or "exec'd as the job step's top process: signals reach hpcrun"))
    for name, text in checks:
        emit("hpcrun selftest: %s: %s" % (name, text))
    emit("hpcrun selftest: now the monitor on the login node should push a report marked as a test")


def cmd_run(args):
    config = config_for(args, wrap_overrides(args))
    channels = resolve_channels(config)
    wrapper, record = wrap_training(args, config, os.environ)
    if args.then:
        run_then(args.then, wrapper, record)
    monitor = Monitor(config, channels, make_logger(sys.stderr))
    delivered, failed, pending = monitor.deliver_one(wrapper.work_dir, wrapper.run_id)
    if failed or pending:
        print_warning("the report could not be pushed now: its record stays in '%s' and a "
                      "monitor will deliver it" % state_dir(wrapper.work_dir, "done"))
    return record["exit_code"]


def cmd_monitor(args):
    overrides = {"monitor": {"interval": args.interval}} if args.interval is not None else {}
    config = config_for(args, overrides)
    channels = resolve_channels(config)
    for work_dir in args.work_dir or ():
        if not os.path.isdir(work_dir):
            raise HpcrunError("work dir '%s' does not exist" % work_dir)
    if not parse_list(config.get("notify", "channels")) and not pushes_to_phone(config, channels):
        print_warning("no push channel configured: reports are only printed here "
                      "(see config.ini.example)")
    stop = threading.Event()
    monitor = Monitor(config, channels, make_logger(), stop=stop, once=args.once)
    if args.work_dir:
        fixed = [os.path.abspath(d) for d in args.work_dir]

        def work_dirs():
            return fixed
    else:
        work_dirs = registry_dirs(monitor)
    previous = {number: signal.signal(number, lambda n, f: stop.set())
                for number in (signal.SIGTERM, signal.SIGINT)}
    try:
        if not args.once:
            monitor.log("monitor started: pid %d, %s, every %gs" % (
                os.getpid(), "%d dir(s)" % len(args.work_dir) if args.work_dir else
                "registered dirs in '%s'" % hpcrun_home(), config.get("monitor", "interval")))
        status = run_monitor(monitor, work_dirs, max(0.1, config.get("monitor", "interval")),
                             args.once, stop)
        if not args.once:
            remove_quietly(monitor_heartbeat_path(monitor.host))
            monitor.log("monitor stopped")
        return status
    finally:
        restore_signal_handlers(previous)


def is_monitor_process(pid):
    """Whether pid runs hpcrun's monitor (pids are reused: its command line must say so)."""
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as stream:
            argv = stream.read().split(b"\0")
    except (OSError, OverflowError):
        return pid_alive(pid) and not os.path.isdir("/proc/self")
    return any(arg.endswith(b"hpcrun.py") for arg in argv) and b"monitor" in argv


def cmd_status(args):
    if args.monitors:
        monitors = collect_monitors()
        for monitor in monitors:
            emit(printable(format_monitor_line(monitor, time.time()), 500))
        return 0 if monitors else 3
    work_dirs = args.work_dir or sorted(set(entry[0] for entry in registered_work_dirs()))
    config = status_config(args)
    runs = []
    for work_dir in work_dirs:
        work_dir = os.path.abspath(work_dir)
        try:
            runs.extend(collect_runs(work_dir, named_file_roots(config, work_dir), config=config, archived=args.all))
        except OSError as error:
            print_warning("cannot read '%s': %s" % (work_dir, error.strerror or error))
        except HpcrunError as error:
            print_warning(str(error))
    messages = MESSAGES[config.get("notify", "language")]
    runs = sorted(runs, key=lambda run: -(run.get("start_time") or 0))
    if not args.tasks:
        runs = group_arrays(runs, messages)
    if args.json:
        emit(json.dumps(runs, ensure_ascii=False, indent=1, sort_keys=True))
    elif not runs:
        emit(messages["no_runs"])
    else:
        import shutil
        for line in format_status_table(runs, messages, shutil.get_terminal_size((120, 24)).columns):
            emit(line)
    return 0


def group_arrays(runs, messages=None):
    """The runs with the tasks of each array folded into one line with its counts (where the
    array's newest task would stand)."""
    messages = messages or MESSAGES["en"]
    folded, arrays = [], collections.OrderedDict()
    for run in runs:
        if run.get("array"):
            arrays.setdefault(run["array"], []).append(run)
        else:
            folded.append(run)
    for key, tasks in arrays.items():
        counts = collections.Counter(task["state"] for task in tasks)
        phases = collections.Counter(task.get("phase") for task in tasks)
        failed = len([task for task in tasks if task.get("status") in FAILURE_STATUSES])
        state = ", ".join("%d %s" % (count, state) for state, count in sorted(counts.items()))
        shown = " · ".join("%d %s" % (count, messages.get("phase_%s" % phase, phase))
                           for phase, count in sorted(phases.items(), key=lambda item: str(item[0])))
        folded.append({"kind": "array", "array": key, "work_dir": tasks[0]["work_dir"],
                       "name": "%s (array, %d tasks here)" % (key, len(tasks)), "tasks": len(tasks),
                       "failed": failed, "counts": dict(counts), "state": state, "shown": shown,
                       "status": "%d failed" % failed if failed else None,
                       "start_time": min([t["start_time"] for t in tasks if t.get("start_time")] or [None]),
                       "elapsed": None, "last_line": messages["array_failed_count"].format(n=failed) if failed else ""})
    return sorted(folded, key=lambda run: -(run.get("start_time") or 0))


def status_config(args):
    """The config for status, which must work even when the monitor's settings are broken."""
    try:
        return load_config(args.config)
    except ConfigError:
        return load_config(os.devnull, env={})


def cmd_config(args):
    """The settings in force, each with where it came from; secrets masked."""
    config = config_for(args)
    shown = config_view(config)
    if getattr(args, "json", False):
        emit(json.dumps(shown, ensure_ascii=False, indent=1))
        return 0
    emit("# config file: %s" % (config.path or "none (defaults)"))
    emit("# keys file:   %s" % (config.keys_path or "none"))
    emit("# channels:    %s" % ", ".join(name for name, _, _ in resolve_channels(config)))
    for section, values in shown.items():
        emit("\n[%s]" % section)
        width = max(len(key) + len(str(item["value"])) for key, item in values.items()) + 3
        for key, item in values.items():
            line = "%s = %s" % (key, item["value"])
            emit("%s  # %s" % (line.ljust(min(width, 60)), item["origin"]))
    return 0


def config_view(config):
    """{section: {key: {value, origin}}} of the general sections and of the channels in use or set."""
    channels = set(name for name, _, _ in resolve_channels(config))
    channels |= set(section for section, _ in config.origins)
    shown = collections.OrderedDict()
    for section in list(DEFAULTS) + sorted(name for name in config.sections if name not in DEFAULTS):
        if section not in DEFAULTS and (section not in channels or channel_type(section) not in CHANNELS):
            continue
        values = collections.OrderedDict()
        for key in sorted(config.sections.get(section, {})):
            value = config.get(section, key)
            text = ("yes" if value else "no") if isinstance(value, bool) else \
                "%g" % value if isinstance(value, float) else str(value)
            if text and is_secret_setting(section, key):
                text = "*** (set, %d characters)" % len(text)
            values[key] = {"value": redact(text, config.secrets), "origin": config.origins.get((section, key), "default")}
        shown[section] = values
    return shown


def cmd_notify(args):
    config = config_for(args)
    channels = resolve_channels(config)
    failed = 0
    for name, kind, settings in channels:
        try:
            send_report(name, kind, settings, test_report(config, name), config)
        except ChannelError as error:
            failed += 1
            emit("%s: failed: %s" % (name, error))
        else:
            emit("%s: ok" % name)
    return 1 if failed else 0


def cmd_selftest(args):
    """The whole path on this machine: config, work dir, wrap, monitor, push, archive. Each
    step adds what it found (the config, the work dir, the records) for the next ones."""
    if args.show_config:
        return cmd_config(args)
    found = {}
    steps = [("config", selftest_config), ("work dir", selftest_work_dir), ("wrap", selftest_wrap),
             ("monitor", selftest_monitor), ("push", selftest_push), ("archive", selftest_archive)]
    try:
        for number, (name, step) in enumerate(steps, 1):
            try:
                detail = step(args, found)
            except HpcrunError as error:
                emit("[%d/%d] %s: FAILED: %s" % (number, len(steps), name, error))
                emit("      fix: %s" % getattr(error, "fix", "see the message above"))
                return 1
            emit("[%d/%d] %s: ok (%s)" % (number, len(steps), name, detail))
    finally:
        selftest_cleanup(found)
    emit("selftest passed: a real run will be reported the same way")
    return 0


def failure_with_fix(message, fix):
    error = HpcrunError(message)
    error.fix = fix
    return error


def selftest_config(args, found):
    try:
        found["config"] = config_for(args)
        found["channels"] = resolve_channels(found["config"])
    except HpcrunError as error:
        raise failure_with_fix(str(error), "edit the file or variable named above (see config.ini.example)")
    if not pushes_to_phone(found["config"], found["channels"]):
        raise failure_with_fix("nothing will be pushed: set [notify] channels and a key (only the "
                               "console would get the reports)",
                               "put e.g. 'channels = xxtui' under [notify] in %s and the key in the "
                               "keys file (see config.ini.example)" % (found["config"].path or
                                                                        "~/.config/hpcrun/config.ini"))
    return "%s; channels: %s" % (found["config"].path or "no config file",
                                 ", ".join(name for name, _, _ in found["channels"]))


def selftest_work_dir(args, found):
    found["own_dir"] = not args.work_dir
    found["work_dir"] = os.path.abspath(args.work_dir or os.path.join(
        hpcrun_home(), "selftest", host_name()))
    try:
        os.makedirs(found["work_dir"], exist_ok=True)
        make_state_dirs(found["work_dir"])
    except OSError as error:
        raise failure_with_fix("cannot use '%s': %s" % (found["work_dir"], error.strerror),
                               "give a writable directory with --work-dir")
    return found["work_dir"]


def selftest_wrap(args, found):
    argv = [sys.executable, os.path.abspath(__file__), "wrap", "--selftest", "--name", "selftest",
            "--work-dir", found["work_dir"]] + (["--config", args.config] if args.config else [])
    before = set(list_dir(state_dir(found["work_dir"], "done")))
    result = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
    done = [name for name in list_dir(state_dir(found["work_dir"], "done"))
            if name.endswith(".json") and name not in before]
    found["run_ids"] = [name[:-5] for name in done]  # only these: the dir may hold real runs
    if result.returncode != 0 or not done:
        output = result.stdout.decode("utf-8", errors="replace").strip().splitlines()
        raise failure_with_fix("wrap exited %d: %s" % (result.returncode, output[-1] if output else ""),
                               "run '%s' by hand and read its output" % " ".join(argv))
    return "record %s" % done[-1]


def selftest_monitor(args, found):
    found["errors"] = []
    monitor = Monitor(found["config"], found["channels"], found["errors"].append)
    found["state"] = StateDir(found["work_dir"])
    items = []
    for run_id in found["run_ids"]:
        claimed = found["state"].claim("done", run_id + ".json", run_id, monitor.host, monitor.pid)
        items += [(run_id, claimed)] if claimed else []
    if not items:
        raise failure_with_fix("the monitor found no record in '%s'" % found["work_dir"],
                               "check that the work dir is on a file system this node can read")
    found["monitor"], found["items"] = monitor, items
    return "%d record(s) claimed" % len(items)


def selftest_push(args, found):
    for run_id, claimed in found["items"]:
        if found["monitor"].handle(found["state"], run_id, claimed) != "delivered":
            failed = [line for line in found["errors"] if line.startswith("push failed")]
            raise failure_with_fix("; ".join(failed) or "the push failed",
                                   "check the channel's key, token and url (keys file, or HPCRUN_<SECTION>_<KEY>); "
                                   "'python3 hpcrun.py notify --test' retries just the push")
    return "delivered via %s" % ", ".join(name for name, _, _ in found["channels"])


def selftest_archive(args, found):
    sent = list_dir(state_dir(found["work_dir"], "sent"))
    if not any(run_id + ".json" in sent for run_id, _ in found["items"]):
        raise failure_with_fix("the record was not archived", "check the work dir's permissions")
    return "record moved to %s" % state_dir(found["work_dir"], "sent")


def selftest_cleanup(found):
    """Leave nothing a real monitor would push later (a failed test report) or keep watching."""
    work_dir = found.get("work_dir")
    if found.get("state_dir"):
        found["state"].close()
    if not work_dir:
        return
    for sub in ("done", "claimed", "delivery", "running"):
        for name in list_dir(state_dir(work_dir, sub)):
            if any(name.startswith(run_id + ".") for run_id in found.get("run_ids", ())):
                remove_quietly(os.path.join(state_dir(work_dir, sub), name))
    if found.get("own_dir"):
        remove_quietly(registry_entry(work_dir))


def cmd_version(args):
    import hashlib
    with open(os.path.abspath(__file__), "rb") as stream:
        digest = hashlib.sha256(stream.read()).hexdigest()[:12]
    emit("hpcrun %s (sha256 %s)" % (__version__, digest))
    return 0


# --- command line ---

CONFIG_HELP = ("config file; default: $HPCRUN_CONFIG, else ~/.config/hpcrun/config.ini, else config.ini next "
               "to hpcrun.py (a keys file api_keys.ini beside it, chmod 600, holds the secrets; either may be "
               "missing)")
TOP_EPILOG = """first time on a cluster:
  python3 hpcrun.py selftest        check config, record, monitor and push on this machine
  ./hpcrun.sh monitor               keep a monitor running on the login node (./hpcrun.sh help)
  exec python3 hpcrun.py wrap --work-dir "$PWD" -- python train.py     in the batch script

python3 hpcrun.py COMMAND --help says more; python3 hpcrun.py config shows the settings in force."""
WRAP_EPILOG = """in a batch script (exec: the scheduler's signals reach the wrapper):
  exec python3 hpcrun.py wrap --work-dir "$PWD" --name resnet50 -- python train.py --epochs 90

exit status: the training's; 128+N when signal N ended it (143 SIGTERM, 130 Ctrl-C); 127 when the
command cannot start; 1 for another hpcrun error (a missing work dir); 2 for a usage or config
error (the training is not started)."""
COMMAND_HELP = (
    ("wrap", "run a training on the compute node: tee its output to DIR/logs, keep a heartbeat, "
             "leave a completion record (never needs the network)"),
    ("run", "wrap a training, then push its report at once (a lab server with network)"),
    ("monitor", "on the login node: push a report of every run that finished, failed, was killed, vanished "
                "or hung; exit 0 on SIGTERM, --once: 1 when something waits for a retry"),
    ("status", "list the runs not yet reported (and, --all, those that were) with their state"),
    ("selftest", "check the whole path on this machine: config, record, monitor, push; exit 1 on a failure"),
    ("notify", "send a test message through every configured channel (--test); exit 1 when one fails"),
    ("config", "show the settings in force, each with where it came from (secrets masked)"),
)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="hpcrun", description="Wrap a training on the compute node, report its end from the login node.",
        epilog=TOP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="store_true", help="print the version and the file's sha256")
    commands = parser.add_subparsers(dest="command_name", metavar="COMMAND")
    parser.subcommands = {}
    for name, help_text in COMMAND_HELP:
        sub = commands.add_parser(name, help=help_text, description=help_text,
                                  epilog=WRAP_EPILOG if name in ("wrap", "run") else None,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.set_defaults(func=COMMANDS[name])
        sub.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
        parser.subcommands[name] = sub
        OPTIONS[name](sub)
    return parser


def wrap_options(sub):
    sub.add_argument("--work-dir", required=True, metavar="DIR",
                     help="where the logs (DIR/logs) and records (DIR/.hpcrun) go; the training runs in it")
    sub.add_argument("--command", metavar="CMD", help="the training as one shell command, run by bash in DIR")
    sub.add_argument("--log-dir", metavar="DIR", help="log directory, relative to DIR (default: logs)")
    sub.add_argument("--name", help="run name shown in reports (default: the work dir's name)")
    sub.add_argument("--forward-signal", action="append", metavar="SIG",
                     help="also forward this warning signal (USR1, USR2) to the training (repeatable)")
    sub.add_argument("--group", metavar="NAME",
                     help="a sweep that is not a job array: its runs are reported as one digest "
                          "(also [wrap] group, HPCRUN_GROUP)")
    sub.add_argument("--group-size", type=int, metavar="N",
                     help="how many runs the group has: its digest comes when all N ended")
    sub.add_argument("--then", metavar="CMD",
                     help="run CMD once the completion record is on disk (e.g. 'scancel $SLURM_JOB_ID')")
    sub.set_defaults(selftest=False)
    if sub.prog.endswith("wrap"):
        sub.add_argument("--selftest", action="store_true",
                         help="run a tiny test command and leave a record the monitor pushes as a test")
    sub.add_argument("program", nargs=argparse.REMAINDER, help="-- PROGRAM ARG... (instead of --command)")


def monitor_options(sub):
    sub.add_argument("--work-dir", action="append", metavar="DIR",
                     help="work dir to watch (repeatable; default: every dir a wrap registered)")
    sub.add_argument("--interval", type=float, metavar="SECONDS", help="poll interval (default 60)")
    sub.add_argument("--once", action="store_true", help="poll once and exit (for cron)")


def status_options(sub):
    sub.add_argument("--work-dir", action="append", metavar="DIR",
                     help="work dir (repeatable; default: every registered dir)")
    sub.add_argument("--json", action="store_true", help="the same as JSON: a list, one object per run")
    sub.add_argument("--all", action="store_true", help="also the runs already reported (archived)")
    sub.add_argument("--tasks", action="store_true", help="every task of a job array on its own line")
    sub.add_argument("--monitors", action="store_true",
                     help="list the monitors on every login node instead (exit 3 if none)")


def selftest_options(sub):
    sub.add_argument("--work-dir", metavar="DIR", help="where to test (default: ~/.hpcrun/selftest/HOST)")
    sub.add_argument("--show-config", action="store_true",
                     help="only show the settings in force, as the config command does")


def notify_options(sub):
    sub.add_argument("--test", action="store_true",
                     help="send a test message through every channel in [notify] channels")


def config_options(sub):
    sub.add_argument("--json", action="store_true", help="as JSON: section -> key -> {value, origin}")


def parse_args(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        args.func = cmd_version
        return args
    if not getattr(args, "func", None):
        parser.error("a command is required (%s)" % ", ".join(name for name, _ in COMMAND_HELP))
    sub = parser.subcommands[args.command_name]
    if args.func in (cmd_wrap, cmd_run):
        program = args.program[1:] if args.program[:1] == ["--"] else args.program
        if args.selftest and not args.command and not program:
            program = [sys.executable, "-c", SELFTEST_PROGRAM]
        if bool(args.command) == bool(program):
            sub.error("give the training either as --command \"CMD\" or after --")
        args.program = program
    if getattr(args, "interval", None) is not None and args.interval <= 0:
        sub.error("--interval must be positive")
    if args.func is cmd_notify and not args.test:
        sub.print_help(sys.stderr)
        sub.exit(2, "\nhpcrun notify: nothing to do; --test sends a test message through every channel\n")
    return args


def run_as_module(argv):
    """wrap and run stay on the node as long as the training: run them from this file imported
    as a module, not as the main script, whose syntax tree CPython keeps until the script ends
    (14 MB for the whole run). The import compiles the file into __pycache__ once; later starts
    load that. Same process (exec), same pid, same arguments; best effort."""
    path = os.path.abspath(__file__)
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('hpcrun', %r); "
            "module = importlib.util.module_from_spec(spec); sys.modules['hpcrun'] = module; "
            "spec.loader.exec_module(module); sys.exit(module.main(sys.argv[1:]))" % path)
    try:
        os.execv(sys.executable, [sys.executable, "-c", code] + list(argv))
    except OSError:
        pass  # no interpreter to exec: go on as the main script


def main(argv=None):
    reserve_std_fds()
    argv = sys.argv[1:] if argv is None else argv
    if __name__ == "__main__" and argv[:1] in (["wrap"], ["run"]) and sys.executable:
        run_as_module(argv)
    args = parse_args(argv)
    try:
        return args.func(args)
    except HpcrunError as error:
        emit("hpcrun: error: %s" % error, sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 1


COMMANDS = {"wrap": cmd_wrap, "run": cmd_run, "monitor": cmd_monitor, "status": cmd_status,
            "selftest": cmd_selftest, "notify": cmd_notify, "config": cmd_config}
OPTIONS = {"wrap": wrap_options, "run": wrap_options, "monitor": monitor_options, "status": status_options,
           "selftest": selftest_options, "notify": notify_options, "config": config_options}

if __name__ == "__main__":
    sys.exit(main())
