"""Shared fixtures: real images from ../shared/datasets, a real local Ray."""

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CATS_DOGS = Path(os.environ.get("RUNNER_CATS_DOGS",
                                ROOT.parent / "shared" / "datasets" / "cats_dogs"))
# Every Ray address the tests start stays on 127.0.0.1.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# As runner.cluster does for a Ray it starts: augmentation tasks reuse idle
# worker processes instead of starting (and importing torch in) new ones.
os.environ.setdefault("RAY_num_workers_soft_limit", "8")
os.chdir(ROOT)  # job files name paths relative to the project


@pytest.fixture(scope="session")
def real_images():
    """16 real training JPEGs (8 cats, 8 dogs) at 64x64: (N x 3 x 64 x 64 in
    [0, 1], labels with cats=0, dogs=1)."""
    import numpy as np
    import torch
    from PIL import Image

    assert CATS_DOGS.is_dir(), f"real images not found at {CATS_DOGS}"
    images, labels = [], []
    for label, cls in enumerate(("cats", "dogs")):
        for path in sorted((CATS_DOGS / "training_set" / cls).glob("*.jpg"))[:8]:
            with Image.open(path) as im:
                pixels = np.asarray(im.convert("RGB").resize((64, 64), Image.BILINEAR))
            images.append(torch.from_numpy(pixels.copy()).permute(2, 0, 1))
            labels.append(label)
    return torch.stack(images).float() / 255.0, torch.tensor(labels)


@pytest.fixture(scope="session")
def cats_dogs_subset(tmp_path_factory):
    """A copy of the first 40 training and 20 test JPEGs of each class, in the
    dataset's own layout."""
    assert CATS_DOGS.is_dir(), f"real images not found at {CATS_DOGS}"
    root = tmp_path_factory.mktemp("cats_dogs")
    for split, n in (("training_set", 40), ("test_set", 20)):
        for cls in ("cats", "dogs"):
            (root / split / cls).mkdir(parents=True)
            files = sorted((CATS_DOGS / split / cls).glob("*.jpg"))[:n]
            for f in files:
                shutil.copy(f, root / split / cls / f.name)
    return root


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray with 2 CPUs on loopback, shut down after the module."""
    import ray

    # The dashboard stays on: Ray Train relies on its state API to free the
    # CPUs of a trial that Tune stopped early.
    ray.init(num_cpus=2, logging_level="WARNING")
    assert all(n["NodeManagerAddress"] == "127.0.0.1" for n in ray.nodes())
    yield ray
    ray.shutdown()
