"""One training step's pieces: host batches to the device, the fast-path extras, the loss.

The loss of a step is the sum of the token losses of all its micro-batches on all ranks divided
by their number of target tokens, which every rank knows in advance from the plan (see
medreason.packing); each rank backpropagates ``sum_of_its_token_losses * world_size /
step_targets`` and DDP's gradient averaging (a division by world_size) turns that into the exact
token-weighted mean. So one process with A*W accumulation slots and W processes with A slots
compute the same step.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from medreason.packing import block_causal_mask
from medreason.tokens import IGNORE_INDEX

log = logging.getLogger("medreason.training")


def step_seed(seed: int, step: int, slot: int) -> int:
    """The torch seed of one micro-batch slot of one step (dropout masks without RNG history)."""
    return (seed * 1_000_003 + step * 10_007 + slot) % (2**63 - 1)


def to_device(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    import torch

    out = {}
    for key, value in batch.items():
        if isinstance(value, np.ndarray):
            tensor = torch.from_numpy(value)
            if device.type == "cuda":
                # Pinned host memory lets the copy run asynchronously with compute.
                tensor = tensor.pin_memory().to(device, non_blocking=True)
            else:
                tensor = tensor.to(device)
            out[key] = tensor
        else:
            out[key] = value
    return out


FAST_PATH_ENV = "MEDREASON_FAST_PATH"


def fast_path_enabled(device_type: str) -> bool:
    """Whether packed rows use the varlen attention and the target-only loss head.

    On by default on CUDA, off on CPU (the block-mask path there is the reference the tests
    compare against). MEDREASON_FAST_PATH=0/1 forces it (benchmarks, parity tests)."""
    value = os.environ.get(FAST_PATH_ENV, "").strip().lower()
    if value in ("0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    return device_type == "cuda"


def add_fast_fields(batch: dict[str, Any], varlen: bool, head: bool) -> dict[str, Any]:
    """Host-side extras for the fast path, computed from a collated (numpy) batch.

    cu_seqlens: record starts over the flattened [B*L] tokens (every position 0 starts a
    record; a padding tail counts as one more record, which nothing attends into), int32 as
    the varlen kernel wants. target_index / target_ids: the flat positions that carry a
    target and their labels, so the LM head runs only there (prompt and padding positions,
    ~30% of a MedReason row, never become 51,200-wide logits). Computed here, not on the
    device, so the step needs no host sync (a boolean mask on the GPU would need one).
    """
    out = dict(batch)
    if varlen:
        flat_pos = batch["position_ids"].reshape(-1)
        starts = np.flatnonzero(flat_pos == 0)
        out["cu_seqlens"] = np.append(starts, flat_pos.size).astype(np.int32)
        out["max_seqlen"] = int(batch["position_ids"].shape[1])
    if head:
        flat = batch["targets"].reshape(-1)
        index = np.flatnonzero(flat != IGNORE_INDEX)
        out["target_index"] = index.astype(np.int64)
        out["target_ids"] = flat[index].astype(np.int64)
    return out


class TargetHead:
    """The LM head and cross-entropy, applied to the target positions only.

    The model's own lm_head is swapped for an identity (install()), so the model returns
    final hidden states [B, L, 2560] instead of logits [B, L, 51200] (for 4x2048 rows that is
    the difference between 84 MB and 1.7 GB of bf16, 3.4 GB once upcast to float32). With
    liger_kernel on CUDA the head+loss is its fused linear cross-entropy, which never holds
    more than a chunk of logits; otherwise it is F.linear + F.cross_entropy on the targets.
    """

    def __init__(self, linear: Any, use_liger: bool):
        self.weight = linear.weight
        self.bias = linear.bias
        self.liger: Any = None
        if use_liger:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            self.liger = LigerFusedLinearCrossEntropyLoss(reduction="sum")

    @classmethod
    def install(cls, model: Any) -> TargetHead | None:
        """Replace the base model's output Linear by an identity; None when it has none."""
        import torch.nn as nn

        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        getter = getattr(base, "get_output_embeddings", None)
        linear = getter() if getter else None
        if not isinstance(linear, nn.Linear) or linear.weight.requires_grad:
            return None
        use_liger = False
        if linear.weight.is_cuda:
            try:
                import liger_kernel  # noqa: F401

                use_liger = True
            except ImportError:
                log.info("liger_kernel not installed: LM head + loss on target positions, unfused")
        head = cls(linear, use_liger)
        base.set_output_embeddings(nn.Identity())
        return head

    def __call__(self, hidden: Any, batch: dict[str, Any]) -> Any:
        import torch.nn.functional as F

        h = hidden.flatten(0, 1).index_select(0, batch["target_index"])
        targets = batch["target_ids"]
        if h.shape[0] == 0:
            return hidden.sum() * 0.0
        if self.liger is not None:
            return self.liger(self.weight, h, targets, self.bias)
        logits = F.linear(h, self.weight, self.bias)
        return F.cross_entropy(logits.float(), targets, reduction="sum")


def forward_loss(model: Any, batch: dict[str, Any], mode: str, attn_impl: str, dtype: Any,
                 head: TargetHead | None = None) -> Any:
    """Summed cross-entropy over the batch's targets (a 0-d tensor; no host sync)."""
    import torch.nn.functional as F

    from medreason.modeling import VARLEN_ATTENTION

    kwargs: dict[str, Any] = {"input_ids": batch["input_ids"], "use_cache": False}
    if mode == "packed":
        kwargs["position_ids"] = batch["position_ids"]
        if attn_impl == VARLEN_ATTENTION:
            # Record boundaries for the varlen kernel; transformers passes these keywords
            # through to every attention call. max_length is the row length (an upper bound
            # the kernel only uses to size its grid), constant, so no recompilation.
            kwargs["cu_seq_lens_q"] = kwargs["cu_seq_lens_k"] = batch["cu_seqlens"]
            kwargs["max_length_q"] = kwargs["max_length_k"] = batch["max_seqlen"]
        elif attn_impl != "flash_attention_2":
            kwargs["attention_mask"] = block_causal_mask(batch["segment_ids"], attn_impl, dtype)
        # flash_attention_2 finds the record boundaries from position_ids (varlen kernel).
    else:
        kwargs["attention_mask"] = batch["attention_mask"]
    out = model(**kwargs).logits
    if head is not None:
        return head(out, batch)
    return F.cross_entropy(out.float().flatten(0, 1), batch["targets"].flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")
