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
    """The first `n` HumanEval prompts: the ones calibration never trains on."""
    from engine.prompts import HELD_OUT_CODE, humaneval

    if n > HELD_OUT_CODE:
        raise ValueError(f"at most {HELD_OUT_CODE} HumanEval prompts are held out from calibration; got {n}")
    return humaneval(0, n)


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


@torch.no_grad()
def token_agreement(model, tokenizer, prompts: list[str], outputs: list[list[int]]) -> float:
    """Share of generated tokens the full-depth model picks too, given the same prefix.

    Position-wise agreement punishes one early disagreement with every later position (the two
    continuations drift apart); this is the per-token rate that exit thresholds are tuned for.
    """
    same = total = 0
    device = next(model.parameters()).device
    for prompt, out in zip(prompts, outputs):
        if not out:
            continue
        ids = tokenizer(prompt)["input_ids"]
        seq = torch.tensor([ids + out[:-1]], device=device)
        picks = model(seq).logits[0, len(ids) - 1:].argmax(-1).tolist()
        same += sum(a == b for a, b in zip(picks, out))
        total += len(out)
    return same / max(total, 1)


def md_table(cols: list[str], rows: list[list]) -> list[str]:
    """A Markdown table, floats to three significant figures."""
    cell = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)] + [
        "| " + " | ".join(cell(v) for v in r) + " |" for r in rows]


def write(name: str, rows: list[dict], header: str, plot, out: Path = RESULTS) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(rows, indent=2))
    lines = [header, ""] + md_table(list(rows[0]), [list(r.values()) for r in rows])
    (out / f"{name}.md").write_text("\n".join(lines) + f"\n\n![{name}]({name}.png)\n")
    plot(out / f"{name}.png")
    return out / f"{name}.md"


class EnergyMeter:
    """Joules drawn by the GPU (NVML) or the CPU package (RAPL), or None where neither can be read."""

    def __init__(self, device: str):
        self._read = self._nvml() if device.startswith("cuda") else self._rapl()

    def _nvml(self):
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
            return lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1e3  # mJ -> J
        except Exception:  # no pynvml, or a driver without energy counters
            return None

    def _rapl(self):
        paths = sorted(Path("/sys/class/powercap").glob("intel-rapl:[0-9]*/energy_uj"))
        try:
            [int(p.read_text()) for p in paths]
        except OSError:
            return None
        return (lambda: sum(int(p.read_text()) for p in paths) / 1e6) if paths else None

    def __enter__(self):
        self.start, self.joules = (self._read() if self._read else None), None
        return self

    def __exit__(self, *exc):
        if self.start is not None:
            self.joules = self._read() - self.start


def rouge_l(candidate: list, reference: list) -> float:
    """ROUGE-L F1 over token sequences (longest common subsequence)."""
    if not candidate or not reference:
        return 0.0
    prev = [0] * (len(reference) + 1)
    for x in candidate:
        cur = [0]
        for j, y in enumerate(reference):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(candidate), lcs / len(reference)
    return 2 * p * r / (p + r)
