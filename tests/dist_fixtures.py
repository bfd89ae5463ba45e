"""
Two gloo ranks on this machine, for the tests of distributed code: a free port for a rendezvous,
and the end of a rank spawned by torch.multiprocessing.
"""

import os
import socket
import sys

import torch.distributed as dist


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on now (MASTER_PORT for one spawn)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def end_rank() -> None:
    """A spawned worker's last call, once its results are written: every rank meets here, then the
    process ends at once. Gloo's teardown (destroy_process_group, or the interpreter's exit) while a
    peer is still tearing down aborts a rank now and then (SIGABRT, "terminate called without an
    active exception"), which fails the test after its work has passed. A `finally` that destroys
    the group still runs when the work raised."""
    if dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
