"""The grid-scene VQA set: deterministic generation, a disjoint split, answers that follow
from the layout, the packaged subset, and a clear message when the dataset is missing."""
from __future__ import annotations

import numpy as np
import pytest

from graphred.data import scenes
from graphred.errors import GraphredError

HAVE_DATASET = (scenes.dataset_dir() / "t10k-images-idx3-ubyte.gz").is_file()
needs_dataset = pytest.mark.skipif(not HAVE_DATASET, reason="apt-get install dataset-fashion-mnist")


def _fake_source(n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random 28x28 'photographs' (never blank) with labels covering every class."""
    rng = np.random.default_rng(seed)
    images = rng.integers(1, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % len(scenes.CLASSES)).astype(np.uint8)
    return images, labels


def _same(a: scenes.SceneSet, b: scenes.SceneSet) -> bool:
    return (np.array_equal(a.images, b.images) and np.array_equal(a.layout, b.layout)
            and np.array_equal(a.items, b.items) and a.questions == b.questions)


def _answer_from_layout(q: scenes.Question, layout: list[int]) -> str:
    """Recompute a question's answer from the words of the question and the scene layout."""
    words = q.text.split()
    if q.kind == "what":
        (pos,) = [w for w in words if w in scenes.POSITIONS]
        c = layout[scenes.POSITIONS.index(pos)]
        return scenes.CLASSES[c] if c >= 0 else "nothing"
    if q.kind == "count":
        (pl,) = [w for w in words if w in scenes.PLURALS]
        return scenes.NUMBERS[layout.count(scenes.PLURALS.index(pl))]
    (name,) = [w for w in words if w in scenes.CLASSES]
    c = scenes.CLASSES.index(name)
    if q.kind == "exists":
        return "yes" if c in layout else "no"
    assert q.kind == "where" and layout.count(c) == 1, q
    return scenes.POSITIONS[layout.index(c)]


def _check_consistent(s: scenes.SceneSet, source_images: np.ndarray | None = None) -> None:
    assert len(s) == 4 * s.num_scenes
    assert s.images.shape == (s.num_scenes, scenes.IMAGE_SIZE, scenes.IMAGE_SIZE) and s.images.dtype == np.uint8
    for i, q in enumerate(s.questions):
        assert q.scene == i // 4 and q.kind == scenes.KINDS[i % 4]
        assert q.answer in scenes.ANSWERS
        assert q.answer == _answer_from_layout(q, s.layout[q.scene].tolist()), q
    # the pixels follow the layout: each occupied cell holds its photograph, empty cells are black
    cells = s.images.reshape(-1, 3, 28, 3, 28).transpose(0, 1, 3, 2, 4).reshape(s.num_scenes, 9, 28, 28)
    occupied = s.layout >= 0
    assert np.array_equal(occupied, s.items >= 0)
    assert (cells[~occupied] == 0).all()
    assert 2 <= occupied.sum(1).min() and occupied.sum(1).max() <= 5
    if source_images is not None:
        assert np.array_equal(cells[occupied], source_images[s.items[occupied]])


def test_generation_is_deterministic_and_prefix_stable():
    src = _fake_source()
    a = scenes.generate("test", 40, source=src)
    b = scenes.generate("test", 40, source=src)
    assert _same(a, b)
    # the first k scenes do not depend on how many are generated
    assert _same(scenes.generate("test", 15, source=src), a.subset(15))
    # another seed gives other scenes
    assert not np.array_equal(scenes.generate("test", 40, source=src, seed=99).layout, a.layout)


def test_questions_follow_the_layout():
    src = _fake_source()
    s = scenes.generate("train", 300, source=src)
    _check_consistent(s, src[0])
    kinds = s.kinds()
    assert kinds == {k: 300 for k in scenes.KINDS}
    answers = {q.answer for q in s.questions}
    # every kind of answer occurs: empty cells, several positions, yes and no, counts above one
    assert {"nothing", "yes", "no", "zero", "one", "two"} <= answers
    assert len(answers & set(scenes.POSITIONS)) >= 8 and len(answers & set(scenes.CLASSES)) == 10


def test_tokenizer_covers_every_question_and_answer():
    tok = scenes.SceneTokenizer()
    s = scenes.generate("test", 200, source=_fake_source())
    for q in s.questions:
        ids = tok.encode(q.text)
        assert tok.unk_id not in ids and tok.decode(ids) == q.text
        assert len(ids) <= 10
    assert len(set(tok.answer_token_ids)) == len(scenes.ANSWERS)
    assert all(tok.vocab[i] == a for i, a in zip(tok.answer_token_ids, scenes.ANSWERS))
    assert (tok.pad_id, tok.bos_id, tok.image_id) == (0, 1, 4)
    assert scenes.SceneTokenizer.from_dict(tok.to_dict()) == tok
    with pytest.raises(GraphredError):
        scenes.SceneTokenizer(["<pad>", "x"])


def test_missing_dataset_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("GRAPHRED_FASHION_MNIST", str(tmp_path))
    monkeypatch.setattr(scenes, "_SOURCE_CACHE", {})
    with pytest.raises(GraphredError, match="apt-get install dataset-fashion-mnist") as info:
        scenes.load("test", 5)
    assert isinstance(info.value, scenes.DatasetMissingError)
    # the packaged subset needs no dataset
    shipped = scenes.load_shipped()
    assert shipped.num_scenes == scenes.SHIPPED_SCENES


def test_damaged_dataset_file_is_a_clear_error(monkeypatch, tmp_path):
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (tmp_path / name).write_bytes(b"not gzip")
    monkeypatch.setenv("GRAPHRED_FASHION_MNIST", str(tmp_path))
    monkeypatch.setattr(scenes, "_SOURCE_CACHE", {})
    with pytest.raises(GraphredError, match="reinstall"):
        scenes.load("test", 5)


def test_unknown_split():
    with pytest.raises(GraphredError, match="unknown split"):
        scenes.generate("val", 3, source=_fake_source())


def test_shipped_subset_is_consistent_and_roundtrips(tmp_path):
    s = scenes.load_shipped()
    assert s.split == "test" and s.num_scenes == scenes.SHIPPED_SCENES
    _check_consistent(s)
    path = tmp_path / "s.npz"
    s.subset(7).save(path)
    assert _same(scenes.SceneSet.from_npz(path), s.subset(7))
    px = s.pixel_values(s.questions[:3])
    assert px.shape == (3, 3, 84, 84) and float(px.min()) >= -1 and float(px.max()) <= 1
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(GraphredError, match="cannot read"):
        scenes.SceneSet.from_npz(tmp_path / "bad.npz")


@needs_dataset
def test_shipped_subset_equals_the_generated_test_scenes():
    assert _same(scenes.load_shipped(), scenes.load("test", scenes.SHIPPED_SCENES))


@needs_dataset
def test_real_split_sizes_and_disjointness():
    train, test = scenes.load("train"), scenes.load("test")
    assert (train.num_scenes, len(train)) == (20_000, 80_000)
    assert (test.num_scenes, len(test)) == (1_000, 4_000)
    imgs, _ = scenes._source("t10k")
    _check_consistent(test, imgs)
    # no test canvas occurs among the training canvases (they come from different photographs)
    train_hashes = {hash(im.tobytes()) for im in train.images}
    assert not any(hash(im.tobytes()) in train_hashes for im in test.images)
    # answers are spread: no answer dominates any kind of question
    for kind in scenes.KINDS:
        answers = [q.answer for q in test.questions if q.kind == kind]
        top = max(answers.count(a) for a in set(answers))
        assert top / len(answers) < 0.6, kind
