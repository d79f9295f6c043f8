"""The floor every command stands on: a model from its config, its state, its step, its
checkpoints and its workdir, with no training run in it.

Modules: config_lib (the config schema every configs/*.py starts from), errors (the one
ConfigError and its one-line wording), build (every check of a config, the mesh, the
task mixture, the abstract model and its compiled eval step), state (sharded creation,
the optimizer), step (the one train step, of training and of evolution, and the eval
step), evaluate (a model over every eval example, the results table), checkpoint
(Orbax: atomic writes, the unreadable-step fallback, the multi-process agreement),
workdir (a trained model restored from its directory), run_lock (one run per workdir),
runtime (command-line set-up, before JAX starts).

train/ (the run, the loop, warm starts and its command line), evolution/, lifecycle/
(extraction, evaluation) and the commands build on this floor, never on each other.
"""
