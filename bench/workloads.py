"""Benchmark workloads: HumanEval code prompts, chat prompts, and a drifting mixture of the two."""
from __future__ import annotations

from dataclasses import dataclass

from bench.common import humaneval_prompts
from engine.prompts import render_chat

# Everyday assistant questions, none of them in calibration's set (engine/prompts/chat.txt); rendered
# through the model's chat template when it has one.
CHAT_QUESTIONS = [
    "What is the capital of France?",
    "Give me three tips for sleeping better.",
    "Explain photosynthesis to a ten-year-old.",
    "Write a short poem about the sea.",
    "How do I boil an egg?",
    "What are the benefits of regular exercise?",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "Suggest a name for a friendly robot.",
    "Why is the sky blue?",
    "How many continents are there, and what are they?",
    "What should I pack for a weekend hiking trip?",
    "Describe the taste of a lemon.",
    "What is the difference between weather and climate?",
    "Recommend a good habit to start this year.",
    "How does a rainbow form?",
    "Write a polite email declining a meeting invitation.",
]


@dataclass(frozen=True, slots=True)
class Request:
    prompt: str
    kind: str  # "code" or "chat"


def chat_prompts(n: int, tokenizer) -> list[str]:
    return [render_chat(tokenizer, CHAT_QUESTIONS[i % len(CHAT_QUESTIONS)]) for i in range(n)]


def workload(name: str, n: int, tokenizer) -> list[Request]:
    """`drift` moves from all code to all chat: the first third code, a mixed third, then chat."""
    if name == "humaneval":
        return [Request(p, "code") for p in humaneval_prompts(n)]
    if name == "chat":
        return [Request(p, "chat") for p in chat_prompts(n, tokenizer)]
    if name == "drift":
        code, chat = humaneval_prompts(n), chat_prompts(n, tokenizer)
        third = max(1, n // 3)
        mixed = [Request(code[i], "code") if i % 2 else Request(chat[i], "chat") for i in range(third, n - third)]
        return ([Request(p, "code") for p in code[:third]] + mixed
                + [Request(p, "chat") for p in chat[n - third:]])
    raise ValueError(f"unknown workload {name!r}: expected humaneval, chat or drift")
