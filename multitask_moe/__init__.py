"""multitask_moe: multitask learning with sparse mixtures of experts in JAX/Flax NNX.

import multitask_moe as mtm
layer = mtm.MoE(d_model=64, d_hidden=256, num_experts=8, top_k=2, routing="tokens",
                rngs=nnx.Rngs(0))
y, aux = layer(x, task_ids=None)
"""

from multitask_moe.moe import MoA, MoE

__all__ = ["MoE", "MoA"]
__version__ = "0.1.0"
