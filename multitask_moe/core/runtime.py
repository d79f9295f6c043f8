"""Process set-up for the command line: flag errors as one line, JAX start-up from config.

JAX reads its platform and the simulated CPU device count once, when it first builds its
backends; `configure_jax` must run before anything touches a device, which is why the
entry point calls it first and the config carries these fields (the default config gets
its 8-device CPU mesh without any XLA_FLAGS in the environment).
"""

from __future__ import annotations

import re
import sys
from typing import NoReturn

import ml_collections
from absl import flags, logging


def fail(message: str, status: int = 2) -> NoReturn:
    """One `error:` line on stderr, no traceback."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    sys.exit(status)


def warn(message: str) -> None:
    """A warning in the log and, from process 0, one `warning:` line on stderr (a skipped
    unreadable checkpoint, a setting that does less than it says)."""
    import jax  # here: importing this module must not start JAX (configure_jax)

    logging.warning(message)
    if jax.process_index() == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)


def _config_path(argv: list[str]) -> str | None:
    for index, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and index + 1 < len(argv):
            return argv[index + 1]
    return None


def _unknown_key(argv: list[str], error: BaseException) -> str:
    """Names the override whose key the config does not have, and the keys it does."""
    path = _config_path(argv)
    overrides = [re.match(r"--config\.([^=]+)", arg) for arg in argv]
    keys = [match.group(1) for match in overrides if match]
    if path is not None:
        from ml_collections.config_flags import config_flags

        try:
            config = config_flags.ConfigFileFlagParser(name="config").parse(path)
        except Exception:  # noqa: BLE001 - the original error is reported below
            config = None
        if isinstance(config, ml_collections.ConfigDict):
            for key in keys:
                node = config
                for depth, part in enumerate(key.split(".")):
                    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                        where = ".".join(["config"] + key.split(".")[:depth])
                        known = (
                            sorted(node.keys())
                            if isinstance(node, ml_collections.ConfigDict)
                            else []
                        )
                        return (
                            f"unknown config key {key!r} (--config.{key}); {where} has keys {known}"
                        )
                    node = node[part]
    return f"bad --config override {keys}: {error}"


def parse_flags(argv: list[str], flag_values: flags.FlagValues) -> list[str]:
    """absl flag parsing whose failures (bad flag, unknown config key) are one line."""
    try:
        return flag_values(argv)
    except flags.Error as error:
        text = str(error)
        if "Traceback (most recent call last)" in text:  # the config file itself raised
            last = text.strip().splitlines()[-1].strip()
            reason = re.sub(r"^\w+(Error|Exception): ", "", last)
            fail(f"could not load --config={_config_path(argv)}: {reason}")
        fail(text)
    except (AttributeError, KeyError, TypeError) as error:
        # ml_collections raises these for an override of a key the config does not have.
        fail(_unknown_key(argv, error))


def loaded_config(value, flag_text: str) -> ml_collections.ConfigDict:
    """The parsed --config, or one error line if it is missing or failed to load."""
    if value is None:
        fail("--config is required, e.g. --config=configs/default.py")
    path = flag_text.removeprefix("--config=")
    try:
        value.keys()  # ml_collections defers load errors to the first access
    except OSError as error:
        while error.__cause__ is not None:  # the file system's own error, if any
            error = error.__cause__
        if isinstance(error, FileNotFoundError) or "No such file" in str(error):
            fail(f"could not load --config={path}: no such file (expected configs/<name>.py)")
        fail(f"could not load --config={path}: {error}")
    return value


def command_config(argv: list[str], config_flag, workdir_flag, example: str):
    """The --config of a command that takes --config and --workdir (train, evolve), with
    what each checks first: no positional argument, a --workdir; TFDS's per-dataset INFO
    lines silenced unless --verbosity is given; and JAX configured from the config before
    anything touches a device. Any problem is one `error:` line, exit status 2."""
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}; use --config.<key>=<value> overrides")
    config = loaded_config(config_flag.value, flags.FLAGS[config_flag.name].serialize())
    if not workdir_flag.value:
        fail(f"--workdir is required (e.g. --workdir={example})")
    configure_jax(config)
    return config


def parse_mesh(text: str) -> dict[str, int] | None:
    """Axis sizes from a --mesh flag such as "data=8,expert=1"; None for ""."""
    if not text:
        return None
    mesh = {}
    for item in text.split(","):
        name, sep, size = item.partition("=")
        try:
            mesh[name.strip()] = int(size)
        except ValueError:
            sep = ""
        if not sep:
            fail(f"--mesh={text!r}: {item!r} is not axis=size (e.g. data=8,expert=1)")
    return mesh


def configure_jax(config: ml_collections.ConfigDict) -> None:
    """Platform, simulated CPU devices and multi-host start-up, before JAX starts."""
    import jax

    if config.platform:
        jax.config.update("jax_platforms", config.platform)
    if config.num_cpu_devices:
        if config.num_cpu_devices < 0:
            fail(f"num_cpu_devices={config.num_cpu_devices} must be >= 0 (0 = leave as is)")
        jax.config.update("jax_num_cpu_devices", config.num_cpu_devices)
    from multitask_moe import parallel

    try:
        parallel.initialize(config.distributed)
    except ValueError as error:
        fail(f"distributed={config.distributed!r}: {error}")
