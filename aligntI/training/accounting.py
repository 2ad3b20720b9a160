"""Loss normalisation over micro-batches and ranks, in one place (STYLE principle 9).

DeepSpeed's backward divides by the gradient-accumulation steps and its gradient reduction averages
over ranks. To obtain ``sum of token losses over the whole global batch / its token count``, each
micro-batch's loss *sum* is multiplied by ``world_size × accumulation / global_token_count``.

The derivation: docs/engineering.md, section 5.
"""

from __future__ import annotations


def micro_loss_scale(global_tokens: float, world_size: int, accumulation: int) -> float:
    """Factor that turns a micro-batch loss sum into its share of the global-batch token mean."""
    return world_size * accumulation / max(global_tokens, 1.0)
