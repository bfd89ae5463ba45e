"""
One checkpoint mechanism for every stage (SPEC section 2).

outs/<stage>/
    ckpt_<step>.pt           intermediate checkpoint (the last `keep` are kept)
    ckpt.pt                  final checkpoint
    ckpt_<step>_rank<r>.pt   } under torchrun with r >= 1: that rank's optimizer shards,
    ckpt_rank<r>.pt          } RNG state and loader position, beside the matching main file
    config.json              meta of the newest save: model config, training args, git commit,
                             the stage it was initialised from, step, time
    training_log.txt, logs/  written by nanochat/run_logger.py

A main file holds everything a resume needs, which therefore needs the same number of ranks.
Saves are atomic: a kill at any moment leaves the previous checkpoint loadable. A checkpoint holds
only plain data, so it loads with torch.load(weights_only=True): loading never runs pickled code.
"""

import json
import logging
import os
import random
import re
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from nanochat.common import atomic_write, git_commit, stage_dir

log = logging.getLogger(__name__)

FINAL_NAME = "ckpt.pt"
_INTERMEDIATE = re.compile(r"^ckpt_(\d+)\.pt$")
COMPILE_PREFIX = "_orig_mod."  # what torch.compile puts before every state_dict key
STAGE_SCRIPTS = {"base": "scripts.base_train", "mid": "scripts.mid_train", "sft": "scripts.chat_sft",
                 "rl": "scripts.chat_rl", "rm": "scripts.train_rm",
                 "grpo_density": "scripts.grpo --prompt_sampling=density",
                 "grpo_baseline": "scripts.grpo --prompt_sampling=uniform",
                 "grpo_shuffled": "scripts.grpo --prompt_sampling=shuffled"}


# -----------------------------------------------------------------------------
# File layout

def _rank_file(main_path: Path, rank: int) -> Path:
    return main_path.with_name(f"{main_path.stem}_rank{rank}.pt")


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _atomic_write(path: Path, write):
    """write(f) durably into path (fsync, rename), first removing what a killed save left behind."""
    for stale in path.parent.glob(f"{path.name}.tmp*"):
        stale.unlink()
    atomic_write(path, write, durable=True)


def _check_plain(obj, where: str):
    """Refuse at save time what weights_only loading would refuse at resume time."""
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor)):
        return
    if isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            _check_plain(item, f"{where}[{i}]")
    elif isinstance(obj, dict):
        for key, item in obj.items():
            _check_plain(key, f"{where} key {key!r}")
            _check_plain(item, f"{where}[{key!r}]")
    else:
        raise TypeError(f"{where} is a {type(obj).__module__}.{type(obj).__name__}; checkpoints hold only tensors, "
                        "numbers, strings, lists and dicts (convert numpy scalars with int()/float())")


# -----------------------------------------------------------------------------
# State that is not model weights

def _capture_rng(device: torch.device) -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [name, keys.tolist(), pos, has_gauss, cached],
             "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _restore_rng(state: dict, device: torch.device):
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda":
        if "cuda" not in state:
            raise RuntimeError("the checkpoint was written without CUDA RNG state; resume on the device it was saved on")
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def _model_state(model: torch.nn.Module) -> dict:
    return {k.removeprefix(COMPILE_PREFIX): v for k, v in model.state_dict().items()}


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "_orig_mod", model)  # a torch.compile'd model loads through its original


# -----------------------------------------------------------------------------
# Saving

def save_checkpoint(out_dir, step: int, model, optimizers, *, meta: dict, loader_state=None, extra=None,
                    final: bool = False, keep: int | None = None) -> Path:
    """
    Write ckpt_<step>.pt (or ckpt.pt when final) into out_dir, plus config.json; every rank
    calls this. meta must hold "model_config" (the GPTConfig fields); step, stage (default:
    out_dir's name), git commit, world size and time are added. loader_state is this rank's
    data position, extra anything else the script wants back (plain data only). keep=K deletes
    all but the newest K intermediate checkpoints. Returns the main file's path.
    """
    out_dir = Path(out_dir)
    rank, world_size = _rank_and_world()
    if "model_config" not in meta:
        raise ValueError("save_checkpoint: meta needs 'model_config' (the GPTConfig fields) so the model can be rebuilt")
    device = next(model.parameters()).device
    # per rank: DistMuon/DistAdamW keep only the shards a rank owns, and each rank has its own RNG and data position
    rank_state = {"optimizers": [opt.state_dict() for opt in optimizers], "rng": _capture_rng(device),
                  "loader_state": loader_state}
    _check_plain(loader_state, "loader_state")
    _check_plain(extra, "extra")
    out_dir.mkdir(parents=True, exist_ok=True)
    main_path = out_dir / (FINAL_NAME if final else f"ckpt_{step}.pt")

    if rank > 0:
        payload = {"step": step, "rank": rank, "world_size": world_size, "rank_state": rank_state}
        _atomic_write(_rank_file(main_path, rank), lambda f: torch.save(payload, f))
    _barrier()  # every rank's file is in place before the main file says the checkpoint exists
    if rank == 0:  # the weights are written by rank 0 only: every rank holds the same weights
        full_meta = _full_meta(meta, out_dir.name, step, world_size)
        meta_json = json.dumps(full_meta, indent=2)  # fails here, before any file is touched, if meta is not JSON
        payload = {"format": 1, "step": step, "world_size": world_size, "meta": full_meta,
                   "model": _model_state(model), "extra": extra, "rank_state": rank_state}
        _atomic_write(main_path, lambda f: torch.save(payload, f))
        _atomic_write(out_dir / "config.json", lambda f: f.write(meta_json.encode() + b"\n"))
        if keep is not None:
            _prune_intermediate(out_dir, keep)
    _barrier()
    return main_path


def _full_meta(meta: dict, stage: str, step: int, world_size: int) -> dict:
    return {**meta, "stage": meta.get("stage", stage), "step": step, "world_size": world_size,
            "git_commit": git_commit(), "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def save_model_weights(path, step: int, model, *, meta: dict) -> Path:
    """
    A weights-only checkpoint at path (no optimizer, RNG or per-rank state: it cannot resume a
    run), loadable with load_model(path). One process writes it (the weights are every rank's).
    """
    path = Path(path)
    if "model_config" not in meta:
        raise ValueError("save_model_weights: meta needs 'model_config' (the GPTConfig fields) so the model can be rebuilt")
    full_meta = _full_meta(meta, path.parent.name, step, 1)
    json.dumps(full_meta)  # fails here, before any file is touched, if meta is not JSON
    payload = {"format": 1, "step": step, "world_size": 1, "meta": full_meta, "model": _model_state(model),
               "extra": None, "rank_state": None}
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, lambda f: torch.save(payload, f))
    return path


def _intermediate_steps(out_dir: Path) -> list[int]:
    return sorted(int(m.group(1)) for f in out_dir.glob("ckpt_*.pt") if (m := _INTERMEDIATE.match(f.name)))


def _prune_intermediate(out_dir: Path, keep: int):
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    for step in _intermediate_steps(out_dir)[:-keep]:
        main_path = out_dir / f"ckpt_{step}.pt"
        main_path.unlink()  # first, so a kill midway leaves orphan rank files, never a main file without them
        for rank_path in out_dir.glob(f"ckpt_{step}_rank*.pt"):
            rank_path.unlink()


# -----------------------------------------------------------------------------
# Finding and loading

class UnreadableCheckpointError(RuntimeError):
    """A checkpoint file that cannot be read (empty, truncated, corrupt), or a folder with none usable."""


def _peek(path: Path) -> dict:
    """A checkpoint's small fields without reading its tensors (memory-mapped)."""
    if path.stat().st_size == 0:  # torch would only say that it cannot mmap an empty file
        raise UnreadableCheckpointError(f"checkpoint {path} is empty (0 bytes): nothing of it reached the disk")
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # re-raised with the file's name: torch's message does not say which file
        raise UnreadableCheckpointError(f"checkpoint {path} cannot be read, it is truncated or corrupt "
                                        f"({type(e).__name__}: {e})") from e


def _is_complete(path: Path) -> bool:
    """The main file and, under DDP, each rank's file of the same step (a save killed while
    overwriting ckpt.pt can leave rank files newer than the main file)."""
    main = _peek(path)
    for rank in range(1, main["world_size"]):
        rank_path = _rank_file(path, rank)
        if not rank_path.exists() or _peek(rank_path)["step"] != main["step"]:
            return False
    return True


def latest_checkpoint(out_dir) -> Path | None:
    """
    The newest complete, readable checkpoint in out_dir (highest step; ckpt.pt wins a tie), or None
    when it holds none. An unreadable or incomplete one is skipped with a warning naming it and why;
    if there are checkpoints but none is usable, UnreadableCheckpointError says why for each.
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return None
    candidates = [(step, 0, out_dir / f"ckpt_{step}.pt") for step in _intermediate_steps(out_dir)]
    final = out_dir / FINAL_NAME
    skipped = []
    if final.exists():
        try:
            candidates.append((_peek(final)["step"], 1, final))
        except UnreadableCheckpointError as e:
            skipped.append(str(e))
            log.warning("skipping %s; looking for an older checkpoint", e)
    for _, _, path in sorted(candidates, reverse=True):
        try:
            if _is_complete(path):
                return path
            reason = f"checkpoint {path} is incomplete: a rank's file is missing or from another step"
        except UnreadableCheckpointError as e:
            reason = str(e)
        skipped.append(reason)
        log.warning("skipping %s; looking for an older checkpoint", reason)
    if skipped:
        raise UnreadableCheckpointError(f"no usable checkpoint under {out_dir}: " + "; ".join(skipped)
                                        + ". Delete these files and rerun the stage from the start (without --resume)")
    return None


def start_or_resume(out_dir, resume: bool, model, optimizers, device, num_iterations: int | None = None):
    """
    Where a training stage starts; every rank calls this. Without resume, at step 0 in an output
    folder that holds no checkpoint (a fresh run must not mix with an earlier run's files: pruning
    and resume go by step number and would pick the old run's). With resume, exactly where the
    newest checkpoint left off, which must not lie past this run's num_iterations (it would if the
    horizon flags changed). Returns (step, loader_state, extra, resumed_step or None).
    """
    out_dir = Path(out_dir)
    if not resume:
        existing = sorted(out_dir.glob("ckpt*.pt")) if out_dir.is_dir() else []
        if existing:
            raise FileExistsError(f"{out_dir} already holds checkpoints of an earlier run ({existing[0].name}, ...): "
                                  f"pass --resume=true to continue it, or move or delete {out_dir} to start over")
        return 0, None, None, None
    ckpt_path = latest_checkpoint(out_dir)
    if ckpt_path is None:
        raise FileNotFoundError(f"--resume=true but no checkpoint exists under {out_dir}")
    step, loader_state, extra = resume_training(ckpt_path, model, optimizers, device)
    if num_iterations is not None and step > num_iterations:
        raise ValueError(f"{ckpt_path} is at step {step}, past this run's {num_iterations} steps: the flags that set "
                         f"the horizon differ from the run that wrote it (see {out_dir / 'config.json'})")
    if _rank_and_world()[0] == 0:
        print(f"resumed from {ckpt_path} at step {step}", flush=True)
    return step, loader_state, extra, step


def load_checkpoint(path, device) -> dict:
    """
    Load a main checkpoint file. "model" is cleaned for loading into an uncompiled model:
    the torch.compile prefix removed from keys, bf16 tensors cast to fp32 when device is
    the CPU (CPU bf16 matmuls are slow), tensors moved to device. The rest stays on the CPU.
    """
    path, device = Path(path), torch.device(device)
    ckpt = _peek(path)
    if "model" not in ckpt or "meta" not in ckpt:
        raise RuntimeError(f"{path} is not a nanochat checkpoint (no model weights or meta in it)")
    model_state = {}
    for key, tensor in ckpt["model"].items():
        if device.type == "cpu" and tensor.dtype == torch.bfloat16:
            tensor = tensor.float()
        model_state[key.removeprefix(COMPILE_PREFIX)] = tensor.to(device)
    ckpt["model"] = model_state
    return ckpt


def resume_training(ckpt_path, model, optimizers, device) -> tuple[int, object, object]:
    """
    Restore model weights, this rank's optimizer state, RNG state (python, numpy, torch,
    CUDA) from a checkpoint (or the newest one in a directory); every rank calls this.
    Returns (step, loader_state, extra) for the script to continue from.
    """
    path, device = Path(ckpt_path), torch.device(device)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"no checkpoint to resume from under {path}")
        path = found
    rank, world_size = _rank_and_world()
    ckpt = load_checkpoint(path, device)
    if ckpt["world_size"] != world_size:
        raise RuntimeError(f"{path} was written by {ckpt['world_size']} ranks but this run has {world_size}; "
                           f"resume with torchrun --nproc_per_node={ckpt['world_size']} (optimizer state is sharded per rank)")
    if rank == 0:
        rank_state = ckpt["rank_state"]
    else:
        rank_path = _rank_file(path, rank)
        if not rank_path.exists():
            raise FileNotFoundError(f"{rank_path} is missing: rank {rank}'s part of checkpoint {path}")
        rank_ckpt = _peek(rank_path)
        if rank_ckpt["step"] != ckpt["step"]:
            raise RuntimeError(f"{rank_path} is from step {rank_ckpt['step']} but {path} is from step {ckpt['step']}")
        rank_state = rank_ckpt["rank_state"]
    try:
        _unwrap(model).load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as e:
        raise RuntimeError(f"weights in {path} do not fit this model: {e}") from e
    if len(optimizers) != len(rank_state["optimizers"]):
        raise RuntimeError(f"{path} holds {len(rank_state['optimizers'])} optimizer states, this run has {len(optimizers)}")
    for opt, state in zip(optimizers, rank_state["optimizers"]):
        opt.load_state_dict(state)
    _restore_rng(rank_state["rng"], device)
    return ckpt["step"], rank_state["loader_state"], ckpt["extra"]


def find_stage_checkpoint(stage_or_path) -> Path:
    """
    "sft" -> outs/sft/ckpt.pt (the newest intermediate one if the stage never finished);
    a path to a .pt file is taken as is; a directory path is searched like a stage folder.
    """
    text = str(stage_or_path)
    path = Path(text).expanduser()
    if path.suffix == ".pt":
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint file {path} does not exist")
        return path
    is_stage_name = os.sep not in text and "/" not in text
    directory = stage_dir(text) if is_stage_name else path
    script = STAGE_SCRIPTS.get(text, "the script that trains it") if is_stage_name else "the stage that wrote it"
    final = directory / FINAL_NAME
    if final.exists():
        try:
            complete = _is_complete(final)
        except UnreadableCheckpointError as e:  # not silently the newest intermediate one: a figure would change meaning
            raise UnreadableCheckpointError(f"{e}. It is the final model of {directory}: rerun {script} (--resume=true "
                                            "continues from its newest readable checkpoint), or load a ckpt_<step>.pt "
                                            "file by its path") from e
        if complete:
            return final
    latest = latest_checkpoint(directory)
    if latest is None:
        if is_stage_name:
            raise FileNotFoundError(f"no checkpoint for stage '{text}' under {directory}: run {script} first")
        raise FileNotFoundError(f"no checkpoint under {directory}")
    log.warning("%s has no final %s; using the newest intermediate checkpoint %s", directory, FINAL_NAME, latest.name)
    return latest


def build_model(model_config: dict, device):
    """A GPT of these config fields on device, ready for load_state_dict (no memory spent on an init first)."""
    from nanochat.gpt import GPT, GPTConfig

    with torch.device("meta"):
        model = GPT(GPTConfig(**model_config))
    model.to_empty(device=torch.device(device))
    model.init_weights()  # rebuilds the rotary buffers, which checkpoints do not hold
    return model


def tokenizer_for(vocab_size: int, path):
    """The run's tokenizer, checked to be the one the checkpoint at path was trained with."""
    from nanochat.tokenizer import get_tokenizer

    tokenizer = get_tokenizer()
    if tokenizer.get_vocab_size() != vocab_size:
        raise RuntimeError(f"{path} was trained with a {vocab_size}-token vocabulary but the tokenizer "
                           f"has {tokenizer.get_vocab_size()}; point NANOCHAT_BASE_DIR at the run that made it")
    return tokenizer


def load_model(stage_or_path, device, phase: str = "eval"):
    """(model, tokenizer, meta) for a stage name ("base", "sft", "grpo_density", ...) or a checkpoint path."""
    if phase not in ("eval", "train"):
        raise ValueError(f"phase must be 'eval' or 'train', got {phase!r}")
    path = find_stage_checkpoint(stage_or_path)
    ckpt = load_checkpoint(path, device)
    meta = ckpt["meta"]
    model = build_model(meta["model_config"], device)
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as e:
        raise RuntimeError(f"weights in {path} do not fit GPT({model.config}): {e}") from e
    model.train(phase == "train")
    return model, tokenizer_for(model.config.vocab_size, path), meta
