"""Fixtures shared by the prepare tests (import them by name into a test module).

``demo_store``: one real ``medreason prepare --preset demo`` run in a subprocess, offline, into a
session-wide store. Staging the SmolLM2 GGUF costs ~40 s, so it happens once per session even
when several test modules import this fixture (pytest makes one fixture per importing module;
the module-level cache below makes them share the result).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class DemoRun:
    store: Path
    run_id: str
    returncode: int
    stdout: str
    stderr: str
    mtimes: dict[str, float]

    @property
    def stage_dir(self) -> Path:
        return self.store / "runs" / self.run_id / "prepare"

    def staged_model_dir(self) -> Path:
        found = sorted((self.store / "cache" / "models").glob("smollm2-135m-instruct@*"))
        assert found, "no staged SmolLM2 folder"
        return found[0]


_CACHE: dict[str, DemoRun] = {}


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: str | Path | None = None,
            timeout_s: float = 600) -> subprocess.CompletedProcess[str]:
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), full_env.get("PYTHONPATH", "")) if p)
    full_env["HF_HUB_OFFLINE"] = "1"
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "jobs.cli", *map(str, args)], env=full_env,
                          cwd=str(cwd or REPO_ROOT), capture_output=True, text=True, timeout=timeout_s)


def file_mtimes(folder: Path) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def demo_store(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path) -> DemoRun:
    if "demo" not in _CACHE:
        store = tmp_path_factory.mktemp("demo_store")
        proc = run_cli("prepare", "--preset", "demo", "--store", store, "--run", "r1")
        _CACHE["demo"] = DemoRun(store, "r1", proc.returncode, proc.stdout, proc.stderr, file_mtimes(store))
    return _CACHE["demo"]


def copy_model_cache(demo: DemoRun, store: Path) -> None:
    """Give another local store the staged SmolLM2 (a copy, so tests cannot spoil the original)."""
    target = store / "cache" / "models"
    target.mkdir(parents=True, exist_ok=True)
    src = demo.staged_model_dir()
    shutil.copytree(src, target / src.name)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


_WORDS = (
    "fever cough dyspnea chest pain abdominal tenderness jaundice rash edema syncope palpitations "
    "headache vomiting diarrhea weight loss fatigue hematuria proteinuria anemia leukocytosis "
    "thrombocytopenia hypotension tachycardia bradycardia murmur crackles wheeze cyanosis clubbing "
    "ascites splenomegaly hepatomegaly lymphadenopathy arthralgia myalgia paresthesia ataxia tremor "
    "seizure confusion polyuria polydipsia hyperkalemia hyponatremia acidosis alkalosis infiltrate "
    "effusion nodule mass ulcer stricture fistula abscess hemorrhage infarct thrombus embolus"
).split()


def make_records(n: int, start: int = 0, dataset: str = "medqa") -> list[dict]:
    """Distinct small MedReason-shaped records (answers are option texts, letters known). Each
    question is its own random word sequence, so no two share a run of 8 words."""
    import random

    rows = []
    for i in range(start, start + n):
        rng = random.Random(i)
        opts = [f"drug {i} alpha", f"drug {i} beta", f"drug {i} gamma", f"drug {i} delta"]
        rows.append({
            "dataset_name": dataset,
            "id_in_dataset": i,
            "question": f"Patient {i} has " + " ".join(rng.choices(_WORDS, k=20)) + ". What is the treatment?",
            "options": "Answer Choices:\n" + "\n".join(f"{'ABCD'[k]}. {o}" for k, o in enumerate(opts)),
            "reasoning": f"Finding reasoning paths:\n1. fever -> infection -> {opts[i % 4]}\n\n"
                         f"Reasoning Process:\nThe findings of patient {i} point to {opts[i % 4]}.",
            "answer": opts[i % 4],
        })
    return rows


HUB_SHA = "0123456789abcdef0123456789abcdef01234567"


def offline_hub_dataset(monkeypatch: pytest.MonkeyPatch, cache: Path, repo_id: str,
                        files: dict[str, bytes], sha: str = HUB_SHA) -> str:
    """A hub dataset as huggingface_hub's own cache lays it out (refs/main -> snapshots/<sha>/),
    read offline: hf_hub_download resolves it exactly as after a real download. Returns the sha."""
    from huggingface_hub import constants

    repo = cache / f"datasets--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(sha)
    for name, raw in files.items():
        path = repo / "snapshots" / sha / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(raw)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return sha
