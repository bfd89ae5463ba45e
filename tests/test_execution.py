import collections
import math
import os
import socket
import time

import pytest

from nanochat.execution import MAX_OUTPUT_BYTES, check_function, execute_code
from nanochat.execution_sandbox import decode_value, encode_value

pytestmark = pytest.mark.slow  # every test here starts processes


def test_success_captures_stdout():
    result = execute_code("print('hello', 6 * 7)")
    assert result.success and result.error is None
    assert result.stdout == "hello 42\n"
    assert not result.timeout and not result.memory_exceeded


def test_exception_is_a_failure_with_its_message_and_traceback():
    result = execute_code("print('before')\nraise ValueError('bad input')")
    assert not result.success
    assert result.error == "ValueError: bad input"
    assert result.stdout == "before\n"  # output printed before the failure is kept
    assert "Traceback" in result.stderr and "ValueError: bad input" in result.stderr


def test_infinite_loop_is_killed_at_the_timeout():
    start = time.perf_counter()
    result = execute_code("while True:\n    pass", timeout=1.0)
    elapsed = time.perf_counter() - start
    assert not result.success and result.timeout
    assert elapsed < 5.0


def test_memory_bombs_are_stopped_and_the_parent_survives():
    one_shot = execute_code("x = bytearray(8 * 1024**3)")
    growing = execute_code("chunks = []\nwhile True:\n    chunks.append(' ' * 10**6)")
    for result in (one_shot, growing):
        assert not result.success and result.memory_exceeded and not result.timeout
    assert execute_code("print(sum(range(10)))").stdout == "45\n"  # and the machinery still works


def test_deleting_a_file_outside_the_sandbox_fails_and_the_file_survives(tmp_path):
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "inside.txt").write_text("also keep")
    attempts = [
        f"import os; os.remove({str(victim)!r})",
        f"import os; os.unlink({str(victim)!r})",
        f"import pathlib; pathlib.Path({str(victim)!r}).unlink()",
        f"import os; os.rename({str(victim)!r}, 'stolen.txt')",
        f"import shutil; shutil.rmtree({str(folder)!r})",
        f"import os; os.system('rm -f {victim}')",
        f"import subprocess; subprocess.run(['rm', '-f', {str(victim)!r}])",
    ]
    for program in attempts:
        result = execute_code(program)
        assert not result.success, program
        assert "PermissionError" in result.error, (program, result.error)
    assert victim.read_text() == "keep me"
    assert (folder / "inside.txt").read_text() == "also keep"


def test_network_connections_fail_and_never_reach_a_listening_server():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    try:
        attempts = [
            f"import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\ns.connect(('127.0.0.1', {port}))",
            f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)",
            f"import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=1)",
        ]
        for program in attempts:
            result = execute_code(program)
            assert not result.success, program
        # nothing ever connected: accept() times out
        try:
            connection, _ = server.accept()
        except TimeoutError:
            connection = None
        assert connection is None
    finally:
        server.close()


def test_runs_in_a_temporary_directory_that_is_removed_afterwards():
    result = execute_code("import os\nopen('scratch.txt', 'w').write('x')\nprint(os.getcwd())")
    assert result.success
    workdir = result.stdout.strip()
    assert workdir != os.getcwd()
    assert not os.path.exists(workdir)


def test_the_parent_environment_does_not_leak_into_the_child(monkeypatch):
    monkeypatch.setenv("NANOCHAT_TEST_SECRET", "hunter2")
    result = execute_code("import os; print(os.environ.get('NANOCHAT_TEST_SECRET'))")
    assert result.stdout == "None\n"


def test_the_child_environment_is_empty():
    result = execute_code("import os; print(sorted(os.environ))")
    assert result.success and result.stdout == "[]\n"


def test_runaway_output_is_capped_and_fails():
    result = execute_code("while True:\n    print('x' * 1000)", timeout=5.0)
    assert not result.success and not result.timeout
    assert 0 < len(result.stdout) <= MAX_OUTPUT_BYTES


def test_exiting_early_is_not_a_pass():
    # a HumanEval candidate that calls sys.exit(0) before check() runs must not count as passing
    result = execute_code("import sys\nsys.exit(0)\nassert False")
    assert not result.success and "exit" in result.error


def test_humaneval_style_check_passes_correct_and_fails_incorrect_candidates():
    test = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-4, 4) == 0\n"
    correct = "def add(a, b):\n    return a + b\n"
    incorrect = "def add(a, b):\n    return a * b\n"
    assert execute_code(f"{correct}\n{test}\ncheck(add)").success
    failed = execute_code(f"{incorrect}\n{test}\ncheck(add)")
    assert not failed.success and failed.error.startswith("AssertionError")


# -----------------------------------------------------------------------------
# check_function: the solution runs in the sandbox, the tests outside it

ADD_TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-4, 4) == 0\n"


def test_check_function_passes_a_correct_solution_and_fails_a_wrong_one():
    assert check_function("def add(a, b):\n    return a + b\n", ADD_TEST, "add").success
    failed = check_function("def add(a, b):\n    return a * b\n", ADD_TEST, "add")
    assert not failed.success and failed.error.startswith("AssertionError")
    assert "Traceback" in failed.stderr  # the failing assert's traceback, for whoever reads the log


def test_check_function_keeps_what_both_sides_print():
    solution = "print('defining')\ndef add(a, b):\n    print('adding', a, b)\n    return a + b\n"
    test = "def check(candidate):\n    print('testing')\n    assert candidate(1, 2) == 3\n"
    result = check_function(solution, test, "add")
    assert result.success
    assert result.stdout.splitlines() == ["defining", "testing", "adding 1 2"]


def test_check_function_gives_the_tests_the_setup_helpers():
    setup = "def encode(s):\n    return s[::-1]\n"  # like HumanEval/38's encode_cyclic, defined by the prompt
    test = "def check(candidate):\n    assert candidate(encode('abc')) == 'abc'\n"
    assert check_function("def decode(s):\n    return s[::-1]\n", test, "decode", test_setup=setup).success
    assert not check_function("def decode(s):\n    return s\n", test, "decode", test_setup=setup).success


def test_check_function_binds_the_entry_points_name_to_the_candidate():
    # HumanEval/33 compares candidate(x) with sort_third(x): that name must be the candidate, not the prompt's stub
    setup = "def double(x):\n    \"\"\"Return 2 * x.\"\"\"\n"
    test = "def check(candidate):\n    assert candidate(3) == double(3) == 6\n"
    assert check_function("def double(x):\n    return 2 * x\n", test, "double", test_setup=setup).success
    assert not check_function("def double(x):\n    return 3 * x\n", test, "double", test_setup=setup).success


def test_check_function_hands_the_candidates_exceptions_to_the_tests_as_builtin_types():
    test = ("def check(candidate):\n    try:\n        candidate(-1)\n    except ValueError as e:\n"
            "        assert 'negative' in str(e)\n    else:\n        raise AssertionError('no ValueError')\n"
            "    assert candidate(4) == 2\n")
    solution = "def root(x):\n    if x < 0:\n        raise ValueError('negative input')\n    return int(x ** 0.5)\n"
    assert check_function(solution, test, "root").success
    custom = "class Oops(Exception):\n    pass\ndef root(x):\n    raise Oops('bad')\n"
    failed = check_function(custom, test, "root")
    assert not failed.success and failed.error == "RuntimeError: Oops: bad"


def test_check_function_fails_when_the_solution_breaks_before_the_tests():
    missing = check_function("def other(a, b):\n    return a + b\n", ADD_TEST, "add")
    assert not missing.success and missing.error.startswith("NameError") and "'add'" in missing.error
    raising = check_function("raise RuntimeError('at import')\ndef add(a, b):\n    return a + b\n", ADD_TEST, "add")
    assert not raising.success and raising.error == "RuntimeError: at import"
    exiting = check_function("import sys\nsys.exit(0)\ndef add(a, b):\n    return a + b\n", ADD_TEST, "add")
    assert not exiting.success and "SystemExit" in exiting.error


def test_check_function_stops_slow_and_greedy_solutions():
    start = time.perf_counter()
    looping = check_function("def add(a, b):\n    while True:\n        pass\n", ADD_TEST, "add", timeout=1.0)
    assert not looping.success and looping.timeout
    assert time.perf_counter() - start < 5.0
    greedy = check_function("def add(a, b):\n    return len(bytearray(8 * 1024**3))\n", ADD_TEST, "add")
    assert not greedy.success and greedy.memory_exceeded and not greedy.timeout


def test_check_function_refuses_results_that_are_not_plain_values():
    # an object equal to everything passed the old in-process grading; here it cannot cross at all
    solution = "class Anything:\n    def __eq__(self, other):\n        return True\ndef add(a, b):\n    return Anything()\n"
    result = check_function(solution, ADD_TEST, "add")
    assert not result.success and "cannot pass between the tests and the candidate" in result.error


PLAIN_VALUES = [None, True, False, 0, -7, 10 ** 5000, 2.5, -0.0, float("inf"), 1e-300, complex(1, -2), "",
                "snow \u2603", b"\x00\xff", [1, [2, (3,)]], (), (1, "a"), {1, 2}, frozenset({"x"}),
                {"a": [1], (1, 2): {"b": None}}]


@pytest.mark.parametrize("value", PLAIN_VALUES, ids=lambda v: type(v).__name__)
def test_plain_values_cross_unchanged(value):
    decoded = decode_value(encode_value(value))
    assert decoded == value and type(decoded) is type(value)
    if value is None or isinstance(value, bool):
        assert decoded is value  # tests compare with `is True` / `is None`


def test_values_of_subclasses_cross_as_their_base_type_and_nan_survives():
    point = collections.namedtuple("Point", "x y")(1, 2)
    assert type(decode_value(encode_value(point))) is tuple and decode_value(encode_value(point)) == (1, 2)
    counts = decode_value(encode_value(collections.Counter("aab")))
    assert type(counts) is dict and counts == {"a": 2, "b": 1}
    assert math.isnan(decode_value(encode_value(float("nan"))))
    with pytest.raises(TypeError, match="cannot pass"):
        encode_value(object())
    with pytest.raises(ValueError, match="malformed"):
        decode_value(["eval", "__import__('os')"])
