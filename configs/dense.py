r"""python -m multitask_moe.train --config=configs/dense.py --workdir=workdir/dense

Dense baseline: configs/default.py with every MoE / MoA layer replaced by its dense twin.
Same tasks, data, mesh, optimizer, steps, stems, embeddings, depth and heads as the
default; each MoE MLP (top_k experts of hidden mlp_dim // top_k) becomes one dense MLP of
hidden mlp_dim, so every token sees the same active parameters and compute. The
'expert' mesh axis then only splits the batch.
"""

from multitask_moe.core import config_lib


def get_config(arg: str | None = None):
    c = config_lib.sibling_config(__file__, "default", arg)
    c.model.moe_every = 0
    c.model.moa_every = 0
    c.aux_loss.load_balance = 0.0
    c.aux_loss.router_z = 0.0
    c.aux_loss.mutual_info = 0.0
    return c
