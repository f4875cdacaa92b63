"""medreason compare: one table and one plot over several runs and named evaluations."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from jobs.common import exit_codes

log = logging.getLogger("medreason.compare")


@click.command(help="""Compare committed evaluations of one or more runs.

\b
EVALUATION is RUN (the default evaluation, runs/RUN/evaluate/) or RUN:NAME (a named one,
runs/RUN/evaluate/NAME/). Writes into --out: comparison.md and comparison.csv (accuracy with
95% Wilson intervals per eval set, parse failures, held-out loss, train tokens/s),
paired.csv (paired differences on shared questions with an exact McNemar test, base vs
fine-tuned inside an evaluation and across evaluations), accuracy.png, and lists the config
keys that differ between the evaluations.

\b
Exit codes: 0 done, 2 bad usage or a missing evaluation, 1 anything else.
""")
@click.argument("evaluations", nargs=-1, required=True, metavar="EVALUATION...")
@click.option("--store", metavar="URI", envvar="MEDREASON_STORE", default="./artifacts", show_default=True,
              help="Artifact store: a folder or s3://bucket/prefix [env MEDREASON_STORE].")
@click.option("--out", "out_dir", metavar="DIR", default="./comparison", show_default=True,
              type=click.Path(file_okay=False), help="Local folder for the comparison files.")
@click.option("-v", "--verbose", is_flag=True, default=False, help="Debug logging.")
@exit_codes
def compare(evaluations, store, out_dir, verbose) -> None:
    from medreason.compare import compare as run_compare
    from medreason.compare import write_comparison
    from medreason.store import ArtifactStore

    result = run_compare(ArtifactStore(store), list(evaluations))
    written = write_comparison(result, out_dir)
    click.echo(Path(out_dir, "comparison.md").read_text(encoding="utf-8"))
    log.info("wrote %s into %s", ", ".join(written), out_dir)


if __name__ == "__main__":
    compare()
