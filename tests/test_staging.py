"""Model staging: GGUF / local folder / store folder / hub sources into <store>/cache/models/."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest
from _fixtures_prepare import demo_store, file_mtimes  # noqa: F401  (fixture)

from medreason import staging
from medreason.config import ModelConfig
from medreason.errors import InputError
from medreason.store import MANIFEST, ArtifactStore, manifest_hash


@pytest.mark.slow
def test_gguf_is_staged_as_a_plain_offline_folder(demo_store, smollm2_gguf: Path):  # noqa: F811
    assert demo_store.returncode == 0, demo_store.stderr
    folder = demo_store.staged_model_dir()
    sha12 = hashlib.sha256(smollm2_gguf.read_bytes()).hexdigest()[:12]
    assert folder.name == f"smollm2-135m-instruct@{sha12}"
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "model.safetensors", MANIFEST} <= names
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["dtype"] == "float32" and manifest["source"]["kind"] == "gguf"
    assert manifest["metrics"]["n_params"] == pytest.approx(134.5e6, rel=0.01)
    assert set(manifest["files"]) == names - {MANIFEST}
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)  # HF_HUB_OFFLINE=1 (conftest)
    assert tok.is_fast and tok.eos_token == "<|im_end|>" and tok.chat_template
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert {type(m).__name__ for m in model.modules()}.isdisjoint({"GgufLinear"})
    # The converted tokenizer saved as tokenizer.json splits text like the GGUF's own.
    gguf_tok = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    text = "A 45-year-old man has chest pain.\nAnswer Choices:\nA. MI\nB. PE  — ¿ß? 123"
    assert tok(text)["input_ids"] == gguf_tok(text)["input_ids"]
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == \
        gguf_tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


def test_staging_again_reuses_the_commit(demo_store, tmp_path: Path, caplog):  # noqa: F811
    assert demo_store.returncode == 0, demo_store.stderr
    store = ArtifactStore(str(demo_store.store))
    cfg = ModelConfig(name_or_path="smollm2-135m-instruct", dtype="float32")
    before = file_mtimes(demo_store.store / "cache")
    with caplog.at_level(logging.INFO, logger="medreason.staging"):
        manifest = staging.stage_model(store, cfg)
    assert "already staged" in caplog.text
    assert file_mtimes(demo_store.store / "cache") == before
    assert manifest == store.read_manifest(staging.staged_model_rel(cfg))
    assert staging.local_model_dir(store, cfg) == str(demo_store.staged_model_dir())


def test_bf16_gguf_gets_its_own_cache_name(smollm2_gguf: Path):
    f32 = staging.staged_model_rel(ModelConfig(name_or_path="smollm2-135m-instruct", dtype="float32"))
    bf16 = staging.staged_model_rel(ModelConfig(name_or_path="smollm2-135m-instruct", dtype="bfloat16"))
    by_path = staging.staged_model_rel(ModelConfig(name_or_path=str(smollm2_gguf), dtype="float32"))
    assert bf16 == f32 + "-bf16"
    assert by_path.split("@")[1] == f32.split("@")[1]


def test_local_model_dir_needs_a_staged_model(tmp_path: Path):
    store = ArtifactStore(str(tmp_path / "store"))
    with pytest.raises(InputError, match=r"base model not staged: run `medreason prepare` first"):
        staging.local_model_dir(store, ModelConfig(name_or_path="microsoft/phi-2", revision="abc123"))


def test_hub_model_offline_and_not_staged_is_a_clear_error(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    store = ArtifactStore(str(tmp_path / "store"))
    cfg = ModelConfig(name_or_path="microsoft/phi-2", revision="ef382358ec9e382308935a992d908de099b64c23")
    assert staging.staged_model_rel(cfg) == "cache/models/microsoft--phi-2@ef382358ec9e382308935a992d908de099b64c23"
    with pytest.raises(InputError, match="cannot reach the hub and microsoft/phi-2 is not staged"):
        staging.stage_model(store, cfg)
    assert not store.exists("cache/models")


def test_local_folder_is_staged_once_and_again_when_it_changes(tiny_phi_dir: Path, tmp_path: Path, caplog):
    src = tmp_path / "model"
    shutil.copytree(tiny_phi_dir, src)
    (src / "pytorch_model_notes.txt").write_text("not copied")
    store = ArtifactStore(str(tmp_path / "store"))
    cfg = ModelConfig(name_or_path=str(src), dtype="float32")
    first = staging.stage_model(store, cfg)
    rel = staging.staged_model_rel(cfg)
    assert rel.endswith("@local")
    staged = Path(store.full(rel))
    assert {p.name for p in staged.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert not (staged / "pytorch_model_notes.txt").exists()
    assert first["dtype"] == "float32" and first["metrics"]["n_params"] > 0
    assert staging.stage_model(store, cfg) == first  # unchanged source: reused
    # A changed source folder (new weights) is staged again.
    config = json.loads((src / "generation_config.json").read_text())
    config["max_new_tokens"] = 12345
    (src / "generation_config.json").write_text(json.dumps(config, indent=4))
    with caplog.at_level(logging.WARNING, logger="medreason.staging"):
        second = staging.stage_model(store, cfg)
    assert "changed since it was staged" in caplog.text
    assert manifest_hash(second) != manifest_hash(first)
    assert json.loads((staged / "generation_config.json").read_text())["max_new_tokens"] == 12345


def test_store_folder_source(tiny_phi_dir: Path, tmp_path: Path):
    store = ArtifactStore(str(tmp_path / "store"))
    for p in tiny_phi_dir.iterdir():
        store.put_file(str(p), f"models/tiny/{p.name}")
    # A relative path is looked up in the store (it is not a local folder from the cwd).
    cfg = ModelConfig(name_or_path="models/tiny", dtype="float32")
    manifest = staging.stage_model(store, cfg)
    assert manifest["source"]["kind"] == "store"
    folder = staging.local_model_dir(store, cfg)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert AutoTokenizer.from_pretrained(folder).eos_token == "<|endoftext|>"
    assert AutoModelForCausalLM.from_pretrained(folder).config.num_hidden_layers == 2
    # The staged cache folder itself can be named as the model.
    as_staged = ModelConfig(name_or_path=staging.staged_model_rel(cfg, store), dtype="float32")
    assert staging.stage_model(store, as_staged) == manifest


def test_unknown_model_name_is_an_input_error(tmp_path: Path):
    with pytest.raises(InputError, match="GGUF file not found"):
        staging.staged_model_rel(ModelConfig(name_or_path=str(tmp_path / "x.gguf")))
    with pytest.raises(InputError, match="not a hub id"):
        staging.staged_model_rel(ModelConfig(name_or_path="a/b/c/d"))
