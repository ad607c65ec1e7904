"""Evaluation: panoptic quality and mIoU (``panoptic_quality``; the same metric for the ``evaluate`` library in
``evaluate_metric/panoptic_quality``), validation inside the training loops, pictures of predictions
(``visualization``) and the web demo's inference (``segmenter``)."""
