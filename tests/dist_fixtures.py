"""
Two gloo ranks on this machine, for the tests of distributed code: a script's main() run by each
rank as under torchrun, and the end of a rank spawned by torch.multiprocessing.
"""

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.http_fixtures import free_port


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


def _script_rank(rank, world_size, port, main, flags, env):
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **env)
    main(flags)
    end_rank()


def spawn_script(main, flags, env=None, nprocs=2) -> None:
    """main(flags) in nprocs gloo ranks, each with the environment torchrun gives it (plus env), on
    a fresh port, as one torchrun is; raises if a rank failed."""
    mp.spawn(_script_rank, args=(nprocs, free_port(), main, flags, env or {}), nprocs=nprocs, join=True)
