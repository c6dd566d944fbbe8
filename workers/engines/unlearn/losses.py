"""Loss math in named helpers, shared by every method (open-unlearning style).

Language models: `compute_batch_nll` gives each row's NLL summed over its answer tokens (labels ≠ −100,
shifted by one) and its answer length; NPO, SimNPO, DPO and FLAT are functions of those numbers.
Classifiers: `classifier_logits` calls the model the way its forward names its inputs; `per_sample_ce`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workers.engines.unlearn.data import IGNORE_INDEX

# -- language models ----------------------------------------------------------------------------------------


def lm_logits(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits


def token_nll(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token NLL (B, T−1) of next-token prediction, 0 where the label is −100, and the answer mask."""
    shifted_logits = logits[:, :-1, :].float()
    shifted_labels = labels[:, 1:]
    mask = shifted_labels != IGNORE_INDEX
    nll = F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.shape[-1]),
        shifted_labels.clamp_min(0).reshape(-1),
        reduction="none",
    ).view_as(shifted_labels)
    return nll * mask, mask


def compute_batch_nll(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Each row's NLL summed over its answer tokens (B,), and the number of answer tokens (B,)."""
    nll, mask = token_nll(lm_logits(model, batch), batch["labels"])
    return nll.sum(dim=1), mask.sum(dim=1)


def mean_token_nll(nll_sum: Tensor, n_tokens: Tensor) -> Tensor:
    """The token-mean NLL over a batch (what a causal LM's `.loss` is)."""
    return nll_sum.sum() / n_tokens.sum().clamp_min(1)


def npo_loss(nll: Tensor, reference_nll: Tensor, beta: float) -> Tensor:
    """NPO: −(2/β)·mean log σ(β·(NLL_θ − NLL_θ0)); falls as the forget answers get less likely than under θ0."""
    return -(2.0 / beta) * F.logsigmoid(beta * (nll - reference_nll)).mean()


def simnpo_loss(nll_sum: Tensor, n_tokens: Tensor, beta: float, delta: float) -> Tensor:
    """SimNPO: −(2/β)·mean log σ(β·(NLL_θ/|y| − δ)); reference-free, length-normalised."""
    return -(2.0 / beta) * F.logsigmoid(beta * (nll_sum / n_tokens.clamp_min(1) - delta)).mean()


def dpo_loss(win_nll: Tensor, win_ref_nll: Tensor, lose_nll: Tensor, lose_ref_nll: Tensor, beta: float) -> Tensor:
    """DPO on NLLs: log-ratios −(NLL_θ − NLL_θ0) of the winner and loser; −(2/β)·mean log σ(β·(w − l))."""
    win_log_ratio = -(win_nll - win_ref_nll)
    lose_log_ratio = -(lose_nll - lose_ref_nll)
    return -(2.0 / beta) * F.logsigmoid(beta * (win_log_ratio - lose_log_ratio)).mean()


def mean_token_probability(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Each row's mean probability of its answer tokens, (1/|y|)·Σ_t p(y_t | x, y_<t) (B,)."""
    logits = lm_logits(model, batch)[:, :-1, :].float()
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    probs = logits.softmax(-1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1) * mask
    return probs.sum(dim=1) / mask.sum(dim=1).clamp_min(1)


# FLAT's f-divergences as the reference writes them (`get_contrastive_loss`): L = activation(P̄_e) − conjugate(P̄_f)
_FLAT_DIVERGENCES = {
    "total_variation": (lambda x: -torch.tanh(x) / 2, lambda x: -torch.tanh(x) / 2),
    "kl": (lambda x: -x, lambda x: -torch.exp(x - 1.0)),
    "jensen_shannon": (
        lambda x: F.softplus(-x) - math.log(2.0),
        lambda x: -(x + F.softplus(-x)) + math.log(2.0),
    ),
    "pearson": (lambda x: -x, lambda x: -(x * x / 4.0 + x)),
}


def flat_loss(template_probability: Tensor, forget_probability: Tensor, divergence: str) -> Tensor:
    """FLAT: −g(P̄_e) + f*(P̄_f) on the batch means of the rows' mean answer-token probabilities; Total Variation:
    −½·tanh(P̄_e) + ½·tanh(P̄_f); KL: −P̄_e + exp(P̄_f − 1); Pearson: −P̄_e + P̄_f²/4 + P̄_f; Jensen–Shannon:
    softplus(−P̄_e) + P̄_f + softplus(−P̄_f) − 2·log 2."""
    activation, conjugate = _FLAT_DIVERGENCES[divergence]
    return activation(template_probability.mean()) - conjugate(forget_probability.mean())


def hidden_states_at(model: nn.Module, batch: dict[str, Tensor], layer: int) -> Tensor:
    """The output of decoder layer `layer` (B, T, H)."""
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        output_hidden_states=True,
        use_cache=False,
    )
    return out.hidden_states[layer + 1]


def masked_mse(hidden: Tensor, target: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean squared error over the hidden units of the real (unpadded) tokens."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    squared = ((hidden.float() - target.float()) ** 2) * mask
    return squared.sum() / (mask.sum() * hidden.shape[-1]).clamp_min(1)


# -- classifiers --------------------------------------------------------------------------------------------


def _takes_keywords(model: nn.Module, keys: Iterable[str]) -> bool:
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return True
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return True
    return all(key in parameters for key in keys)


def classifier_logits(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Logits (B, C): `inputs` is passed positionally, named inputs as keywords; `.logits` is unwrapped."""
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    if "inputs" in inputs or not _takes_keywords(model, inputs):
        out = model(*inputs.values())
    else:
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out


def per_sample_ce(logits: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(logits.float(), labels, reduction="none")


def random_other_labels(labels: Tensor, num_classes: int, generator: torch.Generator) -> Tensor:
    """A uniformly random label different from the true one, per sample."""
    offset = torch.randint(
        1, max(num_classes, 2), labels.shape, generator=generator, device=generator.device
    ).to(labels.device)
    return (labels + offset) % num_classes


def adaptive_ga_weights(per_sample_loss: Tensor, ada_lambda: float) -> Tensor:
    """SFR-on's AdaGA weights w_i ∝ 1/(ℓ_i^λ + 1e-15), detached, normalised to sum to the batch size
    (`AdaptiveLoss` in the reference's `Classification/unlearn/sfron.py`)."""
    weights = 1.0 / (per_sample_loss.detach().clamp_min(0.0) ** ada_lambda + 1e-15)
    return weights * (weights.numel() / weights.sum())


def l1_norm(parameters: Iterable[Tensor]) -> Tensor:
    return sum(p.abs().sum() for p in parameters)  # type: ignore[return-value]


def union_weights(n_first: int, n_second: int) -> tuple[float, float]:
    """Weights (n₁/n, n₂/n) that make w₁·mean ℓ(batch of set 1) + w₂·mean ℓ(batch of set 2) an unbiased estimate
    of the mean loss over the union of the two sets (a batch from each set per step instead of shuffled union
    batches)."""
    total = max(n_first + n_second, 1)
    return n_first / total, n_second / total


def image_input_key(batch: dict[str, Tensor]) -> str | None:
    """The one floating-point model input of a classifier batch (`pixel_values` or `inputs`), else None."""
    keys = [key for key, value in batch.items() if key != "labels" and value.is_floating_point()]
    others = [key for key in batch if key != "labels" and key not in keys]
    return keys[0] if len(keys) == 1 and not others else None
