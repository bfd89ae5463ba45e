"""
Run model-written Python in a sandbox (HumanEval grading), with verdicts a candidate cannot forge.

    result = check_function(solution, test, entry_point, test_setup=prompt)  # grading: the tests' verdict
    result = execute_code(program, timeout=5.0, max_memory_bytes=256 * 2**20)  # a program's own verdict
    result.success, .stdout, .stderr, .error, .timeout, .memory_exceeded, .unprotected

check_function runs only the solution in the sandbox; the tests run in its supervisor and call the solution's
function through pipes with plain values. execute_code's success is the program's word (it can exit 0 early).
Isolation is chosen once per process by NANOCHAT_SANDBOX=auto|namespaces|process (nanochat/execution_sandbox.py
does the inside). "namespaces" (Linux, util-linux unshare, root or unprivileged user namespaces): no network, a
PID namespace whose end kills every descendant, a read-only root with only the interpreter and its libraries, no
_ctypes, no capabilities, no-new-privileges, MAX_PROCESSES, an empty environment, rlimits. "process" (auto's logged
fallback): the same rlimits, process cap, environment and descendant kill; result.unprotected names what is missing.
"""

import functools
import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 5.0
DEFAULT_MAX_MEMORY_BYTES = 256 * 1024 * 1024
# stdout+stderr beyond this is cut off (the child's writes fail with EFBIG), so a print loop
# cannot fill the disk or the parent's memory before the timeout fires
MAX_OUTPUT_BYTES = 1024 * 1024
MAX_PROCESSES = 16  # RLIMIT_NPROC: tasks of the candidate's uid (per user namespace on kernels >= 5.14, else machine-wide)
SANDBOX_TMP_BYTES = 16 * 1024 * 1024  # the sandbox's memory-backed /tmp
SUPERVISOR_GRACE_S = 10.0  # past the timeout, for the supervisor to start, clean up and report
SANDBOX_SCRIPT = Path(__file__).resolve().with_name("execution_sandbox.py")
HIDDEN_MODULES = ("_ctypes", "_ctypes_test")  # foreign function calls; an empty file is mounted over each
# extension modules a graded solution has no use for (windows, terminals, NIS, dbm), left out with the libraries
# they would bring in: each library is one more mount per run
UNSUPPORTED_MODULES = ("_tkinter", "_curses", "_curses_panel", "readline", "nis", "_dbm", "_gdbm", "ossaudiodev",
                       "spwd", "_crypt")
# as root, each run's candidate gets a fresh uid from here: it owns nothing, and RLIMIT_NPROC counts only its own
CANDIDATE_UID_BASE = 2_000_000_000
SANDBOX_MODES = ("auto", "namespaces", "process")


@dataclass
class ExecutionResult:
    success: bool          # the program ran to the end / the tests passed
    stdout: str
    stderr: str
    error: str | None = None          # one line: what went wrong, None on success
    timeout: bool = False             # stopped by the wall-clock or CPU limit
    memory_exceeded: bool = False     # raised MemoryError under the address-space limit
    unprotected: tuple[str, ...] = ()  # isolation layers missing on this machine (empty with namespaces)


class SandboxError(RuntimeError):
    """The sandbox could not be set up on this machine, or failed itself; the message says why."""


@dataclass(frozen=True)
class SandboxPlan:
    namespaces: bool
    launcher: tuple[str, ...]  # what runs the supervisor's interpreter (unshare and its flags), empty without namespaces
    python: str                # the interpreter, symlinks resolved (the path that exists inside the sandbox)
    expose: tuple[str, ...]    # host paths visible read-only inside
    hide: tuple[str, ...]      # host paths covered by an empty file or directory inside
    unprotected: tuple[str, ...]


def execute_code(program: str, timeout: float = DEFAULT_TIMEOUT_S,
                 max_memory_bytes: int | None = DEFAULT_MAX_MEMORY_BYTES) -> ExecutionResult:
    """Run `program` as __main__ in the sandbox. Success is the program's own report, so code in the program can
    fake it (os._exit(0) before a failing line): grade with check_function instead."""
    return _run_in_sandbox({"mode": "program", "program": program}, timeout, max_memory_bytes)


def check_function(solution: str, test: str, entry_point: str, test_setup: str = "",
                   timeout: float = DEFAULT_TIMEOUT_S,
                   max_memory_bytes: int | None = DEFAULT_MAX_MEMORY_BYTES) -> ExecutionResult:
    """Define `entry_point` by running `solution` in the sandbox, then run `test_setup` and `test` (which must
    define check(candidate)) outside the candidate's process and call check with the candidate's function.
    Success means check returned; arguments and results cross as plain values (numbers, strings, containers)."""
    job = {"mode": "function", "solution": solution, "test": test, "entry_point": entry_point,
           "test_setup": test_setup}
    return _run_in_sandbox(job, timeout, max_memory_bytes)


def _run_in_sandbox(job: dict, timeout: float, max_memory_bytes: int | None) -> ExecutionResult:
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    if max_memory_bytes is not None and max_memory_bytes < 32 * 1024 * 1024:
        raise ValueError(f"max_memory_bytes={max_memory_bytes} is below what an interpreter needs to start (32 MiB)")
    return _supervise(sandbox_plan(), job, timeout, max_memory_bytes)


def _supervise(plan: SandboxPlan, job: dict, timeout: float, max_memory_bytes: int | None) -> ExecutionResult:
    with tempfile.TemporaryDirectory(prefix="nanochat_exec_") as io_dir:
        io_dir = Path(io_dir)
        os.chmod(io_dir, 0o711)  # a candidate of another uid may pass through to its workdir, not list or read
        (io_dir / "root").mkdir()
        (io_dir / "work").mkdir()
        with open(io_dir / "stdout", "wb") as out_file, open(io_dir / "stderr", "wb") as err_file:
            job = dict(job, namespaces=plan.namespaces, python=plan.python, sandbox_script=str(SANDBOX_SCRIPT),
                       expose=list(plan.expose), hide=list(plan.hide), root_dir=str(io_dir / "root"),
                       workdir=f"/tmp/{io_dir.name}" if plan.namespaces else str(io_dir / "work"),
                       candidate_uid=CANDIDATE_UID_BASE + secrets.randbelow(1 << 24) if os.geteuid() == 0 else None,
                       stdout_fd=out_file.fileno(), stderr_fd=err_file.fileno(), timeout=timeout,
                       cpu_seconds=int(timeout) + 1, max_memory_bytes=max_memory_bytes,
                       max_output_bytes=MAX_OUTPUT_BYTES, max_processes=MAX_PROCESSES, tmp_bytes=SANDBOX_TMP_BYTES)
            supervisor = subprocess.Popen(
                [*plan.launcher, plan.python, "-I", "-S", "-B", str(SANDBOX_SCRIPT), "supervise"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/", env={},
                pass_fds=(out_file.fileno(), err_file.fileno()), start_new_session=True)
            try:
                report, diagnostics = supervisor.communicate(json.dumps(job).encode(), timeout=timeout + SUPERVISOR_GRACE_S)
                hung = False
            except subprocess.TimeoutExpired:  # with namespaces, killing unshare kills the supervisor's namespace
                supervisor.kill()
                report, diagnostics = supervisor.communicate()
                hung = True
        stdout = (io_dir / "stdout").read_bytes()[:MAX_OUTPUT_BYTES].decode("utf-8", errors="replace")
        stderr = (io_dir / "stderr").read_bytes()[:MAX_OUTPUT_BYTES].decode("utf-8", errors="replace")
    events = [json.loads(line) for line in report.decode("utf-8").splitlines()]  # only the supervisor writes here
    diagnostics = diagnostics.decode("utf-8", errors="replace")[-4000:]
    if not events:
        raise SandboxError(f"the sandbox supervisor failed to start (exit status {supervisor.returncode}):\n"
                                 f"{diagnostics}")
    if hung or len(events) < 2:
        return ExecutionResult(False, stdout, stderr, f"the sandbox supervisor ended without a verdict (exit status "
                               f"{supervisor.returncode}){' after the timeout' if hung else ''}: {diagnostics[-500:]}",
                               timeout=hung, unprotected=plan.unprotected)
    verdict = events[-1]
    if "crash" in verdict:
        raise SandboxError(f"the sandbox supervisor failed:\n{verdict['crash']}")
    return ExecutionResult(verdict["outcome"] == "ok", stdout, stderr, verdict["error"],
                           timeout=verdict["outcome"] == "timeout", memory_exceeded=verdict["outcome"] == "memory",
                           unprotected=plan.unprotected)


@functools.lru_cache(maxsize=None)
def sandbox_plan() -> SandboxPlan:
    """How this process runs candidates, decided on first use (NANOCHAT_SANDBOX=auto|namespaces|process)."""
    requested = os.environ.get("NANOCHAT_SANDBOX", "auto")
    if requested not in SANDBOX_MODES:
        raise ValueError(f"NANOCHAT_SANDBOX={requested!r}: expected one of {', '.join(SANDBOX_MODES)}")
    python = os.path.realpath(sys.executable)
    namespaces_problem = None
    if requested != "process":
        plan, namespaces_problem = _namespaces_plan(python)
        if plan is not None:
            return plan
        if requested == "namespaces":
            raise SandboxError(f"NANOCHAT_SANDBOX=namespaces, but namespaces do not work here: {namespaces_problem}")
    unprotected = ["network", "filesystem", "programs", "ctypes"]
    if os.geteuid() != 0:  # as root the candidate gets its own uid, and other processes' /proc entries are closed to it
        unprotected.append("process-visibility")
    if sys.platform != "linux":
        unprotected.append("descendants")  # no subreaper: only the candidate's process group is killed
    plan = SandboxPlan(False, (), python, (), (), tuple(unprotected))
    if problem := _trial_problem(plan):
        hint = (" As root, each candidate runs under a uid of its own, so the interpreter must be readable by "
                "other users.") if os.geteuid() == 0 else ""
        raise SandboxError(f"no code sandbox works here.{hint}\nNamespaces: {namespaces_problem or 'not requested'}."
                           f"\nProcess isolation: {problem}")
    if namespaces_problem is not None:
        logger.warning("code sandbox: namespaces unavailable (%s); falling back to process isolation WITHOUT %s. Fix: "
                       "install util-linux and allow unprivileged user namespaces (sysctl "
                       "kernel.unprivileged_userns_clone=1, or on Ubuntu kernel.apparmor_restrict_unprivileged_userns=0)"
                       ", or set NANOCHAT_SANDBOX=process to accept it.", namespaces_problem, ", ".join(unprotected))
    return plan


def _namespaces_plan(python: str) -> tuple[SandboxPlan | None, str | None]:
    # still open with namespaces: kernel exploits, bytecode-level interpreter bugs, and (in execute_code) early exits
    if sys.platform != "linux":
        return None, f"namespaces are Linux only (this is {sys.platform})"
    unshare = shutil.which("unshare") or shutil.which("unshare", path="/usr/bin:/bin:/usr/sbin:/sbin")
    if unshare is None:
        return None, "the util-linux `unshare` command is not installed"
    launcher = (unshare, "--mount", "--pid", "--net", "--ipc", "--uts", "--kill-child")
    if os.geteuid() != 0:
        launcher += ("--user", "--map-root-user")  # an unprivileged user gets root only inside its own namespace
    try:
        expose, hide, unprotected = _interpreter_files(python)
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired, ValueError) as e:
        return None, f"could not list the interpreter's files ({e})"
    plan = SandboxPlan(True, launcher, python, expose, hide, unprotected)
    problem = _trial_problem(plan)
    return (None, problem) if problem else (plan, None)


def _trial_problem(plan: SandboxPlan) -> str | None:
    """None if a trivial program runs under `plan`, else what went wrong."""
    try:
        trial = _supervise(plan, {"mode": "program", "program": "print(6 * 7)"}, 10.0, DEFAULT_MAX_MEMORY_BYTES)
    except SandboxError as e:
        return str(e)
    if not trial.success or trial.stdout != "42\n":
        return f"a trial run failed: {trial.error}\n{trial.stderr[-2000:]}"
    return None


# Run by the sandbox's interpreter once: which shared libraries it loads (by the names the loader used, so the
# symlinks on the way can be copied), where its standard library is, and where the modules to hide live.
_INTERPRETER_PROBE = r"""
import ctypes, importlib.machinery, importlib.util, json, os, sys, sysconfig
hidden, unsupported = sys.argv[1].split(","), sys.argv[2].split(",")
dynload = sysconfig.get_config_var("DESTSHARED") or ""
for file in (os.listdir(dynload) if os.path.isdir(dynload) else []):
    name = file.split(".")[0]
    if file.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)) and name not in hidden + unsupported:
        try:
            __import__(name)
        except Exception:  # an optional module whose library is missing here is missing in the sandbox too
            pass
class LinkMap(ctypes.Structure):
    pass
LinkMap._fields_ = [("addr", ctypes.c_void_p), ("name", ctypes.c_char_p), ("dynamic", ctypes.c_void_p),
                    ("next", ctypes.POINTER(LinkMap)), ("prev", ctypes.POINTER(LinkMap))]
class RDebug(ctypes.Structure):
    _fields_ = [("version", ctypes.c_int), ("map", ctypes.POINTER(LinkMap))]
libraries, link = [], RDebug.in_dll(ctypes.CDLL(None), "_r_debug").map
while link:
    if link.contents.name:
        libraries.append(link.contents.name.decode())
    link = link.contents.next
paths = sysconfig.get_paths()
print(json.dumps({"libraries": libraries, "stdlib": [paths["stdlib"], paths["platstdlib"]],
                  "site": [paths["purelib"], paths["platlib"]],
                  "hidden": {name: getattr(importlib.util.find_spec(name), "origin", None) for name in hidden}}))
"""


def _interpreter_files(python: str) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(paths to expose, paths to hide, what stays unprotected) for running `python` in a minimal root."""
    probe = subprocess.run([python, "-I", "-S", "-c", _INTERPRETER_PROBE, ",".join(HIDDEN_MODULES),
                            ",".join(UNSUPPORTED_MODULES)],
                           capture_output=True, text=True, check=True, env={}, timeout=60)
    found = json.loads(probe.stdout)
    stdlib = {os.path.realpath(p) for p in found["stdlib"]}
    expose = {python, str(SANDBOX_SCRIPT), *stdlib}
    expose |= {p for p in found["libraries"] if p.startswith("/") and os.path.exists(p)  # not the vDSO
               and not any(p.startswith(s + "/") for s in stdlib)}  # extension modules come with the stdlib
    if os.path.exists("/etc/ld.so.cache"):
        expose.add("/etc/ld.so.cache")  # how the loader finds libraries by name
    # installed packages (some with native code) sit inside the standard library's directory: cover them
    hide = {os.path.realpath(p) for p in found["site"]
            if os.path.isdir(p) and any(os.path.realpath(p).startswith(s + "/") for s in stdlib)}
    unprotected = []
    for name, origin in found["hidden"].items():
        if origin in ("built-in", "frozen"):
            unprotected.append("ctypes")  # compiled into the interpreter: nothing to hide
        elif origin is not None:
            hide.add(os.path.realpath(origin))
    return tuple(sorted(expose)), tuple(sorted(hide)), tuple(sorted(set(unprotected)))
