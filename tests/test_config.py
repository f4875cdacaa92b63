"""The config schema: presets, precedence of sources, --set parsing, validation and hashing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from medreason.config import (
    ENV_OVERRIDES,
    PHI_TARGETS,
    STAGE_SECTIONS,
    Config,
    available_presets,
    build_config,
    load_preset,
    parse_override,
)
from medreason.errors import InputError

REPO_ROOT = Path(__file__).resolve().parents[1]
NO_ENV: dict[str, str] = {}


def _yaml(path: Path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return str(path)


# -- presets -----------------------------------------------------------------------------------
def test_the_four_required_presets_ship():
    assert {"phi2-seed", "phi2-nf4", "phi2-bf16", "demo"} <= set(available_presets())


@pytest.mark.parametrize("name", available_presets())
def test_every_shipped_preset_loads_and_round_trips(name, tmp_path):
    raw = load_preset(name)
    assert set(raw) <= set(Config.model_fields), f"{name}: unknown sections {set(raw) - set(Config.model_fields)}"
    cfg = build_config(preset=name, env=NO_ENV)
    # every key the preset sets is applied (no silently dropped keys)
    dumped = cfg.model_dump(mode="json")
    for section, values in raw.items():
        for key, value in values.items():
            assert dumped[section][key] == value, f"{name}: {section}.{key}"
    again_file = tmp_path / f"{name}.yaml"
    again_file.write_text(yaml.safe_dump(json.loads(json.dumps(dumped))))
    again = build_config(config_file=str(again_file), env=NO_ENV)
    assert again == cfg and again.hash == cfg.hash


def test_phi2_seed_is_the_original_recipe():
    cfg = build_config(preset="phi2-seed", env=NO_ENV)
    assert cfg.model.name_or_path == "microsoft/phi-2"
    assert cfg.model.quantization == "int8"
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (32, 64, 0.05)
    assert cfg.lora.target_modules == PHI_TARGETS == ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]
    assert cfg.train.micro_batch_size == 2 and cfg.train.grad_accum_steps == 1
    assert cfg.train.learning_rate == 2.5e-5
    assert cfg.train.max_steps == 500
    assert cfg.train.eval_every_steps == 25
    # Off since the throughput benchmark: 2 rows of 400 tokens fit 16 GB without it, 2.2x faster.
    assert cfg.train.gradient_checkpointing is False
    assert cfg.train.padding == "max_length"
    assert cfg.data.limit == 200
    assert cfg.data.eval_fraction == 0.1
    assert cfg.data.max_len_tokens == 400
    assert cfg.data.template == "seed"


def test_other_presets_are_what_their_names_say():
    nf4 = build_config(preset="phi2-nf4", env=NO_ENV)
    assert nf4.model.quantization == "nf4" and nf4.model.dtype == "bfloat16"
    bf16 = build_config(preset="phi2-bf16", env=NO_ENV)
    assert bf16.model.quantization == "none" and bf16.model.dtype == "bfloat16"
    demo = build_config(preset="demo", env=NO_ENV)
    assert demo.model.name_or_path == "smollm2-135m-instruct"
    assert demo.model.dtype == "float32" and demo.model.quantization == "none"
    assert demo.data.source == "sample"


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(InputError, match=r"unknown preset 'nope'; available: .*phi2-seed"):
        build_config(preset="nope", env=NO_ENV)


def test_defaults_come_from_the_schema():
    cfg = build_config(env=NO_ENV)
    assert cfg == Config()
    assert cfg.model.trust_remote_code is False  # safe by default


# -- precedence ------------------------------------------------------------------------------------
def test_precedence_preset_file_set_env(tmp_path):
    file = _yaml(tmp_path / "c.yaml", {
        "train": {"max_steps": 111, "learning_rate": 1.0e-4},
        "data": {"source": "file-source.jsonl", "limit": 50},
        "model": {"name_or_path": "file/model"},
    })
    sets = ["train.learning_rate=3e-4", "data.source=set-source.jsonl", "model.name_or_path=set/model"]
    env = {"MEDREASON_MODEL": "env/model"}
    cfg = build_config("phi2-seed", file, sets, env=env)
    assert cfg.lora.r == 32  # preset only
    assert cfg.train.eval_every_steps == 25  # preset only
    assert cfg.data.limit == 50  # file beats preset (200)
    assert cfg.train.max_steps == 111  # file beats preset (500)
    assert cfg.train.learning_rate == 3e-4  # --set beats file
    assert cfg.data.source == "set-source.jsonl"  # --set beats file; no env for it
    assert cfg.model.name_or_path == "env/model"  # env beats --set
    assert cfg.model.quantization == "int8"  # a file that sets other model keys keeps the preset's


def test_env_overrides_are_documented_and_read_from_os_environ(monkeypatch):
    assert ENV_OVERRIDES == {"MEDREASON_MODEL": "model.name_or_path", "MEDREASON_DATA": "data.source"}
    monkeypatch.setenv("MEDREASON_DATA", "/data/x.jsonl")
    monkeypatch.setenv("MEDREASON_MODEL", "")  # empty means unset
    cfg = build_config(overrides=["data.source=ignored"])
    assert cfg.data.source == "/data/x.jsonl"
    assert cfg.model.name_or_path == "microsoft/phi-2"


def test_later_set_wins_and_sets_merge_into_sections():
    cfg = build_config(overrides=["train.max_steps=10", "train.max_steps=20", "train.seed=7"], env=NO_ENV)
    assert (cfg.train.max_steps, cfg.train.seed) == (20, 7)
    assert cfg.train.learning_rate == 2.5e-5


# -- --set parsing -----------------------------------------------------------------------------
@pytest.mark.parametrize(("item", "expected"), [
    ("train.max_steps=100", 100),
    ("train.learning_rate=2.5e-5", 2.5e-5),
    ("train.learning_rate=1e-4", 1e-4),  # PyYAML alone reads this as a string
    ("train.learning_rate=3E-4", 3e-4),
    ("data.eval_fraction=0.25", 0.25),
    ("train.gradient_checkpointing=true", True),
    ("train.gradient_checkpointing=False", False),
    ("train.compile=no", False),
    ("lora.target_modules=[q_proj, v_proj]", ["q_proj", "v_proj"]),
    ("lora.target_modules=auto", "auto"),
    ("data.limit=None", None),
    ("data.limit=null", None),
    ("data.limit=~", None),
    ("model.quantization=none", "none"),  # a valid string value, not null
    ("model.revision='1234567'", "1234567"),  # quoted: stays a string
    ("model.name_or_path=s3://bucket/models/phi=2", "s3://bucket/models/phi=2"),  # split on the first '='
    ("data.source=", ""),
])
def test_parse_override_values(item, expected):
    key, value = parse_override(item)
    assert key == item.split("=", 1)[0]
    assert value == expected and type(value) is type(expected)


def test_set_values_reach_the_typed_config():
    cfg = build_config(overrides=[
        "train.learning_rate=1e-4", "data.limit=None", "lora.target_modules=[fc1,fc2]",
        "train.gradient_checkpointing=yes", "train.max_grad_norm=null", "train.max_steps=1e3",
    ], env=NO_ENV)
    assert cfg.train.learning_rate == 1e-4
    assert cfg.data.limit is None
    assert cfg.lora.target_modules == ["fc1", "fc2"]
    assert cfg.train.gradient_checkpointing is True
    assert cfg.train.max_grad_norm is None
    assert cfg.train.max_steps == 1000 and isinstance(cfg.train.max_steps, int)


@pytest.mark.parametrize("bad", ["train.max_steps", "=5", "train..max_steps=1", ".x=1", "x.=1"])
def test_malformed_set_is_an_input_error(bad):
    with pytest.raises(InputError, match="--set"):
        build_config(overrides=[bad], env=NO_ENV)


# -- validation --------------------------------------------------------------------------------
def test_every_bad_field_is_reported_at_once_by_dotted_path(tmp_path):
    file = _yaml(tmp_path / "bad.yaml", {
        "train": {"max_stepz": 5, "learning_rate": "fast"},
        "lora": {"r": -1, "dropout": 2.0},
        "model": {"quantization": "int3"},
        "bogus": {"x": 1},
    })
    with pytest.raises(InputError) as info:
        build_config(config_file=file, overrides=["data.eval_fraction=1.5", "eval.unknown_knob=1"], env=NO_ENV)
    msg = str(info.value)
    assert "invalid config (8 problems)" in msg
    for path in ["train.max_stepz", "train.learning_rate", "lora.r", "lora.dropout", "model.quantization",
                 "bogus", "data.eval_fraction", "eval.unknown_knob"]:
        assert f"  {path}: " in msg, path
    assert "unknown key" in msg and "'fast'" in msg and "'int3'" in msg
    assert "Traceback" not in msg


def test_benchmark_entries_are_validated_by_index():
    with pytest.raises(InputError) as info:
        build_config(overrides=["eval.benchmarks=[{name: medqa, path: x.jsonl, format: nope}, {path: y}]"],
                     env=NO_ENV)
    msg = str(info.value)
    assert "eval.benchmarks.0.format" in msg and "eval.benchmarks.1.name" in msg


@pytest.mark.parametrize(("sets", "field"), [
    (["model.dtype=float16"], "model.dtype"),
    (["model.name_or_path=/models/PHI-2-local", "model.dtype=float16"], "model.dtype"),
    (["train.optimizer=paged_adamw_8bit"], "train.optimizer"),
    (["model.quantization=nf4", "model.dtype=float32"], "model.quantization"),
    (["train.padding=packed", "train.pack_len_tokens=512", "data.max_len_tokens=1024"], "train.pack_len_tokens"),
    (["eval.benchmarks=[{name: a, path: x}, {name: a, path: y}]"], "eval"),
])
def test_cross_field_checks(sets, field):
    with pytest.raises(InputError, match=rf"(?m)^  {field}: "):
        build_config(overrides=sets, env=NO_ENV)


def test_cross_field_checks_report_all_problems_each_on_its_line():
    with pytest.raises(InputError) as info:
        build_config(overrides=["model.dtype=float16", "train.optimizer=paged_adamw_8bit"], env=NO_ENV)
    msg = str(info.value)
    assert "(2 problems)" in msg
    assert "\n  model.dtype: float16" in msg and "\n  train.optimizer: paged_adamw_8bit" in msg
    assert "Value error" not in msg


def test_cross_field_checks_allow_the_sane_combinations():
    build_config(overrides=["model.name_or_path=smollm2-135m-instruct", "model.dtype=float16"], env=NO_ENV)
    build_config(overrides=["model.quantization=nf4", "train.optimizer=paged_adamw_8bit"], env=NO_ENV)
    build_config(overrides=["train.padding=packed", "train.pack_len_tokens=2048"], env=NO_ENV)


def test_config_file_errors(tmp_path):
    with pytest.raises(InputError, match="--config: file not found"):
        build_config(config_file=str(tmp_path / "missing.yaml"), env=NO_ENV)
    (tmp_path / "broken.yaml").write_text("train: [unclosed\n")
    with pytest.raises(InputError, match="not valid YAML"):
        build_config(config_file=str(tmp_path / "broken.yaml"), env=NO_ENV)
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(InputError, match="expected a mapping"):
        build_config(config_file=str(tmp_path / "list.yaml"), env=NO_ENV)
    (tmp_path / "empty.yaml").write_text("")
    assert build_config(config_file=str(tmp_path / "empty.yaml"), env=NO_ENV) == Config()


def test_assignment_is_validated_too():
    cfg = Config()
    with pytest.raises(ValueError):
        cfg.train.max_steps = 0
    with pytest.raises(ValueError):
        cfg.train.not_a_key = 1


# -- hashing -------------------------------------------------------------------------------------
_HASH_SNIPPET = (
    "import json; from medreason.config import build_config; "
    "c = build_config('phi2-seed', None, ['train.max_steps=7'], env={}); "
    "print(json.dumps({'all': c.hash, **{s: c.stage_hash(s) for s in %r}}))"
)


def test_hash_is_stable_across_processes():
    stages = list(STAGE_SECTIONS)
    outs = []
    for seed in ("1", "2"):  # different str-hash seeds: dict/set order must not leak into the hash
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=str(REPO_ROOT))
        proc = subprocess.run([sys.executable, "-c", _HASH_SNIPPET % stages], env=env,
                              capture_output=True, text=True, check=True)
        outs.append(json.loads(proc.stdout))
    local = build_config("phi2-seed", None, ["train.max_steps=7"], env=NO_ENV)
    assert outs[0] == outs[1] == {"all": local.hash, **{s: local.stage_hash(s) for s in stages}}


def test_hash_ignores_how_a_value_was_spelled(tmp_path):
    via_set = build_config(overrides=["train.learning_rate=1e-4", "lora.r=8"], env=NO_ENV)
    via_file = build_config(config_file=_yaml(tmp_path / "c.yaml", {"lora": {"r": 8},
                                                                   "train": {"learning_rate": 0.0001}}),
                            env=NO_ENV)
    assert via_set.hash == via_file.hash


def test_stage_hashes_follow_the_sections_each_stage_reads():
    base = build_config(env=NO_ENV)
    train_changed = build_config(overrides=["train.learning_rate=1e-3"], env=NO_ENV)
    assert train_changed.stage_hash("train") != base.stage_hash("train")
    assert train_changed.stage_hash("prepare") == base.stage_hash("prepare")
    assert train_changed.stage_hash("evaluate") != base.stage_hash("evaluate")

    eval_changed = build_config(overrides=["eval.max_new_tokens=64"], env=NO_ENV)
    assert eval_changed.stage_hash("train") == base.stage_hash("train")  # no re-train for eval knobs
    assert eval_changed.stage_hash("merge") == base.stage_hash("merge")
    assert eval_changed.stage_hash("evaluate") != base.stage_hash("evaluate")

    data_changed = build_config(overrides=["data.limit=10"], env=NO_ENV)
    for stage in STAGE_SECTIONS:
        assert data_changed.stage_hash(stage) != base.stage_hash(stage), stage

    merge_changed = build_config(overrides=["merge.dtype=float32"], env=NO_ENV)
    assert merge_changed.stage_hash("merge") != base.stage_hash("merge")
    assert merge_changed.stage_hash("evaluate") == base.stage_hash("evaluate")


def test_fields_added_later_hash_as_absent_at_their_old_behaviour() -> None:
    """A train stage committed before train.lora_compute_dtype existed ran PEFT's float32
    products: 'float32' must give its hash (so it resumes), the new default another one."""
    import hashlib
    import json

    from medreason.config import HASHED_AS_ABSENT_AT, build_config

    old = build_config(overrides=["train.lora_compute_dtype=float32"], env={})
    new = build_config(env={})
    data = {s: old.model_dump(mode="json")[s] for s in ("model", "data", "lora", "train")}
    for key in ("tracker_project", "tracker_run_name", "lora_compute_dtype", "attention_in_graph", "lora_fused"):
        data["train"].pop(key)
    data["train"]["report_to"] = []
    assert old.stage_hash("train") == hashlib.sha256(
        json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert new.stage_hash("train") != old.stage_hash("train")
    assert ("train", "lora_compute_dtype") in HASHED_AS_ABSENT_AT


def test_config_changes_name_what_the_hash_saw() -> None:
    """What differs between a recorded config and this one, key by key, for a stage's sections;
    fields hashed as absent at their earlier value and tracker settings are not changes."""
    from medreason.config import config_changes, describe_changes

    recorded = build_config(overrides=["train.compile=false", "eval.max_new_tokens=64"], env={})
    dump = recorded.model_dump(mode="json")
    del dump["train"]["lora_compute_dtype"]  # a run from before the field existed
    now = build_config(overrides=["train.compile=true", "train.lora_compute_dtype=float32",
                                  "train.tracker_project=x", "eval.max_new_tokens=128"], env={})
    assert config_changes(dump, now, "train") == ["train.compile: false -> true"]
    assert config_changes(dump, now, "evaluate") == ["train.compile: false -> true", "eval.max_new_tokens: 64 -> 128"]
    assert config_changes(None, now, "train") == []
    assert describe_changes([f"k{i}: 0 -> 1" for i in range(8)], most=2) == " (k0: 0 -> 1, k1: 0 -> 1, and 6 more)"
    assert describe_changes([]) == ""
