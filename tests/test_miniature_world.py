"""The miniature world: determinism by seed, COCO panoptic validity, loading through the COCO dataset code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from modeling_dearli.image_processing_dearli import rgb_to_id
from training.data.class_names import read_class_names
from training.data.panoptic_datasets import load_coco_panoptic, load_panoptic_dataset
from training.data.panoptic_targets import panoptic_target_from_row
from training.data.partitions import split_labeled_unlabeled
from training.evaluation.panoptic_quality import evaluate_panoptic_folders
from training.miniature import world as W

REPO = Path(__file__).resolve().parents[1]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
            and p.name != "world.json"}


@pytest.fixture(scope="module")
def small_world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world") / "seed3"
    W.generate_world(root, world_seed=3, num_train=24, num_val=4, progress=False)
    return root


def test_same_seed_same_bytes_other_seed_other_images(small_world: Path, tmp_path: Path):
    again = tmp_path / "again"  # written by two processes: the same bytes
    W.generate_world(again, world_seed=3, num_train=24, num_val=4, progress=False, num_workers=2)
    assert _files(again) == _files(small_world)
    other = tmp_path / "other"
    W.generate_world(other, world_seed=4, num_train=2, num_val=1, progress=False)
    a = np.asarray(Image.open(small_world / "images/train/train_000000.jpg"))
    b = np.asarray(Image.open(other / "images/train/train_000000.jpg"))
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 10


def test_finished_world_is_reused_and_other_folders_are_refused(small_world: Path, tmp_path: Path):
    before = _files(small_world)
    record = W.generate_world(small_world, world_seed=3, num_train=24, num_val=4, progress=False)
    assert record["config"]["world_seed"] == 3 and _files(small_world) == before
    with pytest.raises(FileExistsError, match="different world"):
        W.generate_world(small_world, world_seed=5, num_train=24, num_val=4, progress=False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        W.generate_world(tmp_path / "busy", num_train=1, num_val=1, progress=False)
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


def test_ground_truth_is_valid_coco_panoptic(small_world: Path):
    data = json.loads((small_world / "annotations/panoptic_train.json").read_text())
    cats = {c["id"]: c for c in data["categories"]}
    assert sum(c["isthing"] for c in cats.values()) >= 20 and sum(1 - c["isthing"] for c in cats.values()) >= 4
    assert all(len(c["color"]) == 3 for c in cats.values())
    things_per_image = []
    for ann in data["annotations"]:
        ids = rgb_to_id(np.asarray(Image.open(small_world / "panoptic/train" / ann["file_name"]).convert("RGB")))
        listed = {s["id"]: s for s in ann["segments_info"]}
        assert set(np.unique(ids).tolist()) == set(listed)  # every pixel belongs to a listed segment: no void
        for sid, seg in listed.items():
            ys, xs = np.nonzero(ids == sid)
            assert seg["area"] == len(ys)
            assert seg["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert seg["category_id"] in cats
            if cats[seg["category_id"]]["isthing"]:
                assert seg["area"] >= W.WorldSettings().min_visible_area  # no tiny remnants
        stuff = [s["category_id"] for s in listed.values() if not cats[s["category_id"]]["isthing"]]
        assert len(stuff) == len(set(stuff))  # one segment per stuff class
        things_per_image.append(len(listed) - len(stuff))
    assert np.mean(things_per_image) >= 3


def test_panoptic_quality_of_ground_truth_against_itself_is_100(small_world: Path):
    for split in ("train", "val"):
        paths = W.world_paths(small_world, split)
        report = evaluate_panoptic_folders(paths["annotations"], paths["annotations"], paths["panoptic"],
                                           paths["panoptic"], progress=False)
        assert report["All"]["pq"] == pytest.approx(1.0)
        assert report["Things"]["pq"] == pytest.approx(1.0) and report["Stuff"]["pq"] == pytest.approx(1.0)


def test_loads_through_the_coco_panoptic_code_with_the_class_names_file(small_world: Path):
    paths = W.world_paths(small_world, "train")
    class_names = read_class_names(paths["class_names"], categories_json=paths["annotations"])
    assert len(class_names) == len(W.CLASSES) and len(class_names.thing_ids) == len(W.THING_CLASSES)
    assert class_names.names[1].startswith("zebra,")  # synonyms come from the class-name file
    ds = load_coco_panoptic(paths["images"], paths["panoptic"], paths["annotations"], class_names=class_names)
    assert len(ds) == 24
    target = panoptic_target_from_row(ds[0])
    assert len(target.segments) == len(ds[0]["segments_info"])  # stuff already one segment per class
    assert {s["isthing"] for s in target.segments} == {True, False}
    # the default label space (JSON categories) is the same, in the same order
    default = load_coco_panoptic(paths["images"], paths["panoptic"], paths["annotations"])
    assert default[0]["segments_info"] == ds[0]["segments_info"]


def test_class_names_file_gives_the_loops_synonyms(small_world: Path):
    from training.arguments import load_panoptic_training_data, parse_args

    train, val = W.world_paths(small_world, "train"), W.world_paths(small_world, "val")
    argv = ["--dataset_name", "custom", "--train_images_dir", str(train["images"]), "--train_panoptic_dir",
            str(train["panoptic"]), "--train_annotations", str(train["annotations"]), "--val_images_dir",
            str(val["images"]), "--val_panoptic_dir", str(val["panoptic"]), "--val_annotations",
            str(val["annotations"]), "--labeled_fraction", "0.25", "--output_dir", str(small_world / "unused")]
    plain = load_panoptic_training_data(parse_args("ssl", argv))
    named = load_panoptic_training_data(parse_args("ssl", [*argv, "--class_names_file", str(train["class_names"])]))
    assert plain.class_names.names[1] == "zebra" and named.class_names.names[1].startswith("zebra,zebras")
    assert named.class_names.category_ids == plain.class_names.category_ids
    assert named.class_names.thing_ids == plain.class_names.thing_ids == list(range(len(W.THING_CLASSES)))
    assert len(named.labeled) == 6 and len(named.unlabeled) == 18 and len(named.validation) == 4
    with pytest.raises(ValueError, match="class-names file"):
        load_panoptic_dataset("ade20k", ade20k_root=str(small_world), class_names_file=str(train["class_names"]))


def test_recorded_labeled_subsets_are_the_ones_the_loops_draw(small_world: Path):
    paths = W.world_paths(small_world, "train")
    ds = load_coco_panoptic(paths["images"], paths["panoptic"], paths["annotations"])
    for fraction, seed in ((1 / 8, 0), (1 / 4, 1)):
        labeled, _ = split_labeled_unlabeled(ds, fraction=fraction, seed=seed)
        assert list(labeled["image_id"]) == W.labeled_indices(len(ds), fraction, seed)
    record = json.loads((small_world / "world.json").read_text())
    subset = W.labeled_indices(24, 1 / 8, 0)
    expected = W.class_frequencies(json.loads(paths["annotations"].read_text()), subset)
    assert record["frequencies"]["columns"]["labeled_1/8"] == {str(k): v for k, v in expected.items()}
    assert "| 2 | zebra | thing |" in (small_world / "class_frequencies.md").read_text()


def test_long_tail_and_every_class_appears():
    p = W.thing_probabilities()
    assert np.all(np.diff(p) < 0) and p[0] / p[-1] > 30
    names = [n for c in W.CLASSES for n in c.names]
    assert len(names) == len(set(names))  # no name or synonym is shared
    looks = [(c.pattern, c.colors) for c in W.CLASSES]
    assert len(looks) == len(set(looks))  # no two classes look alike


def test_image_size_scales_the_world():
    image, ids, segments = W.render_world_image(0, "val", 0, W.WorldSettings(image_size=128))
    assert image.shape == (128, 128, 3) and ids.shape == (128, 128)
    assert set(np.unique(ids).tolist()) == {s["id"] for s in segments}


def test_script_help_documents_every_flag():
    out = subprocess.run([sys.executable, str(REPO / "scripts/generate_miniature_world.py"), "--help"],
                         capture_output=True, text=True, check=True).stdout
    for flag in ("--output_dir", "--world_seed", "--num_train", "--num_val", "--image_size", "--labeled_fraction"):
        assert flag in out
