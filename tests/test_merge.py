"""The merge job: parity on a tiny random Phi and on SmolLM2, corrupted adapters, bad input."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import pytest
from _fixtures_eval import LLAMA_TARGETS, build_run, set_args
from _fixtures_prepare import copy_model_cache

from medreason.merging import ParityError, check_parity, compare_logits


def _merge_manifest(store_dir: Path, run: str = "r1") -> dict:
    return json.loads((store_dir / "runs" / run / "merge" / "MANIFEST.json").read_text())


def test_merge_tiny_phi_parity_load_generate_and_rerun(tmp_path: Path, tiny_phi_dir: Path, cli_inproc) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    store_dir = tmp_path / "store"
    _, _, overrides = build_run(store_dir, tiny_phi_dir)
    args = ["merge", "--store", str(store_dir), "--run", "r1", *set_args(overrides)]
    code, _, err = cli_inproc(*args)
    assert code == 0, err
    manifest = _merge_manifest(store_dir)
    m = manifest["metrics"]
    # float32 merge: W + (alpha/r) B A vs W x + (alpha/r) B (A x) differ only by rounding.
    assert m["parity_max_abs_diff"] < 1e-4 and m["parity_top1_agreement"] == 1.0
    assert m["parity_positions"] > 0
    assert "adapter.zip" in manifest["files"] and "model/README.md" in manifest["files"]
    assert any(f.startswith("model/") and f.endswith(".safetensors") for f in manifest["files"])

    model_dir = store_dir / "runs" / "r1" / "merge" / "model"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert not any("lora" in n for n, _ in model.named_parameters())
    ids = tok("Question: chest pain", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]
    # The merged weights differ from the base: the adapter was really applied.
    base = AutoModelForCausalLM.from_pretrained(tiny_phi_dir)
    with torch.no_grad():
        diff = (model(**ids).logits - base(**ids).logits).abs().max()
    assert diff > 1e-3
    card = (model_dir / "README.md").read_text()
    assert str(tiny_phi_dir) in card and "r=4" in card and "top-1 agreement" in card
    with zipfile.ZipFile(store_dir / "runs" / "r1" / "merge" / "adapter.zip") as zf:
        assert {"adapter_model.safetensors", "adapter_config.json"} <= set(zf.namelist())

    code, _, err = cli_inproc(*args)
    assert code == 0 and "already committed" in err
    assert _merge_manifest(store_dir)["committed_at"] == manifest["committed_at"]


def test_corrupted_adapter_is_caught(tmp_path: Path, tiny_phi_dir: Path, cli_inproc) -> None:
    store_dir = tmp_path / "store"
    _, _, overrides = build_run(store_dir, tiny_phi_dir)
    path = store_dir / "runs" / "r1" / "train" / "adapter" / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # same size, one flipped byte in the weights
    path.write_bytes(bytes(data))
    code, _, err = cli_inproc("merge", "--store", str(store_dir), "--run", "r1", *set_args(overrides))
    assert code == 2
    assert "adapter_model.safetensors" in err and "sha256" in err
    assert not (store_dir / "runs" / "r1" / "merge" / "MANIFEST.json").exists()


def test_no_committed_adapter(tmp_path: Path, tiny_phi_dir: Path, cli_inproc) -> None:
    store_dir = tmp_path / "store"
    _, _, overrides = build_run(store_dir, tiny_phi_dir, train=False)
    code, _, err = cli_inproc("merge", "--store", str(store_dir), "--run", "r1", *set_args(overrides))
    assert code == 2
    assert "no committed train stage" in err and "medreason train" in err


def test_dequantize_needs_cuda(tmp_path: Path, tiny_phi_dir: Path, cli_inproc) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this checks the CPU refusal")
    store_dir = tmp_path / "store"
    # A QLoRA run (the model settings merge reads from the train manifest).
    _, _, overrides = build_run(store_dir, tiny_phi_dir,
                                extra=["model.dtype=bfloat16", "model.quantization=nf4"])
    overrides += ["merge.dequantize=true"]
    code, _, err = cli_inproc("merge", "--store", str(store_dir), "--run", "r1", *set_args(overrides))
    assert code == 2 and "needs a CUDA GPU" in err


def test_parity_failure_message() -> None:
    import torch

    ref = [torch.zeros(3, 5)]
    cand = [torch.zeros(3, 5)]
    cand[0][1, 2] = 1.0  # changes the argmax of position 1
    result = compare_logits(ref, cand)
    assert result == {"max_abs_diff": 1.0, "top1_agreement": 2 / 3, "positions": 3, "prompts": 1}
    with pytest.raises(ParityError, match=r"max \|logit diff\| 1 .*top-1 agreement 0.6667"):
        check_parity(result, 0.05, 0.99)
    check_parity(result, 2.0, 0.5)


def test_parity_failure_exits_1(tmp_path: Path, tiny_phi_dir: Path, cli_inproc) -> None:
    store_dir = tmp_path / "store"
    _, _, overrides = build_run(store_dir, tiny_phi_dir)
    # Below float32 rounding of the merge (~1e-7 on logits of this size): must fail.
    overrides.append("merge.parity_max_abs_diff=1e-30")
    code, _, err = cli_inproc("merge", "--store", str(store_dir), "--run", "r1", *set_args(overrides))
    assert code == 1 and "merge parity check failed" in err
    assert not (store_dir / "runs" / "r1" / "merge" / "MANIFEST.json").exists()


@pytest.mark.slow
def test_merge_smollm2_parity(tmp_path: Path, demo_store, cli_inproc) -> None:
    from transformers import AutoModelForCausalLM

    store_dir = tmp_path / "store"
    copy_model_cache(demo_store, store_dir)  # the session's staged SmolLM2
    _, _, overrides = build_run(store_dir, "smollm2-135m-instruct", n=3, targets=LLAMA_TARGETS)
    code, _, err = cli_inproc("merge", "--store", str(store_dir), "--run", "r1", *set_args(overrides))
    assert code == 0, err
    m = _merge_manifest(store_dir)["metrics"]
    assert m["parity_max_abs_diff"] < 1e-3 and m["parity_top1_agreement"] == 1.0
    model_dir = store_dir / "runs" / "r1" / "merge" / "model"
    assert os.path.exists(model_dir / "tokenizer.json") and os.path.exists(model_dir / "generation_config.json")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.config.model_type == "llama"


def test_subfolder_from_s3_is_verified_and_renamed_into_place(s3_bucket, tmp_path: Path, monkeypatch) -> None:
    """A folder the parent's commit lists (merge/model, train/adapter) comes down from S3 into
    the local cache under a temp name, checked against the parent's sha256, then renamed; a
    corrupted object leaves nothing in the cache."""
    from medreason.errors import InputError
    from medreason.store import ArtifactStore, build_manifest

    cache = tmp_path / "cache"
    monkeypatch.setenv("MEDREASON_LOCAL_CACHE", str(cache))
    store = ArtifactStore(s3_bucket)
    out = tmp_path / "out"
    (out / "model" / "sub").mkdir(parents=True)
    (out / "model" / "config.json").write_text('{"a": 1}')
    (out / "model" / "sub" / "w.bin").write_bytes(b"\x00\x01" * 100)
    (out / "adapter.zip").write_bytes(b"zip")
    rel = store.stage_rel("r1", "merge")
    manifest = store.commit_dir(str(out), rel, build_manifest(stage="merge", run_id="r1", config={},
                                                              config_hash="h"))
    folder = Path(store.materialize_subfolder(rel, manifest, "model"))
    assert folder.is_relative_to(cache)
    assert (folder / "config.json").read_text() == '{"a": 1}' and (folder / "sub" / "w.bin").stat().st_size == 200
    assert (folder / ".verified").exists() and not (folder / "adapter.zip").exists()
    assert not [p for p in folder.parent.iterdir() if ".tmp-" in p.name]

    store.write_bytes(f"{rel}/model/config.json", b'{"a": 2}')
    other = dict(manifest, committed_at="later")  # another cache key: a fresh download
    with pytest.raises(InputError, match=r"config\.json does not match its sha256"):
        store.materialize_subfolder(rel, other, "model")
    assert sorted(p.name for p in (cache / "store").iterdir()) == [folder.name]
