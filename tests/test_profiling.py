"""The profiler report's idle-time analysis (medreason.profiling), on made-up intervals."""

from __future__ import annotations

import pytest

from medreason.profiling import idle_report, merge_intervals


def test_merge_counts_overlaps_once() -> None:
    assert merge_intervals([(5, 7), (0, 2), (1, 3), (3, 4), (6, 6.5)]) == [(0, 4), (5, 7)]
    assert merge_intervals([]) == []


def test_busy_idle_and_largest_gaps() -> None:
    # Kernels (us): 0-10 and 5-20 overlap (busy 0-20), 20-30 touches it, then gaps of 15
    # (30-45), 5 (50-55) and 40 (60-100); two concurrent kernels 100-120 and 110-115.
    kernels = [(0, 10), (5, 20), (20, 30), (45, 50), (55, 60), (100, 120), (110, 115)]
    ops = [
        ("aten::item", 28, 44),        # 14 us of the 15 us gap, 0 of the others
        ("collate", 30, 45),           # all 15 us of it
        ("aten::to", 62, 70),          # 8 us of the 40 us gap
        ("aten::to", 80, 84),          # 4 more: 12 us of aten::to in it
        ("aten::mul", 55, 99),         # 39 us of the 40 us gap, none of the 50-55 one
        ("aten::add", 0, 10),          # only over busy time
    ]
    rep = idle_report(kernels, (-10, 130), ops, top=2)
    assert rep.wall_us == 140
    assert rep.busy_us == 30 + 5 + 5 + 20
    assert rep.idle_us == 140 - 60
    assert [(g.start_us, g.end_us, g.length_us) for g in rep.gaps] == [(60, 100, 40), (30, 45, 15)]
    assert rep.gaps[0].ops == [("aten::mul", 39), ("aten::to", 12)]
    assert rep.gaps[1].ops == [("collate", 15), ("aten::item", 14)]
    everything = idle_report(kernels, (0, 120), ops)
    assert [g.length_us for g in everything.gaps] == [40, 15, 5]
    assert everything.gaps[2].ops == []  # 50-55: nothing on the host overlaps it
    assert everything.idle_us == pytest.approx(60)


def test_no_kernels_no_gaps() -> None:
    rep = idle_report([], (0, 10))
    assert rep.busy_us == 0 and rep.idle_us == 10 and rep.gaps == []


class _Event:
    """The fields write_profile reads from a torch.profiler event (FunctionEvent / FunctionEventAvg)."""

    def __init__(self, name: str, device: str, start: float, end: float, parent: object = None) -> None:
        from types import SimpleNamespace

        self.name = self.key = name
        self.device_type = f"DeviceType.{device}"
        self.time_range = SimpleNamespace(start=start, end=end)
        self.cpu_parent, self.is_async, self.count = parent, False, 1
        self.self_device_time_total = end - start if device == "CUDA" else 0.0
        self.self_cpu_time_total = end - start if device == "CPU" else 0.0


class _Profile:
    def __init__(self, events: list[_Event]) -> None:
        self._events = events

    def events(self) -> list[_Event]:
        return self._events

    def key_averages(self) -> list[_Event]:
        return self._events


def test_report_has_the_idle_section_on_a_gpu_only(tmp_path) -> None:
    from medreason.profiling import write_profile

    launch = _Event("aten::mm", "CPU", 0, 1000)
    gpu = _Profile([launch, _Event("cudaLaunchKernel", "CPU", 10, 20, parent=launch),
                    _Event("nvjet_gemm", "CUDA", 1000, 4000), _Event("aten::item", "CPU", 4000, 6000),
                    _Event("triton_poi_fused", "CUDA", 6500, 10000)])
    report = tmp_path / "gpu" / "profile.txt"
    write_profile(gpu, str(tmp_path / "gpu"))
    text = report.read_text()
    assert "| matmul | 3.0 | 46.2% |" in text  # the existing tables stay
    assert "wall time of the profiled window (first to last event): 10.0 ms" in text
    assert "GPU busy (union of kernels and copies): 6.5 ms; GPU idle: 3.5 ms (35.0%)" in text
    assert "| 2.50 | 4.0 | `aten::item` 2.00 |" in text  # cudaLaunchKernel is not top-level
    cpu = _Profile([launch, _Event("aten::item", "CPU", 4000, 6000)])
    write_profile(cpu, str(tmp_path / "cpu"))
    assert "CPU op (self) time" in (tmp_path / "cpu" / "profile.txt").read_text()
    assert "GPU idle" not in (tmp_path / "cpu" / "profile.txt").read_text()
