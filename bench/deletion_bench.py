"""Sequential vs batched deletion (issue 14): ten deletion requests honoured one unlearning job at a time vs all
at once in one job, on `unlearn_bench`'s tiny language model.

    python -m bench.deletion_bench            # 100 invented people, 10 requests of one person each (~3-4 min)
    python -m bench.deletion_bench --quick    # 60 people, 6 requests, shorter training (smoke run)

The model: `unlearn_bench`'s 2-layer Llama (hidden 128) trained by the bench on invented people (four
single-answer facts each, `fact_world`); 10 % of the people are to be forgotten, 10 % more are held out (the eval
rows the goal compares with). Each request asks to forget one person's four rows. Both ways call the engine
(`workers.engines.unlearn.unlearn`) as a job does, goal-driven (`steps` null, as the service's default:
train until the forget rows look unseen, under the retain guards) with the same method and seed:

- sequential: ten jobs, each forgetting one request's rows from the previous job's output (a schedule that fires
  once per request);
- batched: one job forgetting the union of the ten requests' rows (`unlearn_pending`).

Both ways run with the goal's repair phase (`repair_steps`, `--repair-steps`, 0 to leave it out): once a job meets
its goal, its retain term alone trains for up to that many steps at a tenth of the run's rate while the goal still
holds. Without it a goal-driven job stops at the first state that meets the goal, with the retain damage the
forgetting took (up to the +0.1-nat guard); the batch forgets ten people in one run and stopped at +0.094 nats
(retain accuracy 97.5), while the ten sequential jobs, each forgetting one person with 7.5× as many retain-term
steps in all, ended at +0.033 (99.3) - but no longer forgetting the union (63.75 % forget accuracy against 58.75 %
held-out: later jobs' retain steps brought earlier requests' answers back).

Printed for each: total compute (the engine's `method_cpu_seconds` summed over its jobs: range test, training,
repair and goal checks; the before/after reports excluded), optimiser steps, the final model's answer accuracy
(token level) on all forgotten rows, on the retain rows and on held-out rows, retain NLL, whether each job met its
goal, and whether the final model meets the goal on the union of the ten requests' rows (forget answer accuracy
≤ held-out, Min-K% AUC ≤ 0.5 + 2σ, retain NLL within +0.1 nats of the original model). Targets: the batch costs
≥ 5× less compute, and ends with retain accuracy at least as good (within 0.5 points: the measurement's
resolution on this retain set is 1/len(retain) per token).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from typing import Any

import torch
from torch import nn

from app.schemas.unlearn import UnlearnGoal
from bench.unlearn_bench import LM_TRAIN, fact_world, tiny_llama, word_tokenizer
from workers.engines.unlearn import LMData, unlearn
from workers.engines.unlearn.goal import GoalCheck
from workers.engines.unlearn.metrics import lm_report

METHOD = "simnpo"  # grad_diff: see the README figures
PARAMS: dict[str, Any] = {"seed": 0}  # goal-driven: steps and lr null
REPAIR_STEPS = 30


def say(*parts: Any) -> None:
    print(*parts, flush=True)


def run(model: nn.Module, forget: LMData, retain: LMData, holdout: LMData, tokenizer: Any,
        method: str, params: dict[str, Any], repair_steps: int) -> dict[str, Any]:
    out = unlearn(model, "causal_lm", method, {**PARAMS, **params}, forget, retain, holdout, tokenizer=tokenizer,
                  goal={"repair_steps": repair_steps})
    report = out.report
    return {"cpu": report["method_cpu_seconds"], "steps": report.get("loop", {}).get("total_steps", 0),
            "goal_met": bool(report.get("goal_met"))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer people and requests, shorter training")
    parser.add_argument("--method", default=METHOD, help="the unlearning method (goal-driven, params {seed: 0})")
    parser.add_argument("--params", type=json.loads, default={},
                        help='the method\'s params for every job, both ways, as JSON (e.g. \'{"alpha": 3}\')')
    parser.add_argument("--repair-steps", type=int, default=REPAIR_STEPS,
                        help="the goal's repair_steps for every job, both ways (0: stop at the goal)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    n_people, train_steps = (60, 400) if args.quick else (100, 600)
    world = fact_world(n_people)
    words = sorted({w for rows in world.values() for r in rows for w in (r["prompt"] + " " + r["completion"]).split()})
    tokenizer = word_tokenizer([*words, "I", "don't", "know."])
    data = {name: LMData.from_rows(rows, tokenizer) for name, rows in world.items()}
    forget_rows = world["forget"]
    requests = [forget_rows[i : i + 4] for i in range(0, len(forget_rows), 4)]  # one person (4 facts) each
    say(
        f"== deletion: {len(requests)} requests of 4 rows (one person each) on a 2-layer Llama, {n_people} people, "
        f"{len(data['retain'])} retain rows, {len(data['holdout'])} held-out rows; method {args.method} "
        f"{json.dumps({**PARAMS, **args.params})}, goal-driven, repair_steps {args.repair_steps}"
    )
    original = tiny_llama(len(tokenizer), 0)
    train = LMData.from_rows(world["forget"] + world["retain"], tokenizer)
    unlearn(original, "causal_lm", "retrain", {**LM_TRAIN, "steps": train_steps, "reinitialize": False}, None, train,
            tokenizer=tokenizer)

    def final(model: nn.Module) -> dict[str, float]:
        return lm_report(model, data["forget"], data["retain"], data["holdout"], torch.device("cpu"))

    union = GoalCheck.build(original, "causal_lm", data["forget"], data["retain"], data["holdout"], UnlearnGoal(), 0,
                            torch.device("cpu"))
    union.begin(original)  # the guards' baselines: the model before any request was honoured

    def union_met(model: nn.Module) -> str:
        checked = union.measure(model, full=True)
        return "yes" if checked.goal_met and checked.guards_ok else "no (" + "; ".join(
            checked.unmet + checked.broken) + ")"

    start = final(original)
    sequential = copy.deepcopy(original)
    seq_runs = [run(sequential, LMData.from_rows(rows, tokenizer), data["retain"], data["holdout"], tokenizer,
                    args.method, args.params, args.repair_steps) for rows in requests]
    batched = copy.deepcopy(original)
    batch_run = run(batched, data["forget"], data["retain"], data["holdout"], tokenizer, args.method, args.params,
                    args.repair_steps)
    rows = {
        "(original)": (start, 0.0, 0, "-", union_met(original)),
        "sequential": (final(sequential), sum(r["cpu"] for r in seq_runs), sum(r["steps"] for r in seq_runs),
                       f"{sum(r['goal_met'] for r in seq_runs)}/{len(seq_runs)} jobs", union_met(sequential)),
        "batched": (final(batched), batch_run["cpu"], batch_run["steps"], f"{int(batch_run['goal_met'])}/1 job",
                    union_met(batched)),
    }
    say(f"  {'way':12s} {'compute s':>9s} {'steps':>6s} {'forget acc':>10s} {'retain acc':>10s} {'held acc':>8s} "
        f"{'retain NLL':>10s}  {'goal met':10s}  goal met on all forgotten rows at the end")
    for name, (m, cpu, steps, met, at_end) in rows.items():
        say(f"  {name:12s} {cpu:9.1f} {steps:6d} {m['forget_token_exact_match']:10.1f} "
            f"{m['retain_token_exact_match']:10.1f} {m['holdout_token_exact_match']:8.1f} {m['retain_nll']:10.3f}  "
            f"{met:10s}  {at_end}")
    seq_cpu, batch_cpu = rows["sequential"][1], rows["batched"][1]
    ratio = seq_cpu / max(batch_cpu, 1e-9)
    seq_retain = rows["sequential"][0]["retain_token_exact_match"]
    batch_retain = rows["batched"][0]["retain_token_exact_match"]
    targets = {
        f"batch costs >= 5x less compute (measured {ratio:.1f}x: {seq_cpu:.1f} s vs {batch_cpu:.1f} s)": ratio >= 5.0,
        f"batch retain accuracy at least as good ({batch_retain:.1f} vs {seq_retain:.1f}, 0.5 point resolution)":
            batch_retain >= seq_retain - 0.5,
    }
    say(f"\n== targets ({time.perf_counter() - started:.0f} s total)")
    for target, met in targets.items():
        say(f"  [{'met' if met else 'MISSED'}] {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
