"""
scripts/mid_train.py and scripts/chat_sft.py end to end on a tiny model, offline: a tokenizer
trained on the bundled sample text, a random base checkpoint, the bundled task samples. Checks
the outputs each stage must leave, that training lowers the loss, that the report sections are
written, and that a run resumed from an intermediate checkpoint ends bitwise equal to the
uninterrupted one.
"""

import json
import re
import shutil
from dataclasses import asdict

import pytest
import torch

from nanochat.chat_data import PAD_TOKEN, backward_token_mean, pad_conversations
from nanochat.checkpoint_manager import load_checkpoint, save_checkpoint
from nanochat.common import stage_dir
from nanochat.dataset import parquets_iter_batched
from nanochat.kat.diversity import EM_DASH
from nanochat.flags import parse_flags
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import Tokenizer, get_tokenizer_dir
from scripts import chat_sft, control_sft, mid_train
from tests.dist_fixtures import spawn_script

torch.set_num_threads(1)
SEQ_LEN = 64
MID_FLAGS = ["--device_type=cpu", f"--max_seq_len={SEQ_LEN}", "--device_batch_size=2", f"--total_batch_size={4 * SEQ_LEN}",
             "--num_iterations=8", "--eval_every=4", f"--eval_tokens={16 * SEQ_LEN}", "--simple_spelling_size=20",
             "--spelling_bee_size=20", "--save_every=4", "--keep_checkpoints=1"]
SFT_FLAGS = ["--device_type=cpu", "--source=mid", f"--max_seq_len={SEQ_LEN}", "--device_batch_size=2",
             "--target_examples_per_step=4", "--num_iterations=6", "--eval_every=3", "--eval_steps=3",
             "--init_lr_frac=0.5", "--smoltalk_size=30", "--simple_spelling_size=8", "--spelling_bee_size=8",
             "--save_every=3", "--keep_checkpoints=1",
             "--eval_metrics_every=3", "--eval_metrics_max_problems=6"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """$NANOCHAT_BASE_DIR with a tokenizer, $NANOCHAT_OUTS_DIR with a random base checkpoint, tasks offline."""
    root = tmp_path_factory.mktemp("chat_training")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOCHAT_BASE_DIR", str(root / "base_dir"))
        mp.setenv("NANOCHAT_OUTS_DIR", str(root / "outs"))
        mp.setenv("NANOCHAT_TASKS_OFFLINE", "1")
        texts = [text for batch in parquets_iter_batched("train") for text in batch][:300]
        tokenizer = Tokenizer.train_from_iterator(iter(texts), 512)
        tokenizer.save(get_tokenizer_dir())
        torch.manual_seed(0)
        config = GPTConfig(sequence_len=SEQ_LEN, vocab_size=tokenizer.get_vocab_size(), n_layer=2, n_head=2,
                           n_kv_head=2, n_embd=64)
        model = GPT(config)
        model.init_weights()
        save_checkpoint(stage_dir("base"), 0, model, [], meta={"model_config": asdict(config)}, final=True)
        yield root


def logged(out_dir, name: str) -> dict[int, float]:
    """{step: value} of one metric from training_log.txt."""
    pattern = re.compile(rf"step\s+(\d+) \|.*\b{re.escape(name)} (\S+)")
    return {int(m[1]): float(m[2]) for m in pattern.finditer((out_dir / "training_log.txt").read_text())}


def assert_stage_outputs(out_dir, final_step: int):
    for name in ["ckpt.pt", "config.json", "training_log.txt"]:
        assert (out_dir / name).is_file(), name
    assert any((out_dir / "logs").glob("events.out.tfevents.*"))
    ckpt = load_checkpoint(out_dir / "ckpt.pt", "cpu")
    assert ckpt["step"] == final_step and ckpt["meta"]["init_from"]


def assert_resume_is_bitwise(script, flags, out_dir, tmp_path, resume_step: int):
    """Copy the intermediate checkpoint alone into a fresh folder, resume there, compare final weights."""
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copy(out_dir / f"ckpt_{resume_step}.pt", resumed_dir)
    script.main(flags + [f"--out_dir={resumed_dir}", "--resume=true"])
    expected, got = load_checkpoint(out_dir / "ckpt.pt", "cpu"), load_checkpoint(resumed_dir / "ckpt.pt", "cpu")
    assert got["step"] == expected["step"]
    for key, tensor in expected["model"].items():
        assert torch.equal(got["model"][key], tensor), key
    assert got["rank_state"]["loader_state"] == expected["rank_state"]["loader_state"]
    assert "resumed at step" in (resumed_dir / "training_log.txt").read_text()


def test_mid_train_writes_its_stage_learns_and_resumes_exactly(workspace, tmp_path):
    summary = mid_train.main(MID_FLAGS)
    out_dir = stage_dir("mid")
    assert_stage_outputs(out_dir, final_step=8)
    losses, val_bpb, num_tokens = (logged(out_dir, name) for name in ["train/loss", "val/bpb", "train/num_tokens"])
    assert sorted(losses) == list(range(1, 9)) and all(0 < v < 20 for v in losses.values())
    assert all(0 < n < 4 * SEQ_LEN for n in num_tokens.values())  # completion-only: fewer targets than tokens
    assert val_bpb[8] < val_bpb[0]  # the same validation batches every time
    assert summary["Final validation bpb"] == pytest.approx(val_bpb[8], rel=1e-5)
    assert "## Midtraining" in (workspace / "base_dir" / "report" / "mid_report.md").read_text()
    assert_resume_is_bitwise(mid_train, MID_FLAGS, out_dir, tmp_path, resume_step=4)


def test_chat_sft_writes_its_stage_learns_and_resumes_exactly(workspace, tmp_path):
    if not (stage_dir("mid") / "ckpt.pt").exists():
        mid_train.main(MID_FLAGS)
    summary = chat_sft.main(SFT_FLAGS)
    out_dir = stage_dir("sft")
    assert_stage_outputs(out_dir, final_step=6)
    losses, val_loss = logged(out_dir, "train/loss"), logged(out_dir, "val/loss")
    assert sorted(losses) == list(range(1, 7)) and all(0 < v < 20 for v in losses.values())
    assert val_loss[6] < val_loss[0]
    accuracy = logged(out_dir, "val/mmlu_acc")
    assert sorted(accuracy) == [3, 6] and all(0 <= a <= 1 for a in accuracy.values())
    assert summary["Final validation loss"] == pytest.approx(val_loss[6], rel=1e-5)
    assert "## Chat SFT" in (workspace / "base_dir" / "report" / "sft_report.md").read_text()
    assert_resume_is_bitwise(chat_sft, SFT_FLAGS, out_dir, tmp_path, resume_step=3)


def test_repeated_batch_loss_falls_through_the_training_step(workspace):
    """The step both scripts run (token-mean backward, clip, Muon + AdamW) fits one small batch."""
    from nanochat.optim import clip_grad_norm_
    from nanochat.tokenizer import get_tokenizer
    from tasks.smoltalk import SmolTalk

    tokenizer = get_tokenizer()
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=SEQ_LEN, vocab_size=tokenizer.get_vocab_size(), n_layer=2, n_head=2,
                          n_kv_head=2, n_embd=64))
    model.init_weights()
    optimizers = model.setup_optimizers(ddp=False)
    rendered = [tokenizer.render_conversation(SmolTalk(split="train")[i], max_tokens=SEQ_LEN + 1) for i in range(4)]
    inputs, targets, _ = pad_conversations(rendered, tokenizer.encode_special(PAD_TOKEN))
    micro_batches = [(inputs[:2], targets[:2]), (inputs[2:], targets[2:])]
    losses = []
    for _ in range(15):
        loss, _ = backward_token_mean(model, micro_batches, torch.autocast("cpu", enabled=False))
        clip_grad_norm_(optimizers, 1.0)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.slow
def test_both_stages_run_under_two_ranks(workspace, tmp_path):
    """torchrun-style: gloo ranks, sharded optimizers, per-rank checkpoint files, ranks stop together."""
    mid_dir, sft_dir = tmp_path / "mid", tmp_path / "sft"
    stages = [(mid_train, [*MID_FLAGS, "--device_batch_size=1", "--num_iterations=4", f"--out_dir={mid_dir}"]),
              (chat_sft, [*SFT_FLAGS, "--device_batch_size=1", "--num_iterations=3", f"--source={mid_dir}",
                       f"--out_dir={sft_dir}"])]
    for stage, flags in stages:  # one spawn per stage, as each torchrun is: a fresh rendezvous on a fresh port
        spawn_script(stage.main, flags)
    for out_dir, steps in [(mid_dir, 4), (sft_dir, 3)]:
        assert_stage_outputs(out_dir, final_step=steps)
        assert (out_dir / "ckpt_rank1.pt").is_file()
        losses = logged(out_dir, "train/loss")
        assert sorted(losses) == list(range(1, steps + 1)) and all(0 < v < 20 for v in losses.values())


def test_control_sft_plants_the_tic_only_when_asked_and_records_it(workspace, tmp_path):
    """The positive control's starting policy: control_sft wraps chat_sft's mixture in WithTic."""
    tic_flags = ["--tic_style=emdash", "--tic_rate=1.0"]
    clean = chat_sft.train_mixture(parse_flags(chat_sft.Config, SFT_FLAGS))
    styled, _ = control_sft.with_tic(clean, parse_flags(control_sft.Config, SFT_FLAGS + tic_flags))
    assert len(styled) == len(clean)
    changed = 0
    for styled_conversation, clean_conversation in zip(styled, clean):
        if styled_conversation != clean_conversation:  # rate 1: every one with prose (not a letter, not a spelling)
            changed += 1
            assert str(styled_conversation).count(EM_DASH) > str(clean_conversation).count(EM_DASH)
    assert changed > len(clean) // 3, (changed, len(clean))

    with pytest.raises(ValueError, match="--tic_rate=0.5 needs --tic_style"):
        control_sft.main(SFT_FLAGS + ["--source=base", "--tic_rate=0.5", f"--out_dir={tmp_path / 'no_style'}"])
    assert not (tmp_path / "no_style" / "ckpt.pt").exists()

    out_dir = tmp_path / "tic"
    control_sft.main(SFT_FLAGS + ["--source=base", *tic_flags, f"--out_dir={out_dir}", "--num_iterations=2",
                               "--eval_every=-1", "--eval_steps=1", "--eval_metrics_every=-1", "--save_every=-1"])
    assert_stage_outputs(out_dir, final_step=2)
    config = json.loads((out_dir / "config.json").read_text())
    assert config["train_args"]["tic_style"] == "emdash" and config["train_args"]["tic_rate"] == 1.0
    assert config["init_from"] == str(stage_dir("base") / "ckpt.pt")
    assert (config["tic_conversations"], config["conversations"]) == (changed, len(clean))  # what the report quotes
