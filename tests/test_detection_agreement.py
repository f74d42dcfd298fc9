"""Detection agreement (quantize/agreement.py): how an int8 detector is
judged against its fp32 model. The quality gate and mixed precision read
these numbers, so a wrong match (a box of another class counted, a box
matched twice, a ranking read backwards) would pass a broken model or fail
a good one."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.bundles.manifest import TensorSpec
from quantize.agreement import Boxes, average_precision, detection_agreement, iou_matrix, map_output_names
from quantize.mixed import search_stable


def _b(*dets: tuple[str, float, list[float]]) -> Boxes:
    return Boxes(
        np.asarray([d[2] for d in dets], dtype=np.float64).reshape(-1, 4),
        np.asarray([d[1] for d in dets], dtype=np.float64),
        tuple(d[0] for d in dets),
    )


DOG = [100, 100, 200, 220]
BIKE = [50, 80, 300, 260]
TRUCK = [400, 40, 600, 140]


def test_identical_boxes_agree_fully() -> None:
    """fp32 against itself: every figure is 100 %."""
    pics = [_b(("dog", 0.9, DOG), ("bicycle", 0.8, BIKE)), _b(("truck", 0.7, TRUCK))]
    assert detection_agreement(pics, pics, 0.25) == {"map50": 1.0, "recall50": 1.0, "precision50": 1.0,
                                                     "fp32_boxes": 3.0}


def test_a_missed_box_a_moved_box_and_a_relabelled_box_each_cost_recall() -> None:
    """A box the candidate drops, one moved past IoU 0.5 and one given another
    label are all misses; a box that moved a little is still found."""
    ref = [_b(("dog", 0.9, DOG), ("bicycle", 0.8, BIKE), ("truck", 0.7, TRUCK), ("dog", 0.6, [300, 300, 340, 360]))]
    cand = [_b(("dog", 0.88, [104, 98, 203, 224]),           # small shift: found
               ("bicycle", 0.8, [200, 80, 450, 260]),         # IoU 0.25: a miss and a false box
               ("car", 0.7, TRUCK))]                          # other label: a miss and a false box
    got = detection_agreement(ref, cand, 0.25)
    assert got["recall50"] == pytest.approx(1 / 4)
    assert got["precision50"] == pytest.approx(1 / 3)
    # dog: 1 of 2 found at rank 1 -> AP 0.5; bicycle, truck: 0 -> mAP 0.5 / 3.
    assert got["map50"] == pytest.approx(0.5 / 3)


def test_scores_below_the_threshold_rank_for_map_but_do_not_count_as_reported() -> None:
    """The candidate's boxes under the bundle's threshold still count for the
    mAP ranking (int8 moving a score from 0.30 to 0.20 is a small loss, not a
    lost box), but recall at the threshold says the device would not report it."""
    ref = [_b(("dog", 0.30, DOG))]
    cand = [_b(("dog", 0.20, DOG))]
    got = detection_agreement(ref, cand, 0.25)
    assert got["map50"] == 1.0
    assert got["recall50"] == 0.0
    # And fp32's own weak boxes (under the threshold) are no reference at all.
    assert detection_agreement([_b(("dog", 0.2, DOG))], [_b()], 0.25)["recall50"] == 1.0


def test_one_reference_box_is_matched_once() -> None:
    """Two candidate boxes on one fp32 box: the better-scored one matches, the
    other is a false box that ranks before nothing (precision 1/2)."""
    ref = [_b(("dog", 0.9, DOG))]
    cand = [_b(("dog", 0.9, DOG), ("dog", 0.8, [102, 101, 201, 219]))]
    got = detection_agreement(ref, cand, 0.25)
    assert got["recall50"] == 1.0 and got["precision50"] == 0.5
    assert got["map50"] == 1.0  # the true box ranks first


def test_a_false_box_ranked_first_halves_precision_at_the_first_hit() -> None:
    """Average precision reads the ranking: a confident false box before the
    true one costs half the area."""
    ref = [_b(("dog", 0.9, DOG)), _b()]
    cand = [_b(("dog", 0.5, DOG)), _b(("dog", 0.95, TRUCK))]
    assert detection_agreement(ref, cand, 0.25)["map50"] == pytest.approx(0.5)


def test_average_precision_of_a_known_curve() -> None:
    """hit, miss, hit over 2 truths: precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1
    -> 0.5 * 1 + 0.5 * 2/3."""
    hits = np.cumsum([1, 0, 1])
    ranks = np.arange(1, 4)
    assert average_precision(hits / 2, hits / ranks) == pytest.approx(0.5 + 0.5 * 2 / 3)


def test_iou_matrix() -> None:
    a = np.array([[0, 0, 10, 10]], dtype=float)
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]], dtype=float)
    assert iou_matrix(a, b) == pytest.approx(np.array([[1.0, 50 / 150, 0.0]]))


def test_output_names_follow_a_converter_that_renamed_them() -> None:
    """onnx2tf names YOLO's output ``Identity`` something else in the .tflite:
    the decoder parameters packed with the TFLite bundle must name the new
    output, matched by shape, or by position when shapes repeat."""
    ref = [TensorSpec(name="boxes", shape=[1, 896, 16], dtype="float32"), TensorSpec(name="scores", shape=[1, 896, 1], dtype="float32")]
    tfl = [TensorSpec(name="StatefulPartitionedCall:1", shape=[1, 896, 1], dtype="float32"),
           TensorSpec(name="StatefulPartitionedCall:0", shape=[1, 896, 16], dtype="float32")]
    got = map_output_names({"decoder": "ssd", "boxes_output": "boxes", "scores_output": "scores", "threshold": 0.5},
                           ref, tfl)
    assert got == {"decoder": "ssd", "boxes_output": "StatefulPartitionedCall:0",
                   "scores_output": "StatefulPartitionedCall:1", "threshold": 0.5}
    assert map_output_names({"output": "boxes"}, ref, ref) == {"output": "boxes"}


def test_mixed_precision_search_uses_the_tasks_agreement() -> None:
    """The float-set search measures each set with the agreement it is given
    (mAP for a detector), not top-1 of the first output."""
    seen = []

    def agreement(reference: str, candidate: float) -> float:
        seen.append((reference, candidate))
        return candidate

    sets = [[], ["a"], ["a", "b"], ["a", "b", "c"]]
    scores = {0: 0.5, 1: 0.92, 2: 0.97, 3: 0.98}
    result = search_stable(sets, lambda ids: len(ids), lambda n: scores[n], "fp32 boxes", 0.95, agreement=agreement)
    assert result.float_nodes == ["a", "b"] and result.met
    assert all(ref == "fp32 boxes" for ref, _ in seen)


def test_same_is_true_only_where_every_box_is_found_again_and_nothing_else_reported() -> None:
    """The noise floor's stable pictures are those where ``same`` holds: a
    picture with a missed box, or with an extra box at the threshold, is no
    stable picture; a picture without any box on either side is."""
    from edge_agent.bundles.manifest import DetectParams
    from quantize.agreement import DetectionAgreement

    judge = DetectionAgreement(DetectParams(decoder="yolo", threshold=0.25), None)
    ref = [_b(("dog", 0.9, DOG)), _b(("dog", 0.9, DOG)), _b(("dog", 0.9, DOG)), _b()]
    cand = [_b(("dog", 0.8, [104, 98, 203, 224]), ("truck", 0.1, TRUCK)),  # weak extra box: not reported
            _b(),                                                          # missed
            _b(("dog", 0.8, DOG), ("truck", 0.5, TRUCK)),                  # extra box reported
            _b()]                                                          # nothing on either side
    assert judge.same(ref, cand).tolist() == [True, False, False, True]


def test_the_converter_workers_sensitivity_scores_are_the_judges_divergences() -> None:
    """The TFLite worker keeps its own copy of the scores (it runs in the
    converter's environment and imports nothing of edge-agent); both mixed-
    precision searches must rank layers by the same numbers, so the copies
    must not drift apart."""
    from edge_agent.bundles.manifest import DetectParams
    from quantize.agreement import DetectionAgreement, kl_divergence
    from quantize.tflite import worker

    rng = np.random.default_rng(5)
    ref, cand = rng.standard_normal((6, 10)), rng.standard_normal((6, 10))
    assert worker.kl(ref, cand) == pytest.approx(kl_divergence(ref, cand), rel=1e-12)
    judge = DetectionAgreement(DetectParams(decoder="yolo", threshold=0.25), None)
    assert worker.nsr(ref, cand) == pytest.approx(judge.divergence([ref], [cand]), rel=1e-12)
