r"""python -m multitask_moe.train --config=configs/default.py --workdir=workdir/default

Default: the embedded task mixture, a small task-aware MoE transformer, 8 CPU devices
(`make train` runs exactly the command above). Variants through the `:arg` string:
    --config=configs/default.py:routing=tokens        # tokens|experts|task|task_tokens|per_task
    --config=configs/default.py:mod_squad             # + MoA in even blocks, per-task routers,
                                                      #   mutual-information loss,
                                                      #   uncertainty task weighting
    --config=configs/default.py:dropless              # no capacity limit, train and eval
and any field through --config.<key>=<value>, e.g. --config.num_train_steps=200.

Tasks: four digit tasks built from the 1,797 real scikit-learn digits (class, parity,
rotated, and a 50-example low-resource task), three real tabular tasks (wine,
breast_cancer, iris) and one synthetic family of three related teacher tasks. The mesh
simulates 8 CPU devices, 2 ('data') x 4 ('expert'), so the run exercises the same
expert-parallel all-to-all dispatch as a TPU pod; the entry point creates the 8 devices
from `num_cpu_devices` before JAX starts.
"""

from multitask_moe.core import config_lib

TASKS = {
    "digits/class": 1.0,
    "digits/parity": 1.0,
    "digits/rotated": 1.0,
    "digits/lowres": 0.5,
    "wine": 0.5,
    "breast_cancer": 0.5,
    "iris": 0.5,
    "synthetic/a0": 1.0,
    "synthetic/a1": 1.0,
    "synthetic/a2": 1.0,
}


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, routing="task_tokens", mod_squad=False, dropless=False)
    c = config_lib.base_config()
    c.platform = "cpu"
    c.num_cpu_devices = 8
    c.mesh.data = 2
    c.mesh.expert = 4

    c.data.tasks = config_lib.format_weights(TASKS)
    c.data.rate = "explicit"
    c.data.image_size = 8
    c.data.patch_size = 2  # 16 tokens of 2x2 pixels per digit

    c.batch_size = 64
    c.eval_batch_size = 128
    c.num_train_steps = 2000
    c.log_every_steps = 50
    c.eval_every_steps = 500
    c.checkpoint_every_steps = 500
    c.keep_checkpoints = 2

    c.optimizer.learning_rate = 2e-3
    c.optimizer.warmup_steps = 100
    c.optimizer.weight_decay = 1e-4

    c.model.d_model = 64
    c.model.depth = 4
    c.model.num_heads = 4
    c.model.mlp_dim = 128
    c.model.moe_every = 2  # MoE MLP in blocks 1 and 3
    c.model.moe.num_experts = 8  # 2 per device on the 'expert' axis of 4
    c.model.moe.top_k = 2
    c.model.moe.d_hidden = 0  # mlp_dim // top_k: same active compute as the dense model
    c.model.moe.routing = args.routing
    c.model.moe.capacity_factor = 1.25
    c.model.moe.eval_capacity_factor = 2.0
    c.aux_loss.load_balance = 0.01
    c.aux_loss.router_z = 0.001

    if args.mod_squad:
        # Mod-Squad (docs/methods.md section 2): MoA in even blocks, MoE in odd blocks, one
        # zero-initialized router per task, mutual-information loss instead of balancing.
        c.model.moa_every = 2
        c.model.moa.num_experts = 8
        c.model.moa.top_k = 2
        c.model.moa.head_dim = 16
        c.model.moa.routing = "per_task"
        c.model.moa.router_init = "zeros"
        c.model.moe.routing = "per_task"
        c.model.moe.router_init = "zeros"
        c.aux_loss.load_balance = 0.0
        c.aux_loss.router_z = 0.0
        c.aux_loss.mutual_info = 0.005
        c.task_weighting = "uncertainty"  # learned per-task loss scales, as Mod-Squad
    if args.dropless:
        c.model.moe.capacity_factor = None
        c.model.moe.eval_capacity_factor = None
    return c
