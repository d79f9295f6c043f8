"""The floor every command stands on: a model from its config, its state, its step, its
checkpoints and its workdir, with no training run in it.

Modules: config_lib (the config schema every configs/*.py starts from), build (every
check of a config, the mesh, the task mixture, the abstract model and its compiled eval
step), state (sharded creation, the optimizer), step (the one train step, of training
and of evolution, and the eval step), evaluate (a model over every eval example, the
results table), checkpoint (Orbax: atomic writes, the unreadable-step fallback, the
multi-process agreement), storable (PRNG keys as stored data), failed_reads (quiet
after a failed read), workdir (a trained model restored from its directory), files
(config.json and other JSON, written atomically), run_lock (one run per workdir),
runtime (command-line set-up, before JAX starts). Bad input is a ConfigError
(multitask_moe/errors.py).

train/ (the run, the loop, warm starts and its command line), evolution/, lifecycle/
(extraction, evaluation) and the commands build on this floor, never on each other.
"""
