"""The training fast path computes the same function as the plain path.

Fast path (the default on CUDA; MEDREASON_FAST_PATH=1 forces it here on CPU): packed rows go
through the varlen attention (record boundaries as cu_seq_lens, no [B, 1, L, L] mask; on CPU
its reference implementation, causal sdpa per record) and the LM head + loss run on target
positions only (TargetHead). Plain path: the block-causal mask and full-width logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _fixtures_train import commit_prepare, train_config

from medreason import modeling
from medreason.packing import Layout, collate
from medreason.store import ArtifactStore
from medreason.tokens import IGNORE_INDEX, TokenizedSplit
from medreason.training import FAST_PATH_ENV, TargetHead, add_fast_fields, forward_loss

VOCAB = 97


def _split(lengths: list[int], prompt_lens: list[int], seed: int = 0) -> TokenizedSplit:
    rng = np.random.default_rng(seed)
    records = []
    for i, (n, p) in enumerate(zip(lengths, prompt_lens, strict=True)):
        ids = rng.integers(1, VOCAB - 1, size=n).tolist()
        ids[-1] = VOCAB - 1
        records.append((f"t:{i}", ids, p))
    return TokenizedSplit.from_records(records)


def _tiny_phi(attn: str = "sdpa") -> torch.nn.Module:
    from transformers import PhiConfig, PhiForCausalLM

    torch.manual_seed(0)
    cfg = PhiConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, partial_rotary_factor=0.4, max_position_embeddings=256,
                    attn_implementation=attn)
    return PhiForCausalLM(cfg).eval()


def _tensors(batch: dict) -> dict:
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}


def test_fast_fields_mark_every_record_and_only_targets() -> None:
    split = _split([9, 17, 5, 23], [3, 6, 0, 8])
    batch = collate(split, [[0, 1], [2, 3]], Layout("packed", 48, 2, 8), pad_id=0)
    fast = add_fast_fields(batch, varlen=True, head=True)
    # Row 0: 9 + 17 = 26 tokens then 6 padding (row length 32, rounded up to 8); row 1: 5 + 23 + 4.
    assert fast["cu_seqlens"].tolist() == [0, 9, 26, 32, 37, 60, 64]
    assert fast["cu_seqlens"].dtype == np.int32 and fast["max_seqlen"] == 32
    flat = batch["targets"].reshape(-1)
    assert fast["target_index"].tolist() == np.flatnonzero(flat != IGNORE_INDEX).tolist()
    assert (fast["target_ids"] == flat[fast["target_index"]]).all()
    assert len(fast["target_ids"]) == batch["n_targets"]


def test_varlen_packed_row_equals_records_one_by_one() -> None:
    """Logits of each record in a packed row (varlen attention) equal those of the record alone."""
    split = _split([9, 17, 5, 23, 12], [3, 6, 0, 8, 0])
    plain = _tiny_phi("sdpa")
    fast = _tiny_phi("sdpa")
    assert modeling.use_varlen_attention(fast)
    layout = Layout("packed", 64, 2, 8)
    mb = [[0, 1, 2], [3, 4]]
    batch = _tensors(add_fast_fields(collate(split, mb, layout, pad_id=0), varlen=True, head=False))
    with torch.no_grad():
        packed = fast(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                      cu_seq_lens_q=batch["cu_seqlens"], cu_seq_lens_k=batch["cu_seqlens"],
                      max_length_q=batch["max_seqlen"], max_length_k=batch["max_seqlen"],
                      use_cache=False).logits
        for b, row in enumerate(mb):
            pos = 0
            for i in row:
                ids = torch.as_tensor(split.ids(i).astype("int64"))[None]
                alone = plain(input_ids=ids, use_cache=False).logits[0]
                n = ids.shape[1]
                torch.testing.assert_close(packed[b, pos:pos + n], alone, atol=2e-5, rtol=1e-4)
                pos += n
    # Poisoned neighbours change nothing: a record's logits do not depend on the other records.
    noisy = batch["input_ids"].clone()
    noisy[0, 9:] = (noisy[0, 9:] + 7) % VOCAB
    with torch.no_grad():
        again = fast(input_ids=noisy, position_ids=batch["position_ids"], cu_seq_lens_q=batch["cu_seqlens"],
                     max_length_q=batch["max_seqlen"], use_cache=False).logits
    torch.testing.assert_close(again[0, :9], packed[0, :9], atol=1e-6, rtol=1e-6)


def test_fast_loss_equals_plain_loss_per_record() -> None:
    """forward_loss on the fast path (varlen + target-only head) = plain path (block mask,
    full logits), for the batch and for each record alone; gradients of the inputs agree too."""
    split = _split([30, 12, 7, 41, 19, 25], [10, 0, 3, 12, 5, 9], seed=3)
    layout = Layout("packed", 64, 2, 8)
    mb = [[0, 1, 2], [3, 4], [5]]
    plain = _tiny_phi("sdpa")
    fast = _tiny_phi("sdpa")
    modeling.use_varlen_attention(fast)
    for model in (plain, fast):  # frozen, as under LoRA: the head takes no gradient
        model.lm_head.requires_grad_(False)
    head = TargetHead.install(fast)
    assert head is not None and head.liger is None  # CPU: the unfused head
    batch_np = collate(split, mb, layout, pad_id=0)
    fast_batch = _tensors(add_fast_fields(batch_np, varlen=True, head=True))
    plain_batch = _tensors(batch_np)
    loss_fast = forward_loss(fast, fast_batch, "packed", modeling.VARLEN_ATTENTION, torch.float32, head)
    loss_plain = forward_loss(plain, plain_batch, "packed", "sdpa", torch.float32)
    torch.testing.assert_close(loss_fast, loss_plain, atol=1e-4, rtol=1e-5)
    loss_fast.backward()
    loss_plain.backward()
    fast_params = dict(fast.named_parameters())  # the lm_head is no longer a submodule
    for name, p_plain in plain.named_parameters():
        if p_plain.grad is not None:
            torch.testing.assert_close(fast_params[name].grad, p_plain.grad, atol=1e-4, rtol=1e-3,
                                       msg=name)
    # Per record: the packed batch's loss is the sum of each record's loss computed alone.
    per_record = []
    with torch.no_grad():
        for row in mb:
            for i in row:
                alone = _tensors(add_fast_fields(collate(split, [[i]], layout, pad_id=0), True, True))
                per_record.append(forward_loss(fast, alone, "packed", modeling.VARLEN_ATTENTION,
                                               torch.float32, head))
    torch.testing.assert_close(sum(per_record), loss_fast.detach(), atol=1e-4, rtol=1e-5)


def _losses(store: ArtifactStore, run: str) -> list[float]:
    rows = [json.loads(line) for line in store.read_text(f"runs/{run}/train/metrics.jsonl").splitlines()]
    return [r["loss"] for r in rows if r["loss"] is not None]


@pytest.mark.slow
def test_fast_path_loss_curve_matches_plain_path(tmp_path: Path, tiny_phi_dir: Path, cli_inproc,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """120 optimizer steps of the real train job, fast vs plain path, same data, order and seed.

    Tolerance: float32 on CPU, the two paths differ only in summation order (per-record sdpa
    vs one masked sdpa; gathered vs full-width logits), ~1e-7 relative per step; over 120
    Adam steps at lr 3e-3 that drift stays far below 1e-3 in per-step loss (losses ~3-7).
    We require a mean absolute difference under 2e-3 and every step within 1e-2.
    """
    steps = 120
    cfg = train_config(tmp_path / "cfg.yaml", max_steps=steps, padding="packed", pack_len_tokens=96,
                       micro_batch_size=2, eval_every_steps=60, save_every_steps=60, learning_rate=3e-3)
    store_uri = str(tmp_path / "store")
    curves = {}
    for run, flag in (("fast", "1"), ("plain", "0")):
        commit_prepare(store_uri, run, cfg, tiny_phi_dir, n_train=64, n_eval=8)
        monkeypatch.setenv(FAST_PATH_ENV, flag)
        rc, _out, err = cli_inproc("train", "--store", store_uri, "--run", run, "--config", cfg)
        assert rc == 0, err
        if flag == "1":
            assert modeling.VARLEN_ATTENTION in err  # the log line names the attention used
        curves[run] = _losses(ArtifactStore(store_uri), run)
    fast, plain = np.array(curves["fast"]), np.array(curves["plain"])
    assert len(fast) == len(plain) == steps
    diff = np.abs(fast - plain)
    assert diff.mean() < 2e-3 and diff.max() < 1e-2, (diff.mean(), diff.max())
    assert fast[-10:].mean() < fast[:10].mean() - 0.3  # and it learns
