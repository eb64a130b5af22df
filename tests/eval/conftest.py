"""Shared fixtures for the evaluation tests: real images and the FID network, loaded once per session."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

ASSET = Path(__file__).resolve().parents[2] / "ulcore" / "data" / "assets" / "fashion_mnist_subset.npz"
DEBIAN = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


def _structured(n: int, seed: int) -> np.ndarray:
    """Fallback real-looking images: random blobs and stripes on 28x28 (used only when no data file exists)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:28, :28]
    out = np.zeros((n, 28, 28), np.uint8)
    for i in range(n):
        cy, cx, r = rng.uniform(8, 20), rng.uniform(8, 20), rng.uniform(4, 9)
        blob = ((yy - cy) ** 2 + (xx - cx) ** 2 < r**2) * rng.uniform(120, 255)
        stripes = (np.sin(xx * rng.uniform(0.3, 1.2)) > 0) * rng.uniform(0, 60)
        out[i] = np.clip(blob + stripes, 0, 255)
    return out


@pytest.fixture(scope="session")
def gray_images() -> np.ndarray:
    """(N, 28, 28) uint8 Fashion-MNIST images: the package asset, else Debian's file, else structured fakes."""
    if ASSET.is_file():
        with np.load(ASSET) as z:
            return z["val_images"]
    if DEBIAN.is_file():
        with gzip.open(DEBIAN) as f:
            return np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:1000].copy()
    return _structured(400, 0)


@pytest.fixture(scope="session")
def extractor():
    from ulcore.eval.inception import FidFeatureExtractor

    return FidFeatureExtractor("", batch_size=16)


def write_image_shards(cfg, images: np.ndarray, per_split: int = 8) -> None:
    """One PNG shard per configured split: `per_split` images each (split j starts at image 50 j), RGB 32²."""
    import io

    from PIL import Image

    from ulcore import storage
    from ulcore.data.shards import write_shard

    def samples(split, start, n):
        for i in range(start, start + n):
            rgb = np.repeat(np.asarray(Image.fromarray(images[i]).resize((32, 32)))[..., None], 3, axis=2)
            buf = io.BytesIO()
            Image.fromarray(rgb).save(buf, format="PNG")
            yield {"__key__": f"{split}_{i:05d}", "png": buf.getvalue(), "cls": i % 10}

    for j, split in enumerate(cfg.data.splits):
        write_shard(storage.join(cfg.storage.root, "data", "shards", split, f"{split}-000000.tar"),
                    samples(split, j * 50, per_split))
