"""The field's standard measurements, beside the per-split figures of `metrics.py`.

Language models — TOFU (its evaluation as copied in `UCSC-REAL/FLAT:utils.py`, `get_forget_quality` and
`get_model_utility`) and MUSE:
- truth ratio, per row. TOFU compares a paraphrased answer's probability with perturbed (wrong) answers'. A
  job's rows carry neither, so here — a stated proxy — the paraphrase is the answer itself and the perturbed
  answers are `PERTURBED` other rows' completions of the same split (seeded), each different from it. With ℓ
  the mean answer-token NLL and P = exp(−ℓ): forget quality uses R = exp(mean_j ℓ_pert,j − ℓ_answer)
  (`get_forget_quality`), the utility score mean(max(0, 1 − R')) with R' = mean_j P_pert,j / P_answer
  (`get_model_utility`);
- `forget_quality`: the KS-test p-value (`scipy.stats.ks_2samp`) of the forget rows' R against a reference:
  the retrained model's R on the forget rows when the job retrains one (`reference: "retrain"`), else the
  model's own R on held-out (eval) rows — rows it never saw;
- `model_utility`: the harmonic mean of retain answer probability, retain ROUGE-L recall and retain
  truth-ratio score — TOFU's nine values without the real-authors and world-facts sets a job does not have;
- `*_rouge_l_recall`: ROUGE-L recall of greedy generations against the answers (LCS of lower-cased
  alphanumeric words; `rouge_score` also stems, this does not), on at most `GENERATION_ROWS` rows per split;
- `privleak` (MUSE): (AUC_u − AUC_ref)/AUC_ref × 100 in MUSE's orientation — the AUC of telling held-out from
  forget rows, 1 − the Min-K% AUC of `metrics.py` — AUC_ref the retrained model's, else 0.5 (open-unlearning's
  default without a retain log). ≈ 0 ideal, ≪ 0 under-unlearned (forget rows still look like members),
  > 0 over-unlearned.
Classifiers: `avg_gap` — per metric |value − the retrained model's| over UA, RA, TA, MIA, and their mean
(the SalUn and SFR-on protocol).
"""

from __future__ import annotations

import re
import statistics
from typing import Any

import numpy as np
import torch
from scipy.stats import hmean, ks_2samp
from torch import nn

from workers.engines.unlearn.data import IGNORE_INDEX, LMData
from workers.engines.unlearn.metrics import lm_outputs

PERTURBED = 3
TRUTH_ROWS = 256  # rows per split whose truth ratios are measured (seeded subset)
GENERATION_ROWS = 128  # rows per split generated for ROUGE-L
MAX_NEW_TOKENS = 64
GAP_METRICS = ("UA", "RA", "TA", "MIA")


def _subset(data: LMData, rows: int, seed: int) -> LMData:
    if len(data) <= rows:
        return data
    picked = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed), device="cpu")[:rows]
    return data.subset(sorted(picked.tolist()))


# -- truth ratio, forget quality, model utility --------------------------------------------------------------


def perturbed_rows(data: LMData, seed: int) -> LMData | None:
    """Each row's prompt with `PERTURBED` other rows' completions (different answers), row-major; None when the
    rows have no prompt/completion or fewer than two distinct answers."""
    if data.prompts is None or data.completions is None or len(set(data.completions)) < 2:
        return None
    generator = np.random.default_rng(seed)
    rows = []
    for prompt, answer in zip(data.prompts, data.completions, strict=True):
        others = [c for c in data.completions if c != answer]
        for j in generator.choice(len(others), PERTURBED, replace=len(others) < PERTURBED):
            rows.append({"prompt": prompt, "completion": others[int(j)]})
    meta = data.meta
    return LMData.from_rows(rows, meta["tokenizer"], meta["max_length"], meta["append_eos"])


def truth_ratios(model: nn.Module, data: LMData, device: torch.device, seed: int) -> dict[str, np.ndarray] | None:
    """Per row: `fq` = exp(mean_j ℓ_pert,j − ℓ_answer) and `utility` = mean_j P_pert,j / P_answer."""
    data = _subset(data, TRUTH_ROWS, seed)
    perturbed = perturbed_rows(data, seed)
    if perturbed is None:
        return None
    answer = lm_outputs(model, data, device)["nll"].numpy()
    wrong = lm_outputs(model, perturbed, device)["nll"].numpy().reshape(len(data), PERTURBED)
    return {
        "fq": np.exp(wrong.mean(axis=1) - answer),
        "utility": np.exp(-wrong).mean(axis=1) / np.exp(-answer),
        "probability": np.exp(-answer),
    }


def forget_quality(forget_ratios: np.ndarray, reference_ratios: np.ndarray) -> float:
    """TOFU's forget quality: the KS-test p-value of two samples of truth ratios."""
    return float(ks_2samp(forget_ratios, reference_ratios).pvalue)


# -- ROUGE-L recall of greedy generations -------------------------------------------------------------------


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def rouge_l_recall(prediction: str, reference: str) -> float:
    """LCS(prediction, reference) / |reference| over lower-cased alphanumeric words (1.0 for an empty reference)."""
    ref, hyp = _words(reference), _words(prediction)
    if not ref:
        return 1.0
    previous = [0] * (len(hyp) + 1)
    for r in ref:
        current = [0]
        for j, h in enumerate(hyp):
            current.append(previous[j] + 1 if r == h else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1] / len(ref)


@torch.no_grad()
def generate_answers(model: Any, data: LMData, device: torch.device, batch_size: int = 32) -> list[str]:
    """Greedy answers to each row's prompt (left-padded batches), at most as many tokens as its answer has."""
    tokenizer = data.meta["tokenizer"]
    pad = data.pad_token_id
    model.eval()
    out: list[str] = []
    for start in range(0, len(data), batch_size):
        rows = range(start, min(start + batch_size, len(data)))
        prompts, lengths = [], []
        for i in rows:
            labels = data.labels[i]
            answer_at = int((labels != IGNORE_INDEX).nonzero()[0]) if (labels != IGNORE_INDEX).any() else len(labels)
            prompts.append(data.input_ids[i][:answer_at])
            lengths.append(len(labels) - answer_at)
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long, device="cpu")
        mask = torch.zeros((len(prompts), width), dtype=torch.long, device="cpu")
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = prompt
            mask[row, width - len(prompt) :] = 1
        generated = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=min(MAX_NEW_TOKENS, max(lengths)),
            do_sample=False,
            pad_token_id=pad,
        )[:, width:]
        out.extend(tokenizer.decode(row, skip_special_tokens=True) for row in generated.cpu())
    return out


def rouge_l(model: nn.Module, data: LMData, device: torch.device, seed: int) -> float | None:
    if data.completions is None:
        return None
    data = _subset(data, GENERATION_ROWS, seed)
    answers = generate_answers(model, data, device)
    return statistics.fmean(rouge_l_recall(a, r) for a, r in zip(answers, data.completions or [], strict=True))


# -- the report ----------------------------------------------------------------------------------------------


def privleak(auc: float, reference_auc: float | None = None) -> float:
    """MUSE's PrivLeak from Min-K% AUCs in this service's orientation (forget rows scored as members)."""
    muse, reference = 1.0 - auc, 0.5 if reference_auc is None else 1.0 - reference_auc
    return (muse - reference) / max(reference, 1e-9) * 100.0


def lm_standard(
    model: nn.Module,
    forget: LMData | None,
    retain: LMData | None,
    holdout: LMData | None,
    device: torch.device,
    seed: int = 0,
    min_k_auc: float | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(figures for the report, raw truth ratios for a later comparison with a retrained reference)."""
    out: dict[str, Any] = {}
    ratios: dict[str, Any] = {}
    was_training = model.training
    try:
        for name, data in (("forget", forget), ("retain", retain), ("holdout", holdout)):
            if data is None:
                continue
            measured = truth_ratios(model, data, device, seed)
            if measured is not None:
                ratios[name] = measured
                out[f"{name}_truth_ratio"] = float(np.minimum(measured["utility"], 1 / measured["utility"]).mean())
            if name != "holdout":
                score = rouge_l(model, data, device, seed)
                if score is not None:
                    out[f"{name}_rouge_l_recall"] = score
        if "forget" in ratios and "holdout" in ratios:
            out["forget_quality"] = forget_quality(ratios["forget"]["fq"], ratios["holdout"]["fq"])
            out["forget_quality_reference"] = "holdout"
        if "retain" in ratios and "retain_rouge_l_recall" in out:
            truth = float(np.maximum(0.0, 1.0 - ratios["retain"]["utility"]).mean())
            parts = [float(ratios["retain"]["probability"].mean()), out["retain_rouge_l_recall"], truth]
            out["retain_truth_ratio_score"] = truth
            out["model_utility"] = float(hmean(parts)) if min(parts) > 0 else 0.0
        if min_k_auc is not None:
            out["privleak"] = privleak(min_k_auc)
    finally:
        model.train(was_training)
    return out, ratios


def avg_gap(metrics: dict[str, float], reference: dict[str, float]) -> dict[str, float]:
    """|value − reference| per classifier metric both reports have, and their mean as `avg_gap`."""
    gaps = {m: abs(metrics[m] - reference[m]) for m in GAP_METRICS if m in metrics and m in reference}
    if gaps:
        gaps["avg_gap"] = statistics.fmean(gaps.values())
    return gaps
