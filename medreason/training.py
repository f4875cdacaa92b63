"""The training loop: plain PyTorch + accelerate, checkpoints in the store, exact resume,
preemption by signal, a stop on a diverged (non-finite) loss.

The pieces live in their own modules; this one wires them up and iterates:

- medreason.train_setup: accelerator, data (TrainData), model/optimizer/scheduler (TrainModel),
  and the start-of-run line naming the attention path, loss kernel and compile mode.
- medreason.train_step: a micro-batch's loss (fast-path extras, target-only head).
- medreason.prefetch: the next micro-batch collated and on the device while the GPU works.
- medreason.checkpointing: TrainState, save, load, prune, the resume point, the final commit.
- medreason.train_metrics: metrics.jsonl rows, the step log line with its ETA.
- medreason.tracking: TensorBoard / W&B / MLflow (train.report_to), rank 0 only.

One optimizer step = ``grad_accum_steps`` micro-batches on each of ``world_size`` ranks (see
medreason.packing for which rows those are, medreason.train_step for how their losses combine).

Exact resume: the data order is a function of (seed, epoch); the position in it is a function
of the step (epoch, index = divmod(step, steps_per_epoch)); torch's RNG (LoRA dropout) is
re-seeded from (seed, step, slot) at every micro-batch; adapter, optimizer, scheduler and RNG
states are restored bit for bit. On CPU with a fixed seed a resumed run reproduces the
uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

from medreason import testhooks
from medreason.checkpointing import (
    CHECKPOINTS,
    STEP_PREFIX,
    CheckpointClient,
    ResumePoint,
    TrainState,
    committed_checkpoints,
    prune_checkpoints,
)
from medreason.config import Config
from medreason.errors import InputError, Preempted, env_switch
from medreason.packing import MicroBatch, epoch_plan, step_counts, step_micro_batches
from medreason.prefetch import Prefetcher, prefetch_enabled
from medreason.profiling import PROFILE_ENV, StepProfiler
from medreason.store import ArtifactStore, manifest_hash
from medreason.testhooks import STEP_DELAY_ENV
from medreason.tracking import Tracking
from medreason.train_metrics import METRIC_KEYS, Clock, MetricsLog, empty_row, peak_flops
from medreason.train_setup import (
    TrainData,
    TrainModel,
    build_model,
    check_fsdp,
    load_data,
    log_paths,
    make_accelerator,
    make_layout,
    resolve_model_dir,
)
from medreason.train_step import (
    FAST_PATH_ENV,
    TargetHead,
    add_fast_fields,
    fast_path_enabled,
    forward_loss,
    step_seed,
    to_device,
)

# Names other modules and the tests import from here.
__all__ = [
    "CHECKPOINTS", "FAST_PATH_ENV", "METRIC_KEYS", "STEP_DELAY_ENV", "STEP_PREFIX", "StopFlag",
    "TargetHead", "TrainState", "TrainingDiverged", "add_fast_fields", "committed_checkpoints",
    "fast_path_enabled", "forward_loss", "make_accelerator", "make_layout", "prune_checkpoints",
    "resolve_model_dir", "build_train_stage",
]

log = logging.getLogger(__name__)

PREEMPT_SIGNALS = ("SIGTERM", "SIGUSR1")


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


class TrainingDiverged(InputError):
    """A non-finite loss or gradient norm: training stopped before committing anything of it."""

    def __init__(self, step: int, last_good: str | None):
        where = (f"the last good checkpoint is {last_good} (a rerun resumes there)" if last_good
                 else "there is no checkpoint of this run (a rerun starts from the beginning)")
        super().__init__(
            f"training diverged: non-finite loss or gradient norm at step {step}; stopped without "
            f"committing a checkpoint or the train stage; {where}. Lower train.learning_rate or set "
            "train.max_grad_norm")
        self.step = step


class NonFiniteGuard:
    """Remembers, on the device, the first step whose loss or gradient norm was not finite.

    observe() queues a few tensor ops and never waits for the device; check() is the one host
    sync, made where the loop syncs anyway (a logged step) and before every checkpoint, and it
    gathers every rank's answer so all ranks stop at the same step.
    """

    def __init__(self, device: Any):
        import torch

        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)

    def observe(self, value: Any, step: int) -> None:
        import torch

        bad = ~torch.isfinite(value.detach())
        self.first_bad = torch.where((self.first_bad < 0) & bad, step, self.first_bad)

    def check(self, acc: Any, last_good: str | None) -> None:
        mine = self.first_bad.view(1)
        firsts = acc.gather(mine) if acc.num_processes > 1 else mine
        bad = [int(s) for s in firsts.tolist() if s >= 0]
        if bad:
            raise TrainingDiverged(min(bad), last_good)


class Window:
    """Sums over the steps since the last logged one (loss on the device, counts on the host)."""

    def __init__(self, device: Any):
        import torch

        self.loss = torch.zeros((), dtype=torch.float32, device=device)
        self.targets = self.real = 0
        self.time_s = 0.0

    def close(self, acc: Any, t0: float) -> tuple[float, float | None]:
        """(mean token loss, tokens per second) of the window, which starts over."""
        # The one host sync of a logged step: on CUDA the host runs ahead of the GPU between
        # logs; this sync makes the window's time (train steps only, no eval or checkpoint
        # time) the real one.
        total = acc.reduce(self.loss, reduction="sum") if acc.num_processes > 1 else self.loss
        loss = total.item() / max(self.targets, 1)
        self.time_s += time.perf_counter() - t0
        tokens_per_s = self.real / self.time_s if self.time_s > 0 else None
        self.loss.zero_()
        self.targets = self.real = 0
        self.time_s = 0.0
        return loss, tokens_per_s


class Trainer:
    """Iterates the steps of a run whose pieces setup() built; every rank runs one."""

    def __init__(self, cfg: Config, acc: Any, data: TrainData, tm: TrainModel, ckpt: CheckpointClient,
                 state: TrainState, metrics: MetricsLog, profiler: StepProfiler, prefetch: bool = True):
        import torch

        self.cfg, self.acc, self.data, self.tm, self.ckpt = cfg, acc, data, tm, ckpt
        self.state, self.metrics, self.profiler = state, metrics, profiler
        self.rank, self.world = acc.process_index, acc.num_processes
        self.window = Window(acc.device)
        self.guard = NonFiniteGuard(acc.device)
        self.peak = peak_flops(acc.device) if tm.dtype != torch.float32 else None
        # LoRA on a frozen base: forward 2N + backward through activations 2N FLOPs per token
        # (no weight gradients for the base); recomputing activations adds another forward.
        self.flops_per_token = (6 if cfg.train.gradient_checkpointing else 4) * tm.n_base_params
        self.plan: list[Any] = []
        self.plan_epoch = -1
        # Keyed by (step, accumulation slot): the micro-batch is a function of the two.
        self.batches = Prefetcher(self._load, acc.device, prefetch)
        self.clock = Clock(state.step, data.total_steps)
        self.pbar: Any = None

    def run(self, stop: StopFlag) -> None:
        """The steps: forward/backward and update, log, eval, save, preempt."""
        from tqdm.auto import tqdm

        st, tc = self.state, self.cfg.train
        self.pbar = tqdm(total=self.data.total_steps, initial=st.step, unit="step", desc="train",
                         disable=None if self.acc.is_main_process else True, dynamic_ncols=True)
        self.tm.model.train()
        self.clock = Clock(st.step, self.data.total_steps)
        if st.step == 0 and st.resumed_from is None and self.data.eval_plan:
            # The base model's held-out loss: the reference the trained steps are read against
            # (a metrics line with step 0 and only eval_loss; not a candidate for "best").
            row0 = empty_row(0, st.steps_per_epoch)
            row0["eval_loss"] = self.evaluate()
            self.metrics.log_row(row0, self.pbar)
        while st.step < self.data.total_steps:
            if self._any_rank(stop.is_set):
                self._preempt()
            t0 = time.perf_counter()
            log_now = self._due(tc.log_every_steps, st.step + 1)
            lr, grad_norm = self._train_step(log_now)
            row = self._window_row(t0, lr, grad_norm) if log_now else None
            if not log_now:
                self.window.time_s += time.perf_counter() - t0
            save_now = self._due(tc.save_every_steps, st.step)
            if log_now or save_now:
                self.guard.check(self.acc, self.ckpt.last_good())
            row = self._eval_if_due(row)
            if row is not None:
                self.metrics.log_row(row, self.pbar, self.clock)
            self.pbar.update(1)
            if save_now:
                self.ckpt.save(st, self.tm, self.metrics)
            testhooks.after_optimizer_step()
        if self._any_rank(stop.is_set):
            # The signal came during the last step or the final checkpoint: that checkpoint
            # is committed, so finishing the (short) final commit is the fastest way out.
            log.info("stop requested after the last step; committing the final adapter first")

    def close(self) -> None:
        self.batches.close()
        self.profiler.close()
        if self.pbar is not None:
            self.pbar.close()

    def _due(self, every: int, step: int) -> bool:
        return step % every == 0 or step == self.data.total_steps

    def _micro_batches(self, step: int) -> tuple[list[Any], int]:
        """(the epoch's plan, the step's index in it); the plan is built once per epoch."""
        epoch, index = divmod(step, self.data.steps_per_epoch)
        if epoch != self.plan_epoch:
            self.plan = epoch_plan(self.data.train_split.lengths, self.data.layout, self.cfg.train.seed, epoch)
            self.plan_epoch = epoch
        return self.plan, index

    def _step_plan(self, step: int) -> tuple[list[Any], int, int]:
        """(this rank's micro-batches, the step's target tokens, its real tokens; all ranks)."""
        tc, data = self.cfg.train, self.data
        plan, index = self._micro_batches(step)
        per_step = tc.grad_accum_steps * self.world
        step_mbs = plan[index * per_step:(index + 1) * per_step]
        n_targets, n_real = step_counts(data.train_split, step_mbs, data.layout)
        return step_micro_batches(plan, index, tc.grad_accum_steps, self.world, self.rank), n_targets, n_real

    def _load(self, mb: MicroBatch) -> dict[str, Any]:
        """One training micro-batch, collated and on the device (the prefetch worker runs it)."""
        return to_device(self.tm.collate(self.data.train_split, mb, self.data.layout), self.acc.device)

    def _prefetch_step(self, step: int) -> None:
        """Start loading this rank's first micro-batch of ``step`` (none past the last step)."""
        if self.batches.enabled and step < self.data.total_steps:
            plan, index = self._micro_batches(step)
            first = step_micro_batches(plan, index, self.cfg.train.grad_accum_steps, self.world, self.rank)[0]
            self.batches.ahead((step, 0), first)

    def _train_step(self, log_now: bool) -> tuple[float, Any]:
        """Forward/backward over this rank's micro-batches and the update: (lr used, grad norm or None)."""
        import torch

        tc, tm, st = self.cfg.train, self.tm, self.state
        step = st.step
        mine, n_targets, n_real = self._step_plan(step)
        self.profiler.before(step)
        scale = self.world / max(n_targets, 1)
        for a, mb in enumerate(mine):
            batch = self.batches.take((step, a), mb)
            # Dropout masks from (seed, step, the micro-batch's slot in the step): the same
            # micro-batch gets the same mask whichever rank or accumulation slot runs it,
            # and a resumed run needs no RNG history. Set right before the forward.
            torch.manual_seed(step_seed(tc.seed, step, a * self.world + self.rank))
            # Gradients are all-reduced only on the last micro-batch of the step.
            sync = contextlib.nullcontext() if a == tc.grad_accum_steps - 1 else self.acc.no_sync(tm.model)
            with sync:
                loss_sum = forward_loss(tm.model, batch, self.data.layout.mode, tm.attn_impl, tm.dtype, tm.head)
                self.acc.backward(loss_sum * scale)
            if a + 1 < len(mine):
                self.batches.ahead((step, a + 1), mine[a + 1])  # while the backward runs
            self.window.loss += loss_sum.detach()
        self.guard.observe(self.window.loss, step + 1)
        grad_norm = None
        if tc.max_grad_norm is not None or log_now:
            max_norm = tc.max_grad_norm if tc.max_grad_norm is not None else float("inf")
            grad_norm = self.acc.clip_grad_norm_(tm.model.parameters(), max_norm)
            if tm.fsdp and hasattr(grad_norm, "full_tensor"):
                # FSDP2 returns the norm as a replicated DTensor; the guard's all-gather and
                # the metrics take plain tensors.
                grad_norm = grad_norm.full_tensor()
            self.guard.observe(grad_norm, step + 1)
        lr = tm.scheduler.get_last_lr()[0]
        tm.optimizer.step()
        self._prefetch_step(step + 1)  # while the update runs, before the logging sync
        tm.scheduler.step()
        tm.optimizer.zero_grad(set_to_none=True)
        st.advance(n_real)
        self.profiler.after(st.step)
        self.window.targets += n_targets
        self.window.real += n_real
        return lr, grad_norm

    def _window_row(self, t0: float, lr: float, grad_norm: Any) -> dict[str, Any]:
        import torch

        loss, tokens_per_s = self.window.close(self.acc, t0)
        device = self.acc.device
        row = empty_row(self.state.step, self.state.steps_per_epoch)
        row.update({
            "loss": loss,
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "tokens_per_s": tokens_per_s,
            "mfu": (tokens_per_s * self.flops_per_token / (self.peak * self.world))
            if (self.peak and tokens_per_s) else None,
            "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        })
        self.state.last_loss = loss
        return row

    def _eval_if_due(self, row: dict[str, Any] | None) -> dict[str, Any] | None:
        st = self.state
        if not self._due(self.cfg.train.eval_every_steps, st.step):
            return row
        eval_loss = self.evaluate()
        if eval_loss is None:
            return row
        st.record_eval(eval_loss)
        row = row or empty_row(st.step, st.steps_per_epoch)
        row["eval_loss"] = eval_loss
        return row

    def evaluate(self) -> float | None:
        """Mean token loss on the held-out split (at most train.eval_max_batches micro-batches)."""
        import torch

        tm, data = self.tm, self.data
        if not data.eval_plan:
            return None
        # Outside FSDP, evaluate the unwrapped module: DDP's forward would broadcast buffers, a
        # collective that hangs when ranks run different numbers of eval batches.
        plan = data.eval_plan
        if tm.fsdp:
            plan = plan[: len(plan) - len(plan) % self.world] or plan[: self.world]
        module = tm.model if tm.fsdp else self.acc.unwrap_model(tm.model)
        device = self.acc.device
        totals = torch.zeros(2, dtype=torch.float64, device=device)
        was_training = module.training
        module.eval()
        with torch.no_grad():
            for mb in plan[self.rank::self.world]:
                batch = to_device(tm.collate(data.eval_split, mb, data.layout), device)
                totals[0] += forward_loss(module, batch, data.layout.mode, tm.attn_impl, tm.dtype, tm.head).double()
                totals[1] += batch["n_targets"]
        if was_training:
            module.train()
        if self.world > 1:
            totals = self.acc.reduce(totals, reduction="sum")
        loss_sum, count = totals.tolist()
        return loss_sum / count if count else None

    def _any_rank(self, flag: bool) -> bool:
        """Whether the flag is set on any rank (all-reduced: every rank decides the same)."""
        if self.world == 1:
            return flag
        import torch

        value = torch.tensor([1.0 if flag else 0.0], device=self.acc.device)
        return bool(self.acc.reduce(value, reduction="sum").item() > 0)

    def _preempt(self) -> None:
        step = self.state.step
        if step == 0:
            raise Preempted(0, "none (no step was done; the rerun starts from the beginning)")
        if self.ckpt.last_saved_step != step:
            self.guard.check(self.acc, self.ckpt.last_good())
            log.warning("stop signal received: committing a checkpoint at step %d", step)
            uri = self.ckpt.save(self.state, self.tm, self.metrics)
        else:
            uri = self.ckpt.display(f"{STEP_PREFIX}{step}")
        raise Preempted(step, uri)


def _start_state(cfg: Config, acc: Any, data: TrainData, tm: TrainModel, ckpt: CheckpointClient,
                 point: ResumePoint | None, metrics: MetricsLog) -> TrainState:
    """A fresh TrainState, or the one of the checkpoint resumed from (with its other states)."""
    tc, world = cfg.train, acc.num_processes
    if point is None:
        state = TrainState(grad_accum_steps=tc.grad_accum_steps, micro_batch_size=tc.micro_batch_size,
                           seed=tc.seed, config_hash=ckpt.config_hash)
    else:
        state = ckpt.restore(point, tm, metrics)
        if state.world_size != world or state.steps_per_epoch != data.steps_per_epoch:
            log.warning("resuming with %d processes (%d steps per epoch) from a checkpoint made with %d "
                        "(%d): the data order after the checkpoint differs from an uninterrupted run",
                        world, data.steps_per_epoch, state.world_size, state.steps_per_epoch)
        log.info("resuming from %s (step %d of %d, epoch %d, %d steps into it)", ckpt.display(point.name),
                 state.step, data.total_steps, state.epoch, state.index_in_epoch)
    state.steps_per_epoch, state.total_steps, state.world_size = data.steps_per_epoch, data.total_steps, world
    return state


def setup(cfg: Config, store: ArtifactStore, run_id: str, prepare_manifest: dict[str, Any], force: bool,
          acc: Any, lease: Any = None) -> Trainer:
    """Data, resume decision, model, state and metrics of a run, in that order."""
    # Parsed first so a malformed MEDREASON_PROFILE or switch (MEDREASON_PREFETCH, the fused
    # LoRA's and the residual dropout's) fails before the model is loaded.
    profiler = StepProfiler(os.environ.get(PROFILE_ENV), acc.is_main_process)
    prefetch = prefetch_enabled()
    from medreason.lora_fused import ADAPTER_FIRST_ENV, INPLACE_ENV
    from medreason.residual_dropout import ENV as RESIDUAL_DROPOUT_ENV

    for name in (INPLACE_ENV, ADAPTER_FIRST_ENV, RESIDUAL_DROPOUT_ENV):
        env_switch(name)
    check_fsdp(cfg, acc)  # before data, resume and model: a refused setup costs nothing
    tracking = Tracking(cfg, store, run_id, acc)  # a tracker package that is missing: exit 2 now
    ckpt = CheckpointClient(cfg, store, run_id, {"prepare": manifest_hash(prepare_manifest)}, acc, lease)
    data = load_data(cfg, store, run_id, acc)
    point = ckpt.resume_point(force)
    tm = build_model(cfg, store, acc, data, point)
    metrics = MetricsLog(data.total_steps, tracking)
    state = _start_state(cfg, acc, data, tm, ckpt, point, metrics)
    metrics.open_writer()
    if acc.is_main_process:
        log_paths(cfg, tm, data.layout, acc.device.type)
    return Trainer(cfg, acc, data, tm, ckpt, state, metrics, profiler, prefetch)


def build_train_stage(cfg: Config, store: ArtifactStore, run_id: str, prepare_manifest: dict[str, Any],
                      force: bool, accelerator: Any, folder: str, lease: Any = None
                      ) -> tuple[dict[str, Any], dict[str, float], dict[str, Any]]:
    """Train (or resume) the run's adapter and write the final stage into ``folder``: returns
    the manifest's (metrics, timings, extras). Every rank calls it; rank 0 writes, holding the
    train stage's ``lease`` (checked by each checkpoint commit), and jobs.stage commits ``folder``."""
    stop = StopFlag()
    with stop.installed():
        started = time.monotonic()
        trainer = setup(cfg, store, run_id, prepare_manifest, force, accelerator, lease)
        timings = {"setup": time.monotonic() - started}
        try:
            try:
                trainer.run(stop)
            finally:
                trainer.close()
            summary, extra = trainer.ckpt.write_final(folder, trainer.state, trainer.tm, trainer.metrics)
            return summary, {"train": time.monotonic() - started, **timings}, extra
        finally:
            trainer.metrics.close()
