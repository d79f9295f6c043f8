r"""python -m multitask_moe.train --config=configs/tpu_image_mixture.py --workdir=gs://B/mix

Real TFDS image mixture (cifar10, cifar100, svhn_cropped, oxford_flowers102) on a Cloud TPU
pod: a ViT-B/16-sized, Mod-Squad-style MoE model. B is your GCS bucket.

- Data: read from $TFDS_DATA_DIR (export TFDS_DATA_DIR=gs://B/tensorflow_datasets) or
  --config.data.data_dir=gs://...; prepare each dataset once, with network access, e.g.
  `tfds build cifar10 --data_dir=gs://B/tensorflow_datasets`. Nothing is downloaded here.
- Hosts: run the same command on every host of the slice (launch/ has scripts), e.g.
  gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all --command="..."; the
  processes join by themselves (`distributed="auto"` detects the Cloud TPU VM). The
  workdir must be visible to every host (a gs:// bucket).
- Size: 256 chips (e.g. v4-512 / v5p-512); `mesh.data=-1` takes whatever the slice has,
  and the 'expert' axis of 8 holds 2 of the 16 MLP experts and 3 of the 24 attention
  experts per chip. ViT-B/16 at 224 px (196 tokens of 768 features), MoE MLP in odd blocks
  (16 experts, top-4, expert hidden 3072 / 4: Mod-Squad's active-compute-preserving size),
  MoA attention in even blocks (24 experts, top-12, head_dim 64), per-task routers with
  the mutual-information loss, bfloat16 activations.

It cannot run on the CPU here; tests/test_configs.py builds its model and traces its whole
train step abstractly on a fake 256-device mesh.
"""

from multitask_moe.core import config_lib

TASKS = {"cifar10": 1.0, "cifar100": 1.0, "svhn_cropped": 1.0, "oxford_flowers102": 1.0}


def get_config(arg: str | None = None):
    args = config_lib.parse_arg(arg, routing="per_task", experts=16, expert_axis=8)
    c = config_lib.base_config()
    c.platform = ""  # TPU
    c.num_cpu_devices = 0
    c.distributed = "auto"
    c.mesh.data = -1
    c.mesh.expert = args.expert_axis

    c.data.tasks = config_lib.format_weights(TASKS)
    c.data.rate = "temperature"
    c.data.temperature = 2.0  # flowers102 (1k train images) would be starved by proportional
    c.data.image_size = 224
    c.data.patch_size = 16
    c.data.data_dir = None  # $MTM_DATA_DIR / $TFDS_DATA_DIR unless set here

    c.batch_size = 4096
    c.eval_batch_size = 4096
    c.num_train_steps = 50_000
    c.log_every_steps = 100
    c.eval_every_steps = 5_000
    c.checkpoint_every_steps = 2_000
    c.keep_checkpoints = 3

    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 5_000
    c.optimizer.weight_decay = 0.05
    c.optimizer.b2 = 0.95

    c.model.d_model = 768
    c.model.depth = 12
    c.model.num_heads = 12
    c.model.mlp_dim = 3072
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.moe_every = 2
    c.model.moa_every = 2
    c.model.moe.num_experts = args.experts
    c.model.moe.top_k = 4
    c.model.moe.d_hidden = 0  # 3072 // 4
    c.model.moe.routing = args.routing
    c.model.moe.router_init = "zeros" if args.routing == "per_task" else "normal"
    c.model.moe.capacity_factor = 1.25
    c.model.moe.eval_capacity_factor = 2.0
    c.model.moa.num_experts = 24
    c.model.moa.top_k = 12
    c.model.moa.head_dim = 64
    c.model.moa.routing = args.routing
    c.model.moa.router_init = c.model.moe.router_init
    c.aux_loss.load_balance = 0.0
    c.aux_loss.router_z = 0.0
    c.aux_loss.mutual_info = 0.005
    return c
