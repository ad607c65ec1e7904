"""DEARLi training: three Accelerate loops on one shared loop, their machinery, and sub-packages by job.

- Entry points: ``dewa.py`` (decoder warm-up on SAM masks), ``supervised.py`` (labeled images only), ``ssl.py``
  (Mean Teacher with ensembled pseudo-labels); each is ``arguments`` -> set-up -> ``loop.run_training``.
- Loop machinery: ``loop`` (the loop: resume, logging, checkpoint/evaluation timing, NaN guard, final save),
  ``arguments`` (the one argument builder + YAML presets in ``configs/``), ``model_init``, ``student_views``, ``ema``,
  ``pseudo_labels``, ``checkpointing``, ``schedules``.
- ``data``: datasets (COCO panoptic, ADE20K, COCO-Objects; partitions, class names, test resolutions), ADE20K
  conversion, transforms (the scale schemes), SSD colour augmentation, strong augmentations, the resumable sampler,
  collation, training datasets, class-agnostic SAM masks.
- ``configs``: the presets and ``RECIPE.md`` (every setting: paper / released configs / ours).
- ``evaluation``: panoptic quality and mIoU, validation during training, visualisation, the web demo's
  inference (``segmenter``, behind ``app.py``).
- ``publishing``: Hub repository folders and model cards, the web demo's Space folder, conversion of the reference
  implementation's checkpoints.
- ``run_as_script``: imported first by every entry point (see there why).
"""
