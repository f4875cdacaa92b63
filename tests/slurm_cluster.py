"""A real single-node SLURM cluster for tests: munged + slurmctld + slurmd on loopback.

Use the session-scoped fixture ``slurm_cluster``; it yields a :class:`SlurmCluster` whose
``env`` (with ``SLURM_CONF`` pointing at a private slurm.conf) is what every ``sbatch``,
``squeue``, ``scontrol`` ... call must run with. Nothing touches the system's /etc/slurm or
/run/munge: the key, the socket, the state and spool folders and the logs all live in one
temporary folder that is removed afterwards.

Needs the Debian packages ``slurm-wlm`` and ``munge``. Without them (or where the daemons do
not come up, e.g. not root) the fixture skips with the reason.

Settings worth knowing, with why:
- proctrack/pgid + task/none: no cgroups, so it runs inside containers and CI sandboxes.
- select/cons_tres with CR_CPU: CPUs are the only consumable, so two 1-CPU jobs can share a
  2-core runner and no test has to think about memory limits.
- JobRequeue=1: batch jobs are requeueable by default, as the preemption path expects.
- AuthInfo cred_expire=10: a requeued job waits cred_expire before it may start again
  (default 120 s), which would make every requeue test take minutes.
- Random free ports for slurmctld/slurmd, so a system slurm on 6817/6818 is never hit.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "squeue", "scontrol", "sinfo", "scancel")
START_TIMEOUT_S = 60.0
# How long slurmd refuses a job id's new credentials after the job's old ones were revoked (a
# requeue revokes them). slurmctld holds a requeued job back that long; the default is 120 s.
CRED_EXPIRE_S = 10
FINISHED_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
    "PREEMPTED", "BOOT_FAIL", "DEADLINE",
}


def _find(program: str) -> str | None:
    # The daemons live in /usr/sbin, which is not on every PATH (e.g. a non-login shell).
    return shutil.which(program) or shutil.which(program, path="/usr/sbin:/usr/bin:/sbin:/bin")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """preexec_fn: have the kernel SIGTERM a daemon when the test process dies, so a killed
    pytest (timeout, Ctrl-C twice) leaves no slurmctld/slurmd/munged behind."""
    try:
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _mem_total_mb() -> int:
    with open("/proc/meminfo", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 1024


@dataclass
class SlurmCluster:
    """Handle to the running test cluster."""

    root: Path
    conf_path: Path
    env: dict[str, str]
    cpus: int
    partition: str = "debug"
    procs: list[subprocess.Popen] = field(default_factory=list)

    # -- client helpers ---------------------------------------------------------------------
    def run(self, *args: str, check: bool = True, timeout_s: float = 30.0,
            env: dict[str, str] | None = None, cwd: str | os.PathLike | None = None,
            ) -> subprocess.CompletedProcess:
        """Run a SLURM client (or any command) against this cluster."""
        full_env = dict(self.env)
        if env:
            full_env.update(env)
        proc = subprocess.run(list(args), env=full_env, cwd=cwd, capture_output=True,
                              text=True, timeout=timeout_s)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout}\n"
                f"stderr:\n{proc.stderr}"
            )
        return proc

    def sbatch(self, *args: str, env: dict[str, str] | None = None,
               cwd: str | os.PathLike | None = None) -> str:
        """Submit with ``sbatch --parsable``; returns the job id."""
        out = self.run("sbatch", "--parsable", *args, env=env, cwd=cwd).stdout.strip()
        return out.split(";", 1)[0]

    def job_info(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (empty once the job has aged out)."""
        proc = self.run("scontrol", "-o", "show", "job", job_id, check=False)
        if proc.returncode != 0:
            return {}
        info: dict[str, str] = {}
        for token in proc.stdout.split():
            key, sep, value = token.partition("=")
            if sep:
                info.setdefault(key, value)
        return info

    def job_state(self, job_id: str) -> str:
        return self.job_info(job_id).get("JobState", "UNKNOWN")

    def wait_for(self, job_id: str, states: set[str] | None = None,
                 timeout_s: float = 120.0) -> dict[str, str]:
        """Poll until the job reaches one of ``states`` (default: any finished state)."""
        wanted = states or FINISHED_STATES
        deadline = time.monotonic() + timeout_s
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job_info(job_id)
            if info.get("JobState") in wanted:
                return info
            time.sleep(0.5)
        raise AssertionError(
            f"job {job_id} did not reach {sorted(wanted)} in {timeout_s} s; last: {info}\n"
            f"{self.logs_tail()}"
        )

    def logs_tail(self, lines: int = 30) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log", "munged.log"):
            path = self.root / "log" / name
            if path.exists():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {name} ---\n" + "\n".join(text))
        return "\n".join(parts)

    # -- lifecycle ----------------------------------------------------------------------------
    def stop(self) -> None:
        # Cancel what is left and let slurmd reap it (SIGTERM, then SIGKILL after KillWait=5 s):
        # a slurmstepd whose slurmd is gone would linger with its job.
        self.run("scancel", "--partition", self.partition, check=False, timeout_s=10)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            left = self.run("squeue", "-h", "-o", "%i", check=False, timeout_s=10)
            if left.returncode != 0 or not left.stdout.strip():
                break
            time.sleep(0.5)
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self.procs.clear()


def _slurm_conf(root: Path, hostname: str, cpus: int, mem_mb: int, ctld_port: int,
                slurmd_port: int, munge_socket: Path, partition: str) -> str:
    return f"""\
# Generated by tests/slurm_cluster.py: single node on loopback, no cgroups.
ClusterName=medreason-test
SlurmctldHost={hostname}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket},cred_expire={CRED_EXPIRE_S}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
PlugStackConfig={root}/plugstack.conf
JobRequeue=1
ReturnToService=2
MinJobAge=600
KillWait=5
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
MaxJobCount=1000
NodeName=localhost NodeHostname={hostname} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName={partition} Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""


def start_cluster(root: Path) -> SlurmCluster:
    """Start munged, slurmctld and slurmd under ``root``; skip the test where that can't be."""
    missing = [p for p in DAEMONS + CLIENTS if _find(p) is None]
    if missing:
        pytest.skip(
            f"SLURM/munge not installed (missing {', '.join(missing)}); "
            "install with: apt-get install -y slurm-wlm munge"
        )
    if os.geteuid() != 0:
        pytest.skip("the test SLURM cluster runs slurmd as root; not root here")

    for sub in ("state", "spool", "run", "log", "munge"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    # munged refuses key/socket folders that others can write to.
    os.chmod(root, 0o700)
    os.chmod(root / "munge", 0o700)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    os.chmod(key, 0o400)
    munge_socket = root / "munge" / "munge.socket"

    hostname = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 1
    # Leave some memory to the OS so slurmd doesn't mark the node invalid (it drains a node
    # whose configured RealMemory exceeds what it finds).
    mem_mb = max(256, int(_mem_total_mb() * 0.9))
    partition = "debug"
    conf_path = root / "slurm.conf"
    conf_path.write_text(_slurm_conf(root, hostname, cpus, mem_mb, _free_port(), _free_port(),
                                     munge_socket, partition))
    # Empty plugstack so site SPANK plugins (pyxis, ...) from /etc/slurm are not loaded.
    (root / "plugstack.conf").write_text("")

    env = dict(os.environ)
    env["SLURM_CONF"] = str(conf_path)
    # A job submitted from inside another allocation would inherit its SLURM_* settings.
    for name in list(env):
        if name.startswith(("SLURM_", "SBATCH_", "SALLOC_", "SRUN_")) and name != "SLURM_CONF":
            del env[name]
    env["PATH"] = env.get("PATH", "") + ":/usr/sbin:/sbin"
    cluster = SlurmCluster(root=root, conf_path=conf_path, env=env, cpus=cpus,
                           partition=partition)

    def spawn(*cmd: str) -> subprocess.Popen:
        log = open(root / "log" / f"{Path(cmd[0]).name}.stdout", "ab")  # noqa: SIM115
        proc = subprocess.Popen(list(cmd), env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=_die_with_parent)
        log.close()
        cluster.procs.append(proc)
        return proc

    try:
        spawn(_find("munged") or "munged", "--foreground", "--force",
              f"--socket={munge_socket}", f"--key-file={key}",
              f"--log-file={root}/log/munged.log", f"--pid-file={root}/run/munged.pid",
              f"--seed-file={root}/munge/munged.seed")
        _wait(lambda: munge_socket.exists(), "munged socket", cluster)
        spawn(_find("slurmctld") or "slurmctld", "-D", "-i", "-f", str(conf_path))
        _wait(lambda: cluster.run("scontrol", "ping", check=False).stdout.count("UP") > 0,
              "slurmctld to answer ping", cluster)
        spawn(_find("slurmd") or "slurmd", "-D", "-N", "localhost", "-f", str(conf_path))
        _wait(lambda: _node_ready(cluster), "node localhost to be idle", cluster)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _node_ready(cluster: SlurmCluster) -> bool:
    proc = cluster.run("sinfo", "-h", "-N", "-o", "%T", check=False)
    state = proc.stdout.strip().lower()
    return proc.returncode == 0 and state.startswith(("idle", "mixed", "allocated"))


def _wait(ready, what: str, cluster: SlurmCluster) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        for proc in cluster.procs:
            if proc.poll() is not None:
                pytest.skip(f"{proc.args[0]} exited with {proc.returncode} while waiting for "
                            f"{what}:\n{cluster.logs_tail()}")
        try:
            if ready():
                return
        except (OSError, subprocess.TimeoutExpired):
            pass
        time.sleep(0.3)
    pytest.skip(f"timed out after {START_TIMEOUT_S} s waiting for {what}:\n{cluster.logs_tail()}")


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A running single-node SLURM cluster for the whole test session."""
    root = Path(tempfile.mkdtemp(prefix="medreason-slurm-"))
    cluster = start_cluster(root)
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
