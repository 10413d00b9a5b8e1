"""Write the packaged test subset ``graphred/data/scenes_test.npz`` (the first
``SHIPPED_SCENES`` test scenes) from the installed Fashion-MNIST files.

    apt-get install dataset-fashion-mnist
    python bench/make_scenes.py
"""
from __future__ import annotations

import os

from graphred.data import scenes


def main() -> None:
    test = scenes.load("test", n_scenes=scenes.SHIPPED_SCENES)
    test.save(scenes.SHIPPED_FILE)
    print(f"wrote {scenes.SHIPPED_FILE} ({os.path.getsize(scenes.SHIPPED_FILE) / 1e6:.2f} MB): "
          f"{test.num_scenes} scenes, {len(test)} questions, kinds {test.kinds()}")


if __name__ == "__main__":
    main()
