"""A throwaway SLURM cluster on this machine: munge, slurmctld and one slurmd per emulated node.

Everything lives in one temporary directory (config, state, spool, logs, munge key and socket) and
every daemon runs in the foreground as our child, so teardown is "terminate our children, delete
the directory". Nothing under /etc is touched; clients find the cluster through SLURM_CONF.
Needs root (the daemons switch users) and Debian's packages, which `ensure_slurm_installed`
installs with apt-get when they are missing. Facts behind the settings: shared/design/environment.md.
"""
from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

SLURM_PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
SLURM_BINARIES = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo", "munged")


class SlurmUnavailable(RuntimeError):
    """This machine cannot run a throwaway cluster; the message says why (tests skip with it)."""


def _missing_binaries() -> List[str]:
    return [name for name in SLURM_BINARIES
            if shutil.which(name) is None and not Path("/usr/sbin", name).exists()]


def ensure_slurm_installed() -> None:
    """Install Debian's SLURM and munge packages when missing (root + apt-get only), else raise SlurmUnavailable."""
    if not _missing_binaries():
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"SLURM binaries {_missing_binaries()} missing and not root, cannot apt-get install")
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable(f"SLURM binaries {_missing_binaries()} missing and no apt-get on this machine")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for command in (["apt-get", "update", "-q"],
                    ["apt-get", "install", "-y", "-q", "--no-install-recommends", *SLURM_PACKAGES]):
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            raise SlurmUnavailable(f"`{' '.join(command)}` failed: {result.stderr.strip()[-500:]}")
    if _missing_binaries():
        raise SlurmUnavailable(f"still missing after apt-get install: {_missing_binaries()}")


def _free_ports(count: int) -> List[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _sbin(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


@dataclass
class SlurmCluster:
    """`nodes` slurmd daemons named node1..nodeN on 127.0.0.1, each advertising `cpus_per_node` CPUs."""

    nodes: int = 2
    cpus_per_node: int = 4
    root: Optional[Path] = field(default=None, init=False)  # created by start()
    _daemons: Dict[str, subprocess.Popen] = field(default_factory=dict, init=False)

    @property
    def node_names(self) -> List[str]:
        return [f"node{i}" for i in range(1, self.nodes + 1)]

    @property
    def conf_path(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def munge_socket(self) -> Path:
        return self.root / "munge" / "munge.socket"

    def env(self, base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
        """Environment for client commands (sbatch, squeue, ...): points them at this cluster."""
        return dict(os.environ if base is None else base, SLURM_CONF=str(self.conf_path))

    # ----------------------------------------------------------------------------- start / stop
    def start(self, timeout: float = 60.0) -> "SlurmCluster":
        if os.geteuid() != 0:
            raise SlurmUnavailable("a throwaway SLURM cluster needs root (daemons switch users)")
        ensure_slurm_installed()
        self.root = Path(tempfile.mkdtemp(prefix="m2r-slurm-"))
        self.root.chmod(0o755)  # munged runs as user munge and must reach its own subdirectory
        try:
            self._start_munge()
            self._write_slurm_conf()
            self._spawn("slurmctld", [_sbin("slurmctld"), "-D", "-f", str(self.conf_path)])
            for name in self.node_names:
                self._spawn(f"slurmd-{name}", [_sbin("slurmd"), "-D", "-N", name, "-f", str(self.conf_path)])
            self._wait_until_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Cancel jobs, terminate our daemons (slurmds first) and delete the directory."""
        if "slurmctld" in self._daemons:
            self._cancel_all_jobs()
        for name in sorted(self._daemons, key=lambda n: (n == "munged", n == "slurmctld")):
            self._terminate(self._daemons.pop(name))
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)

    def _cancel_all_jobs(self, timeout: float = 40.0) -> None:
        # Job processes outlive slurmd (they belong to slurmstepd): wait until SLURM has ended them.
        self.run("scancel", "--full", "--user", pwd.getpwuid(os.geteuid()).pw_name, check=False)
        deadline = time.monotonic() + timeout
        while self.run("squeue", "--noheader", "--states=RUNNING,COMPLETING,PENDING", check=False).stdout.strip():
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)

    @staticmethod
    def _terminate(process: subprocess.Popen) -> None:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def _spawn(self, name: str, command: List[str], user: Optional[str] = None) -> None:
        log = open(self.root / f"{name}.stdout", "ab")
        self._daemons[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, user=user,
                                               env=self.env(), start_new_session=True)
        log.close()

    def _start_munge(self) -> None:
        munge_dir = self.root / "munge"
        munge_dir.mkdir(mode=0o755)  # munged insists that clients can reach its socket
        key = munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        account = pwd.getpwnam("munge")
        for path in (munge_dir, key):
            os.chown(path, account.pw_uid, account.pw_gid)
        self._spawn("munged", [_sbin("munged"), "--foreground", f"--socket={self.munge_socket}",
                               f"--key-file={key}", f"--pid-file={munge_dir / 'munged.pid'}",
                               f"--seed-file={munge_dir / 'munged.seed'}", f"--log-file={munge_dir / 'munged.log'}"],
                    user="munge")
        deadline = time.monotonic() + 15
        while not self.munge_socket.exists():
            if self._daemons["munged"].poll() is not None or time.monotonic() > deadline:
                raise SlurmUnavailable(f"munged did not start: {self._tail('munged.stdout')}")
            time.sleep(0.1)

    def _write_slurm_conf(self) -> None:
        ctld_port, *node_ports = _free_ports(1 + self.nodes)
        host = socket.gethostname().split(".")[0]
        for sub in ("state", "spool"):
            (self.root / sub).mkdir()
        lines = [
            "ClusterName=m2rtest",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # Short credential lifetime: a requeued job restarts after ~15 s instead of ~150 s.
            f"AuthInfo=socket={self.munge_socket},cred_expire=10",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=5",
            "ReturnToService=2",
            "JobRequeue=1",
            "MpiDefault=none",
            "MailProg=/bin/true",
            # Advertise more CPUs than the machine has, so several ranks fit on one emulated node.
            "SlurmdParameters=config_overrides",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool'}/%n",
            f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={self.root / 'slurmctld.log'}",
            f"SlurmdLogFile={self.root / 'slurmd-%n.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "KillWait=30",
            "InactiveLimit=0",
            "MinJobAge=600",
        ]
        for name, port in zip(self.node_names, node_ports):
            lines.append(f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} "
                         f"CPUs={self.cpus_per_node} State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={','.join(self.node_names)} Default=YES MaxTime=INFINITE State=UP")
        self.conf_path.write_text("\n".join(lines) + "\n")

    def _wait_until_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [name for name, process in self._daemons.items() if process.poll() is not None]
            if dead:
                raise SlurmUnavailable(f"SLURM daemons {dead} exited: {self.diagnostics()}")
            states = self.node_states()
            if len(states) == self.nodes and all(state.startswith("idle") for state in states.values()):
                return
            time.sleep(0.5)
        raise SlurmUnavailable(f"nodes not idle after {timeout:.0f} s ({self.node_states()}): {self.diagnostics()}")

    # ----------------------------------------------------------------------------- queries
    def run(self, *command: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("env", self.env())
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, **kwargs)
        if check and result.returncode != 0:
            raise RuntimeError(f"`{' '.join(command)}` failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def node_states(self) -> Dict[str, str]:
        result = self.run("sinfo", "--noheader", "--Node", "--format=%N %t", check=False)
        pairs = (line.split() for line in result.stdout.splitlines() if line.strip())
        return {pair[0]: pair[1] for pair in pairs if len(pair) == 2}

    def job_fields(self, job_id: int) -> Dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, NodeList, ...)."""
        text = self.run("scontrol", "show", "job", "--oneliner", str(job_id)).stdout
        return dict(item.split("=", 1) for item in text.split() if "=" in item)

    def submit(self, script: str, *sbatch_args: str, env: Dict[str, str], cwd: str) -> int:
        """`sbatch [args] script` from `cwd` with `env` (plus SLURM_CONF); returns the job id."""
        result = self.run("sbatch", "--parsable", *sbatch_args, script, env=self.env(env), cwd=cwd)
        return int(result.stdout.strip().split(";")[0])

    def wait_for_state(self, job_id: int, states: tuple, timeout: float) -> Dict[str, str]:
        """Poll until the job's JobState is one of `states`; returns its fields (TimeoutError otherwise)."""
        deadline = time.monotonic() + timeout
        while True:
            fields = self.job_fields(job_id)
            if fields.get("JobState") in states:
                return fields
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {fields.get('JobState')} after {timeout:.0f} s, "
                                   f"waiting for {states}: {fields.get('Reason')}\n{self.diagnostics()}")
            time.sleep(0.5)

    def _tail(self, name: str, chars: int = 1500) -> str:
        path = self.root / name
        return path.read_text(errors="replace")[-chars:] if path.exists() else f"({name} missing)"

    def diagnostics(self) -> str:
        names = ["munged.stdout", "slurmctld.log"] + [f"slurmd-{n}.log" for n in self.node_names]
        return "\n".join(f"--- {name}:\n{self._tail(name)}" for name in names)
