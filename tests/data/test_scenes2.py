"""The cluttered scene set (graphred.data.scenes2): deterministic, the shipped split is what the
generator makes, and every answer is read from the asked-about object's patches alone."""
from __future__ import annotations

import functools

import numpy as np
import pytest

from graphred.data import models, scenes2
from graphred.errors import GraphredError

N = 12  # scenes checked against the shipped split (generation: ~20 ms a scene)


@functools.lru_cache(maxsize=None)
def _shipped() -> scenes2.SceneSet2:
    return scenes2.load_shipped()


@functools.lru_cache(maxsize=None)
def _generated() -> scenes2.SceneSet2:
    return scenes2.generate("test", N)


def test_shipped_split_is_what_the_generator_makes():
    s, g = _shipped(), _generated()
    assert s.num_scenes == scenes2.SHIPPED_SCENES and len(s) == 4 * s.num_scenes
    assert s.images.shape == (s.num_scenes, 224, 224) and s.images.dtype == np.uint8
    assert np.array_equal(s.images[:N], g.images)
    assert np.array_equal(s.layout[:N], g.layout) and np.array_equal(s.clutter[:N], g.clutter)
    assert s.questions[: 4 * N] == g.questions


def test_scenes_are_generated_by_index_alone():
    g = _generated()
    pick = scenes2.generate("test", [7, 3])
    assert np.array_equal(pick.images, g.images[[7, 3]])
    assert [q._replace(scene=0) for q in pick.questions[:4]] == [q._replace(scene=0) for q in g.questions[28:32]]
    train = scenes2.generate("train", [0])
    assert not np.array_equal(train.images[0], g.images[0])  # the splits differ
    with pytest.raises(GraphredError, match="unknown split"):
        scenes2.generate("val", 1)
    with pytest.raises(GraphredError, match="indices"):
        scenes2.generate("test", [-1])


def test_questions_are_well_formed_and_varied():
    s = _shipped()
    tok = scenes2.tokenizer()
    assert s.kinds() == {k: s.num_scenes for k in scenes2.KINDS}
    for q in s.questions:
        assert q.answer in scenes2.ANSWERS
        words = tok.encode(q.text)
        assert tok.unk_id not in words and len(words) <= scenes2.MAX_QUESTION_WORDS
        assert scenes2.CLASSES[q.target] in q.text or scenes2.PLURALS[q.target] in q.text
    for kind in scenes2.KINDS:  # no kind is answered by one constant
        answers = {q.answer for q in s.questions if q.kind == kind}
        assert len(answers) >= 2, kind
    # small objects on a large canvas: 8-14 (+1) of 196 cells, lots of clutter
    objects = (s.layout >= 0).sum(1)
    assert objects.min() >= 8 and objects.max() <= 15
    assert (s.clutter >= 0).sum(1).mean() > 60
    assert not ((s.layout >= 0) & (s.clutter >= 0)).any()


def _answer_from_cells(q: scenes2.Question, cells: list[int], classes: dict[int, int]) -> str:
    """The answer computed from the relevant cells' contents and positions only."""
    own = [c for c in cells if classes[c] == q.target]
    if q.kind == "exists":
        return "yes" if own else "no"
    if q.kind == "count":
        return scenes2.NUMBERS[len(own)]
    if q.kind == "where":
        return scenes2.quadrant(own[0])
    left = own[0] - 1
    return scenes2.CLASSES[classes[left]] if classes[left] >= 0 else "nothing"


def test_every_answer_sits_in_the_asked_about_patches():
    s = _shipped()
    for q in s.questions:
        cells = s.relevant_cells(q)
        assert len(cells) <= 5  # at most four objects of a class (+ the left neighbour)
        classes = {c: int(s.layout[q.scene, c]) for c in cells}
        assert _answer_from_cells(q, cells, classes) == q.answer, q


def test_an_object_patch_alone_tells_its_class():
    """Nearest sprite (correlation over the 16x16 patch only) recovers the class of almost every object
    cell: the answer is in those pixels, not in the layout table alone."""
    s, sp = _shipped(), scenes2.load_sprites()
    pool, labels = sp["test"].astype(np.float64), sp["test_labels"]
    pool = (pool - pool.mean((1, 2), keepdims=True)).reshape(len(pool), -1)
    pool /= np.linalg.norm(pool, axis=1, keepdims=True) + 1e-9
    hits = total = 0
    for i in range(20):
        for cell in np.flatnonzero(s.layout[i] >= 0):
            r, c = divmod(int(cell), scenes2.GRID)
            patch = s.images[i, 16 * r: 16 * r + 16, 16 * c: 16 * c + 16].astype(np.float64).ravel()
            patch -= patch.mean()
            best = int(np.argmax(pool @ patch))
            hits += int(labels[best] == s.layout[i, cell])
            total += 1
    assert total > 150 and hits / total > 0.9, (hits, total)


def test_vqa2_models_are_named_like_the_first_ones():
    assert models.family("vqa2-llava") == "llava" and models.family("vqa-blip") == "blip"
    assert models.geometry("vqa2-vilt") == (224, 16) and models.image_tokens("vqa2-llava") == 196
    assert models.image_tokens("vqa-llava") == 49
    assert models.default_tokenizer("vqa2-blip") == scenes2.tokenizer()
    with pytest.raises(GraphredError, match="unknown trained model"):
        models.family("vqa3-llava")
    s = _shipped()
    tok = scenes2.tokenizer()
    kw = models.build_inputs("vqa2-llava", tok, s, s.questions[:3])
    assert (kw["input_ids"] == tok.image_id).sum(1).tolist() == [196] * 3
    assert kw["pixel_values"].shape == (3, 3, 224, 224)
    kw = models.build_inputs("vqa2-vilt", tok, s, s.questions[:2])
    assert kw["pixel_mask"].shape == (2, 224, 224)
