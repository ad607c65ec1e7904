"""Training data: panoptic datasets (COCO panoptic, ADE20K, COCO-Objects; partitions, class names, test resolutions),
ADE20K conversion, geometric transforms (the scale schemes), SSD colour augmentation, strong augmentations, the
resumable sampler, collation, the loops' training datasets and class-agnostic SAM masks."""
