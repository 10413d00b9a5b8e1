"""Cluttered scenes: small real objects on a large textured canvas, one object asked about.

The second scene set of graphred's accuracy benchmark, built so that *which* image tokens a
reduction keeps decides the answer. Each scene is a 224x224 grayscale canvas cut into a 14x14
grid of 16x16 cells, one cell per image patch of the models (patch 16: 196 image tokens).

- The background is a texture (a few oriented sinusoids and pixel grain, different per scene).
- Eight to fourteen cells hold a Fashion-MNIST photograph (downscaled to 16x16): the objects.
- About half of the other cells hold clutter: a handwritten digit (scikit-learn's ``load_digits``
  8x8 images, upscaled to 16x16) as bright as the objects, so that a text-agnostic score (a
  token's norm, its saliency) cannot tell the objects from the clutter.

Every scene carries four questions, one of each kind; each is about one class of object, and its
answer sits in the cells of that class (at most four of the 196; none for an absent class):

==========  =========================================  ==============================
kind        example                                     answers
==========  =========================================  ==============================
``exists``  ``is there a bag ?``                        ``yes`` / ``no``
``count``   ``how many shirts are there ?``             ``zero`` ... ``four``
``where``   ``where is the sneaker ?``                  a quadrant (``top-left`` ...)
``left``    ``what is left of the coat ?``              a class, or ``nothing``
==========  =========================================  ==============================

``where`` and ``left`` ask about a class that occurs exactly once; ``left`` names the class of
the object in the cell directly left of it (``nothing`` for a digit or bare texture).
:meth:`SceneSet2.relevant_cells` gives, per question, the cells its answer is read from (the
oracle of the benchmark keeps their tokens).

The sprites ship with graphred (``graphred/data/sprites2.npz``: 1,500 training and 300 test
Fashion-MNIST photographs, 300 digits, all 16x16 uint8), so generating scenes needs only numpy:
the training split draws from the training photographs, the test split from the test ones.
Scene ``i`` of a split is generated from its own seed (``split seed, i``), so any scene can be
made alone, the same on every machine; the first :data:`SHIPPED_SCENES` test scenes also ship
as ``graphred/data/scenes2_test.npz``.

>>> from graphred.data import scenes2
>>> test = scenes2.load_shipped()
>>> test.images.shape[1:], len(test) == 4 * test.num_scenes
((224, 224), True)
>>> q = test[0]
>>> q.kind in scenes2.KINDS and q.answer in scenes2.ANSWERS
True
>>> scenes2.generate("test", [0]).images[0].tobytes() == test.images[0].tobytes()
True
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

import numpy as np
import torch

from ..errors import GraphredError
from .scenes import CLASSES, PLURALS, SceneTokenizer, SPECIAL_TOKENS, pixel_values

__all__ = [
    "ANSWERS",
    "CELL",
    "GRID",
    "IMAGE_SIZE",
    "KINDS",
    "QUADRANTS",
    "SHIPPED_SCENES",
    "SPLITS",
    "Question",
    "SceneSet2",
    "generate",
    "load_shipped",
    "load_sprites",
    "tokenizer",
]

#: Bumped whenever generation changes; stored in the shipped subset and checked on load.
GENERATOR_VERSION = 1

GRID = 14
CELL = 16
IMAGE_SIZE = GRID * CELL  # 224
NUM_CELLS = GRID * GRID  # 196

QUADRANTS: tuple[str, ...] = ("top-left", "top-right", "bottom-left", "bottom-right")
NUMBERS: tuple[str, ...] = ("zero", "one", "two", "three", "four")
KINDS: tuple[str, ...] = ("exists", "count", "where", "left")
#: The closed answer vocabulary, in a fixed order (the classifier heads' label order).
ANSWERS: tuple[str, ...] = CLASSES + ("nothing",) + QUADRANTS + ("yes", "no") + NUMBERS

TEMPLATES: dict[str, tuple[str, ...]] = {
    "exists": ("is there a {cls} ?", "is there a {cls} in the picture ?", "can you see a {cls} ?"),
    "count": ("how many {pl} are there ?", "how many {pl} are in the picture ?", "count the {pl} ."),
    "where": ("where is the {cls} ?", "in which quadrant is the {cls} ?", "where can you find the {cls} ?"),
    "left": ("what is left of the {cls} ?", "what is to the left of the {cls} ?",
             "which item is left of the {cls} ?"),
}
MAX_QUESTION_WORDS = 10

#: name -> (sprite pool, number of scenes, seed)
SPLITS: dict[str, tuple[str, int, int]] = {
    "train": ("train", 1_000_000, 11),
    "test": ("test", 2_000, 12),
}
SHIPPED_SCENES = 50
SHIPPED_FILE = Path(__file__).with_name("scenes2_test.npz")
SPRITES_FILE = Path(__file__).with_name("sprites2.npz")

_MIN_OBJECTS, _MAX_OBJECTS = 8, 14
_MAX_COUNT = len(NUMBERS) - 1
_CLUTTER = 0.5


class Question(NamedTuple):
    """One question about one scene."""

    scene: int
    kind: str
    text: str
    answer: str
    target: int  # the class asked about


# --------------------------------------------------------------------------------------------
# Sprites
# --------------------------------------------------------------------------------------------

_SPRITES: dict[str, np.ndarray] = {}


def load_sprites() -> dict[str, np.ndarray]:
    """The shipped sprites: ``{"train", "test"}`` ``(N, 16, 16)`` uint8 Fashion-MNIST photographs with
    ``"train_labels"``/``"test_labels"``, and ``"digits"`` ``(M, 16, 16)`` uint8."""
    if not _SPRITES:
        if not SPRITES_FILE.is_file():
            raise GraphredError(f"the packaged sprites are missing ({SPRITES_FILE}); reinstall graphred, or "
                                "rebuild them with `python bench/make_scenes2.py --sprites`")
        try:
            with np.load(SPRITES_FILE, allow_pickle=False) as z:
                _SPRITES.update({k: z[k] for k in z.files})
        except Exception as e:
            raise GraphredError(f"cannot read the sprite file {SPRITES_FILE}: {type(e).__name__}: {e}") from e
    return _SPRITES


# --------------------------------------------------------------------------------------------
# Scenes
# --------------------------------------------------------------------------------------------


@dataclass
class SceneSet2:
    """Scenes and their questions.

    ``images``: ``(S, 224, 224)`` uint8; ``layout``: ``(S, 196)`` int8, the Fashion-MNIST class in
    each cell (row-major) or -1; ``clutter``: ``(S, 196)`` int8, the digit in each cell or -1;
    ``questions``: four per scene, in scene order (``len()`` and indexing are over questions).
    """

    split: str
    images: np.ndarray
    layout: np.ndarray
    clutter: np.ndarray
    questions: list[Question]

    def __len__(self) -> int:
        return len(self.questions)

    def __getitem__(self, i: int) -> Question:
        return self.questions[i]

    @property
    def num_scenes(self) -> int:
        return int(self.images.shape[0])

    def select(self, question_indices: Sequence[int]) -> list[Question]:
        return [self.questions[int(i)] for i in question_indices]

    def pixel_values(self, questions: Sequence[Question]) -> torch.Tensor:
        """Normalised ``(B, 3, 224, 224)`` float pixels for the scenes of ``questions``."""
        return pixel_values(self.images[[q.scene for q in questions]])

    def kinds(self) -> dict[str, int]:
        out = {k: 0 for k in KINDS}
        for q in self.questions:
            out[q.kind] += 1
        return out

    def relevant_cells(self, q: Question) -> list[int]:
        """The cells (= image patches, row-major) the answer of ``q`` is read from: every cell of the
        class asked about, and for ``left`` the cell left of it too. Empty for an absent class."""
        row = self.layout[q.scene]
        cells = [int(c) for c in np.flatnonzero(row == q.target)]
        if q.kind == "left":
            cells = cells + [cells[0] - 1]
        return cells

    def save(self, path: str | os.PathLike) -> None:
        """Write the set as a compressed ``.npz`` (no pickled objects)."""
        np.savez_compressed(
            path, version=np.array(GENERATOR_VERSION), split=np.array(self.split), images=self.images,
            layout=self.layout, clutter=self.clutter,
            q_scene=np.array([q.scene for q in self.questions], dtype=np.int32),
            q_kind=np.array([q.kind for q in self.questions]), q_text=np.array([q.text for q in self.questions]),
            q_answer=np.array([q.answer for q in self.questions]),
            q_target=np.array([q.target for q in self.questions], dtype=np.int8),
        )

    @classmethod
    def from_npz(cls, path: str | os.PathLike) -> "SceneSet2":
        try:
            with np.load(path, allow_pickle=False) as z:
                version = int(z["version"])
                if version != GENERATOR_VERSION:
                    raise GraphredError(
                        f"{path} was written by scene generator version {version}, this graphred generates "
                        f"version {GENERATOR_VERSION}; regenerate it with bench/make_scenes2.py")
                qs = [Question(int(s), str(k), str(t), str(a), int(g)) for s, k, t, a, g in
                      zip(z["q_scene"], z["q_kind"], z["q_text"], z["q_answer"], z["q_target"])]
                return cls(str(z["split"]), z["images"], z["layout"], z["clutter"], qs)
        except GraphredError:
            raise
        except Exception as e:
            raise GraphredError(f"cannot read the scene file {path}: {type(e).__name__}: {e}") from e


def quadrant(cell: int) -> str:
    r, c = divmod(int(cell), GRID)
    return QUADRANTS[2 * (r >= GRID // 2) + (c >= GRID // 2)]


def _texture(rng: random.Random, scale: float = 1.0) -> np.ndarray:
    """A per-scene background: three oriented sinusoids and pixel grain, values about 10..110."""
    y, x = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float64)
    out = np.full((IMAGE_SIZE, IMAGE_SIZE), rng.uniform(35.0, 60.0))
    for _ in range(3):
        theta, freq = rng.uniform(0, np.pi), rng.uniform(0.05, 0.6)
        amp, phase = rng.uniform(5.0, 20.0), rng.uniform(0, 2 * np.pi)
        out += amp * np.sin(freq * (x * np.cos(theta) + y * np.sin(theta)) + phase)
    grain = np.random.Generator(np.random.PCG64(rng.getrandbits(63))).random((IMAGE_SIZE, IMAGE_SIZE))
    out += 30.0 * (grain - 0.5)
    return out if scale == 1.0 else out.mean() + scale * (out - out.mean())


def _scene(rng: random.Random, scene: int, pool: np.ndarray, labels_by_class: list[list[int]],
           digits: np.ndarray, ease: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[Question]]:
    ncls = len(CLASSES)
    k = rng.randint(_MIN_OBJECTS, _MAX_OBJECTS)
    palette = rng.sample(range(ncls), rng.randint(5, 7))
    # classes: each palette class at most _MAX_COUNT times, at least one class exactly once
    while True:
        classes = [rng.choice(palette) for _ in range(k)]
        counts = {c: classes.count(c) for c in set(classes)}
        if max(counts.values()) <= _MAX_COUNT and any(v == 1 for v in counts.values()):
            break
    layout = np.full(NUM_CELLS, -1, dtype=np.int8)
    cells = rng.sample(range(NUM_CELLS), k)
    for cell, c in zip(cells, classes):
        layout[cell] = c
    # a "left" target: a once-occurring class not in column 0; often give it a left neighbour object
    once = [c for c, v in sorted(counts.items()) if v == 1]
    left_cls = rng.choice(once)
    cell = int(np.flatnonzero(layout == left_cls)[0])
    if cell % GRID == 0:  # move it one cell right if that is free, else pick a free cell not in column 0
        free = [i for i in range(NUM_CELLS) if layout[i] < 0 and i % GRID != 0]
        layout[cell], cell = -1, rng.choice(free)
        layout[cell] = left_cls
    if layout[cell - 1] < 0 and rng.random() < 0.6:
        choices = [c for c in range(ncls) if counts.get(c, 0) < _MAX_COUNT and c != left_cls]
        c = rng.choice(choices)
        layout[cell - 1] = c
        counts[c] = counts.get(c, 0) + 1
    clutter = np.full(NUM_CELLS, -1, dtype=np.int8)
    image = _texture(rng, 1.0 - ease)
    for i in range(NUM_CELLS):
        r, col = divmod(i, GRID)
        box = (slice(r * CELL, (r + 1) * CELL), slice(col * CELL, (col + 1) * CELL))
        if layout[i] >= 0:
            idx = labels_by_class[int(layout[i])]
            sprite = pool[idx[rng.randrange(len(idx))]].astype(np.float64) * rng.uniform(0.75, 1.0)
            image[box] = np.maximum(image[box], sprite)
        elif rng.random() < _CLUTTER * (1.0 - ease):
            d = rng.randrange(len(digits))
            clutter[i] = d % 10
            image[box] = np.maximum(image[box], digits[d].astype(np.float64) * rng.uniform(0.45, 0.75))
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return image, layout, clutter, _questions(rng, scene, layout, left_cls)


def _questions(rng: random.Random, scene: int, layout: np.ndarray, left_cls: int) -> list[Question]:
    row = layout.tolist()
    present = sorted({c for c in row if c >= 0})
    absent = [c for c in range(len(CLASSES)) if c not in present]
    counts = {c: row.count(c) for c in present}
    out = []
    cls = rng.choice(present) if rng.random() < 0.5 else rng.choice(absent)
    out.append(Question(scene, "exists", rng.choice(TEMPLATES["exists"]).format(cls=CLASSES[cls]),
                        "yes" if cls in counts else "no", cls))
    cls = rng.choice(present) if rng.random() < 0.8 else rng.choice(absent)
    out.append(Question(scene, "count", rng.choice(TEMPLATES["count"]).format(pl=PLURALS[cls]),
                        NUMBERS[counts.get(cls, 0)], cls))
    cls = rng.choice([c for c in present if counts[c] == 1])
    out.append(Question(scene, "where", rng.choice(TEMPLATES["where"]).format(cls=CLASSES[cls]),
                        quadrant(row.index(cls)), cls))
    at = row.index(left_cls)
    ans = CLASSES[row[at - 1]] if row[at - 1] >= 0 else "nothing"
    out.append(Question(scene, "left", rng.choice(TEMPLATES["left"]).format(cls=CLASSES[left_cls]), ans, left_cls))
    return out


def generate(split: str, indices: Iterable[int] | int, *, ease: float = 0.0) -> SceneSet2:
    """Scenes ``indices`` of ``split`` (``range(indices)`` for an int); scene ``i`` is the same whichever
    other scenes are generated with it. Question ``q.scene`` is the position in ``indices``.

    ``ease`` in [0, 1] (a training curriculum; 0, the default, is the benchmark's scenes) thins the
    clutter and flattens the texture by that fraction: the same objects and questions, less haystack."""
    if not 0.0 <= float(ease) <= 1.0:
        raise GraphredError(f"ease must be in [0, 1], got {ease!r}")
    if split not in SPLITS:
        raise GraphredError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
    pool_name, limit, seed = SPLITS[split]
    idx = list(range(indices)) if isinstance(indices, int) else [int(i) for i in indices]
    if any(i < 0 or i >= limit for i in idx):
        raise GraphredError(f"scene indices of split {split!r} must be in [0, {limit})")
    sp = load_sprites()
    pool, labels, digits = sp[pool_name], sp[f"{pool_name}_labels"], sp["digits"]
    by_class = [np.flatnonzero(labels == c).tolist() for c in range(len(CLASSES))]
    n = len(idx)
    images = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    layout = np.full((n, NUM_CELLS), -1, dtype=np.int8)
    clutter = np.full((n, NUM_CELLS), -1, dtype=np.int8)
    questions: list[Question] = []
    for s, i in enumerate(idx):
        rng = random.Random(f"graphred-scenes2:{seed}:{i}")
        images[s], layout[s], clutter[s], qs = _scene(rng, s, pool, by_class, digits, float(ease))
        questions.extend(qs)
    return SceneSet2(split, images, layout, clutter, questions)


def load_shipped() -> SceneSet2:
    """The first :data:`SHIPPED_SCENES` test scenes, from the file shipped in the package."""
    if not SHIPPED_FILE.is_file():
        raise GraphredError(f"the packaged test scenes are missing ({SHIPPED_FILE}); reinstall graphred, or "
                            "regenerate them with `python bench/make_scenes2.py`")
    return SceneSet2.from_npz(SHIPPED_FILE)


def _words() -> list[str]:
    words: set[str] = set(ANSWERS) | set(PLURALS)
    for temps in TEMPLATES.values():
        for t in temps:
            words.update(w for w in t.split() if not w.startswith("{"))
    return sorted(words)


def tokenizer() -> SceneTokenizer:
    """The word tokenizer of this scene set (special tokens as :class:`~graphred.data.scenes.SceneTokenizer`,
    then its words sorted; answers in :data:`ANSWERS` order)."""
    return SceneTokenizer(list(SPECIAL_TOKENS) + _words(), ANSWERS)
