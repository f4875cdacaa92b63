"""Micro-batch prefetching (medreason.prefetch): the switch, the prefetcher, and a tiny training
run that gives the same losses and adapter with it on and off, across accumulation, an epoch
boundary and a resume from a mid-run checkpoint."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from _fixtures_train import commit_prepare, train_config

from medreason.errors import InputError
from medreason.prefetch import PREFETCH_ENV, Prefetcher, prefetch_enabled
from medreason.store import ArtifactStore


@pytest.mark.parametrize(("value", "on"), [(None, True), ("", True), ("1", True), ("on", True),
                                           ("0", False), ("false", False), (" OFF ", False)])
def test_switch(monkeypatch: pytest.MonkeyPatch, value: str | None, on: bool) -> None:
    if value is None:
        monkeypatch.delenv(PREFETCH_ENV, raising=False)
    else:
        monkeypatch.setenv(PREFETCH_ENV, value)
    assert prefetch_enabled() is on


def test_bad_switch_value_is_an_input_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PREFETCH_ENV, "sometimes")
    with pytest.raises(InputError, match="MEDREASON_PREFETCH='sometimes'"):
        prefetch_enabled()


def test_prefetcher_hands_over_only_the_item_asked_for() -> None:
    threads: list[str] = []

    def load(item: int) -> int:
        threads.append(threading.current_thread().name)
        if item < 0:
            raise ValueError("bad item")
        return item * 10

    on = Prefetcher(load, None, enabled=True)
    try:
        on.ahead(("s", 1), 1)
        assert on.take(("s", 1), 1) == 10 and threads[-1].startswith("prefetch")
        on.ahead(("s", 2), 2)
        assert on.take(("s", 3), 3) == 30 and threads[-1] == threading.current_thread().name  # not 20
        assert on.pending is None
        on.ahead(("s", 4), -1)
        with pytest.raises(ValueError, match="bad item"):
            on.take(("s", 4), -1)
        on.ahead(("s", 5), -1)  # never taken: its failure is dropped on close
    finally:
        on.close()
    off = Prefetcher(load, None, enabled=False)
    off.ahead(("s", 6), 6)
    assert off.pending is None and off.take(("s", 6), 6) == 60
    assert threads[-1] == threading.current_thread().name
    off.close()


def _metrics(store: ArtifactStore, run: str) -> list[tuple]:
    rows = [json.loads(line) for line in store.read_text(f"runs/{run}/train/metrics.jsonl").splitlines()]
    return [(r["step"], r["loss"], r["eval_loss"], r["lr"], r["grad_norm"]) for r in rows]


def _adapter(store: ArtifactStore, run: str) -> dict:
    from safetensors.torch import load_file

    return load_file(store.full(f"runs/{run}/train/adapter/adapter_model.safetensors"))


@pytest.fixture
def take_hits(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """One entry per micro-batch the loop takes: whether it was the one prefetched."""
    hits: list[bool] = []
    take = Prefetcher.take

    def counting_take(self: Prefetcher, key: object, item: object) -> object:
        hits.append(self.pending is not None and self.pending[0] == key)
        return take(self, key, item)

    monkeypatch.setattr(Prefetcher, "take", counting_take)
    return hits


@pytest.mark.parametrize("accum", [1, 2])
def test_training_with_and_without_prefetch_is_identical(tmp_path: Path, tiny_phi_dir: Path, cli_inproc,
                                                         take_hits: list[bool], accum: int) -> None:
    store_uri = str(tmp_path / "store")
    store = ArtifactStore(store_uri)
    # 24 records in micro-batches of 2: 12 per epoch, 12 / accum steps per epoch; 8 steps cross
    # into the second epoch when accum is 2. Dropout 0.1 on, checkpoints at steps 4 and 8.
    steps = 8
    cfg = train_config(tmp_path / "cfg.yaml", max_steps=steps, micro_batch_size=2, grad_accum_steps=accum,
                       save_every_steps=4, eval_every_steps=4)
    for run in ("off", "on"):
        commit_prepare(store_uri, run, cfg, tiny_phi_dir, n_train=24, n_eval=8)
    rc, _out, err = cli_inproc("train", "--store", store_uri, "--run", "off", "--config", cfg,
                               env={PREFETCH_ENV: "0"})
    assert rc == 0, err
    assert take_hits == [False] * steps * accum
    take_hits.clear()
    rc, _out, err = cli_inproc("train", "--store", store_uri, "--run", "on", "--config", cfg)
    assert rc == 0, err
    # Every micro-batch but the run's first was prefetched.
    assert take_hits == [False] + [True] * (steps * accum - 1)
    off = _metrics(store, "off")
    assert len(off) == steps + 1 and _metrics(store, "on") == off  # equal to the last bit
    _assert_same(_adapter(store, "off"), _adapter(store, "on"))

    # As if killed before step 8's checkpoint was committed: the rerun resumes from step 4.
    store.fs.rm(store.full("runs/on/train/MANIFEST.json"))
    store.fs.rm(store.full("runs/on/train/checkpoints/step-8/MANIFEST.json"))
    take_hits.clear()
    rc, _out, err = cli_inproc("train", "--store", store_uri, "--run", "on", "--config", cfg)
    assert rc == 0, err
    assert "resuming from" in err and "step-4" in err
    assert take_hits == [False] + [True] * (4 * accum - 1)
    assert _metrics(store, "on") == off
    _assert_same(_adapter(store, "off"), _adapter(store, "on"))


def _assert_same(a: dict, b: dict) -> None:
    import torch

    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_worker_binds_the_ranks_cuda_device_by_index() -> None:
    import torch

    from medreason.prefetch import _device_index

    assert _device_index(torch.device("cpu")) is None
    assert _device_index(torch.device("cuda", 1)) == 1  # no CUDA call when the index is given
