"""Phi's residual sum with both dropouts in one op (medreason/residual_dropout.py).

The Triton kernels run through Triton's interpreter (TRITON_INTERPRET=1, a fresh pytest process,
as in tests/test_decode_attention.py); the torch reference runs here. Dropout is random, so the
checks are the properties that define it: the forward's and the backward's masks are the same
masks (the backward draws them again from the seed), each branch keeps a position with
probability 1 - p (binomial bounds, 6 standard deviations), the two branches independently, the
kept values scaled by 1 / (1 - p); and the swapped decoder layer is transformers' layer when no
dropout applies (evaluation mode: bit-identical logits).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from medreason import residual_dropout as rd

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreter = pytest.mark.skipif(not INTERPRETED, reason="runs in the TRITON_INTERPRET=1 process")
KERNEL_TESTS = 2  # the tests marked ``interpreter`` (parametrized cases counted)


@pytest.mark.skipif(INTERPRETED, reason="this is the interpreted process")
def test_kernel_tests_pass_under_the_triton_interpreter() -> None:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "kernel",
                           __file__], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert f"{KERNEL_TESTS} passed" in proc.stdout, proc.stdout[-2000:]


def _check_dropout(dtype_name: str, n: int, p: float, device: str = "cpu") -> None:
    """One forward and backward: masks recovered from the backward explain the forward exactly."""
    import torch

    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(n)
    a, b, r = (torch.randn(n, generator=gen).to(device, dtype).requires_grad_() for _ in range(3))
    out = rd.residual_dropout(a, b, r, p)
    assert out.dtype == dtype and out.shape == a.shape
    out.backward(torch.ones_like(out))
    scale = 1.0 / (1.0 - p)
    keep_a, keep_b = a.grad != 0, b.grad != 0
    # Kept positions' gradient is the scale in the dtype (to one bf16 unit: Triton's interpreter
    # truncates float32 to bf16 where a GPU rounds), dropped ones exactly zero.
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    for grad, keep in ((a.grad, keep_a), (b.grad, keep_b)):
        torch.testing.assert_close(grad[keep].float(), torch.full_like(grad[keep].float(), scale), atol=tol, rtol=0)
    assert torch.equal(r.grad, torch.ones_like(r))  # the residual passes through
    want = (a.detach().float() * keep_a * scale + b.detach().float() * keep_b * scale + r.detach().float())
    torch.testing.assert_close(out.detach().float(), want.to(dtype).float(), atol=tol, rtol=tol)
    bound = 6 * ((1 - p) * p / n) ** 0.5
    for keep in (keep_a, keep_b):
        assert abs(keep.float().mean().item() - (1 - p)) < bound
    both = (keep_a & keep_b).float().mean().item()  # independent branches: (1 - p)^2
    assert abs(both - (1 - p) ** 2) < 6 * ((1 - p) ** 2 * (1 - (1 - p) ** 2) / n) ** 0.5


def _check_seeding() -> None:
    """Each call draws new masks; torch's seed makes a call repeatable."""
    import torch

    a, b, r = torch.ones(4099), torch.ones(4099), torch.zeros(4099)
    torch.manual_seed(3)
    first, second = rd.residual_dropout(a, b, r, 0.5), rd.residual_dropout(a, b, r, 0.5)
    torch.manual_seed(3)
    again = rd.residual_dropout(a, b, r, 0.5)
    assert not torch.equal(first, second)
    assert torch.equal(first, again)


@interpreter
@pytest.mark.parametrize(("dtype_name", "n", "p"), [("float32", 20_001, 0.1), ("bfloat16", 6_150, 0.3)])
def test_kernel_masks_are_one_draw_for_forward_and_backward(dtype_name: str, n: int, p: float) -> None:
    import torch

    assert rd._use_kernel(torch.empty(1))
    _check_dropout(dtype_name, n, p)  # n odd and not a multiple of a program's 2 x BLOCK positions
    _check_seeding()


@pytest.mark.skipif(INTERPRETED, reason="the reference path runs in the plain process")
@pytest.mark.parametrize(("dtype_name", "n", "p"), [("float32", 20_001, 0.1), ("bfloat16", 6_150, 0.3)])
def test_reference_masks_are_one_draw_for_forward_and_backward(dtype_name: str, n: int, p: float) -> None:
    import torch

    assert not rd._use_kernel(torch.empty(1))
    _check_dropout(dtype_name, n, p)
    _check_seeding()


def test_cuda_kernel_masks_are_one_draw_for_forward_and_backward() -> None:
    """The compiled kernels on a GPU (bench/device_run.sh's gpu-tests step), at a training size."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    assert rd._use_kernel(torch.empty(1, device="cuda"))
    _check_dropout("bfloat16", 16384 * 2560 + 3, 0.1, "cuda")
    _check_dropout("float32", 100_003, 0.1, "cuda")


def _tiny_phi(model_dir: Path, resid_pdrop: float) -> object:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, resid_pdrop=resid_pdrop)


@pytest.mark.skipif(INTERPRETED, reason="model tests run in the plain process")
def test_swapped_layers_match_transformers_without_dropout_and_train(tiny_phi_dir: Path, monkeypatch) -> None:
    import torch
    from transformers.modeling_layers import GradientCheckpointingLayer

    plain, swapped = _tiny_phi(tiny_phi_dir, 0.1), _tiny_phi(tiny_phi_dir, 0.1)
    assert rd.fuse_residual_dropout(swapped) == 2
    assert rd.fuse_residual_dropout(_tiny_phi(tiny_phi_dir, 0.0)) == 0  # no dropout: nothing to fuse
    monkeypatch.setenv(rd.ENV, "0")
    assert rd.fuse_residual_dropout(_tiny_phi(tiny_phi_dir, 0.1)) == 0
    monkeypatch.delenv(rd.ENV)
    ids = torch.randint(3, 900, (2, 24), generator=torch.Generator().manual_seed(0))
    plain.eval(), swapped.eval()
    with torch.no_grad():
        assert torch.equal(swapped(input_ids=ids).logits, plain(input_ids=ids).logits)
    # Training: dropout applies (two forwards differ), the layers compile without graph breaks,
    # the loss goes down.
    swapped.train()
    with torch.no_grad():
        assert not torch.equal(swapped(input_ids=ids).logits, swapped(input_ids=ids).logits)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    for layer in [m for m in swapped.modules() if isinstance(m, GradientCheckpointingLayer)]:
        layer.compile(backend="aot_eager")
    opt = torch.optim.AdamW(swapped.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        loss = swapped(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert losses[-1] < losses[0], losses


@pytest.mark.skipif(INTERPRETED, reason="model tests run in the plain process")
def test_fsdp_wrap_policy_still_finds_the_swapped_layers(tiny_phi_dir: Path) -> None:
    """accelerate's FSDP2 wrap policy looks the blocks up by the names in _no_split_modules
    ("PhiDecoderLayer"): the swapped layers keep that name, so every block is its own unit."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    model = _tiny_phi(tiny_phi_dir, 0.1)
    assert rd.fuse_residual_dropout(model) == 2
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)  # raised "Could not find ... PhiDecoderLayer"
    wrapped = [name for name, module in model.named_modules() if policy(module)]
    assert wrapped == ["model.layers.0", "model.layers.1"]
    assert all(m.forward.__func__ is rd._fused_forward for m in model.model.layers)


@pytest.mark.skipif(INTERPRETED, reason="model tests run in the plain process")
def test_checkpointed_compiled_layers_replay_the_forward_masks(tiny_phi_dir: Path) -> None:
    """Gradient checkpointing runs each layer's forward again in the backward, and the op draws
    its seed from torch's generator: checkpointing restores that generator before the replay, so
    the replayed masks (and with them the gradients) are the first forward's. Against the same
    model without checkpointing or compilation, same seed: the same gradients."""
    import torch
    from transformers.modeling_layers import GradientCheckpointingLayer

    ids = torch.randint(3, 900, (2, 24), generator=torch.Generator().manual_seed(1))

    def grads(checkpointed: bool) -> dict[str, torch.Tensor]:
        model = _tiny_phi(tiny_phi_dir, 0.3)
        assert rd.fuse_residual_dropout(model) == 2
        model.train()
        if checkpointed:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            torch._dynamo.reset()
            for layer in [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]:
                layer.compile(backend="aot_eager")
        torch.manual_seed(7)
        model(input_ids=ids, labels=ids).loss.backward()
        return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}

    plain, replayed = grads(False), grads(True)
    assert plain.keys() == replayed.keys() and plain
    for name, grad in plain.items():
        torch.testing.assert_close(replayed[name], grad, atol=1e-5, rtol=1e-5, msg=name)
