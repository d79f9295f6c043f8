# Shared by the launch scripts: the one command every worker runs.
# CONFIG and WORKDIR come from the environment; extra script arguments
# (e.g. --config.num_train_steps=1000) are passed through to the trainer.
CONFIG="${CONFIG:-configs/default.py}"
WORKDIR="${WORKDIR:?set WORKDIR (a gs:// path on TPU pods, a shared filesystem path elsewhere)}"
# Prints the command, quoted so that it survives one more shell (ssh, srun bash -c).
train_command() {
  printf 'python -m multitask_moe.train --config=%q --workdir=%q' "$CONFIG" "$WORKDIR"
  if (($#)); then printf ' %q' "$@"; fi
}
