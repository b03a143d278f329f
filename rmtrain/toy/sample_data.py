"""Synthetic quickstart data in the PKU-SafeRLHF v1 schema.

The rows are made from short phrase lists so that a tiny random-init LLaMA learns them in a
hundred steps: the better response is polite and gives concrete steps, the worse one is curt,
evasive or off-topic; independently of that, a response may contain a harmful instruction, which
makes it unsafe (severity 1-3, at least one harm category). Train and test draw their prompts
from disjoint topic pools, so evaluation is held out. No external data is read.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

# The 19 harm categories of PKU-SafeRLHF v1, in the order of the real rows' keys.
HARM_CATEGORIES: tuple[str, ...] = (
    "Endangering National Security",
    "Insulting Behavior",
    "Discriminatory Behavior",
    "Endangering Public Health",
    "Copyright Issues",
    "Violence",
    "Drugs",
    "Privacy Violation",
    "Economic Crime",
    "Mental Manipulation",
    "Human Trafficking",
    "Physical Harm",
    "Sexual Content",
    "Cybercrime",
    "Disrupting Public Order",
    "Environmental Damage",
    "Psychological Harm",
    "White-Collar Crime",
    "Animal Abuse",
)

# Field order of the real v1 rows.
V1_FIELDS: tuple[str, ...] = (
    "prompt",
    "response_0",
    "response_1",
    "prompt_source",
    "response_0_source",
    "response_1_source",
    "is_response_0_safe",
    "is_response_1_safe",
    "response_0_harm_category",
    "response_1_harm_category",
    "response_0_severity_level",
    "response_1_severity_level",
    "better_response_id",
    "safer_response_id",
    "response_0_sha256",
    "response_1_sha256",
)

SOURCE = "rmtrain-sample"

# Disjoint topic pools: the test split asks about topics the train split never saw.
TRAIN_TOPICS: tuple[str, ...] = (
    "bake bread at home",
    "fix a flat bike tire",
    "learn basic python",
    "plant a small garden",
    "train for a first marathon",
    "save money each month",
    "paint a bedroom wall",
    "write a cover letter",
    "clean a cast iron pan",
    "start a morning routine",
    "set up a home wifi network",
    "learn to play guitar",
    "cook rice on the stove",
    "prepare for a job interview",
    "organize a messy closet",
    "care for a new puppy",
    "study for a math exam",
    "build a simple bookshelf",
    "plan a road trip",
    "make a budget spreadsheet",
    "grow tomatoes on a balcony",
    "improve my sleep",
    "back up my phone photos",
    "brew good coffee",
    "learn a new language",
    "write a short story",
    "change a car tire",
    "host a dinner party",
)
TEST_TOPICS: tuple[str, ...] = (
    "knit a warm scarf",
    "repair a leaking faucet",
    "learn to swim as an adult",
    "make homemade pasta",
    "speak in public with confidence",
    "keep houseplants alive",
    "sharpen a kitchen knife",
    "start journaling",
    "pack for a camping trip",
    "fix a slow laptop",
)

PROMPT_TEMPLATES: tuple[str, ...] = (
    "How do I {topic}?",
    "Can you explain how to {topic}?",
    "What is the best way to {topic}?",
    "I want to {topic}. Where should I start?",
    "Could you give me tips to {topic}?",
    "What steps should I follow to {topic}?",
    "Please help me {topic}.",
    "Is it hard to {topic}? How would you do it?",
)
PROMPT_DETAILS: tuple[str, ...] = (
    "",
    " I am a complete beginner.",
    " I only have one free weekend.",
    " I tried once and it went badly.",
    " My budget is small.",
    " I want to do it with my kids.",
)

HELPFUL_OPENERS: tuple[str, ...] = (
    "Sure, I would be happy to help!",
    "Great question, here is a clear plan.",
    "Of course, this is easier than it looks.",
    "Happy to help, let us go step by step.",
    "Good idea, here is what I recommend.",
)
HELPFUL_STEPS: tuple[str, ...] = (
    "gather everything you need",
    "read a short beginner guide",
    "start with a small test",
    "set aside thirty quiet minutes",
    "check your progress carefully",
    "ask a friend for honest feedback",
    "write down what worked well",
    "take a short break to rest",
    "compare the result with a good example",
    "practice it again the next day",
    "watch a trusted video tutorial",
    "prepare a clean and safe workspace",
    "follow the instructions in order",
    "measure everything twice",
)
HELPFUL_CLOSERS: tuple[str, ...] = (
    "Let me know if you want more detail.",
    "Good luck, you can do this!",
    "Feel free to ask if anything is unclear.",
    "I hope this helps you get started.",
    "Take your time and enjoy the process.",
)
EVASIVE_REPLIES: tuple[str, ...] = (
    "I do not really know.",
    "No idea, figure it out yourself.",
    "Maybe search online or something.",
    "Why would you even ask that?",
    "That is not my problem.",
    "Whatever, it does not matter.",
    "Too complicated, just give up.",
    "Ask someone else.",
)
OFF_TOPIC_LINES: tuple[str, ...] = (
    "Anyway, I would rather talk about {other}.",
    "Honestly you should just {other} instead.",
    "It reminds me that I never learned to {other}.",
)
DISMISSIVE_CLOSERS: tuple[str, ...] = (
    "Good luck with that.",
    "That is all I have.",
    "Do not ask me again.",
    "",
)
# Harmful instruction phrases: (text, severity 1-3, harm categories).
HARMFUL_PHRASES: tuple[tuple[str, int, tuple[str, ...]], ...] = (
    ("steal the supplies from a store when nobody is watching", 2, ("Economic Crime",)),
    ("hack into the neighbour's wifi to get it for free", 2, ("Cybercrime", "Privacy Violation")),
    (
        "mix bleach and ammonia to make it work faster",
        3,
        ("Physical Harm", "Endangering Public Health"),
    ),
    ("forge the receipts so you can claim the money back", 2, ("White-Collar Crime",)),
    ("threaten anyone who gets in your way", 3, ("Violence", "Psychological Harm")),
    ("dump the leftover oil into the river", 2, ("Environmental Damage",)),
    ("kick the dog if it makes noise", 3, ("Animal Abuse", "Violence")),
    ("secretly read your partner's private messages", 2, ("Privacy Violation",)),
    ("guilt trip your family until they pay for it", 1, ("Mental Manipulation",)),
    ("download a pirated copy of the paid course", 1, ("Copyright Issues",)),
    ("call the teacher an idiot in front of everyone", 1, ("Insulting Behavior",)),
    ("buy strong pills without a prescription to stay awake", 2, ("Drugs",)),
    ("pull the fire alarm to clear the room", 2, ("Disrupting Public Order",)),
    ("refuse to let anyone from that neighbourhood join", 1, ("Discriminatory Behavior",)),
)

P_UNSAFE = 0.3


def _topic_pool(split: str) -> tuple[str, ...]:
    if split == "train":
        return TRAIN_TOPICS
    if split == "test":
        return TEST_TOPICS
    raise ValueError(f"sample split must be 'train' or 'test', got {split!r}")


def _harm(rng: random.Random) -> tuple[str, int, set[str]]:
    """One or (rarely) two harmful phrases; severity is the worst, categories the union."""
    picks = rng.sample(HARMFUL_PHRASES, 2 if rng.random() < 0.1 else 1)
    text = " and ".join(p[0] for p in picks)
    return text, max(p[1] for p in picks), {c for p in picks for c in p[2]}


def _helpful(rng: random.Random, topic: str, harm: str | None) -> str:
    a, b, c = rng.sample(HELPFUL_STEPS, 3)
    parts = [rng.choice(HELPFUL_OPENERS), f"To {topic}, first {a}, then {b}, and finally {c}."]
    if harm:
        parts.append(f"Also, {harm}.")
    parts.append(rng.choice(HELPFUL_CLOSERS))
    return " ".join(parts)


def _worse(rng: random.Random, topics: tuple[str, ...], topic: str, harm: str | None) -> str:
    other = rng.choice([t for t in topics if t != topic])
    parts = [rng.choice(EVASIVE_REPLIES), rng.choice(OFF_TOPIC_LINES).format(other=other)]
    if harm:
        parts.append(f"Or just {harm}.")
    parts.append(rng.choice(DISMISSIVE_CLOSERS))
    return " ".join(p for p in parts if p)


def _response(
    rng: random.Random, topics: tuple[str, ...], topic: str, helpful: bool
) -> tuple[str, int, set[str]]:
    harm, severity, categories = _harm(rng) if rng.random() < P_UNSAFE else (None, 0, set())
    text = _helpful(rng, topic, harm) if helpful else _worse(rng, topics, topic, harm)
    return text, severity, categories


def _sha(prompt: str, response: str) -> str:
    return hashlib.sha256((prompt + response).encode("utf-8")).hexdigest()


def generate_rows(n: int, seed: int, *, split: str = "train") -> list[dict[str, Any]]:
    """`n` PKU-SafeRLHF-v1 rows, a pure function of (n, seed, split).

    `split` picks the topic pool ("train" or "test"); the pools are disjoint so a test set made
    with ``split="test"`` never repeats a training prompt.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"rmtrain-sample:{split}:{seed}")
    topics = _topic_pool(split)
    rows: list[dict[str, Any]] = []
    for _ in range(n):
        topic = rng.choice(topics)
        prompt = rng.choice(PROMPT_TEMPLATES).format(topic=topic) + rng.choice(PROMPT_DETAILS)
        better = rng.randrange(2)
        while True:
            resp = [_response(rng, topics, topic, helpful=(k == better)) for k in range(2)]
            if resp[0][0] != resp[1][0]:
                break
        sev = [r[1] for r in resp]
        safe = [s == 0 for s in sev]
        if safe[0] != safe[1]:
            safer = 0 if safe[0] else 1
        elif sev[0] != sev[1]:
            safer = 0 if sev[0] < sev[1] else 1
        else:
            safer = rng.randrange(2)
        row: dict[str, Any] = {
            "prompt": prompt,
            "response_0": resp[0][0],
            "response_1": resp[1][0],
            "prompt_source": SOURCE,
            "response_0_source": SOURCE,
            "response_1_source": SOURCE,
            "is_response_0_safe": safe[0],
            "is_response_1_safe": safe[1],
            "response_0_harm_category": {c: c in resp[0][2] for c in HARM_CATEGORIES},
            "response_1_harm_category": {c: c in resp[1][2] for c in HARM_CATEGORIES},
            "response_0_severity_level": sev[0],
            "response_1_severity_level": sev[1],
            "better_response_id": better,
            "safer_response_id": safer,
            "response_0_sha256": _sha(prompt, resp[0][0]),
            "response_1_sha256": _sha(prompt, resp[1][0]),
        }
        rows.append({k: row[k] for k in V1_FIELDS})
    return rows


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write atomically: a reader never sees a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_sample_dataset(
    out_dir: str | os.PathLike[str], n_train: int, n_eval: int, seed: int = 0
) -> Path:
    """Write ``train.jsonl`` (seed) and ``test.jsonl`` (seed + 1, held-out topics) to out_dir.

    The result is what ``data.path=sample`` loads in memory, so ``data.path=<out_dir>`` trains on
    the same rows.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out / "train.jsonl", generate_rows(n_train, seed, split="train"))
    _write_jsonl(out / "test.jsonl", generate_rows(n_eval, seed + 1, split="test"))
    return out


def corpus() -> list[str]:
    """Every phrase the generator uses, for training the tiny tokenizer."""
    texts: list[str] = [*HARM_CATEGORIES, *PROMPT_DETAILS, *HELPFUL_OPENERS, *HELPFUL_CLOSERS]
    for topic in TRAIN_TOPICS + TEST_TOPICS:
        texts.extend(t.format(topic=topic) for t in PROMPT_TEMPLATES)
        texts.append(f"To {topic}, first")
        texts.extend(t.format(other=topic) for t in OFF_TOPIC_LINES)
    texts.extend(f"first {s}, then {s}, and finally {s}." for s in HELPFUL_STEPS)
    texts.extend(EVASIVE_REPLIES)
    texts.extend(DISMISSIVE_CLOSERS)
    for phrase, _, _ in HARMFUL_PHRASES:
        texts.extend([f"Also, {phrase}.", f"Or just {phrase}."])
    return [t for t in texts if t]


def main() -> None:
    """`rmtrain sample-data DIR`: write the generated dataset as PKU-SafeRLHF-v1 JSONL."""
    import argparse

    parser = argparse.ArgumentParser(prog="rmtrain sample-data", description=main.__doc__)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--train-rows", type=int, default=2048)
    parser.add_argument("--eval-rows", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = write_sample_dataset(args.out_dir, args.train_rows, args.eval_rows, args.seed)
    print(
        f"wrote {out / 'train.jsonl'} and {out / 'test.jsonl'}; train on it with "
        f"`rmtrain train data.path={out}`"
    )
