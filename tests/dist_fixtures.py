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
    """A spawned worker's last call, once its results are written: the ranks meet, then the process
    ends without gloo's teardown, which now and then aborted a rank (SIGABRT) after its work had
    passed. After a script's main(), whose compute_cleanup() has destroyed the group, only the
    interpreter's exit is skipped. A worker that raised never gets here; spawn reports its traceback."""
    if dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
