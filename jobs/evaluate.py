"""medreason evaluate: score the base and the fine-tuned model; write a report."""

from __future__ import annotations

import logging
import time

import click

from jobs.common import COMMON_HELP, common_options, exit_codes, make_context

log = logging.getLogger("medreason.evaluate")


@click.command(help=f"""Generate answers to held-out and benchmark questions and score them.

\b
Which model: eval.checkpoint = final (default) | best | step-<N> | merged | none (base
alone); with eval.compare_base the base is scored too, side by side. What: prepare's
held-out split (eval.heldout) and eval.benchmarks files. Writes runs/<run>/evaluate/:
predictions.jsonl, metrics.json, report.md, loss_curves.png, accuracy.png.
Under `accelerate launch` the questions are sharded over the processes.
{COMMON_HELP}""")
@common_options
@exit_codes
def evaluate(preset, config_file, overrides, store, run_id, force, verbose) -> None:
    from medreason.evaluation.stage import Dist, evaluate_run, stage_inputs
    from medreason.store import build_manifest, check_stage

    ctx = make_context(preset, config_file, overrides, store, run_id, force)
    cfg, st, run = ctx.config, ctx.store, ctx.run_id
    started = time.monotonic()
    rel = st.stage_rel(run, "evaluate")

    inputs = stage_inputs(st, run, cfg.eval.checkpoint)
    done = check_stage(st, run, "evaluate", cfg.stage_hash("evaluate"), inputs, ctx.force)
    if done is not None:
        log.info("evaluate of run %r is already committed at %s; nothing to do (report: %s/report.md)",
                 run, st.display(rel), st.display(rel))
        return

    dist = Dist.create()
    with st.staged_folder() as out:
        result = evaluate_run(st, run, cfg, out, dist)
        if dist.is_main:
            manifest = build_manifest(
                stage="evaluate", run_id=run, config=cfg, config_hash=cfg.stage_hash("evaluate"),
                inputs=inputs, timings_s={"evaluate": time.monotonic() - started},
                metrics=result["headline"],
            )
            st.commit_dir(out, rel, manifest)
            for key, value in sorted(result["headline"].items()):
                if "_accuracy_" in key:
                    log.info("%s = %.3f", key, value)
            log.info("report: %s/report.md", st.display(rel))
    if dist.count > 1:
        dist.state.wait_for_everyone()


if __name__ == "__main__":
    evaluate()
