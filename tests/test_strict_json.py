"""Strict JSON everywhere the store writes, and finite numbers in the config."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from pydantic import BaseModel

from medreason import jsonio
from medreason.config import Config, build_config
from medreason.errors import InputError
from medreason.store import MANIFEST, ArtifactStore, build_manifest, manifest_hash

NON_FINITE = {"nan": math.nan, "inf": math.inf, "minus_inf": -math.inf}


def _strict(data: bytes | str) -> object:
    """json.loads that refuses NaN/Infinity the way parsers outside Python do."""

    def refuse(name: str) -> None:
        raise AssertionError(f"non-strict JSON constant {name} in the output")

    return json.loads(data, parse_constant=refuse)


def test_dumps_writes_non_finite_numbers_as_null():
    obj = {"loss": math.nan, "curve": [1.5, math.inf, -math.inf], "np": np.float32("nan"),
           "np_ok": np.float32(0.25), "pair": (1, math.nan)}
    assert _strict(jsonio.dumps(obj)) == {"loss": None, "curve": [1.5, None, None], "np": None,
                                          "np_ok": 0.25, "pair": [1, None]}
    with pytest.raises(ValueError, match="NaN"):
        jsonio.loads_strict('{"loss": NaN}')
    assert jsonio.loads_strict(jsonio.dumps_line({"a": math.inf})) == {"a": None}


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    if request.param == "s3":
        return ArtifactStore(request.getfixturevalue("s3_bucket"))
    return ArtifactStore(str(tmp_path / "store"))


def test_a_manifest_with_nan_and_inf_metrics_is_strict_json(store, tmp_path):
    config = build_config(preset="demo")
    manifest = build_manifest(
        stage="evaluate", run_id="r1", config=config, config_hash=config.stage_hash("evaluate"),
        timings_s={"generate": math.nan}, metrics={"accuracy": math.nan, "loss": math.inf, **NON_FINITE},
    )
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.txt").write_text("x")
    rel = store.stage_rel("r1", "evaluate")
    committed = store.commit_dir(str(out), rel, manifest)
    on_disk = _strict(store.read_bytes(f"{rel}/{MANIFEST}"))
    assert on_disk["metrics"] == {"accuracy": None, "loss": None, "nan": None, "inf": None, "minus_inf": None}
    assert on_disk["timings_s"] == {"generate": None}
    # The hash a next stage records for this input is the same from memory and from the file.
    assert manifest_hash(committed) == manifest_hash(on_disk) == manifest_hash(store.read_manifest(rel))
    store.write_json("runs/r1/evaluate/extra.json", {"x": [math.nan, 1.0]})
    assert _strict(store.read_bytes("runs/r1/evaluate/extra.json")) == {"x": [None, 1.0]}


def test_manifest_hash_is_unchanged_for_finite_manifests():
    """Existing commits keep their hashes: strictness changes nothing when all numbers are finite."""
    manifest = {"b": [1, 2.5, "x"], "a": {"z": None, "y": True}}
    legacy = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    import hashlib

    assert manifest_hash(manifest) == hashlib.sha256(legacy).hexdigest()


def _float_fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted paths of every float field of the schema (sections recursed into)."""
    found = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            found += _float_fields(annotation, f"{prefix}{name}.")
        elif annotation is float or float in getattr(annotation, "__args__", ()):
            found.append(f"{prefix}{name}")
    return found


@pytest.mark.parametrize("field", _float_fields(Config))
@pytest.mark.parametrize("value", ["inf", "-inf", "nan", ".inf", "1e999"])
def test_every_float_field_refuses_non_finite_values(field, value):
    with pytest.raises(InputError, match=f"{field.replace('.', '[.]')}: Input should be a finite number"):
        build_config(overrides=[f"{field}={value}"])


def test_the_schema_has_the_float_fields_the_test_walks():
    assert {"train.learning_rate", "train.num_epochs", "data.eval_fraction", "merge.parity_max_abs_diff",
            "lora.dropout", "train.max_grad_norm"} <= set(_float_fields(Config))


def test_cli_refuses_an_infinite_learning_rate_with_exit_2(cli, tmp_path):
    rc, _out, err = cli("train", "--preset", "demo", "--store", str(tmp_path / "store"), "--run", "r1",
                        "--set", "train.learning_rate=inf")
    assert rc == 2, err
    assert "train.learning_rate" in err and "finite" in err
    assert "Traceback" not in err
