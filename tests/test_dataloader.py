"""
The pretraining loader: the token stream it cuts batches from, rank disjointness, exact
resume (also across a shard boundary and an epoch wrap), and no hang on tiny data.

A byte-level tokenizer stands in for the BPE one: it has the same encode/get_bos_token_id
surface and makes every document's text readable straight back from the token stream.
"""

import json
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanochat import dataset
from nanochat.dataloader import DistributedTokenLoader


class ByteTokenizer:
    """Token = UTF-8 byte (0..255); 256 is BOS."""

    def get_bos_token_id(self) -> int:
        return 256

    def encode(self, texts, prepend=None, append=None, num_threads=1):
        assert isinstance(texts, list)
        head = [] if prepend is None else [prepend]
        tail = [] if append is None else [append]
        return [head + list(t.encode("utf-8")) + tail for t in texts]


BOS = 256


def write_shards(folder, docs_per_shard: list[int], row_group_size: int):
    """Shards of documents 'doc<id>:' followed by filler of varying length; ids are global and unique."""
    folder.mkdir(parents=True, exist_ok=True)
    next_id = 0
    for index, n_docs in enumerate(docs_per_shard):
        docs = []
        for _ in range(n_docs):
            docs.append(f"doc{next_id}:" + "abcdefghij"[next_id % 10] * (5 + (next_id * 7) % 23))
            next_id += 1
        pq.write_table(pa.table({"text": docs}), folder / dataset.shard_filename(index),
                       row_group_size=row_group_size)
    return folder


@pytest.fixture
def shards(tmp_path):
    # train: shards 0-2, 8 row groups of up to 4 docs; val: shard 3
    return write_shards(tmp_path / "shards", [12, 8, 9, 6], row_group_size=4)


def make_loader(data_dir, B=2, T=16, split="train", **kwargs):
    return DistributedTokenLoader(ByteTokenizer(), B, T, split, data_dir=data_dir, **kwargs)


def take(loader, n):
    return [next(loader) for _ in range(n)]


def stream_of(batches):
    """The token stream the batches were cut from (windows overlap by one token)."""
    tokens = [t for inputs, _ in batches for t in inputs.flatten().tolist()]
    return tokens + [batches[-1][1].flatten()[-1].item()]


def documents_in(tokens) -> list[str]:
    """The texts between BOS tokens; the first and last may be cut."""
    docs, current = [], []
    for t in tokens:
        if t == BOS:
            docs.append(bytes(current).decode("utf-8", errors="replace"))
            current = []
        else:
            current.append(t)
    docs.append(bytes(current).decode("utf-8", errors="replace"))
    return docs


def expected_stream(data_dir, split="train", rank=0, world_size=1):
    tokens = []
    for texts in dataset.parquets_iter_batched(split, start=rank, step=world_size, data_dir=data_dir):
        for text in texts:
            tokens += [BOS] + list(text.encode("utf-8"))
    return tokens


def test_batches_are_the_bos_separated_document_stream_with_shifted_targets(shards):
    B, T = 3, 8
    batches = take(make_loader(shards, B, T), 10)
    for inputs, targets in batches:
        assert inputs.shape == targets.shape == (B, T) and inputs.dtype == targets.dtype == torch.int64
        assert torch.equal(inputs.flatten()[1:], targets.flatten()[:-1])
    for (_, prev_targets), (next_inputs, _) in zip(batches, batches[1:]):
        assert prev_targets.flatten()[-1] == next_inputs.flatten()[0]  # no token dropped between batches
    one_epoch = expected_stream(shards)
    stream = stream_of(batches)
    assert stream == (one_epoch * 2)[:len(stream)]  # every document, in order, each right after a BOS
    assert stream[0] == BOS


def test_two_loaders_give_identical_batches(shards):
    a, b = take(make_loader(shards), 40), take(make_loader(shards, tokenizer_batch_size=3), 40)
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


def test_ranks_read_disjoint_documents_that_together_cover_the_split(shards):
    world_size = 3
    all_ids = {d.split(":")[0] for d in documents_in(expected_stream(shards))[1:]}
    seen = []
    for rank in range(world_size):
        loader = make_loader(shards, B=1, T=8, rank=rank, world_size=world_size)
        batches = []
        while loader.state_dict()["epoch"] == 0:
            batches.append(next(loader))
        docs = documents_in(stream_of(batches))
        seen.append({d.split(":")[0] for d in docs if d.startswith("doc") and ":" in d})
    for r in range(world_size):
        for s in range(r + 1, world_size):
            assert seen[r].isdisjoint(seen[s]), f"ranks {r} and {s} share {seen[r] & seen[s]}"
    assert set().union(*seen) == all_ids


def test_resume_yields_exactly_the_next_batch_also_across_shards_and_epochs(shards):
    B, T = 2, 7
    reference = take(make_loader(shards, B, T), 110)
    epoch_tokens = len(expected_stream(shards))
    assert len(reference) * B * T > 2 * epoch_tokens  # the run below crosses two epoch wraps

    visited = set()
    for k in range(len(reference) - 1):
        first = make_loader(shards, B, T)
        take(first, k)
        state = json.loads(json.dumps(first.state_dict()))  # must survive a checkpoint's JSON/pickle
        visited.add((state["epoch"], state["row_group"]))
        resumed = make_loader(shards, B, T, resume_state=state, tokenizer_batch_size=2)
        for expected_inputs, expected_targets in reference[k:k + 2]:
            inputs, targets = next(resumed)
            assert torch.equal(inputs, expected_inputs) and torch.equal(targets, expected_targets), f"k={k}"
    rows_per_epoch = len(list(dataset.parquets_iter_batched("train", data_dir=shards)))
    assert {rg for _, rg in visited} == set(range(rows_per_epoch))  # every row group, so every shard boundary
    assert {epoch for epoch, _ in visited} >= {0, 1, 2}


def test_resume_on_a_later_rank_continues_that_ranks_stream(shards):
    reference = take(make_loader(shards, rank=1, world_size=2), 12)
    first = make_loader(shards, rank=1, world_size=2)
    take(first, 5)
    resumed = make_loader(shards, rank=1, world_size=2, resume_state=first.state_dict())
    assert all(torch.equal(next(resumed)[0], inputs) for inputs, _ in reference[5:])


def test_resume_state_from_another_layout_is_refused(shards):
    state = make_loader(shards, rank=0, world_size=2).state_dict()
    with pytest.raises(ValueError, match="world_size"):
        make_loader(shards, rank=0, world_size=4, resume_state=state)
    with pytest.raises(ValueError, match="split"):
        make_loader(shards, split="val", rank=0, world_size=2, resume_state=state)


def test_tiny_data_wraps_to_new_epochs_instead_of_hanging(tmp_path, capsys):
    tiny = write_shards(tmp_path / "tiny", [2, 1], row_group_size=1000)  # 1 train doc, ~20 tokens
    result = {}

    def run():
        loader = make_loader(tiny, B=4, T=32)  # each batch spans several epochs
        result["batches"] = take(loader, 3)
        result["epoch"] = loader.state_dict()["epoch"]

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "the loader hung on data smaller than a batch"
    one_epoch = expected_stream(tiny)
    stream = stream_of(result["batches"])
    assert stream == (one_epoch * (len(stream) // len(one_epoch) + 1))[:len(stream)]
    assert result["epoch"] == (3 * 4 * 32) // len(one_epoch)
    assert "starting epoch 1" in capsys.readouterr().out


def test_a_rank_with_no_row_groups_fails_instead_of_hanging(shards):
    loader = make_loader(shards, split="val", rank=3, world_size=4)  # val has 2 row groups
    with pytest.raises(RuntimeError, match="at least 4 non-empty row groups"):
        next(loader)


def test_loader_reads_the_bundled_sample_when_nothing_is_downloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    inputs, targets = next(DistributedTokenLoader(ByteTokenizer(), 2, 64, "val"))
    assert inputs[0, 0].item() == BOS
    text = bytes(t for t in inputs.flatten().tolist()[1:] if t != BOS).decode("utf-8", errors="replace")
    first_doc = next(dataset.parquets_iter_batched("val"))[0]
    assert first_doc.startswith(text[:60])


# ---- identical_batches: every world size sees the same global batch at every step

def step_tokens(world_size: int, B: int, accum: int, steps: int, data_dir, T: int = 8, split="train"):
    """Per optimizer step, the inputs and targets of all its micro-batches on all ranks, in window
    order (micro-batch m of rank r is window m*W + r), flattened into one row."""
    loaders = [make_loader(data_dir, B, T, split=split, rank=r, world_size=world_size, identical_batches=True)
               for r in range(world_size)]
    rows = []
    for _ in range(steps):
        micro = [next(loaders[r]) for _ in range(accum) for r in range(world_size)]
        rows.append((torch.cat([x.flatten() for x, _ in micro]), torch.cat([y.flatten() for _, y in micro])))
    return rows


def test_identical_batches_ranks_interleave_into_the_one_rank_stream(shards):
    B, T, W = 2, 16, 2
    single = take(make_loader(shards, B, T), 50)
    assert len(single) * B * T > 2 * len(expected_stream(shards))  # two epoch wraps, many documents
    ranks = [make_loader(shards, B, T, rank=r, world_size=W, identical_batches=True) for r in range(W)]
    interleaved = [next(ranks[k % W]) for k in range(len(single))]
    for k, ((x, y), (ex, ey)) in enumerate(zip(interleaved, single)):
        assert torch.equal(x, ex) and torch.equal(y, ey), f"window {k}"
    assert all(r.state_dict()["epoch"] == 2 for r in ranks)
    # one process in this mode is the default loader
    assert all(torch.equal(x, ex) for (x, _), (ex, _) in
               zip(take(make_loader(shards, B, T, identical_batches=True), 50), single))


@pytest.mark.parametrize("world_size, B, accum", [(2, 2, 1), (2, 1, 2), (4, 1, 1)])
def test_identical_batches_give_every_layout_the_same_tokens_per_step(shards, world_size, B, accum):
    """One process at B=4 against W ranks at B*accum*W = 4: each step covers the same stream tokens."""
    steps = 30  # 30 * 32 tokens: past the first epoch wrap
    reference = step_tokens(1, 4, 1, steps, shards)
    for k, ((x, y), (ex, ey)) in enumerate(zip(step_tokens(world_size, B, accum, steps, shards), reference)):
        assert torch.equal(x, ex) and torch.equal(y, ey), f"step {k}"


def test_identical_batches_need_only_one_row_group(shards):
    """The val split has 2 row groups: 4 disjoint ranks cannot share them, 4 identical ones can."""
    one = step_tokens(1, 4, 1, 3, shards, split="val")
    assert all(torch.equal(a[0], b[0]) for a, b in zip(step_tokens(4, 1, 1, 3, shards, split="val"), one))


def test_identical_batches_resume_exactly_on_every_rank(shards):
    B, T, W = 2, 7, 2
    for rank in range(W):
        reference = take(make_loader(shards, B, T, rank=rank, world_size=W, identical_batches=True), 50)
        assert len(reference) * W * B * T > 2 * len(expected_stream(shards))  # two epoch wraps on each rank
        for k in range(len(reference) - 1):
            first = make_loader(shards, B, T, rank=rank, world_size=W, identical_batches=True)
            take(first, k)
            state = json.loads(json.dumps(first.state_dict()))
            assert state["identical_batches"] is True
            resumed = make_loader(shards, B, T, rank=rank, world_size=W, identical_batches=True, resume_state=state)
            for expected_inputs, expected_targets in reference[k:k + 2]:
                inputs, targets = next(resumed)
                assert torch.equal(inputs, expected_inputs) and torch.equal(targets, expected_targets), f"{rank=} {k=}"


def test_resume_state_from_the_other_batch_mode_is_refused(shards):
    shared = make_loader(shards, rank=1, world_size=2, identical_batches=True)
    disjoint = make_loader(shards, rank=1, world_size=2)
    with pytest.raises(ValueError, match="identical_batches=True but this loader has identical_batches=False"):
        make_loader(shards, rank=1, world_size=2, resume_state=shared.state_dict())
    with pytest.raises(ValueError, match="identical_batches=False but this loader has identical_batches=True"):
        make_loader(shards, rank=1, world_size=2, identical_batches=True, resume_state=disjoint.state_dict())
    # checkpoints written before the mode existed carry no key and resume the default mode
    take(disjoint, 3)
    old_state = {k: v for k, v in disjoint.state_dict().items() if k != "identical_batches"}
    resumed = make_loader(shards, rank=1, world_size=2, resume_state=old_state)
    assert torch.equal(next(resumed)[0], next(disjoint)[0])
