"""
Escapes that got through the old sandbox (issue 21), each as an attack that must now fail, under every isolation
this machine offers: "auto" (namespaces where they work) and "process" (the fallback). Where the fallback lacks a
layer, the test asserts that result.unprotected says so instead of asserting the attack fails.
"""

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from nanochat import execution
from nanochat.common import REPO_ROOT
from nanochat.execution import MAX_PROCESSES, SANDBOX_SCRIPT, SandboxError, check_function, execute_code

pytestmark = pytest.mark.slow  # every test here starts processes

_PLANS = {}


@pytest.fixture(params=["auto", "process"])
def isolation(request, monkeypatch):
    """The plan for one NANOCHAT_SANDBOX mode (each built once per session), installed for this test."""
    mode = request.param
    if mode not in _PLANS:
        monkeypatch.setenv("NANOCHAT_SANDBOX", mode)
        try:
            _PLANS[mode] = execution.sandbox_plan.__wrapped__()
        except SandboxError as e:
            _PLANS[mode] = e
    if isinstance(_PLANS[mode], SandboxError):
        pytest.skip(f"NANOCHAT_SANDBOX={mode} does not work on this machine: {str(_PLANS[mode]).splitlines()[0]}")
    monkeypatch.setattr(execution, "sandbox_plan", lambda: _PLANS[mode])
    return _PLANS[mode]


def sandbox_processes() -> list[int]:
    """Host pids of processes still running this worktree's sandbox script (a fork keeps its parent's cmdline)."""
    found = []
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if str(SANDBOX_SCRIPT).encode() in f.read():
                    found.append(int(pid))
        except (OSError, ValueError):  # not a pid, or gone
            continue
    return found


REIMPORT_POSIX = "import sys\nsys.modules.pop('posix', None)\nimport posix  # the real functions, unpatched\n"


def test_reimported_ctypes_cannot_run_a_command(isolation):
    program = ("import sys\nfor name in ('ctypes', '_ctypes'):\n    sys.modules.pop(name, None)\n"
               "import ctypes\nctypes.CDLL(None).system(b'echo PWNED')\n")
    result = execute_code(program)
    if "ctypes" in isolation.unprotected:
        return  # the fallback says it cannot stop this
    assert "PWNED" not in result.stdout
    assert not result.success and result.error.startswith("ImportError")  # the extension is an empty file here


def test_reimported_posixsubprocess_cannot_run_a_command(isolation):
    program = ("import importlib, sys\nsys.modules.pop('_posixsubprocess', None)\nimport subprocess\n"
               "importlib.reload(subprocess)  # a Popen on the freshly imported _posixsubprocess\n"
               "subprocess.run(['/bin/sh', '-c', 'echo PWNED'])\n")
    result = execute_code(program)
    if "programs" in isolation.unprotected:
        return
    assert "PWNED" not in result.stdout
    assert not result.success and result.error.startswith("FileNotFoundError")  # there is no shell inside


def test_the_only_program_inside_is_the_interpreter(isolation):
    if "programs" in isolation.unprotected:
        pytest.skip("the process fallback runs candidates on the host's filesystem")
    program = REIMPORT_POSIX + """import os
runnable = []
for top, dirs, files in os.walk('/'):
    for name in files:
        path = os.path.join(top, name)
        if '.so' in name or not os.access(path, os.X_OK):
            continue
        with open(path, 'rb') as f:
            head = f.read(256)
        if head.startswith(b'#!'):  # a script runs what its first line names, if that exists
            path = head[2:].split(b'\\n')[0].split()[0].decode()
            if not os.path.exists(path):
                continue
        elif not head.startswith(b'\\x7fELF'):  # neither a script nor a binary: execve refuses it (ENOEXEC)
            continue
        runnable.append(os.path.realpath(path))
print(sorted(set(runnable)))
for shell in ('/bin/sh', '/usr/bin/env', '/usr/bin/id'):
    try:
        posix.execv(shell, [shell])
    except FileNotFoundError:
        pass
"""
    result = execute_code(program)
    assert result.success, result.stderr
    assert eval(result.stdout) == [execution.sandbox_plan().python]


def test_socket_type_cannot_reach_a_server_on_this_machine(isolation):
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        tcp.bind(("127.0.0.1", 0))
        unix.bind(f"\0nanochat-sandbox-test-{os.getpid()}")  # abstract: no file needed, seen per network namespace
        for server in (tcp, unix):
            server.listen(4)
            server.settimeout(0.5)
        program = f"""import socket
for family, address in ((socket.AF_INET, ('127.0.0.1', {tcp.getsockname()[1]})), (socket.AF_UNIX, {unix.getsockname()!r})):
    try:
        s = socket.SocketType(family, socket.SOCK_STREAM)  # the class itself, past the patched constructors
        s.settimeout(1)
        s.connect(address)
        s.sendall(b'PWNED')
        print('ESCAPED', family)
    except OSError as e:
        print('refused', family, e)
"""
        result = execute_code(program)
        if "network" in isolation.unprotected:
            return
        assert [line.split()[0] for line in result.stdout.splitlines()] == ["refused", "refused"], result.stdout
        for server in (tcp, unix):
            with pytest.raises(TimeoutError):
                server.accept()
    finally:
        tcp.close()
        unix.close()


@pytest.mark.slow
def test_a_setsid_daemon_dies_with_the_sandbox(isolation):
    program = REIMPORT_POSIX + """import time
if posix.fork() == 0:
    posix.setsid()  # leaves the process group the old sandbox killed
    if posix.fork() == 0:
        print('daemon alive', flush=True)
        while True:
            time.sleep(0.05)
    posix._exit(0)
time.sleep(60)
"""
    start = time.perf_counter()
    result = execute_code(program, timeout=1.0)
    assert time.perf_counter() - start < 1.0 + 5.0
    assert result.timeout and "daemon alive" in result.stdout  # the daemon did start
    assert sandbox_processes() == []


@pytest.mark.slow
def test_a_fork_bomb_is_capped_and_killed(isolation):
    program = REIMPORT_POSIX + """import time
for generation in range(6):  # 2**6 = 64 processes, unchecked
    try:
        posix.fork()
    except OSError:
        pass
print('alive', flush=True)
time.sleep(60)
"""
    start = time.perf_counter()
    result = execute_code(program, timeout=2.0)
    assert time.perf_counter() - start < 2.0 + 5.0
    assert result.timeout
    assert 1 <= result.stdout.count("alive") <= MAX_PROCESSES
    assert sandbox_processes() == []


def test_the_parents_proc_entries_are_not_readable(isolation):
    program = f"""import os
for pid in (os.getppid(), 1, {os.getpid()}):  # the supervisor, init, and the process that called execute_code
    try:
        print(pid, open(f'/proc/{{pid}}/environ', 'rb').read())
    except OSError as e:
        print(pid, 'blocked', type(e).__name__)
"""
    result = execute_code(program)
    assert result.success, result.stderr
    lines = result.stdout.splitlines()
    assert "blocked" in lines[0]  # the supervisor is undumpable, or there is no /proc at all
    if "process-visibility" not in isolation.unprotected:
        assert all("blocked" in line for line in lines) and "PATH=" not in result.stdout


def test_the_candidate_has_no_capabilities_and_cannot_write_the_interpreter(isolation):
    if "filesystem" in isolation.unprotected:
        pytest.skip("the process fallback runs candidates on the host's filesystem")
    program = REIMPORT_POSIX + f"""import os
for attempt in (lambda: posix.chroot('/tmp'), lambda: open({os.path.realpath(os.__file__)!r}, 'a'),
                lambda: open('/new_file', 'w')):
    try:
        attempt()
        print('allowed')
    except OSError as e:
        print('refused', type(e).__name__)
"""
    result = execute_code(program)
    assert result.success and result.stdout.count("refused") == 3, result.stdout


def test_the_candidate_runs_without_privileges_seen_from_outside(isolation):
    """While a candidate sleeps, read its /proc entry from here: no capabilities, no-new-privileges, and (with
    namespaces) a network and PID namespace of its own."""
    results = []
    thread = threading.Thread(target=lambda: results.append(execute_code("import time\ntime.sleep(3)")))
    thread.start()
    try:
        deadline, candidates = time.monotonic() + 10, []
        while not candidates and time.monotonic() < deadline:
            candidates = [pid for pid in sandbox_processes() if b"candidate" in Path(f"/proc/{pid}/cmdline").read_bytes()]
            time.sleep(0.02)
        assert candidates, "the candidate process never appeared"
        status = dict(line.split(":\t", 1) for line in Path(f"/proc/{candidates[0]}/status").read_text().splitlines())
        assert status["NoNewPrivs"] == "1"
        assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0 and int(status["CapAmb"], 16) == 0
        if os.geteuid() == 0:  # root hands each candidate a uid of its own
            assert int(status["Uid"].split()[0]) >= execution.CANDIDATE_UID_BASE
        if isolation.namespaces:
            for kind in ("net", "pid", "mnt"):
                assert os.readlink(f"/proc/{candidates[0]}/ns/{kind}") != os.readlink(f"/proc/self/ns/{kind}")
    finally:
        thread.join()
    assert results[0].success


# -----------------------------------------------------------------------------
# A candidate cannot forge its own pass

WRONG_ADD = "def add(a, b):\n    return a * b\n"
ADD_TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-4, 4) == 0\n"


def test_writing_a_success_report_and_exiting_is_a_fail(isolation):
    # the forge: a report of success on every descriptor (the old one was in sys.argv), then exit 0
    forge = """import json, os, sys
report = json.dumps({'outcome': 'ok', 'error': None}).encode()
for fd in range(256):
    try:
        os.write(fd, report)
    except OSError:
        pass
os._exit(0)
"""
    result = check_function(forge + WRONG_ADD, ADD_TEST, "add")
    assert not result.success and not result.timeout


def test_framed_replies_written_ahead_are_a_fail(isolation):
    # well-formed messages on every descriptor, claiming readiness and a result, then exit
    forge = """import json, os
for message in ({'ready': True}, {'outcome': 'ok'}, {'return': ['int', '0x5']}):
    data = json.dumps(message).encode()
    for fd in range(3, 64):
        try:
            os.write(fd, len(data).to_bytes(8, 'big') + data)
        except OSError:
            pass
os._exit(0)
"""
    result = check_function(forge + WRONG_ADD, ADD_TEST, "add")
    assert not result.success


def test_killing_the_supervisor_is_a_fail(isolation):
    attack = REIMPORT_POSIX + """import signal
for pid in (posix.getppid(), 1):
    for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGALRM):
        try:
            posix.kill(pid, sig)
        except OSError:
            pass
"""
    result = check_function(attack + WRONG_ADD, ADD_TEST, "add")
    assert not result.success


def test_signalling_the_supervisor_can_only_fail_the_candidate(isolation):
    # a child of the candidate keeps sending SIGALRM (the supervisor's deadline signal) through and after the tests
    attack = REIMPORT_POSIX + """import signal, time
supervisor = posix.getppid()
if posix.fork() == 0:
    for _ in range(4000):
        for pid in (supervisor, 1):
            try:
                posix.kill(pid, signal.SIGALRM)
            except OSError:
                pass
        time.sleep(0.0005)
    posix._exit(0)
def add(a, b):
    time.sleep(0.01)
    return a + b
"""
    result = check_function(attack, ADD_TEST, "add")  # returns a verdict; never raises SandboxError
    assert result.success or result.timeout


def test_humaneval_counts_a_forged_completion_as_wrong(isolation, monkeypatch):
    from tasks.humaneval import HumanEval
    monkeypatch.setenv("NANOCHAT_TASKS_OFFLINE", "1")
    conversation = next(c for c in HumanEval() if c["entry_point"] == "factorial")
    forge = ("import os\nfor fd in range(256):\n    try:\n        os.write(fd, b'{\"outcome\": \"ok\"}')\n"
             "    except OSError:\n        pass\nos._exit(0)\ndef factorial(n):\n    return 0\n")
    assert HumanEval().evaluate(conversation, forge) == 0
    equal_to_all = "class Anything:\n    def __eq__(self, other):\n        return True\ndef factorial(n):\n    return Anything()\n"
    assert HumanEval().evaluate(conversation, equal_to_all) == 0


# -----------------------------------------------------------------------------
# Choosing the isolation: never a silent downgrade

def test_an_unknown_mode_is_refused(monkeypatch):
    monkeypatch.setenv("NANOCHAT_SANDBOX", "none")
    with pytest.raises(ValueError, match="NANOCHAT_SANDBOX='none'"):
        execution.sandbox_plan.__wrapped__()


def test_without_namespaces_strict_mode_fails_and_auto_says_what_is_missing(monkeypatch, caplog):
    monkeypatch.setattr(execution, "_namespaces_plan", lambda python: (None, "no namespaces in this test"))
    monkeypatch.setenv("NANOCHAT_SANDBOX", "namespaces")
    with pytest.raises(SandboxError, match="no namespaces in this test"):
        execution.sandbox_plan.__wrapped__()
    monkeypatch.setenv("NANOCHAT_SANDBOX", "auto")
    try:
        plan = execution.sandbox_plan.__wrapped__()
    except SandboxError as e:  # the fallback cannot run here either: the error names both reasons
        assert "no namespaces in this test" in str(e) and "Process isolation" in str(e)
        return
    assert not plan.namespaces and {"network", "filesystem", "programs", "ctypes"} <= set(plan.unprotected)
    assert "no namespaces in this test" in caplog.text and "WITHOUT network" in caplog.text


def test_a_checkout_under_tmp_runs_in_the_namespace_sandbox(tmp_path, monkeypatch):
    """The sandbox script lives in the checkout; a checkout under /tmp (pytest's tmp_path) is bound inside the
    candidate's own /tmp instead of colliding with it (it failed with FileExistsError on root/tmp)."""
    monkeypatch.setenv("NANOCHAT_SANDBOX", "namespaces")
    try:
        execution.sandbox_plan.__wrapped__()
    except SandboxError as e:
        pytest.skip(f"no namespace sandbox on this machine: {str(e).splitlines()[0]}")
    checkout = tmp_path / "checkout"
    assert str(checkout).startswith("/tmp/")
    shutil.copytree(REPO_ROOT / "nanochat", checkout / "nanochat", ignore=shutil.ignore_patterns("__pycache__"))
    code = ("from nanochat.execution import execute_code, check_function\n"
            "r = execute_code(\"import os; print('ran in', os.getcwd())\")\n"
            "assert r.success and r.stdout.startswith('ran in /tmp/'), r\n"
            "f = check_function('def f(x):\\n    return x + 1\\n', 'def check(c):\\n    assert c(1) == 2\\n', 'f')\n"
            "assert f.success, f\n"
            "import nanochat.execution as e; print(e.SANDBOX_SCRIPT)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=checkout, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(checkout)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith(str(checkout / "nanochat" / "execution_sandbox.py"))
