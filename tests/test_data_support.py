"""Shared helpers of the data tests: independent numpy references and a session data_dir.

No tests here. The references are written as plain loops, independently of the library's
reshape/transpose code, so they can catch a wrong patch or channel order.
"""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
    """One data_dir for the whole session; embedded datasets are built there on first use."""
    return str(tmp_path_factory.getbasetemp() / "mtm_data")


def patches_reference(image: np.ndarray, patch_size: int) -> np.ndarray:
    """float image [S, S, C] -> tokens [(S/p)^2, p*p*C], patches row-major, each (row, col, c)."""
    size, _, channels = image.shape
    tokens = []
    for top in range(0, size, patch_size):
        for left in range(0, size, patch_size):
            values = []
            for row in range(top, top + patch_size):
                for col in range(left, left + patch_size):
                    for c in range(channels):
                        values.append(image[row, col, c])
            tokens.append(values)
    return np.asarray(tokens, np.float32)


def bilinear_upsample_reference(image: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize [H, W, C] -> [size, size, C] with half-pixel centers (for upsampling)."""
    height, width, _ = image.shape
    out = np.zeros((size, size, image.shape[2]), np.float64)
    for i in range(size):
        y = min(max((i + 0.5) * height / size - 0.5, 0.0), height - 1)
        y0 = int(np.floor(y))
        y1, wy = min(y0 + 1, height - 1), y - y0
        for j in range(size):
            x = min(max((j + 0.5) * width / size - 0.5, 0.0), width - 1)
            x0 = int(np.floor(x))
            x1, wx = min(x0 + 1, width - 1), x - x0
            top = (1 - wx) * image[y0, x0] + wx * image[y0, x1]
            bottom = (1 - wx) * image[y1, x0] + wx * image[y1, x1]
            out[i, j] = (1 - wy) * top + wy * bottom
    return out


def image_tokens_reference(image_uint8: np.ndarray, image_size: int, patch_size: int) -> np.ndarray:
    """uint8 [H, W, C] -> tokens as the batch layout documents them."""
    image = image_uint8.astype(np.float64)
    if image.shape[0] != image_size:
        image = bilinear_upsample_reference(image, image_size)
    return patches_reference(image / 127.5 - 1.0, patch_size)


def row_keys(rows: np.ndarray, decimals: int = 4) -> list[bytes]:
    """Hashable keys of the rows of [N, ...] (rounded), for multiset comparisons."""
    rounded = np.round(np.asarray(rows, np.float64).reshape(len(rows), -1), decimals) + 0.0
    return [row.tobytes() for row in rounded]


def match_rows(found: np.ndarray, reference: np.ndarray, atol: float = 1e-4) -> np.ndarray:
    """For each row of found [N, ...], the index of an equal (within atol) reference row.

    Each reference row is used at most once (duplicates are told apart by using them up),
    so `sorted(match_rows(a, b)) == list(range(len(b)))` says a is a permutation of b.
    Raises AssertionError naming the first row without a partner.
    """
    found = np.asarray(found, np.float64).reshape(len(found), -1)
    reference = np.asarray(reference, np.float64).reshape(len(reference), -1)
    used = np.zeros(len(reference), bool)
    matches = np.empty(len(found), np.int64)
    for i, row in enumerate(found):
        close = np.flatnonzero(~used & (np.abs(reference - row).max(axis=1) <= atol))
        assert len(close), f"row {i} has no unused match in the reference"
        matches[i] = close[0]
        used[close[0]] = True
    return matches
