"""Training data: panoptic datasets (COCO panoptic, ADE20K, COCO-Objects; partitions, class names), ADE20K conversion,
geometric transforms, strong augmentations, the resumable sampler, collation, the loops' training datasets and
class-agnostic SAM masks."""
