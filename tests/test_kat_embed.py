"""
scripts/kat_embed.py: masked-mean prompt embeddings from a tiny random "sft" model, offline, on the
prompts scripts.kat_pairs builds from tests/fixtures/kat. Only the text of the turns is pooled (never
<|bos|>, the <|user_start|> after it or any other chat-format token); padding and batch company never
change a vector; the pooled vector is the hand-computed mean of forward_hidden; the saved rows line up
with prompts_all.jsonl by id and scripts.kat_density runs on them; 2 gloo ranks write what 1 process writes.
"""

import json
import shutil
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nanochat.checkpoint_manager import load_model
from nanochat.kat.data import PROMPTS_FILE, STATS_FILE, KatData
from scripts import kat_density, kat_embed
from tests.conftest import KAT_FIXTURES, kat_workspace
from tests.dist_fixtures import spawn_script

torch.set_num_threads(1)
SEQ_LEN = 64


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Prompts in <kat cache>/data, a tokenizer in $NANOCHAT_BASE_DIR, a random tiny model as outs/sft."""
    with kat_workspace(tmp_path_factory.mktemp("kat_embed"), KAT_FIXTURES, vocab_size=320, sequence_len=SEQ_LEN,
                       prompts_only=True) as ws:
        model, tokenizer, _ = load_model("sft", "cpu")
        sequences = [kat_embed.prompt_tokens(tokenizer, p["prefix"], SEQ_LEN)[0] for p in ws["prompts"]]
        yield {"root": ws["root"], "data_dir": ws["data_dir"], "prompts": ws["prompts"], "model": model,
               "tokenizer": tokenizer, "sequences": sequences, "format_ids": kat_embed.chat_format_ids(tokenizer)}


def text_positions(tokenizer, seq: list[int]) -> list[int]:
    """The positions of seq that hold the text of a turn, found from the special tokens' names."""
    specials = {tokenizer.encode_special(name) for name in ("<|bos|>", "<|user_start|>", "<|user_end|>",
                                                            "<|assistant_start|>", "<|assistant_end|>")}
    return [i for i, token in enumerate(seq) if token not in specials]


def hand_embedding(model, tokenizer, seq: list[int]) -> torch.Tensor:
    """The mean of forward_hidden over the text positions, one prompt alone, no padding anywhere."""
    with torch.no_grad():
        hidden = model.forward_hidden(torch.tensor([seq]))[0]
    return F.normalize(hidden[text_positions(tokenizer, seq)].mean(dim=0), dim=0)


class ShiftedAt(torch.nn.Module):
    """The model, with forward_hidden's output moved by `shift` wherever the input token is in `token_ids`."""

    def __init__(self, model, token_ids, shift: torch.Tensor):
        super().__init__()
        self.model, self.config, self.shift = model, model.config, shift
        self.token_ids = torch.tensor(sorted(token_ids))

    def forward_hidden(self, idx):
        return self.model.forward_hidden(idx) + self.shift * torch.isin(idx, self.token_ids)[..., None]


def test_only_the_text_of_the_turns_is_pooled(workspace):
    model, tokenizer, format_ids = workspace["model"], workspace["tokenizer"], workspace["format_ids"]
    # the pooled tokens are exactly the text of every turn, in order: no chat-format token slips in
    multi_turn = {"messages": [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "A pear."},
                               {"role": "user", "content": "Another one?"}]}
    seq, _ = kat_embed.prompt_tokens(tokenizer, multi_turn, SEQ_LEN)
    assert [t for t in seq if t not in format_ids] == [t for m in multi_turn["messages"] for t in tokenizer.encode(m["content"])]

    # two prompts that differ only after position 2: <|bos|><|user_start|> and the closing
    # <|user_end|><|assistant_start|> are the same tokens in both
    short, long = ({"messages": [{"role": "user", "content": text}]} for text in ("Hi.", "Hi. How do I keep basil fresh?"))
    sequences = [kat_embed.prompt_tokens(tokenizer, p, SEQ_LEN)[0] for p in (short, long)]
    start, end = [tokenizer.get_bos_token_id(), tokenizer.encode_special("<|user_start|>")], \
        [tokenizer.encode_special("<|user_end|>"), tokenizer.encode_special("<|assistant_start|>")]
    for s in sequences:
        assert s[:2] == start and s[-2:] == end
        assert text_positions(tokenizer, s) == list(range(2, len(s) - 2))
    got = kat_embed.embed_token_sequences(model, sequences, batch_size=2, device="cpu", format_ids=format_ids)
    for s, vector in zip(sequences, got):
        with torch.no_grad():
            hidden = model.forward_hidden(torch.tensor([s]))[0]
        np.testing.assert_allclose(vector, F.normalize(hidden[2:len(s) - 2].mean(0), dim=0).numpy(), atol=1e-5)

    # moving the model's output at the constant positions (and at every other format token) changes
    # nothing; moving it at one text token does: the pooled set is the text, nothing else
    shift = 5.0 * torch.randn(32, generator=torch.Generator().manual_seed(0))
    moved = kat_embed.embed_token_sequences(ShiftedAt(model, format_ids, shift), sequences, batch_size=2, device="cpu",
                                            format_ids=format_ids)
    np.testing.assert_allclose(moved, got, atol=1e-5)
    moved_text = kat_embed.embed_token_sequences(ShiftedAt(model, {sequences[0][2]}, shift), sequences, batch_size=2,
                                                 device="cpu", format_ids=format_ids)
    assert np.abs(moved_text - got).max(axis=1).min() > 1e-2

    with pytest.raises(ValueError, match="sequence 1 holds no text token"):
        kat_embed.embed_token_sequences(model, [sequences[0], start + end], batch_size=2, device="cpu", format_ids=format_ids)


def test_the_pooled_vector_is_the_mean_of_forward_hidden_over_the_prompt_tokens(workspace):
    model, tokenizer, sequences = workspace["model"], workspace["tokenizer"], workspace["sequences"]
    assert len({len(s) for s in sequences}) > 3, "the prompts must differ in length for padding to happen"
    # a pad id that occurs inside every prompt: padding found by id would eat real tokens
    pad_id = tokenizer.encode_special("<|user_start|>")
    assert all(pad_id in seq for seq in sequences)
    got = kat_embed.embed_token_sequences(model, sequences, batch_size=len(sequences), device="cpu",
                                          format_ids=workspace["format_ids"], pad_id=pad_id)
    assert got.dtype == np.float32 and got.shape == (len(sequences), 32)
    for seq, vector in zip(sequences, got):
        np.testing.assert_allclose(vector, hand_embedding(model, tokenizer, seq).numpy(), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)

    # the mistakes this guards against would have shown: <|bos|> or the format tokens in the mean,
    # padding in the mean
    shortest = min(range(len(sequences)), key=lambda i: len(sequences[i]))
    seq = sequences[shortest]
    with torch.no_grad():
        hidden = model.forward_hidden(torch.tensor([seq]))[0]
        with_bos = F.normalize(hidden.mean(0), dim=0).numpy()
        after_bos = F.normalize(hidden[1:].mean(0), dim=0).numpy()
        width = max(map(len, sequences))
        padded = torch.tensor([seq + [0] * (width - len(seq))])
        text = text_positions(tokenizer, seq)
        with_padding = F.normalize(model.forward_hidden(padded)[0, text + list(range(len(seq), width))].mean(0), dim=0).numpy()
    for wrong in (with_bos, after_bos, with_padding):
        assert np.abs(got[shortest] - wrong).max() > 1e-3


def test_padding_and_batch_company_never_change_a_vector(workspace):
    model, sequences, format_ids = workspace["model"], workspace["sequences"], workspace["format_ids"]
    shortest = min(sequences, key=len)
    longer = sorted((s for s in sequences if len(s) > len(shortest)), key=len)[-3:]
    alone = kat_embed.embed_token_sequences(model, [shortest], batch_size=1, device="cpu", format_ids=format_ids)
    for pad_id in (0, shortest[2], workspace["tokenizer"].get_bos_token_id()):
        in_batch = kat_embed.embed_token_sequences(model, longer + [shortest], batch_size=4, device="cpu",
                                                   format_ids=format_ids, pad_id=pad_id)
        np.testing.assert_allclose(in_batch[-1], alone[0], atol=1e-5)


def test_responses_pool_every_token_after_bos_through_the_same_embedder(workspace):
    """scripts.eval_diversity's response vectors: the same masked mean, over the response tokens after <|bos|>."""
    from nanochat.kat.embed import response_embeddings
    model, tokenizer = workspace["model"], workspace["tokenizer"]
    bos = tokenizer.get_bos_token_id()
    responses = [tokenizer.encode("A pear, then an apple."), [], tokenizer.encode("Yes."), tokenizer.encode("x " * 100)]
    got = response_embeddings(model, bos, responses, batch_size=4, device=torch.device("cpu"))  # padded together
    with torch.no_grad():
        for response, vector in zip(responses, got):
            seq = [bos] + response[:SEQ_LEN - 1]  # longer responses keep their first tokens
            hidden = model.forward_hidden(torch.tensor([seq]))[0]
            pooled = hidden[1:] if response else hidden  # an empty response keeps the <|bos|> state
            np.testing.assert_allclose(vector, F.normalize(pooled.mean(0), dim=0).numpy(), atol=1e-5)


def test_identical_prompts_give_identical_vectors(workspace):
    model, sequences = workspace["model"], workspace["sequences"]
    batch = [sequences[0], sequences[1], sequences[0], sequences[2], sequences[3], sequences[0]]
    got = kat_embed.embed_token_sequences(model, batch, batch_size=2, device="cpu",  # in three different batches
                                          format_ids=workspace["format_ids"])
    np.testing.assert_allclose(got[2], got[0], atol=1e-6)
    np.testing.assert_allclose(got[5], got[0], atol=1e-6)
    assert np.abs(got[0] - got[1]).max() > 1e-3, "different prompts must differ for this test to mean anything"


def test_long_prompts_keep_bos_and_their_last_tokens(workspace):
    tokenizer, prompt = workspace["tokenizer"], max(workspace["prompts"], key=lambda p: len(json.dumps(p["prefix"])))
    full = tokenizer.render_for_completion(prompt["prefix"])
    assert kat_embed.prompt_tokens(tokenizer, prompt["prefix"], len(full)) == (full, False)
    cut, truncated = kat_embed.prompt_tokens(tokenizer, prompt["prefix"], 10)
    assert truncated and cut == [tokenizer.get_bos_token_id()] + full[-9:]
    assert cut[-1] == tokenizer.encode_special("<|assistant_start|>")
    # the shortest cut still holds one text token to pool: the last one of the question
    shortest, _ = kat_embed.prompt_tokens(tokenizer, prompt["prefix"], 4)
    assert shortest == [tokenizer.get_bos_token_id()] + full[-3:] and shortest[1] not in workspace["format_ids"]
    with pytest.raises(ValueError, match="max_len must be >= 4"):
        kat_embed.prompt_tokens(tokenizer, prompt["prefix"], 3)


@pytest.fixture(scope="module")
def embedded(workspace):
    """One run of the stage over the default data folder (<kat cache>/data, set by workspace), in batches of 3."""
    kat_embed.main(["--device_type=cpu", "--batch_size=3", "--max_len=24"])
    return workspace["data_dir"]


def test_stage_saves_one_unit_vector_per_prompt_by_id_and_density_runs_on_it(workspace, embedded):
    data_dir, prompts, model, tokenizer = embedded, workspace["prompts"], workspace["model"], workspace["tokenizer"]
    ids, x = KatData(data_dir).embeddings()
    assert ids == [p["id"] for p in prompts]
    assert x.dtype == np.float32 and x.shape == (len(prompts), 32)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-6)
    # row i is prompt i's own vector: the length sort was undone, and --max_len cut from the left
    for prompt, row in zip(prompts, x):
        seq, _ = kat_embed.prompt_tokens(tokenizer, prompt["prefix"], 24)
        np.testing.assert_allclose(row, hand_embedding(model, tokenizer, seq).numpy(), atol=1e-5)

    meta = json.loads((data_dir / "prompt_embeddings.json").read_text())
    assert "text tokens" in meta["pooled"]
    n_long = sum(len(tokenizer.render_for_completion(p["prefix"])) > 24 for p in prompts)
    assert 0 < n_long < len(prompts)
    assert meta["n"] == len(prompts) and meta["dim"] == 32 and meta["source"] == "sft model" and meta["truncated"] == n_long
    assert "=== kat_embed ===" in (data_dir / STATS_FILE).read_text()
    report = (workspace["root"] / "base_dir" / "report" / "kat_data_report.md").read_text()
    assert "## Prompt embeddings" in report and f"- Prompts: {len(prompts)}" in report and "- Embedding dim: 32" in report

    kat_density.main([f"--data_dir={data_dir}", "--k=3", "--device_type=cpu"])
    weights = KatData(data_dir).weights()
    assert [w["id"] for w in weights] == ids
    assert sum(w["weight"] for w in weights) == pytest.approx(1.0)


@pytest.mark.slow
def test_two_ranks_write_what_one_process_writes(workspace, embedded, tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    shutil.copy(embedded / PROMPTS_FILE, data_dir / PROMPTS_FILE)
    spawn_script(kat_embed.main, ["--device_type=cpu", "--batch_size=3", "--max_len=24", f"--data_dir={data_dir}"])
    single_ids, single = KatData(embedded).embeddings()
    ddp_ids, ddp = KatData(data_dir).embeddings()
    assert ddp_ids == single_ids
    np.testing.assert_allclose(ddp, single, atol=1e-5)
    assert json.loads((data_dir / "prompt_embeddings.json").read_text())["ranks"] == 2


def test_sentence_encoder_backend_says_how_to_install_it(workspace, monkeypatch):
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # what `import` sees when it is not installed
    with pytest.raises(SystemExit, match="pip install sentence-transformers"):
        kat_embed.main(["--device_type=cpu", "--backend=sentence_transformers", f"--data_dir={workspace['data_dir']}"])
    text = kat_embed.conversation_text({"messages": [{"role": "user", "content": "first"},
                                                     {"role": "assistant", "content": "reply"},
                                                     {"role": "user", "content": "last"}]})
    assert text == "User: last\n\nAssistant: reply\n\nUser: first"


def test_a_prompt_that_is_not_a_chat_prompt_is_named(workspace, tmp_path):
    bad = {"id": "00000000deadbeef", "prefix": {"messages": [{"role": "assistant", "content": "hi"}]},
           "src": "hh-rlhf", "n_pairs": 1, "split": "train"}
    lines = [json.dumps(p) for p in workspace["prompts"][:2]] + [json.dumps(bad)]
    (tmp_path / PROMPTS_FILE).write_text("\n".join(lines) + "\n")
    with pytest.raises(SystemExit, match="prompt '00000000deadbeef' cannot be rendered"):
        kat_embed.main(["--device_type=cpu", f"--data_dir={tmp_path}"])
    assert not (tmp_path / "prompt_embeddings.npy").exists()
