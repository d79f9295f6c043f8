# Shared by the launch scripts: the one command every worker runs, and --dry-run.
# CONFIG and WORKDIR come from the environment; extra script arguments
# (e.g. --config.num_train_steps=1000) are passed through to the trainer.
CONFIG="${CONFIG:-configs/default.py}"
WORKDIR="${WORKDIR:?set WORKDIR (a gs:// path on TPU pods, a shared filesystem path elsewhere)}"

# `--dry-run` anywhere among the script's arguments: print every command ("+ cmd ...",
# quoted for a shell) instead of running it. The other arguments stay in "$@".
DRY_RUN=0
_args=()
for _arg in "$@"; do
  if [[ "$_arg" == --dry-run ]]; then DRY_RUN=1; else _args+=("$_arg"); fi
done
set -- ${_args[@]+"${_args[@]}"}

# Runs a command, or prints it under --dry-run.
run() {
  if ((DRY_RUN)); then
    printf '+'; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}

# Prints the command, quoted so that it survives one more shell (ssh, srun bash -c).
train_command() {
  printf 'python -m multitask_moe.train --config=%q --workdir=%q' "$CONFIG" "$WORKDIR"
  if (($#)); then printf ' %q' "$@"; fi
}
