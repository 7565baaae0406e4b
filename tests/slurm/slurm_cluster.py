"""A throw-away Slurm cluster on this one host, for the Slurm integration tests.

Debian's slurmctld / slurmd / munge run as plain root processes (no systemd), in the foreground,
as children of the test process. Everything they write (slurm.conf, munge key and socket, state,
spool, pid and log files) lives in one directory of our own, the daemons listen on free ports
picked at start, and clients find the cluster through SLURM_CONF, so nothing under /etc is
touched and a second cluster (another engineer's test run) can run beside this one.
Teardown cancels the jobs, waits for the step daemons our slurmd started (recognised by our
SLURM_CONF in their environment) to finish, and stops only the daemons this module started, by
pid, after checking /proc/PID/comm.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
SBIN = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")


class Unavailable(Exception):
    """This machine cannot start a Slurm cluster (not root, packages not installable): skip."""


# ------------------------------------------------------------------ packages

def _installed(pkg: str) -> bool:
    out = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True)
    return out.returncode == 0 and "install ok installed" in out.stdout


def ensure_packages(packages: tuple[str, ...] | list[str]) -> None:
    """apt-get install whatever of `packages` is missing, without letting the maintainer scripts
    start services (a temporary policy-rc.d answering 101 'action forbidden')."""
    if not shutil.which("dpkg-query") or not shutil.which("apt-get"):
        raise Unavailable("no dpkg/apt-get on this machine")
    missing = [p for p in packages if not _installed(p)]
    if not missing:
        return
    if os.geteuid() != 0:
        raise Unavailable(f"packages {' '.join(missing)} are missing and installing them needs root")
    policy = Path("/usr/sbin/policy-rc.d")
    made_policy = False
    if not policy.exists():
        policy.write_text("#!/bin/sh\n# temporary: installed by tests/slurm, keeps apt from starting services\nexit 101\n")
        policy.chmod(0o755)
        made_policy = True
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if out.returncode != 0:   # a stale package index is the usual cause: refresh once
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True, timeout=600)
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired as e:
        raise Unavailable(f"apt-get install {' '.join(missing)} timed out") from e
    finally:
        if made_policy:
            policy.unlink(missing_ok=True)
    if out.returncode != 0:
        raise Unavailable(f"apt-get install {' '.join(missing)} failed: {(out.stderr or out.stdout)[-600:]}")


# ------------------------------------------------------------------ processes

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))   # Slurm 22.05 daemons always listen on every address
        return s.getsockname()[1]


def running(pid: int) -> bool:
    """True while any thread of `pid` is alive and not a zombie (PID 1 on some machines reaps
    orphans late, and a daemon's main thread may exit before its other threads)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for tid in tasks:
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[0] != "Z":
            return True
    return False


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


@dataclass
class Daemon:
    name: str          # what we call it ("slurmd-n1")
    program: str       # the expected /proc/PID/comm
    proc: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None and comm(self.pid) == self.program and running(self.pid)

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM, then SIGKILL after `grace_s`; only while the pid is still our program."""
        if not self.alive():
            self.proc.poll()
            return
        os.kill(self.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            if comm(self.pid) == self.program:
                os.kill(self.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


def _program(name: str) -> str:
    for d in SBIN:
        p = Path(d) / name
        if p.exists():
            return str(p)
    found = shutil.which(name)
    if not found:
        raise Unavailable(f"{name} not found")
    return found


# ------------------------------------------------------------------ the cluster

@dataclass
class LocalSlurm:
    """`with LocalSlurm(nodes=2) as cluster:` -- nodes n1..nN, each `cpus` CPUs, one partition."""
    nodes: int = 2
    cpus: int = 2
    memory_mb: int = 4000
    cred_expire_s: int = 5          # also the least time a requeued job waits before it starts again
    root: Path | None = None
    daemons: list[Daemon] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.root is None:
            self.root = Path(tempfile.mkdtemp(prefix="ldm-slurm-"))
        self.root = Path(self.root)
        self.node_names = [f"n{i + 1}" for i in range(self.nodes)]
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"

    # -------------------------------------------------------------- environment for clients

    @property
    def env(self) -> dict[str, str]:
        """What a client (sbatch, squeue, ...) needs to find this cluster; jobs inherit it."""
        return {"SLURM_CONF": str(self.conf)}

    def client_env(self, **extra: str | None) -> dict[str, str]:
        """This process's environment plus SLURM_CONF and `extra` (a None value removes the variable)."""
        env = dict(os.environ)
        env["PATH"] = env.get("PATH", "") + ":/usr/sbin:/sbin"
        env.update(self.env)
        for k, v in extra.items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = str(v)
        return env

    def run(self, *args: str, check: bool = True, timeout: float = 30, **extra: str | None) -> subprocess.CompletedProcess:
        out = subprocess.run(list(args), env=self.client_env(**extra), capture_output=True, text=True,
                             timeout=timeout)
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} -> rc {out.returncode}: {out.stderr.strip() or out.stdout.strip()}")
        return out

    # -------------------------------------------------------------- start / stop

    def __enter__(self) -> "LocalSlurm":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout_s: float = 60) -> None:
        if os.geteuid() != 0:
            raise Unavailable("starting slurmctld/slurmd/munged as SlurmUser=root needs root")
        ensure_packages(PACKAGES)
        programs = {n: _program(n) for n in ("munged", "munge", "slurmctld", "slurmd", "sinfo")}
        self.root.chmod(0o755)
        for sub in ("state", "spool", "run", "log"):
            (self.root / sub).mkdir(exist_ok=True)
        self._start_munge(programs["munged"])
        self._write_conf()
        self._spawn("slurmctld", "slurmctld", [programs["slurmctld"], "-D", "-f", str(self.conf)])
        self._wait(lambda: self.run("scontrol", "ping", check=False).stdout.count("UP") > 0,
                   timeout_s, "slurmctld to answer")
        for node in self.node_names:
            (self.root / "spool" / node).mkdir(exist_ok=True)
            self._spawn(f"slurmd-{node}", "slurmd", [programs["slurmd"], "-D", "-f", str(self.conf), "-N", node])
        self._wait(self._all_idle, timeout_s, "the nodes to become idle")

    def _start_munge(self, munged: str) -> None:
        d = self.root / "munge"
        d.mkdir(exist_ok=True)
        d.chmod(0o711)                      # munged wants its socket's directory executable by all
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self._spawn("munged", "munged", [munged, "--foreground", f"--socket={self.munge_socket}",
                                         f"--key-file={key}", f"--pid-file={d / 'munged.pid'}",
                                         f"--log-file={d / 'munged.log'}", f"--seed-file={d / 'munged.seed'}"])
        self._wait(lambda: self.munge_socket.exists(), 15, "munged's socket")

    def _write_conf(self) -> None:
        host = socket.gethostname().split(".")[0]   # slurmctld insists on `hostname -s`
        r = self.root
        ctld_port = free_port()
        node_ports = [free_port() for _ in self.node_names]
        nodes = "\n".join(
            f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={p} CPUs={self.cpus} "
            f"RealMemory={self.memory_mb} State=UNKNOWN" for n, p in zip(self.node_names, node_ports))
        self.conf.write_text(f"""\
# written by tests/slurm/slurm_cluster.py: a throw-away single-host test cluster
ClusterName=ldmtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={node_ports[0]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire={self.cred_expire_s}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
MinJobAge=3600
KillWait=10
InactiveLimit=0
Waittime=0
SlurmctldTimeout=120
SlurmdTimeout=300
{nodes}
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    def _spawn(self, name: str, program: str, argv: list[str]) -> Daemon:
        log = self.root / "log" / f"{name}.stderr"
        with open(log, "ab") as fh:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                    env=self.client_env(), start_new_session=True)
        daemon = Daemon(name, program, proc, log)
        self.daemons.append(daemon)
        time.sleep(0.2)
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}: {self._tail(log)}")
        return daemon

    @staticmethod
    def _tail(path: Path, n: int = 2000) -> str:
        try:
            return path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def _wait(self, cond, timeout_s: float, what: str) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            for d in self.daemons:
                if d.proc.poll() is not None:
                    raise RuntimeError(f"{d.name} died (rc {d.proc.returncode}) while waiting for {what}:\n"
                                       f"{self._tail(d.log)}\n{self.logs()}")
            try:
                if cond():
                    return
            except (subprocess.SubprocessError, OSError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"timed out after {timeout_s:.0f}s waiting for {what}\n{self.logs()}")

    def node_states(self) -> dict[str, str]:
        out = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False).stdout
        return dict(line.split()[:2] for line in out.splitlines() if len(line.split()) >= 2)

    def _all_idle(self) -> bool:
        states = self.node_states()
        return all(states.get(n, "").rstrip("*") == "idle" for n in self.node_names)

    def logs(self) -> str:
        parts = []
        for p in sorted((self.root / "log").glob("*")):
            parts.append(f"--- {p.name}\n{self._tail(p, 1500)}")
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel every job of this cluster, wait for them to end, then stop our daemons
        (slurmd, slurmctld, munged: the reverse of the start order), each by its pid."""
        ctld = next((d for d in self.daemons if d.program == "slurmctld"), None)
        if ctld is not None and ctld.alive():
            try:
                jobs = self.run("squeue", "-h", "-o", "%i", check=False, timeout=10).stdout.split()
                if jobs:
                    self.run("scancel", *jobs, check=False, timeout=10)
                    deadline = time.time() + 30
                    while time.time() < deadline and self.run("squeue", "-h", "-o", "%i", check=False,
                                                                timeout=10).stdout.strip():
                        time.sleep(0.5)
            except (subprocess.SubprocessError, OSError):
                pass
        self._reap_step_daemons()
        for d in reversed(self.daemons):
            d.stop()
        self.daemons.clear()

    def step_daemons(self) -> list[int]:
        """pids of the slurmstepd processes our slurmd started (they detach from it, but keep its
        environment, which names our SLURM_CONF)."""
        marker = f"SLURM_CONF={self.conf}".encode()
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and comm(int(entry)) == "slurmstepd" and running(int(entry)):
                try:
                    if marker in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                        found.append(int(entry))
                except OSError:
                    pass
        return found

    def _reap_step_daemons(self, grace_s: float = 20.0) -> None:
        """Wait for the step daemons of finished jobs to exit; SIGKILL the ones that do not."""
        deadline = time.time() + grace_s
        while self.step_daemons() and time.time() < deadline:
            time.sleep(0.2)
        for pid in self.step_daemons():
            os.kill(pid, signal.SIGKILL)

    # -------------------------------------------------------------- jobs

    def sbatch(self, args: list[str], cwd: Path | str | None = None, **env: str | None) -> int:
        out = subprocess.run(["sbatch", "--parsable", *args], env=self.client_env(**env), capture_output=True,
                             text=True, timeout=60, cwd=cwd)
        if out.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} -> rc {out.returncode}:\n{out.stdout}\n{out.stderr}")
        return int(out.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, NodeList, ...)."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id), check=False).stdout
        return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", out))

    def wait_job(self, job_id: int, timeout_s: float, done=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                              "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                                                              "DEADLINE", "PREEMPTED")) -> dict[str, str]:
        deadline = time.time() + timeout_s
        info: dict[str, str] = {}
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in done:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {info.get('JobState')} after {timeout_s:.0f}s: {info}")
