"""Distillation records reworded with domain-neutral chatter and light typos (the teacher labels every position of
them, so no answer changes): an opening sentence (80 %), a closing one (50 %), one typo in a plain word (30 %), a
lower-case first letter (25 %), on a share ``--p`` of the records. None of the phrases is in the wording composer's
held-out pools (``xlora.demo._wording_data``). BENCHMARKS ("How sure are these numbers?", issue 22 item 1) distils the k = 8 student on
it: no change on the independent set.

    python benchmarks/chatter.py DISTILL_DATA.jsonl OUT.jsonl --p 0.5 --seed 0
"""
import argparse
import json
import random

OPENERS = [
    "Hey, got a minute?", "Working late on my thesis tonight and stuck on one item.",
    "Before the seminar starts I want to double-check a number.", "This is for a homework set due tomorrow morning.",
    "My colleague and I disagree about this one, so settle it for us.",
    "I'm filling in a spreadsheet column and need the value below.", "Writing up the methods section right now.",
    "A reviewer asked us to report this explicitly.", "Just curious, no rush at all.",
    "I copied this from an old email thread:", "Teaching assistant here, preparing an answer key.",
    "Draft three of the report; one cell of the table is still empty.", "Good morning!", "Sorry if this is basic.",
    "I worked this out by hand and want to compare.", "From the practice problems, question four:",
    "Following up on what we discussed yesterday,", "We are preparing a poster and need this figure.",
    "Note for the group wiki:", "I'm new to this field, so bear with me.",
    "One check before I send the email to my advisor.", "Context: I'm automating a small report.",
    "Hello there, one question for you.", "Random question from a study session:",
    "Our shared doc has a blank here that I need to fill.", "For the appendix of my paper,",
    "Ok so here's what I need.", "I keep getting a different number each time I try this.",
    "Homework help please!", "For a slide in tomorrow's group update,",
]
CLOSINGS = [
    "No explanation needed, just the answer.", "A short answer is fine.", "Appreciate it!", "Let me know.",
    "That's all, thanks in advance.", "Reply with only the value, please.", "I'll compare it with my own result.",
    "Thanks a lot for the help.", "Much obliged.", "Only the final result, please.", "ty",
]


def typo(word: str, rng: random.Random) -> str:
    if len(word) < 5 or not word.isalpha():
        return word
    i = rng.randrange(1, len(word) - 1)
    return word[:i] + word[i + 1:] if rng.random() < 0.5 else word[:i] + word[i + 1] + word[i] + word[i + 2:]


def augment(text: str, rng: random.Random) -> str:
    words = text.split(" ")
    if rng.random() < 0.3:  # one typo in a plain word (sequences, SMILES and numbers are not plain words)
        j = rng.randrange(len(words))
        words[j] = typo(words[j], rng)
    text = " ".join(words)
    if rng.random() < 0.25:
        text = text[0].lower() + text[1:] if text else text
    parts = []
    if rng.random() < 0.8:
        parts.append(rng.choice(OPENERS))
    parts.append(text)
    if rng.random() < 0.5:
        parts.append(rng.choice(CLOSINGS))
    return (" " if rng.random() < 0.6 else "\n").join(parts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--p", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    n = 0
    with open(a.src) as f, open(a.dst, "w") as g:
        for line in f:
            r = json.loads(line)
            if rng.random() < a.p:
                for m in r["messages"]:
                    if m["role"] == "user":
                        m["content"] = augment(m["content"], rng)
                n += 1
            g.write(json.dumps(r) + "\n")
    print("augmented", n)


if __name__ == "__main__":
    main()
