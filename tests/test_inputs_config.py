"""Merge and evaluate describe the adapter they read: model, data, lora and train come from the
committed train stage's manifest, and a --set/--preset/--config that contradicts them exits 2
naming both values instead of committing a manifest that misdescribes the adapter."""

from __future__ import annotations

from pathlib import Path

from _fixtures_eval import build_run, set_args

from medreason.store import ArtifactStore, manifest_hash


def _without_lora(overrides: list[str]) -> list[str]:
    return [o for o in overrides if not o.startswith("lora.")]


def test_merge_refuses_settings_that_contradict_the_adapter(tmp_path: Path, tiny_phi_dir: Path, cli_inproc) -> None:
    store_dir = tmp_path / "store"
    _, _, overrides = build_run(store_dir, tiny_phi_dir)  # lora.r=4
    code, _, err = cli_inproc("merge", "--store", str(store_dir), "--run", "r1", *set_args(overrides),
                              "--set", "lora.r=64", "--set", "train.max_steps=999")
    assert code == 2, err
    assert "lora.r=64 (the adapter was trained with lora.r=4)" in err
    assert "train.max_steps=999 (the adapter was trained with train.max_steps=" in err
    assert "Traceback" not in err
    assert not ArtifactStore(str(store_dir)).is_committed("runs/r1/merge")


def test_merge_takes_the_adapter_settings_from_the_train_manifest(tmp_path: Path, tiny_phi_dir: Path,
                                                                  cli_inproc) -> None:
    store_dir = tmp_path / "store"
    store, cfg, overrides = build_run(store_dir, tiny_phi_dir)
    # No lora settings given: the defaults (r=16, other targets) are not what was trained.
    code, _, err = cli_inproc("merge", "--store", str(store_dir), "--run", "r1", *set_args(_without_lora(overrides)))
    assert code == 0, err
    train = store.read_manifest("runs/r1/train")
    merged = store.verify("runs/r1/merge")
    for section in ("model", "data", "lora", "train"):
        assert merged["config"][section] == train["config"][section]
    assert merged["config"]["lora"]["r"] == cfg.lora.r == 4
    assert merged["inputs"]["train"] == manifest_hash(train)
    assert merged["inputs"]["prepare"] == manifest_hash(store.read_manifest("runs/r1/prepare"))
    assert "r=4" in (store_dir / "runs/r1/merge/model/README.md").read_text()


def test_evaluate_refuses_settings_that_contradict_the_adapter(tmp_path: Path, tiny_phi_dir: Path,
                                                               cli_inproc) -> None:
    store_dir = tmp_path / "store"
    _, _, overrides = build_run(store_dir, tiny_phi_dir)
    code, _, err = cli_inproc("evaluate", "--store", str(store_dir), "--run", "r1", *set_args(overrides),
                              "--set", "lora.alpha=99")
    assert code == 2, err
    assert "evaluate of run r1: the config contradicts the committed train stage" in err
    assert "lora.alpha=99 (the adapter was trained with lora.alpha=8)" in err
    assert not ArtifactStore(str(store_dir)).exists("runs/r1/evaluate/MANIFEST.json")
