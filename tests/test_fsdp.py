"""FSDP2 training on CPU: two gloo processes through `accelerate launch` and cpu_fsdp.yaml.

The base is bf16 and the LoRA weights float32 (MEDREASON_CPU_KEEP_DTYPE=1 keeps model.dtype on
CPU), the mix a bf16 GPU run has and FSDP1's flat parameters cannot hold. Each launch costs
~15 s of process start-up on 2 cores, so the runs are shared by the tests of this module.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from _fixtures_train import REPO_ROOT, commit_prepare, subprocess_env, train_config, wait_for

from medreason.store import ArtifactStore
from medreason.testhooks import STEP_DELAY_ENV
from medreason.train_setup import CPU_KEEP_DTYPE_ENV
from medreason.training import committed_checkpoints

CPU_FSDP = REPO_ROOT / "accelerate_configs" / "cpu_fsdp.yaml"
STEPS = 8
# The tiny Phi has 2 layers; LoRA "auto" wraps these six linears in each.
TARGETS = ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2")

pytestmark = pytest.mark.slow


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch_cmd(config_file: Path, store_uri: str, run: str, cfg: Path) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
            "--main_process_port", str(_free_port()),
            "-m", "jobs.train", "--store", store_uri, "--run", run, "--config", str(cfg)]


def _env(**extra: str) -> dict[str, str]:
    return subprocess_env({CPU_KEEP_DTYPE_ENV: "1", **extra})


def _launch(config_file: Path, store_uri: str, run: str, cfg: Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(_launch_cmd(config_file, store_uri, run, cfg), env=_env(), cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def _bf16_config(path: Path, **train: object) -> Path:
    return train_config(path, model__dtype="bfloat16", max_steps=STEPS, micro_batch_size=2,
                        save_every_steps=3, eval_every_steps=4, **train)


def _metrics(store: ArtifactStore, run: str) -> list[dict]:
    text = store.read_text(f"runs/{run}/train/metrics.jsonl")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _adapter(store: ArtifactStore, run: str) -> dict:
    from safetensors.torch import load_file

    local = store.materialize(f"runs/{run}/train")
    return load_file(os.path.join(local, "adapter", "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def dropout_phi_dir(tmp_path_factory: pytest.TempPathFactory, tiny_phi_dir: Path) -> Path:
    """The tiny Phi with Phi-2's residual dropout (resid_pdrop 0.1): the job swaps its decoder
    layers for the one-kernel residual sum before FSDP wraps them."""
    folder = tmp_path_factory.mktemp("dropout_phi") / "model"
    shutil.copytree(tiny_phi_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "resid_pdrop": 0.1}))
    return folder


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory, dropout_phi_dir: Path) -> tuple[Path, str, str]:
    """One uninterrupted 2-process FSDP run: (folder, store URI, stderr)."""
    root = tmp_path_factory.mktemp("fsdp")
    store_uri = str(root / "store")
    cfg = _bf16_config(root / "cfg.yaml")
    commit_prepare(store_uri, "straight", cfg, dropout_phi_dir, n_train=32, n_eval=4)
    proc = _launch(CPU_FSDP, store_uri, "straight", cfg, root)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root, store_uri, proc.stderr


def test_bf16_base_float32_adapters_train_and_commit(straight: tuple[Path, str, str]) -> None:
    _root, store_uri, err = straight
    store = ArtifactStore(store_uri)
    assert "PhiForCausalLM (bfloat16" in err  # the base really is bf16 ...
    assert "2 processes per step" in err
    # The decoder layers were swapped (the log is rank 0's) and accelerate still found them to shard.
    assert "residual dropout: 2 decoder layer(s)" in err
    assert "LoRA products bfloat16 (the activations' dtype" in err  # train.lora_compute_dtype=base under FSDP2
    manifest = store.read_manifest("runs/straight/train")
    assert manifest["metrics"]["steps"] == STEPS and manifest["world_size"] == 2
    rows = _metrics(store, "straight")
    assert [r["step"] for r in rows] == list(range(STEPS + 1))
    assert rows[-1]["loss"] < rows[1]["loss"]  # it learns
    adapter = _adapter(store, "straight")
    expected = {f"base_model.model.model.layers.{i}.{'mlp' if t.startswith('fc') else 'self_attn'}.{t}.lora_{ab}.weight"
                for i in range(2) for t in TARGETS for ab in "AB"}
    assert set(adapter) == expected
    assert {str(t.dtype) for t in adapter.values()} == {"torch.float32"}  # ... and the adapters float32
    # Full tensors gathered from the shards, not one rank's half: r=8, hidden 64.
    a = adapter["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = adapter["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert tuple(a.shape) == (8, 64) and tuple(b.shape) == (64, 8)
    assert float(b.abs().sum()) > 0  # B starts at zero: it was trained
    ckpt = store.materialize("runs/straight/train/checkpoints/step-6")
    assert os.path.getsize(os.path.join(ckpt, "optimizer.pt")) > 0


def test_sigterm_checkpoint_then_resume_matches_uninterrupted(straight: tuple[Path, str, str],
                                                              dropout_phi_dir: Path) -> None:
    root, store_uri, _err = straight
    store = ArtifactStore(store_uri)
    cfg = _bf16_config(root / "cfg-killed.yaml")
    commit_prepare(store_uri, "killed", cfg, dropout_phi_dir, n_train=32, n_eval=4)
    log_path = root / "killed.log"
    with open(log_path, "wb") as fh:
        proc = subprocess.Popen(_launch_cmd(CPU_FSDP, store_uri, "killed", cfg),
                                env=_env(**{STEP_DELAY_ENV: "0.5"}), cwd=root, stdout=fh, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: store.is_committed("runs/killed/train/checkpoints/step-3"), 180, proc, "step-3", log_path)
        # The workers get the signal, as from a scheduler that signals every task or from
        # slurm/common.sh's forwarding trap (torchrun itself turns a signal into exit 1).
        workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) == 2
        for pid in workers:
            os.kill(int(pid), signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log_path.read_text(errors="replace")
    assert text.count("exiting 75 so the scheduler requeues the job") == 2, text[-4000:]  # both ranks
    assert "(exitcode: 75)" in text  # torchrun's report of the workers' status
    committed = committed_checkpoints(store, "runs/killed/train/checkpoints")
    newest = committed[-1]
    step = int(newest.split("-")[1])
    assert 3 <= step < STEPS and f"preempted at step {step}" in text
    assert not store.exists("runs/killed/train/MANIFEST.json")

    proc2 = _launch(CPU_FSDP, store_uri, "killed", cfg, root)
    assert proc2.returncode == 0, proc2.stderr[-4000:]
    assert f"resuming from {store.display(f'runs/killed/train/checkpoints/{newest}')}" in proc2.stderr
    straight_rows, resumed_rows = _metrics(store, "straight"), _metrics(store, "killed")
    assert [r["step"] for r in resumed_rows] == list(range(STEPS + 1))
    # Same rows in the same order, the RNG of each rank, the gathered optimizer state loaded
    # back into the shards: the resumed run repeats the uninterrupted one bit for bit.
    for a, b in zip(straight_rows, resumed_rows, strict=True):
        assert (a["step"], a["loss"], a["eval_loss"], a["lr"], a["grad_norm"]) == \
               (b["step"], b["loss"], b["eval_loss"], b["lr"], b["grad_norm"])
    one, two = _adapter(store, "straight"), _adapter(store, "killed")
    assert set(one) == set(two)
    for key in one:
        assert bool((one[key] == two[key]).all()), key


def test_qlora_and_fsdp1_are_refused_with_exit_2(tmp_path: Path, tiny_phi_dir: Path) -> None:
    store_uri = str(tmp_path / "store")
    cfg = train_config(tmp_path / "q.yaml", model__quantization="nf4", model__dtype="bfloat16", max_steps=2)
    commit_prepare(store_uri, "q", cfg, tiny_phi_dir, n_train=8, n_eval=2)
    proc = _launch(CPU_FSDP, store_uri, "q", cfg, tmp_path)
    assert proc.returncode != 0
    assert proc.stderr.count("(QLoRA) is not supported with FSDP") == 2, proc.stderr[-4000:]  # both ranks
    assert "accelerate_configs/multi_gpu.yaml" in proc.stderr
    assert "(exitcode: 2)" in proc.stderr
    assert "Loading weights" not in proc.stderr  # refused before the model loads
    # The FSDP1 form of the same settings: refused before loading, pointing at version 2.
    v1 = yaml.safe_load(CPU_FSDP.read_text())
    v1["fsdp_config"] = {"fsdp_version": 1, "fsdp_sharding_strategy": "FULL_SHARD",
                         "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                         "fsdp_state_dict_type": "FULL_STATE_DICT", "fsdp_use_orig_params": True,
                         # FSDP1 syncs module states from a GPU; there is none here.
                         "fsdp_sync_module_states": False, "fsdp_cpu_ram_efficient_loading": False}
    v1_path = tmp_path / "fsdp1.yaml"
    v1_path.write_text(yaml.safe_dump(v1))
    cfg1 = train_config(tmp_path / "one.yaml", model__dtype="bfloat16", max_steps=2)
    commit_prepare(store_uri, "one", cfg1, tiny_phi_dir, n_train=8, n_eval=2)
    proc = _launch(v1_path, store_uri, "one", cfg1, tmp_path)
    assert proc.returncode != 0
    assert proc.stderr.count("FSDP needs fsdp_version: 2") == 2, proc.stderr[-4000:]
    assert "(exitcode: 2)" in proc.stderr and "Loading weights" not in proc.stderr


FLATTEN_PROBE = r'''
import os, sys, functools
import torch, torch.distributed as dist
from transformers import AutoModelForCausalLM
from transformers.models.phi.modeling_phi import PhiDecoderLayer
from peft import LoraConfig, get_peft_model

dist.init_process_group("gloo", rank=0, world_size=1)

def lora_model():
    base = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
    base.requires_grad_(False)
    return get_peft_model(base, LoraConfig(r=8, target_modules=["q_proj", "fc1"]))

model = lora_model()
print("dtypes", sorted({str(p.dtype) for p in model.parameters()}))
from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
try:
    FullyShardedDataParallel(model, use_orig_params=True, device_id=torch.device("cpu"),
                             auto_wrap_policy=functools.partial(transformer_auto_wrap_policy,
                                                                transformer_layer_cls={PhiDecoderLayer}))
    print("fsdp1 ok")
except ValueError as exc:
    print("fsdp1 error:", exc)
model = lora_model()
for layer in model.base_model.model.model.layers:
    fully_shard(layer)
fully_shard(model)
ids = torch.tensor([[5, 6, 7, 8]])
model(input_ids=ids, labels=ids).loss.backward()
grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
print("fsdp2 ok", all(g is not None for g in grads), len(grads))
'''


def test_fsdp1_cannot_flatten_float32_lora_on_bf16_base_fsdp2_can(tmp_path: Path, tiny_phi_dir: Path) -> None:
    """Why fsdp.yaml is version 2: the error a bf16 GPU run got from FSDP1, reproduced on CPU."""
    script = tmp_path / "probe.py"
    script.write_text(FLATTEN_PROBE)
    env = subprocess_env({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())})
    proc = subprocess.run([sys.executable, str(script), str(tiny_phi_dir)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dtypes ['torch.bfloat16', 'torch.float32']" in proc.stdout
    assert "fsdp1 error: Must flatten tensors with uniform dtype but got torch.bfloat16 and torch.float32" \
        in proc.stdout, proc.stdout
    assert "fsdp2 ok True 4" in proc.stdout  # q_proj and fc1 in 2 layers
