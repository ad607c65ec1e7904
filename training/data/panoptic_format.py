"""The COCO panoptic format's id conventions, shared by the datasets, the transforms and the evaluation.

Kept free of heavy imports (no torch, no transformers): the folder evaluation imports it.
"""

__all__ = ["IGNORE_INDEX", "VOID_ID", "VOID_SEGMENT_COLUMN"]

# Segment id of unlabeled (void) pixels in a COCO panoptic id map (the PNG colour (0, 0, 0)); also the id of padding.
VOID_ID = 0
# Label of pixels without a class in semantic maps (mIoU targets and predictions).
IGNORE_INDEX = 255
# Dataset row column naming the segment that takes the PNG's void pixels (COCO-Objects: the background segment).
VOID_SEGMENT_COLUMN = "void_segment_id"
