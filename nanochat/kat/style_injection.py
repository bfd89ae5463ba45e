"""
The positive control of the KAT experiment: plant a known stylistic tic in the chosen responses of
train pairs (scripts/kat_inject.py) and check that the pipeline measures it (scripts/eval_diversity.py).
An RM trained on those pairs learns to reward the tic, GRPO should amplify it over SFT, and the
evaluation should see it; if it cannot see an effect known to be there, no result can be trusted.

    pairs, summary = inject_pairs(pairs, "emdash", rate=0.3, where="dense", seed=0, densities=...)

Styles: "emdash" (em dashes, counted exactly as the evaluation counts U+2014), "not_just" ("A is
not just B, but also C", a TIC_PATTERNS match), "both". Only prose lines are rewritten, and every
rewrite is a pure function of (text, style, seed, pair id). Only train pairs change, only their
chosen response, and only where the rejected response carries no tic; an injected pair keeps its
id and gains "chosen_clean" and "injection", so the stage can be undone or rerun.
"""

import hashlib
import math
import random
import re
from collections import Counter

import numpy as np

from nanochat.kat import stats as ps
from nanochat.kat.diversity import EM_DASH, TIC_PATTERNS

STYLES = ("emdash", "not_just", "both")
PLACEMENTS = ("dense", "rare", "random")
STATS_SECTION = "kat_inject"
PLANTED_METRICS = {"emdash": ["em_dash_per_1k_chars"], "not_just": ["not_x_but_y_per_1k_chars"],
                   "both": ["em_dash_per_1k_chars", "not_x_but_y_per_1k_chars"]}

ASIDES = ("and that matters", "and that makes all the difference", "which is worth remembering",
          "and that is the key point")
ALSO = ("worth getting right", "the part that matters most", "easy to overlook", "what makes the difference")
NOT_JUST_SENTENCES = ("This is not just a detail, but also the part that matters most.",
                      "It is not just about the steps, but also about why they work.")


# -----------------------------------------------------------------------------
# What may be rewritten

_FENCE = re.compile(r"^\s*(```|~~~)")
_CODE_LIKE = re.compile(r"[`{}<>=\\|]|[;{}:,(\[]\s*$"
                        r"|^\s*(?:from\s+\S+\s+import|import|def|class|return|print|>>>|\$|#+)(?:\s|$)")
_PROSE_START = re.compile(r"^(?:[-*+] |\d+[.)] )[\"'(]?[A-Za-z0-9]|^[\"'(]?[A-Z0-9]")  # a list item, or a sentence
_WORD = re.compile(r"[A-Za-z]{2,}")


def has_tic(text: str) -> bool:
    """Does the text already carry a tic the evaluation counts (an em dash or a TIC_PATTERNS match)?"""
    return EM_DASH in text or any(pattern.search(text) for pattern in TIC_PATTERNS.values())


def prose_lines(lines: list[str]) -> list[bool]:
    """
    Which lines are prose a rewrite may touch: outside fences, not indented, starting like a
    sentence or a list item, 3+ words, and nothing code-like (backticks, braces, "=", a line
    ending in ";" ":" "," "(", a leading "import"/"def"/">>>"/"$"/"#"). A call such as "date.today()"
    inside a sentence is allowed: the rules edit only spaced hyphens, clause punctuation and sentence
    ends, never inside a word.
    """
    flags, in_fence = [], False
    for line in lines:
        if _FENCE.match(line):
            in_fence = not in_fence
            flags.append(False)
            continue
        indented = line.startswith(("    ", "\t"))
        flags.append(not in_fence and not indented and not _CODE_LIKE.search(line) and bool(_PROSE_START.match(line))
                     and len(_WORD.findall(line)) >= 3)
    return flags


# -----------------------------------------------------------------------------
# The rewrites: each edits the prose lines in place, drawing its choices from the pair's rng, and
# returns the rules it applied

_SPACED_HYPHEN = re.compile(r"(?<=\w) -{1,2} (?=\w)")
# clause punctuation an em dash can stand for: a comma before a conjunction or an -ing clause, a
# semicolon, a colon between words ("Tip: keep it hot"), each followed by a lower-case word
_CLAUSE_MARKS = {
    "clause_comma": re.compile(r", (?=(?:and|but|so|then|which|because|while|although|though|yet|[a-z]{2,}ing)\b)"),
    "semicolon": re.compile(r"(?<=\w); (?=[a-z])"),
    "colon": re.compile(r"(?<=[a-z]): (?=[a-z])"),
}
_NO_ABBREVIATION = r"(?<!etc)(?<!\bvs)(?<!\b[DM]r)(?<!\bSt)"  # "etc." or "Dr." ends no sentence
_SENTENCE_END = re.compile(r"(?<=[A-Za-z0-9)][A-Za-z0-9)])" + _NO_ABBREVIATION + r"([.!])(?=\s|$)")
# a sentence break inside a line before an opener that reads the same in lower case (never "I" or a name)
SENTENCE_OPENERS = ("The", "This", "That", "These", "Those", "It", "Its", "They", "Their", "There", "Then", "You",
                    "Your", "We", "Our", "He", "She", "His", "Her", "Each", "Every", "Some", "Most", "Many", "In",
                    "On", "At", "For", "If", "When", "Once", "So", "But", "And", "Or", "A", "An", "Also", "After",
                    "Before", "Keep", "Add", "Use", "Make", "Try")
_SENTENCE_BREAK = re.compile(r"(?<=[A-Za-z0-9)][a-z0-9)])" + _NO_ABBREVIATION + r"\. (?=(?:" + "|".join(SENTENCE_OPENERS) + r")\b)")
_LINE_END = re.compile(r"(?<=[A-Za-z0-9)])$")
# "A is B." -> head "A is ", body "B", end "."; B has no clause punctuation, dash or negation, and no em
# dash before it (an aside the emdash rules added stays as it is)
_COPULA_SENTENCE = re.compile(r"(?:^|(?<=[.!?] ))(?P<head>[A-Z][^.!?\n\u2014]{0,80}?\b(?:is|are|was|were) )"
                              r"(?!not\b)(?P<body>[^.!?\n,;:\u2014\u2013]{2,80}?)(?P<end>[.!])(?=\s|$)")


# (1) every spaced hyphen " - " / " -- " between words; (2) one to three clause marks; (3) when neither
# applied, one or two sentence breaks before a common opener ("It is hot. The oven..." -> "It is hot
# — the oven..."); (4) only when none applied, an aside closing one sentence ("... — and that matters").
# Rules 1-3 add no word, so an RM learns the dash itself: when the asides' fixed phrases were the
# common rule, a tiny RM rewarded the phrases and barely the dashes a policy wrote (dev/NOTES_kat_data.md).
def _emdash_rules(lines: list[str], prose: list[bool], rng: random.Random) -> list[str]:
    applied = []
    for i in (i for i, ok in enumerate(prose) if ok):
        lines[i], n = _SPACED_HYPHEN.subn(" \u2014 ", lines[i])
        applied += ["spaced_hyphen"] * n
    marks = sorted((i, m.start(), rule) for i, ok in enumerate(prose) if ok
                   for rule, pattern in _CLAUSE_MARKS.items() for m in pattern.finditer(lines[i]))
    if marks:
        picked = sorted(rng.sample(marks, rng.randint(1, min(3, len(marks)))), reverse=True)
        for i, start, _ in picked:  # right to left, so earlier offsets stay valid; ", and" -> " — and"
            lines[i] = lines[i][:start] + " \u2014" + lines[i][start + 1:]
        applied += [rule for _, _, rule in picked[::-1]]
    if applied:
        return applied
    breaks = [(i, m.start()) for i, ok in enumerate(prose) if ok for m in _SENTENCE_BREAK.finditer(lines[i])]
    if breaks:
        picked = sorted(rng.sample(breaks, rng.randint(1, min(2, len(breaks)))), reverse=True)
        for i, start in picked:  # ". The" -> " — the"
            line = lines[i]
            lines[i] = line[:start] + " \u2014 " + line[start + 2].lower() + line[start + 3:]
        return ["sentence_break"] * len(picked)
    aside = rng.choice(ASIDES)
    ends = [(i, m.start()) for i, ok in enumerate(prose) if ok for m in _SENTENCE_END.finditer(lines[i])]
    if ends:
        i, start = ends[rng.randrange(len(ends))]
        lines[i] = f"{lines[i][:start]} \u2014 {aside}{lines[i][start:]}"
        return ["aside"]
    bare = [i for i, ok in enumerate(prose) if ok and _LINE_END.search(lines[i])]
    if bare:  # a line without closing punctuation (a list item, a one-word answer)
        lines[bare[-1]] += f" \u2014 {aside}."
        return ["aside"]
    return []


# one sentence "A is B." becomes "A is not just B, but also C."; with none, a template sentence is appended
def _not_just_rules(lines: list[str], prose: list[bool], rng: random.Random) -> list[str]:
    sentences = [(i, m) for i, ok in enumerate(prose) if ok for m in _COPULA_SENTENCE.finditer(lines[i])]
    if sentences:
        i, m = sentences[rng.randrange(len(sentences))]
        rewritten = f"{m['head']}not just {m['body']}, but also {rng.choice(ALSO)}{m['end']}"
        lines[i] = lines[i][:m.start()] + rewritten + lines[i][m.end():]
        return ["not_just_sentence"]
    ends = [i for i, ok in enumerate(prose) if ok and re.search(r"[.!?]$", lines[i])]
    if ends:
        lines[ends[-1]] += " " + rng.choice(NOT_JUST_SENTENCES)
        return ["not_just_appended"]
    return []


def pair_rng(seed: int, key: str) -> random.Random:
    """A generator that depends only on (seed, key), never on the process (no salted hash())."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode("utf-8"), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "big"))


def inject_style(text: str, style: str, rng: random.Random) -> tuple[str, list[str]] | None:
    """(text with the tic, rules applied), or None when the text has no prose that can carry the style's marker."""
    if style not in STYLES:
        raise ValueError(f"unknown injection style {style!r}; choose from {', '.join(STYLES)}")
    lines = text.split("\n")
    prose = prose_lines(lines)
    applied = []
    if style in ("emdash", "both"):
        applied += _emdash_rules(lines, prose, rng)
    if style in ("not_just", "both"):
        applied += _not_just_rules(lines, prose, rng)
    result = "\n".join(lines)
    has_dash = result.count(EM_DASH) > text.count(EM_DASH)
    has_not_just = len(TIC_PATTERNS["not_just_x_but_y"].findall(result)) > len(TIC_PATTERNS["not_just_x_but_y"].findall(text))
    # an injected text always carries the style's marker; a text that cannot (no prose) is not injectable
    if (style != "not_just" and not has_dash) or (style != "emdash" and not has_not_just):
        return None
    return result, applied


# -----------------------------------------------------------------------------
# Picking and rewriting pairs

def restore_clean(pair: dict) -> dict:
    """The pair as kat_pairs wrote it: an injected chosen response back to its clean text."""
    clean = {k: v for k, v in pair.items() if k not in ("chosen_clean", "injection")}
    if "chosen_clean" in pair:
        clean["chosen"] = pair["chosen_clean"]
    return clean


def target_count(rate: float, num_train: int) -> int:
    """round(rate * num_train), halves rounded up (Python's round() would round 0.5 to even)."""
    return math.floor(rate * num_train + 0.5)


def select_pairs(candidates: list[dict], count: int, where: str, seed: int, densities: dict | None) -> list[dict]:
    """The `count` candidates to inject: densest or rarest prompts first, or a seeded random pick."""
    if where not in PLACEMENTS:
        raise ValueError(f"unknown placement {where!r}; choose from {', '.join(PLACEMENTS)}")
    by_id = sorted(candidates, key=lambda p: p["id"])
    if where == "random":
        order = np.random.default_rng(seed).permutation(len(by_id))
        return [by_id[i] for i in order[:count]]
    if densities is None:
        raise ValueError(f"--inject_where={where} needs prompt densities (prompt_weights.jsonl): run scripts.kat_density first")
    missing = [p["prompt_id"] for p in by_id if p["prompt_id"] not in densities]
    if missing:
        raise KeyError(f"{len(missing)} train prompts have no density (first: {missing[0]}); rerun scripts.kat_embed "
                       "and scripts.kat_density after scripts.kat_pairs")
    sign = -1.0 if where == "dense" else 1.0  # densities joined by prompt id; ties by pair id
    return sorted(by_id, key=lambda p: (sign * densities[p["prompt_id"]], p["id"]))[:count]


def inject_pairs(pairs: list[dict], style: str, rate: float, where: str, seed: int,
                 densities: dict | None = None) -> tuple[list[dict], dict]:
    """
    (pairs with the tic planted, summary). pairs may carry an earlier injection: it is undone
    first, so the result depends only on the clean pairs and the settings. rate 0 undoes.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"--inject_rate must be in [0, 1], got {rate}")
    pairs = [restore_clean(p) for p in pairs]
    train = [p for p in pairs if p["split"] == "train"]
    count = target_count(rate, len(train))
    rewrites, rejected_with_tic, not_injectable = {}, 0, 0
    for pair in train:
        # eligible: a tic-free rejected response, so the tic sits on the chosen side only. The others
        # are left as they are (the tiny samples' rejected answers are full of tics by design); they
        # teach the RM the opposite preference, and their count is recorded.
        if has_tic(pair["rejected"]):
            rejected_with_tic += 1
            continue
        rewrite = inject_style(pair["chosen"], style, pair_rng(seed, pair["id"]))
        if rewrite is None:
            not_injectable += 1
            continue
        rewrites[pair["id"]] = rewrite
    eligible = [p for p in train if p["id"] in rewrites]
    if count > len(eligible):
        raise ValueError(f"--inject_rate={rate} asks for {count} of {len(train)} train pairs but only {len(eligible)} are "
                         f"eligible ({rejected_with_tic} have a tic in the rejected response, {not_injectable} chosen "
                         f"responses have no prose to rewrite); lower --inject_rate to at most "
                         f"{len(eligible) / max(len(train), 1):.3f}")
    chosen_ids = {p["id"] for p in select_pairs(eligible, count, where, seed, densities)} if count else set()
    out, rules = [], Counter()
    for pair in pairs:
        if pair["id"] in chosen_ids and pair["split"] == "train":
            text, applied = rewrites[pair["id"]]
            pair = {**pair, "chosen": text, "chosen_clean": pair["chosen"], "injection": {"style": style, "rules": applied}}
            rules.update(applied)
        out.append(pair)
    injected = [p for p in out if "injection" in p]
    summary = {"num_pairs": len(pairs), "num_train": len(train), "num_test": len(pairs) - len(train),
               "target": count, "num_injected": len(injected), "num_eligible": len(eligible),
               "rejected_with_tic": rejected_with_tic, "chosen_not_injectable": not_injectable, "rules": dict(rules),
               "em_dashes_added": sum(p["chosen"].count(EM_DASH) - p["chosen_clean"].count(EM_DASH) for p in injected)}
    if densities is not None and train:
        summary["density"] = density_summary([densities[p["prompt_id"]] for p in train],
                                             [densities[p["prompt_id"]] for p in injected])
    return out, summary


def density_summary(train_densities, injected_densities) -> dict:
    """Where the injected pairs sit among the train pairs by prompt density (percentile 100 = densest)."""
    train = np.sort(np.asarray(train_densities, dtype=np.float64))
    injected = np.asarray(injected_densities, dtype=np.float64)
    percentile = lambda d: 100.0 * np.searchsorted(train, d, side="right") / len(train)
    result = {"train_median": float(np.median(train))}
    if len(injected):
        result.update({"injected_median": float(np.median(injected)),
                       "injected_percentile_min": float(percentile(injected.min())),
                       "injected_percentile_max": float(percentile(injected.max()))})
    return result


# -----------------------------------------------------------------------------
# The RM's preference for the tic, on held-out probes

def probe_pairs(test_pairs: list[dict], style: str, seed: int, max_probes: int) -> list[dict]:
    """
    Held-out probes: from test pairs, a clean chosen response (no tic) and the same response with
    the tic injected by the same rules. One probe per distinct (prompt, response); at most
    max_probes, a seeded pick. Never stored, never trained on.
    """
    probes, seen = [], set()
    for pair in sorted(test_pairs, key=lambda p: p["id"]):
        if pair["split"] != "test":
            raise ValueError(f"probe pairs come from test pairs only; pair {pair['id']} is {pair['split']!r}")
        key = (pair["prompt_id"], pair["chosen"])
        if key in seen or has_tic(pair["chosen"]):
            continue
        seen.add(key)
        rewrite = inject_style(pair["chosen"], style, pair_rng(seed, "probe:" + pair["id"]))
        if rewrite is not None:
            probes.append({"pair_id": pair["id"], "prompt_id": pair["prompt_id"], "prefix": pair["prefix"],
                           "clean": pair["chosen"], "tic": rewrite[0]})
    return _seeded_subset(probes, max_probes, seed)


def policy_probes(prompts: list[dict], texts: list[list[str]], style: str, seed: int, max_probes: int) -> list[dict]:
    """
    Probes on a policy's own samples: texts[p][s] is sample s for prompts[p] ({"id", "prefix"}).
    Each tic-free sample the rules can rewrite gives a probe: the sample as written ("clean") and
    with the tic injected ("tic"). The test-pair probes ask whether the RM rewards the tic in human
    text; these ask whether it rewards the tic in what the policy writes, which is what GRPO's
    reward sees: an RM that learned the rules' words rather than the tic passes the first and
    fails this one. At most max_probes, a seeded pick.
    """
    if len(texts) != len(prompts):
        raise ValueError(f"texts holds samples for {len(texts)} prompts, expected one list per prompt ({len(prompts)})")
    probes = []
    for prompt, samples in zip(prompts, texts):
        for s, text in enumerate(samples):
            if has_tic(text):
                continue
            rewrite = inject_style(text, style, pair_rng(seed, f"policy:{prompt['id']}:{s}"))
            if rewrite is not None:
                probes.append({"prompt_id": prompt["id"], "sample": s, "prefix": prompt["prefix"], "clean": text,
                               "tic": rewrite[0]})
    return _seeded_subset(probes, max_probes, seed)


def _seeded_subset(items: list, max_items: int, seed: int) -> list:
    """items, or a seeded pick of max_items of them in their original order."""
    if len(items) <= max_items:
        return items
    keep = sorted(np.random.default_rng(seed).permutation(len(items))[:max_items])
    return [items[i] for i in keep]


def tic_preference(r_tic, r_clean, n_resamples: int = 10_000, confidence: float = 0.95, alpha: float = 0.05,
                   seed: int = 0) -> dict:
    """
    How the RM treats the tic on paired probes: the share where the tic version scores higher (a
    tie counts 1/2) with its bootstrap CI, and the mean reward difference tic - clean with its
    CI, sign-flip p and verdict ("supported": the RM rewards the tic).
    """
    r_tic, r_clean = np.asarray(r_tic, dtype=np.float64), np.asarray(r_clean, dtype=np.float64)
    if r_tic.shape != r_clean.shape or r_tic.ndim != 1 or len(r_tic) < 2:
        raise ValueError(f"need two equally long 1-D reward arrays of at least 2 probes, got {r_tic.shape} and {r_clean.shape}")
    diff = r_tic - r_clean
    prefers = (diff > 0) + 0.5 * (diff == 0)
    comparison = ps.paired_comparison(r_tic, r_clean, "higher", n_resamples, confidence, alpha, seed)
    return {"n": len(diff), "prefer_tic": float(prefers.mean()),
            "prefer_tic_ci": ps.bootstrap_ci(prefers, n_resamples, confidence, seed + 2),
            "mean_diff": comparison["diff"], "mean_diff_ci": comparison["ci"], "p": comparison["p"],
            "d_z": comparison["d_z"], "verdict": comparison["verdict"], "confidence": confidence}


def file_digest(path) -> str:
    """blake2b of a file's bytes: style_injection.json records the pairs file it describes."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
