"""Small files a run writes (config.json, evolution.json, extraction.json, ...), each
written beside its place and renamed over it, so a reader (a resumed run, a notebook
polling a live one) never sees half a file. Local paths and gs:// alike."""

from __future__ import annotations

import json
import os

import ml_collections

from multitask_moe.core.config_lib import CONFIG_FILE


def write_text(path: str, text: str) -> None:
    import tensorflow as tf  # gs:// paths; here so that importing this module stays light

    tmp = f"{path}.tmp-{os.getpid()}"
    with tf.io.gfile.GFile(tmp, "w") as f:
        f.write(text)
    tf.io.gfile.rename(tmp, path, overwrite=True)


def write_json(path: str, contents) -> None:
    """`contents` as indented JSON at `path`."""
    write_text(path, json.dumps(contents, indent=2) + "\n")


def write_config(directory: str, config: ml_collections.ConfigDict) -> None:
    """directory/config.json: the config a run, an evolution or an extraction ran with."""
    write_text(os.path.join(directory, CONFIG_FILE), config.to_json_best_effort(indent=2) + "\n")
