r"""python -m multitask_moe.train --config=configs/dense.py --workdir=workdir/dense

Dense baseline: configs/default.py with every MoE / MoA layer replaced by its dense twin.
Same tasks, data, mesh, optimizer, steps, stems, embeddings, depth and heads as the
default; each MoE MLP (top_k experts of hidden mlp_dim // top_k) becomes one dense MLP of
hidden mlp_dim, so every token sees the same active parameters and compute. The
'expert' mesh axis then only splits the batch.
"""

import importlib.util
import os


def _default_module():
    # Config files are loaded by path, not as a package: load the sibling file the same way.
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.py")
    spec = importlib.util.spec_from_file_location("mtm_config_default", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg: str | None = None):
    c = _default_module().get_config(arg)
    c.model.moe_every = 0
    c.model.moa_every = 0
    c.aux_loss.load_balance = 0.0
    c.aux_loss.router_z = 0.0
    c.aux_loss.mutual_info = 0.0
    return c
