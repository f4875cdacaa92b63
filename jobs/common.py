"""What every job shares: the common options, logging, and exceptions -> exit codes."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click

from jobs.markers import process_rank
from medreason.errors import (
    EXIT_BAD_INPUT,
    EXIT_FAILURE,
    EXIT_PREEMPTED,
    InputError,
    Preempted,
    StoreUnavailable,
)

log = logging.getLogger("medreason")

COMMON_HELP = """
\b
Config sources, lowest precedence first: the schema's defaults, --preset, --config FILE,
--set dotted.key=value (repeatable), then MEDREASON_MODEL / MEDREASON_DATA.
\b
Exit codes: 0 done (or already done), 2 bad usage/config/data or the stage is being
written by another job (do not retry), 75 preempted after a checkpoint (requeue: it
resumes), 1 anything else (a lost lease too: a retry sees the other writer's commit).
"""
# The stage jobs (prepare, train, evaluate, merge) add --wait-for-lease (lease_option).


@dataclass
class JobContext:
    """The parsed common options, resolved into a config and a store."""

    config: Any  # medreason.config.Config
    store: Any  # medreason.store.ArtifactStore
    run_id: str
    force: bool
    preset: str | None
    # Seconds to wait for another job's lease on the stage (--wait-for-lease; 0: refuse at once).
    wait_for_lease: float = 0.0
    # The lease this process holds on the stage while jobs.stage.run_stage builds and commits it.
    lease: Any = None


def setup_logging(verbose: bool = False) -> None:
    """Configure logging once. Ranks other than 0 log warnings and errors only."""
    level = logging.DEBUG if verbose else logging.INFO
    if process_rank() != 0:
        level = logging.WARNING
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    for noisy in ("botocore", "aiobotocore", "s3fs", "fsspec", "urllib3", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def common_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--preset/--config/--set/--store/--run/--force/--verbose, shared by every job."""
    options = [
        click.option("--preset", metavar="NAME", default=None,
                     help="Shipped recipe: phi2-seed (8-bit, the original), phi2-nf4 (QLoRA), "
                          "phi2-bf16 (fast LoRA), demo (offline CPU)."),
        click.option("--config", "config_file", metavar="FILE", default=None,
                     type=click.Path(dir_okay=False),
                     help="YAML file with sections model/data/lora/train/eval/merge."),
        click.option("--set", "overrides", metavar="KEY=VALUE", multiple=True,
                     help="Override one config key, e.g. --set train.max_steps=100 (repeatable)."),
        click.option("--store", metavar="URI", envvar="MEDREASON_STORE", default="./artifacts",
                     show_default=True,
                     help="Artifact store: a folder or s3://bucket/prefix [env MEDREASON_STORE]."),
        click.option("--run", "run_id", metavar="RUN_ID", envvar="MEDREASON_RUN", default=None,
                     help="Run id: letters, digits, . _ - [env MEDREASON_RUN]. Required."),
        click.option("--force", is_flag=True, default=False,
                     help="Redo a stage that is already committed (also with a different config)."),
        click.option("-v", "--verbose", is_flag=True, default=False, help="Debug logging."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _remember_wait(ctx: click.Context, _param: click.Parameter, value: float) -> float:
    ctx.meta["medreason.wait_for_lease"] = value
    return value


def lease_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """--wait-for-lease SECONDS, for the jobs that write a stage. Not passed to the command:
    make_context reads it, so a job's signature stays the common one."""
    return click.option(
        "--wait-for-lease", type=click.FloatRange(min=0), default=0.0, show_default=True,
        metavar="SECONDS", envvar="MEDREASON_WAIT_FOR_LEASE", expose_value=False,
        callback=_remember_wait,
        help="When another job holds this stage's lease, wait up to SECONDS for it to be released "
             "or to expire instead of exiting 2 [env MEDREASON_WAIT_FOR_LEASE]. A restarted "
             "Kubernetes pod should use at least the lease ttl (120 s): its predecessor's lease "
             "lives on until then.",
    )(func)


def make_context(preset, config_file, overrides, store, run_id, force) -> JobContext:
    from medreason.config import build_config
    from medreason.store import ArtifactStore, validate_segment

    if run_id is None:
        raise click.UsageError("--run is required (or set MEDREASON_RUN)")
    run_id = validate_segment(run_id, "--run")
    config = build_config(preset, config_file, overrides)
    artifact_store = ArtifactStore(store)
    # Before any model or data is loaded: a store that cannot be written exits 2 now (StoreError),
    # one that does not answer is retried, then exits 1 (StoreUnavailable), in one line each.
    # Only the writing process (rank 0) probes: the other ranks of a distributed job never write.
    if process_rank() == 0:
        artifact_store.probe()
    click_ctx = click.get_current_context(silent=True)
    wait = click_ctx.meta.get("medreason.wait_for_lease", 0.0) if click_ctx is not None else 0.0
    return JobContext(config=config, store=artifact_store, run_id=run_id, force=force,
                      preset=preset, wait_for_lease=float(wait))


def exit_codes(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the library's exceptions into the documented exit codes, with no traceback for
    a user's mistake. Every message it prints has the store URI's credentials masked."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        setup_logging(kwargs.get("verbose", False))
        uri = kwargs.get("store")

        def safe(text: str) -> str:
            from medreason.store import scrub

            return scrub(text, uri)

        from jobs.markers import note_failure  # a stage's FAILED.json marker
        from medreason.lease import LeaseHeld, LeaseLost

        # The failure marker of an earlier attempt is cleared by jobs.stage once this job holds
        # the stage's lease: before that, the stage folder may be another writer's.
        try:
            return func(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except LeaseHeld as exc:
            # Another live job writes this stage: no failure marker (the stage has not failed,
            # and `medreason wait` must keep waiting for the holder's commit).
            click.echo(f"Error: {safe(str(exc))}", err=True)
            sys.exit(EXIT_BAD_INPUT)
        except LeaseLost as exc:
            click.echo(f"Error: {safe(str(exc))} (exit {EXIT_FAILURE})", err=True)
            sys.exit(EXIT_FAILURE)
        except Preempted as exc:
            log.warning("%s; exiting %d so the scheduler requeues the job", safe(str(exc)), EXIT_PREEMPTED)
            sys.exit(EXIT_PREEMPTED)
        except (InputError, ValueError) as exc:
            click.echo(f"Error: {safe(str(exc))}", err=True)
            note_failure(func.__name__, kwargs, safe(str(exc)))
            sys.exit(EXIT_BAD_INPUT)
        except StoreUnavailable as exc:
            click.echo(f"Error: {safe(str(exc))} (exit {EXIT_FAILURE}: retry later)", err=True)
            sys.exit(EXIT_FAILURE)
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            sys.exit(130)
        except Exception as exc:
            import traceback

            from medreason.store import classify_store_error

            if classify_store_error(exc) == "transient" and not kwargs.get("verbose"):
                # The store (or another service) stopped answering mid-job: a network fault, not a
                # bug, so one line rather than a traceback.
                click.echo(f"Error: a network call failed: {safe(str(exc)) or type(exc).__name__} "
                           f"(exit {EXIT_FAILURE}: retry later)", err=True)
                sys.exit(EXIT_FAILURE)
            log.error("unexpected failure (exit %d; a scheduler may retry)\n%s", EXIT_FAILURE,
                      safe(traceback.format_exc()).rstrip())
            sys.exit(EXIT_FAILURE)

    return wrapper
