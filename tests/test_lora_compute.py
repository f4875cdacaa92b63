"""train.lora_compute_dtype: LoRA products in the activations' dtype with float32 master weights.

A CPU multiplies bf16 too, so a tiny Phi with a bf16 base and float32 adapters shows what a bf16
GPU run does: 'base' runs the adapter GEMMs in bf16, 'float32' is PEFT's own cast of the
activations up to the weights. On a float32 base (CPU training) both paths are the same code.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _fixtures_train import commit_prepare, train_config

from medreason.config import LoraConfig
from medreason.store import ArtifactStore
from medreason.train_setup import CPU_KEEP_DTYPE_ENV

TARGETS = ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]
# bf16 keeps 8 bits of mantissa (relative rounding 2^-9 ~ 0.002 per value); the adapter products
# of 2 layers add a few such roundings to logits of magnitude < 1 that are bf16 themselves, so
# the two paths agree to a few bf16 ulps of the largest logit, not to float32 precision.
LOGIT_TOL = 0.02
# Over 10-12 optimizer steps the bf16 rounding of the adapter products feeds back through the
# updates; the losses (~6.9 nats on random weights, falling ~0.4 over the steps) stay within
# 0.1% of each other (measured: ~1e-4), well below what the steps themselves change.
LOSS_REL_TOL = 1e-3


def _peft_model(model_dir: Path, mode: str, dtype_name: str) -> object:
    import torch
    from transformers import AutoModelForCausalLM

    from medreason.lora_compute import apply_lora_compute_dtype
    from medreason.modeling import apply_lora

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype_name))
    base.requires_grad_(False)
    model = apply_lora(base, LoraConfig(r=8, alpha=16, dropout=0.0), TARGETS)
    # B starts at zero, which would make the adapter's contribution (and any dtype effect) vanish.
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    changed = apply_lora_compute_dtype(model, mode)
    assert changed == (12 if mode == "base" else 0)  # 6 targets x 2 layers
    return model


def _batch(seed: int) -> dict:
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 900, (2, 24), generator=gen)
    targets = ids.clone()
    targets[:, :4] = -100  # prompt positions carry no target, as in the real batches
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "targets": targets}


def _train(model: object, steps: int) -> tuple[list[float], list[object]]:
    """The project's loss function under a plain AdamW loop: (losses, fc1 lora_A output dtypes)."""
    import torch

    from medreason.train_step import forward_loss

    seen: list[object] = []
    fc1 = model.base_model.model.model.layers[0].mlp.fc1
    fc1.lora_A["default"].register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3)
    losses = []
    for step in range(steps):
        batch = _batch(step % 3)
        n_targets = int((batch["targets"] != -100).sum())
        loss = forward_loss(model, batch, "dynamic", "sdpa", None) / n_targets
        loss.backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    assert all(p.dtype == torch.float32 for p in params)
    assert all(s["exp_avg"].dtype == torch.float32 for s in opt.state.values())
    return losses, seen


def test_bf16_base_adapter_products_run_in_bf16_close_to_float32(tiny_phi_dir: Path) -> None:
    import torch

    fast, slow = _peft_model(tiny_phi_dir, "base", "bfloat16"), _peft_model(tiny_phi_dir, "float32", "bfloat16")
    ids = _batch(0)["input_ids"]
    with torch.no_grad():
        a, b = fast(input_ids=ids).logits.float(), slow(input_ids=ids).logits.float()
    scale = float(b.abs().max())
    assert float((a - b).abs().max()) <= LOGIT_TOL * max(scale, 1.0)
    assert not torch.equal(a, b)  # the products really ran in another dtype

    fast_losses, fast_dtypes = _train(fast, 12)
    slow_losses, slow_dtypes = _train(slow, 12)
    assert set(fast_dtypes) == {torch.bfloat16}  # the adapter GEMM ran in bf16 ...
    assert set(slow_dtypes) == {torch.float32}  # ... where PEFT's path runs it in float32
    for x, y in zip(fast_losses, slow_losses, strict=True):
        assert abs(x - y) <= LOSS_REL_TOL * abs(y), (fast_losses, slow_losses)
    assert fast_losses[-1] < fast_losses[0]  # it learns


def test_float32_base_is_bit_identical_in_both_modes(tiny_phi_dir: Path) -> None:
    one, one_dtypes = _train(_peft_model(tiny_phi_dir, "base", "float32"), 6)
    two, _ = _train(_peft_model(tiny_phi_dir, "float32", "float32"), 6)
    assert one == two
    import torch

    assert set(one_dtypes) == {torch.float32}


def test_float16_activations_keep_float32_products(tiny_phi_dir: Path) -> None:
    """No loss scaling here: float16 adapter gradients could leave float16's range, so 'base'
    leaves float16 activations on PEFT's float32 products (still through the patched modules)."""
    import torch

    from medreason.lora_compute import describe

    model = _peft_model(tiny_phi_dir, "base", "float16")
    seen: list[object] = []
    model.base_model.model.model.layers[0].mlp.fc1.lora_A["default"].register_forward_hook(
        lambda _m, _i, out: seen.append(out.dtype))
    with torch.no_grad():
        logits = model(input_ids=_batch(0)["input_ids"]).logits
    assert seen == [torch.float32] and logits.dtype == torch.float16
    assert describe(model, torch.float16).startswith("float32")


def test_mode_is_checked() -> None:
    from medreason.lora_compute import apply_lora_compute_dtype

    with pytest.raises(ValueError, match="lora_compute_dtype must be one of"):
        apply_lora_compute_dtype(object(), "bf16")


def _run(tmp_path: Path, tiny_phi_dir: Path, cli_inproc, run: str, dtype: str, mode: str) -> tuple[list, dict, str]:
    from safetensors.torch import load_file

    store_uri = str(tmp_path / "store")
    cfg = train_config(tmp_path / f"{run}.yaml", model__dtype=dtype, max_steps=10, save_every_steps=5,
                       eval_every_steps=5, lora_compute_dtype=mode)
    commit_prepare(store_uri, run, cfg, tiny_phi_dir, n_train=40, n_eval=4)
    rc, _out, err = cli_inproc("train", "--store", store_uri, "--run", run, "--config", cfg,
                               env={CPU_KEEP_DTYPE_ENV: "1"})
    assert rc == 0, err[-3000:]
    store = ArtifactStore(store_uri)
    rows = [json.loads(line) for line in store.read_text(f"runs/{run}/train/metrics.jsonl").splitlines()]
    adapter = load_file(store.full(f"runs/{run}/train/adapter/adapter_model.safetensors"))
    paths = [line for line in err.splitlines() if "training paths:" in line]
    assert len(paths) == 1
    return rows, adapter, paths[0]


def test_train_job_bf16_base_losses_and_saved_adapter(tmp_path: Path, tiny_phi_dir: Path, cli_inproc) -> None:
    """The train job with a bf16 base: 'base' tracks 'float32' and saves the same float32 adapter."""
    import torch

    fast_rows, fast_adapter, fast_line = _run(tmp_path, tiny_phi_dir, cli_inproc, "fast", "bfloat16", "base")
    slow_rows, slow_adapter, slow_line = _run(tmp_path, tiny_phi_dir, cli_inproc, "slow", "bfloat16", "float32")
    assert "LoRA products bfloat16 (the activations' dtype" in fast_line
    assert "LoRA products float32 (PEFT casts" in slow_line and "lora_compute_dtype=float32" in slow_line
    for a, b in zip(fast_rows[1:], slow_rows[1:], strict=True):
        assert abs(a["loss"] - b["loss"]) <= LOSS_REL_TOL * b["loss"], (a, b)
    assert fast_adapter.keys() == slow_adapter.keys() and fast_adapter
    assert {t.dtype for t in fast_adapter.values()} == {torch.float32}
    assert not all(torch.equal(fast_adapter[k], slow_adapter[k]) for k in fast_adapter)


def test_train_job_float32_base_same_numbers_in_both_modes(tmp_path: Path, tiny_phi_dir: Path,
                                                           cli_inproc) -> None:
    import torch

    one_rows, one_adapter, line = _run(tmp_path, tiny_phi_dir, cli_inproc, "one", "float32", "base")
    two_rows, two_adapter, _ = _run(tmp_path, tiny_phi_dir, cli_inproc, "two", "float32", "float32")
    assert "LoRA products float32 (the activations' dtype)" in line
    assert [(r["loss"], r["eval_loss"], r["grad_norm"]) for r in one_rows] == \
           [(r["loss"], r["eval_loss"], r["grad_norm"]) for r in two_rows]
    assert one_adapter.keys() == two_adapter.keys()
    assert all(torch.equal(one_adapter[k], two_adapter[k]) for k in one_adapter)


def test_compiled_checkpointed_layers_trace_the_bf16_products(tiny_phi_dir: Path) -> None:
    """Regional torch.compile (as compile_decoder_layers does; the aot_eager backend needs no C++
    toolchain) and gradient checkpointing: same losses as eager, gradients still float32."""
    import torch
    from transformers.modeling_layers import GradientCheckpointingLayer

    eager_losses, _ = _train(_peft_model(tiny_phi_dir, "base", "bfloat16"), 3)
    model = _peft_model(tiny_phi_dir, "base", "bfloat16")
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.base_model.model.enable_input_require_grads()
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert len(layers) == 2
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    for layer in layers:
        layer.compile(backend="aot_eager")
    compiled_losses, dtypes = _train(model, 3)
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo really traced the layers
    assert set(dtypes) == {torch.bfloat16}
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-5)
