"""medreason config show: the resolved config, each key with its default and description."""

from __future__ import annotations

import json
from typing import Any

import click

from jobs.common import exit_codes


def _scalar(value: Any) -> str:
    """A value as YAML would read it back (JSON is YAML for scalars, lists and mappings)."""
    return json.dumps(value, ensure_ascii=False)


def render_yaml(rows: list[dict[str, Any]]) -> str:
    """Sections as YAML (it reads back with yaml.safe_load), each key commented with its default
    and description."""
    lines: list[str] = []
    section = None
    for row in rows:
        head, _, name = row["key"].partition(".")
        if head != section:
            section = head
            lines.append(f"{head}:" if lines == [] else f"\n{head}:")
        note = f"default {_scalar(row['default'])}"
        if row["description"]:
            note += f"; {row['description']}"
        entry = f"  {name}: {_scalar(row['value'])}"
        lines.append(f"{entry:<44} # {note}")
    return "\n".join(lines) + "\n"


def render_table(rows: list[dict[str, Any]]) -> str:
    out = ["| key | value | default | type | description |", "|---|---|---|---|---|"]
    for row in rows:
        cells = [row["key"], _scalar(row["value"]), _scalar(row["default"]), row["type"], row["description"]]
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(out) + "\n"


@click.group(name="config", help="Inspect the config schema and resolved configs.")
def config() -> None:
    pass


@config.command(name="show", help="""Print the resolved config with each key's description and default.

\b
Sources, lowest precedence first: the schema's defaults, --preset, --config FILE, --set
dotted.key=value (repeatable), then MEDREASON_MODEL / MEDREASON_DATA. A key that differs from
its default shows the default in its comment. A mistyped key exits 2 with a suggestion.
""")
@click.option("--preset", metavar="NAME", default=None, help="Shipped recipe (see `medreason train --help`).")
@click.option("--config", "config_file", metavar="FILE", default=None, type=click.Path(dir_okay=False),
              help="YAML file with sections model/data/lora/train/eval/merge.")
@click.option("--set", "overrides", metavar="KEY=VALUE", multiple=True, help="Override one config key.")
@click.option("--format", "fmt", type=click.Choice(["yaml", "table"]), default="yaml", show_default=True,
              help="yaml: commented YAML; table: a markdown table.")
@click.option("-v", "--verbose", is_flag=True, default=False, help="Debug logging.")
@exit_codes
def show(preset, config_file, overrides, fmt, verbose) -> None:
    from medreason.config import build_config, describe_config

    rows = describe_config(build_config(preset, config_file, overrides))
    click.echo(render_yaml(rows) if fmt == "yaml" else render_table(rows), nl=False)
