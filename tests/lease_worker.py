"""A separate writer process for tests/test_lease.py: takes a stage's lease, then holds it or
commits a folder under it. Prints one JSON line per event on stdout; logs on stderr.

    python tests/lease_worker.py STORE REL '{"mode": "hold"|"commit", ...}'

Options: ttl_s, renew_every_s, wait_s, renew (bool), start_file (spin until it exists before
acquiring, so several workers race), release_file (hold until it exists), go_file (commit only
once it exists), files ({name: text}) to commit.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time

from medreason.lease import LeaseHeld, LeaseLost, acquire
from medreason.store import ArtifactStore


def _say(**event: object) -> None:
    print(json.dumps(event), flush=True)


def _wait_for(path: str | None) -> None:
    while path and not os.path.exists(path):
        time.sleep(0.005)


def main() -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
    store_uri, rel, raw = sys.argv[1:4]
    opts = json.loads(raw)
    store = ArtifactStore(store_uri)
    store.exists(rel)  # connect (S3) before the race starts
    _say(event="ready", pid=os.getpid())
    _wait_for(opts.get("start_file"))
    try:
        lease = acquire(store, rel, ttl_s=opts.get("ttl_s", 120.0), renew_every_s=opts.get("renew_every_s", 30.0),
                        wait_s=opts.get("wait_s", 0.0), poll_s=opts.get("poll_s"), renew=opts.get("renew", True))
    except LeaseHeld as exc:
        _say(event="refused", message=str(exc), holder_pid=exc.holder.pid, holder_owner=exc.holder.owner)
        return 2
    _say(event="acquired", generation=lease.generation, owner=lease.owner, pid=os.getpid(), at=time.time())
    try:
        if opts["mode"] == "hold":
            _wait_for(opts.get("release_file"))
            time.sleep(opts.get("hold_s", 0.0))
        else:
            _wait_for(opts.get("go_file"))
            with tempfile.TemporaryDirectory() as out:
                for name, text in opts["files"].items():
                    with open(os.path.join(out, name), "w", encoding="utf-8") as fh:
                        fh.write(text)
                store.commit_dir(out, rel, {"writer": os.getpid()}, lease=lease)
            _say(event="committed", pid=os.getpid())
    except LeaseLost as exc:
        _say(event="lost", message=str(exc))
        lease.release()
        return 1
    lease.release()
    _say(event="released", pid=os.getpid(), at=time.time())
    return 0


if __name__ == "__main__":
    sys.exit(main())
