"""The released recipe (helen1c/DEARLi configs, see training/configs/RECIPE.md): what the presets and defaults give."""

from __future__ import annotations

import pytest

from training.arguments import build_parser, parse_args

DATA = {"ade20k": ["--ade20k_root", "ADE"],
        "coco": ["--train_images_dir", "i", "--train_panoptic_dir", "p", "--train_annotations", "a.json"]}


@pytest.mark.parametrize(("dataset", "size"), [("ade20k", (640, 2560)), ("coco_panoptic", (512, 2048)),
                                               ("coco_objects", (512, 2048)), ("custom", (640, 2560))])
def test_validation_and_saved_processor_size_default_to_the_datasets_test_size(dataset, size):
    data = DATA["ade20k" if dataset == "ade20k" else "coco"]
    args = parse_args("supervised", ["--dataset_name", dataset, "--output_dir", "o", *data])
    assert (args.eval_shortest_edge, args.eval_longest_edge) == size
    args = parse_args("supervised", ["--dataset_name", dataset, "--output_dir", "o", "--eval_shortest_edge", "100",
                                     *data])
    assert (args.eval_shortest_edge, args.eval_longest_edge) == (100, size[1])


# The released configs' values (helen1c/DEARLi; file and line in training/configs/RECIPE.md).
RELEASED_COMMON = {
    "scale_augmentation": "shortest_edge", "min_scale": 0.5, "max_scale": 2.0, "flip_prob": 0.5,
    "color_augmentation": "ssd", "learning_rate": 1e-4, "weight_decay": 0.05, "weight_decay_norm": 0.0,
    "weight_decay_embed": 0.0, "lr_power": 0.9, "lr_warmup_steps": 0, "gradient_clip": 0.01,
    "clip_model_name": "convnext_base_w_320", "clip_pretrained": "laion_aesthetic_s13b_b82k_augreg",
    "decoder_init": "xavier",
}
RELEASED_SSL = {
    **RELEASED_COMMON, "train_batch_size": 8, "unlabeled_batch_size": 8, "max_train_steps": 80_000,
    "ema_decay": 0.999, "ema_schedule": "auto", "unlabeled_weight": 1.0, "pseudo_label_threshold": 0.0,
    "pseudo_label_overlap_threshold": 0.8, "color_jitter_prob": 1.0, "grayscale_prob": 0.2, "blur_prob": 0.5,
    "cutmix_prob": 0.5, "cutmix_source": "separate_image", "mixed_precision": "no", "final_model": "student",
}
RELEASED_SIZES = {"ade20k": {"crop_size": [640], "train_longest_edge": 2560, "eval_shortest_edge": 640,
                             "eval_longest_edge": 2560},
                  "coco": {"crop_size": [512], "train_longest_edge": 2048, "eval_shortest_edge": 512,
                           "eval_longest_edge": 2048}}
RELEASED_DEWA = {**RELEASED_COMMON, "train_batch_size": 16, "max_train_steps": 160_000, "crop_size": [640],
                 "train_longest_edge": 2560, "drop_empty_masks": False, "keep_text_tower": True}


def _ssl_presets() -> list[str]:
    from training.arguments import CONFIG_DIR

    return sorted(p.stem for p in CONFIG_DIR.glob("ssl_*.yaml") if p.stem != "ssl_demo")


@pytest.mark.parametrize("preset", _ssl_presets())
def test_ssl_presets_reproduce_the_released_configs(preset):
    dataset = "ade20k" if "ade20k" in preset else "coco"
    args = parse_args("ssl", ["--config", preset, "--output_dir", "o", *DATA[dataset]])
    expected = {**RELEASED_SSL, **RELEASED_SIZES[dataset]}
    assert {k: getattr(args, k) for k in expected} == expected
    if "coco_objects" in preset:
        assert args.dataset_name == "coco_objects" and args.coco_objects_void == "background"


@pytest.mark.parametrize("preset", ["dewa_ade20k", "dewa_coco"])
def test_dewa_presets_reproduce_the_released_configs(preset):
    args = parse_args("dewa", ["--config", preset, "--output_dir", "o", "--masks_dir", "s", "--image_dir", "i"])
    assert {k: getattr(args, k) for k in RELEASED_DEWA} == RELEASED_DEWA


def test_parser_defaults_are_the_released_recipe_and_earlier_defaults_stay_selectable():
    """Without a preset the loops use the released recipe too; each of the project's earlier defaults has a flag."""
    args = parse_args("ssl", ["--output_dir", "o", "--partition", "1_128", *DATA["coco"]])
    assert (args.scale_augmentation, args.min_scale, args.color_augmentation, args.mixed_precision,
            args.cutmix_source, args.ema_schedule, args.weight_decay_norm, args.decoder_init,
            args.coco_objects_void) == ("shortest_edge", None, "ssd", "no", "separate_image", "auto", 0.0,
                                        "xavier", "background")
    old = parse_args("ssl", ["--output_dir", "o", "--partition", "1_128", *DATA["coco"], "--scale_augmentation",
                             "lsj", "--min_scale", "0.1", "--color_augmentation", "none", "--mixed_precision", "auto",
                             "--cutmix_source", "same_batch", "--ema_schedule", "ramp_up", "--weight_decay_norm",
                             "0.05", "--weight_decay_embed", "0.05", "--decoder_init", "normal",
                             "--coco_objects_void", "void", "--eval_shortest_edge", "640", "--eval_longest_edge",
                             "2560"])
    assert old.scale_augmentation == "lsj" and old.cutmix_source == "same_batch" and old.decoder_init == "normal"
    earlier_spelling = parse_args("ssl", ["--output_dir", "o", "--partition", "1_128", *DATA["coco"],
                                          "--decoder_init", "reference"])
    assert earlier_spelling.decoder_init == "xavier"
    dewa = parse_args("dewa", ["--output_dir", "o", "--masks_dir", "s", "--image_dir", "i",
                               "--drop_empty_masks", "--max_train_steps", "80000", "--crop_size", "512"])
    assert dewa.drop_empty_masks and dewa.mixed_precision == "auto"


def test_earlier_flag_names_are_hidden_aliases(tmp_path):
    """Scripts and presets written with the earlier flag names still parse, to the current names only; --help shows
    only the current names."""
    dewa = parse_args("dewa", ["--output_dir", "o", "--sam_masks_dir", "s", "--image_dir", "i",
                               "--drop_empty_sam_masks", "--train_max_size", "1000"])
    assert (dewa.masks_dir, dewa.drop_empty_masks, dewa.train_longest_edge) == (["s"], True, 1000)
    assert not hasattr(dewa, "sam_masks_dir") and not hasattr(dewa, "train_max_size")
    preset = tmp_path / "earlier.yaml"
    preset.write_text("_base_: supervised_overfit\neval_max_size: 300\n")
    args = parse_args("supervised", ["--config", str(preset), "--output_dir", "o"])
    assert args.eval_longest_edge == 300
    help_text = build_parser("dewa").format_help()
    assert "--masks_dir" in help_text and "--sam_masks_dir" not in help_text and "train_max_size" not in help_text
