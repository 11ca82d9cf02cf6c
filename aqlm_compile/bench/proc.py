"""Child processes for measurements: wall time and peak RSS of one child (`os.wait4`), and the busy neighbour.

Every engine of the report runs in its own process so that one runtime's thread pool, allocator or loaded
libraries never touch another's timing, and so that peak RSS is that engine's alone (ru_maxrss of the child).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass
class ChildResult:
    returncode: int
    wall_s: float
    peak_rss_bytes: int
    cpu_s: float  # user + system CPU seconds of the child (its own: unlike ru_maxrss, times restart at exec)
    stdout: str
    stderr_tail: str


def run_measured(cmd: list[str], env: dict | None = None, timeout: float | None = None, cwd=None,
                 log_path: Path | None = None) -> ChildResult:
    """Run `cmd`, return its exit status, wall time and peak RSS of that child's own program.

    Peak RSS is the child's VmHWM, polled from /proc every 10 ms until it exits: `wait4`'s ru_maxrss cannot be
    used, because Linux carries the forking parent's high-water mark into the child across exec (a 1 GB parent
    would make every child read ≥ 1 GB).

    stdout is captured (the child prints its JSON there); stderr goes to `log_path` (or a pipe-free temp file),
    so a chatty child can never block on a full pipe."""
    import tempfile

    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    err_file = open(log_path, "ab") if log_path else tempfile.TemporaryFile()
    out_file = tempfile.TemporaryFile()
    try:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out_file, stderr=err_file, env=env, cwd=cwd, start_new_session=True)
        deadline = None if timeout is None else t + timeout
        hwm = 0
        while True:
            hwm = max(hwm, vm_hwm_bytes(proc.pid))
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if deadline is not None and time.perf_counter() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.01)
        wall = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        out_file.seek(0)
        stdout = out_file.read().decode(errors="replace")
        err_file.flush()
        tail = ""
        if log_path is None:
            err_file.seek(0)
            tail = err_file.read().decode(errors="replace")[-2000:]
        else:
            tail = Path(log_path).read_bytes()[-2000:].decode(errors="replace")
        return ChildResult(proc.returncode, wall, hwm, usage.ru_utime + usage.ru_stime, stdout, tail)
    finally:
        out_file.close()
        err_file.close()


def vm_hwm_bytes(pid: int | str = "self") -> int:
    """Peak resident set size (VmHWM) of a live process, 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def last_json_line(text: str) -> dict:
    """The last line of `text` that parses as a JSON object (children may print other lines before it)."""
    import json

    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise ValueError("no JSON object in the child's output")


@contextmanager
def busy_neighbour(enabled: bool = True):
    """One low-priority (nice 19) busy loop for the duration of the block — the "noisy neighbour" of a laptop or a
    shared server. Started as its own process (never a backgrounded subshell, whose PID would not be the loop's)
    and killed by PID; the block fails loudly if it cannot be stopped."""
    if not enabled:
        yield None
        return
    proc = subprocess.Popen(["nice", "-n", "19", sys.executable, "-c", "while True: pass"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    # With the kernel's autogroup scheduling (sched_autogroup_enabled=1), nice only ranks processes inside one
    # session's group: a nice-19 loop in its own session competes at full weight with the measured engine's
    # session. The group's own nice makes it low priority whatever session the engine runs in.
    set_autogroup_nice(proc.pid, 19)
    time.sleep(0.5)  # let it reach the run queue
    try:
        yield proc.pid
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        if proc.poll() is None:
            raise RuntimeError(f"busy neighbour (pid {proc.pid}) did not stop")


def set_autogroup_nice(pid: int, nice: int) -> None:
    path = Path(f"/proc/{pid}/autogroup")
    if path.exists():
        try:
            path.write_text(str(nice))
        except OSError:
            pass  # not permitted here: the plain nice still applies within the group


def autogroup_nice(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/autogroup").read_text().split("nice")[1])
    except (OSError, IndexError, ValueError):
        return None


def child_env(threads: int, extra: dict | None = None) -> dict:
    """The environment of a measured child: every thread-pool variable set to `threads` (TVM, ORT's op, OpenMP,
    MKL, numba), whatever the parent's environment says."""
    env = dict(os.environ)
    for var in ("TVM_NUM_THREADS", "AQLM_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS",
                "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.update(extra or {})
    return env
