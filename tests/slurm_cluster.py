"""A real one-node SLURM cluster on this machine, for the tests that submit to it (tests/test_slurm.py).

``SlurmCluster(root).start()`` writes a munge key and a ``slurm.conf`` (this host as controller and as the one node,
2 CPUs, free ports, every state/spool/log/pid file under ``root``), starts ``munged``, ``slurmctld`` and ``slurmd``
and waits until the node is idle; ``stop()`` stops all three. ``env()`` is the environment that points SLURM's
commands (``sbatch``, ``squeue``, ``scontrol``, ``scancel``) at this cluster: ``SLURM_CONF``. Nothing outside
``root`` is written, so it can run beside a system SLURM. Needs Debian's ``slurm-wlm`` and ``munge`` (``.ci/run``
installs them) and root (slurmd starts jobs as their user).
"""

from __future__ import annotations

import getpass
import os
import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")


def which(name: str) -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", ""), *SBIN])
    return shutil.which(name, path=path)


def unavailable() -> str | None:
    """Why a cluster cannot be brought up here, or None."""
    missing = [d for d in (*DAEMONS, "sbatch", "scontrol") if which(d) is None]
    if missing:
        return f"{', '.join(missing)} not installed (Debian: apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "slurmd must run as root to start jobs"
    return None


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class SlurmCluster:
    """One controller and one 2-CPU node, both this host, all state under ``root``."""

    def __init__(self, root: Path, cpus: int = 2, partition: str = "debug"):
        self.root, self.cpus, self.partition = Path(root), cpus, partition
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self._procs: dict[str, subprocess.Popen] = {}
        self._logs: list = []

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = os.pathsep.join([env.get("PATH", ""), *SBIN])
        for var in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and k != "SLURM_CONF"]:
            del env[var]  # a test run inside a SLURM job must not hand its own job's settings on
        return env

    def start(self, timeout: float = 60) -> "SlurmCluster":
        self._write_munge_key()
        self._write_conf()
        munge_dir = self.munge_socket.parent
        self._spawn("munged", [which("munged"), "--foreground", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={munge_dir / 'munge.key'}", f"--pid-file={munge_dir / 'munged.pid'}",
                               f"--log-file={munge_dir / 'munged.log'}", f"--seed-file={munge_dir / 'munged.seed'}"])
        self._wait(lambda: self.munge_socket.exists(), timeout, "munged did not open its socket")
        self._spawn("slurmctld", [which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._spawn("slurmd", [which("slurmd"), "-D", "-f", str(self.conf), "-N", self.host])
        self._wait(self._node_idle, timeout, "the node did not come up idle")
        return self

    def stop(self) -> None:
        """Cancel what still runs (slurmd's job steps would outlive it), then stop the daemons."""
        if self._procs.get("slurmctld") is not None and self._procs["slurmctld"].poll() is None:
            self.run("scancel", "--full", f"--user={getpass.getuser()}", check=False)
            deadline = time.time() + 30
            while time.time() < deadline and self.run("squeue", "-h", check=False).stdout.strip():
                time.sleep(0.2)
        for name in reversed(DAEMONS):
            p = self._procs.pop(name, None)
            if p is None or p.poll() is not None:
                continue
            p.terminate()
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for log in self._logs:
            log.close()
        self._logs.clear()

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- commands ------------------------------------------------------------------------------------------------

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """A SLURM command (``squeue``, ``scontrol``, ``scancel``...) against this cluster."""
        r = subprocess.run([which(args[0]) or args[0], *args[1:]], env=self.env(), capture_output=True, text=True,
                           timeout=60)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
        return r

    def jobs(self) -> list[dict[str, str]]:
        """Every job the controller knows (running, pending and recently finished), from ``scontrol show job``."""
        out = self.run("scontrol", "-o", "show", "job", check=False).stdout
        jobs = []
        for line in out.splitlines():
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            if "JobId" in fields:
                jobs.append(fields)
        return jobs

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted(self.root.glob("log/*.log")))

    # -- internals -----------------------------------------------------------------------------------------------

    def _spawn(self, name: str, argv: list) -> None:
        log = (self.root / "log" / f"{name}.out").open("w")
        self._logs.append(log)
        self._procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env(),
                                             start_new_session=True)

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            dead = [n for n, p in self._procs.items() if p.poll() is not None]
            if dead:
                self.stop()
                raise RuntimeError(f"{', '.join(dead)} exited while starting the SLURM cluster:\n{self._outs()}")
            if ready():
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{what} within {timeout:.0f} s:\n{self._outs()}\n{self.logs()}")

    def _outs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted(self.root.glob("log/*.out")))

    def _node_idle(self) -> bool:
        r = self.run("sinfo", "-h", "-N", "-o", "%t", check=False)
        return r.returncode == 0 and r.stdout.strip() == "idle"

    def _write_munge_key(self) -> None:
        d = self.munge_socket.parent
        d.mkdir(parents=True, exist_ok=True)
        d.chmod(0o700)  # munged refuses a key or socket dir that others can write to
        key = d / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o400)

    def _write_conf(self) -> None:
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        ctld_port, d_port = _free_ports(2)
        r = self.root
        self.conf.write_text("\n".join([
            "ClusterName=mtrain-test",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={d_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"AuthInfo=socket={self.munge_socket}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",  # no cgroups: works in containers
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SwitchType=switch/none",
            "MpiDefault=none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "ReturnToService=2",
            "JobRequeue=1",
            "KillWait=10",
            "MinJobAge=600",  # finished jobs stay visible to scontrol for the tests
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=1",
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN",
            f"PartitionName={self.partition} Nodes={self.host} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))
