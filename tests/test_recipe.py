"""The released recipe (helen1c/DEARLi configs, see training/configs/RECIPE.md): what the presets and defaults give."""

from __future__ import annotations

import pytest

from training.arguments import parse_args

DATA = {"ade20k": ["--ade20k_root", "ADE"],
        "coco": ["--train_images_dir", "i", "--train_panoptic_dir", "p", "--train_annotations", "a.json"]}


@pytest.mark.parametrize(("dataset", "size"), [("ade20k", (640, 2560)), ("coco_panoptic", (512, 2048)),
                                               ("coco_objects", (512, 2048)), ("custom", (640, 2560))])
def test_validation_and_saved_processor_size_default_to_the_datasets_test_size(dataset, size):
    data = DATA["ade20k" if dataset == "ade20k" else "coco"]
    args = parse_args("supervised", ["--dataset_name", dataset, "--output_dir", "o", *data])
    assert (args.eval_shortest_edge, args.eval_max_size) == size
    args = parse_args("supervised", ["--dataset_name", dataset, "--output_dir", "o", "--eval_shortest_edge", "100",
                                     *data])
    assert (args.eval_shortest_edge, args.eval_max_size) == (100, size[1])
