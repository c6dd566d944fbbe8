"""Goal-driven unlearning with `params: {}` (issue 12's case), beside `unlearn_bench`'s tuned runs.

    python -m bench.unlearn_bench --part goal [--quick]     # or: python -m bench.unlearn_goal_bench [--quick]

(c) Classifier — a `ViTForImageClassification` (image 8, one channel, patch 4, hidden 64, 2 layers) trained by
the bench on scikit-learn's digits (stratified 70/30 train/test; AdamW 3e-3, cosine, weight decay 0.01, 60
epochs of batch 64 — 98 % test accuracy), asked to forget every training "3" with `params: {}` (only the seed
set), into new weights and into a fresh LoRA (the job's default: r 8, alpha 32, all-linear). The reference
retrains from scratch on the retain rows with the same recipe. Columns: the goal met on how many seeds, UA
(100 − forget accuracy), RA and its change from the original, TA (all test rows, the 3s included), MIA, Avg.Gap
to the retrained model, CPU time as a fraction of retrain's (the method's whole run: masks, range test and
goal checks included; the before/after reports excluded), optimiser steps (range test included), and the
probes (new weights only): the forgotten classes' accuracy after int4 quantization and after relearning 10
steps on a tenth of the 3s — and whether that brings the forgetting back past the goal (`robust`).

(d) Language model — `unlearn_bench`'s tiny Llama on invented people (TOFU-style single-answer QA), 10 % of the
people forgotten, 10 % more held out (the eval rows the goal compares with). Every method with `params: {}`
except `rmu`, told which layer to steer (the tiny model has two; its default, layer 1, is read after the final
norm). Columns: goal met, forget / retain / held-out answer accuracy (token-level), retain accuracy change,
TOFU forget quality (KS p-value vs the retrained model's truth ratios), model utility, MUSE PrivLeak (vs the
retrained model), CPU time as a fraction of retrain's, steps, probes.

Targets (issue 12): with defaults, at least four classifier methods meet the class-wise goal with RA within 2
points of the original, each under 25 % of retrain's time (for each output); at least two language-model
methods meet the goal with retain accuracy within 5 points.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from typing import Any

import torch
from torch import nn

from workers.engines.unlearn import ClassifierData, unlearn
from workers.engines.unlearn.engine import measure
from workers.engines.unlearn.metrics import classifier_report
from workers.engines.unlearn.protocol import compare, unlearn_job
from workers.engines.unlearn.standard_metrics import avg_gap

CLASSIFIER_METHODS = [
    "sfron",
    "salun",
    "l1_sparse",
    "finetune",
    "random_label",
    "grad_ascent",
    "ssd",
    "natmu",
    "mu_mis",
    "muso",
]
LM_METHODS: dict[str, dict[str, Any]] = {
    "grad_ascent": {},
    "grad_diff": {},
    "npo": {},
    "simnpo": {},
    "idk": {},
    "flat": {},
    "rmu": {"layer": 0, "trained_layers": [0]},
}
TIME_TARGET = 0.25
FORGET_CLASS = 3


def say(*parts: Any) -> None:
    print(*parts, flush=True)


class Cells:
    """Values per column over seeds; `cell` prints mean (± std when there are several)."""

    def __init__(self) -> None:
        self.values: dict[str, list[Any]] = {}

    def add(self, **values: Any) -> None:
        for key, value in values.items():
            self.values.setdefault(key, []).append(value)

    def mean(self, key: str) -> float:
        numbers = [float(v) for v in self.values.get(key, []) if v is not None]
        return statistics.fmean(numbers) if numbers else float("nan")

    def cell(self, key: str, digits: int = 1) -> str:
        numbers = [float(v) for v in self.values.get(key, []) if v is not None]
        if not numbers:
            return "-"
        text = f"{statistics.fmean(numbers):.{digits}f}"
        return text + (f"±{statistics.pstdev(numbers):.{digits}f}" if len(numbers) > 1 else "")

    def count(self, key: str) -> str:
        flags = self.values.get(key, [])
        return f"{sum(1 for f in flags if f)}/{len(flags)}"

    def flags(self, key: str) -> str:
        flags = self.values.get(key, [])
        return "/".join("-" if f is None else ("yes" if f else "NO") for f in flags) or "-"


# -- (c) classifier --------------------------------------------------------------------------------------------


def vit(seed: int) -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=1,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        num_labels=10,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return ViTForImageClassification(config)


def digits_images() -> tuple[ClassifierData, ClassifierData]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    train, test = train_test_split(list(range(len(y))), test_size=0.3, stratify=y, random_state=0)
    pixels = (torch.tensor(x / 16.0, dtype=torch.float32).view(-1, 1, 8, 8) - 0.5) / 0.5
    labels = torch.tensor(y, dtype=torch.long)
    return (
        ClassifierData({"pixel_values": pixels[train]}, labels[train]),
        ClassifierData({"pixel_values": pixels[test]}, labels[test]),
    )


def recipe(rows: int, seed: int) -> dict[str, Any]:
    """The training recipe, also the retrain reference's: 60 epochs of batch 64."""
    steps = 60 * -(-rows // 64)
    return {"lr": 3e-3, "steps": steps, "batch_size": 64, "weight_decay": 0.01, "lr_schedule": "cosine", "seed": seed}


def fresh_lora(model: nn.Module) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))


def classifier_goal(quick: bool) -> dict[str, bool]:
    train, test = digits_images()
    forget = train.subset((train.labels == FORGET_CLASS).nonzero().squeeze(1))
    retain = train.subset((train.labels != FORGET_CLASS).nonzero().squeeze(1))
    seeds = [0] if quick else [0, 1, 2]
    methods = CLASSIFIER_METHODS[:5] if quick else CLASSIFIER_METHODS
    cpu = torch.device("cpu")
    say(
        f"\n== (c) goal-driven, params {{}}: ViT (image 8, patch 4, hidden 64, 2 layers) on digits; forget every "
        f"training '{FORGET_CLASS}' ({len(forget)} rows), retain {len(retain)}, test {len(test)}; seeds {seeds}"
    )
    rows: dict[tuple[str, str], Cells] = {}
    for seed in seeds:
        original = vit(seed)
        unlearn(original, "classifier", "retrain", recipe(len(train), seed), None, train)
        retrained = vit(seed + 1000)
        out = unlearn(retrained, "classifier", "retrain", recipe(len(retain), seed), None, retain)
        retrain_cpu = out.report["method_cpu_seconds"]
        reference = classifier_report(retrained, forget, retain, test, cpu, seed)
        start = classifier_report(original, forget, retain, test, cpu, seed)
        rows.setdefault(("retrain", "-"), Cells()).add(**reference, gap=0.0, time=1.0, cpu=retrain_cpu)
        rows.setdefault(("(original)", "-"), Cells()).add(**start, gap=avg_gap(start, reference)["avg_gap"])
        for method in methods:
            for output in ("weights", "lora"):
                if method == "ssd" and output == "lora":
                    continue  # refused at submission: ssd scales weights down, and a fresh LoRA's update is zero
                model = copy.deepcopy(original)
                if output == "lora":
                    model = fresh_lora(model)
                probes = ["quantize", "relearn"] if output == "weights" else []
                out = unlearn_job(
                    model, "classifier", method, {"seed": seed}, forget, retain, test, probes=probes, seeds=[seed]
                )
                report = out.report
                after = report["after"]
                cells = rows.setdefault((method, output), Cells())
                cells.add(
                    **{k: after[k] for k in ("UA", "RA", "TA", "MIA")},
                    met=report["goal_met"],
                    dra=after["RA"] - start["RA"],
                    gap=avg_gap(after, reference)["avg_gap"],
                    time=report["method_cpu_seconds"] / retrain_cpu,
                    steps=report["loop"].get("total_steps", 0),
                    reason=report["goal"]["reason"],
                )
                if probes:
                    quantized = report["probes"]["quantize"]["int4"]
                    relearned = report["probes"]["relearn"]
                    cells.add(
                        q4=quantized["goal"]["values"]["forget_accuracy"],
                        q4_robust=quantized["robust"],
                        relearn=relearned["after"]["values"]["forget_accuracy"],
                        relearn_robust=relearned["robust"],
                    )
    say(
        f"  {'method':12s} {'output':7s} {'goal':>5s} {'UA':>10s} {'RA':>10s} {'ΔRA':>9s} {'TA':>10s} {'MIA':>10s} "
        f"{'Avg.Gap':>10s} {'time':>11s} {'steps':>7s}  {'int4: 3s acc':>12s} {'relearn: 3s acc':>15s}"
    )
    for (method, output), c in rows.items():
        say(
            f"  {method:12s} {output:7s} {c.count('met') if 'met' in c.values else '':>5s} {c.cell('UA'):>10s} "
            f"{c.cell('RA'):>10s} {c.cell('dra'):>9s} {c.cell('TA'):>10s} {c.cell('MIA'):>10s} {c.cell('gap', 2):>10s} "
            f"{c.cell('time', 3):>11s} {c.cell('steps', 0):>7s}  "
            f"{c.cell('q4') + ' ' + c.flags('q4_robust') if 'q4' in c.values else '':>12s} "
            f"{c.cell('relearn') + ' ' + c.flags('relearn_robust') if 'relearn' in c.values else '':>15s}"
        )
    say(f"  retrain CPU time: {rows[('retrain', '-')].cell('cpu', 2)} s; robust flags per seed (NO: came back)")
    for (method, output), c in rows.items():
        for reason in {r for r in c.values.get("reason", []) if r}:
            say(f"  not met — {method}/{output}: {reason}")
    verdicts = {}
    for output in ("weights", "lora"):
        winners = [
            m
            for m in methods
            if all(rows[(m, output)].values["met"])
            and rows[(m, output)].mean("dra") >= -2.0
            and rows[(m, output)].mean("time") < TIME_TARGET
        ]
        say(f"  {output}: goal met on every seed, RA within 2, under 25% of retrain's time: {winners or 'none'}")
        verdicts[f"classifier ({output}): ≥ 4 methods meet the class-wise goal, RA within 2, time < 25%"] = (
            len(winners) >= 4
        )
    return verdicts


# -- (d) language model ----------------------------------------------------------------------------------------


def lm_goal(quick: bool) -> dict[str, bool]:
    from bench.unlearn_bench import LM_TRAIN, lm_world, tiny_llama

    n_people, train_steps, tokenizer, data, train_rows = lm_world(quick)
    say(
        f"\n== (d) goal-driven, params {{}}: 2-layer Llama hidden 128; {n_people} people: {len(data['forget'])} forget "
        f"rows, {len(data['retain'])} retain rows, {len(data['holdout'])} held-out (eval) rows"
    )
    original = tiny_llama(len(tokenizer), 0)
    settings = {**LM_TRAIN, "steps": train_steps, "reinitialize": False}
    unlearn(original, "causal_lm", "retrain", settings, None, train_rows, tokenizer=tokenizer)
    retrained = tiny_llama(len(tokenizer), 1)
    reference = unlearn(
        retrained,
        "causal_lm",
        "retrain",
        settings,
        data["forget"],
        data["retain"],
        data["holdout"],
        tokenizer=tokenizer,
    )
    retrain_cpu = reference.report["method_cpu_seconds"]
    cpu = torch.device("cpu")
    start, _ = measure(original, "causal_lm", data["forget"], data["retain"], data["holdout"], cpu, 0)
    table: dict[str, dict[str, Any]] = {"(original)": {"after": start}, "retrain": {"after": reference.report["after"]}}
    for method, params in LM_METHODS.items():
        model = copy.deepcopy(original)
        out = unlearn_job(
            model,
            "causal_lm",
            method,
            params,
            data["forget"],
            data["retain"],
            data["holdout"],
            tokenizer=tokenizer,
            reference_model=None,
            probes=["quantize", "relearn"],
        )
        compare(out, reference, "causal_lm")
        table[method] = out.report
    say(
        f"  {'method':12s} {'goal':>5s} {'forget acc':>10s} {'retain acc':>10s} {'Δretain':>8s} {'held acc':>8s} "
        f"{'FQ':>8s} {'MU':>6s} {'PrivLeak':>9s} {'time':>6s} {'steps':>5s}  "
        f"{'int4 robust':>11s} {'relearn robust':>14s}"
    )
    base = start["retain_token_exact_match"]
    winners = []
    for method, report in table.items():
        a = report["after"]
        measured = method not in ("(original)", "retrain")
        met = report.get("goal_met")
        drop = a["retain_token_exact_match"] - base
        if measured and met and drop >= -5.0:
            winners.append(method)
        probes = report.get("probes", {})
        say(
            f"  {method:12s} {('yes' if met else 'no') if measured else '':>5s} {a['forget_token_exact_match']:10.1f} "
            f"{a['retain_token_exact_match']:10.1f} {drop:8.1f} {a['holdout_token_exact_match']:8.1f} "
            f"{a.get('forget_quality', float('nan')):8.2g} {a.get('model_utility', float('nan')):6.3f} "
            f"{a.get('privleak', float('nan')):9.1f} "
            f"{report['method_cpu_seconds'] / retrain_cpu if measured else 1.0:6.3f} "
            f"{report['loop'].get('total_steps', 0) if measured else 0:5d}  "
            f"{str(probes.get('quantize', {}).get('int4', {}).get('robust', '-')):>11s} "
            f"{str(probes.get('relearn', {}).get('robust', '-')):>14s}"
        )
        if measured and not met:
            say(f"      not met: {report['goal']['reason']}")
    say(f"  retrain CPU time {retrain_cpu:.1f} s; FQ/PrivLeak of the methods are measured against the retrained model")
    say(f"  goal met with retain accuracy within 5 points: {winners or 'none'}")
    return {"LM: ≥ 2 methods meet the goal with retain accuracy within 5 points": len(winners) >= 2}


def goal_bench(quick: bool) -> dict[str, bool]:
    return {**classifier_goal(quick), **lm_goal(quick)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one seed, the five issue methods, a smaller LM world")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    verdicts = goal_bench(args.quick)
    say(f"\n== issue 12 targets ({time.perf_counter() - started:.0f} s)")
    for target, met in verdicts.items():
        say(f"  [{'met' if met else 'MISSED'}] {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
