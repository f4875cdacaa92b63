"""The artifact store, on a local folder and on S3 (a real moto server reached over HTTP)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from medreason.errors import InputError
from medreason.store import (
    MANIFEST,
    ArtifactStore,
    build_manifest,
    manifest_hash,
    model_cache_name,
    redact,
    validate_segment,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    if request.param == "local":
        return ArtifactStore(str(tmp_path / "store"))
    return ArtifactStore(request.getfixturevalue("s3_bucket"))


def _write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def _files(n: int = 3) -> dict[str, bytes]:
    out = {f"part-{i}.bin": os.urandom(1000 + 17 * i) for i in range(n)}
    out["nested/deeper/notes.txt"] = b"hello\n"
    out["empty.txt"] = b""
    return out


def _manifest(stage: str = "prepare", config_hash: str = "c" * 64, **kw) -> dict:
    return build_manifest(stage=stage, run_id="run-1", config={"k": 1}, config_hash=config_hash, **kw)


# -- commit, read, verify ----------------------------------------------------------------------
def test_commit_dir_lists_every_file_with_matching_size_and_sha256(store, tmp_path):
    files = _files()
    local = _write_tree(tmp_path / "out", files)
    rel = store.stage_rel("run-1", "prepare")
    returned = store.commit_dir(str(local), rel, _manifest(metrics={"n": 3}))

    manifest = store.read_manifest(rel)
    assert manifest == returned
    assert set(manifest["files"]) == set(files)
    for name, data in files.items():
        stored = store.read_bytes(f"{rel}/{name}")
        assert stored == data
        assert manifest["files"][name] == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert manifest["metrics"] == {"n": 3}
    assert manifest["config_hash"] == "c" * 64
    assert "committed_at" in manifest and "torch" in manifest["versions"]
    assert store.is_committed(rel)
    assert store.verify(rel) == manifest
    assert store.listdir(rel) == sorted([MANIFEST, "empty.txt", "nested", *[f"part-{i}.bin" for i in range(3)]])


def test_manifest_is_written_after_every_file(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    local = _write_tree(tmp_path / "out", _files(20))
    rel = store.stage_rel("run-1", "train")
    store.commit_dir(str(local), rel, _manifest("train"))
    root = Path(store.full(rel))
    manifest_time = (root / MANIFEST).stat().st_mtime_ns
    others = [p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() and p.name != MANIFEST]
    assert len(others) == 22 and max(others) <= manifest_time


def test_read_manifest_is_none_when_not_committed(store, tmp_path):
    rel = store.stage_rel("run-1", "prepare")
    assert store.read_manifest(rel) is None
    assert not store.is_committed(rel)
    # files without a manifest are, by definition, not there
    store.write_bytes(f"{rel}/train.jsonl", b"{}\n")
    assert store.read_manifest(rel) is None
    with pytest.raises(InputError, match="not committed"):
        store.verify(rel)
    with pytest.raises(InputError, match="not committed"):
        store.materialize(rel)


def test_verify_catches_truncated_file(store, tmp_path):
    local = _write_tree(tmp_path / "out", _files())
    rel = store.stage_rel("run-1", "prepare")
    store.commit_dir(str(local), rel, _manifest())
    data = store.read_bytes(f"{rel}/part-1.bin")
    store.write_bytes(f"{rel}/part-1.bin", data[:-5])
    with pytest.raises(InputError, match=r"part-1\.bin has \d+ bytes"):
        store.verify(rel)


def test_verify_catches_missing_file(store, tmp_path):
    local = _write_tree(tmp_path / "out", _files())
    rel = store.stage_rel("run-1", "prepare")
    store.commit_dir(str(local), rel, _manifest())
    store.fs.rm(store.full(f"{rel}/nested/deeper/notes.txt"))
    with pytest.raises(InputError, match=r"notes\.txt is listed .* but missing"):
        store.verify(rel)


def test_verify_catches_same_size_modification_locally(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    local = _write_tree(tmp_path / "out", _files())
    rel = store.stage_rel("run-1", "prepare")
    store.commit_dir(str(local), rel, _manifest())
    path = Path(store.full(f"{rel}/part-0.bin"))
    data = bytearray(path.read_bytes())
    data[10] ^= 0xFF
    path.write_bytes(bytes(data))
    store.verify(rel, hashes=False)  # sizes alone cannot see it
    with pytest.raises(InputError, match=r"part-0\.bin does not match its sha256"):
        store.verify(rel)
    with pytest.raises(InputError, match="sha256"):
        store.materialize(rel)


def test_materialize_local_returns_the_folder_itself(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    local = _write_tree(tmp_path / "out", _files())
    rel = store.stage_rel("run-1", "prepare")
    store.commit_dir(str(local), rel, _manifest())
    assert store.materialize(rel) == store.full(rel)


def test_materialize_s3_downloads_verifies_and_caches(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDREASON_LOCAL_CACHE", str(tmp_path / "cache"))
    store = ArtifactStore(s3_bucket)
    files = _files()
    local = _write_tree(tmp_path / "out", files)
    rel = store.stage_rel("run-1", "train")
    manifest = store.commit_dir(str(local), rel, _manifest("train"))

    folder = Path(store.materialize(rel))
    assert folder.is_relative_to(tmp_path / "cache")
    for name, data in files.items():
        assert (folder / name).read_bytes() == data
    assert json.loads((folder / MANIFEST).read_text()) == manifest
    assert not [p for p in folder.parent.iterdir() if ".tmp-" in p.name]

    # The second call is served from the cache: it works even with the objects gone.
    for name in files:
        store.fs.rm(store.full(f"{rel}/{name}"))
    assert Path(store.materialize(rel)) == folder


def test_materialize_s3_refuses_a_corrupted_object_and_caches_nothing(s3_bucket, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("MEDREASON_LOCAL_CACHE", str(cache))
    store = ArtifactStore(s3_bucket)
    local = _write_tree(tmp_path / "out", _files())
    rel = store.stage_rel("run-1", "train")
    store.commit_dir(str(local), rel, _manifest("train"))
    data = bytearray(store.read_bytes(f"{rel}/part-2.bin"))
    data[0] ^= 0x01
    store.write_bytes(f"{rel}/part-2.bin", bytes(data))
    store.verify(rel)  # same size: the remote check compares sizes only
    with pytest.raises(InputError, match=r"part-2\.bin does not match its sha256"):
        store.materialize(rel)
    leftovers = list((cache / "store").iterdir()) if (cache / "store").exists() else []
    assert leftovers == []


def test_materialize_s3_keeps_the_folder_another_reader_finished_first(s3_bucket, tmp_path, monkeypatch):
    """Two readers racing: the loser must not delete the cache folder the winner hands out."""
    monkeypatch.setenv("MEDREASON_LOCAL_CACHE", str(tmp_path / "cache"))
    store = ArtifactStore(s3_bucket)
    local = _write_tree(tmp_path / "out", _files())
    rel = store.stage_rel("run-1", "train")
    store.commit_dir(str(local), rel, _manifest("train"))
    target = Path(store.materialize(rel))
    winner = tmp_path / "winner"
    target.rename(winner)  # the loser's cache check misses it ...
    (winner / "in-use").write_text("a reader has this open")
    real_get_file = store.fs.get_file

    def get_file_while_winner_finishes(rpath, lpath, **kw):
        real_get_file(rpath, lpath, **kw)
        if winner.exists():  # ... and the winner's rename lands while the loser downloads
            winner.rename(target)

    monkeypatch.setattr(store.fs, "get_file", get_file_while_winner_finishes)
    assert Path(store.materialize(rel)) == target
    assert (target / "in-use").exists()
    assert (target / MANIFEST).exists()
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no temp folder left


# -- commits replacing commits -------------------------------------------------------------------
def test_commit_clear_replaces_and_clear_false_keeps_other_files(store, tmp_path):
    rel = store.stage_rel("run-1", "train")
    ckpt = f"{rel}/checkpoints/step-5"
    store.commit_dir(str(_write_tree(tmp_path / "ck", {"adapter_model.safetensors": b"w" * 100})), ckpt,
                     _manifest("checkpoint"))
    store.write_bytes(f"{rel}/metrics.jsonl", b'{"step": 1}\n')

    final = _write_tree(tmp_path / "final", {"adapter/adapter_config.json": b"{}", "metrics.jsonl": b"{}\n"})
    store.commit_dir(str(final), rel, _manifest("train"), clear=False)
    assert store.is_committed(ckpt)
    store.verify(ckpt)
    assert store.list_committed(f"{rel}/checkpoints", prefix="step-") == ["step-5"]
    assert store.read_bytes(f"{rel}/metrics.jsonl") == b"{}\n"
    # a second clear=False commit removes the old manifest but keeps files it does not list
    store.commit_dir(str(_write_tree(tmp_path / "again", {"metrics.jsonl": b"[]\n"})), rel,
                     _manifest("train"), clear=False)
    assert set(store.read_manifest(rel)["files"]) == {"metrics.jsonl"}
    assert store.exists(f"{rel}/adapter/adapter_config.json")

    # clear=True wipes everything that was there, checkpoints included
    store.commit_dir(str(_write_tree(tmp_path / "fresh", {"x.txt": b"x"})), rel, _manifest("train"))
    assert not store.exists(f"{rel}/checkpoints/step-5/{MANIFEST}")
    assert not store.exists(f"{rel}/adapter/adapter_config.json")
    assert set(store.read_manifest(rel)["files"]) == {"x.txt"}


def test_uncommit_and_missing_listings(store):
    assert store.listdir("runs/nothing-here") == []
    assert store.list_committed("runs/nothing-here/train/checkpoints") == []
    store.remove("runs/nothing-here")  # no error on a missing folder
    store.uncommit("runs/nothing-here/prepare")


def test_exists_sees_changes_made_through_another_instance(store):
    """No stale listings: a second process (here a second store object) sees commits at once."""
    other = ArtifactStore(store.uri)
    rel = "runs/run-1/prepare"
    assert not store.is_committed(rel)
    assert store.listdir("runs/run-1") == []
    other.write_json(f"{rel}/{MANIFEST}", {"files": {}})
    assert store.is_committed(rel)
    assert store.listdir("runs/run-1") == ["prepare"]
    other.uncommit(rel)
    assert not store.is_committed(rel)
    assert store.read_manifest(rel) is None


def test_write_bytes_leaves_no_temp_files(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    store.write_json("a/b/c.json", {"x": 1})
    store.write_bytes("a/b/c.json", b"replaced")
    assert [p.name for p in (tmp_path / "store" / "a" / "b").iterdir()] == ["c.json"]
    assert store.read_text("a/b/c.json") == "replaced"


def test_listdir_hides_a_killed_writers_temp_files(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    store.write_bytes("runs/r/train/metrics.jsonl", b"{}\n")
    (tmp_path / "store/runs/r/train/.adapter.bin.tmp-1a2b3c4d").write_bytes(b"half")
    assert store.listdir("runs/r/train") == ["metrics.jsonl"]


def test_store_uri_forms(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    relative = ArtifactStore("artifacts")
    assert relative.is_local and relative.root == str(tmp_path / "artifacts")
    file_uri = ArtifactStore(f"file://{tmp_path}/other/")
    assert file_uri.is_local and file_uri.root == f"{tmp_path}/other"
    assert (tmp_path / "other").is_dir()
    with pytest.raises(InputError, match="--store"):
        ArtifactStore("")
    with pytest.raises(InputError, match="unsupported storage"):
        ArtifactStore("nosuchproto://bucket/x")


# -- a writer killed in the middle -----------------------------------------------------------------
_WRITER = textwrap.dedent("""
    import os, sys
    from medreason.store import ArtifactStore, build_manifest
    uri, src, rel, n_files = sys.argv[1:5]
    os.makedirs(src, exist_ok=True)
    # Many 64 KiB files, one PUT or fsync'd rename each (~1-20 ms apiece), so the commit lasts
    # long enough to be killed part-way; every 50th is 4 MiB, which makes it likely that the
    # kill lands inside a file copy.
    for i in range(int(n_files)):
        size = (4 << 20) if i % 50 == 25 else (64 << 10)
        with open(os.path.join(src, f"f{i:04d}.bin"), "wb") as fh:
            fh.write(os.urandom(size))
    print("ready", flush=True)
    manifest = build_manifest(stage="prepare", run_id="run-1", config={}, config_hash="h")
    ArtifactStore(uri).commit_dir(src, rel, manifest)
    print("done", flush=True)
""")


def _visible_files(store: ArtifactStore, rel: str) -> list[str]:
    root = store.full(rel)
    try:
        found = store.fs.find(root)
    except FileNotFoundError:
        return []
    return [p[len(root) + 1:] for p in found]


def test_writer_killed_mid_commit_leaves_no_commit_and_no_partial_file(store, tmp_path):
    rel = store.stage_rel("run-1", "prepare")
    # a previous, complete commit of the same stage (a --force redo is what gets killed)
    store.commit_dir(str(_write_tree(tmp_path / "old", {"old.txt": b"old"})), rel, _manifest())
    src = tmp_path / "src"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    n_files = 150 if store.is_local else 60  # a moto PUT costs ~30 ms, a local fsync+rename ~5 ms
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, store.uri, str(src), rel, str(n_files)],
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            names = [n for n in _visible_files(store, rel) if n.startswith("f0")]
            if len(names) >= 10:
                break
            assert proc.poll() is None, "writer ended before it could be killed"
            # each S3 listing is a request the moto server also has to serve the writer's PUTs
            # between, so poll it gently; the local folder costs nothing to look at.
            time.sleep(0.005 if store.is_local else 0.1)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    assert store.read_manifest(rel) is None
    assert not store.is_committed(rel)
    visible = _visible_files(store, rel)
    assert MANIFEST not in visible
    assert len(visible) < n_files
    for name in visible:
        base = name.rsplit("/", 1)[-1]
        if ".tmp-" in base:
            assert store.is_local and base.startswith("."), f"temp file {name} on a remote store"
            continue
        # anything under its final name is complete
        assert store.fs.size(store.full(f"{rel}/{name}")) == (src / name).stat().st_size, name

    assert all(".tmp-" not in n for n in store.listdir(rel))  # listings never show temp files
    # the next commit succeeds and cleans up whatever the killed writer left
    store.commit_dir(str(src), rel, _manifest())
    store.verify(rel)
    assert sorted(_visible_files(store, rel)) == sorted([MANIFEST, *(p.name for p in src.iterdir())])


def test_killed_checkpoint_writer_leaves_previous_checkpoint_intact(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    ckpts = "runs/run-1/train/checkpoints"
    store.commit_dir(str(_write_tree(tmp_path / "s1", {"adapter.bin": b"1" * 1000})), f"{ckpts}/step-1",
                     _manifest("checkpoint"))
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, store.uri, str(tmp_path / "src"), f"{ckpts}/step-2",
                             "100"],
                            stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    try:
        assert proc.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(_visible_files(store, f"{ckpts}/step-2")) < 5:
            time.sleep(0.005)
    finally:
        proc.kill()
        proc.wait()
    assert store.list_committed(ckpts, prefix="step-") == ["step-1"]
    store.verify(f"{ckpts}/step-1")


# -- names -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("good", ["run-1", "r1.v2", "RUN_2024-01-01", "a", "x@y+z=w", "a" * 128])
def test_validate_segment_accepts(good):
    assert validate_segment(good) == good


@pytest.mark.parametrize("bad", [
    "", "   ", None, ".", "..", "../x", "a/../b", "/etc/passwd", "/abs", "a/b", "%2e%2e", "%2E%2E%2Fx",
    "run%2F1", "s3://x", "file:///etc", "http://evil", "a\\b", "..\\x", ".hidden", "-flag", "a..b",
    "run 1", "run-1\n", "run-1\r\n", "\nrun-1", "tab\tid", "a" * 129, "ünïcode", "a:b", "a?b", "a#b", "~",
])
def test_validate_segment_rejects(bad):
    with pytest.raises(InputError):
        validate_segment(bad)


def test_validate_segment_message_names_what():
    with pytest.raises(InputError, match="--run '../x' is not allowed"):
        validate_segment("../x", "--run")


@pytest.mark.parametrize(("name", "revision", "expected"), [
    ("microsoft/phi-2", None, "microsoft--phi-2@main"),
    ("microsoft/phi-2", "ef382358ec9e382308935a992d908de099b64c23",
     "microsoft--phi-2@ef382358ec9e382308935a992d908de099b64c23"),
    ("smollm2-135m-instruct", None, "smollm2-135m-instruct@main"),
    ("s3://bucket/models/phi/", "v1", "bucket--models--phi@v1"),
    ("../../etc/passwd", None, "etc--passwd@main"),
    ("org/model", "refs/pr/1", "org--model@refs-pr-1"),
])
def test_model_cache_name(name, revision, expected):
    assert model_cache_name(name, revision) == expected


def test_model_cache_name_is_always_a_valid_segment():
    for name in ["/" * 5, "a" * 500, "..", "%2e%2e/x", "C:\\models\\phi", "hf.co/org/m?x=1", "🙂"]:
        out = model_cache_name(name, "r" * 100)
        assert validate_segment(out, "model cache name") == out
        assert len(out) <= 128


# -- stages ------------------------------------------------------------------------------------
def test_manifest_hash_is_order_independent():
    a = {"b": 1, "a": {"y": 2, "x": [1, 2]}}
    b = {"a": {"x": [1, 2], "y": 2}, "b": 1}
    assert manifest_hash(a) == manifest_hash(b)
    assert manifest_hash(a) != manifest_hash({**a, "b": 2})


def test_build_manifest_records_config_inputs_and_versions():
    from medreason.config import Config

    cfg = Config()
    m = build_manifest(stage="train", run_id="r", config=cfg, config_hash=cfg.stage_hash("train"),
                       inputs={"z": "1", "a": "2"}, timings_s={"total": 1.23456}, metrics={"loss": 1.0})
    assert m["config"]["lora"]["r"] == 32
    assert list(m["inputs"]) == ["a", "z"]
    assert m["timings_s"] == {"total": 1.235}
    assert m["code_version"].startswith(m["versions"]["medreason"])
    json.dumps(m)  # JSON-serializable as committed


# -- credentials -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("uri", "secret"), [
    ("s3://AKIAEXAMPLE:wJalrXUtnFEMI@bucket/prefix", "wJalrXUtnFEMI"),
    ("https://user:hunter2@minio.local:9000/bucket", "hunter2"),
    ("https://token-only@host/x", "token-only"),
    ("s3://bucket/x?X-Amz-Signature=abcdef123&X-Amz-Credential=AKIAXYZ", "abcdef123"),
    ("https://host/x?token=sekret&part=1", "sekret"),
])
def test_redact_hides_credentials(uri, secret):
    out = redact(uri)
    assert secret not in out
    assert "***" in out


def test_redact_keeps_plain_uris():
    for uri in ["s3://bucket/prefix", "/local/path", "https://host:9000/b?part=1", "file:///x"]:
        assert redact(uri) == uri


def test_store_display_and_repr_hide_credentials():
    with pytest.raises(InputError) as refused:  # credentials in the URI are refused, masked
        ArtifactStore("s3://AKIAKEY:supersecret@bucket/x")  # as a user might type it
    assert "supersecret" not in str(refused.value) and "bucket/x" in str(refused.value)
    store = ArtifactStore("s3://bucket/x")
    assert store.display("runs/r/prepare").endswith("bucket/x/runs/r/prepare")


def test_manifests_never_contain_aws_secrets(store, tmp_path, monkeypatch):
    secret = "SECRETxyz" + os.urandom(8).hex()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret if not store.uri.startswith("s3") else "testing")
    monkeypatch.setenv("AWS_SESSION_TOKEN_FOR_TEST", secret)
    monkeypatch.setenv("HF_TOKEN", secret)
    if store.uri.startswith("s3"):
        # moto checks nothing, but the secret must still not travel into the manifest
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        store = ArtifactStore(store.uri)
    from medreason.config import Config

    cfg = Config()
    rel = store.stage_rel("run-1", "prepare")
    store.commit_dir(str(_write_tree(tmp_path / "o", {"a.txt": b"a"})), rel,
                     build_manifest(stage="prepare", run_id="run-1", config=cfg,
                                    config_hash=cfg.stage_hash("prepare")))
    text = store.read_text(f"{rel}/{MANIFEST}")
    assert secret not in text
    assert "AWS_SECRET_ACCESS_KEY" not in text and "HF_TOKEN" not in text
