"""How `ulcore/data/assets/fashion_mnist_subset.npz` was made (run once by a maintainer, not by the pipeline).

Source: Debian's `dataset-fashion-mnist` package (`/usr/share/datasets/fashion-mnist/*.gz`, the original idx
files of Zalando's Fashion-MNIST, MIT licence; see assets/LICENSE-fashion-mnist.txt). We keep the first
TRAIN_PER_CLASS training images and the first VAL_PER_CLASS t10k images of every class, in file order, so the
subset is reproducible from the public files and small enough to ship in the wheel (~2 MB compressed).

    python -m ulcore.data.make_assets [--source /usr/share/datasets/fashion-mnist]
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np

TRAIN_PER_CLASS = 500
VAL_PER_CLASS = 100
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")  # Fashion-MNIST's label order
ASSET = Path(__file__).with_name("assets") / "fashion_mnist_subset.npz"


def read_idx(path: Path, offset: int) -> np.ndarray:
    """idx files: a big-endian header (16 bytes for images, 8 for labels), then raw uint8."""
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


def first_per_class(images: np.ndarray, labels: np.ndarray, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    keep = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(len(CLASS_NAMES))])
    keep.sort()  # file order, classes interleaved as in the source
    return images[keep], labels[keep]


def build(source: Path, out: Path = ASSET) -> Path:
    parts = {}
    for split, prefix, per_class in (("train", "train", TRAIN_PER_CLASS), ("val", "t10k", VAL_PER_CLASS)):
        images = read_idx(source / f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
        labels = read_idx(source / f"{prefix}-labels-idx1-ubyte.gz", 8)
        if len(images) != len(labels):
            raise ValueError(f"{source}/{prefix}-*: {len(images)} images but {len(labels)} labels")
        parts[f"{split}_images"], parts[f"{split}_labels"] = first_per_class(images, labels, per_class)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, class_names=np.array(CLASS_NAMES), **parts)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    args = parser.parse_args()
    path = build(args.source)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.2f} MiB)")


if __name__ == "__main__":
    main()
