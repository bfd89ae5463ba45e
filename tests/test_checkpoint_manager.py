"""
Checkpoints (nanochat/checkpoint_manager.py): round trips, compile prefixes, dtype on CPU,
atomic saves under a kill, finding a stage by name, pruning, and resumes that end
bitwise equal to uninterrupted runs (one process, and 2 gloo ranks with sharded optimizers).
"""

import json
import random
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from nanochat.checkpoint_manager import (UnreadableCheckpointError, find_stage_checkpoint, start_or_resume, latest_checkpoint,
                                         load_checkpoint, load_model, resume_training, save_checkpoint)
from nanochat.common import REPO_ROOT, seed_everything
from nanochat.muon import muon_momentum
from nanochat.optim import build_optimizers, clip_grad_norm_
from tests.dist_fixtures import end_rank

torch.set_num_threads(1)
VOCAB, DIM, T, BATCH = 16, 8, 4, 4
META = {"model_config": {"vocab_size": VOCAB, "n_embd": DIM}, "init_from": None}


class TinyLM(nn.Module):
    """Named like the GPT where it matters: o_proj starts with letters that lstrip("_orig_mod.") eats."""

    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(VOCAB, DIM)
        self.o_proj = nn.Linear(DIM, DIM, bias=False)
        self.mlp = nn.Linear(DIM, DIM, bias=False)
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, idx, targets):
        x = self.wte(idx)
        x = x + F.dropout(torch.tanh(self.o_proj(x)), p=0.2, training=self.training)  # consumes torch RNG
        x = x + torch.relu(self.mlp(x))
        return F.cross_entropy(self.lm_head(x).flatten(0, 1), targets.flatten())


def make_run(init_seed, ddp=False):
    torch.manual_seed(init_seed)
    model = TinyLM()
    optimizers = build_optimizers([model.o_proj.weight, model.mlp.weight], [model.wte.weight],
                                  [model.lm_head.weight], model_dim=DIM, ddp=ddp)
    return model, optimizers


def train_steps(model, optimizers, loader_state, start, stop, rank=0, world_size=1):
    """A loop that leans on every piece of state a resume must restore: torch RNG (dropout),
    python and numpy RNG (LR jitter), loader position, optimizer moments, momentum schedule."""
    for step in range(start, stop):
        g = torch.Generator().manual_seed(1000 * loader_state["position"] + rank)
        idx, targets = torch.randint(0, VOCAB, (2, BATCH, T), generator=g)
        loader_state["position"] += 1
        model(idx, targets).backward()
        jitter = 1 + 0.1 * random.random() + 0.1 * float(np.random.rand())
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * jitter
                if group["kind"] == "muon":
                    group["momentum"] = muon_momentum(50 * step)
        clip_grad_norm_(optimizers, 1.0)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)


def optimizer_tensors(optimizers):
    return [t for opt in optimizers for state in opt.state.values() for t in state.values() if torch.is_tensor(t)]


# -----------------------------------------------------------------------------
# Round trip and what a checkpoint file holds

def test_round_trip_restores_model_optimizers_rng_and_loader(tmp_path):
    seed_everything(0)
    model, optimizers = make_run(0)
    loader_state = {"position": 0}
    train_steps(model, optimizers, loader_state, 0, 2)
    path = save_checkpoint(tmp_path, 2, model, optimizers, meta=META, loader_state=dict(loader_state),
                           extra={"val_bpb": 1.25})
    assert path == tmp_path / "ckpt_2.pt"
    expected_draws = (random.random(), float(np.random.rand()), torch.rand(3))

    seed_everything(99)
    fresh, fresh_optimizers = make_run(5)
    step, restored_loader, extra = resume_training(path, fresh, fresh_optimizers, "cpu")
    assert (step, restored_loader, extra) == (2, {"position": 2}, {"val_bpb": 1.25})
    for (name, p), q in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(p, q), name
    for a, b in zip(optimizer_tensors(optimizers), optimizer_tensors(fresh_optimizers), strict=True):
        assert torch.equal(a, b)
    assert fresh_optimizers[1].param_groups[0]["momentum"] == optimizers[1].param_groups[0]["momentum"]
    draws = (random.random(), float(np.random.rand()), torch.rand(3))
    assert draws[:2] == expected_draws[:2] and torch.equal(draws[2], expected_draws[2])


def test_config_json_records_the_run(tmp_path):
    model, optimizers = make_run(0)
    save_checkpoint(tmp_path / "sft", 7, model, optimizers, meta={**META, "init_from": "mid"}, final=True)
    config = json.loads((tmp_path / "sft" / "config.json").read_text())
    assert config["model_config"] == META["model_config"]
    assert (config["step"], config["stage"], config["init_from"], config["world_size"]) == (7, "sft", "mid", 1)
    assert config["git_commit"] and config["saved_at"]


def test_save_refuses_what_could_not_be_loaded(tmp_path):
    model, optimizers = make_run(0)
    with pytest.raises(ValueError, match="model_config"):
        save_checkpoint(tmp_path, 1, model, optimizers, meta={})
    with pytest.raises(TypeError, match=r"loader_state\['pos'\] is a numpy.int64"):
        save_checkpoint(tmp_path, 1, model, optimizers, meta=META, loader_state={"pos": np.int64(3)})
    assert not list(tmp_path.glob("ckpt*"))


def test_compile_prefix_removed_with_removeprefix(tmp_path):
    model, optimizers = make_run(0)
    compiled = torch.compile(model)  # wrapping is lazy: nothing compiles until it is called
    assert "_orig_mod.o_proj.weight" in compiled.state_dict()
    path = save_checkpoint(tmp_path, 1, compiled, optimizers, meta=META)
    assert "o_proj.weight" in load_checkpoint(path, "cpu")["model"]
    # A file written with prefixed keys (by another tool, or an older save) loads clean too:
    # "_orig_mod.o_proj.weight".lstrip("_orig_mod.") would give "_proj.weight".
    raw = torch.load(path, weights_only=True)
    raw["model"] = {f"_orig_mod.{k}": v for k, v in raw["model"].items()}
    torch.save(raw, tmp_path / "prefixed.pt")
    keys = set(load_checkpoint(tmp_path / "prefixed.pt", "cpu")["model"])
    assert keys == {"wte.weight", "o_proj.weight", "mlp.weight", "lm_head.weight"}
    # and resuming into a compiled model loads through the original module
    fresh, fresh_optimizers = make_run(3)
    resume_training(tmp_path / "prefixed.pt", torch.compile(fresh), fresh_optimizers, "cpu")
    assert torch.equal(fresh.o_proj.weight, model.o_proj.weight)


def test_bf16_weights_load_as_fp32_on_cpu(tmp_path):
    model, optimizers = make_run(0)
    model.wte.to(torch.bfloat16)  # as on CUDA, where the embedding table is kept in bf16
    path = save_checkpoint(tmp_path, 1, model, optimizers, meta=META)
    assert torch.load(path, weights_only=True)["model"]["wte.weight"].dtype == torch.bfloat16
    state = load_checkpoint(path, "cpu")["model"]
    assert state["wte.weight"].dtype == torch.float32
    assert torch.equal(state["wte.weight"], model.wte.weight.float())
    assert state["o_proj.weight"].dtype == torch.float32


def test_unloadable_file_is_named(tmp_path):
    bad = tmp_path / "ckpt_3.pt"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(RuntimeError, match="ckpt_3.pt"):
        load_checkpoint(bad, "cpu")


# -----------------------------------------------------------------------------
# Atomic saves: a process killed mid-save

KILLED_SAVE = textwrap.dedent("""
    import resource, signal, sys, time
    import torch
    from nanochat.checkpoint_manager import save_checkpoint
    out, mode = sys.argv[1], sys.argv[2]
    model = torch.nn.Linear(4, 4)
    meta = {"model_config": {}}
    save_checkpoint(out, 1, model, [], meta=meta, extra={"version": 1}, final=True)
    payload = torch.randn(16_000_000)  # 64 MB: the second save takes a while to write
    if mode == "fsize":
        # The kernel kills a process that writes past RLIMIT_FSIZE (Python ignores SIGXFSZ by
        # default; restore the default action), so this dies at an exact point inside the write.
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4_000_000, 4_000_000))
    save_checkpoint(out, 2, model, [], meta=meta, extra={"version": 2, "payload": payload}, final=True)
    time.sleep(60)  # never reached in fsize mode; in kill mode the parent kills us by now
""")


def run_killed_save(out_dir, mode):
    return subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(out_dir), mode], cwd=REPO_ROOT)


@pytest.mark.slow
def test_kill_inside_the_write_keeps_previous_checkpoint(tmp_path):
    proc = run_killed_save(tmp_path, "fsize")
    assert proc.wait(timeout=120) == -signal.SIGXFSZ
    leftovers = list(tmp_path.glob("ckpt.pt.tmp*"))
    assert len(leftovers) == 1 and 0 < leftovers[0].stat().st_size <= 4_000_000  # it died mid-write
    assert latest_checkpoint(tmp_path) == tmp_path / "ckpt.pt"
    assert load_checkpoint(tmp_path / "ckpt.pt", "cpu")["extra"] == {"version": 1}
    assert json.loads((tmp_path / "config.json").read_text())["step"] == 1
    # the next save clears the half-written file
    save_checkpoint(tmp_path, 3, torch.nn.Linear(4, 4), [], meta={"model_config": {}}, final=True)
    assert not list(tmp_path.glob("*.tmp*"))


@pytest.mark.slow
def test_sigkill_during_save_leaves_a_loadable_checkpoint(tmp_path):
    proc = run_killed_save(tmp_path, "kill")
    deadline = time.time() + 120
    def second_save_started():  # the first save's ckpt.pt is in place and the second one's temp file exists
        return (tmp_path / "ckpt.pt").exists() and list(tmp_path.glob("ckpt.pt.tmp*"))

    while not second_save_started() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.001)
    assert proc.poll() is None, "the save process exited before its second save started"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    # Killed while writing (almost always) or just after the rename: either way ckpt.pt is whole.
    ckpt = load_checkpoint(latest_checkpoint(tmp_path), "cpu")
    assert ckpt["extra"]["version"] in (1, 2)
    if ckpt["extra"]["version"] == 2:
        assert ckpt["extra"]["payload"].numel() == 16_000_000


# -----------------------------------------------------------------------------
# Finding checkpoints

def test_latest_checkpoint_and_pruning(tmp_path):
    model, optimizers = make_run(0)
    assert latest_checkpoint(tmp_path) is None
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, model, optimizers, meta=META, keep=2)
    assert sorted(f.name for f in tmp_path.glob("ckpt*.pt")) == ["ckpt_4.pt", "ckpt_5.pt"]
    assert latest_checkpoint(tmp_path) == tmp_path / "ckpt_5.pt"
    save_checkpoint(tmp_path, 5, model, optimizers, meta=META, final=True, keep=2)
    assert latest_checkpoint(tmp_path) == tmp_path / "ckpt.pt"  # same step: the final one wins
    save_checkpoint(tmp_path, 7, model, optimizers, meta=META, keep=2)  # a run extended past its end
    assert latest_checkpoint(tmp_path) == tmp_path / "ckpt_7.pt"
    assert (tmp_path / "ckpt.pt").exists()  # the final checkpoint is never pruned


def test_find_stage_checkpoint_by_name_path_and_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_OUTS_DIR", str(tmp_path / "outs"))
    with pytest.raises(FileNotFoundError, match=r"no checkpoint for stage 'sft' under .*outs/sft: run scripts.chat_sft first"):
        find_stage_checkpoint("sft")
    model, optimizers = make_run(0)
    save_checkpoint(tmp_path / "outs" / "sft", 10, model, optimizers, meta=META)
    assert find_stage_checkpoint("sft") == tmp_path / "outs" / "sft" / "ckpt_10.pt"  # unfinished: newest
    save_checkpoint(tmp_path / "outs" / "sft", 20, model, optimizers, meta=META, final=True)
    assert find_stage_checkpoint("sft") == tmp_path / "outs" / "sft" / "ckpt.pt"
    direct = tmp_path / "outs" / "sft" / "ckpt_10.pt"
    assert find_stage_checkpoint(str(direct)) == direct
    assert find_stage_checkpoint(str(tmp_path / "outs" / "sft")) == tmp_path / "outs" / "sft" / "ckpt.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt does not exist"):
        find_stage_checkpoint(str(tmp_path / "nope.pt"))


def truncate(path, keep_fraction=0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep_fraction)])


def saved_run(out_dir, steps):
    """A model saved at each of steps, trained a little between saves; returns its weights at each."""
    model, optimizers = make_run(0)
    weights, loader_state = {}, {"position": 0}
    for step in steps:
        train_steps(model, optimizers, loader_state, step - 1, step)
        save_checkpoint(out_dir, step, model, optimizers, meta=META, loader_state=dict(loader_state))
        weights[step] = {k: v.clone() for k, v in model.state_dict().items()}
    return weights


def test_resume_falls_back_past_a_truncated_newest_checkpoint_and_says_so(tmp_path, caplog):
    weights = saved_run(tmp_path, [1, 2, 3])
    truncate(tmp_path / "ckpt_3.pt")
    model, optimizers = make_run(5)
    with caplog.at_level("WARNING", logger="nanochat.checkpoint_manager"):
        step, loader_state, _, resumed_step = start_or_resume(tmp_path, True, model, optimizers, "cpu", num_iterations=10)
    assert step == resumed_step == 2 and loader_state == {"position": 2}
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, weights[2][name]), name
    warning = "\n".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "ckpt_3.pt cannot be read, it is truncated or corrupt" in warning and "older checkpoint" in warning


def test_a_zero_byte_checkpoint_gets_a_clear_message(tmp_path, caplog):
    saved_run(tmp_path, [1, 2])
    (tmp_path / "ckpt.pt").write_bytes(b"")  # a final checkpoint that never reached the disk
    with pytest.raises(UnreadableCheckpointError, match=r"ckpt.pt is empty \(0 bytes\)") as error:
        load_checkpoint(tmp_path / "ckpt.pt", "cpu")
    assert "mmap" not in str(error.value)
    with caplog.at_level("WARNING", logger="nanochat.checkpoint_manager"):
        assert latest_checkpoint(tmp_path) == tmp_path / "ckpt_2.pt"  # resume goes on from the newest readable one
    assert any("ckpt.pt is empty (0 bytes)" in r.getMessage() for r in caplog.records)


def test_every_checkpoint_unreadable_is_a_clear_error(tmp_path):
    saved_run(tmp_path, [1, 2])
    (tmp_path / "ckpt_2.pt").write_bytes(b"")
    truncate(tmp_path / "ckpt_1.pt")
    model, optimizers = make_run(0)
    with pytest.raises(UnreadableCheckpointError, match=r"no usable checkpoint under .*: checkpoint .*ckpt_2.pt is empty "
                       r"\(0 bytes\).*; checkpoint .*ckpt_1.pt cannot be read.*Delete these files"):
        start_or_resume(tmp_path, True, model, optimizers, "cpu")


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_a_stage_whose_final_checkpoint_is_unreadable_is_not_served_from_an_older_one(tmp_path, monkeypatch, damage):
    # chat and eval load the stage's final model; an intermediate one in its place would change what they measure
    monkeypatch.setenv("NANOCHAT_OUTS_DIR", str(tmp_path / "outs"))
    model, optimizers = make_run(0)
    save_checkpoint(tmp_path / "outs" / "sft", 10, model, optimizers, meta=META)
    final = save_checkpoint(tmp_path / "outs" / "sft", 20, model, optimizers, meta=META, final=True)
    final.write_bytes(b"") if damage == "empty" else truncate(final)
    reason = r"is empty \(0 bytes\)" if damage == "empty" else "cannot be read, it is truncated or corrupt"
    with pytest.raises(UnreadableCheckpointError, match=rf"sft/ckpt.pt {reason}.*rerun scripts.chat_sft"):
        find_stage_checkpoint("sft")
    with pytest.raises(UnreadableCheckpointError, match=rf"sft/ckpt.pt {reason}"):
        load_model("sft", "cpu")


def test_load_model_by_stage_name(tmp_path, monkeypatch):
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.tokenizer import Tokenizer

    monkeypatch.setenv("NANOCHAT_OUTS_DIR", str(tmp_path / "outs"))
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    text = ["the cat sat on the mat. the dog sat on the log. " * 20]
    tokenizer = Tokenizer.train_from_iterator(iter(text), 256 + 9 + 16)
    tokenizer.save(tmp_path / "base" / "tok")
    torch.manual_seed(0)
    config = GPTConfig(sequence_len=16, vocab_size=tokenizer.get_vocab_size(), n_layer=1, n_head=1, n_kv_head=1, n_embd=32)
    model = GPT(config)
    save_checkpoint(tmp_path / "outs" / "grpo_density", 3, model, [], final=True,
                    meta={"model_config": asdict(config), "init_from": "sft"})
    loaded, loaded_tokenizer, meta = load_model("grpo_density", "cpu")
    assert meta["init_from"] == "sft" and meta["stage"] == "grpo_density"
    assert not loaded.training
    assert loaded_tokenizer.get_vocab_size() == config.vocab_size
    idx = torch.tensor([tokenizer.encode("the cat sat", prepend="<|bos|>")])
    torch.testing.assert_close(loaded(idx), model.eval()(idx), rtol=0, atol=0)
    assert load_model("grpo_density", "cpu", phase="train")[0].training


# -----------------------------------------------------------------------------
# Resume ends bitwise equal to an uninterrupted run

def test_resume_is_bitwise_equal_to_uninterrupted_run(tmp_path):
    seed_everything(0)
    model, optimizers = make_run(0)
    train_steps(model, optimizers, {"position": 0}, 0, 6)

    seed_everything(0)
    first, first_optimizers = make_run(0)
    loader_state = {"position": 0}
    train_steps(first, first_optimizers, loader_state, 0, 3)
    save_checkpoint(tmp_path, 3, first, first_optimizers, meta=META, loader_state=loader_state)
    train_steps(first, first_optimizers, loader_state, 3, 4)  # the killed run got a little further

    seed_everything(12345)  # a new process: other seeds, other initial weights
    resumed, resumed_optimizers = make_run(77)
    step, loader_state, _ = resume_training(latest_checkpoint(tmp_path), resumed, resumed_optimizers, "cpu")
    assert step == 3
    train_steps(resumed, resumed_optimizers, loader_state, step, 6)
    for (name, p), q in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), name
    for a, b in zip(optimizer_tensors(optimizers), optimizer_tensors(resumed_optimizers), strict=True):
        assert torch.equal(a, b)


def _distributed_resume_worker(rank, world_size, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    seed_everything(rank)  # ranks draw different dropout masks and jitter, as under torchrun
    model, optimizers = make_run(0, ddp=True)
    train_steps(model, optimizers, {"position": 0}, 0, 4, rank, world_size)

    seed_everything(rank)
    first, first_optimizers = make_run(0, ddp=True)
    loader_state = {"position": 0}
    train_steps(first, first_optimizers, loader_state, 0, 2, rank, world_size)
    save_checkpoint(out_dir, 2, first, first_optimizers, meta=META, loader_state=loader_state)

    seed_everything(100 + rank)
    resumed, resumed_optimizers = make_run(9, ddp=True)
    step, loader_state, _ = resume_training(out_dir, resumed, resumed_optimizers, "cpu")
    train_steps(resumed, resumed_optimizers, loader_state, step, 4, rank, world_size)
    torch.save({"uninterrupted": model.state_dict(), "resumed": resumed.state_dict(),
                "uninterrupted_opt": optimizer_tensors(optimizers),
                "resumed_opt": optimizer_tensors(resumed_optimizers)}, f"{out_dir}/result{rank}.pt")
    end_rank()


@pytest.mark.slow
def test_distributed_resume_is_bitwise_equal_with_per_rank_files(tmp_path):
    out_dir = tmp_path / "outs"
    mp.spawn(_distributed_resume_worker, args=(2, str(tmp_path / "init"), str(out_dir)), nprocs=2, join=True)
    assert (out_dir / "ckpt_2.pt").exists() and (out_dir / "ckpt_2_rank1.pt").exists()
    for rank in range(2):
        result = torch.load(out_dir / f"result{rank}.pt", weights_only=True)
        for name, p in result["uninterrupted"].items():
            assert torch.equal(p, result["resumed"][name]), (rank, name)
        assert len(result["resumed_opt"]) > 0  # each rank owns a shard of optimizer state
        for a, b in zip(result["uninterrupted_opt"], result["resumed_opt"], strict=True):
            assert torch.equal(a, b)
    # rank 1's state lives in its own file, and a single process cannot resume a 2-rank run
    assert torch.load(out_dir / "ckpt_2_rank1.pt", weights_only=True)["rank_state"]["loader_state"] == {"position": 2}
    model, optimizers = make_run(0)
    with pytest.raises(RuntimeError, match="written by 2 ranks"):
        resume_training(out_dir / "ckpt_2.pt", model, optimizers, "cpu")


def test_fresh_start_refuses_a_folder_holding_an_earlier_runs_checkpoints(tmp_path):
    # pruning and resume go by step number: a new run mixed into an old run's folder would lose its
    # own checkpoints to the old ones' higher steps, and resume would load the old run
    model, optimizers = make_run(0)
    assert start_or_resume(tmp_path, False, model, optimizers, "cpu") == (0, None, None, None)
    save_checkpoint(tmp_path, 3000, model, optimizers, meta={"model_config": {}})
    with pytest.raises(FileExistsError, match="--resume=true"):
        start_or_resume(tmp_path, False, model, optimizers, "cpu")
    step, _, _, resumed_step = start_or_resume(tmp_path, True, model, optimizers, "cpu", num_iterations=5000)
    assert step == resumed_step == 3000


def test_resume_past_the_runs_horizon_is_refused(tmp_path):
    # past num_iterations the warmdown goes negative and the loop's end test never fires
    model, optimizers = make_run(0)
    save_checkpoint(tmp_path, 4, model, optimizers, meta={"model_config": {}})
    with pytest.raises(ValueError, match="past this run's 2 steps"):
        start_or_resume(tmp_path, True, model, optimizers, "cpu", num_iterations=2)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        start_or_resume(tmp_path / "empty", True, model, optimizers, "cpu")
