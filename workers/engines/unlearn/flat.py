"""`flat`: FLAT, loss adjustment with only forget data (Wang et al., ICLR 2025, arXiv 2410.11143).

KL form of the variational f-divergence: L = −log P(y_e|x) + P(y_f|x), P = exp(−mean token NLL) of the
answer; y_e is the template answer. No retain data and no reference model.
"""

from __future__ import annotations

from app.schemas.unlearn import FlatParams
from workers.engines.registry import register
from workers.engines.unlearn.data import LMData, PairedLMData, split_pair
from workers.engines.unlearn.errors import UnlearnError
from workers.engines.unlearn.loop import Objective, UnlearnContext
from workers.engines.unlearn.losses import compute_batch_nll, flat_kl_loss


@register("unlearn", "flat", FlatParams)
def flat(ctx: UnlearnContext, params: FlatParams) -> Objective:
    forget = ctx.need_forget()
    if not isinstance(forget, LMData):
        raise UnlearnError("flat needs language-model rows")
    paired = PairedLMData(forget, forget.with_completion(params.template))

    def forget_loss(model, batch, step):
        rows, template = split_pair(batch)
        template_nll, template_tokens = compute_batch_nll(model, template)
        forget_nll, forget_tokens = compute_batch_nll(model, rows)
        return flat_kl_loss(template_nll, template_tokens, forget_nll, forget_tokens)

    return Objective(forget_loss=forget_loss, forget_data=paired)
