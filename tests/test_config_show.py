"""`medreason config show` and the did-you-mean suggestion for mistyped config keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from medreason.config import build_config, describe_config, suggest_key
from medreason.errors import InputError


def test_show_prints_resolved_values_that_read_back_as_yaml(cli_inproc) -> None:
    code, out, err = cli_inproc("config", "show", "--preset", "demo", "--set", "train.learning_rate=3e-4")
    assert code == 0, err
    expected = build_config("demo", None, ["train.learning_rate=3e-4"]).model_dump(mode="json")
    assert yaml.safe_load(out) == expected
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("learning_rate:"))
    assert "default 2.5e-05" in line
    # Each key carries the schema's description in its comment.
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("r:"))
    assert "LoRA rank." in line and "default 32" in line


def test_show_table_has_every_schema_key(cli_inproc) -> None:
    code, out, err = cli_inproc("config", "show", "--format", "table")
    assert code == 0, err
    keys = {row.split("|")[1].strip() for row in out.splitlines()[2:]}
    assert keys == {r["key"] for r in describe_config(build_config())}
    assert {"train.learning_rate", "eval.benchmarks", "merge.parity_min_top1"} <= keys


def test_describe_config_defaults_come_from_the_schema() -> None:
    rows = {r["key"]: r for r in describe_config(build_config(overrides=["lora.r=4"]))}
    assert rows["lora.r"]["value"] == 4 and rows["lora.r"]["default"] == 32
    assert rows["train.learning_rate"]["default"] == 2.5e-5
    assert rows["model.quantization"]["description"].startswith("bitsandbytes")


def test_mistyped_set_key_suggests_the_right_one_and_exits_2(cli_inproc) -> None:
    code, _, err = cli_inproc("config", "show", "--set", "train.lerning_rate=1e-4")
    assert code == 2
    assert "train.lerning_rate: unknown key; did you mean 'train.learning_rate'?" in err


def test_mistyped_key_in_yaml_file_suggests_too(cli_inproc, tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lora:\n  alpah: 16\nmodel:\n  quantisation: nf4\n")
    code, _, err = cli_inproc("config", "show", "--config", str(cfg))
    assert code == 2
    assert "did you mean 'lora.alpha'?" in err and "did you mean 'model.quantization'?" in err
    # The same path through a job command.
    code, _, err = cli_inproc("train", "--config", str(cfg), "--run", "x", "--store", str(tmp_path / "s"))
    assert code == 2 and "did you mean 'lora.alpha'?" in err


@pytest.mark.parametrize(("loc", "expected"), [
    (("train", "lerning_rate"), "train.learning_rate"),
    (("trian",), "train"),
    (("eval", "benchmarks", 0, "fromat"), "eval.benchmarks.0.format"),
    (("train", "zzzzzzzz"), None),
])
def test_suggest_key(loc: tuple, expected: str | None) -> None:
    assert suggest_key(loc) == expected


def test_no_suggestion_keeps_the_generic_hint() -> None:
    with pytest.raises(InputError, match=r"train\.qqqqq: unknown key \(check the spelling"):
        build_config(overrides=["train.qqqqq=1"])
