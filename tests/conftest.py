"""Shared fixtures. Append new fixtures; do not rewrite others'."""

from pathlib import Path

import pytest

CATS_DOGS = Path("/work/shared/datasets/cats_dogs")


@pytest.fixture(scope="session")
def real_images():
    """16 real training JPEGs (8 cats, 8 dogs) at 64x64: (N x 3 x 64 x 64 in
    [0, 1], labels with cats=0, dogs=1)."""
    import numpy as np
    import torch
    from PIL import Image

    if not CATS_DOGS.is_dir():
        pytest.skip(f"real images not found at {CATS_DOGS}")
    images, labels = [], []
    for label, cls in enumerate(("cats", "dogs")):
        for path in sorted((CATS_DOGS / "training_set" / cls).glob("*.jpg"))[:8]:
            with Image.open(path) as im:
                pixels = np.asarray(im.convert("RGB").resize((64, 64), Image.BILINEAR))
            images.append(torch.from_numpy(pixels.copy()).permute(2, 0, 1))
            labels.append(label)
    return torch.stack(images).float() / 255.0, torch.tensor(labels)
