"""One call run on its own thread while the caller goes on, its result (or error) collected later.

The evaluate job starts encoding prompts or likelihood requests as soon as the tokenizer is
loaded and collects them after the model has loaded; tokenizer backends release the GIL, so the
two overlap for real.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


def in_background(name: str, fn: Callable[..., Any], *args: Any) -> Future[Any]:
    """``fn(*args)`` started on a thread named ``name``; ``.result()`` waits for it and raises
    what it raised. The thread ends with its one call."""
    pool = ThreadPoolExecutor(1, thread_name_prefix=name)
    future = pool.submit(fn, *args)
    pool.shutdown(wait=False)
    return future
