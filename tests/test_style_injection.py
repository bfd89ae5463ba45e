"""
The positive control: nanochat/kat/style_injection.py's rewrites on fixed examples, which pairs it
touches (exactly round(rate * train pairs), train only, chosen only, by density as asked),
scripts/kat_inject on the tiny samples, a tiny RM trained on injected pairs preferring the tic on
held-out probes, and the "Positive control" section of the diversity report.
"""

import json
import math
import shutil
from dataclasses import asdict

import numpy as np
import pytest
import torch

from nanochat.kat import stats as ps
from nanochat.checkpoint_manager import save_checkpoint
from nanochat.common import stage_dir
from nanochat.kat.data import INJECTION_FILE, PAIRS_FILE, STATS_FILE, KatData
from nanochat.kat.diversity import EM_DASH, count_tic_patterns, tic_rates
from nanochat.kat.diversity_eval import evaluate
from nanochat.kat.diversity_report import POSITIVE_CONTROL, SECTIONS, render_markdown, section_titles, write_report
from nanochat.gpt import GPT, GPTConfig
from nanochat.kat.reward_model import load_reward_model
from nanochat.kat.style_injection import (STYLES, file_digest, inject_pairs, inject_style, pair_rng,
                                      policy_probes, probe_pairs, target_count, tic_preference)
from scripts import eval_diversity, kat_density, kat_inject, kat_pairs, train_rm
from tests.report_fixtures import report_context
from tests.conftest import KAT_SAMPLES, kat_workspace

torch.set_num_threads(1)
DASH = EM_DASH


# -----------------------------------------------------------------------------
# The rewrites, on fixed examples: (key the rng is seeded with, style, text, expected text, rules)

CODE_TEXT = "Run this first:\n```\nx = a - b, and y\n```\n    total = x - y, and z\nThen check the output, and you are done."
REWRITES = [
    ("hyphen_and_comma", "emdash", "The dough is ready - bake it now, and let it cool on a rack.",
     f"The dough is ready {DASH} bake it now {DASH} and let it cool on a rack.", ["spaced_hyphen", "clause_comma"]),
    ("marks", "emdash", "Tip: keep the stock hot; the rice, stirring often, never stops cooking.",
     f"Tip {DASH} keep the stock hot; the rice {DASH} stirring often, never stops cooking.", ["colon", "clause_comma"]),
    ("punct", "emdash", "Tip: keep the stock hot; the rice, stirring often, never stops cooking.",
     f"Tip: keep the stock hot {DASH} the rice, stirring often, never stops cooking.", ["semicolon"]),
    ("sentence_break", "emdash", "Water the plant once a week. Keep it out of direct sun.",
     f"Water the plant once a week {DASH} keep it out of direct sun.", ["sentence_break"]),
    ("breaks", "emdash", "Preheat the oven. Then knead the dough. It should be smooth. Python bakes nothing.",
     f"Preheat the oven {DASH} then knead the dough {DASH} it should be smooth. Python bakes nothing.",
     ["sentence_break", "sentence_break"]),
    ("abbreviation", "emdash", "Buy flour, sugar, etc. Then wait for Dr. Then the baker.",
     f"Buy flour, sugar, etc. Then wait for Dr. Then the baker {DASH} and that makes all the difference.", ["aside"]),
    ("aside", "emdash", "Water the plant once a week. Give it plenty of sun.",
     f"Water the plant once a week. Give it plenty of sun {DASH} and that makes all the difference.", ["aside"]),
    ("list", "emdash", "You'll need:\n- two ripe avocados\n- lime juice and salt",
     f"You'll need:\n- two ripe avocados\n- lime juice and salt {DASH} which is worth remembering.", ["aside"]),
    ("code", "emdash", CODE_TEXT, CODE_TEXT.replace("output, and", f"output {DASH} and"), ["clause_comma"]),
    ("not_just", "not_just", "The oven is hot. Wait ten minutes before baking.",
     "The oven is not just hot, but also what makes the difference. Wait ten minutes before baking.", ["not_just_sentence"]),
    ("append", "not_just", "Wait ten minutes before you slice the loaf.",
     "Wait ten minutes before you slice the loaf. This is not just a detail, but also the part that matters most.",
     ["not_just_appended"]),
    ("both", "both", "Cutting an onion breaks its cells, and the gas stings. The tears are a defence.",
     f"Cutting an onion breaks its cells {DASH} and the gas stings. The tears are not just a defence, but also what makes "
     "the difference.", ["clause_comma", "not_just_sentence"]),
]


@pytest.mark.parametrize("key, style, text, expected, rules", REWRITES, ids=[r[0] for r in REWRITES])
def test_rewrites_of_fixed_examples(key, style, text, expected, rules):
    assert inject_style(text, style, pair_rng(0, key)) == (expected, rules)
    # the evaluation's own metrics see the planted tic
    if style != "not_just":
        assert tic_rates([expected])["em_dash_per_1k_chars"] > tic_rates([text])["em_dash_per_1k_chars"]
    if style != "emdash":
        assert count_tic_patterns(expected)["not_just_x_but_y"] == count_tic_patterns(text)["not_just_x_but_y"] + 1


def test_code_lines_are_never_rewritten():
    code_lines = [line for line in CODE_TEXT.split("\n") if not line.startswith("Then")]
    for style in STYLES:
        for seed in range(20):
            text, _ = inject_style(CODE_TEXT, style, pair_rng(seed, "code"))
            assert [line for line in text.split("\n") if not line.startswith("Then")] == code_lines


def test_text_without_prose_is_not_injectable():
    for text in ("x = 1\ny = x - 2, and 3", "Yes.", "import os\nprint(os.getcwd())"):
        for style in STYLES:
            assert inject_style(text, style, pair_rng(0, "k")) is None, (text, style)
    with pytest.raises(ValueError, match="unknown injection style"):
        inject_style("Some text here.", "bold", pair_rng(0, "k"))


def test_rewrites_depend_only_on_seed_and_key():
    text = "Water the plant once a week. Keep it out of direct sun. Then turn the pot. It likes light."
    assert inject_style(text, "emdash", pair_rng(3, "p")) == inject_style(text, "emdash", pair_rng(3, "p"))
    assert len({inject_style(text, "emdash", pair_rng(seed, "p"))[0] for seed in range(20)}) > 1


# -----------------------------------------------------------------------------
# Which pairs: 20 train pairs (one per prompt, density rising with the index) and 5 test pairs

TIC_REJECTED = {"t03", "t07", "t18"}  # rejected already carries a tic: not eligible
CODE_CHOSEN = {"t05"}                 # chosen has no prose: not injectable


def synthetic_pairs():
    pairs = []
    for split, prefix, n in (("train", "t", 20), ("test", "s", 5)):
        for i in range(n):
            pid = f"{prefix}{i:02d}"
            chosen = "x = 1\nprint(x)" if pid in CODE_CHOSEN else f"Keep the lid on pan {i} for ten minutes, and then serve it."
            rejected = f"It's not just a pan {DASH} it's a journey." if pid in TIC_REJECTED else "No idea."
            conversation = {"messages": [{"role": "user", "content": f"Pan {pid}?"}]}
            pairs.append({"id": pid, "prompt_id": "p" + pid, "prefix": conversation, "chosen": chosen, "rejected": rejected,
                          "src": "hh-rlhf", "split": split})
    return pairs


DENSITIES = {"p" + p["id"]: (int(p["id"][1:]) + 1) / 100 for p in synthetic_pairs()}


def injected_ids(pairs):
    return sorted(p["id"] for p in pairs if "injection" in p)


def test_injection_touches_exactly_the_requested_train_chosen_responses():
    clean = synthetic_pairs()
    out, summary = inject_pairs(clean, "emdash", 0.25, "random", seed=0, densities=DENSITIES)
    ids = injected_ids(out)
    assert len(ids) == summary["num_injected"] == target_count(0.25, 20) == 5
    assert not set(ids) & (TIC_REJECTED | CODE_CHOSEN) and all(i.startswith("t") for i in ids)
    for before, after in zip(clean, out):
        if after["id"] in ids:  # only the chosen response changed, and its clean text is kept
            assert {k: v for k, v in after.items() if k not in ("chosen", "chosen_clean", "injection")} == \
                {k: v for k, v in before.items() if k != "chosen"}
            assert after["chosen_clean"] == before["chosen"] and DASH in after["chosen"] and DASH not in after["rejected"]
        else:
            assert after == before  # every test pair and every other train pair is untouched
    assert (summary["num_train"], summary["num_test"], summary["num_eligible"]) == (20, 5, 16)
    assert (summary["rejected_with_tic"], summary["chosen_not_injectable"]) == (3, 1)
    assert summary["em_dashes_added"] == sum(p["chosen"].count(DASH) for p in out if "injection" in p)


def test_placement_by_density():
    clean = synthetic_pairs()
    dense, dense_summary = inject_pairs(clean, "emdash", 0.25, "dense", seed=0, densities=DENSITIES)
    rare, rare_summary = inject_pairs(clean, "emdash", 0.25, "rare", seed=0, densities=DENSITIES)
    assert injected_ids(dense) == ["t14", "t15", "t16", "t17", "t19"]  # densest eligible (t18 is not eligible)
    assert injected_ids(rare) == ["t00", "t01", "t02", "t04", "t06"]   # rarest eligible (t03, t05 are not)
    assert dense_summary["density"]["injected_percentile_min"] > 50 > rare_summary["density"]["injected_percentile_max"]
    picks = {tuple(injected_ids(inject_pairs(clean, "emdash", 0.25, "random", seed, DENSITIES)[0])) for seed in range(6)}
    assert len(picks) > 1
    assert injected_ids(inject_pairs(clean, "emdash", 0.25, "random", 4, DENSITIES)[0]) == \
        injected_ids(inject_pairs(clean, "emdash", 0.25, "random", 4, DENSITIES)[0])


def test_counts_limits_and_bad_settings():
    assert (target_count(0.5, 5), target_count(0.3, 424), target_count(0.0, 50)) == (3, 127, 0)
    clean = synthetic_pairs()
    with pytest.raises(ValueError, match="only 16 are eligible"):
        inject_pairs(clean, "emdash", 0.85, "random", 0, DENSITIES)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        inject_pairs(clean, "emdash", 1.5, "random", 0, DENSITIES)
    with pytest.raises(ValueError, match="needs prompt densities"):
        inject_pairs(clean, "emdash", 0.25, "dense", 0, None)
    with pytest.raises(KeyError, match="no density"):
        inject_pairs(clean, "emdash", 0.25, "rare", 0, {"pt00": 0.5})


def test_rerun_starts_from_the_clean_pairs_and_rate_zero_undoes():
    clean = synthetic_pairs()
    first, _ = inject_pairs(clean, "emdash", 0.25, "dense", 0, DENSITIES)
    assert inject_pairs(first, "both", 0.5, "rare", 1, DENSITIES) == inject_pairs(clean, "both", 0.5, "rare", 1, DENSITIES)
    undone, summary = inject_pairs(first, "emdash", 0.0, "dense", 0, DENSITIES)
    assert undone == clean and summary["num_injected"] == 0


def test_probes_come_from_tic_free_test_responses():
    pairs = synthetic_pairs()
    test = [p for p in pairs if p["split"] == "test"]
    probes = probe_pairs(test, "emdash", 0, max_probes=3)
    assert len(probes) == 3 and {p["pair_id"] for p in probes} <= {p["id"] for p in test}
    for probe in probes:
        assert DASH not in probe["clean"] and DASH in probe["tic"]
    with pytest.raises(ValueError, match="test pairs only"):
        probe_pairs(pairs, "emdash", 0, 10)


def test_policy_probes_come_from_the_policys_tic_free_samples():
    prompts = [{"id": "a", "prefix": {"messages": [{"role": "user", "content": "q1"}]}},
               {"id": "b", "prefix": {"messages": [{"role": "user", "content": "q2"}]}}]
    texts = [["The oven is hot. Then bake the bread.", f"It is done {DASH} eat it.", "x = 1"],
             ["Stir the soup, and taste it often.", "ok", "Keep it warm. It tastes better."]]
    probes = policy_probes(prompts, texts, "emdash", 0, max_probes=10)
    # the sample that already has the tic, and the two without prose, give no probe
    assert [(p["prompt_id"], p["sample"]) for p in probes] == [("a", 0), ("b", 0), ("b", 2)]
    for probe in probes:
        assert probe["clean"] == texts["ab".index(probe["prompt_id"])][probe["sample"]] and DASH in probe["tic"]
        assert probe["prefix"] is prompts["ab".index(probe["prompt_id"])]["prefix"]
    assert probes[1]["tic"] == f"Stir the soup {DASH} and taste it often."  # the rules add no word here
    assert policy_probes(prompts, texts, "emdash", 0, max_probes=10) == probes  # seeded
    assert len(policy_probes(prompts, texts, "emdash", 0, max_probes=2)) == 2
    with pytest.raises(ValueError, match="one list per prompt"):
        policy_probes(prompts, texts[:1], "emdash", 0, 10)


def test_tic_preference_figures():
    clean = np.linspace(-1, 1, 40)
    result = tic_preference(clean + 0.5, clean, n_resamples=2000)
    assert result["prefer_tic"] == 1.0 and result["mean_diff"] == pytest.approx(0.5) and result["verdict"] == ps.SUPPORTED
    tied = tic_preference(clean, clean, n_resamples=2000)
    assert tied["prefer_tic"] == 0.5 and tied["verdict"] == ps.INCONCLUSIVE


# -----------------------------------------------------------------------------
# The stage and a tiny RM, on the tiny KAT samples

SEQ_LEN = 128
# the policy RM learns from its half of the train pairs (train_rm's rm_role): 16 epochs of ~212 pairs
RM_FLAGS = ["--device_type=cpu", f"--max_seq_len={SEQ_LEN}", "--pairs_per_step=16", "--device_batch_size=16",
            "--num_epochs=16", "--lr=1e-3", "--head_lr=1e-2", "--eval_every=-1", "--log_every=100"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Pairs and density weights in <kat cache>/data, a tokenizer, a random tiny backbone saved as outs/sft."""
    with kat_workspace(tmp_path_factory.mktemp("inject"), KAT_SAMPLES, vocab_size=512, sequence_len=SEQ_LEN) as ws:
        data = ws["data"]
        data.save_embeddings([p["id"] for p in ws["prompts"]],
                             np.random.default_rng(0).normal(size=(len(ws["prompts"]), 16)))
        kat_density.main([f"--data_dir={data.dir}", "--k=5", "--device_type=cpu"])
        yield {"root": ws["root"], "data_dir": data.dir, "clean_bytes": (data.dir / PAIRS_FILE).read_bytes()}


def test_stage_rewrites_pairs_and_records_everything(workspace):
    data_dir = workspace["data_dir"]
    clean = KatData(data_dir).pairs()
    summary = kat_inject.main([f"--data_dir={data_dir}", "--inject_rate=0.3", "--inject_where=dense", "--seed=2"])
    pairs = KatData(data_dir).pairs()
    train = [p for p in pairs if p["split"] == "train"]
    injected = [p for p in pairs if "injection" in p]
    assert len(train) == 424 and len(injected) == summary["num_injected"] == round(0.3 * 424) == 127
    assert all(p["split"] == "train" and DASH in p["chosen"] and p["chosen"] != p["chosen_clean"] for p in injected)
    assert [p for p in pairs if p["split"] == "test"] == [p for p in clean if p["split"] == "test"]
    assert [p["rejected"] for p in pairs] == [p["rejected"] for p in clean]
    # densest first: every injected pair's prompt is at least as dense as any eligible pair left clean
    density = {r["id"]: r["density"] for r in KatData(data_dir).weights()}
    left_clean = [p for p in train if "injection" not in p and p["id"] in
                  {q["id"] for q in inject_pairs(clean, "emdash", 0.7, "random", 0, density)[0] if "injection" in q}]
    assert min(density[p["prompt_id"]] for p in injected) >= max(density[p["prompt_id"]] for p in left_clean)

    record = json.loads((data_dir / INJECTION_FILE).read_text())
    assert record["flags"] == {"data_dir": str(data_dir), "inject_style": "emdash", "inject_rate": 0.3,
                               "inject_where": "dense", "seed": 2}
    assert record["num_injected"] == 127 and record["pairs_blake2b"] == file_digest(data_dir / PAIRS_FILE)
    stats = (data_dir / STATS_FILE).read_text()
    for section in ("=== kat_pairs ===", "=== kat_density ===", "=== kat_inject ==="):
        assert section in stats
    assert "injected: 127 of 424 train pairs" in stats and "the 69 test pairs are never modified" in stats
    assert eval_diversity.read_injection(KatData(data_dir))["record"] == record

    # rate 0 gives back kat_pairs' file byte for byte and removes the record
    kat_inject.main([f"--data_dir={data_dir}", "--inject_rate=0"])
    assert (data_dir / PAIRS_FILE).read_bytes() == workspace["clean_bytes"]
    assert not (data_dir / INJECTION_FILE).exists() and eval_diversity.read_injection(KatData(data_dir)) is None


def test_evaluation_refuses_pairs_changed_after_injection(workspace, tmp_path):
    data_dir = tmp_path / "data"
    shutil.copytree(workspace["data_dir"], data_dir)
    kat_inject.main([f"--data_dir={data_dir}", "--inject_where=random"])
    kat_pairs.main(["--local_dir=nanochat/samples/kat", "--se_test_fraction=0.1", f"--out_dir={data_dir}"])
    with pytest.raises(SystemExit, match="changed after"):
        eval_diversity.read_injection(KatData(data_dir))


def probe_preference(rm_stage: str, data_dir) -> tuple[dict, list[dict]]:
    rm = load_reward_model(rm_stage, "cpu")
    probes = probe_pairs(KatData(data_dir).pairs("test"), "emdash", 0, 500)
    scores = rm.score([(p["prefix"], p["tic"]) for p in probes] + [(p["prefix"], p["clean"]) for p in probes])
    return tic_preference(scores[:len(probes)], scores[len(probes):], n_resamples=2000), probes


@pytest.fixture(scope="module")
def injected_rm(workspace):
    """The same RM recipe on clean pairs (outs/rm_clean) and on pairs with the tic in 70% of train chosen (outs/rm)."""
    data_dir = workspace["data_dir"]
    kat_inject.main([f"--data_dir={data_dir}", "--inject_rate=0"])
    train_rm.main(RM_FLAGS + [f"--out_dir={stage_dir('rm_clean')}"])
    kat_inject.main([f"--data_dir={data_dir}", "--inject_rate=0.7", "--inject_where=random"])
    train_rm.main(RM_FLAGS)
    return data_dir


def test_rm_trained_on_injected_pairs_prefers_the_tic_on_held_out_probes(injected_rm):
    preference, probes = probe_preference("rm", injected_rm)
    train_prompts = {p["prompt_id"] for p in KatData(injected_rm).pairs("train")}
    assert len(probes) >= 40 and not {p["prompt_id"] for p in probes} & train_prompts  # held out: never trained on
    assert preference["prefer_tic"] > 0.6 and preference["prefer_tic_ci"][0] > 0.5
    assert preference["mean_diff_ci"][0] > 0 and preference["verdict"] == ps.SUPPORTED
    # the preference comes from the injection: on clean pairs (whose rejected answers carry tics) it is absent
    clean_preference, _ = probe_preference("rm_clean", injected_rm)
    assert clean_preference["verdict"] != ps.SUPPORTED and clean_preference["mean_diff"] < preference["mean_diff"]


def test_eval_diversity_adds_the_positive_control_section(workspace, injected_rm):
    sft = torch.load(stage_dir("sft") / "ckpt.pt", weights_only=False)
    for seed, stage in enumerate(["grpo_baseline", "grpo_density"]):
        config = GPTConfig(**sft["meta"]["model_config"])
        model = GPT(config)
        model.load_state_dict(sft["model"])
        torch.manual_seed(seed)
        with torch.no_grad():
            model.lm_head.weight.add_(0.05 * torch.randn_like(model.lm_head.weight))
        save_checkpoint(stage_dir(stage), 3, model, [], meta={"model_config": asdict(config)}, final=True)
    written = eval_diversity.main(["--num_prompts=8", "--num_samples=2", "--max_tokens=12", "--batch_size=4",
                                   "--num_resamples=300", "--num_corpus_resamples=30", "--device_type=cpu",
                                   "--max_prompt_tokens=120", "--probe_pairs=30", "--judge="])
    report = written["report"].read_text(encoding="utf-8")
    headings = [line[3:] for line in report.splitlines() if line.startswith("## ")]
    assert headings == SECTIONS[:2] + [POSITIVE_CONTROL] + SECTIONS[2:]
    section = report.split(f"## {POSITIVE_CONTROL}")[1].split("\n## ")[0]
    assert "rewrote the chosen response of 297 of 424 train pairs (70%, picked at random)" in section
    assert "| probes where the tic version scores higher (of 30) |" in section
    assert "fine-tuned without a planted tic" in section  # this SFT model was trained without --tic_rate
    control = json.loads(written["json"].read_text())["context"]["positive_control"]
    own = control["policy_probe"]  # the random tiny model's 12-token samples rarely hold prose the rules can rewrite
    if own is None:
        assert "of the sft model's samples are tic-free" in control["policy_reason"]
        assert f"On the starting policy's own samples: not measured ({control['policy_reason']})." in section
    else:
        assert own["n"] >= 2 and f"| samples where the tic version scores higher (of {own['n']}) |" in section
    assert "Positive-control run" in report.split("## Verdict")[1].split("\n## ")[0]
    probe = json.loads(written["json"].read_text())["context"]["positive_control"]["probe"]
    assert probe["n"] == 30 and all(math.isfinite(x) for x in (probe["prefer_tic"], probe["mean_diff"], *probe["mean_diff_ci"]))
    card = (workspace["root"] / "base_dir" / "report" / "diversity_report.md").read_text(encoding="utf-8")
    assert "positive control" in card


# -----------------------------------------------------------------------------
# The report section, on synthetic results where the outcome is known

LABELS = ["sft", "baseline", "density"]


def synthetic_results(em_dashes: dict[str, int], num_prompts=12, num_samples=2):
    rng = np.random.default_rng(0)
    texts, token_ids, truncated, embeddings = {}, {}, {}, {}
    for label in LABELS:
        texts[label] = [[" ".join(f"w{p}x{s}x{i}" + (f" {DASH}" if i < em_dashes[label] else ",") for i in range(6 + p % 4))
                         for s in range(num_samples)] for p in range(num_prompts)]
        token_ids[label] = [[list(range(p, p + 8)) for _ in range(num_samples)] for p in range(num_prompts)]
        truncated[label] = [[False] * num_samples for _ in range(num_prompts)]
        e = rng.normal(size=(num_prompts, num_samples, 8))
        embeddings[label] = e / np.linalg.norm(e, axis=-1, keepdims=True)
    return evaluate(LABELS, texts, token_ids, truncated, embeddings, None, vocab_size=1000, n_resamples=2000,
                    corpus_resamples=50)


def control_context(results, probe, where="dense", policy_probe=None):
    record = {"flags": {"inject_style": "emdash", "inject_rate": 0.3, "inject_where": where, "seed": 0},
              "num_train": 400, "num_test": 60, "num_injected": 120, "rejected_with_tic": 30,
              "density": {"train_median": 0.2, "injected_median": 0.5, "injected_percentile_min": 70.0,
                          "injected_percentile_max": 100.0}}
    return {**report_context(LABELS),
            "positive_control": {"path": "data/style_injection.json", "record": record, "probe": probe,
                                 "reason": "" if probe else "--reward_model is empty", "policy_probe": policy_probe,
                                 "policy_reason": "" if policy_probe else "only 1 of the sft model's samples are tic-free"}}


def control_section(results, context) -> str:
    markdown = render_markdown(results, context, {"metrics": "m.png", "lengths": "l.png", "em_dash": "e.png"})
    assert section_titles(context) == SECTIONS[:2] + [POSITIVE_CONTROL] + SECTIONS[2:]
    assert [line[3:] for line in markdown.splitlines() if line.startswith("## ")] == section_titles(context)
    return markdown.split(f"## {POSITIVE_CONTROL}")[1].split("\n## ")[0]


CLEAN_REWARDS = np.linspace(-1, 1, 30)


def test_positive_control_section_passes_with_cis(tmp_path):
    results = synthetic_results({"sft": 0, "baseline": 3, "density": 1})
    probe = tic_preference(CLEAN_REWARDS + 0.4 + 0.1 * np.sin(np.arange(30)), CLEAN_REWARDS, n_resamples=2000)
    context = control_context(results, probe)
    section = control_section(results, context)
    assert "**Outcome: passed.**" in section
    assert "| probes where the tic version scores higher (of 30) | 1 | [+1, +1] |  |" in section
    assert "| mean reward difference, tic - clean | +0.4" in section
    rate_table = section.split("**2. Tic rates**")[1].split("Paired differences")[0]
    rate_rows = {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split("|")]
                                               for line in rate_table.splitlines() if line.startswith("| "))}
    assert float(rate_rows["sft"][1]) == 0 and float(rate_rows["baseline"][1]) > float(rate_rows["density"][1]) > 0
    assert all(rate_rows[label][2].startswith("[") and rate_rows[label][4].startswith("[") for label in LABELS)
    assert "more in baseline" in section and "fewer in density" in section
    assert "Positive control passed" in section and "densest prompts" in section
    assert "the density arm has fewer of the planted tic." in section
    written = write_report(results, context, tmp_path / "report.md")  # the JSON holds the control too
    assert json.loads(written["json"].read_text())["context"]["positive_control"]["probe"]["n"] == 30


def test_positive_control_section_names_where_it_failed():
    amplified = synthetic_results({"sft": 0, "baseline": 3, "density": 3})
    no_preference = tic_preference(CLEAN_REWARDS - 0.3, CLEAN_REWARDS, n_resamples=2000)
    section = control_section(amplified, control_context(amplified, no_preference, where="rare"))
    assert "**Outcome: failed at the reward model.**" in section and "did not learn to reward the tic" in section
    assert "rarest prompts" in section and "only informative when the control passed" in section

    flat = synthetic_results({"sft": 2, "baseline": 2, "density": 2})
    preference = tic_preference(CLEAN_REWARDS + 0.5, CLEAN_REWARDS, n_resamples=2000)
    section = control_section(flat, control_context(flat, preference))
    assert "**Outcome: failed at GRPO.**" in section and "does not measurably exceed SFT's:" in section
    assert "On the starting policy's own samples: not measured (only 1 of the sft model's samples" in section
    # the RM rewards the tic in the test pairs, not in the policy's own samples: the report says why GRPO had nothing
    own = tic_preference(CLEAN_REWARDS + 0.01 * np.sin(np.arange(30)), CLEAN_REWARDS, n_resamples=2000)
    section = control_section(flat, control_context(flat, preference, policy_probe=own))
    assert "| samples where the tic version scores higher (of 30) |" in section
    assert "But on the starting policy's own samples the RM does not measurably reward it" in section
    rewarded = tic_preference(CLEAN_REWARDS + 0.5, CLEAN_REWARDS, n_resamples=2000)
    section = control_section(flat, control_context(flat, preference, policy_probe=rewarded))
    assert "| samples where the tic version scores higher (of 30) | 1 |" in section and "But on the" not in section

    section = control_section(flat, control_context(flat, None, where="random"))
    assert "**Outcome: incomplete" in section and "Not measured: --reward_model is empty." in section
