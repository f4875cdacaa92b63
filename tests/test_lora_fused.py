"""train.lora_fused (medreason/lora_fused.py): the B product accumulated by addmm and Phi's four
parallel A products as one, against PEFT's own LoRA forward on the tiny random Phi.

float32: the same numbers up to float rounding (the scaling is applied to B before the product
instead of to the product, and the sum rounds once), 1e-5 relative. bf16: within the tolerance
tests/test_lora_compute.py states for bf16 adapter products.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_lora_compute import LOSS_REL_TOL, _batch, _peft_model, _train

from medreason import lora_fused


def _fused(model_dir: Path, dtype_name: str) -> object:
    model = _peft_model(model_dir, "base", dtype_name)
    assert lora_fused.fuse_lora(model) == (12, 2)  # 6 targets x 2 layers; q/k/v/fc1 shared in both
    return model


def _count(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    calls = {"shared": 0, "own": 0}
    compute, own = lora_fused.SharedA.compute, lora_fused.own_a_product

    def counted_compute(self, x):  # noqa: ANN001, ANN202
        calls["shared"] += 1
        return compute(self, x)

    def counted_own(layer, x):  # noqa: ANN001, ANN202
        calls["own"] += 1
        return own(layer, x)

    monkeypatch.setattr(lora_fused.SharedA, "compute", counted_compute)
    monkeypatch.setattr(lora_fused, "own_a_product", counted_own)
    return calls


def test_float32_fused_forward_and_training_match_peft(tiny_phi_dir: Path, monkeypatch) -> None:
    import torch

    plain, fused = _peft_model(tiny_phi_dir, "base", "float32"), _fused(tiny_phi_dir, "float32")
    calls = _count(monkeypatch)
    ids = _batch(0)["input_ids"]
    with torch.no_grad():
        want, got = plain(input_ids=ids).logits, fused(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # One shared A product per decoder layer; dense and fc2 read other tensors: their own.
    assert calls == {"shared": 2, "own": 4}
    plain_losses, _ = _train(plain, 6)
    fused_losses, _ = _train(fused, 6)
    assert fused_losses == pytest.approx(plain_losses, rel=1e-5)
    trained = dict(plain.named_parameters())
    for name, param in fused.named_parameters():  # the same names, the same float32 weights
        if param.requires_grad:
            assert param.dtype == torch.float32
            torch.testing.assert_close(param, trained[name], atol=1e-4, rtol=1e-4)


def test_bf16_fused_training_stays_within_the_bf16_tolerance(tiny_phi_dir: Path) -> None:
    plain_losses, _ = _train(_peft_model(tiny_phi_dir, "base", "bfloat16"), 8)
    fused_losses, _ = _train(_fused(tiny_phi_dir, "bfloat16"), 8)
    for x, y in zip(fused_losses, plain_losses, strict=True):
        assert abs(x - y) <= LOSS_REL_TOL * abs(y), (fused_losses, plain_losses)
    assert fused_losses[-1] < fused_losses[0]


def test_compiled_checkpointed_fused_layers_trace_without_graph_breaks(tiny_phi_dir: Path) -> None:
    import torch
    from transformers.modeling_layers import GradientCheckpointingLayer

    eager_losses, _ = _train(_fused(tiny_phi_dir, "bfloat16"), 3)
    model = _fused(tiny_phi_dir, "bfloat16")
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.base_model.model.enable_input_require_grads()
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    for layer in [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]:
        layer.compile(backend="aot_eager")
    compiled_losses, _ = _train(model, 3)
    assert counters["stats"]["unique_graphs"] >= 1
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-5)


def test_disabled_merged_and_unfusable_adapters_take_peft_paths(tiny_phi_dir: Path) -> None:
    import torch

    fused = _fused(tiny_phi_dir, "float32")
    ids = _batch(1)["input_ids"]
    with torch.no_grad():
        adapted = fused(input_ids=ids).logits
        with fused.disable_adapter():
            base = fused(input_ids=ids).logits
        fused.merge_adapter()
        merged = fused(input_ids=ids).logits
        fused.unmerge_adapter()
    assert not torch.allclose(adapted, base, atol=1e-3)  # the adapter does something
    torch.testing.assert_close(merged, adapted, atol=1e-4, rtol=1e-4)
    # PEFT's float32 products (lora_compute_dtype: float32) are left as they are.
    assert lora_fused.fuse_lora(_peft_model(tiny_phi_dir, "float32", "bfloat16")) == (0, 0)
