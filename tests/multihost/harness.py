"""Run one program as N processes on localhost, as if on N hosts: each process gets its own fake
CPU devices (XLA_FLAGS), the coordinator is 127.0.0.1:<free port>, collectives go over gloo.

    job = Job("tests.multihost.worker", ["--out=/tmp/x"], num_processes=2, devices_per_process=4)
    job.start()                 # every process: python -m <module> <args> --process_id=i ...
    job.signal(signal.SIGTERM)  # e.g. a preemption notice to every host (the faults work's test)
    results = job.wait()        # fails with the slowest process's log when one hangs

Each process's stdout and stderr go to <log_dir>/process-<i>.log. `wait` raises AssertionError
when the timeout passes (naming the processes still running, with the tail of the slowest one's
log) or, with `check=True`, when a process exits non-zero (with its log).
"""

from __future__ import annotations

import dataclasses
import os
import signal as signal_lib
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests import REPO

LOG_TAIL = 6000  # characters of a log shown in a failure


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class Result:
    process_id: int
    returncode: int
    seconds: float
    log: str


def _tail(text: str) -> str:
    return text if len(text) <= LOG_TAIL else "..." + text[-LOG_TAIL:]


def _quiet(text: str) -> str:
    """The log without gloo's per-connection lines."""
    return "\n".join(line for line in text.splitlines() if not line.startswith("[Gloo]"))


class Job:
    def __init__(self, module: str, args: list[str], *, num_processes: int, devices_per_process: int,
                 log_dir: Path, timeout: float = 300, env: dict | None = None):
        self.module, self.args, self.n = module, list(args), num_processes
        self.devices, self.log_dir, self.timeout = devices_per_process, Path(log_dir), timeout
        self.env = dict(env or {})
        self.procs: list[subprocess.Popen] = []
        self.t0 = 0.0

    def command(self, i: int, port: int) -> list[str]:
        cmd = [sys.executable, "-m", self.module, *self.args]
        if self.n > 1:
            cmd += ["--multihost=on", f"--coordinator_address=127.0.0.1:{port}",
                    f"--num_processes={self.n}", f"--process_id={i}"]
        else:
            cmd += ["--multihost=off"]
        return cmd

    def start(self) -> "Job":
        self.log_dir.mkdir(parents=True, exist_ok=True)
        port = free_port()
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1",
               "XLA_FLAGS": f"--xla_force_host_platform_device_count={self.devices}", **self.env}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        self.t0 = time.time()
        for i in range(self.n):
            log = open(self.log_dir / f"process-{i}.log", "w")
            self.procs.append(subprocess.Popen(self.command(i, port), cwd=REPO, env=env, stdout=log,
                                               stderr=subprocess.STDOUT, start_new_session=True))
            log.close()
        return self

    def signal(self, sig=signal_lib.SIGTERM) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(sig)

    def log(self, i: int) -> str:
        return _quiet((self.log_dir / f"process-{i}.log").read_text(errors="replace"))

    def _kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal_lib.SIGKILL)  # its own session: the process and its children
        for p in self.procs:
            p.wait()

    def wait(self, check: bool = True) -> list[Result]:
        ended: dict[int, float] = {}
        deadline = self.t0 + self.timeout
        while len(ended) < self.n and time.time() < deadline:
            for i, p in enumerate(self.procs):
                if i not in ended and p.poll() is not None:
                    ended[i] = time.time() - self.t0
            time.sleep(0.2)
        if len(ended) < self.n:
            running = [i for i in range(self.n) if i not in ended]
            self._kill()
            raise AssertionError(
                f"{self.module}: processes {running} of {self.n} still running after {self.timeout:.0f} s "
                f"(finished: {sorted(ended)}); log of process {running[0]}:\n{_tail(self.log(running[0]))}")
        results = [Result(i, p.returncode, ended[i], self.log(i)) for i, p in enumerate(self.procs)]
        if check:
            for r in sorted(results, key=lambda r: r.seconds):
                assert r.returncode == 0, (f"{self.module}: process {r.process_id} of {self.n} exited with "
                                           f"{r.returncode} after {r.seconds:.0f} s:\n{_tail(r.log)}")
        return results


def run(module: str, args: list[str], **kw) -> list[Result]:
    return Job(module, args, **kw).start().wait()
