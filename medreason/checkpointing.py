"""Checkpoints of a training run in the store: state, save, load, prune, resume point.

Store layout (rank 0 writes; the other ranks wait)::

    runs/<id>/train/checkpoints/step-<N>/   adapter_model.safetensors adapter_config.json
                                            optimizer.pt scheduler.pt rng.pt trainer_state.json
                                            metrics.jsonl [tensorboard/] MANIFEST.json
    runs/<id>/train/adapter/                the final PEFT adapter
    runs/<id>/train/metrics.jsonl           one JSON object per logged step
    runs/<id>/train/MANIFEST.json           the stage commit (metrics: best_step, ...)

Retention: the newest ``train.keep_last_checkpoints`` plus the best one (lowest eval loss among
checkpointed steps) are kept, because ``eval.checkpoint: best`` reads it. An older checkpoint is
only deleted after a newer one is committed, so the one a run resumed from survives until it is
superseded.

Resume: the newest committed checkpoint whose files verify against its manifest. One that does
not (a file changed or truncated after its commit) is skipped with a warning, so a corrupted
newest checkpoint costs the steps since the previous one instead of blocking the run.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from medreason import jsonio
from medreason.config import Config, config_changes, describe_changes
from medreason.errors import InputError
from medreason.store import ArtifactStore, build_manifest

if TYPE_CHECKING:
    from medreason.train_metrics import MetricsLog
    from medreason.train_setup import TrainModel

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
STEP_PREFIX = "step-"


@dataclass
class TrainState:
    """Everything about the run's progress that is not a tensor (trainer_state.json)."""

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
    eval_step: int | None = None  # the step last_eval_loss was measured at
    resumed_from: str | None = None

    def advance(self, n_real_tokens: int) -> None:
        """One optimizer step done: the data position follows from the step."""
        self.step += 1
        self.epoch, self.index_in_epoch = divmod(self.step, self.steps_per_epoch)
        self.tokens_seen += n_real_tokens

    def record_eval(self, eval_loss: float) -> None:
        self.eval_step, self.last_eval_loss = self.step, eval_loss
        if self.best_eval_loss is None or eval_loss < self.best_eval_loss:
            self.best_eval_loss, self.best_step = eval_loss, self.step

    @classmethod
    def load(cls, path: str) -> TrainState:
        with open(path, encoding="utf-8") as fh:
            saved = json.load(fh)
        return cls(**{k: v for k, v in saved.items() if k in cls.__dataclass_fields__})


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


# -- listing, pruning, the resume decision ----------------------------------------------------------
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


@dataclass(frozen=True)
class ResumePoint:
    """A verified checkpoint to resume from and the local folder holding its files."""

    name: str
    local_dir: str


def _config_problems(manifest: dict[str, Any], config_hash: str, inputs: dict[str, str],
                     cfg: Config | None = None) -> list[str]:
    problems = []
    if manifest.get("config_hash") != config_hash:
        named = describe_changes(config_changes(manifest.get("config"), cfg, "train")) if cfg else ""
        problems.append("a different config " + (named.strip() or "(model/data/lora/train sections)"))
    if manifest.get("inputs", {}) != dict(sorted(inputs.items())):
        problems.append("a different prepare stage")
    return problems


def find_resume_point(store: ArtifactStore, ckpt_rel: str, config_hash: str, inputs: dict[str, str],
                      force: bool, cfg: Config | None = None) -> tuple[ResumePoint | None, bool]:
    """(newest verified, compatible checkpoint or None, whether old checkpoints must be wiped).

    Checkpoints whose files do not match their manifest are skipped (warning); the newest one
    that verifies decides: same config and inputs -> resume from it; otherwise refuse, or with
    ``force`` start fresh and wipe.
    """
    for name in reversed(committed_checkpoints(store, ckpt_rel)):
        rel = f"{ckpt_rel}/{name}"
        try:
            local_dir = store.materialize(rel)
        except InputError as exc:
            log.warning("skipping checkpoint %s: it does not verify against its manifest (%s); "
                        "trying the one before it", store.display(rel), exc)
            continue
        problems = _config_problems(store.read_manifest(rel) or {}, config_hash, inputs, cfg)
        if not problems:
            return ResumePoint(name, local_dir), False
        if force:
            log.warning("checkpoint %s was made with %s; --force: starting fresh and removing the "
                        "old checkpoints", name, " and ".join(problems))
            return None, True
        raise InputError(
            f"checkpoint {store.display(rel)} was made with {' and '.join(problems)} "
            "than this run; pass --force to start over (removes the old checkpoints), or use a new --run id"
        )
    return None, False


# -- save / load --------------------------------------------------------------------------------------
class CheckpointClient:
    """Reads and writes one run's checkpoints and its final commit; every rank holds one.

    Collective calls (save, commit_final) must be made by every rank: states are gathered on all
    of them and rank 0 alone writes, the others wait.
    """

    def __init__(self, cfg: Config, store: ArtifactStore, run_id: str, inputs: dict[str, str],
                 accelerator: Any, lease: Any = None):
        self.cfg = cfg
        self.store = store
        self.run_id = run_id
        self.inputs = inputs
        self.acc = accelerator
        self.world = accelerator.num_processes
        self.is_main = accelerator.is_main_process
        self.config_hash = cfg.stage_hash("train")
        self.train_rel = store.stage_rel(run_id, "train")
        self.ckpt_rel = f"{self.train_rel}/{CHECKPOINTS}"
        self.last_saved_step = -1  # a checkpoint of this step is committed
        # The train stage's lease (medreason.lease.Lease, rank 0): every checkpoint commit checks
        # it, so a job whose stage was taken over stops writing there (LeaseLost).
        self.lease = lease

    def display(self, name: str) -> str:
        return self.store.display(f"{self.ckpt_rel}/{name}")

    def last_good(self) -> str | None:
        """The newest checkpoint this run committed or resumed from (its URI), if any."""
        if self.last_saved_step < 0:
            return None
        return self.display(f"{STEP_PREFIX}{self.last_saved_step}")

    def resume_point(self, force: bool) -> ResumePoint | None:
        """Resume from the newest usable checkpoint, or start fresh (removing stale state with --force)."""
        # --force on a committed stage redoes it from scratch; otherwise --force only matters
        # when the newest checkpoint belongs to another config (a requeued job that carries
        # --force in its command line still resumes its own checkpoints).
        wipe_all = force and self.store.is_committed(self.train_rel)
        point, wipe_ckpts = None, False
        if not wipe_all:
            with self.acc.local_main_process_first():
                point, wipe_ckpts = find_resume_point(self.store, self.ckpt_rel, self.config_hash,
                                                      self.inputs, force, self.cfg)
        self.acc.wait_for_everyone()  # every rank has read the listing before rank 0 changes it
        if self.is_main and wipe_all:
            log.warning("--force: removing the committed train stage and its checkpoints at %s",
                        self.store.display(self.train_rel))
            self.store.uncommit(self.train_rel)
        elif self.is_main and wipe_ckpts:
            self.store.remove(self.ckpt_rel)
        self.acc.wait_for_everyone()
        return point

    def restore(self, point: ResumePoint, tm: TrainModel, metrics: MetricsLog) -> TrainState:
        """Optimizer, scheduler, RNG, metrics and state from ``point`` (the adapter is loaded
        earlier, by load_adapter, before the model is placed and wrapped)."""
        import torch

        d = point.local_dir
        state = TrainState.load(os.path.join(d, "trainer_state.json"))
        optim_state = torch.load(os.path.join(d, "optimizer.pt"), map_location="cpu", weights_only=True)
        if tm.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(tm.model, tm.inner_optimizer, optim_state,
                                     options=StateDictOptions(full_state_dict=True))
        else:
            tm.optimizer.load_state_dict(optim_state)
        tm.scheduler.load_state_dict(torch.load(os.path.join(d, "scheduler.pt"), weights_only=True))
        ranks = torch.load(os.path.join(d, "rng.pt"), weights_only=True).get("ranks", [])
        if self.acc.process_index < len(ranks):
            restore_rng(ranks[self.acc.process_index])
        metrics.restore(d, state.step)
        state.resumed_from = point.name
        self.last_saved_step = state.step
        return state

    def _write_common(self, folder: str, state: TrainState, metrics: MetricsLog) -> None:
        metrics.write_to(folder)
        with open(os.path.join(folder, "trainer_state.json"), "w", encoding="utf-8") as fh:
            jsonio.dump(asdict(state), fh)

    def save(self, state: TrainState, tm: TrainModel, metrics: MetricsLog) -> str:
        """Commit checkpoint step-<N>; every rank must call it (states are gathered)."""
        import torch
        from accelerate.utils import gather_object

        step = state.step
        name = f"{STEP_PREFIX}{step}"
        rel = f"{self.ckpt_rel}/{name}"
        started = time.monotonic()
        rng_states = gather_object([capture_rng()]) if self.world > 1 else [capture_rng()]
        adapter_sd = adapter_state_dict(tm)
        optim_sd = optimizer_state_dict(tm)
        if state.last_eval_loss is not None and state.eval_step == step:
            state.checkpoint_eval[name] = state.last_eval_loss
            best = min(state.checkpoint_eval.items(), key=lambda kv: (kv[1], checkpoint_step(kv[0])))
            state.best_checkpoint = best[0]
        if self.is_main:
            with self.store.staged_folder() as tmp:
                write_adapter(self.acc, tm, tmp, adapter_sd)
                torch.save(optim_sd, os.path.join(tmp, "optimizer.pt"))
                torch.save(tm.scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
                torch.save({"world_size": self.world, "ranks": rng_states}, os.path.join(tmp, "rng.pt"))
                self._write_common(tmp, state, metrics)
                manifest = build_manifest(
                    stage="train", run_id=self.run_id, config=self.cfg, config_hash=self.config_hash,
                    inputs=self.inputs,
                    metrics={"step": step, "loss": state.last_loss, "eval_loss": state.checkpoint_eval.get(name)},
                    extra={"kind": "checkpoint", "step": step},
                )
                self.store.commit_dir(tmp, rel, manifest, lease=self.lease)
            protect = {state.best_checkpoint} if state.best_checkpoint else set()
            prune_checkpoints(self.store, self.ckpt_rel, self.cfg.train.keep_last_checkpoints, protect)
            log.info("checkpoint %s committed (%.1f s)", self.store.display(rel), time.monotonic() - started)
        self.acc.wait_for_everyone()
        self.last_saved_step = step
        return self.store.display(rel)

    def write_final(self, folder: str, state: TrainState, tm: TrainModel,
                    metrics: MetricsLog) -> tuple[dict[str, Any], dict[str, Any]]:
        """Write the final adapter and metrics into ``folder`` (rank 0; every rank must call it:
        FSDP gathers the adapter) and return the stage manifest's (metrics, extras). The stage
        runner (jobs.stage) commits the folder under the stage's lease; checkpoints/ stays."""
        adapter_sd = adapter_state_dict(tm)
        summary = {
            "steps": state.step,
            "epochs": round(state.step / state.steps_per_epoch, 4),
            "final_loss": state.last_loss,
            "final_eval_loss": state.last_eval_loss,
            "best_step": state.best_step,
            "best_eval_loss": state.best_eval_loss,
            "best_checkpoint": f"{CHECKPOINTS}/{state.best_checkpoint}" if state.best_checkpoint else None,
            "tokens_seen": state.tokens_seen,
            "trainable_params": sum(p.numel() for p in tm.model.parameters() if p.requires_grad),
        }
        extra: dict[str, Any] = {}
        if self.is_main:
            adapter_dir = os.path.join(folder, "adapter")
            os.makedirs(adapter_dir)
            write_adapter(self.acc, tm, adapter_dir, adapter_sd)
            self._write_common(folder, state, metrics)
            extra = {"kind": "stage", "world_size": self.world,
                     "checkpoints": committed_checkpoints(self.store, self.ckpt_rel)}
        self.acc.wait_for_everyone()
        return summary, extra


def load_adapter(model: Any, point: ResumePoint) -> None:
    """Put the checkpoint's adapter weights into the (not yet wrapped) PEFT model."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(os.path.join(point.local_dir, "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, weights)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise InputError(f"checkpoint {point.name}: adapter tensors do not fit this model "
                         f"({len(unexpected)} unexpected, e.g. {unexpected[0]})")


def adapter_state_dict(tm: TrainModel) -> dict[str, Any] | None:
    """Full trainable state on rank 0 (None means: let PEFT read it from the model)."""
    if not tm.fsdp:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(tm.model, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))


def optimizer_state_dict(tm: TrainModel) -> dict[str, Any]:
    if tm.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(tm.model, tm.inner_optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return tm.optimizer.state_dict()


def write_adapter(acc: Any, tm: TrainModel, folder: str, state_dict: dict[str, Any] | None) -> None:
    unwrapped = acc.unwrap_model(tm.model)
    kwargs = {"state_dict": state_dict} if state_dict is not None else {}
    unwrapped.save_pretrained(folder, safe_serialization=True, **kwargs)

