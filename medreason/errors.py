"""Exceptions that map to the documented exit codes (see README, "Exit codes").

| exception          | exit | meaning                                                          |
|--------------------|------|------------------------------------------------------------------|
| InputError         | 2    | bad usage, config or input data; the message says what & where   |
| StoreError         | 2    | store unusable: path not creatable/writable, no such bucket,     |
|                    |      | access denied, bad credentials, credentials in the URI           |
| Preempted          | 75   | stopped by a signal after committing a checkpoint; requeue        |
| StoreUnavailable   | 1    | store unreachable (refused, timeout, throttled, 5xx) after the    |
|                    |      | bounded retries (MEDREASON_STORE_RETRY_S); one line, retry later  |
| anything else      | 1    | unexpected; a scheduler may retry                                 |
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_PREEMPTED = 75  # EX_TEMPFAIL from sysexits.h: "try again later"


class InputError(ValueError):
    """A user's mistake: bad config, bad data, a missing stage. Exit code 2, no traceback."""


class StageConflict(InputError):
    """A committed stage exists with a different config or inputs; needs --force or a new run id."""


class Preempted(Exception):
    """Raised after a checkpoint was committed in response to SIGTERM/SIGUSR1. Exit code 75."""

    def __init__(self, step: int, checkpoint_uri: str):
        super().__init__(f"preempted at step {step}; checkpoint committed at {checkpoint_uri}")
        self.step = step
        self.checkpoint_uri = checkpoint_uri


class StoreError(InputError):
    """The artifact store cannot be used as given, and retrying will not help: a path that cannot
    be created or written (read-only, under a regular file, /proc/...), a missing bucket, access
    denied or invalid credentials, credentials inside the URI. Exit code 2."""


class StoreUnavailable(Exception):
    """The store did not answer (connection refused, timeout, throttling, 5xx) for the whole
    retry budget (MEDREASON_STORE_RETRY_S). Exit code 1: a later attempt may succeed."""


def env_switch(name: str) -> bool:
    """An on/off environment variable, on when unset: 1/true/yes/on or 0/false/no/off; anything
    else is an InputError naming the variable (for the switches back to a plain path)."""
    import os

    value = os.environ.get(name, "").strip().lower()
    if value in ("", "1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise InputError(f"{name}={value!r}: expected 1/true/yes/on or 0/false/no/off (default on)")
