"""Panoptic quality (PQ, SQ, RQ) as a 🤗 ``evaluate`` metric, with exactly panopticapi's definitions.

Load it by path: ``evaluate.load("<repo>/training/evaluation/evaluate_metric/panoptic_quality")``. The algorithm
lives in ``training.evaluation.panoptic_quality`` (the ``dearli`` package: ``pip install -e <repo>``); this module only
adapts inputs.
"""

import datasets
import evaluate

_CITATION = """\
@inproceedings{kirillov2019panoptic,
  title={Panoptic Segmentation},
  author={Kirillov, Alexander and He, Kaiming and Girshick, Ross and Rother, Carsten and Doll{\'a}r, Piotr},
  booktitle={CVPR},
  year={2019}
}
"""

_DESCRIPTION = """\
Panoptic quality PQ = SQ x RQ for All / Things / Stuff classes and per class, with panopticapi's rules: segments match
at IoU > 0.5 (void pixels excluded from the prediction), crowd ground truth is never matched, and unmatched predictions
lying more than half in void or same-class crowd are not false positives. Inputs are segment-id maps (0 = void) plus
each map's segments; results equal panopticapi's to floating-point rounding.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of (H, W) integer segment-id maps (0 or negative = no segment).
    references: list of (H, W) integer ground-truth segment-id maps (0 = void).
    prediction_segments: per image, list of {"id", "category_id"}.
    reference_segments: per image, list of {"id", "category_id", "iscrowd"}.
    categories: list of {"id", "isthing", "name"(optional)}; or give num_labels and thing_ids for a contiguous
        label space 0..num_labels-1.
    num_labels: number of classes when `categories` is not given.
    thing_ids: class ids that are things (with num_labels).
Returns:
    dict with "All", "Things", "Stuff" ({"pq", "sq", "rq", "n"}), "per_class" (by category id) and "num_images".
Examples:
    >>> pq = evaluate.load("training/evaluation/evaluate_metric/panoptic_quality")
    >>> pq.compute(predictions=[[[1, 1], [2, 2]]], references=[[[1, 1], [2, 2]]],
    ...            prediction_segments=[[{"id": 1, "category_id": 0}, {"id": 2, "category_id": 1}]],
    ...            reference_segments=[[{"id": 1, "category_id": 0, "iscrowd": 0},
    ...                                 {"id": 2, "category_id": 1, "iscrowd": 0}]],
    ...            num_labels=2, thing_ids=[0])["All"]["pq"]
    1.0
"""


def _accumulator_class():
    try:
        from training.evaluation.panoptic_quality import PanopticQuality as Accumulator
    except ImportError as err:  # the metric file may have been copied into the evaluate cache
        raise ImportError(
            "the panoptic_quality metric needs the dearli package (training.evaluation.panoptic_quality): "
            "run `pip install -e <dearli repo>`"
        ) from err
    return Accumulator


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class PanopticQuality(evaluate.Metric):
    """PQ / SQ / RQ (panopticapi definitions)."""

    def _info(self):
        v = datasets.Value
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.List(datasets.List(v("int64"))),
                    "references": datasets.List(datasets.List(v("int64"))),
                    "prediction_segments": datasets.List({"id": v("int64"), "category_id": v("int64")}),
                    "reference_segments": datasets.List(
                        {"id": v("int64"), "category_id": v("int64"), "iscrowd": v("int64")}
                    ),
                }
            ),
            reference_urls=["https://github.com/cocodataset/panopticapi"],
        )

    def _compute(
        self,
        predictions,
        references,
        prediction_segments,
        reference_segments,
        categories=None,
        num_labels=None,
        thing_ids=None,
    ):
        import numpy as np

        accumulator = _accumulator_class()
        if categories is not None:
            acc = accumulator(categories)
        elif num_labels is not None:
            acc = accumulator.from_class_names([str(i) for i in range(int(num_labels))], thing_ids or [])
        else:
            raise ValueError("pass categories=[{'id', 'isthing'}, ...] or num_labels= (and thing_ids=)")
        for pred, ref, pseg, rseg in zip(predictions, references, prediction_segments, reference_segments):
            acc.update(np.asarray(pred, dtype=np.int64), pseg, np.asarray(ref, dtype=np.int64), rseg)
        return acc.compute()
