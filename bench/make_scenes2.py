"""Write the sprites and the packaged test subset of the cluttered scene set (graphred.data.scenes2).

    apt-get install dataset-fashion-mnist         # only for --sprites
    python bench/make_scenes2.py --sprites --digits /path/to/sklearn/datasets/data/digits.csv.gz
    python bench/make_scenes2.py                  # graphred/data/scenes2_test.npz from the shipped sprites

``--sprites`` builds ``graphred/data/sprites2.npz``: the first 150 (training) and 30 (test) photographs
of each class of Fashion-MNIST's training and test files, downscaled 28 -> 16 px (antialiased
bilinear), and 30 of each digit from scikit-learn's ``load_digits`` data (the ``digits.csv.gz`` file of
the scikit-learn wheel: ``pip download scikit-learn --no-deps`` and unzip it), 8 -> 16 px (nearest),
values 0..16 scaled to 0..255.
"""
from __future__ import annotations

import argparse
import gzip
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from graphred.data import scenes, scenes2  # noqa: E402

PER_CLASS = {"train": 150, "test": 30}
DIGITS_PER_CLASS = 30


def _downscale(images: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(images.astype(np.float32))[:, None]
    y = torch.nn.functional.interpolate(x, size=(scenes2.CELL, scenes2.CELL), mode="bilinear", antialias=True,
                                        align_corners=False)
    return y[:, 0].round().clamp(0, 255).to(torch.uint8).numpy()


def build_sprites(digits_csv: str) -> None:
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = _fashion(prefix)
        pick = np.concatenate([np.flatnonzero(labels == c)[: PER_CLASS[split]] for c in range(10)])
        out[split] = _downscale(images[pick])
        out[f"{split}_labels"] = labels[pick].astype(np.int8)
    with gzip.open(digits_csv, "rt") as f:
        rows = np.loadtxt(f, delimiter=",", dtype=np.int64)
    pix, lab = rows[:, :64].reshape(-1, 8, 8), rows[:, 64]
    pick = np.concatenate([np.flatnonzero(lab == d)[:DIGITS_PER_CLASS] for d in range(10)])
    big = np.repeat(np.repeat(pix[pick], 2, axis=1), 2, axis=2)
    out["digits"] = np.clip(big * 255 // 16, 0, 255).astype(np.uint8)
    out["digits_labels"] = lab[pick].astype(np.int8)
    np.savez_compressed(scenes2.SPRITES_FILE, **out)
    print(f"wrote {scenes2.SPRITES_FILE} ({os.path.getsize(scenes2.SPRITES_FILE) / 1e3:.0f} kB): "
          + ", ".join(f"{k} {v.shape}" for k, v in out.items()))


def _fashion(prefix: str):
    """Fashion-MNIST images ``(N, 28, 28)`` and labels of ``train``/``t10k`` (Debian's dataset-fashion-mnist)."""
    root = scenes.dataset_dir()
    with gzip.open(root / f"{prefix}-labels-idx1-ubyte.gz", "rb") as f:
        labels = np.frombuffer(f.read(), dtype=np.uint8, offset=8)
    with gzip.open(root / f"{prefix}-images-idx3-ubyte.gz", "rb") as f:
        images = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)
    return images, labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sprites", action="store_true", help="rebuild graphred/data/sprites2.npz first")
    ap.add_argument("--digits", default="/tmp/vqa2dl/sklearn/datasets/data/digits.csv.gz")
    args = ap.parse_args()
    if args.sprites:
        build_sprites(args.digits)
    test = scenes2.generate("test", scenes2.SHIPPED_SCENES)
    test.save(scenes2.SHIPPED_FILE)
    print(f"wrote {scenes2.SHIPPED_FILE} ({os.path.getsize(scenes2.SHIPPED_FILE) / 1e6:.2f} MB): "
          f"{test.num_scenes} scenes, {len(test)} questions, kinds {test.kinds()}")


if __name__ == "__main__":
    main()
