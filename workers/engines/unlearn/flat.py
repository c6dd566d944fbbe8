"""`flat`: FLAT, loss adjustment with only forget data (Wang et al., ICLR 2025, arXiv 2410.11143).

As `UCSC-REAL/FLAT:dataloader.py` (`get_contrastive_loss`, loss type "cl"): P̄_e and P̄_f are the mean
probabilities of the answer tokens of a template answer y_e and of the forget answer y_f (`ProbLossStable`,
softmax probabilities, averaged over the batch), and the loss is the variational f-divergence form
L = activation(P̄_e) − conjugate(P̄_f) — Total Variation by default: −½·tanh(P̄_e) + ½·tanh(P̄_f); KL
(−P̄_e + exp(P̄_f − 1)), Jensen–Shannon and Pearson as options. The template is drawn per row, at every draw,
from a list of "I don't know" answers (`templates`; the reference draws from TOFU's `idontknow.jsonl`).
Deviation, stated: the reference averages the token probabilities over every position of its padded batch
(prompt and padding counting 0), so its P̄ shrinks with the padding length; here each row's mean is over its
own answer tokens, then over the batch — P̄ no longer depends on how the batch is padded.
No retain data and no reference model.
"""

from __future__ import annotations

from app.schemas.unlearn import FlatParams
from workers.engines.registry import register
from workers.engines.unlearn.data import LMData, TemplatedLMData, split_pair
from workers.engines.unlearn.errors import UnlearnError
from workers.engines.unlearn.loop import Objective, UnlearnContext
from workers.engines.unlearn.losses import flat_loss, mean_token_probability


@register("unlearn", "flat", FlatParams)
def flat(ctx: UnlearnContext, params: FlatParams) -> Objective:
    forget = ctx.need_forget()
    if not isinstance(forget, LMData):
        raise UnlearnError("flat needs language-model rows")
    templates = [params.template] if params.template is not None else list(params.templates)
    paired = TemplatedLMData(forget, [forget.with_completion(t) for t in templates], ctx.generator)

    def forget_loss(model, batch, step):
        rows, template = split_pair(batch)
        template_p, forget_p = mean_token_probability(model, template), mean_token_probability(model, rows)
        return flat_loss(template_p, forget_p, params.divergence)

    return Objective(forget_loss=forget_loss, forget_data=paired, report={"flat_templates": len(templates)})
