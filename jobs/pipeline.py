"""medreason pipeline: prepare -> train -> evaluate -> merge for one run, in one process."""

from __future__ import annotations

import importlib
import logging
import sys
import time

import click

from jobs.common import COMMON_HELP, common_options, exit_codes, make_context

log = logging.getLogger("medreason.pipeline")

STAGES = ("prepare", "train", "evaluate", "merge")


def run_stage(name: str, args: list[str]) -> int:
    """Run one job's click command in this process; its exit code (0 when it returned)."""
    command = getattr(importlib.import_module(f"jobs.{name}"), name)
    try:
        command.main(args=args, prog_name=f"medreason {name}", standalone_mode=False)
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.Abort:
        return 130
    return 0


@click.command(help=f"""Run prepare -> train -> evaluate -> merge for one run.

\b
Each stage is the same command as `medreason <stage>` with these options; a committed
stage says "already committed" and is skipped, an interrupted train resumes from its
last checkpoint. The first stage that fails stops the pipeline with its exit code
(75 from a preempted train: requeue the pipeline and it resumes). At the end it prints
where the report is.

\b
  medreason pipeline --preset demo --run demo      # offline CPU demo, 4-7 minutes on 2 cores
{COMMON_HELP}""")
@common_options
@click.option("--until", type=click.Choice(STAGES), default="merge", show_default=True,
              help="Stop after this stage.")
@exit_codes
def pipeline(preset, config_file, overrides, store, run_id, force, verbose, until) -> None:
    ctx = make_context(preset, config_file, overrides, store, run_id, force)  # fail fast on bad options
    args: list[str] = []
    if preset:
        args += ["--preset", preset]
    if config_file:
        args += ["--config", config_file]
    for item in overrides:
        args += ["--set", item]
    args += ["--store", store, "--run", ctx.run_id]
    if force:
        args.append("--force")
    if verbose:
        args.append("-v")

    started = time.monotonic()
    timings = {}
    for name in STAGES:
        t0 = time.monotonic()
        log.info("pipeline: %s", name)
        code = run_stage(name, args)
        timings[name] = time.monotonic() - t0
        if code != 0:
            log.error("pipeline stopped: %s exited with %d after %.0f s", name, code, timings[name])
            sys.exit(code)
        if name == until:
            break
    summary = ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
    log.info("pipeline of run %r done in %.0f s (%s)", ctx.run_id, time.monotonic() - started, summary)
    st = ctx.store
    if "evaluate" in timings:
        click.echo(f"Report: {st.display(st.stage_rel(ctx.run_id, 'evaluate'))}/report.md")
    if "merge" in timings:
        click.echo(f"Merged model: {st.display(st.stage_rel(ctx.run_id, 'merge'))}/model")


if __name__ == "__main__":
    pipeline()
