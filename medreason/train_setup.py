"""Setting up a training run: each function returns what it builds (data, model, optimizer).

Also the one place that says, at the start of a run, which attention path, loss kernel and
compile mode the steps will use, and why packed rows fell back from the fast path when they did.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any

from medreason.config import Config, ModelConfig
from medreason.errors import InputError
from medreason.packing import Layout, MicroBatch, collate, epoch_plan, steps_in_epoch
from medreason.store import ArtifactStore
from medreason.tokens import TokenizedSplit, load_split
from medreason.train_step import FAST_PATH_ENV, TargetHead, add_fast_fields, fast_path_enabled

log = logging.getLogger("medreason.training")

# Set to 1: keep model.dtype (e.g. bfloat16) without CUDA instead of forcing float32. For tests
# and CPU checks of what a GPU run does with a bf16 base and float32 adapters (FSDP); slow.
CPU_KEEP_DTYPE_ENV = "MEDREASON_CPU_KEEP_DTYPE"


def make_accelerator() -> Any:
    """The Accelerator for this process (its settings come from `accelerate launch`).

    Several processes without CUDA (``accelerate launch --multi_gpu --num_processes 2`` or
    ``torchrun`` on a CPU machine) become a gloo process group: accelerate only does that when
    told the run is on CPU, and its own ``--cpu`` flag launches a single process unless mpirun
    is set up, so we say it here.
    """
    import torch
    from accelerate import Accelerator

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    cpu = world > 1 and not torch.cuda.is_available()
    if not cpu:
        return Accelerator()
    acc = Accelerator(cpu=True)
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        _shard_on_cpu(acc)
    return acc


def _shard_on_cpu(acc: Any) -> None:
    """Turn a CPU (gloo) Accelerator into an FSDP one (accelerate_configs/cpu_fsdp.yaml).

    accelerate only selects FSDP on a GPU-type backend: with cpu=True it builds the FSDP plugin
    from the launcher's settings and then runs plain data parallel. torch's FSDP shards over gloo
    on CPU, so we put the plugin in charge; prepare() then shards the model the way it does on
    GPUs, which lets CPU tests run the FSDP code paths (sharding, state-dict gathering, resume).
    """
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = getattr(acc.state, "fsdp_plugin", None) or FullyShardedDataParallelPlugin()
    acc.state.fsdp_plugin = plugin
    acc.state.distributed_type = DistributedType.FSDP


def is_fsdp(acc: Any) -> bool:
    from accelerate.utils import DistributedType

    return acc.distributed_type == DistributedType.FSDP


def check_fsdp(cfg: Config, acc: Any) -> None:
    """Refuse (exit 2, before the model loads) the FSDP runs that cannot work here."""
    if not is_fsdp(acc):
        return
    if cfg.model.quantization != "none":
        # bitsandbytes' int8/NF4 weights are not shardable DTensors unless stored as bf16
        # (bnb_4bit_quant_storage), a setup this project does not run; QLoRA's base is small
        # enough for every GPU to hold it, which is what DDP does.
        raise InputError(f"model.quantization={cfg.model.quantization} (QLoRA) is not supported with FSDP; "
                         "run QLoRA with DDP: accelerate launch --config_file accelerate_configs/multi_gpu.yaml")
    if not acc.is_fsdp2:
        # FSDP1 flattens a unit's parameters into one tensor of one dtype, and PEFT keeps the
        # adapters in float32 on a bf16 base ("Must flatten tensors with uniform dtype").
        raise InputError("FSDP needs fsdp_version: 2 in the accelerate config (FSDP1 cannot hold "
                         "float32 LoRA weights on a bf16 base); use accelerate_configs/fsdp.yaml")


def resolve_model_dir(store: ArtifactStore, model_cfg: ModelConfig) -> str:
    """A verified local folder holding the staged base model."""
    from medreason import staging

    return staging.local_model_dir(store, model_cfg)


def make_layout(cfg: Config) -> Layout:
    mode = cfg.train.padding
    if mode == "packed":
        # Packed rows: rounding to 64 limits the number of distinct shapes torch.compile sees.
        return Layout("packed", cfg.train.pack_len_tokens, cfg.train.micro_batch_size, 64)
    return Layout(mode, cfg.data.max_len_tokens, cfg.train.micro_batch_size, 8)


# -- data -------------------------------------------------------------------------------------------
@dataclass
class TrainData:
    """The tokenized splits and the step arithmetic derived from them."""

    train_split: TokenizedSplit
    eval_split: TokenizedSplit | None
    layout: Layout
    steps_per_epoch: int
    total_steps: int
    eval_plan: list[MicroBatch]


def _read_splits(store: ArtifactStore, run_id: str, acc: Any) -> tuple[TokenizedSplit, TokenizedSplit | None]:
    with acc.local_main_process_first():
        prep_dir = store.materialize(store.stage_rel(run_id, "prepare"))
    train_split = load_split(os.path.join(prep_dir, "train.tokens.safetensors"))
    eval_path = os.path.join(prep_dir, "eval.tokens.safetensors")
    eval_split = load_split(eval_path) if os.path.exists(eval_path) else None
    if len(train_split) == 0:
        raise InputError(f"the prepare stage of run {run_id!r} has no training records")
    if eval_split is not None and len(eval_split) == 0:
        eval_split = None
    return train_split, eval_split


def load_data(cfg: Config, store: ArtifactStore, run_id: str, acc: Any) -> TrainData:
    train_split, eval_split = _read_splits(store, run_id, acc)
    tc, world = cfg.train, acc.num_processes
    layout = make_layout(cfg)
    plan0 = epoch_plan(train_split.lengths, layout, tc.seed, 0)
    steps_per_epoch = steps_in_epoch(len(plan0), tc.grad_accum_steps, world)
    if steps_per_epoch == 0:
        raise InputError(
            f"train.micro_batch_size x train.grad_accum_steps x processes = "
            f"{tc.micro_batch_size} x {tc.grad_accum_steps} x {world} rows per step, but the "
            f"training split gives only {len(plan0)} micro-batches; lower them or add data"
        )
    skipped = len(plan0) - steps_per_epoch * tc.grad_accum_steps * world
    total_steps = tc.max_steps or max(1, math.ceil(tc.num_epochs * steps_per_epoch))
    eval_plan: list[MicroBatch] = []
    if eval_split is not None:
        eval_plan = epoch_plan(eval_split.lengths, layout, tc.seed, 0, shuffle=False)
        if tc.eval_max_batches:
            eval_plan = eval_plan[: tc.eval_max_batches]
    log.info("data: %d train / %d eval records, %s rows of <= %d tokens, %d steps per epoch "
             "(%d micro-batches x %d accumulation x %d processes per step; %d left over per "
             "epoch), %d steps in all", len(train_split), len(eval_split) if eval_split is not None else 0,
             layout.mode, layout.row_len_tokens, steps_per_epoch, tc.micro_batch_size,
             tc.grad_accum_steps, world, skipped, total_steps)
    return TrainData(train_split, eval_split, layout, steps_per_epoch, total_steps, eval_plan)


# -- model, optimizer, scheduler ------------------------------------------------------------------
@dataclass
class TrainModel:
    """The wrapped model and what steps it: optimizer, scheduler, loss head, attention path."""

    model: Any
    optimizer: Any
    scheduler: Any
    head: TargetHead | None
    attn_impl: str
    dtype: Any
    pad_id: int
    n_base_params: int
    fsdp: bool
    compile_mode: str = "off"

    @property
    def inner_optimizer(self) -> Any:
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def collate(self, split: TokenizedSplit, mb: MicroBatch, layout: Layout) -> dict[str, Any]:
        from medreason.modeling import VARLEN_ATTENTION

        batch = collate(split, mb, layout, self.pad_id)
        return add_fast_fields(batch, self.attn_impl == VARLEN_ATTENTION, self.head is not None)


def _pad_id(config: Any) -> int:
    pad = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
    return int(pad[0] if isinstance(pad, (list, tuple)) else (pad if pad is not None else 0))


def _load_peft_model(cfg: Config, store: ArtifactStore, acc: Any, layout: Layout, dtype: Any,
                     fast: bool) -> tuple[Any, str, int, int]:
    """(PEFT model on the host, attention implementation, pad id, frozen parameter count)."""
    import torch

    from medreason import lora_compute, modeling

    mc, tc = cfg.model, cfg.train
    with acc.local_main_process_first():
        model_dir = resolve_model_dir(store, mc)
    started = time.monotonic()
    # LoRA's A matrices are initialised from torch's RNG: seed it so a fresh run is repeatable.
    torch.manual_seed(tc.seed)
    base = modeling.load_base_model(model_dir, mc, dtype, acc.local_process_index, tc.gradient_checkpointing)
    if fast and layout.mode == "packed" and not is_fsdp(acc) and mc.attn_implementation in (None, "sdpa"):
        # In the compiled layer graphs only when they are compiled (CUDA): otherwise the
        # graph-break form is the same eager code as before train.attention_in_graph existed.
        in_graph = tc.compile and tc.attention_in_graph and acc.device.type == "cuda"
        modeling.use_varlen_attention(base, in_graph=in_graph)
    attn_impl = getattr(base.config, "_attn_implementation", None) or "eager"
    targets = modeling.resolve_target_modules(base, cfg.lora.target_modules)
    model = modeling.apply_lora(base, cfg.lora, targets)
    # Before any wrapping (FSDP, compile): the module classes it swaps are captured by them.
    lora_compute.apply_lora_compute_dtype(model, tc.lora_compute_dtype)
    if tc.lora_fused:
        from medreason.lora_fused import fuse_lora

        fused, shared = fuse_lora(model)
        log.info("LoRA: %d adapted layer(s) on the fused forward, %d decoder layer(s) sharing one A product "
                 "(train.lora_fused)", fused, shared)
    from medreason.residual_dropout import ENV, fuse_residual_dropout

    if swapped := fuse_residual_dropout(model):
        log.info("residual dropout: %d decoder layer(s) sum dropout(attention) + dropout(MLP) + residual "
                 "in one kernel (%s=0 keeps transformers' layer)", swapped, ENV)
    trainable, total = modeling.count_parameters(model)
    log.info("model: %s (%s, attention %s), LoRA r=%d on %s: %s trainable of %s parameters (%.3f%%), "
             "loaded in %.1f s", type(base).__name__, str(dtype).replace("torch.", ""), attn_impl,
             cfg.lora.r, ",".join(targets), f"{trainable:,}", f"{total:,}", 100.0 * trainable / max(total, 1),
             time.monotonic() - started)
    return model, attn_impl, _pad_id(base.config), total - trainable


def _make_optimizer(cfg: Config, model: Any, device_type: str) -> Any:
    import torch

    tc = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    if tc.optimizer == "paged_adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=tc.learning_rate, weight_decay=tc.weight_decay)
    extra = {"fused": True} if device_type == "cuda" else {}
    return torch.optim.AdamW(params, lr=tc.learning_rate, weight_decay=tc.weight_decay, **extra)


def _compile(model: Any, enabled: bool, device_type: str) -> tuple[Any, str]:
    """(the model to step, the compile mode in words)."""
    import torch

    from medreason import modeling

    if not enabled:
        return model, "off"
    if device_type != "cuda":
        return model, "off (train.compile is ignored without CUDA)"
    layers = modeling.compile_decoder_layers(model)
    if layers:
        return model, f"regional ({layers} decoder layers)"
    return torch.compile(model), "whole model"


def _set_precision(cfg: Config, device_type: str) -> Any:
    import torch

    from medreason import modeling

    modeling.check_quantization(cfg.model, device_type)
    if device_type == "cuda" and cfg.train.tf32:
        # With train.lora_compute_dtype=float32 the adapter products on a bf16 base are float32:
        # without TF32 they run as SIMT float32 GEMMs (a large share of a bf16 step's GPU time,
        # see bench/RESULTS.md).
        # TF32 keeps float32 storage and a 10-bit mantissa in the product, more than bf16's 7.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if device_type != "cuda" and os.environ.get(CPU_KEEP_DTYPE_ENV, "").strip() == "1":
        log.info("%s=1: training in model.dtype=%s without CUDA", CPU_KEEP_DTYPE_ENV, cfg.model.dtype)
        # The mapping of a CUDA run: the point is to run the GPU's dtypes on this device.
        return modeling.compute_dtype(cfg.model, "cuda")
    return modeling.compute_dtype(cfg.model, device_type)


def build_model(cfg: Config, store: ArtifactStore, acc: Any, data: TrainData,
                resume: Any | None = None) -> TrainModel:
    """Base model + LoRA (+ the resumed adapter), placed and wrapped, with optimizer and schedule.

    ``resume`` is a checkpointing.ResumePoint whose adapter is loaded before wrapping.
    """
    from transformers import get_scheduler

    from medreason.checkpointing import load_adapter

    mc, tc, device = cfg.model, cfg.train, acc.device
    fsdp = is_fsdp(acc)
    dtype = _set_precision(cfg, device.type)
    fast = fast_path_enabled(device.type)
    model, attn_impl, pad_id, n_base = _load_peft_model(cfg, store, acc, data.layout, dtype, fast)
    if resume is not None:
        load_adapter(model, resume)
    if mc.quantization == "none" and not fsdp:
        # Under FSDP, prepare() shards the model and fully_shard moves each rank's shards
        # to its device: the whole model never has to fit on one GPU.
        model.to(device)
    # Only without FSDP: FSDP2's sharded (DTensor) lm_head weight is whole only inside forward.
    head = TargetHead.install(model) if fast and not fsdp else None
    wrapped, optimizer = acc.prepare(model, _make_optimizer(cfg, model, device.type))
    # Not passed through accelerator.prepare: its scheduler wrapper steps once per process
    # per call, which would run the schedule world_size times too fast.
    scheduler = get_scheduler(tc.lr_scheduler, getattr(optimizer, "optimizer", optimizer),
                              num_warmup_steps=tc.warmup_steps, num_training_steps=data.total_steps)
    wrapped, compile_mode = _compile(wrapped, tc.compile, device.type)
    return TrainModel(wrapped, optimizer, scheduler, head, attn_impl, dtype, pad_id, n_base, fsdp, compile_mode)


# -- what the steps will run -----------------------------------------------------------------------
def attention_path(tm: TrainModel, layout: Layout, device_type: str) -> str:
    from medreason import modeling

    if layout.mode != "packed":
        return f"{tm.attn_impl} with a padding mask ({layout.mode} rows)"
    if tm.attn_impl == modeling.VARLEN_ATTENTION:
        if device_type == "cuda" and modeling._varlen_kernel() is not None:
            path = "varlen (FlashAttention-2 varlen kernel over packed records)"
        else:
            path = "varlen reference (causal sdpa one record at a time)"
        if tm.compile_mode.startswith(("regional", "whole")):
            where = ("inside the compiled graphs" if modeling.varlen_attention_in_graph()
                     else "a graph break, train.attention_in_graph=false")
            path = f"{path}, {where}"
        return path
    if tm.attn_impl == "flash_attention_2":
        return "flash_attention_2 (record boundaries from position_ids)"
    return f"{tm.attn_impl} with a block-causal mask over packed rows"


def loss_path(tm: TrainModel) -> str:
    if tm.head is None:
        return "full logits + cross-entropy"
    if tm.head.liger is not None:
        return "liger fused linear cross-entropy on target positions"
    return "target-only LM head + cross-entropy"


def packed_fallback_reason(cfg: Config, tm: TrainModel, device_type: str) -> str | None:
    """Why packed rows do not get the varlen kernel on this run, or None when they do."""
    from medreason import modeling

    forced = os.environ.get(FAST_PATH_ENV, "").strip()
    if cfg.train.padding != "packed":
        return None
    if tm.attn_impl == modeling.VARLEN_ATTENTION:
        if modeling._varlen_kernel() is None:
            return "this torch has no torch.nn.attention.varlen (needs torch >= 2.9)"
        return None if device_type == "cuda" else f"{FAST_PATH_ENV}={forced} forces the fast path without CUDA"
    if device_type != "cuda" and not fast_path_enabled(device_type):
        return f"there is no CUDA device (the fast path is on only on CUDA; {FAST_PATH_ENV}=1 forces it)"
    if not fast_path_enabled(device_type):
        return f"{FAST_PATH_ENV}={forced} turns the fast path off"
    if tm.fsdp:
        return "FSDP runs keep the model's own attention"
    if tm.attn_impl == "flash_attention_2":
        return None
    return f"model.attn_implementation={cfg.model.attn_implementation} (or the model) does not take it"


def log_paths(cfg: Config, tm: TrainModel, layout: Layout, device_type: str) -> None:
    """One line naming the attention path, loss kernel, compile mode and LoRA product dtype; one
    warning on a fallback."""
    from medreason import lora_compute

    attention = attention_path(tm, layout, device_type)
    log.info("training paths: attention %s; loss %s; compile %s; LoRA products %s (train.lora_compute_dtype=%s)",
             attention, loss_path(tm), tm.compile_mode, lora_compute.describe(tm.model, tm.dtype),
             cfg.train.lora_compute_dtype)
    reason = packed_fallback_reason(cfg, tm, device_type)
    if reason is not None:
        log.warning("train.padding=packed: the varlen attention kernel is not used because %s; "
                    "falling back to %s (same results, slower)", reason, attention)
