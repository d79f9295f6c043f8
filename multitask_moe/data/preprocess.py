"""Per-example preprocessing into tokens (TensorFlow; used inside tf.data maps).

Shapes: H, W, C image height, width, channels; S image_size; p patch_size;
N = (S / p)^2 patches; F tabular features; L, P the common layout (tokens, features).

- image [H, W, C] uint8 -> resize to [S, S, C] (bilinear, antialiased; skipped when the
  image already is S x S) -> x / 127.5 - 1 in [-1, 1] -> non-overlapping p x p patches in
  row-major order, each flattened in (row, column, channel) order -> tokens [N, p*p*C].
  A Dense layer over the p*p*C values of a token equals a ViT patch embedding (a conv with
  kernel p and stride p).
- features [F] float32 -> (x - mean) / std with train-split statistics -> tokens [F, 1].
- text (a UTF-8 string) -> its first T bytes, each byte b as the value b + 1 -> tokens
  [T, 1], 0 after the text's end (byte-level: no vocabulary, nothing to download).
- tokens [n, d] -> zero-padded inputs [L, P] plus mask [L] (True for the n real tokens,
  or for the `valid` ones: a text shorter than T leaves padding among its n tokens).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf


def image_tokens(image: tf.Tensor, image_size: int, patch_size: int) -> tf.Tensor:
    """uint8 image [H, W, C] -> float32 tokens [(S/p)^2, p*p*C] in [-1, 1]."""
    channels = image.shape[-1]
    x = tf.cast(image, tf.float32)
    if tuple(image.shape[:2]) != (image_size, image_size):
        x = tf.image.resize(x, (image_size, image_size), method="bilinear", antialias=True)
    x = tf.clip_by_value(x / 127.5 - 1.0, -1.0, 1.0)  # [S, S, C]
    grid = image_size // patch_size
    x = tf.reshape(x, (grid, patch_size, grid, patch_size, channels))  # [g, p, g, p, C]
    x = tf.transpose(x, (0, 2, 1, 3, 4))  # [g, g, p, p, C]
    return tf.reshape(x, (grid * grid, patch_size * patch_size * channels))


def tabular_tokens(features: tf.Tensor, mean: np.ndarray, std: np.ndarray) -> tf.Tensor:
    """float features [F] -> standardized tokens [F, 1] (the value is the token's feature 0)."""
    x = (tf.cast(features, tf.float32) - mean.astype(np.float32)) / std.astype(np.float32)
    return x[:, None]


def text_tokens(text: tf.Tensor, length: int) -> tf.Tensor:
    """UTF-8 string [] -> float32 tokens [T, 1]: byte b of the first T bytes as b + 1,
    then 0 (so 0 marks the end; `text_valid` reads the mask back)."""
    values = tf.io.decode_raw(text, tf.uint8)[:length]  # [n <= T]
    values = tf.cast(values, tf.float32) + 1.0
    values = tf.pad(values, ((0, length - tf.shape(values)[0]),))
    return tf.reshape(values, (length, 1))


def text_valid(tokens: tf.Tensor) -> tf.Tensor:
    """text tokens [T, 1] -> bool [T]: the positions that hold a byte, and always the
    first (an empty text is one padding token, never a row with nothing to attend to)."""
    return tf.concat([tf.constant([True]), tokens[1:, 0] > 0], axis=0)


def pad_tokens(
    tokens: tf.Tensor, length: int, width: int, valid: tf.Tensor | None = None
) -> tuple[tf.Tensor, tf.Tensor]:
    """tokens [n, d] (static n <= L, d <= P) -> inputs [L, P] float32, mask [L] bool;
    `valid` [n] marks the real ones among the n (all when None)."""
    n, d = tokens.shape
    if n > length or d > width:
        raise ValueError(f"Tokens of shape {(n, d)} do not fit the layout {(length, width)}.")
    inputs = tf.pad(tokens, ((0, length - n), (0, width - d)))
    if valid is None:
        mask = tf.constant(np.arange(length) < n)
    else:
        mask = tf.pad(valid, ((0, length - n),))
    return inputs, mask
