"""Packing and batching: a packed row behaves exactly like its records one by one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medreason.packing import (
    Layout,
    block_causal_mask,
    collate,
    epoch_plan,
    pack_rows,
    step_counts,
    step_micro_batches,
)
from medreason.tokens import IGNORE_INDEX, TokenizedSplit
from medreason.training import forward_loss

VOCAB = 97


def _split(lengths: list[int], prompt_lens: list[int], seed: int = 0) -> TokenizedSplit:
    rng = np.random.default_rng(seed)
    records = []
    for i, (n, p) in enumerate(zip(lengths, prompt_lens, strict=True)):
        ids = rng.integers(1, VOCAB - 1, size=n).tolist()
        ids[-1] = VOCAB - 1  # EOS
        records.append((f"t:{i}", ids, p))
    return TokenizedSplit.from_records(records)


def _tiny_model(arch: str, attn: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if arch == "phi":
        from transformers import PhiConfig, PhiForCausalLM

        # head_dim 16 -> rotary dim int(16 * 0.4) = 6 (must be even), like Phi-2's partial rotary
        cfg = PhiConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, partial_rotary_factor=0.4, max_position_embeddings=256,
                        attn_implementation=attn)
        return PhiForCausalLM(cfg).eval()
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      attn_implementation=attn)
    return LlamaForCausalLM(cfg).eval()


def _tensors(batch: dict) -> dict:
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}


@pytest.mark.parametrize("arch", ["phi", "llama"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_row_equals_records_one_by_one(arch: str, attn: str) -> None:
    split = _split([9, 17, 5, 23, 12], [3, 6, 0, 8, 0])
    model = _tiny_model(arch, attn)
    layout = Layout("packed", 96, 2, pad_to_multiple=16)
    rows = [[0, 1, 2], [3, 4]]  # rows of 31 and 35 tokens, padded to 48 (a multiple of 16)
    batch = _tensors(collate(split, rows, layout, pad_id=0))
    assert batch["input_ids"].shape == (2, 48)
    with torch.no_grad():
        mask = block_causal_mask(batch["segment_ids"], attn, torch.float32)
        packed_logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                              attention_mask=mask).logits
        token_loss = torch.nn.functional.cross_entropy(
            packed_logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=IGNORE_INDEX,
            reduction="none").view(batch["targets"].shape)
        total = forward_loss(model, batch, "packed", attn, torch.float32)
    single_layout = Layout("dynamic", 96, 1, pad_to_multiple=1)
    expected_total = 0.0
    for b, row in enumerate(rows):
        pos = 0
        for k, rec in enumerate(row):
            one = _tensors(collate(split, [[rec]], single_layout, pad_id=0))
            n = one["input_ids"].shape[1]
            with torch.no_grad():
                logits = model(input_ids=one["input_ids"]).logits
            seg = batch["segment_ids"][b] == k + 1
            assert int(seg.sum()) == n
            torch.testing.assert_close(packed_logits[b, seg], logits[0], atol=1e-5, rtol=1e-5)
            loss_alone = torch.nn.functional.cross_entropy(
                logits[0], one["targets"][0], ignore_index=IGNORE_INDEX, reduction="sum")
            # The packed row's targets of this record: same positions, same values.
            assert torch.equal(batch["targets"][b, seg], one["targets"][0])
            torch.testing.assert_close(token_loss[b, seg].sum(), loss_alone, atol=1e-5, rtol=1e-5)
            expected_total += float(loss_alone)
            pos += n
    torch.testing.assert_close(float(total), expected_total, atol=1e-4, rtol=1e-5)


def test_targets_mask_boundaries_padding_and_prompt_but_keep_eos() -> None:
    split = _split([4, 5], [2, 0])
    batch = collate(split, [[0, 1]], Layout("packed", 16, 1, pad_to_multiple=16), pad_id=0)
    t = batch["targets"][0].tolist()
    ids0, ids1 = split.ids(0).tolist(), split.ids(1).tolist()
    # Record 0: prompt tokens 0-1 not targets; tokens 2 and 3 (EOS) are targets.
    assert t[0:3] == [IGNORE_INDEX, ids0[2], ids0[3]]
    # Position 3 is record 0's EOS: predicting record 1's first token from it is ignored.
    assert t[3] == IGNORE_INDEX
    # Record 1 (train on prompt): every token after its first is a target, EOS included.
    assert t[4:8] == ids1[1:]
    assert t[8:] == [IGNORE_INDEX] * 8  # record 1's last position and the padding tail
    assert batch["n_targets"] == 2 + 4
    assert batch["position_ids"][0, :9].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4]
    assert batch["segment_ids"][0].tolist() == [1] * 4 + [2] * 5 + [0] * 7


def test_block_mask_has_no_cross_record_attention() -> None:
    seg = torch.tensor([[1, 1, 2, 2, 2, 0]])
    mask = block_causal_mask(seg, "sdpa", torch.float32)[0, 0]
    assert mask.dtype == torch.bool
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],  # padding attends to itself only (no all-masked row, no NaN)
    ], dtype=torch.bool)
    assert torch.equal(mask, expected)
    additive = block_causal_mask(seg, "eager", torch.float32)[0, 0]
    assert torch.equal(additive == 0, expected)


def test_pack_rows_fits_everything_once() -> None:
    rng = np.random.default_rng(3)
    lengths = np.clip(rng.lognormal(np.log(550), 0.5, size=2000), 50, 2048).astype(np.int64)
    rows = pack_rows(rng.permutation(len(lengths)), lengths, 2048)
    flat = sorted(i for row in rows for i in row)
    assert flat == list(range(len(lengths)))
    used = [sum(int(lengths[i]) for i in row) for row in rows]
    assert max(used) <= 2048
    fill = sum(used) / (2048 * len(rows))
    assert fill > 0.9, fill  # first-fit with 32 open rows packs MedReason-like lengths tightly


@pytest.mark.parametrize("mode", ["max_length", "dynamic", "packed"])
def test_plan_is_deterministic_per_epoch(mode: str) -> None:
    lengths = np.random.default_rng(0).integers(5, 60, size=101)
    layout = Layout(mode, 64 if mode != "packed" else 128, 4)
    a0 = epoch_plan(lengths, layout, seed=5, epoch=0)
    assert a0 == epoch_plan(lengths, layout, seed=5, epoch=0)
    assert a0 != epoch_plan(lengths, layout, seed=5, epoch=1)
    assert a0 != epoch_plan(lengths, layout, seed=6, epoch=0)
    assert sorted(i for mb in a0 for row in mb for i in row) == list(range(101))


def test_step_rows_same_for_accumulation_and_ranks() -> None:
    lengths = np.random.default_rng(1).integers(5, 60, size=64)
    split = _split(lengths.tolist(), [2] * 64)
    layout = Layout("dynamic", 64, 2)
    plan = epoch_plan(lengths, layout, seed=1, epoch=0)
    for index in range(4):
        one_proc = step_micro_batches(plan, index, grad_accum_steps=4, world_size=1, rank=0)
        two_procs = [mb for r in range(2) for mb in step_micro_batches(plan, index, 2, 2, r)]
        assert sorted(map(sorted, sum(one_proc, []))) == sorted(map(sorted, sum(two_procs, [])))
        targets, real = step_counts(split, one_proc, layout)
        batches = [collate(split, mb, layout, 0) for mb in one_proc]
        assert targets == sum(b["n_targets"] for b in batches)
        assert real == sum(b["n_real_tokens"] for b in batches)
