"""An optional torch.profiler window over a few training steps, for finding where step time goes.

Off unless ``MEDREASON_PROFILE=START:STEPS:DIR`` is set (e.g. ``12:3:/tmp/prof``): steps START ..
START+STEPS-1 (0-based, after compilation has warmed up) run under the profiler, then rank 0
writes ``DIR/profile.txt``: GPU time per kernel family (matrix products, attention, fused
Triton kernels, everything else) and the top kernels by GPU time. On a GPU it also says how
long the GPU sat idle in the window (wall time from the first to the last event, less the union
of the device's kernel and copy intervals) and lists the largest gaps between them with the
host-side ops that overlap each gap most: what the host was doing while the GPU waited. It is a
diagnostic for benchmarks and tuning, not a metric: the profiler itself slows the window it
records.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from medreason.errors import InputError

log = logging.getLogger(__name__)

PROFILE_ENV = "MEDREASON_PROFILE"

# Kernel-name fragments per family, first match wins. cuBLAS on Hopper names its GEMMs
# nvjet_* (CUDA >= 12.8) or sm90_xmma_*/cutlass_*; FlashAttention kernels say flash/fmha.
FAMILIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention", ("flash", "fmha", "attention", "attn")),
    ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "matmul", "splitk", "::mm", "addmm", "bmm")),
    ("triton (fused elementwise/norm)", ("triton",)),
    ("optimizer", ("adam", "foreach", "multi_tensor")),
    ("copy/cast", ("copy", "cast", "memcpy", "memset", "transpose", "cat")),
)


def kernel_family(name: str) -> str:
    low = name.lower()
    for family, needles in FAMILIES:
        if any(n in low for n in needles):
            return family
    return "other"


class StepProfiler:
    """``before(step)`` / ``after(step)`` around each training step; a no-op when not asked."""

    def __init__(self, spec: str | None, is_main: bool) -> None:
        self.prof: Any = None
        self.start = self.stop = -1
        self.out_dir = ""
        self.is_main = is_main
        if not spec:
            return
        usage = f"{PROFILE_ENV}={spec!r}: expected START:STEPS:DIR (START >= 0, STEPS >= 1), e.g. 12:3:/tmp/prof"
        try:
            start, steps, out_dir = spec.split(":", 2)
            self.start, self.stop, self.out_dir = int(start), int(start) + int(steps), out_dir
        except ValueError as exc:
            raise InputError(usage) from exc
        if self.start < 0 or self.stop <= self.start or not out_dir:
            raise InputError(usage)

    def before(self, step: int) -> None:
        if step != self.start or self.prof is not None:
            return
        import torch

        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.prof = torch.profiler.profile(activities=activities)
        self.prof.__enter__()
        log.info("profiling steps %d..%d", self.start, self.stop - 1)

    def after(self, step_done: int) -> None:
        if self.prof is None or step_done < self.stop:
            return
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.prof.__exit__(None, None, None)
        prof, self.prof = self.prof, None
        self.start = -1  # once per run
        if self.is_main:
            log.info("profile written to %s", write_profile(prof, self.out_dir))

    def close(self) -> None:
        if self.prof is not None:
            self.prof.__exit__(None, None, None)
            self.prof = None


Interval = tuple[float, float]  # (start_us, end_us)


def merge_intervals(intervals: Iterable[Interval]) -> list[Interval]:
    """The union of the intervals, as sorted disjoint intervals."""
    merged: list[Interval] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


@dataclass
class Gap:
    """A stretch with nothing running on the device, and the host ops overlapping it most."""

    start_us: float
    end_us: float
    ops: list[tuple[str, float]] = field(default_factory=list)  # (name, overlap in us), largest first

    @property
    def length_us(self) -> float:
        return self.end_us - self.start_us


@dataclass
class IdleReport:
    wall_us: float
    busy_us: float
    gaps: list[Gap]

    @property
    def idle_us(self) -> float:
        return max(self.wall_us - self.busy_us, 0.0)


def idle_report(busy: Iterable[Interval], window: Interval, ops: Iterable[tuple[str, float, float]] = (),
                top: int = 10, ops_per_gap: int = 3) -> IdleReport:
    """Busy time (overlaps counted once), idle time and the ``top`` largest gaps between busy
    intervals within ``window``; each gap names the ``ops`` (name, start_us, end_us) with the
    most time inside it (summed over ops of the same name)."""
    merged = merge_intervals(busy)
    busy_us = sum(end - start for start, end in merged)
    between = [Gap(a[1], b[0]) for a, b in zip(merged, merged[1:], strict=False) if b[0] > a[1]]
    gaps = sorted(between, key=lambda g: -g.length_us)[:top]
    ops = list(ops)
    for gap in gaps:
        inside: dict[str, float] = {}
        for name, start, end in ops:
            overlap = min(end, gap.end_us) - max(start, gap.start_us)
            if overlap > 0:
                inside[name] = inside.get(name, 0.0) + overlap
        gap.ops = sorted(inside.items(), key=lambda kv: -kv[1])[:ops_per_gap]
    return IdleReport(window[1] - window[0], busy_us, gaps)


def _idle_lines(prof: Any) -> list[str]:
    """The idle section of the report: empty without device events (a CPU run)."""
    busy: list[Interval] = []
    host: list[tuple[str, float, float]] = []
    ends: list[Interval] = []
    for ev in prof.events():
        span = (float(ev.time_range.start), float(ev.time_range.end))
        ends.append(span)
        if str(getattr(ev, "device_type", "")).endswith("CUDA"):
            busy.append(span)
        elif ev.cpu_parent is None and not ev.is_async:  # top-level host ops, any thread
            host.append((ev.name, *span))
    if not busy:
        return []
    window = (min(s for s, _ in ends), max(e for _, e in ends))
    rep = idle_report(busy, window, host)
    wall = rep.wall_us or 1.0
    lines = ["", f"wall time of the profiled window (first to last event): {rep.wall_us / 1e3:.1f} ms; "
                 f"GPU busy (union of kernels and copies): {rep.busy_us / 1e3:.1f} ms; "
                 f"GPU idle: {rep.idle_us / 1e3:.1f} ms ({rep.idle_us / wall:.1%})",
             "", "| gap ms | starts at ms | host ops overlapping it most (ms inside the gap) |",
             "|---|---|---|"]
    for gap in rep.gaps:
        ops = ", ".join(f"`{name}` {us / 1e3:.2f}" for name, us in gap.ops) or "none (Python outside ops)"
        lines.append(f"| {gap.length_us / 1e3:.2f} | {(gap.start_us - window[0]) / 1e3:.1f} | {ops} |")
    return lines


def write_profile(prof: Any, out_dir: str) -> str:
    """The family summary and the top kernels of a finished profile, as Markdown tables, and
    on a GPU the idle time with the largest gaps between kernels.

    Only device-side events count on a GPU (a CPU op's "self CUDA time" is its kernels' time
    again); without a GPU the CPU ops' self time stands in, so the same report comes out.
    """
    events = list(prof.key_averages())
    on_gpu = [ev for ev in events if str(getattr(ev, "device_type", "")).endswith("CUDA")]
    rows = []
    for ev in on_gpu or events:
        us = float(ev.self_device_time_total if on_gpu else ev.self_cpu_time_total)
        if us > 0:
            rows.append((ev.key, us, int(ev.count)))
    total_us = sum(us for _, us, _ in rows) or 1.0
    families: dict[str, float] = {}
    for name, us, _ in rows:
        families[kernel_family(name)] = families.get(kernel_family(name), 0.0) + us
    what = "GPU kernel" if on_gpu else "CPU op (self)"
    lines = [f"{what} time over the profiled steps: {total_us / 1e3:.1f} ms", "",
             "| family | ms | share |", "|---|---|---|"]
    for family, us in sorted(families.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {family} | {us / 1e3:.1f} | {us / total_us:.1%} |")
    lines += ["", "| kernel | calls | ms | share |", "|---|---|---|---|"]
    for name, us, count in sorted(rows, key=lambda r: -r[1])[:40]:
        short = name if len(name) <= 110 else name[:107] + "..."
        lines.append(f"| `{short}` | {count} | {us / 1e3:.2f} | {us / total_us:.1%} |")
    if on_gpu:
        lines += _idle_lines(prof)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "profile.txt")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    return path
