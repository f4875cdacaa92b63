"""medreason.background: a call on its own thread, its result or error collected later."""

from __future__ import annotations

import threading

import pytest

from medreason.background import in_background


def test_result_comes_from_a_named_thread_and_errors_surface_at_result() -> None:
    release = threading.Event()

    def work(x: int) -> tuple[int, str]:
        release.wait(5)
        return x * 2, threading.current_thread().name

    future = in_background("encode", work, 21)
    assert not future.done()  # the caller goes on while it runs
    release.set()
    value, name = future.result(timeout=5)
    assert value == 42 and name.startswith("encode")

    def fail() -> None:
        raise ValueError("an option that encodes to no tokens")

    with pytest.raises(ValueError, match="no tokens"):
        in_background("encode", fail).result(timeout=5)
