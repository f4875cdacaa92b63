"""The one seam through which tests slow production code down; a no-op unless its variables are set.

Tests of preemption and crash safety need to signal or kill a process at a chosen point, but
a tiny model trains a step in milliseconds and commits a folder in less. These hooks sleep at
those points when (and only when) a test sets the environment variable. Nothing in production
sets them, and each hook costs one environment lookup.
"""

from __future__ import annotations

import os
import time

# Seconds to sleep after every optimizer step (medreason.training).
STEP_DELAY_ENV = "MEDREASON_TEST_STEP_DELAY_S"
# Seconds to sleep after each file uploaded by ArtifactStore.commit_dir (medreason.store).
SLOW_COMMIT_ENV = "MEDREASON_TEST_SLOW_COMMIT_S"


def _seconds(name: str) -> float:
    value = os.environ.get(name)
    return float(value) if value else 0.0


def after_optimizer_step() -> None:
    """Sleep MEDREASON_TEST_STEP_DELAY_S seconds (unset: return at once)."""
    delay_s = _seconds(STEP_DELAY_ENV)
    if delay_s:
        time.sleep(delay_s)


def between_uploads() -> None:
    """Sleep MEDREASON_TEST_SLOW_COMMIT_S seconds (unset: return at once)."""
    pause_s = _seconds(SLOW_COMMIT_ENV)
    if pause_s:
        time.sleep(pause_s)
