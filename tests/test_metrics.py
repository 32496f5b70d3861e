"""Box and caption metrics against values computed by hand (the arithmetic is in the comments)."""

import math
import shutil
import sys
import types

import pytest

from sc_tune.evaluation import caption_metrics
from sc_tune.evaluation.caption_metrics import (bleu, caption_scores, cider_d, meteor, meteor_unavailable_reason,
                                                tokenize)
from sc_tune.evaluation.metrics import box_metrics, per_sample_ious, summarize_ious


def test_box_metrics_hand_computed():
    targets = [[0, 0, 0.5, 0.5], [0.25, 0, 0.75, 0.5], [0, 0, 1, 1], [0, 0, 0.5, 1]]
    preds = [
        [0, 0, 0.5, 0.5],  # identical: IoU 1
        [0, 0, 0.5, 0.5],  # overlap 0.25 x 0.5 = 0.125; union 0.25 + 0.25 - 0.125 = 0.375 -> 1/3
        None,  # parse failure: IoU 0 and counted
        [0, 0, 1, 1],  # target inside pred: 0.5 / 1 = 0.5, a hit because Acc@0.5 is inclusive
    ]
    assert per_sample_ious(preds, targets) == pytest.approx([1.0, 1 / 3, 0.0, 0.5])
    m = box_metrics(preds, targets, thresholds=(0.5, 0.75))
    assert m["num_samples"] == 4 and m["num_parsed"] == 3 and m["num_parse_failures"] == 1
    assert m["parse_failure_rate"] == pytest.approx(0.25)
    assert m["mean_iou"] == pytest.approx((1 + 1 / 3 + 0 + 0.5) / 4)  # 0.458333
    assert m["mean_iou_parsed"] == pytest.approx((1 + 1 / 3 + 0.5) / 3)  # 0.611111
    assert m["acc@0.5"] == pytest.approx(2 / 4)  # samples 0 and 3
    assert m["acc@0.75"] == pytest.approx(1 / 4)  # sample 0 only


def test_pixel_boxes_and_inverted_boxes():
    # Pixels: pred [10, 10, 30, 30] (area 400) vs target [20, 20, 40, 40] (area 400): overlap 10 x 10 = 100,
    # union 700 -> 1/7. An inverted prediction has zero area and scores 0, never a negative IoU.
    assert per_sample_ious([[10, 10, 30, 30], [30, 30, 10, 10]], [[20, 20, 40, 40], [10, 10, 30, 30]]) == \
        pytest.approx([1 / 7, 0.0])


def test_empty_and_all_failures_are_not_silent_zeros():
    empty = summarize_ious([], [])
    assert empty["num_samples"] == 0 and empty["mean_iou"] is None and empty["acc@0.5"] is None
    failed = box_metrics([None, None], [[0, 0, 1, 1], [0, 0, 1, 1]])
    assert failed["parse_failure_rate"] == 1.0 and failed["mean_iou_parsed"] is None


def test_tokenize_drops_punctuation_and_splits_clitics():
    assert tokenize("The dog's T-shirt, isn't it?") == ["the", "dog", "'s", "t-shirt", "is", "n't", "it"]


# Corpus of two images, one reference each:
#   A: cand "the big red circle"      ref "the big red circle"
#   B: cand "the small green square"  ref "the small blue square"
CANDS = ["the big red circle", "the small green square"]
REFS = [["the big red circle"], ["the small blue square"]]


def test_bleu_hand_computed():
    # All lengths 4, so no brevity penalty. Clipped matches / candidate n-grams, summed over the corpus:
    #   1-grams: A 4/4, B 3/4 ("the", "small", "square") -> 7/8
    #   2-grams: A 3/3, B 1/3 ("the small")              -> 4/6 = 2/3
    #   3-grams: A 2/2, B 0/2                            -> 2/4 = 1/2
    #   4-grams: A 1/1, B 0/1                            -> 1/2
    # BLEU-n = geometric mean of p1..pn: 7/8; sqrt(7/8 * 2/3) = sqrt(7/12); (7/24)^(1/3); (7/48)^(1/4).
    expected = [7 / 8, math.sqrt(7 / 12), (7 / 24) ** (1 / 3), (7 / 48) ** (1 / 4)]
    assert bleu(CANDS, REFS) == pytest.approx(expected, rel=1e-6)  # 0.875, 0.7638, 0.6632, 0.6180


def test_bleu_brevity_penalty_and_clipping():
    # Candidate "the red circle" (3 words) vs reference "the big red circle" (4): BP = exp(1 - 4/3).
    # p1 = 3/3; p2: "the red" misses, "red circle" hits -> 1/2.
    bp = math.exp(1 - 4 / 3)
    scores = bleu(["the red circle"], [["the big red circle"]])
    assert scores[0] == pytest.approx(bp, rel=1e-6)  # 0.7165
    assert scores[1] == pytest.approx(bp * math.sqrt(1 / 2), rel=1e-6)  # 0.5067
    # Clipping: "the the the" against ["the cat", "the the dog"]: "the" may count at most 2 times (max over
    # references) -> p1 = 2/3; the closest reference length is 3 ("the the dog"), so no brevity penalty.
    assert bleu(["the the the"], [["the cat", "the the dog"]])[0] == pytest.approx(2 / 3, rel=1e-6)


def test_bleu_of_captions_too_short_for_the_longer_n_grams_and_of_longer_candidates():
    # "a dog" has no 3- or 4-grams: those precisions count as 1e-15 / 1e-9 = 1e-6 (the COCO toolkit's smoothing),
    # so BLEU-3 = (1 * 1 * 1e-6)^(1/3) = 0.01 and BLEU-4 = (1e-12)^(1/4) = 0.001, never an error or a complex number.
    assert bleu(["a dog"], [["a dog"]]) == pytest.approx([1.0, 1.0, 0.01, 0.001], rel=1e-6)
    # A candidate longer than its reference gets no brevity penalty (only precision counts): 6 words against 4,
    # p1 = 4/6, p2 = 3/5, p3 = 2/4, p4 = 1/3.
    p = [4 / 6, 3 / 5, 2 / 4, 1 / 3]
    expected = [math.prod(p[: n + 1]) ** (1 / (n + 1)) for n in range(4)]
    assert bleu(["the big red circle on tables"], [["the big red circle"]]) == pytest.approx(expected, rel=1e-9)


def test_cider_d_hand_computed():
    # N = 2 reference sets, idf(g) = log(2) - log(df(g)): "the" is in both sets (df 2) -> weight 0; every
    # other n-gram has df 1 -> weight L = log 2 (an n-gram absent from all references has df 0 -> max(1, 0)
    # = 1, also L). Lengths are equal, so the Gaussian length penalty is 1.
    #   A equals its reference: similarity 1 for n = 1..4 -> mean 1 -> x10 = 10.
    #   B, n=1: cand {small, green, square} (L each), ref {small, blue, square}: clipped dot 2L^2 over norms
    #           sqrt(3)L * sqrt(3)L -> 2/3.  n=2: only "the small" (L) matches of 3 bigrams each -> 1/3.
    #           n=3, n=4: no match -> 0. Mean (2/3 + 1/3 + 0 + 0) / 4 = 1/4 -> x10 = 2.5.
    # Corpus CIDEr-D = (10 + 2.5) / 2 = 6.25.
    corpus, per_sample = cider_d(CANDS, REFS)
    assert per_sample == pytest.approx([10.0, 2.5])
    assert corpus == pytest.approx(6.25)


def test_cider_d_of_a_single_image_is_zero_by_definition():
    # One reference set: idf = log(1) - log(1) = 0 for every n-gram, so every vector is zero.
    assert cider_d(["a dog"], [["a dog"]])[0] == 0.0


def test_caption_scores_report_counts_and_meteor_status():
    scores = caption_scores(CANDS, REFS, use_meteor=False)
    assert scores["num_samples"] == 2 and scores["cider_d"] == pytest.approx(6.25)
    assert [scores[f"bleu_{n}"] for n in (1, 2, 3, 4)] == pytest.approx(bleu(CANDS, REFS))
    assert scores["meteor"] is None and "disabled" in scores["meteor_skipped"]
    by_default = caption_scores(CANDS, REFS)  # METEOR is tried unless the caller says no
    if meteor_unavailable_reason() is None:
        assert 0.0 < by_default["meteor"] <= 1.0
    else:
        assert by_default["meteor"] is None and by_default["meteor_skipped"] == meteor_unavailable_reason()


def test_meteor_is_unavailable_without_java_or_without_the_jars_package(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert meteor_unavailable_reason() == "java is not on PATH"
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setitem(sys.modules, "pycocoevalcap.meteor.meteor", None)  # an import of it raises ImportError
    assert "pycocoevalcap (which ships meteor-1.5.jar) is not installed" in meteor_unavailable_reason()
    monkeypatch.setitem(sys.modules, "pycocoevalcap.meteor.meteor", types.SimpleNamespace(Meteor=object))
    assert meteor_unavailable_reason() is None


def test_meteor_sends_the_jar_tokenised_lines_and_returns_its_corpus_score(monkeypatch):
    """The jar's protocol is line based: every caption goes as its tokens (never a newline or a '|'), an empty one as
    ".", and the jar's process is stopped afterwards. A stand-in for the jar records what it was sent."""
    sent = {}

    class Process:
        killed = False

        def kill(self):
            Process.killed = True

    class Meteor:
        def __init__(self):
            self.meteor_p = Process()

        def compute_score(self, gts, res):
            sent.update(gts=gts, res=res)
            return 0.25, [0.2, 0.3]

    monkeypatch.setitem(sys.modules, "pycocoevalcap.meteor.meteor", types.SimpleNamespace(Meteor=Meteor))
    score, per_sample = meteor(["A dog | runs.\nFast", ""], [["the dog runs"], ["A cat.", "?"]])
    assert (score, per_sample) == (0.25, [0.2, 0.3])
    assert sent["res"] == {0: ["a dog runs fast"], 1: ["."]}
    assert sent["gts"] == {0: ["the dog runs"], 1: ["a cat", "."]}
    assert Process.killed
    monkeypatch.setattr(caption_metrics, "meteor_unavailable_reason", lambda: None)
    assert caption_scores(["a dog", "a cat"], [["a dog"], ["a cat"]])["meteor"] == 0.25


def test_mismatched_inputs_are_errors():
    with pytest.raises(ValueError, match="2 candidates for 1 reference sets"):
        bleu(CANDS, REFS[:1])
    with pytest.raises(ValueError, match="sample 0: references must be a non-empty list"):
        cider_d(["a"], ["a dog"])


# Already-tokenised captions (the COCO toolkit tokenises with Java first; these need no tokenising) that reach every
# branch of both scorers: several references of different lengths (the closest-length rule of BLEU's brevity penalty
# and CIDEr-D's length penalty), a repeated word (clipping in both), candidates shorter than 4 words (n-gram orders
# with no n-grams at all) and of one word (CIDEr-D's length is the bigram count), words that no reference has, and a
# corpus whose candidates are longer than their references (no brevity penalty: 51 words against 43).
TOOLKIT_CANDS = ["a man riding a horse on the beach", "two dogs play in the snow", "a red car",
                 "the the the the cat", "a bird", "people walking down a busy city street at night", "cat",
                 "a very long caption about a small dog that runs across the green grass in the park"]
TOOLKIT_REFS = [["a man rides a horse along the beach", "person on horseback near the sea"],
                ["two dogs playing in snow", "dogs running through the snow"],
                ["a red car parked on the street", "a small red automobile"],
                ["the cat sits on the mat", "a cat", "the cat"],
                ["a small bird perched on a branch", "a bird on a tree"],
                ["a crowd walks along a street", "people on a city street at night"],
                ["a black cat sitting on a chair", "the cat"],
                ["a dog runs in the park", "a small dog on grass"]]
# What pycocoevalcap 1.2 prints for them: `Bleu(4).compute_score(gts, res)[0]` and `Cider().compute_score(gts, res)`
# with gts = {i: TOOLKIT_REFS[i]}, res = {i: [TOOLKIT_CANDS[i]]}. Kept here so the comparison runs without the
# toolkit (a 100 MB wheel); the test after this one recomputes them where it is installed.
TOOLKIT_BLEU = [0.6862745097904652, 0.5053295529903207, 0.32855314819579656, 0.18542740094300295]
TOOLKIT_CIDER_D = 1.6922956481868883
TOOLKIT_CIDER_D_PER_IMAGE = [1.457098066153346, 2.092317628432027, 2.400725985145939, 1.6719845906210407,
                             1.8888572509534547, 2.2106491341800547, 1.4785716296979035, 0.3381609003113414]


def test_bleu_and_cider_d_equal_the_coco_toolkits_values():
    assert bleu(TOOLKIT_CANDS, TOOLKIT_REFS) == pytest.approx(TOOLKIT_BLEU, rel=1e-9)
    corpus, per_image = cider_d(TOOLKIT_CANDS, TOOLKIT_REFS)
    assert corpus == pytest.approx(TOOLKIT_CIDER_D, rel=1e-9)
    assert per_image == pytest.approx(TOOLKIT_CIDER_D_PER_IMAGE, rel=1e-9)


def test_matches_coco_toolkit_when_installed():
    """The values above, recomputed by pycocoevalcap's own scorers where it is installed (no Java needed)."""
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    gts = {i: r for i, r in enumerate(TOOLKIT_REFS)}
    res = {i: [c] for i, c in enumerate(TOOLKIT_CANDS)}
    assert Bleu(4).compute_score(gts, res, verbose=0)[0] == pytest.approx(TOOLKIT_BLEU, rel=1e-9)
    corpus, per_image = Cider().compute_score(gts, res)
    assert float(corpus) == pytest.approx(TOOLKIT_CIDER_D, rel=1e-9)
    assert [float(s) for s in per_image] == pytest.approx(TOOLKIT_CIDER_D_PER_IMAGE, rel=1e-9)


@pytest.mark.skipif(meteor_unavailable_reason() is not None, reason=str(meteor_unavailable_reason()))
def test_meteor_with_java():
    scores = caption_scores(CANDS, REFS)
    assert "meteor_skipped" not in scores and 0.0 < scores["meteor"] <= 1.0
