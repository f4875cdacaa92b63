"""The training loop: plain PyTorch + accelerate, checkpoints in the store, exact resume,
preemption by signal.

One optimizer step = ``grad_accum_steps`` micro-batches on each of ``world_size`` ranks
(see medreason.packing for which rows those are). The loss of a step is the sum of the token
losses of all its micro-batches on all ranks divided by their number of target tokens, which
every rank knows in advance from the plan; each rank backpropagates
``sum_of_its_token_losses * world_size / step_targets`` and DDP's gradient averaging (a
division by world_size) turns that into the exact token-weighted mean. So one process with
A*W accumulation slots and W processes with A slots compute the same step.

Exact resume: the data order is a function of (seed, epoch); the position in it is a function
of the step (epoch, index = divmod(step, steps_per_epoch)); torch's RNG (LoRA dropout) is
re-seeded from (seed, step, rank) at every step; adapter, optimizer, scheduler and RNG states
are restored bit for bit. On CPU with a fixed seed a resumed run reproduces the uninterrupted
one exactly.

Store layout written here (rank 0 only; the other ranks wait)::

    runs/<id>/train/checkpoints/step-<N>/   adapter_model.safetensors adapter_config.json
                                            optimizer.pt scheduler.pt rng.pt trainer_state.json
                                            metrics.jsonl [tensorboard/] MANIFEST.json
    runs/<id>/train/adapter/                the final PEFT adapter
    runs/<id>/train/metrics.jsonl           one JSON object per logged step
    runs/<id>/train/MANIFEST.json           the stage commit (metrics: best_step, ...)

Checkpoint retention: the newest ``train.keep_last_checkpoints`` plus the best one (lowest
eval loss among checkpointed steps) are kept, because ``eval.checkpoint: best`` reads it. An
older checkpoint is only deleted after a newer one is committed, so the one a run resumed from
survives until it is superseded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from medreason.config import Config, ModelConfig
from medreason.errors import InputError, Preempted
from medreason.packing import (
    Layout,
    MicroBatch,
    block_causal_mask,
    collate,
    epoch_plan,
    step_counts,
    step_micro_batches,
    steps_in_epoch,
)
from medreason.profiling import PROFILE_ENV, StepProfiler
from medreason.store import ArtifactStore, build_manifest, manifest_hash, model_cache_name
from medreason.tokens import IGNORE_INDEX, TokenizedSplit, load_split

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
STEP_PREFIX = "step-"
PREEMPT_SIGNALS = ("SIGTERM", "SIGUSR1")
# Test hook: seconds to sleep after every optimizer step, so tests can signal or kill a run at
# a chosen point of a model that otherwise trains a step in milliseconds. Never set in production.
STEP_DELAY_ENV = "MEDREASON_TEST_STEP_DELAY_S"
# Peak dense bf16 matmul throughput per GPU, for MFU. H100/H200: ~800 TFLOP/s measured with
# large bf16 GEMMs (the 989 TFLOP/s datasheet figure is not reached in practice); A100: the
# 312 TFLOP/s datasheet figure. Other GPUs: set MEDREASON_PEAK_TFLOPS. CPUs: no MFU.
PEAK_FLOPS = {"H100": 800e12, "H200": 800e12, "GH200": 800e12, "A100": 312e12}
PEAK_TFLOPS_ENV = "MEDREASON_PEAK_TFLOPS"
# Every metrics.jsonl line has these keys (None where a value does not apply to that line).
METRIC_KEYS = ("step", "epoch", "loss", "eval_loss", "lr", "grad_norm", "tokens_per_s", "mfu",
               "peak_mem_gib")


# -- preemption -----------------------------------------------------------------------------------
class StopFlag:
    """SIGTERM/SIGUSR1 set a flag; the loop checks it at step boundaries.

    The handler does nothing else, so a second signal (e.g. during the checkpoint upload) only
    sets the flag again and cannot interrupt a half-written file; the checkpoint's manifest is
    written last anyway.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._saved: dict[int, Any] = {}

    def _handler(self, signum: int, _frame: Any) -> None:
        self.signum = signum

    @property
    def is_set(self) -> bool:
        return self.signum is not None

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopFlag]:
        for name in PREEMPT_SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                try:
                    self._saved[sig] = signal.signal(sig, self._handler)
                except ValueError:  # not the main thread: leave signals alone
                    pass
        try:
            yield self
        finally:
            for sig, old in self._saved.items():
                signal.signal(sig, old)
            self._saved.clear()


# -- state ------------------------------------------------------------------------------------------
@dataclass
class TrainerState:
    """What a checkpoint records besides tensors (trainer_state.json)."""

    step: int = 0
    epoch: int = 0
    index_in_epoch: int = 0
    steps_per_epoch: int = 0
    total_steps: int = 0
    world_size: int = 1
    grad_accum_steps: int = 1
    micro_batch_size: int = 1
    seed: int = 0
    config_hash: str = ""
    tokens_seen: int = 0
    best_step: int | None = None
    best_eval_loss: float | None = None
    best_checkpoint: str | None = None
    checkpoint_eval: dict[str, float] = field(default_factory=dict)  # checkpoint name -> eval loss
    last_loss: float | None = None
    last_eval_loss: float | None = None
    resumed_from: str | None = None


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
    return Accelerator(cpu=cpu) if cpu else Accelerator()


def resolve_model_dir(store: ArtifactStore, model_cfg: ModelConfig) -> str:
    """A verified local folder holding the staged base model."""
    try:
        from medreason import staging
    except ImportError:
        staging = None  # type: ignore[assignment]
    if staging is not None and hasattr(staging, "local_model_dir"):
        return staging.local_model_dir(store, model_cfg)
    rel = f"cache/models/{model_cache_name(model_cfg.name_or_path, model_cfg.revision)}"
    if not store.is_committed(rel):
        raise InputError("base model not staged: run `medreason prepare` first")
    return store.materialize(rel)


def make_layout(cfg: Config, train: bool = True) -> Layout:
    mode = cfg.train.padding
    if mode == "packed":
        # Packed rows: rounding to 64 limits the number of distinct shapes torch.compile sees.
        return Layout("packed", cfg.train.pack_len_tokens, cfg.train.micro_batch_size, 64)
    return Layout(mode, cfg.data.max_len_tokens, cfg.train.micro_batch_size, 8)


def _step_seed(seed: int, step: int, slot: int) -> int:
    return (seed * 1_000_003 + step * 10_007 + slot) % (2**63 - 1)


def _peak_flops(device: Any) -> float | None:
    import torch

    if os.environ.get(PEAK_TFLOPS_ENV):
        return float(os.environ[PEAK_TFLOPS_ENV]) * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_FLOPS.items():
        if key in name:
            return value
    return None


# -- RNG states as plain tensors (torch.load(weights_only=True) can read them) --------------------
def capture_rng() -> dict[str, Any]:
    import torch

    version, py_state, gauss = random.getstate()
    np_state = np.random.get_state()
    return {
        "python_version": int(version),
        "python_state": torch.tensor(py_state, dtype=torch.int64),
        "python_gauss": gauss,
        "numpy_keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_has_gauss": int(np_state[3]),
        "numpy_cached_gaussian": float(np_state[4]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict[str, Any]) -> None:
    import torch

    random.setstate((state["python_version"], tuple(int(x) for x in state["python_state"].tolist()),
                     state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- checkpoints in the store ---------------------------------------------------------------------
def checkpoint_step(name: str) -> int:
    return int(name[len(STEP_PREFIX):])


def committed_checkpoints(store: ArtifactStore, ckpt_rel: str) -> list[str]:
    """Committed checkpoint folder names, oldest first (numeric order: step-100 after step-25)."""
    names = [n for n in store.list_committed(ckpt_rel, STEP_PREFIX) if n[len(STEP_PREFIX):].isdigit()]
    return sorted(names, key=checkpoint_step)


def prune_checkpoints(store: ArtifactStore, ckpt_rel: str, keep_last: int, protect: set[str]) -> list[str]:
    """Delete committed checkpoints beyond the newest ``keep_last`` (except ``protect``) and
    uncommitted leftovers (killed uploads) older than the newest committed one."""
    committed = committed_checkpoints(store, ckpt_rel)
    if not committed:
        return []
    keep = set(committed[-keep_last:]) | protect
    removed = []
    for name in committed:
        if name not in keep:
            store.uncommit(f"{ckpt_rel}/{name}")
            removed.append(name)
    newest = checkpoint_step(committed[-1])
    committed_set = set(committed)
    for name in store.listdir(ckpt_rel):
        if (name.startswith(STEP_PREFIX) and name[len(STEP_PREFIX):].isdigit()
                and name not in committed_set and checkpoint_step(name) < newest):
            store.remove(f"{ckpt_rel}/{name}")
            removed.append(name)
    if removed:
        log.info("removed old checkpoints: %s", ", ".join(removed))
    return removed


def find_resume_point(store: ArtifactStore, ckpt_rel: str, config_hash: str, inputs: dict[str, str],
                      force: bool) -> tuple[str | None, bool]:
    """(newest usable checkpoint name or None, whether old checkpoints must be wiped)."""
    committed = committed_checkpoints(store, ckpt_rel)
    if not committed:
        return None, False
    newest = committed[-1]
    manifest = store.read_manifest(f"{ckpt_rel}/{newest}") or {}
    problems = []
    if manifest.get("config_hash") != config_hash:
        problems.append("a different config (model/data/lora/train sections)")
    if manifest.get("inputs", {}) != dict(sorted(inputs.items())):
        problems.append("a different prepare stage")
    if not problems:
        return newest, False
    if force:
        log.warning("checkpoint %s was made with %s; --force: starting fresh and removing the "
                    "old checkpoints", newest, " and ".join(problems))
        return None, True
    raise InputError(
        f"checkpoint {store.display(f'{ckpt_rel}/{newest}')} was made with {' and '.join(problems)} "
        "than this run; pass --force to start over (removes the old checkpoints), or use a new --run id"
    )


# -- the step -----------------------------------------------------------------------------------
def _to_device(batch: dict[str, Any], device: Any) -> dict[str, Any]:
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


class Trainer:
    """Holds the state of one training run; ``run()`` does the work."""

    def __init__(self, cfg: Config, store: ArtifactStore, run_id: str, prepare_manifest: dict[str, Any],
                 force: bool, accelerator: Any):
        self.cfg = cfg
        self.store = store
        self.run_id = run_id
        self.force = force
        self.acc = accelerator
        self.rank = accelerator.process_index
        self.world = accelerator.num_processes
        self.is_main = accelerator.is_main_process
        self.train_rel = store.stage_rel(run_id, "train")
        self.prepare_rel = store.stage_rel(run_id, "prepare")
        self.ckpt_rel = f"{self.train_rel}/{CHECKPOINTS}"
        self.config_hash = cfg.stage_hash("train")
        self.inputs = {"prepare": manifest_hash(prepare_manifest)}
        self.metrics: list[dict[str, Any]] = []
        self.state = TrainerState()
        self.tb_dir: str | None = None
        self.writer: Any = None
        self.last_saved_step = -1
        self.timings: dict[str, float] = {}
        self.head: TargetHead | None = None
        self.attn_impl = "eager"
        # Parsed here so a malformed MEDREASON_PROFILE fails before the model is loaded.
        self.profiler = StepProfiler(os.environ.get(PROFILE_ENV), self.is_main)

    # -- set-up -------------------------------------------------------------------------------
    def _load_data(self) -> None:
        with self.acc.local_main_process_first():
            prep_dir = self.store.materialize(self.prepare_rel)
        self.train_split = load_split(os.path.join(prep_dir, "train.tokens.safetensors"))
        eval_path = os.path.join(prep_dir, "eval.tokens.safetensors")
        self.eval_split: TokenizedSplit | None = load_split(eval_path) if os.path.exists(eval_path) else None
        if len(self.train_split) == 0:
            raise InputError(f"the prepare stage of run {self.run_id!r} has no training records")
        if self.eval_split is not None and len(self.eval_split) == 0:
            self.eval_split = None
        tc = self.cfg.train
        self.layout = make_layout(self.cfg)
        self.lengths = self.train_split.lengths
        plan0 = epoch_plan(self.lengths, self.layout, tc.seed, 0)
        self.steps_per_epoch = steps_in_epoch(len(plan0), tc.grad_accum_steps, self.world)
        per_step = tc.grad_accum_steps * self.world
        if self.steps_per_epoch == 0:
            raise InputError(
                f"train.micro_batch_size x train.grad_accum_steps x processes = "
                f"{tc.micro_batch_size} x {tc.grad_accum_steps} x {self.world} rows per step, but the "
                f"training split gives only {len(plan0)} micro-batches; lower them or add data"
            )
        skipped = len(plan0) - self.steps_per_epoch * per_step
        self.total_steps = tc.max_steps or max(1, math.ceil(tc.num_epochs * self.steps_per_epoch))
        self.eval_plan: list[MicroBatch] = []
        if self.eval_split is not None:
            self.eval_plan = epoch_plan(self.eval_split.lengths, self.layout, tc.seed, 0, shuffle=False)
            if tc.eval_max_batches:
                self.eval_plan = self.eval_plan[: tc.eval_max_batches]
        log.info("data: %d train / %d eval records, %s rows of <= %d tokens, %d steps per epoch "
                 "(%d micro-batches x %d accumulation x %d processes per step; %d left over per "
                 "epoch), %d steps in all", len(self.train_split),
                 len(self.eval_split) if self.eval_split is not None else 0, self.layout.mode,
                 self.layout.row_len_tokens, self.steps_per_epoch, tc.micro_batch_size,
                 tc.grad_accum_steps, self.world, skipped, self.total_steps)

    def _decide_start(self) -> None:
        """Resume from the newest checkpoint, or start fresh (removing stale state with --force)."""
        # --force on a committed stage redoes it from scratch; otherwise --force only matters
        # when the newest checkpoint belongs to another config (a requeued job that carries
        # --force in its command line still resumes its own checkpoints).
        wipe_all = self.force and self.store.is_committed(self.train_rel)
        resume, wipe_ckpts = (None, False) if wipe_all else find_resume_point(
            self.store, self.ckpt_rel, self.config_hash, self.inputs, self.force)
        self.acc.wait_for_everyone()  # every rank has read the listing before rank 0 changes it
        if self.is_main and (wipe_all or wipe_ckpts):
            if wipe_all:
                log.warning("--force: removing the committed train stage and its checkpoints at %s",
                            self.store.display(self.train_rel))
                self.store.uncommit(self.train_rel)
            else:
                self.store.remove(self.ckpt_rel)
        self.acc.wait_for_everyone()
        self.resume_from = resume

    def _build_model(self) -> None:
        import torch

        from medreason import modeling

        mc, tc = self.cfg.model, self.cfg.train
        device = self.acc.device
        modeling.check_quantization(mc, device.type)
        if mc.quantization != "none" and self._is_fsdp():
            raise InputError(f"model.quantization={mc.quantization} cannot be sharded with FSDP here "
                             "(bitsandbytes weights); use accelerate_configs/multi_gpu.yaml (DDP)")
        self.dtype = modeling.compute_dtype(mc, device.type)
        if device.type == "cuda" and tc.tf32:
            # PEFT keeps the adapters in float32 on a bf16 base: without TF32 their products run
            # as SIMT float32 GEMMs, a third of a phi2-bf16 step's GPU time on an H200 (profile
            # in bench/RESULTS.md). TF32 keeps float32 storage and a 10-bit mantissa in the
            # product, more than bf16's 7.
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        with self.acc.local_main_process_first():
            model_dir = resolve_model_dir(self.store, mc)
        started = time.monotonic()
        # LoRA's A matrices are initialised from torch's RNG: seed it so a fresh run is repeatable.
        torch.manual_seed(tc.seed)
        base = modeling.load_base_model(model_dir, mc, self.dtype, self.acc.local_process_index,
                                        tc.gradient_checkpointing)
        fast = fast_path_enabled(device.type)
        if (fast and self.layout.mode == "packed" and not self._is_fsdp()
                and mc.attn_implementation in (None, "sdpa")):
            modeling.use_varlen_attention(base)
        self.attn_impl = getattr(base.config, "_attn_implementation", None) or "eager"
        pad = base.config.pad_token_id if base.config.pad_token_id is not None else base.config.eos_token_id
        self.pad_id = int(pad[0] if isinstance(pad, (list, tuple)) else (pad if pad is not None else 0))
        targets = modeling.resolve_target_modules(base, self.cfg.lora.target_modules)
        model = modeling.apply_lora(base, self.cfg.lora, targets)
        trainable, total = modeling.count_parameters(model)
        self.n_base_params = total - trainable
        log.info("model: %s (%s, attention %s), LoRA r=%d on %s: %s trainable of %s parameters (%.3f%%), "
                 "loaded in %.1f s", type(base).__name__, str(self.dtype).replace("torch.", ""),
                 self.attn_impl, self.cfg.lora.r, ",".join(targets), f"{trainable:,}", f"{total:,}",
                 100.0 * trainable / max(total, 1), time.monotonic() - started)
        if self.resume_from:
            self._load_adapter(model)
        if mc.quantization == "none" and not self._is_fsdp():
            # Under FSDP, prepare() shards and places the model (with cpu_ram_efficient_loading
            # the other ranks hold meta tensors until rank 0's weights are broadcast).
            model.to(device)
        # Only without FSDP: its flat-sharded lm_head weight cannot be used outside forward.
        self.head = TargetHead.install(model) if fast and not self._is_fsdp() else None
        params = [p for p in model.parameters() if p.requires_grad]
        if tc.optimizer == "paged_adamw_8bit":
            import bitsandbytes as bnb

            optimizer = bnb.optim.PagedAdamW8bit(params, lr=tc.learning_rate, weight_decay=tc.weight_decay)
        else:
            extra = {"fused": True} if device.type == "cuda" else {}
            optimizer = torch.optim.AdamW(params, lr=tc.learning_rate, weight_decay=tc.weight_decay, **extra)
        self.model, self.optimizer = self.acc.prepare(model, optimizer)
        from transformers import get_scheduler

        # Not passed through accelerator.prepare: its scheduler wrapper steps once per process
        # per call, which would run the schedule world_size times too fast.
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        self.scheduler = get_scheduler(tc.lr_scheduler, inner, num_warmup_steps=tc.warmup_steps,
                                       num_training_steps=self.total_steps)
        if tc.compile:
            if device.type == "cuda":
                if not modeling.compile_decoder_layers(self.model):
                    self.model = torch.compile(self.model)
            else:
                log.info("train.compile is ignored without CUDA")

    def _collate(self, split: TokenizedSplit, mb: MicroBatch) -> dict[str, Any]:
        from medreason.modeling import VARLEN_ATTENTION

        batch = collate(split, mb, self.layout, self.pad_id)
        return add_fast_fields(batch, self.attn_impl == VARLEN_ATTENTION, self.head is not None)

    def _is_fsdp(self) -> bool:
        from accelerate.utils import DistributedType

        return self.acc.distributed_type == DistributedType.FSDP

    def _load_adapter(self, model: Any) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        with self.acc.local_main_process_first():
            self.resume_dir = self.store.materialize(f"{self.ckpt_rel}/{self.resume_from}")
        weights = load_file(os.path.join(self.resume_dir, "adapter_model.safetensors"))
        result = set_peft_model_state_dict(model, weights)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise InputError(f"checkpoint {self.resume_from}: adapter tensors do not fit this model "
                             f"({len(unexpected)} unexpected, e.g. {unexpected[0]})")

    def _restore_training_state(self) -> None:
        import torch

        d = self.resume_dir
        with open(os.path.join(d, "trainer_state.json"), encoding="utf-8") as fh:
            saved = json.load(fh)
        self.state = TrainerState(**{k: v for k, v in saved.items() if k in TrainerState.__dataclass_fields__})
        if self.state.world_size != self.world or self.state.steps_per_epoch != self.steps_per_epoch:
            log.warning("resuming with %d processes (%d steps per epoch) from a checkpoint made with %d "
                        "(%d): the data order after the checkpoint differs from an uninterrupted run",
                        self.world, self.steps_per_epoch, self.state.world_size, self.state.steps_per_epoch)
        optim_state = torch.load(os.path.join(d, "optimizer.pt"), map_location="cpu", weights_only=True)
        if self._is_fsdp():
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(self.model, getattr(self.optimizer, "optimizer", self.optimizer),
                                     optim_state, options=StateDictOptions(full_state_dict=True))
        else:
            self.optimizer.load_state_dict(optim_state)
        self.scheduler.load_state_dict(torch.load(os.path.join(d, "scheduler.pt"), weights_only=True))
        rng = torch.load(os.path.join(d, "rng.pt"), weights_only=True)
        ranks = rng.get("ranks", [])
        if self.rank < len(ranks):
            restore_rng(ranks[self.rank])
        metrics_path = os.path.join(d, "metrics.jsonl")
        if os.path.exists(metrics_path):
            with open(metrics_path, encoding="utf-8") as fh:
                self.metrics = [json.loads(line) for line in fh if line.strip()]
            self.metrics = [m for m in self.metrics if m.get("step", 0) <= self.state.step]
        if self.tb_dir and os.path.isdir(os.path.join(d, "tensorboard")):
            shutil.copytree(os.path.join(d, "tensorboard"), self.tb_dir, dirs_exist_ok=True)
        self.state.resumed_from = self.resume_from
        self.last_saved_step = self.state.step
        log.info("resuming from %s (step %d of %d, epoch %d, %d steps into it)",
                 self.store.display(f"{self.ckpt_rel}/{self.resume_from}"), self.state.step,
                 self.total_steps, self.state.epoch, self.state.index_in_epoch)

    # -- saving -----------------------------------------------------------------------------------
    def _adapter_state_dict(self) -> dict[str, Any] | None:
        """Full trainable state on rank 0 (None means: let PEFT read it from the model)."""
        if not self._is_fsdp():
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))

    def _optimizer_state_dict(self) -> dict[str, Any]:
        if self._is_fsdp():
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            return get_optimizer_state_dict(self.model, getattr(self.optimizer, "optimizer", self.optimizer),
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.optimizer.state_dict()

    def _write_adapter(self, folder: str, state_dict: dict[str, Any] | None) -> None:
        unwrapped = self.acc.unwrap_model(self.model)
        kwargs = {"state_dict": state_dict} if state_dict is not None else {}
        unwrapped.save_pretrained(folder, safe_serialization=True, **kwargs)

    def _write_common(self, folder: str) -> None:
        with open(os.path.join(folder, "metrics.jsonl"), "w", encoding="utf-8") as fh:
            for row in self.metrics:
                fh.write(json.dumps(row, sort_keys=True) + "\n")
        with open(os.path.join(folder, "trainer_state.json"), "w", encoding="utf-8") as fh:
            json.dump(asdict(self.state), fh, indent=2, sort_keys=True)
        if self.writer is not None:
            self.writer.flush()
            shutil.copytree(self.tb_dir, os.path.join(folder, "tensorboard"), dirs_exist_ok=True)

    def save_checkpoint(self) -> str:
        """Commit checkpoint step-<N>; every rank must call it (states are gathered)."""
        import torch
        from accelerate.utils import gather_object

        step = self.state.step
        name = f"{STEP_PREFIX}{step}"
        rel = f"{self.ckpt_rel}/{name}"
        started = time.monotonic()
        rng_states = gather_object([capture_rng()]) if self.world > 1 else [capture_rng()]
        adapter_sd = self._adapter_state_dict()
        optim_sd = self._optimizer_state_dict()
        if self.state.last_eval_loss is not None and self._eval_step == step:
            self.state.checkpoint_eval[name] = self.state.last_eval_loss
            best = min(self.state.checkpoint_eval.items(), key=lambda kv: (kv[1], checkpoint_step(kv[0])))
            self.state.best_checkpoint = best[0]
        if self.is_main:
            with self.store.staged_folder() as tmp:
                self._write_adapter(tmp, adapter_sd)
                torch.save(optim_sd, os.path.join(tmp, "optimizer.pt"))
                torch.save(self.scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
                torch.save({"world_size": self.world, "ranks": rng_states}, os.path.join(tmp, "rng.pt"))
                self._write_common(tmp)
                manifest = build_manifest(
                    stage="train", run_id=self.run_id, config=self.cfg, config_hash=self.config_hash,
                    inputs=self.inputs,
                    metrics={"step": step, "loss": self.state.last_loss,
                             "eval_loss": self.state.checkpoint_eval.get(name)},
                    extra={"kind": "checkpoint", "step": step},
                )
                self.store.commit_dir(tmp, rel, manifest)
            protect = {self.state.best_checkpoint} if self.state.best_checkpoint else set()
            prune_checkpoints(self.store, self.ckpt_rel, self.cfg.train.keep_last_checkpoints, protect)
            log.info("checkpoint %s committed (%.1f s)", self.store.display(rel), time.monotonic() - started)
        self.acc.wait_for_everyone()
        self.last_saved_step = step
        return self.store.display(rel)

    def commit_final(self, runtime_s: float) -> dict[str, Any]:
        """The final adapter, metrics and the stage manifest (checkpoints stay)."""
        adapter_sd = self._adapter_state_dict()
        manifest: dict[str, Any] = {}
        st = self.state
        metrics = {
            "steps": st.step,
            "epochs": round(st.step / self.steps_per_epoch, 4),
            "final_loss": st.last_loss,
            "final_eval_loss": st.last_eval_loss,
            "best_step": st.best_step,
            "best_eval_loss": st.best_eval_loss,
            "best_checkpoint": f"{CHECKPOINTS}/{st.best_checkpoint}" if st.best_checkpoint else None,
            "tokens_seen": st.tokens_seen,
            "trainable_params": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
        }
        if self.is_main:
            with self.store.staged_folder() as tmp:
                adapter_dir = os.path.join(tmp, "adapter")
                os.makedirs(adapter_dir)
                self._write_adapter(adapter_dir, adapter_sd)
                self._write_common(tmp)
                manifest = build_manifest(
                    stage="train", run_id=self.run_id, config=self.cfg, config_hash=self.config_hash,
                    inputs=self.inputs, timings_s={"train": runtime_s, **self.timings}, metrics=metrics,
                    extra={"kind": "stage", "world_size": self.world,
                           "checkpoints": committed_checkpoints(self.store, self.ckpt_rel)},
                )
                manifest = self.store.commit_dir(tmp, self.train_rel, manifest, clear=False)
            log.info("train stage committed at %s", self.store.display(self.train_rel))
        self.acc.wait_for_everyone()
        return manifest

    # -- evaluation -------------------------------------------------------------------------------
    def evaluate(self) -> float | None:
        """Mean token loss on the held-out split (at most train.eval_max_batches micro-batches)."""
        import torch

        if not self.eval_plan:
            return None
        # Outside FSDP, evaluate the unwrapped module: DDP's forward would broadcast buffers, a
        # collective that hangs when ranks run different numbers of eval batches.
        fsdp = self._is_fsdp()
        plan = self.eval_plan
        if fsdp:
            plan = plan[: len(plan) - len(plan) % self.world] or plan[: self.world]
        module = self.model if fsdp else self.acc.unwrap_model(self.model)
        mine = plan[self.rank::self.world]
        device = self.acc.device
        totals = torch.zeros(2, dtype=torch.float64, device=device)
        was_training = module.training
        module.eval()
        with torch.no_grad():
            for mb in mine:
                batch = _to_device(self._collate(self.eval_split, mb), device)
                loss = forward_loss(module, batch, self.layout.mode, self.attn_impl, self.dtype, self.head)
                totals[0] += loss.double()
                totals[1] += batch["n_targets"]
        if was_training:
            module.train()
        if self.world > 1:
            totals = self.acc.reduce(totals, reduction="sum")
        loss_sum, count = totals.tolist()
        return loss_sum / count if count else None

    # -- the loop -----------------------------------------------------------------------------------
    def _log_row(self, row: dict[str, Any], pbar: Any) -> None:
        self.metrics.append(row)
        if self.writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"train/{key}", value, row["step"])
        shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items() if v is not None}
        if pbar.disable:
            log.info("step %d/%d %s", row["step"], self.total_steps,
                     " ".join(f"{k}={v}" for k, v in shown.items() if k != "step"))
        else:
            pbar.set_postfix({k: v for k, v in shown.items() if k in ("loss", "eval_loss", "lr")})

    def run(self, stop: StopFlag) -> dict[str, Any]:
        import torch
        from tqdm.auto import tqdm

        tc = self.cfg.train
        started = time.monotonic()
        self._load_data()
        self._decide_start()
        self._build_model()
        if "tensorboard" in tc.report_to and self.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.tb_dir = tempfile.mkdtemp(prefix="medreason-tb-")
        if self.resume_from:
            self._restore_training_state()
        else:
            self.state = TrainerState(steps_per_epoch=self.steps_per_epoch, total_steps=self.total_steps,
                                      world_size=self.world, grad_accum_steps=tc.grad_accum_steps,
                                      micro_batch_size=tc.micro_batch_size, seed=tc.seed,
                                      config_hash=self.config_hash)
        self.state.steps_per_epoch, self.state.total_steps = self.steps_per_epoch, self.total_steps
        self.state.world_size = self.world
        if self.tb_dir:
            self.writer = SummaryWriter(self.tb_dir)
        self.timings["setup"] = time.monotonic() - started
        self._eval_step = -1

        device = self.acc.device
        cuda = device.type == "cuda"
        peak = _peak_flops(device) if self.dtype != torch.float32 else None
        # LoRA on a frozen base: forward 2N + backward through activations 2N FLOPs per token
        # (no weight gradients for the base); recomputing activations adds another forward.
        flops_per_token = (6 if tc.gradient_checkpointing else 4) * self.n_base_params
        A, W = tc.grad_accum_steps, self.world
        model = self.model
        model.train()
        loss_acc = torch.zeros((), dtype=torch.float32, device=device)
        win_targets = win_real = 0
        win_time = 0.0
        plan: list[MicroBatch] = []
        plan_epoch = -1
        delay_s = float(os.environ.get(STEP_DELAY_ENV) or 0)
        profiler = self.profiler
        pbar = tqdm(total=self.total_steps, initial=self.state.step, unit="step", desc="train",
                    disable=None if self.is_main else True, dynamic_ncols=True)
        try:
            if self.state.step == 0 and not self.resume_from and self.eval_plan:
                # The base model's held-out loss: the reference the trained steps are read against
                # (a metrics line with step 0 and only eval_loss; not a candidate for "best").
                row0 = self._empty_row()
                row0["eval_loss"] = self.evaluate()
                self._log_row(row0, pbar)
            while self.state.step < self.total_steps:
                if self._stop_requested(stop):
                    self._preempt(stop)
                step = self.state.step
                epoch, index = divmod(step, self.steps_per_epoch)
                if epoch != plan_epoch:
                    plan = epoch_plan(self.lengths, self.layout, tc.seed, epoch)
                    plan_epoch = epoch
                step_mbs = plan[index * A * W:(index + 1) * A * W]
                n_targets, n_real = step_counts(self.train_split, step_mbs, self.layout)
                mine = step_micro_batches(plan, index, A, W, self.rank)
                profiler.before(step)
                t0 = time.perf_counter()
                scale = W / max(n_targets, 1)
                for a, mb in enumerate(mine):
                    # Dropout masks from (seed, step, the micro-batch's slot in the step): the same
                    # micro-batch gets the same mask whichever rank or accumulation slot runs it,
                    # and a resumed run needs no RNG history.
                    torch.manual_seed(_step_seed(tc.seed, step, a * W + self.rank))
                    batch = _to_device(self._collate(self.train_split, mb), device)
                    # Gradients are all-reduced only on the last micro-batch of the step.
                    sync = contextlib.nullcontext() if a == A - 1 else self.acc.no_sync(model)
                    with sync:
                        loss_sum = forward_loss(model, batch, self.layout.mode, self.attn_impl, self.dtype,
                                                self.head)
                        self.acc.backward(loss_sum * scale)
                    loss_acc += loss_sum.detach()
                log_now = (step + 1) % tc.log_every_steps == 0 or step + 1 == self.total_steps
                grad_norm = None
                if tc.max_grad_norm is not None or log_now:
                    max_norm = tc.max_grad_norm if tc.max_grad_norm is not None else float("inf")
                    grad_norm = self.acc.clip_grad_norm_(model.parameters(), max_norm)
                lr = self.scheduler.get_last_lr()[0]
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.state.step = step + 1
                self.state.epoch, self.state.index_in_epoch = divmod(self.state.step, self.steps_per_epoch)
                self.state.tokens_seen += n_real
                profiler.after(self.state.step)
                win_targets += n_targets
                win_real += n_real
                row: dict[str, Any] | None = None
                if log_now:
                    # The one host sync of a logged step: the loss and grad norm values. On CUDA
                    # the host runs ahead of the GPU between logs; this sync makes the window's
                    # time (train steps only, no eval or checkpoint time) the real one.
                    total = self.acc.reduce(loss_acc, reduction="sum") if W > 1 else loss_acc
                    loss = total.item() / max(win_targets, 1)
                    win_time += time.perf_counter() - t0
                    tokens_per_s = win_real / win_time if win_time > 0 else None
                    row = self._empty_row()
                    row.update({
                        "loss": loss,
                        "lr": lr,
                        "grad_norm": float(grad_norm) if grad_norm is not None else None,
                        "tokens_per_s": tokens_per_s,
                        "mfu": (tokens_per_s * flops_per_token / (peak * W))
                        if (peak and tokens_per_s) else None,
                        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
                    })
                    self.state.last_loss = loss
                    loss_acc.zero_()
                    win_targets = win_real = 0
                    win_time = 0.0
                else:
                    win_time += time.perf_counter() - t0
                s = self.state.step
                if s % tc.eval_every_steps == 0 or s == self.total_steps:
                    eval_loss = self.evaluate()
                    if eval_loss is not None:
                        self._eval_step = s
                        self.state.last_eval_loss = eval_loss
                        if self.state.best_eval_loss is None or eval_loss < self.state.best_eval_loss:
                            self.state.best_eval_loss, self.state.best_step = eval_loss, s
                        row = row or self._empty_row()
                        row["eval_loss"] = eval_loss
                if row is not None:
                    self._log_row(row, pbar)
                pbar.update(1)
                if s % tc.save_every_steps == 0 or s == self.total_steps:
                    self.save_checkpoint()
                if delay_s:
                    time.sleep(delay_s)
            if self._stop_requested(stop):
                # The signal came during the last step or the final checkpoint: that checkpoint
                # is committed, so finishing the (short) final commit is the fastest way out.
                log.info("stop requested after the last step; committing the final adapter first")
        finally:
            profiler.close()
            pbar.close()
        manifest = self.commit_final(time.monotonic() - started)
        if self.writer is not None:
            self.writer.close()
        if self.tb_dir:
            shutil.rmtree(self.tb_dir, ignore_errors=True)
        return manifest

    def _empty_row(self) -> dict[str, Any]:
        s = self.state.step
        row: dict[str, Any] = dict.fromkeys(METRIC_KEYS)
        row.update({"step": s, "epoch": round(s / self.steps_per_epoch, 4)})
        return row

    def _stop_requested(self, stop: StopFlag) -> bool:
        """Whether any rank got a stop signal (all-reduced: every rank stops at the same step)."""
        if self.world == 1:
            return stop.is_set
        import torch

        flag = torch.tensor([1.0 if stop.is_set else 0.0], device=self.acc.device)
        return bool(self.acc.reduce(flag, reduction="sum").item() > 0)

    def _preempt(self, stop: StopFlag) -> None:
        step = self.state.step
        if step == 0:
            raise Preempted(0, "none (no step was done; the rerun starts from the beginning)")
        if self.last_saved_step != step:
            log.warning("stop signal received: committing a checkpoint at step %d", step)
            uri = self.save_checkpoint()
        else:
            uri = self.store.display(f"{self.ckpt_rel}/{STEP_PREFIX}{step}")
        raise Preempted(step, uri)


def train_adapter(cfg: Config, store: ArtifactStore, run_id: str, prepare_manifest: dict[str, Any],
                  force: bool, accelerator: Any | None = None) -> dict[str, Any]:
    """Train (or resume) the run's adapter and commit the train stage. Returns its manifest."""
    accelerator = accelerator or make_accelerator()
    stop = StopFlag()
    with stop.installed():
        trainer = Trainer(cfg, store, run_id, prepare_manifest, force, accelerator)
        return trainer.run(stop)
