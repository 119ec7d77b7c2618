"""A small harness that runs real `python -m launch.X` processes for multi-process tests.

Each child gets its own simulated CPU device count (``XLA_FLAGS=
--xla_force_host_platform_device_count=K``, replacing whatever the test process has),
``JAX_PLATFORMS=cpu``, no inherited ``JAX_COORDINATOR_ADDRESS``/``JAX_NUM_PROCESSES``/
``JAX_PROCESS_ID``, and -- for ``num_processes > 1`` -- the launch flags
``--coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=i`` with a free
port picked at run time. Output goes to one log file per child (no pipe dead-locks).
Children are always killed when the group is left (context manager, try/finally), on
timeouts and on test failures.

Typical use::

    results = mp_util.run("launch.train_ranker",
                          ["--config=configs/ranker.py:smoke", f"--workdir={wd}"],
                          num_processes=2, devices_per_process=4, timeout_s=120)
    metrics = mp_util.read_metrics(wd)

    with mp_util.start("launch.train_ranker", args) as group:   # kill tests
        mp_util.wait_for(lambda: (wd / "checkpoints" / "2").exists(), group=group)
        group.kill()

API: `free_port()`, `has_ipv6_loopback()`, `dead_address()`, `start(...) -> ProcessGroup`, `run(...) -> list[ProcResult]`,
`wait_for(predicate, ...)`, `read_metrics(workdir)`, `json_lines(module, args)`,
`child_env(...)`, `self_signed_cert(dir)`, `hold_first_call(obj, name)`, `REPO`.

Tip: children that compile the same programs one after another (a killed run and its
restart) can share XLA's persistent cache: ``env={"JAX_COMPILATION_CACHE_DIR":
str(tmp_path / "xla_cache")}`` cuts the later ones' CPU time ~3x.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence

REPO = pathlib.Path(__file__).resolve().parents[1]
_STRIPPED_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
                 "JAX_LOCAL_DEVICE_IDS", "XLA_FLAGS")


@dataclasses.dataclass(frozen=True)
class ProcResult:
    """One finished child.

    Attributes:
      process_id: its index in the group.
      returncode: exit status (negative: killed by that signal).
      output: its stdout and stderr, interleaved.
    """

    process_id: int
    returncode: int
    output: str


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def has_ipv6_loopback() -> bool:
    """Whether ::1 can be bound here (tests of IPv6 hosts skip where not)."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@contextlib.contextmanager
def dead_address():
    """Yields ``"127.0.0.1:PORT"`` where nobody listens, for as long as it is held.

    The port stays bound (never listening: a connection is refused at once), so no
    other server, say another test's under xdist, can take it in the meantime, as
    it could a port that ``free_port`` found free and released.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{s.getsockname()[1]}"


def hold_first_call(obj, name: str, timeout_s: float = 20.0):
    """Makes the first call of ``obj.name`` wait until ``release`` is set.

    Returns:
      ``(entered, release)`` events: ``entered`` is set inside the held call.
    """
    entered, release, fn = threading.Event(), threading.Event(), getattr(obj, name)

    def held(*args, **kwargs):
        if not entered.is_set():
            entered.set()
            release.wait(timeout_s)
        return fn(*args, **kwargs)

    setattr(obj, name, held)
    return entered, release


def self_signed_cert(directory: str | os.PathLike) -> tuple[pathlib.Path, pathlib.Path]:
    """A one-day self-signed TLS key and certificate for localhost / 127.0.0.1 (openssl CLI).

    Returns:
      ``(key.pem, cert.pem)`` paths in ``directory``; the certificate is also its own CA.
    """
    key, cert = pathlib.Path(directory) / "key.pem", pathlib.Path(directory) / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )
    return key, cert


def pythonpath(root: str | os.PathLike = REPO) -> str:
    """PYTHONPATH for a child: `root` first, then whatever this process had."""
    return os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p)


def child_env(devices: int, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a child with `devices` simulated CPU devices."""
    env = {k: v for k, v in os.environ.items() if k not in _STRIPPED_ENV}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = pythonpath()
    env.update(extra or {})
    return env


class ProcessGroup:
    """N children started together; `kill()` (or leaving the `with` block) ends them all."""

    def __init__(self, procs: list[subprocess.Popen], logs: list[pathlib.Path], tmp):
        self.procs = procs
        self.logs = logs
        self._tmp = tmp

    def output(self, i: int) -> str:
        """What child `i` has written so far."""
        try:
            return self.logs[i].read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def poll(self) -> list[int | None]:
        """Return codes (None while running)."""
        return [p.poll() for p in self.procs]

    def wait(self, timeout_s: float) -> list[ProcResult]:
        """Waits for every child; on timeout kills them all and raises TimeoutError.

        A child that fails makes the others pointless (they would hang in a collective),
        so the first non-zero exit kills the rest.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            codes = self.poll()
            if all(c is not None for c in codes):
                break
            if any(c not in (None, 0) for c in codes):
                time.sleep(2.0)  # let the others report their own error first
                self.kill()
                break
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(
                    f"processes still running after {timeout_s:.0f}s:\n" + self.describe()
                )
            time.sleep(0.1)
        return [ProcResult(i, p.returncode, self.output(i)) for i, p in enumerate(self.procs)]

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Sends `sig` to every child still running (its whole session) and reaps it."""
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, sig)  # start_new_session: pgid == pid of our child
                except (ProcessLookupError, PermissionError):
                    pass
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:  # pragma: no cover
                p.kill()

    def describe(self, tail: int = 4000) -> str:
        """Return codes and the tail of each child's output (for assertion messages)."""
        parts = []
        for i, p in enumerate(self.procs):
            parts.append(f"--- process {i} (rc={p.poll()}) ---\n{self.output(i)[-tail:]}")
        return "\n".join(parts)

    def close(self) -> None:
        self.kill()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def start(
    module: str,
    args: Sequence[str],
    *,
    num_processes: int = 1,
    devices_per_process: int = 8,
    env: Mapping[str, str] | None = None,
    log_dir: str | os.PathLike | None = None,
) -> ProcessGroup:
    """Starts `python -m module *args` once per process (see the module docstring).

    Args:
      module: e.g. "launch.train_ranker".
      args: command-line arguments shared by every process.
      num_processes: N; above 1 the coordinator flags are appended.
      devices_per_process: simulated CPU devices of each child.
      env: extra environment variables.
      log_dir: where the per-child logs go (default: a temporary folder removed on close).

    Returns:
      The running ProcessGroup (use it as a context manager).
    """
    tmp = None
    if log_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="mp_util_")
        log_dir = tmp.name
    log_dir = pathlib.Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs, logs = [], []
    try:
        for i in range(num_processes):
            cmd = [sys.executable, "-m", module, *args]
            if num_processes > 1:
                cmd += [f"--coordinator_address=127.0.0.1:{port}",
                        f"--num_processes={num_processes}", f"--process_id={i}"]
            log = log_dir / f"{module.rsplit('.', 1)[-1]}.{port}.{i}.log"
            with open(log, "wb") as fh:
                procs.append(subprocess.Popen(
                    cmd, cwd=REPO, env=child_env(devices_per_process, env), stdout=fh,
                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                ))
            logs.append(log)
    except BaseException:
        ProcessGroup(procs, logs, tmp).close()
        raise
    return ProcessGroup(procs, logs, tmp)


def run(
    module: str,
    args: Sequence[str],
    *,
    num_processes: int = 1,
    devices_per_process: int = 8,
    timeout_s: float = 300,
    env: Mapping[str, str] | None = None,
    check: bool = True,
) -> list[ProcResult]:
    """Runs the processes to completion (always killing them on the way out).

    Args:
      module, args, num_processes, devices_per_process, env: as in `start`.
      timeout_s: wall-clock limit for the whole group (TimeoutError after killing).
      check: raise AssertionError with every child's output tail if any exit is non-zero.

    Returns:
      One ProcResult per process.
    """
    with start(module, args, num_processes=num_processes,
               devices_per_process=devices_per_process, env=env) as group:
        results = group.wait(timeout_s)
        if check and any(r.returncode != 0 for r in results):
            raise AssertionError(f"{module} failed:\n" + group.describe())
        return results


def wait_for(
    predicate: Callable[[], bool],
    *,
    timeout_s: float = 120,
    group: ProcessGroup | None = None,
    interval_s: float = 0.05,
) -> None:
    """Polls `predicate` until true; raises if it times out or every child of `group` exits."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if group is not None and all(c is not None for c in group.poll()):
            if predicate():
                return
            raise AssertionError("processes exited before the condition held:\n" + group.describe())
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"condition not met after {timeout_s:.0f}s"
                + ("" if group is None else ":\n" + group.describe())
            )
        time.sleep(interval_s)


def json_lines(module: str, args: Sequence[str], *, timeout_s: float = 300) -> list[dict]:
    """Runs `python -m module *args` to its end; returns the JSON lines it printed.

    The child gets this environment with the repo first on PYTHONPATH and CPU JAX
    (what the benchmarks' smoke tests need); a non-zero exit fails with its stderr.
    """
    out = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=pythonpath(), JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    assert out.returncode == 0, f"{module} exited {out.returncode}:\n{out.stderr[-3000:]}"
    return [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]


def child_columns(code: str, *args: str) -> dict[str, list]:
    """Runs ``code`` (which sets ``cols``, name -> 1-D array) in a fresh 1-device child
    with ``args`` as ``sys.argv[1:]``; returns the columns as lists, NaN as None.

    For launch modules a test worker must not import (they define absl flags that
    clash with other entry points' flags, e.g. --workdir)."""
    script = (f"import json, sys\n{code}\n"
              "print(json.dumps({k: [None if x != x else x for x in v.tolist()]\n"
              "                  for k, v in cols.items()}))\n")
    out = subprocess.run([sys.executable, "-c", script, *args], cwd=REPO, env=child_env(1),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def read_metrics(workdir: str | os.PathLike) -> dict:
    """WORKDIR/metrics.json as a dict."""
    return json.loads((pathlib.Path(workdir) / "metrics.json").read_text())


def smoke_world(tmp_path_factory) -> pathlib.Path:
    """Writes the smoke synthetic world into a fresh temp folder (for module fixtures)."""
    from jax_recsys.data import world as world_lib

    out = tmp_path_factory.mktemp("world")
    world_lib.generate_world(world_lib.scale_config("smoke"), out)
    return out
