"""Unlearning benchmark: every method against `retrain`, on CPU, in minutes, through the engine's entry point.

    python -m bench.unlearn_bench            # full: classifier (3 seeds) + language model, ≤ ~15 min
    python -m bench.unlearn_bench --quick    # smoke run: tiny grids, 1 seed, smaller LM world (~2 min);
                                             # its grids are too small to be held to the targets
    python -m bench.unlearn_bench --part classifier|lm|goal|continual
                                             # goal: goal-driven runs with params {} (bench/unlearn_goal_bench.py)
    python -m bench.unlearn_bench --part classifier --methods natmu,mu_mis,muso,sfron,salun
                                             # only these rows of the classifier tables (beside retrain)

(a) Classifier — sklearn digits (8×8), stratified 60/10/30 train/validation/test split, an MLP 64-256-256-10
trained by the bench (AdamW 1e-3, 30 epochs, batch 64, through the engine's `retrain`). Scenarios: class-wise
(forget every training "3"; TA and MIA use the test images of the other classes) and random 10%. Each
method's hyperparameters are chosen on two separate tuning seeds by the smallest mean Avg.Gap to those
seeds' retrained models measured with the *validation* split as the test set, among configurations whose
run time is under 20% of retrain's (a margin under the 25% target); the chosen configuration is then run
on 3 fresh seeds and reported on the test split. Run time is the method's own CPU time (1 thread; mask,
Fisher and importance passes included, evaluation excluded) as a fraction of retrain's.

(c) Continual learn-and-unlearn (`--part continual`) — the same digits MLP and recipe, first trained on every
training digit but the 9s; the job learns the training 9s while it forgets the training 3s (class-wise) — or a
seeded 10% of the other training rows (random) — and keeps the rest. Reference: the recipe retrained from
scratch on the final data (retain ∪ learn rows). Rows: `ug_clu`, and `finetune` on retain ∪ learn rows (plain
fine-tuning on the final data, the naive service's job), each tuned like (a) on the validation split by the
smallest mean gap among configurations under 20% of the retrain's time. Figures: UA, RA, TA (test rows of the
final classes: all but the 3s when they are forgotten), MIA (as (a)), LA (accuracy on the learn rows), NA (test
accuracy on the 9s, the learned class generalising), Avg.Gap = mean |Δ| to the retrained model over UA, RA, TA,
MIA and NA, time as a fraction of the retrain's CPU time.

(b) Language model — a 2-layer Llama (hidden 128) with a word-level tokenizer built in-process, trained on
invented people × attributes (TOFU-style single-answer QA); 10% of the people are forgotten, `retrain`
trains a fresh model on the rest, and 10% more people are held out (never trained). Every method runs
AdamW 1e-3 with the forget rows and as many retain rows per step, and stops early by a rule that needs no
retrained model: forget exact-match at or below the held-out people's (i.e. the model answers forgotten
people like people it never saw), checked every 5 steps, at most 150 steps. RMU alone gets lr 1e-2, set a
priori (its loss is an activation MSE); nothing else is tuned for the language model.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import product
from typing import Any

import torch
from torch import nn

from workers.engines.unlearn import ClassifierData, LMData, UnlearnCancelled, unlearn
from workers.engines.unlearn.metrics import classifier_report, lm_report

CLASSIFIER_METHODS = [
    "finetune",
    "grad_ascent",
    "grad_ascent+gu",
    "random_label",
    "salun",
    "ssd",
    "sfron",
    "l1_sparse",
    "natmu",
    "mu_mis",
    "muso",
]
METRICS = ("UA", "RA", "TA", "MIA")
TIME_BUDGET = 0.25  # of retrain's time
TUNE_TIME_BUDGET = 0.2  # a margin for timing noise when choosing configurations


def say(*parts: Any) -> None:
    print(*parts, flush=True)


# -- (a) classifier ----------------------------------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def digits_splits() -> dict[str, ClassifierData]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    index = list(range(len(y)))
    train_val, test = train_test_split(index, test_size=0.3, stratify=y, random_state=0)
    train, val = train_test_split(train_val, test_size=1 / 7, stratify=y[train_val], random_state=0)
    xs = torch.tensor(x / 16.0, dtype=torch.float32)
    ys = torch.tensor(y, dtype=torch.long)

    def part(rows: list[int]) -> ClassifierData:
        return ClassifierData({"inputs": xs[rows]}, ys[rows])

    return {"train": part(train), "val": part(val), "test": part(test)}


def epochs_to_steps(rows: int, epochs: int = 30, batch: int = 64) -> int:
    return epochs * -(-rows // batch)


def fit(data: ClassifierData, seed: int) -> tuple[MLP, float]:
    """The training recipe (also the retrain recipe): fresh init, AdamW 1e-3, 30 epochs of batch 64."""
    torch.manual_seed(seed)
    model = MLP()
    params = {"lr": 1e-3, "steps": epochs_to_steps(len(data)), "batch_size": 64, "seed": seed, "max_grad_norm": 100.0}
    out = unlearn(model, "classifier", "retrain", params, None, data)
    return model, out.report["method_cpu_seconds"]


@dataclass
class Scenario:
    name: str
    forget: ClassifierData
    retain: ClassifierData
    val: ClassifierData
    test: ClassifierData


def scenarios(splits: dict[str, ClassifierData], seed: int) -> list[Scenario]:
    train = splits["train"]
    labels = train.labels
    forget_class = 3
    out = []
    keep_val = (splits["val"].labels != forget_class).nonzero().squeeze(1)
    keep_test = (splits["test"].labels != forget_class).nonzero().squeeze(1)
    out.append(
        Scenario(
            "class-wise",
            train.subset((labels == forget_class).nonzero().squeeze(1)),
            train.subset((labels != forget_class).nonzero().squeeze(1)),
            splits["val"].subset(keep_val),
            splits["test"].subset(keep_test),
        )
    )
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(1000 + seed))
    n_forget = len(train) // 10
    out.append(
        Scenario(
            "random 10%",
            train.subset(sorted(order[:n_forget].tolist())),
            train.subset(sorted(order[n_forget:].tolist())),
            splits["val"],
            splits["test"],
        )
    )
    return out


def grid(method: str, quick: bool) -> list[dict[str, Any]]:
    base = {"batch_size": 64, "max_grad_norm": 100.0}
    table: dict[str, dict[str, list[Any]]] = {
        "finetune": {"lr": [1e-3, 1e-2], "steps": [30, 60, 100]},
        "grad_ascent": {"lr": [1e-4, 3e-4, 1e-3], "steps": [5, 10, 20]},
        "grad_ascent+gu": {"lr": [3e-4, 1e-3], "steps": [5, 10, 20], "gu": [True], "gu_retain_samples": [8]},
        "random_label": {"lr": [1e-4, 3e-4, 1e-3], "steps": [20, 50, 100]},
        "salun": {"lr": [1e-4, 3e-4, 1e-3], "steps": [20, 50, 100], "q": [0.5, 0.3]},
        "ssd": {
            "alpha": [2.0, 3.0, 5.0, 10.0, 30.0],
            "lambda": [1.0],
            "batch_size": [8],
            "importance_on": ["retain_and_forget", "retain"],
        },
        "sfron": {
            "lr": [0.01, 0.03],
            "steps": [40, 80],
            "k": [1, 3],
            "alpha0": [5.0, 25.0, 50.0],
            "optimizer": ["sgd"],
            "max_grad_norm": [7.0],
        },
        "l1_sparse": {"lr": [1e-3, 1e-2], "steps": [50, 100], "l1": [1e-5, 1e-4]},
        "natmu": {"lr": [1e-3, 3e-3], "steps": [20, 50, 100], "delta": [-0.19, 0.0]},
        "mu_mis": {"lr": [0.01, 0.05], "steps": [10, 30, 60], "optimizer": ["sgd"]},
        "muso": {"lr": [0.01, 0.05], "steps": [20, 60], "relabel_every": [10, 30], "optimizer": ["sgd"]},
    }
    options = table[method]
    if quick:
        options = {
            key: values[:2] if key in ("lr", "steps", "alpha", "k") else values[:1] for key, values in options.items()
        }
    keys = list(options)
    return [{**base, **dict(zip(keys, combo, strict=True))} for combo in product(*(options[k] for k in keys))]


def engine_method(method: str) -> str:
    return method.split("+")[0]


def run_classifier_method(
    method: str, params: dict[str, Any], original: nn.Module, scenario: Scenario, evaluation: ClassifierData, seed: int
) -> tuple[dict[str, float], float]:
    model = copy.deepcopy(original)
    out = unlearn(
        model, "classifier", engine_method(method), {**params, "seed": seed}, scenario.forget, scenario.retain, None
    )
    metrics = classifier_report(model, scenario.forget, scenario.retain, evaluation, torch.device("cpu"), seed)
    return metrics, out.report["method_cpu_seconds"]


def avg_gap(metrics: dict[str, float], reference: dict[str, float]) -> float:
    return statistics.fmean(abs(metrics[m] - reference[m]) for m in METRICS)


@dataclass
class Row:
    values: dict[str, list[float]] = field(default_factory=dict)

    def add(self, **values: float) -> None:
        for key, value in values.items():
            self.values.setdefault(key, []).append(value)

    def cell(self, key: str, digits: int = 2) -> str:
        values = self.values.get(key, [])
        if not values:
            return "-"
        mean = statistics.fmean(values)
        std = statistics.pstdev(values) if len(values) > 1 else 0.0
        return f"{mean:.{digits}f}±{std:.{digits}f}"

    def mean(self, key: str) -> float:
        return statistics.fmean(self.values[key])


def classifier_bench(quick: bool, methods: list[str] | None = None) -> dict[str, bool]:
    splits = digits_splits()
    tuning_seeds = [100] if quick else [100, 101]
    seeds = [0] if quick else [0, 1, 2]
    methods = methods or CLASSIFIER_METHODS
    say(
        f"\n== (a) classifier: digits MLP 64-256-256-10; train {len(splits['train'])}, "
        f"val {len(splits['val'])}, test {len(splits['test'])}; seeds {seeds}; tuning seeds {tuning_seeds}"
    )

    # tune on the tuning seeds, with the validation split standing in for the test set: the smallest mean
    # Avg.Gap among configurations whose mean time is within TUNE_TIME_BUDGET of retrain's
    scores: dict[tuple[str, str, int], list[tuple[float, float]]] = {}
    for tuning_seed in tuning_seeds:
        original, _ = fit(splits["train"], tuning_seed)
        for scenario in scenarios(splits, tuning_seed):
            retrained, retrain_seconds = fit(scenario.retain, tuning_seed)
            reference = classifier_report(
                retrained, scenario.forget, scenario.retain, scenario.val, torch.device("cpu"), tuning_seed
            )
            for method in methods:
                for number, params in enumerate(grid(method, quick)):
                    metrics, seconds = run_classifier_method(
                        method, params, original, scenario, scenario.val, tuning_seed
                    )
                    key = (scenario.name, method, number)
                    scores.setdefault(key, []).append((avg_gap(metrics, reference), seconds / retrain_seconds))
    chosen: dict[tuple[str, str], dict[str, Any]] = {}
    for name in ("class-wise", "random 10%"):
        for method in methods:
            configs = grid(method, quick)
            mean = {
                number: (
                    statistics.fmean(g for g, _ in scores[(name, method, number)]),
                    statistics.fmean(t for _, t in scores[(name, method, number)]),
                )
                for number in range(len(configs))
            }
            within = [n for n, (_, t) in mean.items() if t <= TUNE_TIME_BUDGET]
            pool = within or list(mean)
            best = min(pool, key=lambda n: mean[n][0])
            chosen[(name, method)] = configs[best]
            say(
                f"  tuned {name:10s} {method:15s} val Avg.Gap {mean[best][0]:5.2f} time {mean[best][1]:.2f}  "
                f"{short(configs[best])}{'' if within else '  (no config within the time budget)'}"
            )

    # report on fresh seeds and the test split
    tables: dict[str, dict[str, Row]] = {}
    for seed in seeds:
        original, _ = fit(splits["train"], seed)
        for scenario in scenarios(splits, seed):
            rows = tables.setdefault(scenario.name, {})
            retrained, retrain_seconds = fit(scenario.retain, seed)
            reference = classifier_report(
                retrained, scenario.forget, scenario.retain, scenario.test, torch.device("cpu"), seed
            )
            rows.setdefault("retrain", Row()).add(**reference, gap=0.0, time=1.0, seconds=retrain_seconds)
            untouched = classifier_report(
                original, scenario.forget, scenario.retain, scenario.test, torch.device("cpu"), seed
            )
            rows.setdefault("(original)", Row()).add(**untouched, gap=avg_gap(untouched, reference), time=0.0)
            for method in methods:
                metrics, seconds = run_classifier_method(
                    method, chosen[(scenario.name, method)], original, scenario, scenario.test, seed
                )
                rows.setdefault(method, Row()).add(
                    **metrics, gap=avg_gap(metrics, reference), time=seconds / retrain_seconds, seconds=seconds
                )

    verdicts: dict[str, bool] = {}
    for name, rows in tables.items():
        say(
            f"\n  {name} forgetting — mean±std over {len(seeds)} seed(s), test split; time = fraction of "
            f"retrain's ({rows['retrain'].mean('seconds'):.2f} s)"
        )
        say(f"  {'method':15s} {'UA':>12s} {'RA':>12s} {'TA':>12s} {'MIA':>12s} {'Avg.Gap':>11s} {'time':>11s}")
        for method, row in rows.items():
            say(
                f"  {method:15s} {row.cell('UA'):>12s} {row.cell('RA'):>12s} {row.cell('TA'):>12s} "
                f"{row.cell('MIA'):>12s} {row.cell('gap'):>11s} {row.cell('time', 3):>11s}"
            )
    slow = [f"{name}/{m}" for name, rows in tables.items() for m in methods if rows[m].mean("time") >= TIME_BUDGET]
    if set(methods) != set(CLASSIFIER_METHODS):  # a subset of the rows: the targets below compare all of them
        say(f"  methods at or over 25% of retrain time: {slow or 'none'}  (targets need every method's rows)")
        return {}
    retrain_ra = tables["class-wise"]["retrain"].mean("RA")
    classwise = tables["class-wise"]
    winners = [
        m for m in methods if classwise[m].mean("UA") >= 99.0 and abs(classwise[m].mean("RA") - retrain_ra) <= 2.0
    ]
    verdicts["class-wise: a method with UA ≥ 99 and RA within 2 of retrain"] = bool(winners)
    say(f"\n  class-wise methods with UA ≥ 99 and |RA − retrain RA| ≤ 2: {winners or 'none'}")
    random_rows = tables["random 10%"]
    baseline = min(random_rows["finetune"].mean("gap"), random_rows["grad_ascent"].mean("gap"))
    good = [
        m for m in ("salun", "sfron") if random_rows[m].mean("gap") <= 3.0 and random_rows[m].mean("gap") < baseline
    ]
    verdicts["random: salun or sfron Avg.Gap ≤ 3 and below finetune's and grad_ascent's"] = bool(good)
    say(
        f"  random 10%: salun/sfron with Avg.Gap ≤ 3 and < min(finetune, grad_ascent) = {baseline:.2f}: "
        f"{good or 'none'}  (the untouched model scores {random_rows['(original)'].mean('gap'):.2f})"
    )
    verdicts["every method < 25% of retrain time"] = not slow
    say(f"  methods at or over 25% of retrain time: {slow or 'none'}")
    return verdicts


# -- (c) continual learn-and-unlearn --------------------------------------------------------------------------

NEW_CLASS, OLD_CLASS = 9, 3
CONTINUAL_METRICS = ("UA", "RA", "TA", "MIA", "NA")


@dataclass
class Continual:
    forget: ClassifierData  # training 3s
    learn: ClassifierData  # training 9s
    retain: ClassifierData  # the other training digits
    final: ClassifierData  # retain ∪ learn: what the retrained reference (and finetune) trains on
    evaluation: ClassifierData  # val or test rows of the final classes (all but the 3s)
    new: ClassifierData  # val or test 9s


def continual_scenario(splits: dict[str, ClassifierData], split: str, kind: str, seed: int) -> Continual:
    """class-wise: forget the training 3s; random 10%: forget a seeded tenth of the training rows that are not 9s."""
    from workers.engines.unlearn.data import joined

    train, held = splits["train"], splits[split]

    def where(data: ClassifierData, keep: torch.Tensor) -> ClassifierData:
        return data.subset(keep.nonzero().squeeze(1))

    labels = train.labels
    learn = where(train, labels == NEW_CLASS)
    if kind == "class-wise":
        forget, retain = where(train, labels == OLD_CLASS), where(train, (labels != NEW_CLASS) & (labels != OLD_CLASS))
        evaluation = where(held, held.labels != OLD_CLASS)
    else:
        old = (labels != NEW_CLASS).nonzero().squeeze(1)
        order = old[torch.randperm(len(old), generator=torch.Generator().manual_seed(1000 + seed))]
        n_forget = len(old) // 10
        forget, retain = train.subset(order[:n_forget].sort().values), train.subset(order[n_forget:].sort().values)
        evaluation = held
    return Continual(forget, learn, retain, joined(retain, learn), evaluation, where(held, held.labels == NEW_CLASS))


def continual_grid(method: str, quick: bool) -> list[dict[str, Any]]:
    base = {"batch_size": 64, "max_grad_norm": 100.0}
    table: dict[str, dict[str, list[Any]]] = {
        "ug_clu": {"lr": [0.01, 0.03, 0.05], "steps": [30, 60, 150], "alpha0": [1.0, 5.0, 25.0],
                   "optimizer": ["sgd"], "max_grad_norm": [7.0]},
        "finetune": {"lr": [1e-3, 3e-3, 1e-2], "steps": [30, 60, 150]},
    }
    options = table[method]
    if quick:
        options = {key: values[-1:] if key == "alpha0" else values[::2] for key, values in options.items()}
    keys = list(options)
    return [{**base, **dict(zip(keys, combo, strict=True))} for combo in product(*(options[k] for k in keys))]


def continual_figures(model: nn.Module, case: Continual, seed: int) -> dict[str, float]:
    cpu = torch.device("cpu")
    figures = classifier_report(model, case.forget, case.retain, case.evaluation, cpu, seed)
    figures["LA"] = classifier_report(model, None, case.learn, None, cpu, seed)["RA"]
    figures["NA"] = classifier_report(model, None, case.new, None, cpu, seed)["RA"]
    return figures


def run_continual(method: str, params: dict[str, Any], original: nn.Module, case: Continual, seed: int):
    model = copy.deepcopy(original)
    params = {**params, "seed": seed}
    if method == "ug_clu":
        out = unlearn(model, "classifier", method, params, case.forget, case.retain, None, learn=case.learn)
    else:  # finetune on the final data
        out = unlearn(model, "classifier", method, params, case.forget, case.final, None)
    return continual_figures(model, case, seed), out.report["method_cpu_seconds"]


def continual_gap(figures: dict[str, float], reference: dict[str, float]) -> float:
    return statistics.fmean(abs(figures[m] - reference[m]) for m in CONTINUAL_METRICS)


def continual_bench(quick: bool) -> dict[str, bool]:
    verdicts: dict[str, bool] = {}
    for kind in ("class-wise", "random 10%"):
        verdicts.update(continual_part(kind, quick))
    return verdicts


def continual_part(kind: str, quick: bool) -> dict[str, bool]:
    splits = digits_splits()
    tuning_seeds = [100] if quick else [100, 101]
    seeds = [0] if quick else [0, 1, 2]
    methods = ["ug_clu", "finetune"]
    forgotten = f"the training {OLD_CLASS}s" if kind == "class-wise" else "a random 10% of the other training rows"
    say(
        f"\n== (c) continual, {kind}: digits MLP first trained without the {NEW_CLASS}s; learn the training "
        f"{NEW_CLASS}s, forget {forgotten}; reference: retrained on retain ∪ learn; seeds {seeds}; tuning seeds "
        f"{tuning_seeds}"
    )
    scores: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for seed in tuning_seeds:
        case = continual_scenario(splits, "val", kind, seed)
        original, _ = fit(where_not(splits["train"], NEW_CLASS), seed)
        retrained, retrain_seconds = fit(case.final, seed)
        reference = continual_figures(retrained, case, seed)
        for method in methods:
            for number, params in enumerate(continual_grid(method, quick)):
                figures, seconds = run_continual(method, params, original, case, seed)
                scores.setdefault((method, number), []).append(
                    (continual_gap(figures, reference), seconds / retrain_seconds)
                )
    chosen: dict[str, dict[str, Any]] = {}
    for method in methods:
        configs = continual_grid(method, quick)
        mean = {n: tuple(map(statistics.fmean, zip(*scores[(method, n)], strict=True))) for n in range(len(configs))}
        within = [n for n, (_, t) in mean.items() if t <= TUNE_TIME_BUDGET]
        best = min(within or list(mean), key=lambda n: mean[n][0])
        chosen[method] = configs[best]
        say(f"  tuned {method:10s} val gap {mean[best][0]:5.2f} time {mean[best][1]:.2f}  {short(configs[best])}"
            f"{'' if within else '  (no config within the time budget)'}")
        unbounded = min(mean, key=lambda n: mean[n][0])
        if unbounded != best:  # what a longer run buys, for the record
            say(f"  {'':16s}without the time budget: val gap {mean[unbounded][0]:5.2f} time "
                f"{mean[unbounded][1]:.2f}  {short(configs[unbounded])}")
    rows: dict[str, Row] = {}
    for seed in seeds:
        case = continual_scenario(splits, "test", kind, seed)
        original, _ = fit(where_not(splits["train"], NEW_CLASS), seed)
        retrained, retrain_seconds = fit(case.final, seed)
        reference = continual_figures(retrained, case, seed)
        rows.setdefault("retrain", Row()).add(**reference, gap=0.0, time=1.0, seconds=retrain_seconds)
        untouched = continual_figures(original, case, seed)
        rows.setdefault("(original)", Row()).add(**untouched, gap=continual_gap(untouched, reference), time=0.0)
        for method in methods:
            figures, seconds = run_continual(method, chosen[method], original, case, seed)
            rows.setdefault(method, Row()).add(
                **figures, gap=continual_gap(figures, reference), time=seconds / retrain_seconds, seconds=seconds
            )
    say(f"\n  {kind}: learn {NEW_CLASS}s + forget — mean±std over {len(seeds)} seed(s), test split; time = "
        f"fraction of retrain's ({rows['retrain'].mean('seconds'):.2f} s)")
    names = ("UA", "RA", "TA", "MIA", "LA", "NA")
    say(f"  {'method':12s} " + " ".join(f"{n:>12s}" for n in names) + f" {'Avg.Gap':>11s} {'time':>11s}")
    for method, row in rows.items():
        say(f"  {method:12s} " + " ".join(f"{row.cell(n):>12s}" for n in names)
            + f" {row.cell('gap'):>11s} {row.cell('time', 3):>11s}")
    ours, naive = rows["ug_clu"], rows["finetune"]
    say(f"\n  Avg.Gap ug_clu {ours.mean('gap'):.2f} vs finetune on the final data {naive.mean('gap'):.2f}")
    below = ours.mean("gap") < naive.mean("gap")
    verdicts = {f"continual {kind}: ug_clu's Avg.Gap below finetune-on-the-final-data's": below}
    if kind == "class-wise":
        met = ours.mean("UA") >= 90 and ours.mean("LA") >= 90 and abs(ours.mean("RA") - rows["retrain"].mean("RA")) <= 2
        say(f"  ug_clu: UA ≥ 90, LA ≥ 90 and RA within 2 of retrain: {'yes' if met else 'no'}")
        verdicts["continual class-wise: ug_clu forgets (UA ≥ 90), learns (LA ≥ 90), RA within 2 of retrain"] = met
    return verdicts


def where_not(data: ClassifierData, label: int) -> ClassifierData:
    return data.subset((data.labels != label).nonzero().squeeze(1))


def short(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items() if k not in ("batch_size", "max_grad_norm", "seed"))


# -- (b) language model ------------------------------------------------------------------------------------

ATTRIBUTES = ("city", "job", "pet", "color")


def word_tokenizer(words: list[str]) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<pad>", "<bos>", "<eos>", "<unk>", *words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )


def fact_world(n_people: int, seed: int = 0) -> dict[str, list[dict[str, str]]]:
    """Invented people (single-token names) × 4 attributes × 10 values; 10% forget, 10% held out."""
    rng = random.Random(seed)
    syllables = ["ka", "zo", "ri", "mu", "te", "la", "vo", "ni", "sha", "pe", "do", "gu", "xi", "ba", "fe", "lo"]
    names: set[str] = set()
    while len(names) < n_people * 11 // 10:
        names.add("".join(rng.choice(syllables) for _ in range(3)).capitalize())
    people = sorted(names)
    rng.shuffle(people)
    rows = {p: [{"prompt": f"{p} {a} ?", "completion": f"{a}{rng.randrange(10)}"} for a in ATTRIBUTES] for p in people}
    n_forget = n_people // 10
    trained, held = people[:n_people], people[n_people:]
    return {
        "forget": [r for p in trained[:n_forget] for r in rows[p]],
        "retain": [r for p in trained[n_forget:] for r in rows[p]],
        "holdout": [r for p in held for r in rows[p]],
    }


def tiny_llama(vocab: int, seed: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=16,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


CHECK_EVERY = 5  # steps between two checks of the early-stopping rule
LM_TRAIN = {"lr": 3e-3, "batch_size": 64, "lr_schedule": "cosine", "max_grad_norm": 1.0, "seed": 0}

LM_METHODS: dict[str, dict[str, Any]] = {
    "grad_ascent": {},
    "grad_diff": {},
    "npo": {},
    "npo+gu": {"gu": True, "gu_retain_samples": 8},
    "simnpo": {},
    "simnpo+gu": {"gu": True, "gu_retain_samples": 8},
    "idk": {},
    "flat": {},
    # RMU's loss is an activation MSE on the MLP weights only: its step size is set a priori (the unit tests'
    # tiny model needed 3e-2; not tuned on this bench). It steers the inner layer: in transformers the last
    # hidden state is taken after the final norm, which caps its norm below c.
    "rmu": {
        "lr": 1e-2,
        "layer": 0,
        "trained_layers": [0],
        "trained_module": "mlp",
        "steering_coeff": 20.0,
        "alpha": 10.0,
    },
}


def lm_world(quick: bool) -> tuple[int, int, Any, dict[str, LMData], LMData]:
    """The language-model scenario both LM benches share: (people, training steps, the word tokenizer, the
    forget / retain / holdout rows, and the rows the original model trains on: forget ∪ retain)."""
    n_people = 120 if quick else 300
    train_steps = 600 if quick else 1500
    world = fact_world(n_people)
    words = sorted({w for rows in world.values() for r in rows for w in (r["prompt"] + " " + r["completion"]).split()})
    tokenizer = word_tokenizer([*words, "I", "don't", "know."])
    data = {name: LMData.from_rows(rows, tokenizer) for name, rows in world.items()}
    return n_people, train_steps, tokenizer, data, LMData.from_rows(world["forget"] + world["retain"], tokenizer)


def lm_bench(quick: bool) -> dict[str, bool]:
    n_people, train_steps, tokenizer, data, train_rows = lm_world(quick)
    say(
        f"\n== (b) language model: 2-layer Llama hidden 128, {len(tokenizer)} word tokens; {n_people} people: "
        f"{len(data['forget'])} forget rows, {len(data['retain'])} retain rows, {len(data['holdout'])} held-out rows"
    )

    started = time.perf_counter()
    original = tiny_llama(len(tokenizer), 0)
    unlearn(
        original,
        "causal_lm",
        "retrain",
        {**LM_TRAIN, "steps": train_steps, "reinitialize": False},
        None,
        train_rows,
        tokenizer=tokenizer,
    )
    train_seconds = time.perf_counter() - started
    retrained = tiny_llama(len(tokenizer), 1)
    unlearn(
        retrained,
        "causal_lm",
        "retrain",
        {**LM_TRAIN, "steps": train_steps, "reinitialize": False},
        None,
        data["retain"],
        tokenizer=tokenizer,
    )
    retrain_seconds = time.perf_counter() - started - train_seconds

    def report(model: nn.Module) -> dict[str, float]:
        return lm_report(model, data["forget"], data["retain"], data["holdout"], torch.device("cpu"))

    rows: dict[str, tuple[dict[str, float], int, float]] = {
        "(original)": (report(original), train_steps, train_seconds),
        "retrain": (report(retrained), train_steps, retrain_seconds),
    }
    batch = len(data["forget"])
    for method, extra in LM_METHODS.items():
        model = copy.deepcopy(original)
        steps_taken = [0]

        def should_stop(model: nn.Module = model, steps_taken: list[int] = steps_taken) -> bool:
            steps_taken[0] += 1
            if steps_taken[0] == 1 or (steps_taken[0] - 1) % CHECK_EVERY:
                return False
            now = lm_report(model, data["forget"], None, data["holdout"], torch.device("cpu"))
            model.train()
            return now["forget_sequence_exact_match"] <= now["holdout_sequence_exact_match"]

        params = {"lr": 1e-3, "steps": 150, "batch_size": batch, "max_grad_norm": 1.0, **extra}
        t0 = time.perf_counter()
        try:
            unlearn(
                model,
                "causal_lm",
                method.split("+")[0],
                params,
                data["forget"],
                data["retain"],
                tokenizer=tokenizer,
                should_cancel=should_stop,
            )
            steps = params["steps"]
        except UnlearnCancelled as stopped:
            steps = stopped.steps_done
        rows[method] = (report(model), steps, time.perf_counter() - t0)

    original_retain = rows["(original)"][0]["retain_sequence_exact_match"]
    retrain_forget = rows["retrain"][0]["forget_sequence_exact_match"]
    say(
        f"  {'method':12s} {'forget acc':>10s} {'retain acc':>10s} {'held acc':>9s} {'forget NLL':>10s} "
        f"{'retain NLL':>10s} {'MinK AUC':>8s} {'steps':>5s} {'sec':>6s}  target"
    )
    winners = []
    for method, (m, steps, seconds) in rows.items():
        forget_close = abs(m["forget_sequence_exact_match"] - retrain_forget) <= 10.0
        ok = forget_close and original_retain - m["retain_sequence_exact_match"] <= 5.0
        reference = method in ("(original)", "retrain")
        if ok and not reference:
            winners.append(method)
        verdict = "reference" if reference else ("met" if ok else "-")
        say(
            f"  {method:12s} {m['forget_sequence_exact_match']:10.1f} {m['retain_sequence_exact_match']:10.1f} "
            f"{m['holdout_sequence_exact_match']:9.1f} {m['forget_nll']:10.2f} {m['retain_nll']:10.2f} "
            f"{m['min_k_auc']:8.2f} {steps:5d} {seconds:6.1f}  {verdict}"
        )
    say(
        f"\n  target: forget acc within 10 of retrain ({retrain_forget:.1f}) and retain acc within 5 of the "
        f"original ({original_retain:.1f}): {winners or 'none'}"
    )
    return {"LM: a method reaches retrain's forget accuracy ±10 keeping retain accuracy within 5": bool(winners)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller grids, one seed, a smaller LM world")
    parser.add_argument("--part", choices=("all", "classifier", "lm", "goal", "continual"), default="all")
    parser.add_argument("--methods", default=None, help="classifier part: comma-separated methods (default: all)")
    args = parser.parse_args(argv)
    chosen = [m for m in args.methods.split(",") if m] if args.methods else None
    if chosen and set(chosen) - set(CLASSIFIER_METHODS):
        parser.error(f"unknown classifier methods {sorted(set(chosen) - set(CLASSIFIER_METHODS))}")
    torch.set_num_threads(1)
    started = time.perf_counter()
    verdicts: dict[str, bool] = {}
    parts: list[Callable[[bool], dict[str, bool]]] = []
    if args.part in ("all", "classifier"):
        parts.append(lambda quick: classifier_bench(quick, chosen))
    if args.part in ("all", "continual"):
        parts.append(continual_bench)
    if args.part in ("all", "lm"):
        parts.append(lm_bench)
    if args.part in ("all", "goal"):
        from bench.unlearn_goal_bench import goal_bench

        parts.append(goal_bench)
    for part in parts:
        verdicts.update(part(args.quick))
    say(f"\n== targets ({time.perf_counter() - started:.0f} s total)")
    for target, met in verdicts.items():
        say(f"  [{'met' if met else 'MISSED'}] {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
