"""Training metrics: the rows of metrics.jsonl (sent to the trackers), the step log line, MFU and ETA."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from medreason.tracking import Tracking

from medreason import jsonio

log = logging.getLogger("medreason.training")

# Peak dense bf16 matmul throughput per GPU, for MFU. H100/H200: ~800 TFLOP/s measured with
# large bf16 GEMMs (the 989 TFLOP/s datasheet figure is not reached in practice); A100: the
# 312 TFLOP/s datasheet figure. Other GPUs: set MEDREASON_PEAK_TFLOPS. CPUs: no MFU.
PEAK_FLOPS = {"H100": 800e12, "H200": 800e12, "GH200": 800e12, "A100": 312e12}
PEAK_TFLOPS_ENV = "MEDREASON_PEAK_TFLOPS"
# Every metrics.jsonl line has these keys (None where a value does not apply to that line).
METRIC_KEYS = ("step", "epoch", "loss", "eval_loss", "lr", "grad_norm", "tokens_per_s", "mfu",
               "peak_mem_gib")


def peak_flops(device: Any) -> float | None:
    import torch

    if os.environ.get(PEAK_TFLOPS_ENV):
        return float(os.environ[PEAK_TFLOPS_ENV]) * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_FLOPS.items():
        if key in name:
            return value
    return None


def empty_row(step: int, steps_per_epoch: int) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(METRIC_KEYS)
    row.update({"step": step, "epoch": round(step / steps_per_epoch, 4)})
    return row


def format_duration(seconds: float) -> str:
    """h:mm:ss (the hours grow past 24 rather than wrapping)."""
    total = int(round(seconds))
    return f"{total // 3600}:{total % 3600 // 60:02d}:{total % 60:02d}"


class Clock:
    """Elapsed time of this process's loop and an ETA from its mean step time so far.

    Steps done before a resume are not counted: their time is unknown to this process, and the
    ones it runs itself are the better estimate of the remaining ones anyway.
    """

    def __init__(self, first_step: int, total_steps: int):
        self.started = time.monotonic()
        self.first_step = first_step
        self.total_steps = total_steps

    def fields(self, step: int) -> str:
        elapsed = time.monotonic() - self.started
        done = step - self.first_step
        eta = elapsed / done * (self.total_steps - step) if done > 0 else None
        return f"elapsed={format_duration(elapsed)} eta={format_duration(eta) if eta is not None else '?'}"


class MetricsLog:
    """The rows of metrics.jsonl, sent to the run's trackers (medreason.tracking; rank 0 only).

    With ``tensorboard`` the events are written in a local folder, restored from a checkpoint on
    resume, copied into every checkpoint and the final commit, and mirrored to
    runs/<run>/train/tensorboard/ at each of them.
    """

    def __init__(self, total_steps: int, tracking: Tracking | None = None):
        self.rows: list[dict[str, Any]] = []
        self.total_steps = total_steps
        self.tracking = tracking
        tensorboard = tracking is not None and tracking.tensorboard
        self.tb_dir = tempfile.mkdtemp(prefix="medreason-tb-") if tensorboard else None

    def restore(self, checkpoint_dir: str, step: int) -> None:
        """The rows (up to ``step``) and events a checkpoint holds; before open_writer()."""
        path = os.path.join(checkpoint_dir, "metrics.jsonl")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as fh:
                rows = [json.loads(line) for line in fh if line.strip()]
            self.rows = [m for m in rows if m.get("step", 0) <= step]
        events = os.path.join(checkpoint_dir, "tensorboard")
        if self.tb_dir and os.path.isdir(events):
            shutil.copytree(events, self.tb_dir, dirs_exist_ok=True)

    def open_writer(self) -> None:
        """Start the trackers (continuing the run's recorded tracker runs)."""
        if self.tracking is not None:
            self.tracking.start(self.tb_dir)

    def log_row(self, row: dict[str, Any], pbar: Any, clock: Clock | None = None) -> None:
        self.rows.append(row)
        if self.tracking is not None:
            self.tracking.log({f"train/{k}": v for k, v in row.items() if k != "step"}, row["step"])
        shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items() if v is not None}
        if pbar.disable:
            timing = f" {clock.fields(row['step'])}" if clock is not None else ""
            log.info("step %d/%d %s%s", row["step"], self.total_steps,
                     " ".join(f"{k}={v}" for k, v in shown.items() if k != "step"), timing)
        else:
            pbar.set_postfix({k: v for k, v in shown.items() if k in ("loss", "eval_loss", "lr")})

    def write_to(self, folder: str) -> None:
        """metrics.jsonl (and tensorboard/, trackers.json) into a folder about to be committed."""
        with open(os.path.join(folder, "metrics.jsonl"), "w", encoding="utf-8") as fh:
            for row in self.rows:
                fh.write(jsonio.dumps_line(row, sort_keys=True) + "\n")
        if self.tracking is None:
            return
        self.tracking.write_record(folder)
        if self.tb_dir and os.listdir(self.tb_dir):
            self.tracking.flush()
            shutil.copytree(self.tb_dir, os.path.join(folder, "tensorboard"), dirs_exist_ok=True)
            self.tracking.publish_tensorboard(self.tb_dir)

    def close(self) -> None:
        if self.tracking is not None:
            self.tracking.finish()
        if self.tb_dir:
            shutil.rmtree(self.tb_dir, ignore_errors=True)
