r"""python -m multitask_moe.train --config=configs/add_tasks.py --workdir=workdir/seen

Adding tasks to a trained Task-MoE model (docs/lifecycle.md, "Adding tasks"). Three runs
on the default model, mesh and data, routed by task (`routing=task`: each task owns a
routing row, so "routed from a related task" means taking that row):

    # 1. the seen model: digits, synthetic family a and real tabular tasks, without the
    #    held-out digits/parity and synthetic/a2, and without synthetic family b.
    python -m multitask_moe.train --config=configs/add_tasks.py --workdir=workdir/seen

    # 2. unseen: the held-out digits/parity and synthetic/a2 join with 50 training
    #    examples each, starting from their nearest seen task; everything that serves the
    #    seen tasks is frozen (their evaluation stays bit-identical) and only the new
    #    tasks are sampled.
    python -m multitask_moe.train --config=configs/add_tasks.py:unseen --workdir=workdir/unseen

    # 3. unrelated: synthetic/b0-b2 join the trained model from scratch and train with
    #    the seen tasks (nothing frozen): how much do the seen tasks lose?
    python -m multitask_moe.train --config=configs/add_tasks.py:unrelated \
        --workdir=workdir/unrelated

Runs 2 and 3 read the seen model from workdir/seen; --config.init_from=DIR names another.
Other routings: --config=configs/add_tasks.py:unseen,routing=task_tokens. Fewer examples
of the held-out tasks: :unseen,shots=10. The seen and unrelated tasks trained together
from the start (the reference for run 3): :joint.
"""

from multitask_moe.core import config_lib

SEEN = {
    "digits/class": 1.0,
    "digits/rotated": 1.0,
    "synthetic/a0": 1.0,
    "synthetic/a1": 1.0,
    "wine": 0.5,
    "breast_cancer": 0.5,
    "iris": 0.5,
}
HELD_OUT = ("digits/parity", "synthetic/a2")
UNRELATED = {"synthetic/b0": 1.0, "synthetic/b1": 1.0, "synthetic/b2": 1.0}


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(
        arg, routing="task", unseen=False, unrelated=False, joint=False, shots=50
    )
    if args.unseen + args.unrelated + args.joint > 1:
        raise ValueError("add_tasks: choose one of unseen, unrelated and joint")
    c = config_lib.sibling_config(__file__, "default", f"routing={args.routing}")
    c.data.tasks = config_lib.format_weights(SEEN)
    if args.joint:
        c.data.tasks = config_lib.format_weights({**SEEN, **UNRELATED})
    if args.unseen:
        c.init_from = "workdir/seen"
        # The seen tasks keep their ids and are evaluated, but only the new ones are sampled:
        # with freeze=shared nothing a seen task owns can move.
        held_out = ", ".join(f"{name}=1@{args.shots}" for name in HELD_OUT)
        c.data.tasks = config_lib.format_weights(dict.fromkeys(SEEN, 0.0)) + ", " + held_out
        c.new_task_init = "nearest"
        c.freeze = "shared"
        c.num_train_steps = 500
        c.optimizer.warmup_steps = 20
        c.eval_every_steps = 250
        c.checkpoint_every_steps = 250
    if args.unrelated:
        c.init_from = "workdir/seen"
        c.data.tasks = config_lib.format_weights({**SEEN, **UNRELATED})
        c.new_task_init = "scratch"
        c.freeze = "none"
        c.num_train_steps = 1000
    return c
