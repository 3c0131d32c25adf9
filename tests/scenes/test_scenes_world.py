"""The scenes world's data, captions, ground truth and evaluation arithmetic."""

from __future__ import annotations

import numpy as np
import pytest

from hypersd_core.evaluation import distribution as dist
from hypersd_core.scenes import evaluate as E
from hypersd_core.scenes.evalnets import EMPTY, targets
from hypersd_core.worlds import scenes as W


def test_a_seed_fixes_the_scene_and_its_pixels():
    a, b = W.sample_scene(123), W.sample_scene(123)
    assert a.to_json() == b.to_json()
    assert np.array_equal(W.render(a), W.render(b))
    assert W.render(a).shape == (64, 64, 3)
    assert W.sample_scene(124).to_json() != a.to_json()


def test_captions_parse_back_to_their_ground_truth():
    for s in W.scenes("train", 300):
        p = W.parse_caption(s.prompt)
        assert p.template == s.template and p.relation == s.relation and p.count == s.count
        assert [(o.cls, o.colour) for o in p.objects] == [(o.cls, o.colour) for o in s.objects]
        assert p.size_given == s.size_given
        for o, given in zip(p.objects, p.size_given * len(p.objects)):
            if given:
                assert o.size in W.SIZES


@pytest.mark.parametrize("bad", ["", "a red handwritten digit 7", "four red circles",
                                 "a purple circle left of a red star", "a red circle near a star"])
def test_prompts_outside_the_grammar_are_refused_with_an_example(bad):
    with pytest.raises(ValueError, match="expected e.g."):
        W.parse_caption(bad)


def test_objects_sit_inside_their_cells_and_relations_hold():
    for s in W.scenes("eval", 300):
        assert 2 <= len(s.objects) <= 3
        for o in s.objects:
            x0, y0, x1, y1 = o.box
            r, c = o.cell
            assert c * 32 < x0 < x1 < (c + 1) * 32 and r * 32 < y0 < y1 < (r + 1) * 32
            lo, hi = W.SIZES[o.size]
            assert lo <= x1 - x0 <= hi
        if s.template == "relation":
            (ax, ay), (bx, by) = s.objects[0].center, s.objects[1].center
            assert {"left of": ax < bx, "right of": ax > bx, "above": ay < by,
                    "below": ay > by}[s.relation]
        else:
            assert len({o.cell for o in s.objects}) == s.count


def test_captions_name_the_left_or_upper_object_first_and_prompts_may_say_either():
    items = W.scenes("train", 400)
    rel = [s for s in items if s.template == "relation"]
    assert {s.relation for s in rel} == set(W.CAPTION_RELATIONS)
    # all four layouts are still drawn: the first-named object sits in either row
    # (left of) or either column (above)
    assert {s.objects[0].cell for s in rel if s.relation == "left of"} == {(0, 0), (1, 0)}
    assert {s.objects[0].cell for s in rel if s.relation == "above"} == {(0, 0), (0, 1)}
    mirrored = W.parse_caption("a small red triangle right of a blue letter K")
    assert mirrored.relation == "right of" and mirrored.objects[0].cls == "triangle"


def test_splits_are_disjoint_seed_ranges():
    seeds = {k: {W.scene_seed(k, i) for i in (0, W.SPLIT_SIZE - 1)} for k in W.SPLITS}
    ranges = sorted((min(v), max(v)) for v in seeds.values())
    assert all(a[1] < b[0] for a, b in zip(ranges, ranges[1:]))
    with pytest.raises(ValueError):
        W.scene_seed("train", W.SPLIT_SIZE)
    # prompts for users and examples never come from a training or evaluation split
    assert all(W.SPLITS["test"] <= s.seed < W.SPLITS["test"] + W.SPLIT_SIZE
               for s in W.prompts(20, seed=3))


def _oracle(items):
    t = targets(items)
    return {"cls": t["cls"].numpy(), "colour": t["colour"].clamp(min=0).numpy(),
            "size": t["size"].clamp(min=0).numpy()}


def test_the_scorer_gives_full_marks_to_the_ground_truth_and_sees_each_error():
    items = W.scenes("eval", 200)
    read = _oracle(items)
    full = E.score_images(items, read)
    for k in E.ACC_KEYS:
        assert np.nanmean(full[k]) == 1.0, k
    rel = next(i for i, s in enumerate(items) if s.template == "relation")
    cnt = next(i for i, s in enumerate(items) if s.template == "count")
    # a wrong colour on one object of a relation scene
    bad = {k: v.copy() for k, v in read.items()}
    c = items[rel].objects[0].cell
    bad["colour"][rel, c[0] * 2 + c[1]] = (bad["colour"][rel, c[0] * 2 + c[1]] + 1) % 5
    s = E.score_image(items[rel], bad, rel)
    assert s["colour_acc"] == 0.5 and s["class_acc"] == 1.0 and s["all_correct"] == 0.0
    # objects swapped between the two sides: classes and colours found, relation wrong
    swap = {k: v.copy() for k, v in read.items()}
    ca, cb = (o.cell[0] * 2 + o.cell[1] for o in items[rel].objects)
    for k in swap:
        swap[k][rel, [ca, cb]] = swap[k][rel, [cb, ca]]
    s = E.score_image(items[rel], swap, rel)
    assert s["class_acc"] == 1.0 and s["relation_acc"] == 0.0 and s["position_acc"] == 0.0
    # one object missing from a count scene
    miss = {k: v.copy() for k, v in read.items()}
    o = items[cnt].objects[0].cell
    miss["cls"][cnt, o[0] * 2 + o[1]] = EMPTY
    s = E.score_image(items[cnt], miss, cnt)
    assert s["count_acc"] == 0.0 and s["all_correct"] == 0.0
    # an extra object where the prompt asks for none
    extra = {k: v.copy() for k, v in read.items()}
    free = next(c for c in range(4) if extra["cls"][rel, c] == EMPTY)
    extra["cls"][rel, free] = 0
    assert E.score_image(items[rel], extra, rel)["all_correct"] == 0.0


def test_distribution_distances_behave():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(600, 8)), rng.normal(size=(600, 8))
    shifted = b + 2.0
    assert dist.fd(a, b) < 0.2 < 5 < dist.fd(a, shifted)
    assert abs(dist.kid(a, b)) < 0.02 < dist.kid(a, shifted)
    p, r = dist.precision_recall(a, b)
    assert p > 0.8 and r > 0.8
    p, r = dist.precision_recall(a, shifted)
    assert p < 0.3 and r < 0.3
    assert dist.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])


def test_cluster_bootstrap_draws_whole_clusters():
    clusters = np.array(["a"] * 5 + ["b"] * 3 + ["c"] * 2)
    draw = dist.cluster_draw(clusters, np.random.default_rng(1))
    picked = clusters[draw]
    for name, size in (("a", 5), ("b", 3), ("c", 2)):
        assert (picked == name).sum() % size == 0


def test_every_word_of_the_grammar_is_one_token(tmp_path):
    """With merges made per word left to right, a merge of an earlier word can outrank a
    later word's own ("r e" from "red" splits "green"); the scenes tokenizer adds merges
    until CLIP's BPE spells each word whole, so every caption leaves room after its end."""
    from transformers import CLIPTokenizer

    from hypersd_core.worlds.tokenizer import write_clip_tokenizer

    write_clip_tokenizer(tmp_path / "old", W.WORDS, W.MAX_TOKENS)
    old = CLIPTokenizer.from_pretrained(tmp_path / "old")
    assert len(old.tokenize("green")) > 1  # the first rule's flaw, kept for digits
    W.write_tokenizer(tmp_path / "new")
    tok = CLIPTokenizer.from_pretrained(tmp_path / "new")
    assert [w for w in W.WORDS if len(tok.tokenize(w)) != 1] == []
    longest = max(len(tok(s.prompt).input_ids) for s in W.scenes("train", 500))
    assert longest <= W.MAX_TOKENS - 4  # the four layout positions always exist


def test_layout_slots_put_each_related_object_in_its_half():
    from hypersd_core.scenes.captions import LAYOUT_HALVES, layout_loss, layout_slots

    a = W.SceneObject("star", "red", "small", (0, 0))
    b = W.SceneObject("circle", "blue", "large", (1, 1))
    scene = W.Scene("a small red star above a blue circle", "relation", [a, b],
                        relation="above", size_given=[True, False])
    slots = dict(zip(LAYOUT_HALVES, layout_slots(scene)))
    none = [len(W.CLASSES), len(W.COLOUR_NAMES), len(W.SIZE_NAMES) + 1]
    assert slots["top"] == [W.CLASSES.index("star"), W.COLOUR_NAMES.index("red"),
                            W.SIZE_NAMES.index("small")]
    assert slots["bottom"] == [W.CLASSES.index("circle"),
                               W.COLOUR_NAMES.index("blue"), len(W.SIZE_NAMES)]
    assert slots["left"] == slots["right"] == none
    count = W.Scene("two red stars", "count", [a, a], count=2, size_given=[False])
    assert layout_slots(count) == [none] * 4
    # the loss reads only the states from the end token on, position p for half p % 4
    import torch

    ids = torch.tensor([[0, 5, 6, 9, 9, 9, 9, 9]])  # 9: the end token, then padding
    hidden = torch.zeros(1, 8, 3)
    heads = [torch.nn.Linear(3, n) for n in (7, 6, 4)]
    targets = torch.tensor([layout_slots(scene)])
    loss = layout_loss(hidden, ids, 9, heads, targets)
    hidden[0, :3] = 100.0  # the caption's own states do not enter it
    assert torch.equal(layout_loss(hidden, ids, 9, heads, targets), loss)
