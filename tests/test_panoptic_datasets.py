"""Dataset loading (COCO panoptic format, ADE20K conversion, COCO-Objects), class names, partitions, targets."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_dearli.image_processing_dearli import id_to_rgb, rgb_to_id
from training.data.ade20k_conversion import convert_annotation, prepare_ade20k_panoptic
from training.data.class_names import ADE20K_THING_IDS, ClassNames, load_class_names, read_class_names
from training.data.package_data import COCO_PANOPTIC_SAMPLE, DATA_DIR
from training.data.panoptic_datasets import (
    dataset_class_names,
    load_ade20k_panoptic,
    load_coco_objects,
    load_coco_panoptic,
    load_panoptic_dataset,
    to_coco_objects,
)
from training.data.panoptic_targets import masks_and_labels, panoptic_target_from_row, semantic_target_from_row
from training.data.partitions import partition_keys, read_split_file, split_labeled_unlabeled
from training.evaluation.panoptic_quality import PanopticQuality

REPO = Path(__file__).resolve().parents[1]
SAMPLE = COCO_PANOPTIC_SAMPLE.root


# --------------------------------------------------------------------------------------------------------------------
# helpers: tiny datasets written by the tests
# --------------------------------------------------------------------------------------------------------------------
def write_coco_folder(root: Path, with_unannotated: bool = True) -> dict:
    """3 annotated images (one without segments) + 1 unannotated image, COCO category ids (things <= 90)."""
    (root / "images").mkdir(parents=True)
    (root / "panoptic").mkdir()
    rng = np.random.default_rng(0)
    cats = [{"id": 1, "name": "person", "isthing": 1}, {"id": 3, "name": "car", "isthing": 1},
            {"id": 184, "name": "tree-merged", "isthing": 0}, {"id": 187, "name": "sky-other-merged", "isthing": 0},
            {"id": 199, "name": "wall-other-merged", "isthing": 0}]
    images, anns = [], []
    for k in range(3):
        h, w = 12 + k, 16
        ids = np.zeros((h, w), dtype=np.int64)
        segs = []
        if k < 2:
            ids[:6, :] = 1000 + k  # sky (stuff)
            ids[6:, :5] = 2000  # tree (stuff)
            ids[6:, 5:9] = 3000  # wall (stuff)
            ids[7:10, 10:13] = 11  # person
            ids[2:5, 2:6] = 12  # car
            ids[9:11, 13:15] = 13  # crowd of people
            segs = [
                {"id": 1000 + k, "category_id": 187, "iscrowd": 0},
                {"id": 2000, "category_id": 184, "iscrowd": 0},
                {"id": 3000, "category_id": 199, "iscrowd": 0},
                {"id": 11, "category_id": 1, "iscrowd": 0},
                {"id": 12, "category_id": 3, "iscrowd": 0},
                {"id": 13, "category_id": 1, "iscrowd": 1},
            ]
            for s in segs:
                s["area"] = int((ids == s["id"]).sum())
                ys, xs = np.nonzero(ids == s["id"])
                s["bbox"] = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
        name = f"{k:012d}"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "images" / f"{name}.jpg")
        Image.fromarray(id_to_rgb(ids)).save(root / "panoptic" / f"{name}.png")
        images.append({"id": k + 1, "file_name": f"{name}.jpg", "height": h, "width": w})
        anns.append({"image_id": k + 1, "file_name": f"{name}.png", "segments_info": segs})
    if with_unannotated:
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / "images" / "000000000099.jpg")
        images.append({"id": 99, "file_name": "000000000099.jpg", "height": 4, "width": 4})
    data = {"images": images, "annotations": anns, "categories": cats}
    (root / "panoptic.json").write_text(json.dumps(data))
    return data


def write_ade_folder(root: Path) -> None:
    """ADEChallengeData2016 layout with two tiny training images and one validation image."""
    rng = np.random.default_rng(1)
    for split, names in (("training", ["ADE_train_00000001", "ADE_train_00000002"]), ("validation",
                                                                                      ["ADE_val_00000001"])):
        for sub in ("images", "annotations", "annotations_instance"):
            (root / sub / split).mkdir(parents=True, exist_ok=True)
        for k, name in enumerate(names):
            h, w = 10, 14
            sem = np.zeros((h, w), np.uint8)
            sem[:4] = 3  # sky (stuff)
            sem[4:, :7] = 1  # wall (stuff)
            sem[4:, 7:] = 4  # floor (stuff)
            sem[6:9, 1:4] = 8  # bed (thing) -> covered by instance 1
            sem[0:2, 10:13] = 20  # chair (thing) without an instance -> void
            ins = np.zeros((h, w, 3), np.uint8)
            ins[6:9, 1:4] = (1, 1, 0)  # instance class 1 = bed (8), instance id 1
            ins[5:8, 9:12] = (1, 2, 0)  # a second bed overlapping floor (instance wins)
            if k == 1:
                ins[1:3, 1:3] = (8, 3, 0)  # instance class 8 = chair (20) on top of sky
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "images" / split /
                                                                                  f"{name}.jpg")
            Image.fromarray(sem).save(root / "annotations" / split / f"{name}.png")
            Image.fromarray(ins).save(root / "annotations_instance" / split / f"{name}.png")


# --------------------------------------------------------------------------------------------------------------------
# class names
# --------------------------------------------------------------------------------------------------------------------
def test_class_names_of_the_benchmarks():
    ade = load_class_names("ade20k")
    assert len(ade) == 150 and len(ade.thing_ids) == 100
    assert ade.category_ids == tuple(range(1, 151))
    assert ade.first_names[0] == "wall" and "walls" in ade.names[0].split(",")
    assert ade.is_thing[ade.label(8)] and not ade.is_thing[ade.label(1)]  # bed thing, wall stuff

    coco = load_class_names("coco_panoptic")
    assert len(coco) == 133 and len(coco.thing_ids) == 80
    cats = json.loads((SAMPLE / "panoptic_coco_categories.json").read_text())
    assert list(coco.category_ids) == [c["id"] for c in cats]
    assert [coco.is_thing[i] for i in range(len(coco))] == [bool(c["isthing"]) for c in cats]
    from_json = read_class_names(DATA_DIR / "class_names" / "coco_panoptic.txt",
                                 categories_json=SAMPLE / "panoptic_coco_categories.json")
    assert from_json.is_thing == coco.is_thing

    objects = load_class_names("coco_objects")
    assert len(objects) == 81 and objects.category_ids[0] == 0 and objects.first_names[0] == "background"
    assert objects.thing_ids == list(range(1, 81))
    assert load_class_names("sa1b").thing_ids == [0]
    with pytest.raises(ValueError, match="unknown dataset"):
        load_class_names("cityscapes")


def test_class_name_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_class_names(tmp_path / "nope.txt")
    bad = tmp_path / "bad.txt"
    bad.write_text("1:cat\nno colon here\n")
    with pytest.raises(ValueError, match="bad.txt:2"):
        read_class_names(bad)


# --------------------------------------------------------------------------------------------------------------------
# COCO panoptic format
# --------------------------------------------------------------------------------------------------------------------
def test_shipped_coco_sample_loads():
    coco = load_class_names("coco_panoptic")
    ds = load_coco_panoptic(SAMPLE / "images", SAMPLE / "panoptic", SAMPLE / "panoptic_annotations.json",
                            class_names=coco)
    data = json.loads((SAMPLE / "panoptic_annotations.json").read_text())
    assert len(ds) == 2
    assert ds[0]["image_id"] == data["annotations"][0]["image_id"]
    for row, ann in zip(ds, data["annotations"]):
        assert [s["id"] for s in row["segments_info"]] == [s["id"] for s in ann["segments_info"]]
        assert [s["category_id"] for s in row["segments_info"]] == [s["category_id"] for s in ann["segments_info"]]
        assert all(coco.category_ids[s["label"]] == s["category_id"] for s in row["segments_info"])
        target = panoptic_target_from_row(row)
        assert target.id_map.shape == (row["image"].height, row["image"].width)
        assert len(target.segments) == len(ann["segments_info"])  # COCO stuff: already one segment per class
        # the target id map equals the PNG decoded independently
        png = np.asarray(Image.open(SAMPLE / "panoptic" / ann["file_name"])).astype(np.int64)
        np.testing.assert_array_equal(target.id_map, png[..., 0] + 256 * png[..., 1] + 65536 * png[..., 2])


def test_masks_and_labels_ignore_crowd_and_void():
    ds = load_coco_panoptic(SAMPLE / "images", SAMPLE / "panoptic", SAMPLE / "panoptic_annotations.json",
                            class_names=load_class_names("coco_panoptic"))
    row = ds[0]
    target = panoptic_target_from_row(row)
    mapping = target.instance_id_to_label()
    crowd = [s for s in row["segments_info"] if s["iscrowd"]]
    assert crowd, "the sample has a crowd segment"
    assert all(s["id"] not in mapping for s in crowd)
    train_map = target.training_id_map()
    assert not np.isin(train_map, [s["id"] for s in crowd]).any()
    masks, labels = masks_and_labels(train_map, mapping)
    assert masks.dtype == torch.float32 and labels.dtype == torch.long
    assert masks.shape == (len(mapping),) + train_map.shape
    for m, (sid, lab) in zip(masks, mapping.items()):
        assert torch.equal(m.bool(), torch.from_numpy(train_map == sid))
    assert labels.tolist() == list(mapping.values())
    assert masks.sum(0).max() <= 1  # non-overlapping
    # semantic map: crowd keeps its class, void is ignored
    sem = target.semantic_map()
    assert (sem[target.id_map == 0] == 255).all()
    assert (sem[target.id_map == crowd[0]["id"]] == crowd[0]["label"]).all()


def test_coco_folder_counts_and_reports(tmp_path, caplog):
    write_coco_folder(tmp_path)
    with caplog.at_level(logging.WARNING):
        ds = load_coco_panoptic(tmp_path / "images", tmp_path / "panoptic", tmp_path / "panoptic.json")
    assert len(ds) == 3  # the unannotated image is dropped ...
    assert "1 of 4 images have no annotation entry" in caplog.text  # ... and reported
    assert "1 annotated images have no segment" in caplog.text
    info = json.loads(ds.info.description)
    assert info["unannotated_images"] == 1 and info["images_without_segments"] == 1
    names = dataset_class_names(ds)
    assert names.category_ids == (1, 3, 184, 187, 199) and names.thing_ids == [0, 1]
    kept = load_coco_panoptic(tmp_path / "images", tmp_path / "panoptic", tmp_path / "panoptic.json",
                              keep_unannotated=True)
    assert len(kept) == 4 and kept[3]["panoptic"] is None and kept[3]["segments_info"] == []


def test_coco_folder_errors_name_the_culprit(tmp_path):
    data = write_coco_folder(tmp_path)
    args = (tmp_path / "images", tmp_path / "panoptic")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_coco_panoptic(*args, tmp_path / "missing.json")
    (tmp_path / "panoptic" / "000000000001.png").unlink()
    with pytest.raises(FileNotFoundError, match="000000000001.png"):
        load_coco_panoptic(*args, tmp_path / "panoptic.json")
    (tmp_path / "images" / "000000000000.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="000000000000.jpg"):
        load_coco_panoptic(*args, tmp_path / "panoptic.json")
    bad = dict(data, annotations=data["annotations"] + [{"image_id": 12345, "file_name": "x.png",
                                                          "segments_info": []}])
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="image_id 12345"):
        load_coco_panoptic(*args, tmp_path / "bad.json", check_files=False)
    bad = json.loads(json.dumps(data))
    bad["annotations"][0]["segments_info"][0]["category_id"] = 55
    (tmp_path / "bad2.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="category_id 55"):
        load_coco_panoptic(*args, tmp_path / "bad2.json", check_files=False)


def test_save_to_disk_embeds_images(tmp_path):
    import datasets

    src = tmp_path / "src"
    write_coco_folder(src)
    ds = load_coco_panoptic(src / "images", src / "panoptic", src / "panoptic.json")
    before = panoptic_target_from_row(ds[0])
    ds.save_to_disk(str(tmp_path / "saved"))
    shutil.rmtree(src)
    again = datasets.load_from_disk(str(tmp_path / "saved"))
    after = panoptic_target_from_row(again[0])
    np.testing.assert_array_equal(before.id_map, after.id_map)
    assert again[0]["image"].size == (16, 12)


# --------------------------------------------------------------------------------------------------------------------
# COCO-Objects
# --------------------------------------------------------------------------------------------------------------------
def test_coco_objects_remap(tmp_path):
    write_coco_folder(tmp_path)
    objects = load_class_names("coco_objects")
    ds = load_coco_objects(tmp_path / "images", tmp_path / "panoptic", tmp_path / "panoptic.json")
    assert dataset_class_names(ds).names == objects.names
    row = ds[0]
    by_id = {s["id"]: s for s in row["segments_info"]}
    for sid in (1000, 2000, 3000):  # every stuff segment -> background
        assert by_id[sid]["category_id"] == 0 and by_id[sid]["label"] == 0 and not by_id[sid]["isthing"]
    assert by_id[11]["label"] == objects.label(1) and by_id[12]["label"] == objects.label(3)
    target = panoptic_target_from_row(row)
    stuff = [s for s in target.segments if not s["isthing"]]
    assert len(stuff) == 1  # the three stuff segments are merged into one background segment
    bg = stuff[0]["id"]
    orig = panoptic_target_from_row(ds[0], merge_stuff=False).id_map
    np.testing.assert_array_equal(target.id_map == bg, np.isin(orig, [1000, 2000, 3000]))
    sem = semantic_target_from_row(row)
    assert set(np.unique(sem).tolist()) <= {0, objects.label(1), objects.label(3), 255}
    # panoptic evaluation in the 81-class space: the ground truth against itself is perfect
    acc = PanopticQuality(objects.contiguous_categories())
    segs = target.eval_segments()
    acc.update(target.training_id_map(), [s for s in segs if not s["iscrowd"]], target.id_map, segs)
    rep = acc.compute()
    assert rep["All"]["pq"] == 1.0 and rep["Stuff"]["n"] == 1
    # the in-place remap of an already loaded COCO-Panoptic dataset gives the same rows
    coco_ds = load_coco_panoptic(tmp_path / "images", tmp_path / "panoptic", tmp_path / "panoptic.json",
                                 class_names=load_class_names("coco_panoptic"))
    assert to_coco_objects(coco_ds, objects)[0]["segments_info"] == row["segments_info"]


def _write_objects_case(root: Path) -> None:
    """Image 1: thing 5 (person), stuff 7 (tree) and 9 (sky), void; image 2: things 1 and 2 (car) and void only;
    image 3: thing 4 and stuff 6, no void."""
    (root / "images").mkdir(parents=True)
    (root / "panoptic").mkdir()
    cases = [
        [(5, 1, np.s_[2:5, 2:5]), (7, 184, np.s_[6:, :]), (9, 187, np.s_[:2, :])],
        [(1, 3, np.s_[:4, :4]), (2, 3, np.s_[5:, 5:])],
        [(4, 1, np.s_[:5, :]), (6, 187, np.s_[5:, :])],
    ]
    images, anns = [], []
    for k, segments in enumerate(cases):
        ids = np.zeros((8, 8), np.int64)
        for sid, _, region in segments:
            ids[region] = sid
        segs = [{"id": sid, "category_id": cat, "iscrowd": 0, "area": int((ids == sid).sum()), "bbox": [0, 0, 1, 1]}
                for sid, cat, _ in segments]
        Image.fromarray(np.full((8, 8, 3), 100, np.uint8)).save(root / "images" / f"{k}.jpg")
        Image.fromarray(id_to_rgb(ids)).save(root / "panoptic" / f"{k}.png")
        images.append({"id": k, "file_name": f"{k}.jpg", "height": 8, "width": 8})
        anns.append({"image_id": k, "file_name": f"{k}.png", "segments_info": segs})
    cats = [{"id": 1, "name": "person", "isthing": 1}, {"id": 3, "name": "car", "isthing": 1},
            {"id": 184, "name": "tree-merged", "isthing": 0}, {"id": 187, "name": "sky-other-merged", "isthing": 0}]
    (root / "panoptic.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))


def test_coco_objects_void_becomes_background_as_the_reference(tmp_path):
    """prepare_coco_objects.py: stuff and void pixels form one background segment (the first stuff segment's id); an
    image with things and void only gets a new background segment (smallest unused positive id); the ground truth
    then has no void, in training targets and in evaluation. coco_objects_void_to_background=False: the old void."""
    _write_objects_case(tmp_path)
    args = (tmp_path / "images", tmp_path / "panoptic", tmp_path / "panoptic.json")
    ds = load_coco_objects(*args)
    raw = [rgb_to_id(np.asarray(Image.open(tmp_path / "panoptic" / f"{k}.png").convert("RGB"))) for k in range(3)]

    first = panoptic_target_from_row(ds[0])
    assert sorted((s["id"], s["category_id"], s["isthing"]) for s in first.segments) == [(5, 1, True), (7, 0, False)]
    np.testing.assert_array_equal(first.id_map == 7, np.isin(raw[0], [0, 7, 9]))  # stuff + void
    np.testing.assert_array_equal(first.id_map == 5, raw[0] == 5)
    second = panoptic_target_from_row(ds[1])
    assert sorted((s["id"], s["category_id"]) for s in second.segments) == [(1, 3), (2, 3), (3, 0)]  # new id 3
    np.testing.assert_array_equal(second.id_map == 3, raw[1] == 0)
    third = panoptic_target_from_row(ds[2])
    assert sorted((s["id"], s["category_id"]) for s in third.segments) == [(4, 1), (6, 0)]
    for target in (first, second, third):
        assert (target.id_map != 0).all()  # no void left
        mask_labels, class_labels = masks_and_labels(target.training_id_map(), target.instance_id_to_label())
        assert int(mask_labels.sum()) == target.id_map.size  # every pixel is in a training target
        assert 0 in class_labels.tolist()
    # evaluation: a prediction that leaves the former void unlabeled now loses background quality
    objects = load_class_names("coco_objects")
    acc = PanopticQuality(objects.contiguous_categories())
    segs = first.eval_segments()
    prediction = np.where(raw[0] == 0, 0, first.id_map)
    acc.update(prediction, segs, first.id_map, segs)
    assert acc.compute()["Stuff"]["sq"] < 1.0

    old = load_coco_objects(*args, void_to_background=False)
    kept = panoptic_target_from_row(old[1])
    assert sorted(s["id"] for s in kept.segments) == [1, 2] and (kept.id_map == 0).sum() == (raw[1] == 0).sum()
    data, names = load_panoptic_dataset("coco_objects", images_dir=args[0], panoptic_dir=args[1],
                                        annotations_json=args[2],
                                        coco_objects_void_to_background=False)
    assert (panoptic_target_from_row(data[0]).id_map == 0).any() and len(names) == 81


# --------------------------------------------------------------------------------------------------------------------
# ADE20K
# --------------------------------------------------------------------------------------------------------------------
def test_ade20k_thing_list():
    assert len(ADE20K_THING_IDS) == 100 and len(set(ADE20K_THING_IDS)) == 100
    assert list(ADE20K_THING_IDS) == sorted(ADE20K_THING_IDS)
    assert all(1 <= i <= 150 for i in ADE20K_THING_IDS)
    names = load_class_names("ade20k").first_names
    things = {names[i - 1] for i in ADE20K_THING_IDS}
    assert {"bed", "person", "car", "chair", "flag"} <= things
    assert not {"wall", "sky", "floor", "road", "grass"} & things


def test_convert_annotation_follows_the_standard_conversion():
    sem = np.zeros((6, 8), np.uint8)
    sem[:3] = 3  # sky
    sem[3:] = 4  # floor
    sem[0, 0] = 20  # chair pixel without an instance -> void
    ins = np.zeros((6, 8, 3), np.uint8)
    ins[4:6, 0:3] = (1, 7, 0)  # bed on the floor
    ins[2:4, 5:7] = (8, 9, 0)  # chair across sky and floor
    id_map, segs = convert_annotation(sem, ins)
    by_cat = {s["category_id"]: s for s in segs}
    assert set(by_cat) == {3, 4, 8, 20}
    assert id_map[0, 0] == 0
    assert (id_map[4:6, 0:3] == by_cat[8]["id"]).all() and (id_map[2:4, 5:7] == by_cat[20]["id"]).all()
    # stuff areas are measured before instances are pasted (as the standard conversion does) ...
    assert by_cat[4]["area"] == int((sem == 4).sum())
    assert by_cat[3]["area"] == int((sem == 3).sum())
    assert by_cat[8]["area"] == 6 and by_cat[8]["bbox"] == [0, 4, 3, 2]
    # ... unless asked otherwise
    _, exact = convert_annotation(sem, ins, exact_areas=True)
    exact_by_cat = {s["category_id"]: s for s in exact}
    assert exact_by_cat[4]["area"] == int((id_map == by_cat[4]["id"]).sum())
    bad = ins.copy()
    bad[4, 0] = (2, 7, 0)  # one instance with two classes
    with pytest.raises(ValueError, match="instance 7"):
        convert_annotation(sem, bad)


def test_prepare_ade20k_and_load(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    write_ade_folder(root)
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "prepare_ade20k.py"), "--root", str(root),
                           "--num_workers", "0", "--no_progress"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((root / "ade20k_panoptic_train.json").read_text())
    assert [i["id"] for i in data["images"]] == ["ADE_train_00000001", "ADE_train_00000002"]
    assert len(data["categories"]) == 150 and sum(c["isthing"] for c in data["categories"]) == 100
    segs = data["annotations"][1]["segments_info"]
    assert sorted(s["category_id"] for s in segs) == [1, 3, 4, 8, 8, 20]
    png = rgb_to_id(np.asarray(Image.open(root / "ade20k_panoptic_train" / "ADE_train_00000002.png")))
    assert set(np.unique(png).tolist()) == {0} | {s["id"] for s in segs}

    ds = load_ade20k_panoptic(root, "training")
    assert len(ds) == 2 and ds.features["image_id"].dtype == "string"
    row = ds[1]
    ade = load_class_names("ade20k")
    sem = semantic_target_from_row(row, ade)
    raw = np.asarray(Image.open(root / "annotations" / "training" / "ADE_train_00000002.png")).astype(int)
    np.testing.assert_array_equal(sem, np.where(raw == 0, 255, raw - 1))  # ADE ids 1..150 -> 0..149
    target = panoptic_target_from_row(row)
    assert sorted(target.instance_id_to_label().values()) == sorted(ade.label(s["category_id"]) for s in segs)
    assert len(load_ade20k_panoptic(root, "validation", with_semantic=False)) == 1
    with pytest.raises(FileNotFoundError, match="prepare_ade20k"):
        load_ade20k_panoptic(tmp_path / "elsewhere", "training")


def test_prepare_ade20k_missing_instance_file(tmp_path):
    root = tmp_path / "ADE"
    write_ade_folder(root)
    (root / "annotations_instance" / "validation" / "ADE_val_00000001.png").unlink()
    with pytest.raises(FileNotFoundError, match="ADE_val_00000001.png"):
        prepare_ade20k_panoptic(root, "validation", progress=False)


# --------------------------------------------------------------------------------------------------------------------
# partitions
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "dataset,sizes,val",
    [("ade20k", {"1_128": 158, "1_64": 316, "1_32": 632, "1_16": 1263, "1_8": 2526}, 2000),
     ("coco", {"1_512": 232, "1_256": 463, "1_128": 925, "1_64": 1849, "1_32": 3697}, 5000)],
)
def test_standard_partition_files_resolve(dataset, sizes, val):
    for partition, n in sizes.items():
        keys = partition_keys(dataset, partition)
        assert len(keys) == n == len(set(keys))
    assert len(partition_keys(dataset, "val")) == val
    small = set(partition_keys(dataset, min(sizes, key=sizes.get)))
    assert small and all(k.startswith("ADE_train_") if dataset == "ade20k" else k.isdigit() for k in small)
    pairs = read_split_file(DATA_DIR / "splits" / dataset / "val.txt")
    assert all(Path(img).stem == Path(ann).stem for img, ann in pairs)
    with pytest.raises(FileNotFoundError, match="1_3"):
        partition_keys(dataset, "1_3")


def test_split_labeled_unlabeled(tmp_path):
    write_coco_folder(tmp_path, with_unannotated=False)
    ds = load_coco_panoptic(tmp_path / "images", tmp_path / "panoptic", tmp_path / "panoptic.json")
    lab, unl = split_labeled_unlabeled(ds, ["000000000001"])
    assert lab["file_name"] == ["000000000001.jpg"]
    assert sorted(unl["file_name"]) == ["000000000000.jpg", "000000000002.jpg"]
    lab, unl = split_labeled_unlabeled(ds, [3])  # image ids work too
    assert lab["image_id"] == [3] and len(unl) == 2
    a, _ = split_labeled_unlabeled(ds, fraction=0.5, seed=7)
    b, _ = split_labeled_unlabeled(ds, fraction=0.5, seed=7)
    assert a["file_name"] == b["file_name"] and len(a) == 2
    with pytest.raises(KeyError, match="ADE_train_00001609"):
        split_labeled_unlabeled(ds, dataset="ade20k", partition="1_128")
    with pytest.raises(ValueError, match="exactly one"):
        split_labeled_unlabeled(ds, ["000000000001"], fraction=0.5)


def test_standard_partition_on_a_dataset_with_those_images(tmp_path):
    """A tiny training set named after a real partition: labeled = listed images, unlabeled = the rest."""
    keys = partition_keys("ade20k", "1_128")[:2] + ["ADE_train_99999999"]
    root = tmp_path / "ade"
    (root / "img").mkdir(parents=True)
    (root / "pan").mkdir()
    images, anns = [], []
    for i, k in enumerate(keys):
        Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(root / "img" / f"{k}.jpg")
        Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(root / "pan" / f"{k}.png")
        images.append({"id": k, "file_name": f"{k}.jpg", "height": 2, "width": 2})
        anns.append({"image_id": k, "file_name": f"{k}.png", "segments_info": []})
    (root / "p.json").write_text(json.dumps({"images": images, "annotations": anns,
                                             "categories": [{"id": 1, "name": "wall", "isthing": 0}]}))
    ds = load_coco_panoptic(root / "img", root / "pan", root / "p.json")
    lab, unl = split_labeled_unlabeled(ds, dataset="ade20k", partition="1_128", strict=False)
    assert lab["image_id"] == keys[:2] and unl["image_id"] == ["ADE_train_99999999"]


def test_class_names_dataclass():
    names = ClassNames((5, 9), ("cat,kitty", "grass"), (True, False))
    assert names.category_to_index == {5: 0, 9: 1} and names.index_to_category == [5, 9]
    assert names.thing_ids == [0] and names.first_names == ["cat", "grass"]
    assert names.categories()[0] == {"id": 5, "name": "cat", "isthing": 1}
    assert names.contiguous_categories()[1] == {"id": 1, "name": "grass", "isthing": 0}
    with pytest.raises(KeyError, match="category id 7"):
        names.label(7)
    with pytest.raises(ValueError, match="duplicate"):
        ClassNames((1, 1), ("a", "b"), (True, True))
