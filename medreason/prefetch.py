"""The next training micro-batch, collated and copied to the device while the GPU still works.

Without it the host collates a micro-batch (numpy) and copies it to the device right before its
forward, and at a step's start that is after the logging sync: the GPU's queue is empty then,
so it waits for that host work. The loop (medreason.training) instead asks for micro-batch k+1
right after launching the backward of micro-batch k, and for the next step's first one right
after launching the optimizer step (before the logging sync). One worker thread collates it and
launches its (pinned, non-blocking) copy while the GPU runs the queued kernels and the main
thread launches more or waits in a sync; numpy and the copies release the GIL for part of it.

Results are unchanged: a prefetched micro-batch is the one the plan gives for that (step, slot),
the loop seeds torch's RNG right before each forward as before (the worker draws no random
numbers), and a prefetch the loop does not ask for (a preemption, the end of the run) is
dropped. A resumed run starts with nothing prefetched.

``MEDREASON_PREFETCH=0`` (or false/no/off) turns it off: every micro-batch is collated and
copied on the main thread right before its forward. Default: on (1/true/yes/on).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from medreason.errors import env_switch

PREFETCH_ENV = "MEDREASON_PREFETCH"


def prefetch_enabled() -> bool:
    """Whether the training loop prefetches micro-batches (``MEDREASON_PREFETCH``, default on)."""
    return env_switch(PREFETCH_ENV)


def _bind_device(index: int | None) -> None:
    """The worker's current CUDA device (``index``; None off CUDA): a new thread starts on device
    0, which on a rank that owns another GPU would create a CUDA context there for the
    pinned-memory copy."""
    if index is not None:
        import torch

        torch.cuda.set_device(index)


def _device_index(device: Any) -> int | None:
    """The CUDA device index of ``device`` (a bare ``cuda`` means the current one), or None."""
    if getattr(device, "type", "cpu") != "cuda":
        return None
    if device.index is not None:
        return int(device.index)
    import torch

    return torch.cuda.current_device()


class Prefetcher:
    """``ahead(key, item)`` starts loading ``item`` in the background; ``take(key, item)`` returns
    its loaded form, the prefetched one when ``key`` is the one prefetched, else loaded now.

    At most one item is in flight. ``load`` must not touch state the caller changes meanwhile.
    Disabled, ``ahead`` does nothing and ``take`` loads on the calling thread.
    """

    def __init__(self, load: Callable[[Any], Any], device: Any, enabled: bool) -> None:
        self.load = load
        self.pending: tuple[Hashable, Future[Any]] | None = None
        self.pool = (ThreadPoolExecutor(1, thread_name_prefix="prefetch", initializer=_bind_device,
                                        initargs=(_device_index(device),)) if enabled else None)

    @property
    def enabled(self) -> bool:
        return self.pool is not None

    def ahead(self, key: Hashable, item: Any) -> None:
        if self.pool is None:
            return
        self._drop()
        self.pending = (key, self.pool.submit(self.load, item))

    def take(self, key: Hashable, item: Any) -> Any:
        if self.pending is not None and self.pending[0] == key:
            future = self.pending[1]
            self.pending = None
            return future.result()  # a failure in the worker is raised here
        self._drop()
        return self.load(item)

    def close(self) -> None:
        self._drop()
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None

    def _drop(self) -> None:
        """Forget the item in flight (waiting for it: the worker never runs two at once)."""
        if self.pending is not None:
            future = self.pending[1]
            self.pending = None
            if not future.cancel():
                future.exception()  # wait; an unused item's failure does not matter
