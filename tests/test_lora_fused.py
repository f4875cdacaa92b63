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


def test_lora_linear_op_gradients_and_registration() -> None:
    """The in-place custom op: its hand-written backward against autograd's numeric gradients
    (float64, every input trainable, with and without bias), and torch.library's checks of its
    fake, schema and autograd registration."""
    import torch

    op = lora_fused.lora_linear_op()
    gen = torch.Generator().manual_seed(0)

    def inputs(bias: bool) -> tuple:
        shapes = [(5, 6), (4, 6), (4,) if bias else None, (5, 2), (4, 2)]
        return tuple(None if s is None else torch.randn(*s, generator=gen, dtype=torch.float64, requires_grad=True)
                     for s in shapes)

    for bias in (True, False):
        for adapter_first in (True, False):
            args = (*inputs(bias), adapter_first)
            x, w, c, h, b, _ = args
            want = x @ w.t() + (c if bias else 0) + h @ b.t()
            torch.testing.assert_close(op(*args), want)
            assert torch.autograd.gradcheck(op, args)
            torch.library.opcheck(op, args)


def test_in_place_accumulation_equals_the_out_of_place_addmm(tiny_phi_dir: Path, monkeypatch) -> None:
    """MEDREASON_LORA_INPLACE=0 (torch.addmm, which copies the base output first) and the default
    in-place op in the same order (base product first) give bit-identical float32 losses and
    adapter weights over training steps."""
    import torch

    monkeypatch.setenv("MEDREASON_LORA_ADAPTER_FIRST", "0")
    inplace_losses, _ = _train(inplace := _fused(tiny_phi_dir, "float32"), 4)
    monkeypatch.setenv("MEDREASON_LORA_INPLACE", "0")
    copying = _fused(tiny_phi_dir, "float32")
    assert {m.fused_inplace for m in copying.modules() if hasattr(m, "fused_inplace")} == {False}
    copying_losses, _ = _train(copying, 4)
    assert inplace_losses == copying_losses
    for (name, p), (_, q) in zip(inplace.named_parameters(), copying.named_parameters(), strict=True):
        if p.requires_grad:
            assert torch.equal(p, q), name
    monkeypatch.setenv("MEDREASON_LORA_INPLACE", "sometimes")
    with pytest.raises(Exception, match="MEDREASON_LORA_INPLACE"):
        _fused(tiny_phi_dir, "float32")


def test_adapter_first_order_matches_the_base_first_order(tiny_phi_dir: Path, monkeypatch) -> None:
    """MEDREASON_LORA_ADAPTER_FIRST=0 (the base product written first, h b^T accumulated into it)
    against the default order (h b^T and the bias written first, the base product accumulated):
    the same sum in another order, so float32 losses and adapter weights agree to rounding."""
    import torch

    first_losses, _ = _train(first := _fused(tiny_phi_dir, "float32"), 4)
    monkeypatch.setenv("MEDREASON_LORA_ADAPTER_FIRST", "0")
    last = _fused(tiny_phi_dir, "float32")
    assert {m.adapter_first for m in last.modules() if hasattr(m, "adapter_first")} == {False}
    last_losses, _ = _train(last, 4)
    assert first_losses == pytest.approx(last_losses, rel=1e-5)
    for (name, p), (_, q) in zip(first.named_parameters(), last.named_parameters(), strict=True):
        if p.requires_grad:
            torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-5, msg=name)
