"""
Write the tiny preset's preference samples, nanochat/samples/kat/*.jsonl, in the exact HF row schemas
that scripts.kat_pairs reads with --local_dir:
    hh-rlhf_{train,test}.jsonl                {"chosen": transcript, "rejected": transcript}
    ultrafeedback_{train,test}_prefs.jsonl    {"prompt", "prompt_id", "chosen", "rejected", "messages",
                                               "score_chosen", "score_rejected"}
    stack-exchange.jsonl                      {"qid", "question" (HTML), "answers": [...], "date", "metadata"}

    python -m dev.make_kat_samples            # deterministic: the same files every run

Topics (dev/kat_sample_topics.py) come as clusters of near-identical questions (dense regions of
prompt space) and one-off questions (isolated points). Chosen answers are specific and correct;
rejected ones are vague, wrong, curt, or full of the tics the experiment measures. The HH files
also carry what real HH has: multi-line turns, repeated prompts, prompts in both splits, and rows
whose transcripts diverge before the last turn.
"""

import hashlib
import json
import random
import re
from pathlib import Path

from dev.kat_sample_topics import (COOKING, COOKING_FOLLOWUPS, COOKING_PROMPTS, FITNESS, FITNESS_PROMPTS, GARDEN,
                                   GARDEN_PROMPTS, HARMLESS, ISOLATED, MONEY, MONEY_PROMPTS, PYTHON, PYTHON_PROMPTS,
                                   REJECT_STYLES, SLOP, TRAVEL, TRAVEL_PROMPTS)
from nanochat.common import REPO_ROOT

OUT_DIR = REPO_ROOT / "nanochat" / "samples" / "kat"


# -----------------------------------------------------------------------------
# Answers, good and bad, for each cluster

def cooking_answer(it):
    steps = "\n".join(f"{i}. {s}" for i, s in enumerate(it["steps"], 1))
    return f"Here's a simple way to make {it['name']}.\n\nYou'll need {it['ingredients']}.\n\n{steps}\n\nTip: {it['tip']}."


def python_answer(it):
    return f"{it['code']}\n\nWhy it works: {it['explain']}. One thing to watch: {it['pitfall']}."


def travel_answer(it):
    return f"For {it['place']}, pack {it['pack']}.\n\nOne thing to plan for: {it['caution']}."


def garden_answer(it):
    return f"Give {it['plant']} {it['light']}.\nWater {it['water']}.\nThe most common mistake is {it['mistake']}."


def fitness_answer(it):
    return f"Start small: {it['first']}.\n\nThen {it['progress']}. One more thing: {it['caution']}."


def money_answer(it):
    return f"A plan that works for {it['goal']}: {it['plan']}.\n\nAutomating it means you never have to decide again each month."


CLUSTERS = {  # name -> (items, prompt templates, good answer, short topic phrase for bad answers)
    "cooking": (COOKING, COOKING_PROMPTS, cooking_answer, lambda it: f"making {it['name']}"),
    "python": (PYTHON, PYTHON_PROMPTS, python_answer, lambda it: f"learning to {it['task']}"),
    "travel": (TRAVEL, TRAVEL_PROMPTS, travel_answer, lambda it: f"packing for {it['place']}"),
    "garden": (GARDEN, GARDEN_PROMPTS, garden_answer, lambda it: f"growing {it['plant']}"),
    "fitness": (FITNESS, FITNESS_PROMPTS, fitness_answer, lambda it: it["activity"]),
    "money": (MONEY, MONEY_PROMPTS, money_answer, lambda it: f"saving for {it['goal']}"),
}
FOLLOWUPS = {
    "cooking": COOKING_FOLLOWUPS,
    "garden": [("What's the most common mistake?", "The usual one is {mistake}."), ("How often should I water?", "Water {water}.")],
    "fitness": [("How do I keep improving?", "Keep it gradual: {progress}."), ("Anything to watch out for?", "Yes: {caution}.")],
    "money": [("How do I stick to it?", "Make it automatic: {plan}.")],
}


def bad_answer(rng, topic: str, good: str) -> str:
    """A worse answer: vague, slop-ridden, or cut short before it helps."""
    kind = rng.randrange(3)
    if kind == 0:
        return rng.choice(REJECT_STYLES)
    if kind == 1:
        return rng.choice(SLOP).format(topic=topic, Topic=topic[0].upper() + topic[1:])
    cut = good.split("\n")[0].split(":")[0].rstrip(".") + "."
    return cut if cut != good else rng.choice(REJECT_STYLES)


def cluster_prompts(rng):
    """(cluster, item, prompt, good answer, topic) for every item and prompt template."""
    rows = []
    for name, (items, templates, answer, topic) in CLUSTERS.items():
        for it in items:
            for template in templates:
                rows.append((name, it, template.format(**it), answer(it), topic(it)))
    rng.shuffle(rows)
    return rows


# -----------------------------------------------------------------------------
# HH-RLHF: transcripts

def transcript(turns: list[str]) -> str:
    return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {text}" for i, text in enumerate(turns))


def hh_rows(rng, prompts):
    rows = []
    for cluster, it, prompt, good, topic in prompts:
        if cluster not in ("cooking", "garden", "fitness", "money"):
            continue
        followups = FOLLOWUPS[cluster]
        if rng.random() < 0.5:  # multi-turn: the preference is on the answer to the follow-up
            question, template = rng.choice(followups)
            shared = [prompt, good, question]
            final_good = template.format(**it)
            rows.append({"chosen": transcript(shared + [final_good]),
                         "rejected": transcript(shared + [bad_answer(rng, topic, final_good)])})
        else:
            rows.append({"chosen": transcript([prompt, good]), "rejected": transcript([prompt, bad_answer(rng, topic, good)])})
        if rng.random() < 0.15:  # real HH repeats prompts with other responses
            rows.append({"chosen": transcript([prompt, good]), "rejected": transcript([prompt, rng.choice(REJECT_STYLES)])})
    for question, good, bad in HARMLESS:
        rows.append({"chosen": transcript([question, good]), "rejected": transcript([question, bad])})
    for question, good, bad in ISOLATED[:18]:
        rows.append({"chosen": transcript([question, good]), "rejected": transcript([question, bad])})
    rng.shuffle(rows)
    n_test = len(rows) // 7
    test, train = rows[:n_test], rows[n_test:]
    # prompts in both splits (the builder gives them to test) and transcripts that diverge early
    for row in train[:3]:
        shared = row["chosen"].rsplit("\n\nAssistant: ", 1)[0]
        test.append({"chosen": row["chosen"], "rejected": shared + "\n\nAssistant: " + rng.choice(REJECT_STYLES)})
    for question, good, bad in ISOLATED[18:21]:
        follow = "Can you say that more briefly?"
        train.append({"chosen": transcript([question, good, follow, good.split(". ")[0] + "."]),
                      "rejected": transcript([question, bad, follow, bad])})
    return train, test


# -----------------------------------------------------------------------------
# UltraFeedback: message lists with scores

def ultrafeedback_row(rng, prompt: str, good: str, bad: str) -> dict:
    user = {"content": prompt, "role": "user"}
    chosen = [user, {"content": good, "role": "assistant"}]
    rejected = [user, {"content": bad, "role": "assistant"}]
    score_chosen = rng.choice([7.0, 7.5, 8.0, 8.5, 9.0, 9.5, 10.0])
    return {"prompt": prompt, "prompt_id": hashlib.sha256(prompt.encode()).hexdigest(), "chosen": chosen,
            "rejected": rejected, "messages": chosen, "score_chosen": score_chosen,
            "score_rejected": rng.choice([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])}


def ultrafeedback_rows(rng, prompts):
    rows = [ultrafeedback_row(rng, prompt, good, bad_answer(rng, topic, good))
            for cluster, _, prompt, good, topic in prompts if cluster in ("python", "travel")]
    rows += [ultrafeedback_row(rng, q, good, bad) for q, good, bad in ISOLATED[10:]]
    rng.shuffle(rows)
    n_test = len(rows) // 6
    return rows[n_test:], rows[:n_test]


# -----------------------------------------------------------------------------
# Stack Exchange: HTML questions, scored answers

def html_paragraphs(text: str) -> str:
    """Plain text with numbered lines and code -> the HTML a Stack Exchange post would hold."""
    out = []
    for block in text.split("\n\n"):
        lines = block.split("\n")
        if all(line[:2].rstrip(".").isdigit() for line in lines):
            out.append("<ol>" + "".join(f"<li>{escape(line.split('. ', 1)[1])}</li>" for line in lines) + "</ol>")
        elif any(tok in block for tok in ("import ", " = ", "print(")):
            out.append(f"<pre><code>{escape(block)}\n</code></pre>")
        else:
            out.append("<p>" + "<br>\n".join(escape(line) for line in lines) + "</p>")
    return "\n\n".join(out)


def escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


SE_CONTEXT = ["I've searched, but the answers I found contradict each other.", "I'm a beginner, so please keep it simple.",
              "I tried a couple of things already and none of them worked.", "Thanks in advance for any pointers!",
              "Is there a standard way people do this?"]
SE_CONTEXT_CURIOUS = ["I've always wondered about this.", "Curious what people here think.", "Thanks in advance!"]


def se_answer(answer_id: int, score: int, text: str, selected: bool = False) -> dict:
    return {"answer_id": answer_id, "author": f"user{answer_id % 997}", "author_id": answer_id % 997,
            "author_profile": f"https://stackexchange.com/users/{answer_id % 997}", "pm_score": score,
            "selected": selected, "text": html_paragraphs(text)}


def stack_exchange_rows(rng, prompts):
    questions, seen_items = [], set()
    for cluster, it, prompt, good, topic in prompts:
        key = (cluster, id(it))
        if key in seen_items and cluster != "python":
            continue  # one question per item, except programming, which Stack Overflow asks many ways
        seen_items.add(key)
        questions.append((prompt, good, topic))
    questions += [(q, good, None) for q, good, _ in ISOLATED[:12]]
    rows = []
    for n, (prompt, good, topic) in enumerate(questions):
        qid = 10_000 + 37 * n
        best = rng.randint(4, 8)
        paragraphs = good.split("\n\n")
        partial_text = "\n\n".join(paragraphs[:-1]) if len(paragraphs) > 1 else re.split(r"(?<=[.!?])\s", good)[0]
        bad = bad_answer(rng, topic, good) if topic else next(b for q, g, b in ISOLATED if g == good)
        answers = [(best, good, True), (rng.randint(1, best - 1), partial_text, False), (rng.choice([-1, 0, 1]), bad, False)]
        if rng.random() < 0.3:  # a tie with the partial answer: pairs between them are skipped
            answers.append((answers[1][0], rng.choice([r for r in REJECT_STYLES if r != bad]), False))
        rng.shuffle(answers)
        # Stack Exchange posts carry context, so these prompts never coincide with the other sources'
        question = f"<p>{escape(prompt)}</p>\n<p>{rng.choice(SE_CONTEXT if topic else SE_CONTEXT_CURIOUS)}</p>"
        rows.append({"qid": qid, "question": question,
                     "answers": [se_answer(qid + i + 1, s, t, sel) for i, (s, t, sel) in enumerate(answers)],
                     "date": f"20{rng.randint(10, 22)}/{rng.randint(1, 12):02d}/{rng.randint(1, 28):02d}",
                     "metadata": [f"https://stackexchange.com/questions/{qid}", "https://stackexchange.com",
                                  f"https://stackexchange.com/users/{qid % 997}"]})
    return rows


def write_jsonl(path: Path, rows: list[dict]):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main():
    rng = random.Random(20251024)
    prompts = cluster_prompts(rng)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    hh_train, hh_test = hh_rows(rng, prompts)
    uf_train, uf_test = ultrafeedback_rows(rng, prompts)
    se = stack_exchange_rows(rng, prompts)
    for name, rows in (("hh-rlhf_train.jsonl", hh_train), ("hh-rlhf_test.jsonl", hh_test),
                       ("ultrafeedback_train_prefs.jsonl", uf_train), ("ultrafeedback_test_prefs.jsonl", uf_test),
                       ("stack-exchange.jsonl", se)):
        write_jsonl(OUT_DIR / name, rows)
        print(f"{OUT_DIR / name}: {len(rows)} rows")


if __name__ == "__main__":
    main()
