"""Experiment trackers (``train.report_to``: tensorboard, wandb, mlflow) for train and evaluate.

The trackers are accelerate's own (``accelerate.tracking``: TensorBoardTracker, WandBTracker,
MLflowTracker), started on rank 0 only and registered on the Accelerator (``accelerator.trackers``),
so ``accelerator.log`` and ``accelerator.get_tracker`` reach them. They are started one by one
here rather than by ``Accelerator(log_with=...)`` + ``init_trackers``: that path fixes the list
when the Accelerator is built (before the resume decision tells which tracker run to continue),
silently drops a tracker whose package is missing, and starts every tracker in one loop, so one
unreachable server would stop the others from starting.

Identity: one tracker run per medreason run. Its ids (MLflow run_id, W&B run id) are written to
``runs/<run>/train/trackers.json`` as soon as the trackers start, and into every checkpoint and
the final commit, so a resumed job continues the same tracker run and ``evaluate`` logs its
headline numbers to it. ``--force`` on a committed train stage removes the folder: a new
training gets a new tracker run.

Settings come only from the standard environment (MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME,
WANDB_MODE, WANDB_DIR, WANDB_PROJECT, WANDB_ENTITY, WANDB_API_KEY ...), never from config files.

Failures: a tracker package that is not installed fails the job at start (InputError, exit 2:
retrying cannot help). A tracker that cannot start (server down, key rejected) or that fails
later is dropped with one warning and the job goes on: metrics.jsonl and the TensorBoard events
in the store hold every number anyway, and losing GPU hours to a chart server is the worse deal.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import urllib.error
import urllib.request
import uuid
from typing import Any

from medreason.errors import InputError

log = logging.getLogger("medreason.tracking")

TRACKERS = ("tensorboard", "wandb", "mlflow")
RECORD = "trackers.json"
# Seconds to wait for an MLflow server's /health before calling it unreachable: a live server
# answers in milliseconds; a dead host's connect times out, which must not hold a job for minutes.
PROBE_TIMEOUT_S = 5.0
DEFAULT_PROJECT = "medreason"


def check_packages(report_to: list[str]) -> None:
    """InputError (exit 2) naming every tracker in ``report_to`` whose package is not installed."""
    missing = [name for name in report_to if importlib.util.find_spec(name) is None]
    if missing:
        raise InputError(
            f"train.report_to: {', '.join(missing)} requested but not installed; "
            f"pip install {' '.join(missing)} (or remove {'them' if len(missing) > 1 else 'it'} "
            "from train.report_to)")


def flat_config(cfg: Any) -> dict[str, Any]:
    """The resolved config as flat ``section.key`` params. Lists and mappings become JSON text:
    TensorBoard's hparams take only scalars and MLflow keeps params as strings anyway."""
    out: dict[str, Any] = {}
    for section, values in cfg.model_dump(mode="json").items():
        for key, value in values.items():
            scalar = isinstance(value, (bool, int, float, str))
            out[f"{section}.{key}"] = value if scalar else json.dumps(value, sort_keys=True)
    return out


def numeric(values: dict[str, Any]) -> dict[str, float]:
    """The int/float entries (bools and None dropped): what every tracker takes as a metric."""
    return {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


# -- the run record ---------------------------------------------------------------------------------
def record_rel(store: Any, run_id: str) -> str:
    return f"{store.stage_rel(run_id, 'train')}/{RECORD}"


def read_record(store: Any, run_id: str) -> dict[str, Any]:
    """The tracker ids recorded by the run's training ({} when there are none)."""
    try:
        record = json.loads(store.read_text(record_rel(store, run_id)))
    except FileNotFoundError:
        return {}
    except ValueError:
        log.warning("%s is not valid JSON; starting new tracker runs", store.display(record_rel(store, run_id)))
        return {}
    return record if isinstance(record, dict) else {}


def project_name(cfg: Any, tracker: str) -> str:
    """W&B project / MLflow experiment: WANDB_PROJECT or MLFLOW_EXPERIMENT_NAME, then
    train.tracker_project, then "medreason" (the environment wins, as in wandb and accelerate)."""
    env = {"wandb": "WANDB_PROJECT", "mlflow": "MLFLOW_EXPERIMENT_NAME"}.get(tracker)
    return (os.environ.get(env) if env else None) or cfg.train.tracker_project or DEFAULT_PROJECT


# -- starting one tracker -----------------------------------------------------------------------------
def mlflow_unreachable() -> str | None:
    """Why the configured MLflow tracking server does not answer, or None (answers, or is not
    an HTTP server: a local file or sqlite store needs no probe)."""
    import mlflow

    from medreason.store import redact

    uri = mlflow.get_tracking_uri()
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        log.warning("MLFLOW_TRACKING_URI is not set: MLflow writes to %s, relative to the working "
                    "directory of this job (in a container, lost with it)", redact(uri))
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=PROBE_TIMEOUT_S):
            return None
    except urllib.error.HTTPError:
        return None  # it answered (an auth proxy may refuse /health); the client will tell more
    except OSError as exc:
        return f"MLflow tracking server {redact(uri)} does not answer ({getattr(exc, 'reason', exc)})"


def make_tracker(name: str, cfg: Any, run_id: str, previous: dict[str, Any], tb_dir: str | None) -> Any:
    """An accelerate tracker for ``name``, continuing the recorded tracker run when there is one."""
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

    run_name = cfg.train.tracker_run_name or run_id
    if name == "tensorboard":
        # The events go straight into tb_dir (accelerate writes to logging_dir/run_name).
        return TensorBoardTracker(os.path.basename(tb_dir), os.path.dirname(tb_dir))
    if name == "mlflow":
        return MLflowTracker(experiment_name=project_name(cfg, "mlflow"), run_name=run_name,
                             run_id=previous.get("mlflow", {}).get("run_id"),
                             tags={"medreason.run_id": run_id})
    # W&B takes the run id from us: a new one now, the recorded one on resume ("allow": either).
    wandb_id = previous.get("wandb", {}).get("id") or uuid.uuid4().hex[:12]
    return WandBTracker(project_name(cfg, "wandb"), name=run_name, id=wandb_id, resume="allow",
                        entity=os.environ.get("WANDB_ENTITY") or None)


def start_tracker(tracker: Any, config: dict[str, Any] | None) -> bool:
    """Start it (and log the config); False with a warning when it cannot start."""
    problem = mlflow_unreachable() if tracker.name == "mlflow" else None
    if problem is None:
        try:
            tracker.start()
            if config is not None:
                tracker.store_init_configuration(config)
            return True
        except Exception as exc:  # any failure of a tracker must not stop the job
            problem = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    log.warning("train.report_to: %s is not used for this job: %s; continuing without it "
                "(metrics.jsonl in the store has every number)", tracker.name, problem)
    return False


def tracker_ids(tracker: Any) -> dict[str, Any]:
    """What identifies the tracker's run, for the record (no secrets: URIs are redacted)."""
    from medreason.store import redact

    if tracker.name == "mlflow":
        import mlflow

        info = tracker.tracker.info
        return {"run_id": info.run_id, "experiment_id": info.experiment_id,
                "tracking_uri": redact(mlflow.get_tracking_uri())}
    if tracker.name == "wandb":
        run = tracker.tracker
        return {"id": run.id, "project": run.project, "entity": getattr(run, "entity", None) or None,
                "offline": bool(getattr(run, "offline", False))}
    return {"dir": "tensorboard"}


def log_to(trackers: list[Any], values: dict[str, Any], step: int | None) -> list[Any]:
    """Log to each tracker; one that fails is dropped with a warning. Returns those left.

    accelerator.log would stop at the first tracker that raises; each one alone keeps the
    others (and the run) going when one server goes away mid-run.
    """
    kept = []
    for tracker in trackers:
        try:
            tracker.log(values, step=step)
            kept.append(tracker)
        except Exception as exc:  # a tracker's failure must not stop the job
            log.warning("%s failed to log step %s (%s: %s); not reporting to it for the rest of this job",
                        tracker.name, step, type(exc).__name__, exc)
    return kept


def finish_all(trackers: list[Any]) -> None:
    for tracker in trackers:
        try:
            tracker.finish()
        except Exception as exc:  # the run's own results are committed; only the chart suffers
            log.warning("%s did not finish cleanly: %s", tracker.name, exc)


# -- training --------------------------------------------------------------------------------------------
class Tracking:
    """The trackers of one training job on rank 0 (nothing on the other ranks).

    Built at the start of setup (a missing package fails there, before the model loads);
    start() after the resume decision and after the TensorBoard events of the checkpoint were
    restored into ``tb_dir``.
    """

    def __init__(self, cfg: Any, store: Any, run_id: str, acc: Any):
        self.cfg, self.store, self.run_id, self.acc = cfg, store, run_id, acc
        self.names = list(dict.fromkeys(cfg.train.report_to))
        check_packages(self.names)
        self.is_main = acc.is_main_process
        self.trackers: list[Any] = []
        self.record: dict[str, Any] = {}

    @property
    def tensorboard(self) -> bool:
        return self.is_main and "tensorboard" in self.names

    def start(self, tb_dir: str | None) -> None:
        if not self.is_main or not self.names:
            return
        previous = read_record(self.store, self.run_id)
        config = flat_config(self.cfg)
        for name in self.names:
            tracker = make_tracker(name, self.cfg, self.run_id, previous, tb_dir)
            if start_tracker(tracker, config):
                self.trackers.append(tracker)
        # Registered on the Accelerator: accelerator.log / get_tracker reach the same trackers.
        self.acc.trackers.extend(self.trackers)
        # Ids of a tracker that could not start this time are kept: a later job continues it.
        self.record = {**previous, "run_id": self.run_id, **{t.name: tracker_ids(t) for t in self.trackers}}
        resumed = [t.name for t in self.trackers if previous.get(t.name)]
        log.info("reporting to %s%s", ", ".join(t.name for t in self.trackers) or "no tracker",
                 f" (continuing the recorded runs of {', '.join(resumed)})" if resumed else "")
        if len(self.record) > 1:
            # Written now, not only with the first checkpoint: a job stopped before it still
            # leaves the ids for its rerun.
            self.store.write_json(record_rel(self.store, self.run_id), self.record)

    def log(self, values: dict[str, Any], step: int) -> None:
        if self.trackers:
            self.trackers = log_to(self.trackers, numeric(values), step)
            self.acc.trackers[:] = [t for t in self.acc.trackers if t in self.trackers]

    def flush(self) -> None:
        """TensorBoard's buffered events onto disk, before they are copied into a commit."""
        for tracker in self.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.flush()

    def write_record(self, folder: str) -> None:
        if len(self.record) > 1:
            with open(os.path.join(folder, RECORD), "w", encoding="utf-8") as fh:
                json.dump(self.record, fh, indent=2, sort_keys=True)

    def publish_tensorboard(self, tb_dir: str) -> None:
        """Mirror the events into runs/<run>/train/tensorboard/ (``tensorboard --logdir
        <store>/runs`` shows every run while it trains); files no longer local are removed, so
        a resumed run does not show the steps its checkpoint did not keep."""
        rel = f"{self.store.stage_rel(self.run_id, 'train')}/tensorboard"
        local = set()
        for root, _dirs, files in os.walk(tb_dir):
            for name in files:
                path = os.path.join(root, name)
                key = os.path.relpath(path, tb_dir).replace(os.sep, "/")
                local.add(key)
                self.store.put_file(path, f"{rel}/{key}")
        for name in _store_files(self.store, rel):
            if name not in local:
                self.store.remove(f"{rel}/{name}")

    def finish(self) -> None:
        finish_all(self.trackers)
        self.acc.trackers[:] = [t for t in self.acc.trackers if t not in self.trackers]
        self.trackers = []


def _store_files(store: Any, rel: str) -> list[str]:
    """Files under a store folder, relative to it ('/'-separated)."""
    out = []
    for name in store.listdir(rel):
        sub = f"{rel}/{name}"
        if store.fs.isdir(store.full(sub)):
            out.extend(f"{name}/{n}" for n in _store_files(store, sub))
        else:
            out.append(name)
    return out


# -- evaluate --------------------------------------------------------------------------------------------
def evaluation_step(store: Any, run_id: str) -> int:
    """The x position of an evaluation on MLflow's charts: the trained steps (0 without training)."""
    manifest = store.read_manifest(store.stage_rel(run_id, "train")) or {}
    return int(manifest.get("metrics", {}).get("steps") or 0)


def log_evaluation(cfg: Any, store: Any, run_id: str, metrics: dict[str, Any], name: str | None = None) -> None:
    """Log an evaluation's headline numbers (accuracy per set, held-out loss) as
    ``evaluate/[<name>/]<key>`` to the tracker runs the training recorded (new runs named after
    the run when it recorded none). TensorBoard is not written here: evaluate's numbers are in
    its manifest and report. A tracker that is missing or cannot start is skipped with a warning:
    the evaluation is committed already."""
    names = [n for n in dict.fromkeys(cfg.train.report_to) if n != "tensorboard"]
    missing = [n for n in names if importlib.util.find_spec(n) is None]
    if missing:
        log.warning("train.report_to: %s not installed; evaluate is not reported there", ", ".join(missing))
    names = [n for n in names if n not in missing]
    if not names:
        return
    from accelerate import PartialState

    PartialState()  # accelerate's trackers log through it (already there under evaluate's Dist)
    previous = read_record(store, run_id)
    prefix = f"evaluate/{name}/" if name else "evaluate/"
    values = {prefix + k: v for k, v in numeric(metrics).items()}
    step = evaluation_step(store, run_id)
    for tname in names:
        tracker = make_tracker(tname, cfg, run_id, previous, None)
        if not start_tracker(tracker, None):
            continue
        # W&B refuses a step below the one it reached (a resumed run continues after the
        # training's last step): its next step is used, and the summary keeps the numbers.
        kept = log_to([tracker], values, None if tname == "wandb" else step)
        finish_all(kept)
        if kept:
            log.info("evaluate: %d numbers logged to %s", len(values), tname)
