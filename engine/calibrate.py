"""`helios calibrate`: train exit heads and agreement predictors on the frozen backbone.

1. The model writes its own training text: greedy continuations of code and chat prompts
   (engine.prompts; or a user file), full depth, exits off.
2. One forward pass over that text records hidden states at every exit layer and the final
   layer; the final layer's distribution is the teacher (self-distillation).
3. Heads: linear heads start from a closed-form ridge fit (exit state -> final state, a "tuned
   lens"), then every head is tuned by KL to the teacher over the teacher's top candidates.
4. Predictors learn P(head's top token == teacher's top token) from the hidden state alone.
5. On-policy round: the model writes the text again with its new exits on, as it will when
   serving (a text leaves the full model's path at its first disagreement); the full model's
   picks on that text are the labels, and the predictors are trained again on both rounds.
6. One threshold for every exit layer, the lowest that keeps the target agreement in every
   domain on held-out prompts (engine.thresholds), written with the per-domain report.
An exit vocabulary (the text's most frequent tokens, engine.exits) is fixed before the heads are
scored: agreement is then the head's top token among those, and the margin its check requires is
chosen together with the threshold.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from engine.config import SamplingParams
from engine.engine import LLMEngine
from engine.exits import ExitBank, build_vocab, rms_norm
from engine.prompts import calibration_prompts
from engine.thresholds import CalibrationReport, build_report, choose_rule, halves


class CalibrationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field("smollm2", description="Model name or checkpoint directory.")
    head_type: str = Field("linear", description="'linear' (residual adapter) or 'mlp'.")
    layers: list[int] | None = Field(None, description="Exit layers; default every 2nd layer from 2 to L-1.")
    domains: list[Literal["code", "chat"]] = Field(["code", "chat"], min_length=1,
                                                   description="Prompt sets to train on (engine.prompts).")
    num_prompts: int = Field(64, ge=2, description="Prompts per domain to generate training text from.")
    rounds: int = Field(2, ge=1, le=2, description="2 adds the on-policy round (text written with exits on).")
    max_new_tokens: int = Field(64, ge=2, description="Tokens generated per prompt.")
    samples: int = Field(1, ge=1, le=8, description="Replies per prompt: the greedy one and samples-1 sampled at "
                         "`sample_temperature` (top-p 0.95): more distinct contexts than the prompt sets hold.")
    sample_temperature: float = Field(0.8, gt=0.0, le=2.0, description="Temperature of the sampled replies.")
    steps: int = Field(200, ge=0, description="KL tuning steps for the heads.")
    predictor_steps: int = Field(400, ge=1, description="Training steps for the agreement predictors.")
    target: float = Field(0.95, gt=0.5, lt=1.0, description="Agreement with the full model to keep.")
    vocab_size: int = Field(2048, ge=0, description="Exit vocabulary: the tokens exits may emit, the most frequent "
                            "in the calibration text (engine.exits); 0 for the full vocabulary.")
    holdout: float = Field(0.25, gt=0.0, lt=1.0, description="Share of prompts held out for thresholds.")
    text_file: str | None = Field(None, description="Prompts file (one per line) instead of the domains.")
    device: str = "cpu"
    seed: int = 0
    home: Path | None = None


@dataclass
class Features:
    hidden: dict[int, torch.Tensor]  # exit layer -> [N, hidden]
    final: torch.Tensor  # [N, hidden] last layer's output (before the final norm)
    group: torch.Tensor  # [N] prompt index, for a split by prompt
    generated: torch.Tensor  # [N] True where the next token is one the model generated
    domain: torch.Tensor = field(default=None)  # [N] index into the calibration's domains
    on_policy: torch.Tensor = field(default=None)  # [N] True for text written with exits on
    teacher: torch.Tensor = field(default=None)  # [N] full model's top token

    def select(self, idx: torch.Tensor) -> "Features":
        return Features(**{f.name: ({l: v[idx] for l, v in x.items()} if isinstance(x, dict) else
                                    None if x is None else x[idx])
                           for f in fields(self) for x in [getattr(self, f.name)]})

    @staticmethod
    def cat(parts: list["Features"]) -> "Features":
        return Features(**{f.name: ({l: torch.cat([getattr(p, f.name)[l] for p in parts]) for l in parts[0].hidden}
                                    if f.name == "hidden" else torch.cat([getattr(p, f.name) for p in parts]))
                           for f in fields(Features)})


def load_prompts(cfg: CalibrationConfig, tokenizer) -> tuple[list[str], list[str], list[int]]:
    """(domain names, prompts, each prompt's domain index): `num_prompts` per domain, shuffled."""
    if cfg.text_file:
        path = Path(cfg.text_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompt file not found: {path}")
        sets = {"file": [line.strip() for line in path.read_text().splitlines() if line.strip()]}
    else:
        sets = {d: calibration_prompts(d, tokenizer) for d in cfg.domains}
    prompts, domain = [], []
    for i, texts in enumerate(sets.values()):
        texts = list(texts)
        random.Random(cfg.seed).shuffle(texts)
        prompts += texts[: cfg.num_prompts]
        domain += [i] * len(texts[: cfg.num_prompts])
    return list(sets), prompts, domain


@torch.inference_mode()
def collect(engine: LLMEngine, sequences: list[tuple[list[int], list[int]]], layers: list[int],
            batch_size: int, domain: list[int], on_policy: bool = False,
            prompt_of: list[int] | None = None) -> Features:
    """Hidden states at exit layers for every position; prompt positions are distillation data too.
    `prompt_of`: each sequence's prompt (default: its own), the group splits keep together; a
    prompt's own positions are recorded once, with its first reply."""
    model = engine.model
    prompt_of = prompt_of or list(range(len(sequences)))
    hidden = {l: [] for l in layers}
    finals, groups, generated, seen = [], [], [], set()
    for start in tqdm(range(0, len(sequences), batch_size), desc="recording hidden states"):
        batch = sequences[start:start + batch_size]
        toks = [p + o[:-1] for p, o in batch]
        t = max(map(len, toks))
        ids = torch.tensor([x + [0] * (t - len(x)) for x in toks], device=model.device)
        slots = torch.arange(len(batch), device=model.device)
        ctx = model.make_ctx(slots, torch.arange(t, device=model.device).expand(len(batch), t))
        mask = torch.zeros(len(batch), t, dtype=torch.bool)
        gen = torch.zeros(len(batch), t, dtype=torch.bool)
        for r, (p, o) in enumerate(batch):
            g = prompt_of[start + r]
            mask[r, 0 if g not in seen else len(p) - 1: len(p) - 1 + len(o)] = True
            gen[r, len(p) - 1: len(p) - 1 + len(o)] = True
            seen.add(g)
        h = model.embed_tokens(ids)
        if 0 in hidden:
            hidden[0].append(h[mask].float().cpu())
        for i in range(model.depth):
            h = model.layer_forward(i, h, ctx)
            if i + 1 in hidden:
                hidden[i + 1].append(h[mask].float().cpu())
        finals.append(h[mask].float().cpu())
        groups.append(torch.cat([torch.full((int(mask[r].sum()),), prompt_of[start + r]) for r in range(len(batch))]))
        generated.append(gen[mask])
    groups = torch.cat(groups)
    return Features({l: torch.cat(v) for l, v in hidden.items()}, torch.cat(finals), groups, torch.cat(generated),
                    torch.tensor(domain)[groups], torch.full((len(groups),), on_policy))


def _lm(engine: LLMEngine):
    w = engine.model.lm_head_weight.detach().float().cpu()
    norm = engine.model.norm.float().cpu()
    return w, norm


def _head_logits(head, h: torch.Tensor, lm) -> torch.Tensor:
    """An exit head's full-vocabulary logits: adapter, then the model's own final norm and LM head."""
    w, norm = lm
    return norm(head(h)) @ w.T


def _snapshot(module) -> dict[str, torch.Tensor]:
    return {n: v.clone() for n, v in module.state_dict().items()}


def _agreement(bank: ExitBank, feats: Features, idx: torch.Tensor, lm) -> dict[int, float]:
    with torch.no_grad():
        return {l: float((_head_logits(p.head, feats.hidden[l][idx], lm).argmax(-1) == feats.teacher[idx]).float().mean())
                for l, p in bank.points.items()}


def ridge_init(bank: ExitBank, feats: Features, fit: torch.Tensor, val: torch.Tensor, lm,
               alphas=(0.01, 0.1, 1.0)) -> None:
    """Closed-form M minimising |rms(h_l) M^T - rms(h_L)|^2 + lam |M - I|^2 (head = h + (M - I) h),
    with lam = alpha * N picked per layer on validation tokens."""
    y = rms_norm(feats.final[fit])
    best = {l: (-1.0, None) for l in bank.points}
    for alpha in tqdm(alphas, desc="ridge init"):
        for l, p in bank.points.items():
            x = rms_norm(feats.hidden[l][fit])
            eye = torch.eye(x.shape[1])
            lam = alpha * len(fit)
            m_t = torch.linalg.solve(x.T @ x + lam * eye, x.T @ y + lam * eye)
            p.head.proj.weight.data.copy_(m_t.T - eye)
        for l, a in _agreement(bank, feats, val, lm).items():
            if a > best[l][0]:
                best[l] = (a, bank.points[l].head.proj.weight.data.clone())
    for l, (_, weight) in best.items():
        bank.points[l].head.proj.weight.data.copy_(weight)


def kl_tune(bank: ExitBank, feats: Features, fit: torch.Tensor, val: torch.Tensor, lm, steps: int, k: int = 32,
            batch: int = 256, lr: float = 5e-4) -> list[float]:
    """KL(teacher || head) over the union of the batch's teacher top-k tokens; each head keeps
    whichever of its states (before tuning, or at a checkpoint) agrees best on validation tokens."""
    w, norm = lm
    params = [q for p in bank.points.values() for q in p.head.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    best = {l: (a, _snapshot(bank.points[l].head)) for l, a in _agreement(bank, feats, val, lm).items()}
    losses = []
    gen = torch.Generator().manual_seed(0)
    for step in tqdm(range(steps), desc="tuning exit heads"):
        idx = fit[torch.randint(len(fit), (batch,), generator=gen)]
        with torch.no_grad():
            t_full = norm(feats.final[idx]) @ w.T
            cols = t_full.topk(k, -1).indices.unique()
            t_logp = F.log_softmax(t_full[:, cols], -1)
        wc = w[cols]
        loss = 0.0
        for l, p in bank.points.items():
            s = F.log_softmax(norm(p.head(feats.hidden[l][idx])) @ wc.T, -1)
            loss = loss + F.kl_div(s, t_logp, log_target=True, reduction="batchmean")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item() / len(bank.points))
        if (step + 1) % 50 == 0 or step + 1 == steps:
            for l, a in _agreement(bank, feats, val, lm).items():
                if a > best[l][0]:
                    best[l] = (a, _snapshot(bank.points[l].head))
    for l, (_, state) in best.items():
        bank.points[l].head.load_state_dict(state)
    return losses


@dataclass
class Outcomes:
    """Per exit layer, for the scored tokens (others stay False/0)."""
    agree: dict  # the head's top token (in the exit vocabulary, if the bank has one) is the teacher's
    maxprob: dict  # the head's max probability over the full vocabulary (the reference rule)
    margin: dict  # logit gap between the head's top two tokens (in the exit vocabulary)


@torch.no_grad()
def head_outcomes(bank: ExitBank, feats: Features, idx: torch.Tensor, lm, chunk: int = 512) -> Outcomes:
    n = len(feats.final)
    out = Outcomes({}, {}, {})
    for l, p in tqdm(bank.points.items(), desc="scoring heads"):
        out.agree[l], out.maxprob[l], out.margin[l] = torch.zeros(n, dtype=torch.bool), torch.zeros(n), torch.zeros(n)
        for part in idx.split(chunk):
            logits = _head_logits(p.head, feats.hidden[l][part], lm)
            out.maxprob[l][part] = torch.softmax(logits, -1).amax(-1)
            if bank.vocab is not None:
                logits = logits[:, bank.vocab]
            top = logits.topk(2, -1)
            pick = top.indices[:, 0] if bank.vocab is None else bank.vocab[top.indices[:, 0]]
            out.agree[l][part] = pick == feats.teacher[part]
            out.margin[l][part] = top.values[:, 0] - top.values[:, 1]
    return out


def train_predictors(bank: ExitBank, feats: Features, agree: dict, fit: torch.Tensor, val: torch.Tensor,
                     steps: int, batch: int = 512, lr: float = 2e-3) -> None:
    """BCE on agreement labels of tokens the heads were not trained on, early-stopped per layer on
    prompts of their own (stopping on the training prompts' other tokens rewards over-fitting them)."""
    params = [q for p in bank.points.values() for q in p.predictor.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=5e-2)
    gen = torch.Generator().manual_seed(1)
    best = {l: (float("inf"), None) for l in bank.points}

    def bce(p, l, idx):
        logit = p.predictor.logit(feats.hidden[l][idx], feats.hidden[bank.previous(l)][idx])
        return F.binary_cross_entropy_with_logits(logit, agree[l][idx].float())
    for step in tqdm(range(steps), desc="training agreement predictors"):
        idx = fit[torch.randint(len(fit), (batch,), generator=gen)]
        loss = sum(bce(p, l, idx) for l, p in bank.points.items())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 20 == 0:
            with torch.no_grad():
                for l, p in bank.points.items():
                    v = float(bce(p, l, val))
                    if v < best[l][0]:
                        best[l] = (v, _snapshot(p.predictor))
    for l, (_, state) in best.items():
        if state is not None:
            bank.points[l].predictor.load_state_dict(state)


def split_by_prompt(feats: Features, prompt_domain: list[int], holdout: float, seed: int) -> dict[str, torch.Tensor]:
    """Disjoint prompt sets, each domain split alike: heads fit on one, predictors on another,
    thresholds tuned and measured on held-out prompts (generated positions only, and on-policy
    ones where there are: what serving sees)."""
    rng = random.Random(seed + 1)
    held, heads, val = set(), set(), set()
    for d in sorted(set(prompt_domain)):
        order = [i for i, x in enumerate(prompt_domain) if x == d]
        rng.shuffle(order)
        n_held = max(2, int(len(order) * holdout))
        held |= set(order[:n_held])
        rest = order[n_held:]
        heads |= set(rest[: len(rest) // 2])
        preds = rest[len(rest) // 2:]
        val |= set(preds[: max(1, len(preds) // 4)])
    g = feats.group.tolist()
    in_held, in_heads, in_val = (torch.tensor([x in part for x in g]) for part in (held, heads, val))
    served = feats.generated & (feats.on_policy if bool(feats.on_policy.any()) else True)
    gen = torch.Generator().manual_seed(seed)

    def shuffled(mask):
        idx = mask.nonzero().squeeze(1)
        return idx[torch.randperm(len(idx), generator=gen)]
    return {"heads": shuffled(in_heads & ~feats.on_policy), "val": shuffled(in_val)[:1024],
            "predictors": shuffled(~in_held & ~in_heads & ~in_val), "held": (in_held & served).nonzero().squeeze(1)}


def _write_text(engine: LLMEngine, ids: list[list[int]], cfg: CalibrationConfig, bank: ExitBank | None,
                seed: int | None = None):
    """Each prompt's continuation, greedy (or sampled from `seed` on, one seed per prompt): at full
    depth, or served through `bank`'s exits."""
    params = SamplingParams(max_tokens=cfg.max_new_tokens) if seed is None else [
        SamplingParams(max_tokens=cfg.max_new_tokens, temperature=cfg.sample_temperature, top_p=0.95, seed=seed + i)
        for i in range(len(ids))]
    engine.use_exits(bank)
    try:
        results = engine.generate(ids, params, progress=True)
    finally:
        engine.use_exits(None)
    return [(p, r.token_ids) for p, r in zip(ids, results)]


def _confidence(bank: ExitBank, feats: Features, idx: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
    with torch.no_grad():
        def part(x):
            return x if idx is None else x[idx]
        return {l: p.predictor(part(feats.hidden[l]), part(feats.hidden[bank.previous(l)]))
                for l, p in bank.points.items()}


def _label(feats: Features, lm) -> None:
    with torch.no_grad():
        feats.teacher = torch.cat([(lm[1](f) @ lm[0].T).argmax(-1) for f in feats.final.split(512)])


def calibrate(cfg: CalibrationConfig) -> CalibrationReport:
    torch.manual_seed(cfg.seed)
    engine = LLMEngine(model=cfg.model, exits=False, device=cfg.device, home=cfg.home, max_batch_size=16,
                       max_model_len=4096)
    domains, prompts, prompt_domain = load_prompts(cfg, engine.tokenizer)
    num_layers = engine.num_layers
    layers = cfg.layers or list(range(2, num_layers, 2))
    if any(not 1 <= l < num_layers for l in layers):
        raise ValueError(f"exit layers must lie in 1..{num_layers - 1}")
    ids = [engine.tokenizer(p)["input_ids"][-(4096 - cfg.max_new_tokens):] for p in prompts]
    text = _write_text(engine, ids, cfg, None)
    for k in range(1, cfg.samples):
        text += _write_text(engine, ids, cfg, None, seed=cfg.seed + k * len(ids))
    feats = collect(engine, text, [0] + layers, 8, prompt_domain, prompt_of=[i % len(ids) for i in range(len(text))])
    lm = _lm(engine)
    _label(feats, lm)

    split = split_by_prompt(feats, prompt_domain, cfg.holdout, cfg.seed)
    bank = ExitBank.new(cfg.head_type, layers, engine.model.hidden_size)
    if cfg.vocab_size:
        bank.vocab = build_vocab([p + o for p, o in text], cfg.vocab_size, lm[0].shape[0])
    if cfg.head_type == "linear":
        ridge_init(bank, feats, split["heads"], split["val"], lm)
    losses = kl_tune(bank, feats, split["heads"], split["val"], lm, cfg.steps)
    scored = torch.cat([split["predictors"], split["val"], split["held"]])
    scores = head_outcomes(bank, feats, scored, lm)
    train_predictors(bank, feats, scores.agree, split["predictors"], split["val"], cfg.predictor_steps)
    if cfg.rounds == 2:  # the text the exits will really see: written with them on
        tune, _ = halves(feats, split["held"])
        bank.margin, t = choose_rule(_confidence(bank, feats, tune), {l: a[tune] for l, a in scores.agree.items()},
                                     {l: m[tune] for l, m in scores.margin.items()}, feats.domain[tune], cfg.target,
                                     num_layers, bank.vocab is not None)
        bank.set_thresholds({l: t for l in layers})
        served = collect(engine, _write_text(engine, ids, cfg, bank), [0] + layers, 8, prompt_domain,
                         on_policy=True)
        served = served.select(served.generated.nonzero().squeeze(1))
        _label(served, lm)
        feats = Features.cat([feats, served])
        split = split_by_prompt(feats, prompt_domain, cfg.holdout, cfg.seed)
        scored = torch.cat([split["predictors"], split["val"], split["held"]])
        scores = head_outcomes(bank, feats, scored, lm)
        train_predictors(bank, feats, scores.agree, split["predictors"], split["val"], cfg.predictor_steps)
    report = build_report(engine, bank, scores, _confidence(bank, feats), feats, split["held"], domains, cfg, losses)
    bank.meta = {"num_layers": num_layers, "target": cfg.target, **report.summary}
    bank.save(engine.store.exits_dir)
    report.write(engine.store.exits_dir)
    return report
