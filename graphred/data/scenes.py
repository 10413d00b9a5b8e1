"""Grid scenes of real Fashion-MNIST photographs with templated questions (a small VQA set).

Each scene is an 84x84 grayscale canvas cut into a 3x3 grid of 28x28 cells. Two to five
cells hold a Fashion-MNIST item (a real product photograph), the others are empty (black).
Every scene carries four questions, one of each kind, that refer to specific objects or
positions, so that answering needs the right image tokens:

==========  =========================================  ==========================
kind        example                                     answers
==========  =========================================  ==========================
``what``    ``what is at the top-left ?``               a class, or ``nothing``
``where``   ``where is the sneaker ?``                  one of the nine positions
``exists``  ``is there a bag in the picture ?``         ``yes`` / ``no``
``count``   ``how many shirts are there ?``             ``zero`` ... ``five``
==========  =========================================  ==========================

Generation is deterministic from a seed (Python's :mod:`random`, whose integer streams are
stable across Python versions). The split is fixed: 20,000 training scenes built from the
Fashion-MNIST training images and 1,000 test scenes built from its test images, so no
photograph appears in both. The first :data:`SHIPPED_SCENES` test scenes ship with graphred
(``graphred/data/scenes_test.npz``) and load without the dataset package.

>>> from graphred.data import scenes
>>> test = scenes.load_shipped()
>>> len(test.images), len(test)          # scenes, questions (four per scene)
(300, 1200)
>>> q = test[0]
>>> q.kind in scenes.KINDS and q.answer in scenes.ANSWERS
True
>>> tok = scenes.SceneTokenizer()
>>> tok.decode(tok.encode("where is the bag ?"))
'where is the bag ?'

The full splits need Debian's ``dataset-fashion-mnist`` package (``apt-get install
dataset-fashion-mnist``): ``scenes.load("train")``, ``scenes.load("test")``.
"""
from __future__ import annotations

import gzip
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

import numpy as np
import torch

from ..errors import GraphredError

__all__ = [
    "ANSWERS",
    "CLASSES",
    "GRID",
    "CELL",
    "IMAGE_SIZE",
    "KINDS",
    "POSITIONS",
    "SHIPPED_SCENES",
    "SPLITS",
    "DatasetMissingError",
    "Question",
    "SceneSet",
    "SceneTokenizer",
    "dataset_dir",
    "generate",
    "load",
    "load_shipped",
    "pixel_values",
]

#: Bumped whenever generation changes; stored in the shipped subset and checked on load.
GENERATOR_VERSION = 1

GRID = 3
CELL = 28
IMAGE_SIZE = GRID * CELL  # 84

#: Fashion-MNIST label names, in label order (single words).
CLASSES: tuple[str, ...] = (
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot",
)
PLURALS: tuple[str, ...] = (
    "t-shirts", "trousers", "pullovers", "dresses", "coats", "sandals", "shirts", "sneakers", "bags", "boots",
)
#: Cell names, row-major (cell index = 3 * row + column).
POSITIONS: tuple[str, ...] = (
    "top-left", "top-middle", "top-right",
    "middle-left", "center", "middle-right",
    "bottom-left", "bottom-middle", "bottom-right",
)
NUMBERS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five")
KINDS: tuple[str, ...] = ("what", "where", "exists", "count")
#: The closed answer vocabulary, in a fixed order (the classifier heads' label order).
ANSWERS: tuple[str, ...] = CLASSES + ("nothing",) + POSITIONS + ("yes", "no") + NUMBERS

TEMPLATES: dict[str, tuple[str, ...]] = {
    "what": (
        "what is at the {pos} ?",
        "what is in the {pos} cell ?",
        "which item is at the {pos} of the grid ?",
        "what do you see in the {pos} ?",
    ),
    "where": (
        "where is the {cls} ?",
        "in which cell is the {cls} ?",
        "where can you find the {cls} in the grid ?",
    ),
    "exists": (
        "is there a {cls} ?",
        "is there a {cls} in the picture ?",
        "does the grid contain a {cls} ?",
    ),
    "count": (
        "how many {pl} are there ?",
        "how many {pl} are in the picture ?",
        "what is the number of {pl} in the grid ?",
    ),
}

#: name -> (Fashion-MNIST file prefix, number of scenes, seed)
SPLITS: dict[str, tuple[str, int, int]] = {
    "train": ("train", 20_000, 1),
    "test": ("t10k", 1_000, 2),
}
SHIPPED_SCENES = 300
SHIPPED_FILE = Path(__file__).with_name("scenes_test.npz")

#: Where Debian's ``dataset-fashion-mnist`` installs its files; ``GRAPHRED_FASHION_MNIST``
#: overrides it.
DEFAULT_DATASET_DIR = Path("/usr/share/datasets/fashion-mnist")

_MIN_OBJECTS, _MAX_OBJECTS = 2, 5


class DatasetMissingError(GraphredError, FileNotFoundError):
    """The Fashion-MNIST files are not installed."""


class Question(NamedTuple):
    """One question about one scene."""

    scene: int  # index of the scene in its SceneSet
    kind: str  # one of KINDS
    text: str  # space-separated words
    answer: str  # one of ANSWERS


# --------------------------------------------------------------------------------------------
# Fashion-MNIST files
# --------------------------------------------------------------------------------------------


def dataset_dir() -> Path:
    """The directory holding the Fashion-MNIST ``*-idx*-ubyte.gz`` files."""
    env = os.environ.get("GRAPHRED_FASHION_MNIST")
    return Path(env) if env else DEFAULT_DATASET_DIR


def _read_idx(path: Path, offset: int) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)
    except FileNotFoundError:
        raise
    except (OSError, EOFError, ValueError) as e:
        raise GraphredError(
            f"{path} is not a readable Fashion-MNIST file ({e}); reinstall it with "
            "`apt-get install --reinstall dataset-fashion-mnist`"
        ) from e


_SOURCE_CACHE: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}


def _source(prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST images ``(N, 28, 28)`` uint8 and labels ``(N,)`` for ``train``/``t10k``."""
    root = dataset_dir()
    key = (str(root), prefix)
    if key in _SOURCE_CACHE:
        return _SOURCE_CACHE[key]
    img_path = root / f"{prefix}-images-idx3-ubyte.gz"
    lab_path = root / f"{prefix}-labels-idx1-ubyte.gz"
    if not img_path.is_file() or not lab_path.is_file():
        raise DatasetMissingError(
            f"the Fashion-MNIST files are not installed (looked for {img_path.name} and {lab_path.name} in "
            f"{root}). Install Debian's dataset package: `apt-get install dataset-fashion-mnist` "
            "(or point GRAPHRED_FASHION_MNIST at a directory holding the four *-ubyte.gz files). "
            "The packaged test subset needs nothing: graphred.data.scenes.load_shipped()."
        )
    labels = _read_idx(lab_path, 8)
    images = _read_idx(img_path, 16)
    if images.size != labels.size * CELL * CELL:
        raise GraphredError(f"{img_path} holds {images.size} bytes of pixels for {labels.size} labels")
    out = (images.reshape(-1, CELL, CELL), labels)
    _SOURCE_CACHE[key] = out
    return out


# --------------------------------------------------------------------------------------------
# Scenes
# --------------------------------------------------------------------------------------------


@dataclass
class SceneSet:
    """Scenes and their questions.

    ``images``: ``(S, 84, 84)`` uint8 canvases; ``layout``: ``(S, 9)`` int8, the class in each
    cell (row-major) or -1 for an empty cell; ``items``: ``(S, 9)`` int32, the index of each
    cell's photograph in its Fashion-MNIST split (-1 when empty); ``questions``: four per scene,
    in scene order. ``len()`` and indexing are over questions.
    """

    split: str
    images: np.ndarray
    layout: np.ndarray
    items: np.ndarray
    questions: list[Question]

    def __len__(self) -> int:
        return len(self.questions)

    def __getitem__(self, i: int) -> Question:
        return self.questions[i]

    @property
    def num_scenes(self) -> int:
        return int(self.images.shape[0])

    def subset(self, n_scenes: int) -> "SceneSet":
        """The first ``n_scenes`` scenes with their questions."""
        n = min(int(n_scenes), self.num_scenes)
        return SceneSet(self.split, self.images[:n], self.layout[:n], self.items[:n],
                        [q for q in self.questions if q.scene < n])

    def select(self, question_indices: Sequence[int]) -> list[Question]:
        return [self.questions[int(i)] for i in question_indices]

    def pixel_values(self, questions: Sequence[Question]) -> torch.Tensor:
        """Normalised ``(B, 3, 84, 84)`` float pixels for the scenes of ``questions``."""
        return pixel_values(self.images[[q.scene for q in questions]])

    def kinds(self) -> dict[str, int]:
        out = {k: 0 for k in KINDS}
        for q in self.questions:
            out[q.kind] += 1
        return out

    def save(self, path: str | os.PathLike) -> None:
        """Write the set as a compressed ``.npz`` (no pickled objects)."""
        np.savez_compressed(
            path,
            version=np.array(GENERATOR_VERSION),
            split=np.array(self.split),
            images=self.images,
            layout=self.layout,
            items=self.items,
            q_scene=np.array([q.scene for q in self.questions], dtype=np.int32),
            q_kind=np.array([q.kind for q in self.questions]),
            q_text=np.array([q.text for q in self.questions]),
            q_answer=np.array([q.answer for q in self.questions]),
        )

    @classmethod
    def from_npz(cls, path: str | os.PathLike) -> "SceneSet":
        try:
            with np.load(path, allow_pickle=False) as z:
                version = int(z["version"])
                if version != GENERATOR_VERSION:
                    raise GraphredError(
                        f"{path} was written by scene generator version {version}, this graphred "
                        f"generates version {GENERATOR_VERSION}; regenerate it with bench/make_scenes.py"
                    )
                qs = [Question(int(s), str(k), str(t), str(a))
                      for s, k, t, a in zip(z["q_scene"], z["q_kind"], z["q_text"], z["q_answer"])]
                return cls(str(z["split"]), z["images"], z["layout"], z["items"], qs)
        except GraphredError:
            raise
        except Exception as e:  # zip/npz/key errors: a damaged file
            raise GraphredError(f"cannot read the scene file {path}: {type(e).__name__}: {e}") from e


def pixel_values(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(B, H, W)`` grayscale -> float ``(B, 3, H, W)`` in [-1, 1] (the channel replicated)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32).div_(255.0).sub_(0.5).div_(0.5)
    return x.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def _scene_questions(rng: random.Random, scene: int, layout: list[int]) -> list[Question]:
    present = sorted({c for c in layout if c >= 0})
    absent = [c for c in range(len(CLASSES)) if c not in present]
    counts = {c: layout.count(c) for c in present}
    occupied = [i for i, c in enumerate(layout) if c >= 0]
    empty = [i for i, c in enumerate(layout) if c < 0]
    out = []

    # what is at <pos>: mostly an occupied cell, sometimes an empty one
    pos = rng.choice(empty) if (empty and rng.random() < 0.2) else rng.choice(occupied)
    ans = CLASSES[layout[pos]] if layout[pos] >= 0 else "nothing"
    out.append(Question(scene, "what", rng.choice(TEMPLATES["what"]).format(pos=POSITIONS[pos]), ans))

    # where is <cls>: a class that occurs exactly once
    cls = rng.choice([c for c in present if counts[c] == 1])
    out.append(Question(scene, "where", rng.choice(TEMPLATES["where"]).format(cls=CLASSES[cls]),
                        POSITIONS[layout.index(cls)]))

    # is there a <cls>: half present, half absent
    cls = rng.choice(present) if rng.random() < 0.5 else rng.choice(absent)
    out.append(Question(scene, "exists", rng.choice(TEMPLATES["exists"]).format(cls=CLASSES[cls]),
                        "yes" if cls in counts else "no"))

    # how many <cls>: mostly present classes
    cls = rng.choice(present) if rng.random() < 0.65 else rng.choice(absent)
    out.append(Question(scene, "count", rng.choice(TEMPLATES["count"]).format(pl=PLURALS[cls]),
                        NUMBERS[counts.get(cls, 0)]))
    return out


def generate(split: str, n_scenes: int | None = None, *, seed: int | None = None,
             source: tuple[np.ndarray, np.ndarray] | None = None) -> SceneSet:
    """Build the scenes of ``split`` from Fashion-MNIST (or from ``source=(images, labels)``).

    Scenes are generated one after another from one seeded stream, so the first ``k`` scenes
    are the same whatever ``n_scenes`` is.
    """
    if split not in SPLITS:
        raise GraphredError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
    prefix, default_n, default_seed = SPLITS[split]
    n = default_n if n_scenes is None else int(n_scenes)
    if n < 0:
        raise GraphredError(f"n_scenes must be >= 0, got {n}")
    images_src, labels = source if source is not None else _source(prefix)
    by_class = [np.flatnonzero(labels == c).tolist() for c in range(len(CLASSES))]
    if any(not idx for idx in by_class):
        raise GraphredError("the Fashion-MNIST source lacks some class; cannot compose scenes")
    rng = random.Random(default_seed if seed is None else seed)
    ncell = GRID * GRID
    layout = np.full((n, ncell), -1, dtype=np.int8)
    items = np.full((n, ncell), -1, dtype=np.int32)
    questions: list[Question] = []
    for s in range(n):
        k = rng.randint(_MIN_OBJECTS, _MAX_OBJECTS)
        cells = rng.sample(range(ncell), k)
        # a small palette makes repeated classes (counts above one) common
        palette = rng.sample(range(len(CLASSES)), rng.randint(2, k))
        while True:  # at least one class must occur exactly once (for the "where" question)
            classes = [rng.choice(palette) for _ in cells]
            if any(classes.count(c) == 1 for c in classes):
                break
        row = [-1] * ncell
        for cell, c in zip(cells, classes):
            row[cell] = c
            items[s, cell] = by_class[c][rng.randrange(len(by_class[c]))]
        layout[s] = row
        questions.extend(_scene_questions(rng, s, row))
    images = _compose(images_src, items)
    return SceneSet(split, images, layout, items, questions)


def _compose(source: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Canvases ``(S, 84, 84)``: each cell's photograph, black where the cell is empty."""
    n = items.shape[0]
    tiles = np.zeros((n, GRID * GRID, CELL, CELL), dtype=np.uint8)
    mask = items >= 0
    tiles[mask] = source[items[mask]]
    return tiles.reshape(n, GRID, GRID, CELL, CELL).transpose(0, 1, 3, 2, 4).reshape(n, IMAGE_SIZE, IMAGE_SIZE)


def load(split: str = "test", n_scenes: int | None = None) -> SceneSet:
    """Generate a split from the installed Fashion-MNIST files (``apt-get install dataset-fashion-mnist``).

    Raises :class:`DatasetMissingError` (a :class:`~graphred.errors.GraphredError`) saying how to
    install them when they are missing.
    """
    return generate(split, n_scenes)


def load_shipped() -> SceneSet:
    """The first :data:`SHIPPED_SCENES` test scenes, from the file shipped in the package."""
    if not SHIPPED_FILE.is_file():
        raise GraphredError(
            f"the packaged test scenes are missing ({SHIPPED_FILE}); reinstall graphred, or regenerate them "
            "with `python bench/make_scenes.py` (needs `apt-get install dataset-fashion-mnist`)"
        )
    return SceneSet.from_npz(SHIPPED_FILE)


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>", "<unk>", "<image>", "[CLS]", "[SEP]")


def _words() -> list[str]:
    words: set[str] = set(ANSWERS) | set(PLURALS)
    for temps in TEMPLATES.values():
        for t in temps:
            words.update(w for w in t.split() if not w.startswith("{"))
    return sorted(words)


class SceneTokenizer:
    """A word-level tokenizer over the template vocabulary.

    Ids: ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, ``<unk>`` 3, ``<image>`` 4, ``[CLS]`` 5,
    ``[SEP]`` 6, then the words in sorted order. Every answer is one word of the vocabulary
    (so a decoder answers with one next token); ``answer_token_ids[i]`` is the token of
    ``ANSWERS[i]``.

    >>> tok = SceneTokenizer()
    >>> tok.encode("is there a bag ?") == [tok.token_to_id[w] for w in "is there a bag ?".split()]
    True
    >>> tok.answers[tok.answer_index("yes")]
    'yes'
    """

    def __init__(self, vocab: Iterable[str] | None = None, answers: Iterable[str] | None = None):
        self.vocab: list[str] = list(vocab) if vocab is not None else list(SPECIAL_TOKENS) + _words()
        self.answers: list[str] = list(answers) if answers is not None else list(ANSWERS)
        if self.vocab[: len(SPECIAL_TOKENS)] != list(SPECIAL_TOKENS):
            raise GraphredError(f"a scene vocabulary starts with {SPECIAL_TOKENS}, got {self.vocab[:7]}")
        if len(set(self.vocab)) != len(self.vocab):
            raise GraphredError("the scene vocabulary has duplicate words")
        self.token_to_id = {w: i for i, w in enumerate(self.vocab)}
        missing = [a for a in self.answers if a not in self.token_to_id]
        if missing:
            raise GraphredError(f"answers not in the vocabulary: {missing}")
        self.answer_to_index = {a: i for i, a in enumerate(self.answers)}
        self.answer_token_ids = [self.token_to_id[a] for a in self.answers]
        (self.pad_id, self.bos_id, self.eos_id, self.unk_id, self.image_id, self.cls_id, self.sep_id) = range(7)

    def __len__(self) -> int:
        return len(self.vocab)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        return [self.token_to_id.get(w, self.unk_id) for w in text.split()]

    def decode(self, ids: Iterable[int]) -> str:
        return " ".join(self.vocab[int(i)] for i in ids)

    def answer_index(self, answer: str) -> int:
        return self.answer_to_index[answer]

    def to_dict(self) -> dict:
        return {"vocab": list(self.vocab), "answers": list(self.answers)}

    @classmethod
    def from_dict(cls, d: dict) -> "SceneTokenizer":
        return cls(d["vocab"], d["answers"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SceneTokenizer) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"SceneTokenizer(vocab={len(self.vocab)}, answers={len(self.answers)})"
