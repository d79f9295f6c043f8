"""The README's Python examples run as written (the public contract's first contact)."""

import os
import re

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _python_blocks() -> list[str]:
    with open(README) as f:
        return re.findall(r"^```python\n(.*?)^```", f.read(), flags=re.S | re.M)


def test_readme_layer_and_mesh_examples_run():
    # The 8 simulated CPU devices come from tests/conftest.py.
    blocks = _python_blocks()
    assert len(blocks) >= 2
    namespace: dict = {}
    exec(compile(blocks[0], "README.md:layer", "exec"), namespace)  # noqa: S102
    assert namespace["y"].shape == (4, 16, 64)
    exec(compile(blocks[1], "README.md:mesh", "exec"), namespace)  # noqa: S102
    y = namespace["y"]
    assert y.shape == (8, 16, 64)
    assert y.sharding.spec[0] == ("data", "expert")  # tokens stay split over the batch axes
