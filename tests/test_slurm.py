"""The SLURM scripts in slurm/, run on a real single-node cluster (tests/slurm_cluster.py).

Two kinds of test:
- mechanics tests (names start with ``test_mechanics_``): the job command is replaced by a
  stand-in shell script through the MEDREASON_CMD test hook, so signal forwarding, requeueing,
  the requeue cap, exit-code handling, the multi-node rank wiring and the pipeline's dependency
  chain are checked in seconds, without the package;
- end-to-end tests (``test_e2e_``): the real ``medreason`` jobs with the offline demo preset.
  They skip until ``medreason.training`` exists, and then turn on by themselves.

The ``slurm_cluster`` fixture comes from tests/slurm_cluster.py (re-exported by conftest).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from _fixtures_prepare import copy_model_cache
from slurm_cluster import CRED_EXPIRE_S, FINISHED_STATES

REPO_ROOT = Path(__file__).resolve().parents[1]
SLURM_DIR = REPO_ROOT / "slurm"

# A stand-in for a medreason job, for the mechanics tests only. It logs its arguments and the
# restart count, then either exits at once with $STANDIN_EXIT, or behaves like train on a
# preemption signal: it "commits a checkpoint" (a marker file) and exits 75. A rerun that
# finds the marker "resumes" and finishes with 0.
STANDIN = r"""#!/usr/bin/env bash
state="$STANDIN_STATE"
echo "start job=${SLURM_JOB_NAME:-?} restart=${SLURM_RESTART_COUNT:-0} args=$*" >>"$state/log"
if [[ -n "${STANDIN_EXIT:-}" ]]; then
    exit "$STANDIN_EXIT"
fi
if [[ -f "$state/checkpoint" ]]; then
    echo "resumed from checkpoint" >>"$state/log"
    exit 0
fi
on_signal() {
    echo "got $1" >>"$state/log"
    touch "$state/checkpoint"
    exit 75
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM
touch "$state/ready"
# Short sleeps: bash runs a trap only once the foreground command has returned.
for _ in $(seq 1200); do sleep 0.1; done
echo "never signalled" >>"$state/log"
exit 1
"""


def _wait_file(path: Path, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout_s} s")
        time.sleep(0.2)


def _wait_requeued_job_done(cluster: Any, job_id: str, timeout_s: float = 120.0) -> dict[str, str]:
    """Wait for a job that requeues itself to run again and reach its final state.

    A requeue revokes the job's credentials, and slurmd refuses new ones for the same job id
    for cred_expire seconds; slurmctld therefore holds the requeued job back that long
    (BeginTime). Lifting that hold early makes the relaunch fail ("credential revoked") and
    the job end FAILED without running again. So: leave the hold alone until it has expired,
    then nudge the scheduler (its periodic pass can be a minute away). Between the first run's
    exit and the requeue taking effect, the first run's end state can show for a moment: only
    a finished state that lasts counts.
    """
    deadline = time.monotonic() + timeout_s
    pending_since: float | None = None
    finished_since: float | None = None
    nudged_at = 0.0
    while True:
        info = cluster.job_info(job_id)
        state = info.get("JobState")
        restarts = int(info.get("Restarts", "0") or 0)
        now = time.monotonic()
        if state == "COMPLETED" and restarts >= 1:
            return info
        if state == "PENDING" and restarts >= 1:
            pending_since = pending_since or now
            if now - pending_since > CRED_EXPIRE_S + 3 and now - nudged_at > 10:
                cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now", check=False)
                nudged_at = now
        else:
            pending_since = None
        if state in FINISHED_STATES:
            finished_since = finished_since or now
            if now - finished_since > 30:
                return info
        else:
            finished_since = None
        assert now < deadline, f"job {job_id} did not finish in {timeout_s} s: {info}"
        time.sleep(0.5)


@pytest.fixture
def standin(tmp_path: Path) -> dict[str, Any]:
    """Stand-in job command + the environment that makes the scripts use it."""
    script = tmp_path / "standin.sh"
    script.write_text(STANDIN)
    state = tmp_path / "state"
    state.mkdir()
    site_env = tmp_path / "site.env"
    site_env.write_text("# empty: tests pass every setting through the environment\n")
    env = {
        "MEDREASON_HOME": str(REPO_ROOT),
        "MEDREASON_SLURM_ENV": str(site_env),
        "MEDREASON_CMD": f"bash {script}",
        "STANDIN_STATE": str(state),
    }
    return {"env": env, "state": state, "dir": tmp_path}


CPU_FLAGS = ("--gpus-per-node=0", "--cpus-per-task=1")


def test_trivial_sbatch_completes(slurm_cluster: Any, tmp_path: Path) -> None:
    """The cluster itself: a one-line batch job runs and completes."""
    script = tmp_path / "hello.sh"
    script.write_text("#!/bin/bash\necho hello from $SLURM_JOB_ID on $(hostname)\n")
    out = tmp_path / "hello.out"
    job = slurm_cluster.sbatch(f"--output={out}", str(script), cwd=tmp_path)
    info = slurm_cluster.wait_for(job, timeout_s=60)
    assert info["JobState"] == "COMPLETED", info
    assert f"hello from {job}" in out.read_text()


def test_mechanics_train_forwards_usr1_and_requeues(slurm_cluster: Any, standin: dict) -> None:
    """train.sh: USR1 to the batch shell reaches the job; exit 75 requeues; the rerun resumes."""
    out = standin["dir"] / "train.out"
    job = slurm_cluster.sbatch(*CPU_FLAGS, f"--output={out}", str(SLURM_DIR / "train.sh"),
                               "--preset", "demo", "--run", "r1",
                               env=standin["env"], cwd=standin["dir"])
    _wait_file(standin["state"] / "ready")
    # What SLURM does near the time limit with --signal=B:USR1@300: signal the batch shell only.
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", job)
    info = _wait_requeued_job_done(slurm_cluster, job, timeout_s=180)
    assert info["JobState"] == "COMPLETED", (info, out.read_text())
    assert info["Restarts"] == "1"

    log = (standin["state"] / "log").read_text().splitlines()
    assert log[0] == "start job=medreason-train restart=0 args=--preset demo --run r1"
    assert log[1] == "got USR1"
    assert log[2] == "start job=medreason-train restart=1 args=--preset demo --run r1"
    assert log[3] == "resumed from checkpoint"
    batch_log = out.read_text()  # --open-mode=append keeps both runs
    assert "got SIGUSR1; forwarding SIGUSR1" in batch_log
    assert "exit 75: requeueing job" in batch_log
    assert batch_log.count("stage=train") == 2


def test_mechanics_train_requeue_cap(slurm_cluster: Any, standin: dict) -> None:
    """With MEDREASON_MAX_REQUEUES reached, exit 75 ends the job as failed with 75."""
    out = standin["dir"] / "capped.out"
    env = {**standin["env"], "MEDREASON_MAX_REQUEUES": "0"}
    job = slurm_cluster.sbatch(*CPU_FLAGS, f"--output={out}", str(SLURM_DIR / "train.sh"),
                               "--run", "r2", env=env, cwd=standin["dir"])
    _wait_file(standin["state"] / "ready")
    slurm_cluster.run("scancel", "--signal=TERM", "--batch", job)
    info = slurm_cluster.wait_for(job, timeout_s=60)
    assert info["JobState"] == "FAILED", (info, out.read_text())
    assert info["ExitCode"] == "75:0"
    assert info["Restarts"] == "0"
    assert "cap 0 reached: not requeueing" in out.read_text()
    assert "got TERM" in (standin["state"] / "log").read_text()


def test_mechanics_exit_2_is_not_retried(slurm_cluster: Any, standin: dict) -> None:
    """A usage/config/data error (exit 2) fails the job at once, with no requeue."""
    out = standin["dir"] / "bad.out"
    env = {**standin["env"], "STANDIN_EXIT": "2"}
    job = slurm_cluster.sbatch(*CPU_FLAGS, f"--output={out}", str(SLURM_DIR / "evaluate.sh"),
                               "--run", "r3", env=env, cwd=standin["dir"])
    info = slurm_cluster.wait_for(job, timeout_s=60)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "2:0", "0")
    assert "not retrying" in out.read_text()


def test_mechanics_multinode_rank_wiring(slurm_cluster: Any, standin: dict) -> None:
    """train_multinode.sh: each srun task passes its own SLURM_PROCID as --machine_rank and
    the first node of the allocation as the rendezvous address."""
    out = standin["dir"] / "multi.out"
    env = {**standin["env"], "STANDIN_EXIT": "0", "MEDREASON_MAIN_PORT": "29555"}
    job = slurm_cluster.sbatch("--nodes=1", *CPU_FLAGS, f"--output={out}",
                               str(SLURM_DIR / "train_multinode.sh"), "--preset", "demo",
                               "--run", "r4", env=env, cwd=standin["dir"])
    info = slurm_cluster.wait_for(job, timeout_s=60)
    assert info["JobState"] == "COMPLETED", (info, out.read_text())
    line = (standin["state"] / "log").read_text().splitlines()[0]
    args = line.split("args=", 1)[1]
    assert "--num_machines 1 --num_processes 1" in args
    assert "--main_process_ip localhost --main_process_port 29555" in args
    assert "--rdzv_backend c10d --max_restarts 3" in args
    assert "--machine_rank 0" in args
    assert args.endswith("-m jobs.train --preset demo --run r4")
    assert "accelerate_configs/multi_node.yaml" in args


def test_mechanics_pipeline_chain(slurm_cluster: Any, standin: dict) -> None:
    """pipeline.sh submits the four stages chained with afterok and one shared run id."""
    env = {**standin["env"], "STANDIN_EXIT": "0", "MEDREASON_GPUS": "0",
           "MEDREASON_CPUS_PER_TASK": "1"}
    proc = slurm_cluster.run("bash", str(SLURM_DIR / "pipeline.sh"), "--preset", "demo",
                             "--store", "/tmp/nowhere", env=env, cwd=standin["dir"])
    jobs = dict(line.split() for line in proc.stdout.splitlines())
    assert list(jobs) == ["prepare", "train", "evaluate", "merge"]
    deps = {stage: slurm_cluster.job_info(job).get("Dependency", "") for stage, job in jobs.items()}
    for stage, job in jobs.items():
        info = slurm_cluster.wait_for(job, timeout_s=90)
        assert info["JobState"] == "COMPLETED", (stage, info)
    # Dependencies are cleared once satisfied; those still visible must point upstream.
    for stage, upstream in (("train", "prepare"), ("evaluate", "train"), ("merge", "train")):
        assert deps[stage] in ("(null)", "") or f"afterok:{jobs[upstream]}" in deps[stage], deps

    log = (standin["state"] / "log").read_text().splitlines()
    names = [line.split()[1] for line in log]
    assert names[:2] == ["job=medreason-prepare", "job=medreason-train"]
    assert sorted(names[2:]) == ["job=medreason-evaluate", "job=medreason-merge"]
    run_ids = {line.split("--run ", 1)[1].split()[0] for line in log}
    assert len(run_ids) == 1, log  # one generated run id shared by all four stages
    assert all("--preset demo --store /tmp/nowhere" in line for line in log)


# -- end to end: the real jobs -----------------------------------------------------------------
def _have_jobs() -> bool:
    try:
        return importlib.util.find_spec("medreason.training") is not None
    except ImportError:
        return False


needs_jobs = pytest.mark.skipif(not _have_jobs(), reason="medreason.training not written yet")


# Small enough for 2 CPU cores: a few steps, a checkpoint every 2, a short evaluation.
E2E_STEPS = 6
E2E_SETS = ("--set", f"train.max_steps={E2E_STEPS}", "--set", "train.save_every_steps=2",
            "--set", f"train.eval_every_steps={E2E_STEPS}", "--set", "train.micro_batch_size=1",
            "--set", "train.eval_max_batches=1", "--set", "eval.heldout_limit=2",
            "--set", "eval.max_new_tokens=16", "--set", "eval.compare_base=false",
            "--set", "merge.parity_prompts=1")


def _e2e_env(tmp_path: Path) -> dict[str, str]:
    site_env = tmp_path / "site.env"
    site_env.write_text("# empty\n")
    return {"MEDREASON_HOME": str(REPO_ROOT), "MEDREASON_SLURM_ENV": str(site_env)}


def _steps_in(obj: Any) -> list[int]:
    """Every integer under a key naming a step count, anywhere in a manifest."""
    found: list[int] = []
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key in ("global_step", "steps", "final_step", "step", "steps_done") and isinstance(value, int):
                found.append(value)
            found.extend(_steps_in(value))
    elif isinstance(obj, list):
        for value in obj:
            found.extend(_steps_in(value))
    return found


@needs_jobs
@pytest.mark.slow
def test_e2e_pipeline_demo_commits_all_stages(slurm_cluster: Any, tmp_path: Path, demo_store: Any) -> None:
    store = tmp_path / "store"
    copy_model_cache(demo_store, store)  # the SmolLM2 staging (~40 s) is tested elsewhere
    env = {**_e2e_env(tmp_path), "MEDREASON_GPUS": "0",
           "MEDREASON_CPUS_PER_TASK": str(slurm_cluster.cpus)}
    proc = slurm_cluster.run("bash", str(SLURM_DIR / "pipeline.sh"), "--preset", "demo",
                             "--store", str(store), "--run", "e2e", *E2E_SETS, env=env,
                             cwd=tmp_path)
    jobs = dict(line.split() for line in proc.stdout.splitlines())
    for stage in ("prepare", "train", "evaluate", "merge"):
        info = slurm_cluster.wait_for(jobs[stage], timeout_s=900)
        logs = "\n".join(p.read_text() for p in tmp_path.glob("medreason-*.out"))
        assert info["JobState"] == "COMPLETED", (stage, info, logs[-4000:])
        assert (store / "runs" / "e2e" / stage / "MANIFEST.json").exists(), stage


@needs_jobs
@pytest.mark.slow
def test_e2e_train_preempted_requeued_resumes(slurm_cluster: Any, tmp_path: Path, demo_store: Any) -> None:
    store = tmp_path / "store"
    copy_model_cache(demo_store, store)
    # The package's test hook: a pause after every step, so a fast machine cannot finish the
    # remaining steps before the signal lands.
    env = {**_e2e_env(tmp_path), "MEDREASON_TEST_STEP_DELAY_S": "2"}
    common = ("--preset", "demo", "--store", str(store), "--run", "pre", *E2E_SETS)
    cpu = ("--gpus-per-node=0", f"--cpus-per-task={slurm_cluster.cpus}")
    prep = slurm_cluster.sbatch(f"--cpus-per-task={slurm_cluster.cpus}",
                                str(SLURM_DIR / "prepare.sh"), *common, env=env, cwd=tmp_path)
    assert slurm_cluster.wait_for(prep, timeout_s=300)["JobState"] == "COMPLETED"

    out = tmp_path / "train.out"
    job = slurm_cluster.sbatch(*cpu, f"--output={out}", str(SLURM_DIR / "train.sh"), *common,
                               env=env, cwd=tmp_path)
    checkpoints = store / "runs" / "pre" / "train" / "checkpoints"
    deadline = time.monotonic() + 600
    while not list(checkpoints.glob("step-*/MANIFEST.json")):
        assert time.monotonic() < deadline, out.read_text() if out.exists() else "no log"
        assert slurm_cluster.job_state(job) in ("PENDING", "RUNNING"), out.read_text()
        time.sleep(1)
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", job)
    info = _wait_requeued_job_done(slurm_cluster, job, timeout_s=900)
    log = out.read_text()
    assert info["JobState"] == "COMPLETED", (info, log[-4000:])
    assert int(info["Restarts"]) >= 1
    assert "exit 75: requeueing job" in log

    manifest = json.loads((store / "runs" / "pre" / "train" / "MANIFEST.json").read_text())
    assert E2E_STEPS in _steps_in(manifest), (
        f"train manifest does not record {E2E_STEPS} steps: {json.dumps(manifest)[:2000]}")


# -- sweeps: one job array, one run per override line ---------------------------------------------
SWEEP_FILE = """# learning-rate sweep
train.learning_rate=1e-4

train.learning_rate=3e-4 train.seed=7
  # indented comment
train.learning_rate=1e-3
"""


def _sweep_tasks(cluster: Any, array_id: str) -> dict[int, dict[str, str]]:
    """Array task index -> its `scontrol show job` info, for the tasks started so far (the
    tasks still pending share one record, e.g. ArrayTaskId=1-2)."""
    proc = cluster.run("scontrol", "-o", "show", "job", array_id)
    tasks = {}
    for line in proc.stdout.splitlines():
        info = dict(tok.split("=", 1) for tok in line.split() if "=" in tok)
        if info.get("ArrayTaskId", "").isdigit():
            tasks[int(info["ArrayTaskId"])] = info
    return tasks


def test_mechanics_sweep_is_one_array_with_a_run_per_line(slurm_cluster: Any, standin: dict) -> None:
    sweep = standin["dir"] / "lr.txt"
    sweep.write_text(SWEEP_FILE)
    env = {**standin["env"], "STANDIN_EXIT": "0", "MEDREASON_GPUS": "0",
           "MEDREASON_CPUS_PER_TASK": "1", "MEDREASON_SWEEP_MAX_PARALLEL": "2"}
    proc = slurm_cluster.run("bash", str(SLURM_DIR / "sweep.sh"), str(sweep), "--preset", "demo",
                             "--run", "lr", "--store", "/tmp/nowhere", env=env, cwd=standin["dir"])
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("sweep ") and len(lines) == 4, proc.stdout
    array_id = lines[0].split()[1]
    assert lines[1:] == ["0 lr-0 train.learning_rate=1e-4",
                         "1 lr-1 train.learning_rate=3e-4 train.seed=7",
                         "2 lr-2 train.learning_rate=1e-3"]
    info = slurm_cluster.job_info(array_id)
    assert "%2" in info.get("ArrayTaskId", "") or info.get("ArrayTaskThrottle") == "2", info
    deadline = time.monotonic() + 120
    while len(log := (standin["state"] / "log").read_text().splitlines()
               if (standin["state"] / "log").exists() else []) < 3:
        assert time.monotonic() < deadline, log
        time.sleep(0.5)
    slurm_cluster.wait_for(array_id, timeout_s=60)
    by_run = {line.split("--run ", 1)[1].split()[0]: line for line in log}
    assert sorted(by_run) == ["lr-0", "lr-1", "lr-2"]
    assert "--set train.learning_rate=3e-4 --set train.seed=7" in by_run["lr-1"]
    # MEDREASON_CMD stands in for `medreason pipeline`: the arguments are the pipeline's.
    assert all("args=--until evaluate --preset demo --store /tmp/nowhere --run lr-" in line
               for line in log), log
    assert all("job=medreason-sweep" in line for line in log)


def test_mechanics_sweep_rejects_a_bad_file(slurm_cluster: Any, standin: dict) -> None:
    bad = standin["dir"] / "bad.txt"
    bad.write_text("train.learning_rate=1e-4 oops\n")
    proc = slurm_cluster.run("bash", str(SLURM_DIR / "sweep.sh"), str(bad), "--run", "x",
                             env=standin["env"], cwd=standin["dir"], check=False)
    assert proc.returncode == 2 and "'oops' is not KEY=VALUE" in proc.stderr
    proc = slurm_cluster.run("bash", str(SLURM_DIR / "sweep.sh"), str(standin["dir"] / "none"),
                             env=standin["env"], cwd=standin["dir"], check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_mechanics_sweep_task_requeues_alone(slurm_cluster: Any, standin: dict) -> None:
    """A preemption signal to one array task requeues that task only; it resumes its own run
    while the other task completes once, untouched."""
    # Per-task state for the stand-in (its checkpoint marker is per run); task 0 ends at once.
    per_task = standin["dir"] / "per_task.sh"
    per_task.write_text(
        '#!/usr/bin/env bash\n'
        'export STANDIN_STATE="$STANDIN_STATE/$SLURM_ARRAY_TASK_ID"\n'
        'mkdir -p "$STANDIN_STATE"\n'
        '[[ "$SLURM_ARRAY_TASK_ID" == 0 ]] && export STANDIN_EXIT=0\n'
        f'exec bash {standin["dir"] / "standin.sh"} "$@"\n')
    sweep = standin["dir"] / "two.txt"
    sweep.write_text("train.seed=1\ntrain.seed=2\n")
    env = {**standin["env"], "MEDREASON_CMD": f"bash {per_task}", "MEDREASON_GPUS": "0",
           "MEDREASON_CPUS_PER_TASK": "1"}
    proc = slurm_cluster.run("bash", str(SLURM_DIR / "sweep.sh"), str(sweep), "--run", "pre",
                             env=env, cwd=standin["dir"])
    array_id = proc.stdout.split()[1]
    state = standin["state"]
    _wait_file(state / "1" / "ready")
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", f"{array_id}_1")
    info = _wait_requeued_job_done(slurm_cluster, f"{array_id}_1", timeout_s=180)
    assert info["JobState"] == "COMPLETED", info
    assert info["Restarts"] == "1"
    log1 = (state / "1" / "log").read_text().splitlines()
    assert [line.split(" args=")[0] for line in log1] == [
        "start job=medreason-sweep restart=0", "got USR1",
        "start job=medreason-sweep restart=1", "resumed from checkpoint"], log1
    assert all("--run pre-1 --set train.seed=2" in line for line in log1 if "args=" in line)
    # Task 0 ran once: requeueing task 1 by the bare array id would have rerun it too.
    info0 = _sweep_tasks(slurm_cluster, array_id)[0]
    assert info0["JobState"] == "COMPLETED" and info0["Restarts"] == "0", info0
    out0 = "\n".join(p.read_text() for p in standin["dir"].glob("medreason-sweep-*_0.out"))
    assert out0.count("stage=sweep[0]") == 1 and "requeueing" not in out0, out0
    assert len((state / "0" / "log").read_text().splitlines()) == 1


@needs_jobs
@pytest.mark.slow
def test_e2e_sweep_of_three_demo_trainings(slurm_cluster: Any, tmp_path: Path, demo_store: Any) -> None:
    """A 3-task array of tiny demo trainings (prepare -> train -> evaluate each) runs to the
    end; each run commits its evaluation, and the headline metrics are listed per run."""
    store = tmp_path / "store"
    copy_model_cache(demo_store, store)
    sweep = tmp_path / "sweep.txt"
    sweep.write_text("train.learning_rate=1e-4\ntrain.learning_rate=1e-3\n"
                     "train.learning_rate=1e-2\n")
    env = {**_e2e_env(tmp_path), "MEDREASON_GPUS": "0",
           "MEDREASON_CPUS_PER_TASK": str(slurm_cluster.cpus)}
    proc = slurm_cluster.run("bash", str(SLURM_DIR / "sweep.sh"), str(sweep), "--preset", "demo",
                             "--store", str(store), "--run", "sw", *E2E_SETS, env=env, cwd=tmp_path)
    array_id = proc.stdout.split()[1]
    deadline = time.monotonic() + 1500
    tasks: dict[int, dict[str, str]] = {}
    while True:
        # Accumulated: slurmctld forgets a finished task after MinJobAge (300 s), long before
        # the last of three CPU trainings ends.
        tasks.update(_sweep_tasks(slurm_cluster, array_id))
        if len(tasks) == 3 and all(t["JobState"] in FINISHED_STATES for t in tasks.values()):
            break
        assert time.monotonic() < deadline, tasks
        time.sleep(2)
    logs = "\n".join(p.read_text() for p in tmp_path.glob("medreason-sweep-*.out"))
    assert all(t["JobState"] == "COMPLETED" for t in tasks.values()), (tasks, logs[-4000:])
    table = []
    for i, lr in enumerate(("1e-4", "1e-3", "1e-2")):
        manifest = json.loads((store / "runs" / f"sw-{i}" / "evaluate" / "MANIFEST.json").read_text())
        train = json.loads((store / "runs" / f"sw-{i}" / "train" / "MANIFEST.json").read_text())
        assert train["config"]["train"]["learning_rate"] == float(lr)
        assert manifest["metrics"], manifest
        table.append(f"sw-{i} lr={lr} " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                 for k, v in sorted(manifest["metrics"].items())))
    print("\n".join(table))
    # The three runs side by side: `medreason compare` names the one config key that differs.
    out = tmp_path / "comparison"
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "compare", "sw-0", "sw-1", "sw-2",
                           "--store", str(store), "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table_md = (out / "comparison.md").read_text()
    assert all(f"sw-{i}" in table_md for i in range(3)), table_md
    assert "train.learning_rate" in table_md, table_md
    print(table_md)
