r"""python -m multitask_moe.evolve --config=configs/evolve.py --workdir=workdir/evolve

muNet on the embedded tasks (docs/methods.md, section 3): the tasks join one after
another, each by a few generations of children over a pool of components that the
earlier tasks have locked. The root is a fresh model of the default config's shape with
a smaller width (d_model 32, 2 blocks, MoE in block 1 routed by token), so children train
in seconds on 2 CPU cores.

    --config=configs/evolve.py:baseline        # also fine-tune the root per task
    --config=configs/evolve.py:size_scale=0.5  # pay for added parameters (s in (0, 1])
    --config=configs/evolve.py:tpu             # a larger system for a TPU host
    --config=configs/evolve.py:expert_slots=4  # experts as components: a child may clone
                                               # one expert into a free slot of the MoE
    --config.evolve.devices_per_child=4        # each child on 4 devices, its experts
                                               # sharded over them (expert-parallel)

Any field with --config.key=value, e.g. --config.evolve.generations=4.
"""

import ml_collections

from multitask_moe.core import config_lib

TASKS = ("digits/class", "iris", "digits/parity", "wine", "synthetic/a0", "breast_cancer")


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, baseline=False, size_scale=1.0, tpu=False, expert_slots=0)
    c = config_lib.sibling_config(__file__, "default", "routing=tokens")
    c.model.d_model = 32
    c.model.depth = 2
    c.model.num_heads = 2
    c.model.mlp_dim = 64
    c.model.moe_every = 2  # the MoE MLP in block 1
    c.model.moe.num_experts = 4
    c.model.moe.top_k = 2
    c.model.moe.capacity_factor = None  # dropless: a child's quality never hinges on drops
    c.model.moe.eval_capacity_factor = None
    c.batch_size = 32
    c.eval_batch_size = 128
    c.data.tasks = ""  # the evolution reads evolve.tasks
    c.evolve = ml_collections.ConfigDict(
        {
            "tasks": ", ".join(TASKS),
            "generations": 2,
            "children": 4,
            "steps": 150,
            "validations": 3,
            "size_scale": args.size_scale,
            "mu": 0.2,
            "learning_rate": 3e-3,
            "adapter_size": 16,
            "baseline": args.baseline,
            "free_expert_slots": args.expert_slots,
            "devices_per_child": 1,
        }
    )
    if args.tpu:
        c.platform = ""
        c.num_cpu_devices = 0
        c.model.d_model = 256
        c.model.depth = 6
        c.model.num_heads = 8
        c.model.mlp_dim = 1024
        c.model.moe.num_experts = 8
        c.batch_size = 256
        c.data.image_size = 32
        c.data.patch_size = 4
        c.evolve.generations = 8
        c.evolve.children = 8
        c.evolve.steps = 1000
    return c
