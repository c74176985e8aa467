"""Image folders written for the tests: class folders of small PNGs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_tiny(root: Path, classes: dict[str, int], start: int = 0) -> None:
    """``classes``: folder below ``root`` -> number of 8x8 PNGs, each one flat grey value of
    its own (``start``, ``start + 1``, ...), named ``00.png``, ``01.png``, ..."""
    value = start
    for name, count in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.fromarray(np.full((8, 8), value, np.uint8), "L").save(root / name / f"{i:02d}.png")
            value += 1


def colours(root, classes: int, per_class: int, seed: int = 0):
    """``classes`` folders ``class 0``, ``class 1``, ... of ``per_class`` 12x12 RGB PNGs of
    noise around a grey level of 40 per class; returns ``root``."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"class {c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(40 * c, 20, (12, 12, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"class {c}" / f"{i}.png")
    return root
