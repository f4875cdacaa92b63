"""train.attention_in_graph: the packed-rows attention inside the compiled decoder layers.

On CUDA the attention is torch's FlashAttention-2 varlen custom op; here (CPU) it is the
reference, causal sdpa per record, as the custom op medreason::packed_causal_attention with a
hand-written backward. Both are traced into each compiled layer as one node, where the
graph-break form (train.attention_in_graph=false) leaves the layer's graph around a
torch.compiler.disable call. The aot_eager backend needs no C++ toolchain.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medreason import modeling
from medreason.config import LoraConfig
from medreason.packing import Layout, collate
from medreason.tokens import TokenizedSplit
from medreason.train_step import add_fast_fields, forward_loss

TARGETS = ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]
# Record lengths of the two 64-token rows of each step: 3, 6 and 4 records (+1 for a padding
# tail in the last step), so cu_seq_lens has another length every step while the rows do not.
ROWS = [[[30, 34], [64]], [[10, 20, 34], [16, 16, 32]], [[64], [20, 24]]]
# The in-graph reference's backward is the attention backward written out (autograd cannot run
# inside a custom op), sdpa's is its own kernel, and aot_eager decomposes some ops of the layer:
# the same float32 math summed in another order, so gradients agree to a few float32 ulps
# (measured 3e-7 of the largest), not bit for bit.
GRAD_RTOL = 1e-5
# AdamW's first steps move each weight by ~lr * sign(grad): 1e-7-relative gradient differences
# leave 4 steps' losses equal to float32 rounding (measured: identical).
LOSS_RTOL = 1e-6


def _batch(step: int) -> dict:
    rng = np.random.default_rng(step)
    records, micro_batch = [], []
    for row in ROWS[step % len(ROWS)]:
        micro_batch.append([])
        for n in row:
            micro_batch[-1].append(len(records))
            records.append((f"r:{len(records)}", rng.integers(3, 900, size=n).tolist(), n // 4))
    split = TokenizedSplit.from_records(records)
    batch = add_fast_fields(collate(split, micro_batch, Layout("packed", 64, 2, 8), pad_id=0), varlen=True,
                            head=False)
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}


def _model(model_dir: Path, in_graph: bool, backend: object | None) -> torch.nn.Module:
    """Tiny Phi + LoRA on the varlen attention; its decoder layers compiled when ``backend``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    base.requires_grad_(False)
    assert modeling.use_varlen_attention(base, in_graph=in_graph)
    model = modeling.apply_lora(base, LoraConfig(r=8, alpha=16, dropout=0.0), TARGETS)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: the adapters would not change the first step
            torch.nn.init.normal_(param, std=0.05)
    if backend is not None:
        torch._dynamo.reset()
        assert modeling.compile_decoder_layers(model, backend) == 2
    return model


def _loss(model: torch.nn.Module, step: int) -> torch.Tensor:
    batch = _batch(step)
    return forward_loss(model, batch, "packed", modeling.VARLEN_ATTENTION, torch.float32) / int(batch["n_targets"])


def _train(model: torch.nn.Module, steps: int, after_step: list[int] | None = None,
           counter: object | None = None) -> tuple[list[float], dict[str, torch.Tensor]]:
    """(losses of ``steps`` AdamW steps, the LoRA gradients of the first step)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(params.values(), lr=3e-3)
    losses: list[float] = []
    first: dict[str, torch.Tensor] = {}
    for step in range(steps):
        loss = _loss(model, step)
        loss.backward()
        if step == 0:
            first = {n: p.grad.clone() for n, p in params.items()}
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if after_step is not None:
            after_step.append(counter.frame_count)
    return losses, first


def test_reference_op_equals_sdpa_per_record_with_empty_segments() -> None:
    """The custom op (forward and its written-out backward) = the per-record sdpa under autograd,
    including empty records in the middle and at the end (zero-length segments, as a bucketed
    cu_seq_lens would have), and passes torch.library.opcheck (schema, fake, autograd)."""
    modeling.register_varlen_attention()
    gen = torch.Generator().manual_seed(1)
    cu = torch.tensor([0, 5, 5, 12, 20, 20, 20], dtype=torch.int32)
    q, k, v = (torch.randn(20, 4, 16, generator=gen, requires_grad=True) for _ in range(3))
    grad = torch.randn(20, 4, 16, generator=gen)
    scale = 16 ** -0.5
    out = torch.ops.medreason.packed_causal_attention(q, k, v, cu, scale)
    ref = modeling._segment_attention(q, k, v, cu, scale)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)  # the same function
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for name, a, b in zip("qkv", got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"d{name}")
    # Causal inside a record: the first token of the record [5, 12) sees only itself.
    torch.testing.assert_close(out[5].detach(), v[5].detach(), rtol=1e-6, atol=1e-6)
    torch.library.opcheck(torch.ops.medreason.packed_causal_attention.default, (q, k, v, cu, scale))


def test_compiled_layers_hold_the_attention_same_losses_no_recompile(tiny_phi_dir: Path) -> None:
    """Compiled layers with the attention in the graph: one graph per layer and no graph break,
    no recompilation when the number of records changes, and the losses/gradients of eager and
    of the graph-break form."""
    from torch._dynamo.testing import CompileCounterWithBackend

    counters = torch._dynamo.utils.counters
    assert len({len(_batch(s)["cu_seqlens"]) for s in range(3)}) == 3  # records per batch change
    assert len({tuple(_batch(s)["input_ids"].shape) for s in range(3)}) == 1  # the rows do not

    eager_losses, eager_grads = _train(_model(tiny_phi_dir, False, None), 4)

    counters.clear()
    in_graph = CompileCounterWithBackend("aot_eager")
    frames: list[int] = []
    losses, grads = _train(_model(tiny_phi_dir, True, in_graph), 4, frames, in_graph)
    assert not counters["graph_break"], dict(counters["graph_break"])
    # Two frames from the first step on, none later: layer 0's input needs no gradient (frozen
    # embeddings), layer 1's does, so dynamo keeps one graph for each; 3 other record counts follow.
    assert frames == [2, 2, 2, 2]
    assert losses == pytest.approx(eager_losses, rel=LOSS_RTOL)
    for name, g in eager_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=GRAD_RTOL, atol=GRAD_RTOL * float(g.abs().max()),
                                   msg=name)

    counters.clear()
    graph_break = CompileCounterWithBackend("aot_eager")
    frames = []
    break_losses, break_grads = _train(_model(tiny_phi_dir, False, graph_break), 4, frames, graph_break)
    assert sum(counters["graph_break"].values()) >= 2  # the disabled attention, in each layer graph
    assert frames[0] > 2 and frames[-1] == frames[0]  # split graphs, still no recompilation
    assert break_losses == pytest.approx(eager_losses, rel=LOSS_RTOL)
    for name, g in eager_grads.items():  # aot_eager's decompositions round differently from eager too
        torch.testing.assert_close(break_grads[name], g, rtol=GRAD_RTOL, atol=GRAD_RTOL * float(g.abs().max()),
                                   msg=name)
    assert modeling.varlen_attention_in_graph() is False
    modeling.register_varlen_attention()
    assert modeling.varlen_attention_in_graph() is True


def test_attention_in_graph_defaults_on_and_hashes_as_absent() -> None:
    """The new field is on by default without changing the hash of configs written before it."""
    from medreason.config import build_config, config_changes

    default = build_config(env={})
    assert default.train.attention_in_graph is True
    before = default.model_dump(mode="json")
    del before["train"]["attention_in_graph"]  # a config from before the field existed
    assert config_changes(before, default, "train") == []
    off = build_config(overrides=["train.attention_in_graph=false"], env={})
    assert off.stage_hash("train") != default.stage_hash("train")
    assert config_changes(before, off, "train") == ["train.attention_in_graph: (unset) -> false"]


def test_training_paths_line_says_where_the_attention_runs() -> None:
    """With compiled layers the start line says whether the attention is in their graphs."""
    from medreason.train_setup import TrainModel, attention_path

    layout = Layout("packed", 64, 2, 8)

    def path(compile_mode: str) -> str:
        tm = TrainModel(None, None, None, None, modeling.VARLEN_ATTENTION, torch.float32, 0, 0, False, compile_mode)
        return attention_path(tm, layout, "cpu")

    modeling.register_varlen_attention(in_graph=False)
    assert path("regional (2 decoder layers)").endswith(", a graph break, train.attention_in_graph=false")
    modeling.register_varlen_attention(in_graph=True)
    assert path("regional (2 decoder layers)").endswith(", inside the compiled graphs")
    assert path("off") == "varlen reference (causal sdpa one record at a time)"
