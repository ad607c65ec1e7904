"""🤗 datasets in: the miniature world written as a 🤗 dataset folder (``--format datasets``) gives the loops the same
batches as its COCO files, trains and evaluates through ``--dataset_name`` / ``--dataset`` alone, and bad input fails
with one clear line."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch

from training.miniature import world as W

WORLD = ["--world_seed", "3", "--num_train", "6", "--num_val", "2", "--image_size", "128"]


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path_factory, monkeypatch):
    """load_dataset's Arrow cache in a temporary folder, not the user's."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.getbasetemp() / "hf_datasets_cache")


@pytest.fixture(scope="module")
def worlds(tmp_path_factory, load_script) -> tuple[Path, Path]:
    """The same tiny world twice: COCO panoptic files, and a 🤗 dataset folder written by the script."""
    root = tmp_path_factory.mktemp("worlds")
    script = load_script("generate_miniature_world")
    script.main(["--output_dir", str(root / "coco"), *WORLD, "--no_progress"])
    script.main(["--output_dir", str(root / "hf"), *WORLD, "--no_progress", "--format", "datasets"])
    return root / "coco", root / "hf"


def _coco_args(coco: Path) -> list[str]:
    train, val = W.world_paths(coco, "train"), W.world_paths(coco, "val")
    return ["--dataset_name", "custom", "--class_names_file", str(train["class_names"]),
            "--train_images_dir", str(train["images"]), "--train_panoptic_dir", str(train["panoptic"]),
            "--train_annotations", str(train["annotations"]), "--val_images_dir", str(val["images"]),
            "--val_panoptic_dir", str(val["panoptic"]), "--val_annotations", str(val["annotations"])]


def _assert_equal(a, b, what: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), what
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal(x, y, f"{what}[{i}]")
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), what
        for key in a:
            _assert_equal(a[key], b[key], f"{what}.{key}")
    else:
        assert a == b, what


def _first_batches(argv: list[str]) -> tuple:
    from training.arguments import color_augmentation, geometric_augmentation, load_panoptic_training_data, parse_args
    from training.data.train_datasets import PanopticTrainDataset, UnlabeledTrainDataset
    from training.loop import build_train_dataloader

    args = parse_args("ssl", argv)
    data = load_panoptic_training_data(args)
    transform = geometric_augmentation(args)
    labeled = PanopticTrainDataset(data.labeled, transform, color_augmentation=color_augmentation(args))
    unlabeled = UnlabeledTrainDataset(data.unlabeled, transform, cutmix_source=True)
    first = [next(iter(build_train_dataloader(ds, 2, 1, seed=args.seed))) for ds in (labeled, unlabeled)]
    return data, first[0], first[1]


def test_loops_get_equal_batches_from_the_coco_files_and_the_dataset_folder(worlds, tmp_path):
    coco, hf = worlds
    common = ["--labeled_fraction", "0.5", "--crop_size", "64", "--seed", "5", "--output_dir", str(tmp_path)]
    reference, labeled, unlabeled = _first_batches([*_coco_args(coco), *common])
    data, hub_labeled, hub_unlabeled = _first_batches(["--dataset_name", str(hf), *common])

    assert data.class_names == reference.class_names  # ids, names with synonyms, thing flags
    assert data.class_names.names[1].startswith("zebra,zebras") and len(data.class_names.thing_ids) == 24
    assert len(labeled["class_labels"][0]) > 0 and labeled["pixel_values"].shape == (2, 3, 64, 64)
    _assert_equal(hub_labeled, labeled, "labeled batch")
    _assert_equal(hub_unlabeled, unlabeled, "unlabeled batch")
    for split in ("labeled", "unlabeled", "validation"):
        ours, theirs = getattr(data, split), getattr(reference, split)
        assert ours["image_id"] == theirs["image_id"] and ours["file_name"] == theirs["file_name"]
        assert ours["segments_info"] == theirs["segments_info"]


def test_the_folder_is_a_parquet_dataset_with_its_classes_and_card(worlds):
    import datasets

    coco, hf = worlds
    assert sorted(p.name for p in (hf / "data").iterdir()) == ["train-00000-of-00001.parquet",
                                                                "validation-00000-of-00001.parquet"]
    loaded = datasets.load_dataset(str(hf))
    assert {k: len(v) for k, v in loaded.items()} == {"train": 6, "validation": 2}
    features = loaded["train"].features
    assert isinstance(features["image"], datasets.Image) and isinstance(features["panoptic"], datasets.Image)
    row = loaded["validation"].cast_column("image", datasets.Image(decode=False))[0]
    assert row["image"]["bytes"] == (W.world_paths(coco, "val")["images"] / row["file_name"]).read_bytes()
    categories = json.loads((hf / "categories.json").read_text())["categories"]
    expected = {c.category_id: (",".join(c.names), int(c.isthing)) for c in W.CLASSES}
    assert {c["id"]: (c["name"], c["isthing"]) for c in categories} == expected
    card = (hf / "README.md").read_text()
    assert card.startswith("---\nconfigs:") and "path: data/train-*" in card and "categories.json" in card
    again = json.loads((hf / "world.json").read_text())
    assert W.generate_world_dataset(hf, world_seed=3, num_train=6, num_val=2,
                                    settings=W.WorldSettings(image_size=128)) == again  # a finished folder is kept


def test_a_saved_to_disk_dataset_and_other_column_names(worlds, tmp_path):
    """save_to_disk output (its label space in its info) and a Hub-style layout ('label' PNG column, segments as
    JSON strings, no image_id / file_name) load to the same rows."""
    import datasets

    from training.data.class_names import read_class_names
    from training.data.hub_datasets import DatasetColumns, load_dataset_splits
    from training.data.panoptic_datasets import load_coco_panoptic

    coco, hf = worlds
    train = W.world_paths(coco, "train")
    names = read_class_names(train["class_names"], categories_json=train["annotations"])
    rows = load_coco_panoptic(train["images"], train["panoptic"], train["annotations"], class_names=names)
    datasets.DatasetDict({"train": rows}).save_to_disk(tmp_path / "saved")
    splits, saved_names = load_dataset_splits(str(tmp_path / "saved"), {"train": "train"})
    assert saved_names == names and splits["train"]["segments_info"] == rows["segments_info"]

    hub = datasets.load_dataset(str(hf), split="train")
    strings = [json.dumps([{k: s[k] for k in ("id", "category_id", "iscrowd")} for s in segs])
               for segs in hub["segments_info"]]
    other = (hub.rename_columns({"image": "img", "panoptic": "label"}).remove_columns(["image_id", "file_name",
                                                                                       "segments_info"])
             .add_column("segments", strings))
    (tmp_path / "other" / "data").mkdir(parents=True)
    other.to_parquet(tmp_path / "other" / "data" / "train-00000-of-00001.parquet")
    shutil.copy(hf / "categories.json", tmp_path / "other" / "categories.json")
    splits, other_names = load_dataset_splits(str(tmp_path / "other"), {"train": "train"},
                                              columns=DatasetColumns(image="img", segments_info="segments"))
    assert other_names == names and splits["train"]["image_id"] == list(range(6))
    keys = ("id", "category_id", "label", "iscrowd", "isthing")
    assert [[{k: s[k] for k in keys} for s in segs] for segs in splits["train"]["segments_info"]] == \
        [[{k: s[k] for k in keys} for s in segs] for segs in rows["segments_info"]]
    assert splits["train"][0]["panoptic"].tobytes() == rows[0]["panoptic"].tobytes()


def test_missing_columns_splits_and_classes_fail_in_one_line(worlds, tmp_path, capsys):
    from training.arguments import load_panoptic_training_data, parse_args
    from training.data.hub_datasets import DatasetSourceError

    _, hf = worlds

    def load(*argv: str):
        return load_panoptic_training_data(parse_args("supervised", [*argv, "--output_dir", str(tmp_path / "o")]))

    with pytest.raises(DatasetSourceError, match=r"has no column 'mask' \(columns: image, panoptic, .*--panoptic_col"):
        load("--dataset_name", str(hf), "--panoptic_column", "mask")
    with pytest.raises(DatasetSourceError, match=r"has no split 'test' \(splits: train, validation\): pass --train_s"):
        load("--dataset_name", str(hf), "--train_split", "test")
    with pytest.raises(DatasetSourceError, match="has no split 'val' .*--validation_split"):
        load("--dataset_name", str(hf), "--validation_split", "val")
    assert load("--dataset_name", str(hf), "--validation_split", "none").validation is None
    bare = tmp_path / "bare"
    shutil.copytree(hf / "data", bare / "data")
    with pytest.raises(DatasetSourceError, match="carries no label space: add a categories.json"):
        load("--dataset_name", str(bare))
    only_train = tmp_path / "only_train"
    shutil.copytree(hf, only_train, ignore=shutil.ignore_patterns("validation-*", "README.md"))
    data = load("--dataset_name", str(only_train))  # no 'validation' split: trains without validation
    assert data.validation is None and len(data.labeled) == 6
    for argv, message in ((["coco_panoptik"], "is none of coco_panoptic, coco_objects, ade20k, custom, no local"),
                          ([str(hf / "missing")], "no local folder and no Hub dataset id"),
                          ([str(hf), "--train_images_dir", "x"], "is a 🤗 dataset, which replaces --train_images_dir")):
        with pytest.raises(SystemExit):
            parse_args("supervised", ["--dataset_name", *argv, "--output_dir", str(tmp_path / "o")])
        assert message in capsys.readouterr().err


def test_supervised_trains_and_evaluate_scores_on_the_folder(worlds, tmp_path, fresh_accelerate_state, load_script):
    """``--dataset_name <folder>`` alone trains (and validates); scripts/evaluate.py gives the folder's validation
    split the report of its COCO files."""
    from training import supervised

    coco, hf = worlds
    out = tmp_path / "sup"
    result = supervised.main(["--dataset_name", str(hf), "--model_preset", "tiny", "--train_batch_size", "2",
                              "--crop_size", "64", "--max_train_steps", "1", "--checkpointing_steps", "0",
                              "--eval_steps", "0", "--eval_shortest_edge", "64", "--eval_longest_edge", "64",
                              "--mixed_precision", "no", "--num_workers", "0", "--output_dir", str(out)])
    assert result.final_step == 1 and result.metrics["eval/PQ"] >= 0
    assert json.loads((out / "eval_results.json").read_text())["report"]["num_images"] == 2

    evaluate = load_script("evaluate")
    val = W.world_paths(coco, "val")
    reports = {}
    for name, data_args in (("coco", ["--dataset", "custom", "--class_names_file", str(val["class_names"]),
                                      "--images_dir", str(val["images"]), "--gt_json", str(val["annotations"]),
                                      "--gt_folder", str(val["panoptic"])]),
                            ("hf", ["--dataset", str(hf)])):
        report = tmp_path / f"{name}.json"
        assert evaluate.main(["--model_name_or_path", str(out), *data_args, "--device", "cpu", "--no_progress",
                              "--size", "64", "64", "--output", str(report)]) == 0
        reports[name] = json.loads(report.read_text())
    assert reports["hf"]["num_images"] == 2
    for key in ("All", "Things", "Stuff", "mIoU", "per_class"):
        assert reports["hf"][key] == reports["coco"][key], key


def test_a_hub_id_is_loaded_with_its_categories_file(worlds, tmp_path, monkeypatch):
    """A Hub id goes to datasets.load_dataset with its configuration, one requested split at a time, and the label
    space comes from the repository's categories.json (all served from the local folder here: the tests do not
    download)."""
    import datasets
    import huggingface_hub

    _, hf = worlds
    calls = []
    load, load_builder = datasets.load_dataset, datasets.load_dataset_builder

    def fake_load_dataset_builder(name, config_name=None, **kwargs):
        calls.append(("load_dataset_builder", name, config_name))
        return load_builder(str(hf), **kwargs)

    def fake_load_dataset(name, config_name=None, **kwargs):
        calls.append(("load_dataset", name, config_name, kwargs["split"], sorted(kwargs["data_files"])))
        return load(str(hf), **kwargs)

    def fake_download(repo_id, filename, repo_type=None, **kwargs):
        calls.append(("hf_hub_download", repo_id, filename, repo_type))
        return str(hf / filename)

    monkeypatch.setattr(datasets, "load_dataset_builder", fake_load_dataset_builder)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    from training.data.hub_datasets import load_dataset_splits

    splits, names = load_dataset_splits("me/miniature-world", {"train": "train", "validation": "validation"},
                                        config_name="default")
    assert calls == [("load_dataset_builder", "me/miniature-world", "default"),
                     ("load_dataset", "me/miniature-world", "default", "train", ["train"]),
                     ("load_dataset", "me/miniature-world", "default", "validation", ["validation"]),
                     ("hf_hub_download", "me/miniature-world", "categories.json", "dataset")]
    assert len(splits["train"]) == 6 and len(splits["validation"]) == 2 and len(names) == len(W.CLASSES)


def test_only_the_requested_splits_are_read(worlds, tmp_path, load_script):
    """A split nobody asks for is never opened: here its parquet file is not parquet at all (and a save_to_disk split
    is an empty folder). Training data, evaluation and the missing-split error work as without it."""
    import datasets

    from training.arguments import load_panoptic_training_data, parse_args
    from training.data.hub_datasets import DatasetSourceError, load_dataset_splits

    coco, hf = worlds
    broken = tmp_path / "broken"
    shutil.copytree(hf, broken)
    (broken / "data" / "test-00000-of-00001.parquet").write_bytes(b"not a parquet file")
    card = (broken / "README.md").read_text()
    card = card.replace("    path: data/train-*\n", "    path: data/train-*\n  - split: test\n    path: data/test-*\n")
    # as Hub cards do, the card records every split's size (which a load of some splits must not verify against)
    info = "".join(f"  - name: {split}\n    num_examples: {n}\n    num_bytes: {100 * n}\n"
                   for split, n in (("train", 6), ("validation", 2), ("test", 3)))
    card = card.replace("task_categories:", f"dataset_info:\n  splits:\n{info}task_categories:")
    (broken / "README.md").write_text(card)
    with pytest.raises(Exception):  # the broken split itself is unreadable
        datasets.load_dataset(str(broken), split="test")
    argv = ["--dataset_name", str(broken), "--labeled_fraction", "0.5", "--output_dir", str(tmp_path / "o")]
    data = load_panoptic_training_data(parse_args("ssl", argv))
    assert len(data.labeled) + len(data.unlabeled) == 6 and len(data.validation) == 2
    with pytest.raises(DatasetSourceError, match=r"has no split 'val' \(splits: train, test, validation\): pass --v"):
        load_panoptic_training_data(parse_args("ssl", [*argv, "--validation_split", "val"]))

    evaluate = load_script("evaluate")
    args = argparse.Namespace(dataset=str(broken), split="validation", dataset_config_name=None, image_column="image",
                              panoptic_column=None, segments_info_column="segments_info", class_names_file=None)
    validation, names = evaluate.load_dataset(args)  # what scripts/evaluate.py --dataset <folder> reads
    assert validation["file_name"] == data.validation["file_name"] and names == data.class_names

    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.load_dataset(str(hf), split="train"),
                          "test": datasets.Dataset.from_dict({"x": [1]})}).save_to_disk(saved)
    shutil.rmtree(saved / "test")
    (saved / "test").mkdir()
    shutil.copy(hf / "categories.json", saved / "categories.json")
    splits, _ = load_dataset_splits(str(saved), {"train": "train", "validation?": "validation"})
    assert len(splits["train"]) == 6 and splits["validation"] is None
    with pytest.raises(DatasetSourceError, match=r"has no split 'val' \(splits: train, test\): pass --validation_s"):
        load_dataset_splits(str(saved), {"train": "train", "validation": "val"})


def test_class_names_file_replaces_the_categories_file(worlds, tmp_path):
    from training.data.hub_datasets import DatasetSourceError, load_dataset_splits

    coco, hf = worlds
    _, names = load_dataset_splits(str(hf), {"train": "train"})
    lines = tmp_path / "names.txt"  # names only: the thing flags come from the dataset's categories.json
    lines.write_text("\n".join(f"{i}:class {i},synonym {i}" for i in names.category_ids))
    _, from_lines = load_dataset_splits(str(hf), {"train": "train"}, class_names_file=lines)
    assert from_lines.names[0] == f"class {names.category_ids[0]},synonym {names.category_ids[0]}"
    assert from_lines.is_thing == names.is_thing and from_lines.category_ids == names.category_ids
    categories = tmp_path / "categories.json"  # a whole label space: here every class a thing
    categories.write_text(json.dumps([{"id": i, "name": f"c{i}", "isthing": 1} for i in names.category_ids]))
    splits, from_json = load_dataset_splits(str(hf), {"train": "train"}, class_names_file=categories)
    assert all(from_json.is_thing) and all(s["isthing"] for segs in splits["train"]["segments_info"] for s in segs)
    bare = tmp_path / "bare"
    shutil.copytree(hf / "data", bare / "data")
    with pytest.raises(DatasetSourceError, match="has no categories.json to tell things from stuff"):
        load_dataset_splits(str(bare), {"train": "train"}, class_names_file=lines)


def test_masks_and_dewa_read_the_dataset_as_its_image_folder(worlds, tmp_path, load_script):
    """Class-agnostic masks generated from the 🤗 dataset folder equal those generated from its image folder, keyed
    by the dataset's image_id; DeWa joins them to the dataset's rows and gets the batches of the image folder."""
    from training.arguments import mask_training_dataset, parse_args
    from training.data.hub_datasets import DatasetSourceError, load_image_split
    from training.data.mask_reading import load_masks
    from training.loop import build_train_dataloader

    coco, hf = worlds
    images = W.world_paths(coco, "train")["images"]
    generate = load_script("generate_sam_masks")
    common = ["--mask_source", "felzenszwalb", "--no_progress", "--shard_size", "4", "--log_level", "WARNING"]
    assert generate.main(["--image_dir", str(images), "--output_dir", str(tmp_path / "from_folder"), *common]) == 0
    assert generate.main(["--dataset_name", str(hf), "--split", "train", "--output_dir", str(tmp_path / "from_hf"),
                          *common]) == 0
    from_folder, from_hf = load_masks(tmp_path / "from_folder"), load_masks(tmp_path / "from_hf")
    assert from_hf["file_name"] == from_folder["file_name"] and len(from_hf) == 6
    assert from_hf["image_id"] == [str(i) for i in load_image_split(str(hf), "train")["image_id"]]
    assert from_folder["image_id"] == [Path(f).stem for f in from_folder["file_name"]]
    for ours, theirs in zip(from_hf, from_folder):
        assert ours["num_masks"] > 0 and (ours["height"], ours["width"]) == (theirs["height"], theirs["width"])
        assert json.dumps(ours["masks"]) == json.dumps(theirs["masks"])  # (Felzenszwalb's scores are NaN)

    def first_batch(*argv: str) -> dict:
        args = parse_args("dewa", [*argv, "--crop_size", "64", "--seed", "5", "--output_dir", str(tmp_path / "o")])
        return next(iter(build_train_dataloader(mask_training_dataset(args), 2, 1, seed=args.seed)))

    folder_batch = first_batch("--masks_dir", str(tmp_path / "from_folder"), "--image_dir", str(images))
    hf_batch = first_batch("--masks_dir", str(tmp_path / "from_hf"), "--dataset_name", str(hf))
    ids = {k for k in folder_batch if "image_id" in k}
    assert ids and folder_batch["mask_labels"][0].shape[0] > 0
    _assert_equal({k: v for k, v in hf_batch.items() if k not in ids},
                  {k: v for k, v in folder_batch.items() if k not in ids}, "DeWa batch")

    both = parse_args("dewa", ["--masks_dir", str(tmp_path / "from_hf"), str(tmp_path / "from_folder"),
                               "--dataset_name", str(hf), "--image_dir", str(images), "--output_dir", str(tmp_path)])
    mixed = mask_training_dataset(both)  # the split's masks, then the folder's
    assert len(mixed) == 12 and mixed[(0, 1)]["image_id"] == from_hf["image_id"][0]
    assert torch.equal(mixed[(6, 1)]["pixel_values"], mixed[(0, 1)]["pixel_values"])
    with pytest.raises(DatasetSourceError, match=r"has no split 'unlabeled' \(splits: train, validation\): pass --tr"):
        first_batch("--masks_dir", str(tmp_path / "from_hf"), "--dataset_name", str(hf), "--train_split", "unlabeled")
    with pytest.raises(ValueError, match="6 of 6 mask records have no image in .*another --id_column"):
        first_batch("--masks_dir", str(tmp_path / "from_hf"), "--dataset_name", str(hf), "--id_column", "file_name")
