"""
The inside of nanochat's code sandbox (see nanochat/execution.py): a supervisor and the candidate process.
Standard library only, run as a script by nanochat.execution, never by hand:

    python -I -S execution_sandbox.py supervise             # job (JSON) on stdin, report (JSON lines) on stdout
    python -I -S execution_sandbox.py candidate CONFIG_JSON # started by the supervisor

The supervisor never runs candidate code. With namespaces it is PID 1 of fresh PID, network, mount, IPC and UTS
namespaces: it builds a minimal read-only root (the interpreter and the libraries it loads, a few devices, a
small noexec /tmp), chroots into it and starts the candidate with rlimits, no capabilities, no-new-privileges
and an empty environment; when it exits the kernel kills whatever is left in its PID namespace. Without
namespaces it is a child subreaper that kills every descendant it finds in /proc before reporting.
"program" mode runs a whole program whose own process reports how it ended; "function" mode runs only the
solution in the candidate and the tests here, calling the candidate's function through pipes with plain
values, so the verdict never passes through the candidate's hands.
"""

import json
import os
import resource
import signal
import subprocess
import sys
import time
import traceback

MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # one call's arguments or one reply, encoded
CANDIDATE_EXIT_GRACE_S = 1.0  # after the tests, how long the candidate gets to flush its output and exit


# -----------------------------------------------------------------------------
# Plain values between the tests and the candidate: a tagged JSON tree, so nothing with behaviour
# (no __eq__ of the candidate's choosing) reaches the tests.

def encode_value(value):
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return ["int", hex(int(value))]  # hex: no int-string digit limit
    if isinstance(value, float):
        return ["float", repr(float(value))]
    if isinstance(value, complex):
        return ["complex", [repr(value.real), repr(value.imag)]]
    if isinstance(value, (bytes, bytearray)):
        return ["bytes", bytes(value).hex()]
    for kind in (list, tuple, set, frozenset):  # subclasses (a namedtuple, a Counter) travel as their base type
        if isinstance(value, kind):
            return [kind.__name__, [encode_value(item) for item in value]]
    if isinstance(value, dict):
        return ["dict", [[encode_value(key), encode_value(item)] for key, item in value.items()]]
    raise TypeError(f"a {type(value).__name__} cannot pass between the tests and the candidate "
                    "(only None, bool, int, float, complex, str, bytes, list, tuple, set, frozenset, dict)")


_CONTAINERS = {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}


def decode_value(tree):
    if tree is None or isinstance(tree, (bool, str)):
        return tree
    if not (isinstance(tree, list) and len(tree) == 2 and isinstance(tree[0], str)):
        raise ValueError(f"malformed value from the other side: {str(tree)[:200]}")
    tag, payload = tree
    if tag == "int" and isinstance(payload, str):
        return int(payload, 16)
    if tag == "float" and isinstance(payload, str):
        return float(payload)
    if tag == "bytes" and isinstance(payload, str):
        return bytes.fromhex(payload)
    if tag == "complex" and isinstance(payload, list) and len(payload) == 2:
        return complex(float(payload[0]), float(payload[1]))
    if tag in _CONTAINERS and isinstance(payload, list):
        return _CONTAINERS[tag](decode_value(item) for item in payload)
    if tag == "dict" and isinstance(payload, list) and all(isinstance(p, list) and len(p) == 2 for p in payload):
        return {decode_value(key): decode_value(item) for key, item in payload}
    raise ValueError(f"malformed value from the other side: {str(tree)[:200]}")


def send_message(fd: int, message):
    data = json.dumps(message).encode("utf-8")
    if len(data) > MAX_MESSAGE_BYTES:
        raise ValueError(f"message of {len(data)} bytes is over the {MAX_MESSAGE_BYTES}-byte limit")
    view = memoryview(len(data).to_bytes(8, "big") + data)
    while view:
        view = view[os.write(fd, view):]


def receive_message(fd: int):
    size = int.from_bytes(_read_exact(fd, 8), "big")
    if size > MAX_MESSAGE_BYTES:
        raise ValueError(f"message of {size} bytes is over the {MAX_MESSAGE_BYTES}-byte limit")
    return json.loads(_read_exact(fd, size))


def _read_exact(fd: int, size: int) -> bytes:
    chunks, remaining = [], size
    while remaining:
        chunk = os.read(fd, min(remaining, 1 << 20))
        if not chunk:
            raise EOFError("the candidate process closed its end of the pipe (it exited or was killed)")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _read_to_end(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _describe(error: BaseException) -> dict:
    try:
        message = str(error)[:2000]
    except Exception:  # a candidate's exception whose __str__ itself fails
        message = "<unprintable>"
    return {"raise": type(error).__name__, "message": message}


# -----------------------------------------------------------------------------
# The candidate process. Its guards here only turn common accidents into clear PermissionErrors; code can undo
# them (e.g. by re-importing posix). The boundary is what the supervisor set up around this process.

def _refuse(name: str):
    def refused(*args, **kwargs):
        raise PermissionError(f"{name} is disabled in nanochat's execution sandbox")
    return refused


def _disable_destructive_functions():
    import builtins
    import posix  # os re-exports these from posix; patch both
    import shutil
    import socket
    import _socket

    for name in ("remove", "unlink", "rmdir", "removedirs", "rename", "renames", "replace", "truncate",
                 "ftruncate", "chmod", "fchmod", "lchmod", "chown", "fchown", "lchown", "chroot", "chflags",
                 "lchflags", "link", "symlink", "kill", "killpg", "fork", "forkpty", "system", "popen",
                 "putenv", "unsetenv", "setuid", "setgid", "seteuid", "setegid", "setreuid", "setregid",
                 "posix_spawn", "posix_spawnp", "execv", "execve", "execl", "execle", "execlp", "execlpe",
                 "execvp", "execvpe", "spawnv", "spawnve", "spawnl", "spawnle", "spawnlp", "spawnlpe",
                 "spawnvp", "spawnvpe"):
        for module in (os, posix):
            if hasattr(module, name):
                setattr(module, name, _refuse(f"os.{name}"))
    for name in ("rmtree", "move", "chown"):
        setattr(shutil, name, _refuse(f"shutil.{name}"))
    for name in ("Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"):
        setattr(subprocess, name, _refuse(f"subprocess.{name}"))
    for module in (socket, _socket):
        for name in ("socket", "socketpair", "fromfd", "create_connection", "create_server", "getaddrinfo"):
            if hasattr(module, name):
                setattr(module, name, _refuse(f"{module.__name__}.{name}"))
    builtins.exit = _refuse("exit")
    builtins.quit = _refuse("quit")
    builtins.help = _refuse("help")
    for name in ("ctypes", "_ctypes", "multiprocessing", "_posixsubprocess", "pty", "resource"):
        sys.modules[name] = None  # None makes `import name` fail


def _flush_output():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:  # past RLIMIT_FSIZE; the run has already failed on it
            pass


def _run_program(source: str, config: dict):
    """Run the program as __main__ and report on report_fd how it ended (the program's own word)."""
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    failure = None
    try:
        exec(compile(source, "<program>", "exec"), namespace)
        # flushed inside the try: output past the size limit makes the run fail rather than pass truncated
        sys.stdout.flush()
        sys.stderr.flush()
    except MemoryError:
        namespace.clear()  # give back what the program holds, so reporting has room to allocate
        outcome, error = "memory", f"memory limit exceeded ({config['max_memory_bytes']} bytes)"
    except SystemExit as e:
        # a program that exits early never reaches its last line: that is not a success
        outcome, error = "error", f"program called exit({e.code!r})"
    except BaseException as e:  # whatever the program raised is the result we report
        outcome, error, failure = "error", f"{type(e).__name__}: {e}", e
    else:
        outcome, error = "ok", None
    os.write(config["report_fd"], json.dumps({"outcome": outcome, "error": error}).encode("utf-8"))
    if failure is not None:
        traceback.print_exception(failure)
    _flush_output()
    os._exit(0)  # skip the program's atexit hooks and finalizers: the report is in


def _serve_function(source: str, config: dict):
    """Define the solution, say whether that worked, then answer calls until the supervisor closes the pipe."""
    calls_fd, replies_fd = config["calls_fd"], config["replies_fd"]
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(compile(source, "<solution>", "exec"), namespace)
        function = namespace.get(config["entry_point"])
        if not callable(function):
            raise NameError(f"the solution does not define a function named {config['entry_point']!r}")
        reply = {"ready": True}
    except BaseException as e:  # reported to the supervisor, where the tests fail on it
        traceback.print_exception(e)
        reply = _describe(e)
    _flush_output()
    send_message(replies_fd, reply)
    while "ready" in reply:
        try:
            call = receive_message(calls_fd)
        except EOFError:  # the tests are done
            break
        try:
            answer = {"return": encode_value(function(*decode_value(call["args"]), **decode_value(call["kwargs"])))}
        except BaseException as e:  # the tests see it raised; they may expect that
            answer = _describe(e)
        _flush_output()
        send_message(replies_fd, answer)
    _flush_output()
    os._exit(0)


def candidate_main(config: dict):
    source = _read_to_end(0).decode("utf-8")  # the supervisor writes the code on stdin and closes it
    os.environ.pop("LC_CTYPE", None)  # set by the interpreter itself (PEP 538 locale coercion), not inherited
    _disable_destructive_functions()
    if config["mode"] == "program":
        _run_program(source, config)
    else:
        _serve_function(source, config)


# -----------------------------------------------------------------------------
# Linux system calls the standard library lacks (supervisor only; the candidate never has ctypes)

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC = 1, 2, 4, 8, 32, 4096, 16384
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 1 << 21
PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 4, 24, 36, 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
# statvfs reports these per-mount flags; a read-only remount in a user namespace must keep them
STATVFS_TO_MOUNT_FLAGS = {os.ST_NOSUID: MS_NOSUID, os.ST_NODEV: MS_NODEV, os.ST_NOEXEC: MS_NOEXEC,
                          os.ST_NOATIME: MS_NOATIME, os.ST_NODIRATIME: MS_NODIRATIME, os.ST_RELATIME: MS_RELATIME}


class LinuxCalls:
    def __init__(self):
        import ctypes
        self._ctypes = ctypes
        self._libc = ctypes.CDLL(None, use_errno=True)

    def _check(self, result: int, what: str):
        if result != 0:
            errno = self._ctypes.get_errno()
            raise OSError(errno, f"{what}: {os.strerror(errno)}")

    def mount(self, source, target: str, fstype, flags: int, data=None):
        encode = lambda s: None if s is None else s.encode()
        self._check(self._libc.mount(encode(source), encode(target), encode(fstype), self._ctypes.c_ulong(flags),
                                     encode(data)), f"mount {source} on {target}")

    def prctl(self, option: int, value: int, what: str):
        c_ulong = self._ctypes.c_ulong
        self._check(self._libc.prctl(option, c_ulong(value), c_ulong(0), c_ulong(0), c_ulong(0)), what)

    def drop_capabilities_for_good(self):
        """Empty the bounding set, so that exec (even as uid 0) grants no capability again."""
        cap = 0
        while self._libc.prctl(PR_CAPBSET_DROP, self._ctypes.c_ulong(cap), 0, 0, 0) == 0:
            cap += 1
        if self._ctypes.get_errno() != 22 or cap == 0:  # EINVAL past the last capability is the normal end
            self._check(-1, f"drop capability {cap} from the bounding set")
        self.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, "clear ambient capabilities")


# -----------------------------------------------------------------------------
# The supervisor

def _bind_read_only(linux: LinuxCalls, host_path: str, inside: str):
    linux.mount(host_path, inside, None, MS_BIND | MS_REC)
    kept = os.statvfs(host_path).f_flag
    flags = sum(mount_flag for statvfs_flag, mount_flag in STATVFS_TO_MOUNT_FLAGS.items() if kept & statvfs_flag)
    linux.mount(None, inside, None, MS_REMOUNT | MS_BIND | MS_RDONLY | flags)


def _expose(linux: LinuxCalls, root: str, path: str, bound: set, depth: int = 0):
    """Make `path` resolve inside `root` as it does on the host: symlinks on the way are copied, the file or
    directory it ends at is bind-mounted read-only (unless a directory above it is already)."""
    if depth > 40:
        raise OSError(f"too many symbolic links while exposing {path}")
    parts = [part for part in path.split("/") if part]
    current = "/"
    for index, part in enumerate(parts):
        host_path = os.path.join(current, part)
        inside = root + host_path
        if os.path.islink(host_path):
            target = os.readlink(host_path)
            if not os.path.lexists(inside):
                os.symlink(target, inside)
            rest = os.path.join(os.path.join(current, target), *parts[index + 1:])
            return _expose(linux, root, os.path.normpath(rest), bound, depth + 1)
        if any(host_path == b or host_path.startswith(b + "/") for b in bound):
            current = host_path  # already visible through a bind above it
            continue
        if index < len(parts) - 1:
            if not os.path.isdir(inside):
                os.mkdir(inside, 0o755)
        else:
            if os.path.isdir(host_path):
                os.makedirs(inside, 0o755, exist_ok=True)
            elif not os.path.exists(inside):
                open(inside, "x").close()
            _bind_read_only(linux, host_path, inside)
            bound.add(host_path)
        current = host_path


def _enter_minimal_root(linux: LinuxCalls, job: dict):
    """Build the candidate's whole filesystem on a fresh tmpfs and chroot into it (this mount namespace only)."""
    root = job["root_dir"]
    linux.mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
    # /tmp first: an exposed path under /tmp (a checkout or venv there) is then bound inside it, not hidden by it
    os.mkdir(root + "/tmp", 0o755)
    linux.mount("tmpfs", root + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                f"mode=1777,size={job['tmp_bytes']},nr_inodes=4096")
    bound = set()
    for path in job["expose"]:
        _expose(linux, root, path, bound)
    open(root + "/.empty_file", "x").close()
    os.mkdir(root + "/.empty_dir", 0o755)
    for path in job["hide"]:  # e.g. the _ctypes extension: an empty file over it, so it cannot be loaded
        empty = root + ("/.empty_dir" if os.path.isdir(path) else "/.empty_file")
        if os.path.lexists(root + path):
            linux.mount(empty, root + path, None, MS_BIND)
            linux.mount(None, root + path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.mkdir(root + "/dev", 0o755)
    for device in ("null", "zero", "random", "urandom"):
        open(f"{root}/dev/{device}", "x").close()
        linux.mount(f"/dev/{device}", f"{root}/dev/{device}", None, MS_BIND)
    os.mkdir(root + job["workdir"], 0o700)
    if job["candidate_uid"] is not None:
        os.chown(root + job["workdir"], job["candidate_uid"], job["candidate_uid"])
    linux.mount(None, root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.chroot(root)
    os.chdir("/")


def _limit_candidate(linux, job: dict):
    """Runs in the forked candidate just before exec (after Popen switched its uid, if it did)."""
    mem = job["max_memory_bytes"]
    if mem is not None and sys.platform != "darwin":  # macOS does not enforce RLIMIT_AS / RLIMIT_DATA
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_DATA, (mem, mem))
    cpu = job["cpu_seconds"]
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (job["max_output_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NPROC, (job["max_processes"],) * 2)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past RLIMIT_FSIZE a write fails with an error instead
    if linux is not None:
        linux.prctl(PR_SET_NO_NEW_PRIVS, 1, "set no-new-privileges")
        if os.geteuid() == 0:  # root of our user namespace (no uid switch possible there): drop every capability
            linux.drop_capabilities_for_good()


def _start_candidate(linux, job: dict, config: dict, source: str, pass_fds: tuple):
    argv = [job["python"], "-I", "-S", "-B", job["sandbox_script"], "candidate", json.dumps(config)]
    uid = job["candidate_uid"]
    process = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=job["stdout_fd"], stderr=job["stderr_fd"], pass_fds=pass_fds,
        cwd=job["workdir"], env={}, start_new_session=True, user=uid, group=uid,
        extra_groups=None if uid is None else [], preexec_fn=lambda: _limit_candidate(linux, job))
    try:
        process.stdin.write(source.encode("utf-8"))
        process.stdin.close()
    except BrokenPipeError:  # the candidate died before reading its code; its exit status tells why
        pass
    return process


def _program_verdict(job: dict) -> dict:
    report_read, report_write = os.pipe()
    process = _start_candidate(LINUX, job, {"mode": "program", "report_fd": report_write,
                                            "max_memory_bytes": job["max_memory_bytes"]},
                               job["program"], (report_write,))
    os.close(report_write)
    timeout = job["timeout"]
    try:
        process.wait(timeout=timeout)
        killed_at_deadline = False
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        killed_at_deadline = True
    os.set_blocking(report_read, False)  # a descendant still holding the pipe must not hang us
    try:
        report_text = os.read(report_read, 1 << 16).decode("utf-8", errors="replace")
    except BlockingIOError:
        report_text = ""
    returncode = process.returncode
    if killed_at_deadline:
        return {"outcome": "timeout", "error": f"timed out after {timeout:g} s (process killed)"}
    if returncode == -signal.SIGXCPU or (returncode == -signal.SIGKILL and not report_text):
        return {"outcome": "timeout", "error": "CPU time limit exceeded"}  # SIGXCPU at the soft limit, KILL at hard
    if not report_text:
        return {"outcome": "error", "error": f"the program's process died without a report (exit status {returncode})"}
    try:
        report = json.loads(report_text)
        outcome, error = report["outcome"], report["error"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return {"outcome": "error", "error": f"the program's report is garbled: {report_text[:200]!r}"}
    if outcome == "ok" and returncode != 0:
        return {"outcome": "error", "error": f"the program reported success but exited with status {returncode}"}
    return {"outcome": outcome if outcome in ("ok", "error", "memory") else "error", "error": error}


class Deadline(Exception):
    pass


def _raise_deadline(signum, frame):
    raise Deadline()


class CandidateFunction:
    """Stands for the candidate's function in the tests: arguments go out and the result comes back as plain values."""

    def __init__(self, name: str, calls_fd: int, replies_fd: int):
        self.__name__ = name
        self._calls_fd, self._replies_fd = calls_fd, replies_fd

    def __call__(self, *args, **kwargs):
        _flush_output()  # keep what the tests printed in order with what the candidate prints
        send_message(self._calls_fd, {"args": encode_value(list(args)), "kwargs": encode_value(kwargs)})
        return _unpack_reply(receive_message(self._replies_fd))


def _unpack_reply(reply):
    import builtins
    if not isinstance(reply, dict):
        raise ValueError(f"malformed reply from the candidate: {str(reply)[:200]}")
    if "raise" not in reply:
        return decode_value(reply.get("return"))
    name, message = str(reply["raise"]), str(reply.get("message", ""))
    builtin = getattr(builtins, name, None)
    # the candidate's ValueError is a ValueError to the tests; StopIteration would silently end a loop over map()
    if isinstance(builtin, type) and issubclass(builtin, Exception) and not issubclass(
            builtin, (StopIteration, StopAsyncIteration)):
        raise builtin(message)
    raise RuntimeError(f"{name}: {message}")


def _timeout_verdict(job: dict, begin: float) -> dict:
    if time.monotonic() - begin >= job["timeout"]:
        return {"outcome": "timeout", "error": f"timed out after {job['timeout']:g} s"}
    return {"outcome": "timeout", "error": "stopped early by a SIGALRM (not from our timer)"}


def _function_verdict(job: dict) -> dict:
    calls_read, calls_write = os.pipe()
    replies_read, replies_write = os.pipe()
    config = {"mode": "function", "entry_point": job["entry_point"], "calls_fd": calls_read,
              "replies_fd": replies_write}
    started = []  # the candidate's Popen, once it exists
    begin = time.monotonic()
    signal.signal(signal.SIGALRM, _raise_deadline)  # SIGALRM from the candidate can only make it fail sooner
    signal.setitimer(signal.ITIMER_REAL, job["timeout"])
    try:
        try:
            started.append(_start_candidate(LINUX, job, config, job["solution"], (calls_read, replies_write)))
            os.close(calls_read)
            os.close(replies_write)
            _unpack_reply(receive_message(replies_read))  # raises what defining the solution raised
            candidate = CandidateFunction(job["entry_point"], calls_write, replies_read)
            namespace = {"__name__": "__main__"}
            exec(compile(job["test_setup"], "<test setup>", "exec"), namespace)
            namespace[job["entry_point"]] = candidate  # some tests call it by name (HumanEval/33's sort_third)
            exec(compile(job["test"], "<test>", "exec"), namespace)
            namespace["check"](candidate)
            verdict = {"outcome": "ok", "error": None}
        except Deadline:
            verdict = _timeout_verdict(job, begin)
        except MemoryError:
            verdict = {"outcome": "memory", "error": f"memory limit exceeded ({job['max_memory_bytes']} bytes)"}
        except BaseException as e:  # whatever the tests raised, or the candidate's failure as the tests saw it
            traceback.print_exception(e)
            verdict = {"outcome": "error", "error": f"{type(e).__name__}: {e}"}
        finally:
            signal.signal(signal.SIGALRM, signal.SIG_IGN)  # from here on, no signal can interrupt the report
            signal.setitimer(signal.ITIMER_REAL, 0)
    except Deadline:  # the deadline struck while an earlier outcome was being recorded
        verdict = _timeout_verdict(job, begin)
    if not started:
        return verdict
    process = started[0]
    os.close(calls_write)  # end of calls: the candidate flushes its output and exits
    try:
        process.wait(timeout=0 if verdict["outcome"] == "timeout" else CANDIDATE_EXIT_GRACE_S)
        died_on_its_own = True
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        died_on_its_own = False
    if verdict["outcome"] == "error" and died_on_its_own and process.returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        verdict = {"outcome": "timeout", "error": "CPU time limit exceeded"}  # RLIMIT_CPU ended it mid-call
    return verdict


def _kill_descendants(deadline_s: float = 5.0):
    """SIGKILL every process below this one, orphans included (we are their subreaper), until none is left."""
    me, give_up = os.getpid(), time.monotonic() + deadline_s
    while time.monotonic() < give_up:
        parents = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        stat = f.read()
                except OSError:  # exited while we looked
                    continue
                fields = stat[stat.rindex(")") + 2:].split()  # state, ppid, ...; comm may hold spaces
                if fields[0] != "Z":
                    parents[int(entry)] = int(fields[1])
        below, frontier = set(), {me}
        while frontier:
            frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - below
            below |= frontier
        for pid in below:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
        except ChildProcessError:
            if not below:
                return
        time.sleep(0.001)
    raise RuntimeError(f"descendants of the sandbox supervisor were still alive after {deadline_s:g} s of SIGKILL")


def supervise():
    global LINUX
    job = json.loads(sys.stdin.buffer.read())
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # as PID 1 with no handler, signals from the candidate are dropped
    LINUX = LinuxCalls() if sys.platform == "linux" else None
    if LINUX is not None:
        LINUX.prctl(PR_SET_DUMPABLE, 0, "make the supervisor undumpable")  # no ptrace, no /proc/<pid>/mem or fd
    if job["namespaces"]:
        _enter_minimal_root(LINUX, job)
    elif LINUX is not None:
        LINUX.prctl(PR_SET_CHILD_SUBREAPER, 1, "become a child subreaper")
    if job["candidate_uid"] is not None and not job["namespaces"]:
        os.chown(job["workdir"], job["candidate_uid"], job["candidate_uid"])
    report = os.fdopen(os.dup(1), "w")
    report.write(json.dumps({"event": "ready"}) + "\n")
    report.flush()
    os.dup2(job["stdout_fd"], 1)  # what the tests print goes where the candidate's output goes
    os.dup2(job["stderr_fd"], 2)
    try:
        verdict = _program_verdict(job) if job["mode"] == "program" else _function_verdict(job)
        sys.stdout.flush()
        sys.stderr.flush()
        if not job["namespaces"] and LINUX is not None:
            _kill_descendants()  # with namespaces, the kernel kills the rest of the namespace when PID 1 exits
    except BaseException:  # a fault of the sandbox itself: the parent raises it rather than grading on it
        verdict = {"crash": traceback.format_exc()}
    report.write(json.dumps(verdict) + "\n")
    report.flush()


LINUX = None

if __name__ == "__main__":
    if sys.argv[1] == "supervise":
        supervise()
    elif sys.argv[1] == "candidate":
        candidate_main(json.loads(sys.argv[2]))
    else:
        raise SystemExit(f"usage: {sys.argv[0]} supervise | candidate CONFIG_JSON (got {sys.argv[1:]})")
