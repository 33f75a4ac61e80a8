"""A real SLURM on this machine for the tests: munged, slurmctld and three slurmd, started and stopped by PID.

One node named after this host (2 CPUs, partition `single`) and two fake nodes n1 and n2 on the same
machine (1 CPU each, partition `multi`). Every file lives in
a fresh directory; the daemons run in the foreground as children of the test process, so stopping them
is a signal to a known PID. Needs root and `apt-get install -y slurm-wlm munge` (.ci/run installs them).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel")
INSTALL = "apt-get update && apt-get install -y slurm-wlm munge"


def missing_binaries() -> list[str]:
    return [name for name in DAEMONS if shutil.which(name) is None and not Path("/usr/sbin", name).exists()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


SLURM_CONF = """\
ClusterName=lctraintest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Credentials expire after 10 s rather than 120: a requeued job may not start before they have.
AuthInfo=socket={munge_socket},cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
KillWait=5
InactiveLimit=0
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool-%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
NodeName={host} NodeAddr=127.0.0.1 CPUs=2 RealMemory=4000 State=UNKNOWN
NodeName=n1 NodeHostname={host} NodeAddr=127.0.0.1 Port={port_n1} CPUs=1 RealMemory=2000 State=UNKNOWN
NodeName=n2 NodeHostname={host} NodeAddr=127.0.0.1 Port={port_n2} CPUs=1 RealMemory=2000 State=UNKNOWN
PartitionName=single Nodes={host} Default=YES MaxTime=INFINITE State=UP
PartitionName=multi Nodes=n1,n2 MaxTime=INFINITE State=UP
"""


class LocalSlurm:
    """Start with `start()`, stop with `stop()`; `env` is what a client command (sbatch, scontrol) needs."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="lctrain-slurm-"))
        self.host = socket.gethostname()
        self.processes: list[subprocess.Popen] = []
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self) -> LocalSlurm:
        os.chmod(self.root, 0o755)  # munged checks that every directory above its socket is safe
        for sub in ("state", "run", "log", f"spool-{self.host}", "spool-n1", "spool-n2"):
            (self.root / sub).mkdir()
        munge = pwd.getpwnam("munge")
        munge_dir = self.root / "munge"
        munge_dir.mkdir(mode=0o755)
        os.chown(munge_dir, munge.pw_uid, munge.pw_gid)
        socket_path = munge_dir / "munge.socket"
        ports = {k: _free_port() for k in ("ctld_port", "slurmd_port", "port_n1", "port_n2")}
        self.conf.write_text(SLURM_CONF.format(host=self.host, root=self.root, munge_socket=socket_path, **ports))
        self._spawn(
            [_binary("munged"), "--foreground", f"--socket={socket_path}", f"--pid-file={munge_dir}/munged.pid",
             f"--log-file={munge_dir}/munged.log", f"--seed-file={munge_dir}/munged.seed"],
            user="munge",
        )  # fmt: skip
        self._wait(lambda: socket_path.exists(), "munged did not create its socket")
        self._spawn([_binary("slurmctld"), "-D", "-f", str(self.conf)])
        for node in (self.host, "n1", "n2"):
            self._spawn([_binary("slurmd"), "-D", "-f", str(self.conf), "-N", node])
        self._wait(self._all_idle, "the SLURM nodes did not become idle", timeout=60)
        return self

    def _spawn(self, command: list[str], user: str | None = None) -> None:
        log = open(self.root / "log" / f"{Path(command[0]).name}-{len(self.processes)}.out", "w")  # noqa: SIM115
        self.processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env, user=user))

    def _all_idle(self) -> bool:
        out = self.run("sinfo", "--Node", "--noheader", "--format=%N %t", check=False).stdout.split()
        states = dict(zip(out[::2], out[1::2]))
        return len(states) == 3 and all(s == "idle" for s in states.values())

    def _wait(self, condition, message: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.processes):
                raise RuntimeError(f"{message}; logs in {self.root / 'log'}")
            time.sleep(0.2)

    def run(self, *command: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(command, env=self.env, capture_output=True, text=True, check=check, **kwargs)

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "show", "job", job_id, "--oneliner").stdout
        return dict(field.split("=", 1) for field in out.split() if "=" in field)

    def stop(self) -> None:
        """Stop the daemons by PID (slurmd first, munged last) and remove the directory."""
        for process in reversed(self.processes):
            process.terminate()
        for process in reversed(self.processes):
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(self.root, ignore_errors=True)
