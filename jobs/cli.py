"""The ``medreason`` command: the jobs under one Click group.

Heavy imports (torch, transformers) happen inside the commands, so ``--help`` is instant.
"""

from __future__ import annotations

import importlib

import click

from jobs.common import COMMON_HELP

# name -> (module, attribute, one-line help). Modules load only when their command runs.
_COMMANDS = {
    "prepare": ("jobs.prepare", "prepare", "Fetch, validate, format, tokenize, split and decontaminate the data."),
    "train": ("jobs.train", "train", "Train a LoRA/QLoRA adapter; checkpoints, resume, preemption."),
    "evaluate": ("jobs.evaluate", "evaluate", "Generate answers and score accuracy; write a report."),
    "merge": ("jobs.merge", "merge", "Fold the adapter into the base, check parity, export."),
    "generate": ("jobs.generate", "generate", "Answer questions with a run's model."),
    "wait": ("jobs.wait", "wait", "Wait until a stage of a run is committed (exit 2: timeout or failed for good)."),
    "pipeline": ("jobs.pipeline", "pipeline", "prepare -> train -> evaluate -> merge, skipping committed stages."),
}

# Commands that read the store or the schema but are not stages of a run (no --run/--force).
_TOOLS = {
    "compare": ("jobs.compare", "compare", "Compare runs and evaluations: accuracy, intervals, McNemar, configs."),
    "config": ("jobs.config_cmd", "config", "Show the resolved config with each key's default and description."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return [*_COMMANDS, *_TOOLS]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        entry = _COMMANDS.get(name) or _TOOLS.get(name)
        if entry is None:
            return None
        module_name, attr, short = entry
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise

            @click.command(name=name, help=f"{short} (not available in this version)",
                           context_settings={"ignore_unknown_options": True})
            @click.argument("args", nargs=-1, type=click.UNPROCESSED)
            def missing(args: tuple[str, ...]) -> None:
                raise click.UsageError(f"`medreason {name}` is not implemented in this version yet")

            return missing
        command = getattr(module, attr)
        command.short_help = short
        return command


@click.group(cls=LazyGroup, help=f"""Fine-tune an LLM on MedReason clinical reasoning with LoRA/QLoRA.

\b
  prepare -> train -> evaluate
                 \\-> merge

Jobs share an artifact store (a folder or s3://bucket/prefix) and a run id.
{COMMON_HELP}""")
@click.version_option(package_name="medreason")
def main() -> None:
    pass


if __name__ == "__main__":
    main()
