"""``xlora dialogue``: two agents on X-LoRA models take turns, and the mixture is traced over the conversation.

The paper's adversarial agentic modelling in miniature: agent A (by default a questioner) and agent B
(a critic) share one X-LoRA model, or each has its own. On its turn an agent sees its own system
prompt, then the conversation so far with its own turns as ``assistant`` and the other agent's as
``user`` (agent A also sees an opening line naming the topic), and answers greedily (deterministic) with a repetition penalty (``REPETITION_PENALTY``, transformers'
``RepetitionPenaltyLogitsProcessor`` over the prompt and the answer): without it the demo's experts, trained
on one-line answers, echo the other agent's last turn and the talk collapses within two turns.
A :class:`~xlora.generation.StepRecorder` keeps the scalings of every generated token; each turn
records the per-expert mean (over its tokens and the adapted layers) and which expert dominated.

Context is bounded: a turn's prompt holds at most ``max_context - max_new_tokens`` tokens. When the
conversation is longer, the oldest turns are dropped first (the system prompt is always kept; a
single turn still too long keeps its last tokens), so long conversations run in constant memory.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from xlora.analysis.views import token_mixture
from xlora.files import atomic_write, atomic_write_text
from xlora.generation import StepRecorder, encode_prompt, pad_token_id

AGENT_A = ("You are a materials scientist who asks one short, specific question about the topic, "
           "building on the last answer.")
AGENT_B = ("You are a critical reviewer. Answer the question in one or two sentences, with numbers where you can, "
           "and point out one weakness.")
OPENING = "The topic is: {topic}. Ask your first question."
REPETITION_PENALTY = 1.3  # 1.0 is plain greedy decoding


@dataclass
class Turn:
    """One turn: who spoke, what, and the mixture while it was written."""

    index: int
    agent: str
    text: str
    prompt_tokens: int
    dropped_turns: int
    new_tokens: int
    mean_scalings: dict[str, float]
    dominant: str
    token_dominant: dict[str, int] = field(default_factory=dict)


@dataclass
class Dialogue:
    topic: str
    agents: dict[str, str]
    max_context: int
    max_new_tokens: int
    experts: list[str]
    turns: list[Turn] = field(default_factory=list)
    repetition_penalty: float = REPETITION_PENALTY

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_markdown(self) -> str:
        out = [f"# Dialogue: {self.topic}\n\n", f"- **A** (system): {self.agents['A']}\n",
               f"- **B** (system): {self.agents['B']}\n",
               f"- greedy, repetition penalty {self.repetition_penalty:g}; each turn's mixture is the mean over "
               "the tokens it wrote\n\n"]
        for t in self.turns:
            mix = ", ".join(f"{k} {v:.2f}" for k, v in t.mean_scalings.items())
            out.append(f"**{t.agent}** (turn {t.index + 1}; dominant expert *{t.dominant}*; {mix}):\n\n"
                       f"{t.text or '(empty)'}\n\n")
        return "".join(out)


def view(agent: str, system: str, topic: str, history: list[tuple[str, str]]) -> list[dict[str, str]]:
    """The messages ``agent`` answers: its system prompt, then (for A) the opening line, then the history with
    its own turns as ``assistant`` and the other agent's as ``user``."""
    messages = [{"role": "system", "content": system}]
    if agent == "A":
        messages.append({"role": "user", "content": OPENING.format(topic=topic)})
    messages += [{"role": "assistant" if who == agent else "user", "content": text} for who, text in history]
    return messages


def fit_context(tokenizer: Any, messages: list[dict[str, str]], budget: int) -> tuple[dict[str, torch.Tensor], int]:
    """The encoded prompt of ``messages`` in at most ``budget`` tokens, and how many messages were dropped.

    Drops the oldest non-system messages first (then a leading ``assistant`` message, so the kept
    history starts with the other speaker); when the last message alone is too long, keeps its tail.
    """
    system, rest = messages[:1], list(messages[1:])
    dropped = 0
    while True:
        enc = encode_prompt(tokenizer, system + rest)
        if enc["input_ids"].shape[1] <= budget or len(rest) <= 1:
            break
        rest.pop(0)
        dropped += 1
        if len(rest) > 1 and rest[0]["role"] == "assistant":
            rest.pop(0)
            dropped += 1
    if enc["input_ids"].shape[1] > budget:  # one message longer than the budget: keep its last tokens
        ids = tokenizer(rest[-1]["content"], add_special_tokens=False)["input_ids"]
        overhead = enc["input_ids"].shape[1] - len(ids)
        keep = max(1, budget - overhead - 1)
        rest[-1] = {**rest[-1], "content": tokenizer.decode(ids[-keep:], skip_special_tokens=True)}
        enc = encode_prompt(tokenizer, system + rest)
        if enc["input_ids"].shape[1] > budget:
            raise ValueError(f"the system prompt alone needs {enc['input_ids'].shape[1]} tokens but max_context "
                             f"leaves {budget} for the prompt; raise max_context or shorten the system prompt")
    return enc, dropped


@torch.no_grad()
def speak(model: Any, tokenizer: Any, enc: dict[str, torch.Tensor], max_new_tokens: int,
          repetition_penalty: float = REPETITION_PENALTY) -> tuple[str, list[int], torch.Tensor]:
    """Greedy answer to an encoded prompt: ``(text, new_ids, scalings [n_new, L, E])``; row ``k`` of the
    scalings wrote token ``k``."""
    recorder = StepRecorder()
    enc = {k: v.to(model.device) for k, v in enc.items()}
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_token_id(tokenizer),
                         eos_token_id=tokenizer.eos_token_id, observer=recorder, repetition_penalty=repetition_penalty)
    new = out[0, enc["input_ids"].shape[1]:].tolist()
    scalings = recorder.per_token(len(new))
    if tokenizer.eos_token_id in new:
        n = new.index(tokenizer.eos_token_id)
        new, scalings = new[:n], scalings[:n]
    return tokenizer.decode(new, skip_special_tokens=True).strip(), new, scalings


def _summary(scalings: torch.Tensor, names: list[str]) -> tuple[dict[str, float], str, dict[str, int]]:
    """Mean mixture of a turn's tokens, its dominant expert ("" when no expert has weight) and per expert the
    number of tokens it wrote (row ``k`` of ``scalings`` wrote token ``k``, :mod:`xlora.analysis.views`)."""
    if len(scalings) == 0:
        return {n: 0.0 for n in names}, "", {}
    per_token = token_mixture(scalings)  # [n, E], layers averaged
    mean = per_token.mean(0)
    if not bool((mean > 0).any()):  # fixed zero scalings: the base model wrote the turn
        return dict(zip(names, mean.tolist())), "", {}
    counts = torch.bincount(per_token.argmax(1), minlength=len(names)).tolist()
    return dict(zip(names, mean.tolist())), names[int(mean.argmax())], {n: c for n, c in zip(names, counts) if c}


def converse(model: Any, tokenizer: Any, topic: str, turns: int = 6, agent_a: str = AGENT_A, agent_b: str = AGENT_B,
             max_new_tokens: int = 64, max_context: int = 512, model_b: Any = None,
             repetition_penalty: float = REPETITION_PENALTY) -> Dialogue:
    """Run ``turns`` alternating turns (A first) and return the :class:`Dialogue` with each turn's scalings.

    Args:
        model_b: agent B's model (default: the same model as A); both must have the same experts.
        max_context: tokens of prompt plus answer per turn; older turns are dropped to stay within it.
        repetition_penalty: transformers' repetition penalty (> 0; 1.0 is plain greedy decoding).
    """
    if turns < 1 or max_new_tokens < 1:
        raise ValueError(f"turns and max_new_tokens must be >= 1, got turns={turns}, max_new_tokens={max_new_tokens}")
    if max_context <= max_new_tokens:
        raise ValueError(f"max_context ({max_context}) must exceed max_new_tokens ({max_new_tokens})")
    if isinstance(repetition_penalty, bool) or not isinstance(repetition_penalty, (int, float)) \
            or not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty={repetition_penalty!r} must be a number > 0 "
                         f"(1.0 is plain greedy decoding; the default is {REPETITION_PENALTY})")
    names = model.xlora_config.expert_names
    if model_b is not None and model_b.xlora_config.expert_names != names:
        raise ValueError(f"agent B's model has experts {model_b.xlora_config.expert_names}, agent A's {names}")
    dialogue = Dialogue(topic, {"A": agent_a, "B": agent_b}, max_context, max_new_tokens, names,
                        repetition_penalty=float(repetition_penalty))
    history: list[tuple[str, str]] = []
    for i in range(turns):
        agent = "AB"[i % 2]
        system = agent_a if agent == "A" else agent_b
        enc, dropped = fit_context(tokenizer, view(agent, system, topic, history), max_context - max_new_tokens)
        text, new, scalings = speak(model_b if agent == "B" and model_b is not None else model, tokenizer, enc,
                                    max_new_tokens, repetition_penalty)
        mean, dominant, counts = _summary(scalings, names)
        dialogue.turns.append(Turn(i, agent, text, int(enc["input_ids"].shape[1]), dropped, len(new), mean, dominant,
                                   counts))
        history.append((agent, text))
    return dialogue


def plot_turns(dialogue: Dialogue, path: Path) -> Path:
    """Each expert's mean scaling per turn (the paper's "the model calls on different experts as the
    conversation moves"), turns of A and B marked differently."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from xlora.analysis.plots import expert_color

    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(dialogue.turns) + 3), 4), dpi=100)
    x = [t.index + 1 for t in dialogue.turns]
    for e, name in enumerate(dialogue.experts):
        y = [t.mean_scalings[name] for t in dialogue.turns]
        ax.plot(x, y, color=expert_color(e), label=name, linewidth=2)
        for t, v in zip(dialogue.turns, y):
            ax.scatter(t.index + 1, v, color=expert_color(e), marker="o" if t.agent == "A" else "s", zorder=3)
    ax.set_xlabel("turn (circles: agent A, squares: agent B)")
    ax.set_ylabel("mean scaling (tokens and layers)")
    ax.set_xticks(x)
    ax.set_title(f"Experts over the dialogue: {dialogue.topic[:60]}")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path


def write_dialogue(dialogue: Dialogue, out_dir: str | os.PathLike) -> dict[str, Path]:
    """``transcript.md``, ``dialogue.json`` and ``scalings_per_turn.png`` in ``out_dir``."""
    out = Path(out_dir)
    paths = {"transcript": out / "transcript.md", "json": out / "dialogue.json", "plot": out / "scalings_per_turn.png"}
    atomic_write_text(paths["transcript"], dialogue.to_markdown())
    atomic_write_text(paths["json"], json.dumps(dialogue.to_dict(), indent=2) + "\n")
    plot_turns(dialogue, paths["plot"])
    return paths


def run_dialogue(topic: str, out_dir: str | os.PathLike, turns: int = 6, agent_a: str | None = None,
                 agent_b: str | None = None, assets: str | os.PathLike | None = None,
                 assets_b: str | os.PathLike | None = None, base_dir: str | os.PathLike | None = None,
                 max_new_tokens: int = 64, max_context: int = 512,
                 repetition_penalty: float = REPETITION_PENALTY) -> int:
    """The ``xlora dialogue`` command over the demo model (or X-LoRA directories ``assets`` / ``assets_b``)."""
    from xlora.demo.base_model import load_demo

    model, tokenizer = load_demo(assets, base_dir)
    model_b = load_demo(assets_b, base_dir)[0] if assets_b is not None else None
    dialogue = converse(model, tokenizer, topic, turns, agent_a or AGENT_A, agent_b or AGENT_B, max_new_tokens,
                        max_context, model_b, repetition_penalty)
    paths = write_dialogue(dialogue, out_dir)
    for t in dialogue.turns:
        mix = ", ".join(f"{k} {v:.2f}" for k, v in t.mean_scalings.items())
        print(f"[{t.agent} {t.index + 1}] ({t.dominant or 'no expert'}; {mix}) {t.text}")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
