"""Before/after measurements of an unlearning run.

Classifiers (in %, as SalUn and SFR-on report them): UA = 100 − Acc(D_f), RA = Acc(D_r), TA = Acc(D_t), and
MIA-efficacy — an SVC(C=3, rbf, gamma="auto") on the true-label softmax confidence, trained on a retain
subset of |D_t| rows (members, 1) against D_t (non-members, 0); the score is 100 × the fraction of D_f it
calls non-member (`Unlearn-Saliency:Classification/evaluation/SVC_MIA.py`).

Language models, per split: mean answer-token NLL, answer probability (mean of exp(−mean token NLL)), two exact
matches named for what they count — `sequence_exact_match`, the % of rows whose every answer token is the
greedy, teacher-forced argmax (the same as greedy decoding reproducing the answer), and `token_exact_match`,
the mean fraction of answer tokens that are (open-unlearning's `exact_memorization`, token-level) —,
extraction strength ES = 1 − k/|y| (k: the shortest prefix after which the greedy predictions match the rest),
and the Min-K% (k = 0.4) membership AUC of forget vs held-out rows.
"""

from __future__ import annotations

from typing import Any, TypeVar

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from sklearn.svm import SVC
from torch import Tensor, nn

from workers.engines.unlearn.data import ClassifierData, Data, LMData, batches, to_device
from workers.engines.unlearn.losses import classifier_logits, lm_logits, per_sample_ce, token_nll

D = TypeVar("D", LMData, ClassifierData)

EVAL_BATCH = 64  # language-model rows per forward (logits are rows × tokens × vocabulary)
CLASSIFIER_EVAL_BATCH = 256  # a 4-times larger batch measured 2.7x faster on the digits ViT
MAX_EVAL_ROWS = 2000  # larger splits are measured on a fixed, seeded subset
MIN_K = 0.4


def capped(data: D, seed: int) -> D:
    """At most MAX_EVAL_ROWS rows of `data`: a fixed, seeded subset of a larger split."""
    if len(data) <= MAX_EVAL_ROWS:
        return data
    picked = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed), device="cpu")[:MAX_EVAL_ROWS]
    return data.subset(sorted(picked.tolist()))


# -- classifiers --------------------------------------------------------------------------------------------


@torch.no_grad()
def classifier_outputs(model: nn.Module, data: ClassifierData, device: torch.device) -> dict[str, Tensor]:
    """Per-sample correctness, CE loss and true-label confidence."""
    model.eval()
    correct, losses, confidence = [], [], []
    for batch in batches(data, CLASSIFIER_EVAL_BATCH):
        batch = to_device(batch, device)
        logits = classifier_logits(model, batch).float()
        labels = batch["labels"]
        correct.append((logits.argmax(-1) == labels).cpu())
        losses.append(per_sample_ce(logits, labels).cpu())
        confidence.append(logits.softmax(-1).gather(1, labels[:, None]).squeeze(1).cpu())
    return {"correct": torch.cat(correct), "loss": torch.cat(losses), "confidence": torch.cat(confidence)}


def mia_efficacy(retain_confidence: Tensor, test_confidence: Tensor, forget_confidence: Tensor, seed: int = 0) -> float:
    """100 × fraction of forget samples an SVC on true-label confidence calls non-members."""
    generator = np.random.default_rng(seed)
    n = min(len(test_confidence), len(retain_confidence))
    members = retain_confidence.numpy()[generator.choice(len(retain_confidence), n, replace=False)]
    non_members = test_confidence.numpy()[:n]
    features = np.concatenate([members, non_members]).reshape(-1, 1)
    labels = np.concatenate([np.ones(n), np.zeros(n)])
    attack = SVC(C=3, kernel="rbf", gamma="auto").fit(features, labels)
    predicted = attack.predict(forget_confidence.numpy().reshape(-1, 1))
    return float(100.0 * (predicted == 0).mean())


def classifier_report(
    model: nn.Module,
    forget: ClassifierData | None,
    retain: ClassifierData | None,
    test: ClassifierData | None,
    device: torch.device,
    seed: int = 0,
) -> dict[str, float]:
    out: dict[str, float] = {}
    parts = {
        name: classifier_outputs(model, capped(data, seed), device)
        for name, data in (("forget", forget), ("retain", retain), ("test", test))
        if data is not None
    }
    for name, part in parts.items():
        out[f"{name}_accuracy"] = 100.0 * float(part["correct"].float().mean())
        out[f"{name}_loss"] = float(part["loss"].mean())
    if "forget" in parts:
        out["UA"] = 100.0 - out["forget_accuracy"]
    if "retain" in parts:
        out["RA"] = out["retain_accuracy"]
    if "test" in parts:
        out["TA"] = out["test_accuracy"]
    if {"forget", "retain", "test"} <= parts.keys():
        out["MIA"] = mia_efficacy(
            parts["retain"]["confidence"], parts["test"]["confidence"], parts["forget"]["confidence"], seed
        )
    return out


# -- language models ----------------------------------------------------------------------------------------


@torch.no_grad()
def lm_outputs(model: nn.Module, data: LMData, device: torch.device) -> dict[str, Tensor]:
    """Per-row mean answer NLL, exact match, token accuracy, extraction strength and Min-K% score."""
    model.eval()
    mean_nll, exact, tokens, strength, min_k = [], [], [], [], []
    for batch in batches(data, EVAL_BATCH):
        batch = to_device(batch, device)
        logits = lm_logits(model, batch).float()
        nll, mask = token_nll(logits, batch["labels"])
        hits = (logits[:, :-1].argmax(-1) == batch["labels"][:, 1:]) | ~mask
        for row in range(nll.shape[0]):
            row_mask = mask[row]
            row_nll = nll[row][row_mask]
            mean_nll.append(float(row_nll.mean()))
            answer_hits = hits[row][row_mask]
            exact.append(float(answer_hits.all()))
            tokens.append(float(answer_hits.float().mean()))
            misses = (~answer_hits).nonzero()
            k = int(misses[-1]) + 1 if len(misses) else 0
            strength.append(1.0 - k / len(answer_hits))
            lowest = torch.sort(-row_nll).values[: max(1, int(MIN_K * len(row_nll)))]
            min_k.append(float(lowest.mean()))
    return {
        name: torch.tensor(values, device="cpu")
        for name, values in (
            ("nll", mean_nll),
            ("exact", exact),
            ("token_accuracy", tokens),
            ("es", strength),
            ("min_k", min_k),
        )
    }


def min_k_auc(member_scores: Tensor, non_member_scores: Tensor) -> float:
    """AUC of the Min-K% score (mean of the lowest-k token log-probs) telling members from non-members."""
    scores = torch.cat([member_scores, non_member_scores]).numpy()
    labels = np.concatenate([np.ones(len(member_scores)), np.zeros(len(non_member_scores))])
    return float(roc_auc_score(labels, scores))


def lm_report(
    model: nn.Module,
    forget: LMData | None,
    retain: LMData | None,
    holdout: LMData | None,
    device: torch.device,
    seed: int = 0,
) -> dict[str, float]:
    out: dict[str, float] = {}
    parts = {
        name: lm_outputs(model, capped(data, seed), device)
        for name, data in (("forget", forget), ("retain", retain), ("holdout", holdout))
        if data is not None
    }
    for name, part in parts.items():
        out[f"{name}_nll"] = float(part["nll"].mean())
        out[f"{name}_probability"] = float(torch.exp(-part["nll"]).mean())
        out[f"{name}_sequence_exact_match"] = 100.0 * float(part["exact"].mean())
        out[f"{name}_token_exact_match"] = 100.0 * float(part["token_accuracy"].mean())
        out[f"{name}_extraction_strength"] = float(part["es"].mean())
    if "forget" in parts and "holdout" in parts:
        out["min_k_auc"] = min_k_auc(parts["forget"]["min_k"], parts["holdout"]["min_k"])
    return out


def evaluate(
    model: nn.Module,
    family: str,
    forget: Data | None,
    retain: Data | None,
    evaluation: Data | None,
    device: torch.device,
    seed: int = 0,
) -> dict[str, Any]:
    """The family's report on whichever splits are given (evaluation = test set or held-out rows)."""
    was_training = model.training
    try:
        if family == "classifier":
            return classifier_report(model, forget, retain, evaluation, device, seed)  # type: ignore[arg-type]
        return lm_report(model, forget, retain, evaluation, device, seed)  # type: ignore[arg-type]
    finally:
        model.train(was_training)
