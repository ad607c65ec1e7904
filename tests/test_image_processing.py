"""DearliImageProcessor preprocessing, Mask2Former targets, and save / load."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor

from modeling_dearli.image_processing_dearli import CLIP_MEAN, CLIP_STD, DearliImageProcessor, rgb_to_id
from training.data.package_data import COCO_PANOPTIC_SAMPLE

SAMPLE = COCO_PANOPTIC_SAMPLE.root


def coco_sample():
    """(image, panoptic PNG, segment id -> contiguous class or -1 for crowd, segments_info) per sample image."""
    annotations = json.loads((SAMPLE / "panoptic_annotations.json").read_text())
    categories = json.loads((SAMPLE / "panoptic_coco_categories.json").read_text())
    contiguous = {c["id"]: i for i, c in enumerate(categories)}
    for ann in annotations["annotations"]:
        image = Image.open(SAMPLE / "images" / ann["file_name"].replace(".png", ".jpg"))
        png = Image.open(SAMPLE / "panoptic" / ann["file_name"])
        mapping = {s["id"]: (-1 if s["iscrowd"] else contiguous[s["category_id"]]) for s in ann["segments_info"]}
        yield image, png, mapping, ann["segments_info"]


def test_resize_normalise_pad():
    processor = DearliImageProcessor()
    image = Image.new("RGB", (640, 427), (128, 64, 255))
    out = processor(image)
    assert out["pixel_values"].shape == (1, 3, 640, 960)  # 427x640 -> 640x959 -> padded to a multiple of 32
    assert out["pixel_mask"].shape == (1, 640, 960) and out["pixel_mask"].dtype == torch.long
    assert out["pixel_mask"][0, :, :959].all() and not out["pixel_mask"][0, :, 959:].any()
    expected = (torch.tensor([128, 64, 255]) / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(out["pixel_values"][0, :, 100, 100], expected)
    assert (out["pixel_values"][0, :, :, 959:] == 0).all()
    coco = DearliImageProcessor(size={"shortest_edge": 800, "longest_edge": 1000})
    assert coco(image)["pixel_mask"][0].sum(0).max() == 667 and coco(image)["pixel_mask"][0].sum(1).max() == 1000
    fixed = processor(image, size={"height": 100, "width": 50}, size_divisor=1)
    assert fixed["pixel_values"].shape == (1, 3, 100, 50)
    assert processor(image, do_resize=False)["pixel_values"].shape == (1, 3, 448, 640)


def test_input_kinds_and_batching():
    processor = DearliImageProcessor(do_resize=False)
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    gray = rgb[..., 0]
    images = [
        Image.fromarray(rgb),
        Image.fromarray(gray),  # mode L
        Image.fromarray(np.dstack([rgb, np.full((20, 30), 7, np.uint8)])),  # RGBA
        rgb,
        gray,
        rgb.transpose(2, 0, 1).astype(np.float32) / 255,  # CHW float
        torch.from_numpy(rgb).permute(2, 0, 1),  # CHW uint8 tensor
        torch.from_numpy(gray)[None],  # (1, H, W)
        np.dstack([rgb, rgb[..., :1]]),  # HW4
    ]
    out = processor(images)
    values = out["pixel_values"]
    assert values.shape == (len(images), 3, 32, 32)
    for i in (2, 3, 5, 6, 8):
        torch.testing.assert_close(values[i], values[0])
    for i in (4, 7):
        torch.testing.assert_close(values[i], values[1])
    torch.testing.assert_close(  # grayscale is replicated into the three channels
        values[1, :, :20, :30] * torch.tensor(CLIP_STD)[:, None, None] + torch.tensor(CLIP_MEAN)[:, None, None],
        torch.from_numpy(gray).float().div(255).expand(3, -1, -1),
    )
    batch = processor(np.stack([rgb, rgb]))  # a 4-D batch
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    ambiguous = rgb[:, :3, :].transpose(1, 0, 2).copy()  # (3, 20, 3): 3 channels first or last?
    assert processor(ambiguous)["pixel_mask"][0].sum().item() == 3 * 20  # numpy: channels last by default
    forced = processor(ambiguous, input_data_format="channels_first")
    assert forced["pixel_mask"][0].sum().item() == 20 * 3 and forced["pixel_mask"][0, :, 0].sum() == 20
    as_numpy = processor(rgb, return_tensors="np")
    assert isinstance(as_numpy["pixel_values"], np.ndarray)


@pytest.mark.parametrize(
    "bad, error, match",
    [
        ("image.jpg", TypeError, "unsupported type"),
        (np.zeros((10, 10, 5), np.uint8), ValueError, "channel"),
        (np.full((10, 10, 3), 2.0, np.float32), ValueError, r"\[0, 1\]"),
        (np.zeros((10, 10, 3), np.int64), ValueError, "dtype"),
        (np.zeros((0, 10, 3), np.uint8), ValueError, "empty"),
        (np.zeros((2, 3, 4, 5, 6), np.uint8), ValueError, "dimensions"),
        ([], ValueError, "empty"),
    ],
)
def test_invalid_images_raise_clear_errors(bad, error, match):
    with pytest.raises(error, match=match):
        DearliImageProcessor()(bad)


def test_invalid_arguments():
    processor = DearliImageProcessor()
    image = np.zeros((10, 12, 3), np.uint8)
    with pytest.raises(TypeError, match="unexpected"):
        processor(image, colour="blue")
    with pytest.raises(ValueError, match="return_tensors"):
        processor(image, return_tensors="tf")
    with pytest.raises(ValueError, match="size"):
        processor(image, size={"longest": 3})
    with pytest.raises(ValueError, match="segmentation maps"):
        processor([image, image], segmentation_maps=[np.zeros((10, 12), np.int64)])
    with pytest.raises(ValueError, match="size"):
        processor(image, segmentation_maps=np.zeros((11, 12), np.int64))
    with pytest.raises(ValueError, match="instance_id_to_semantic_id"):
        processor(image, segmentation_maps=np.full((10, 12, 3), 5, np.uint8))
    with pytest.raises(ValueError, match=r"\[7\]"):
        processor(image, segmentation_maps=np.full((10, 12), 7), instance_id_to_semantic_id={3: 1})
    with pytest.raises(ValueError, match="alpha"):
        DearliImageProcessor(ensemble_alpha=2.0)


def test_coco_panoptic_targets_round_trip():
    processor = DearliImageProcessor(num_labels=133)
    for image, png, mapping, segments in coco_sample():
        out = processor(image, segmentation_maps=png, instance_id_to_semantic_id=mapping, do_resize=False)
        masks, labels = out["mask_labels"][0], out["class_labels"][0]
        height, width = image.height, image.width
        assert masks.shape[1:] == out["pixel_values"].shape[2:] and masks.dtype == torch.float32
        assert not masks[:, height:].any() and not masks[:, :, width:].any()  # padding is void
        ids = torch.from_numpy(rgb_to_id(np.asarray(png)).astype(np.int64))
        expected = {s["id"]: mapping[s["id"]] for s in segments if not s["iscrowd"] and (ids == s["id"]).any()}
        assert len(masks) == len(expected) and sum(s["iscrowd"] for s in segments) >= 1  # crowd dropped
        recovered = {}
        for mask, label in zip(masks, labels.tolist()):
            segment_ids = ids[mask[:height, :width].bool()].unique().tolist()
            assert len(segment_ids) == 1
            assert torch.equal(mask[:height, :width].bool(), ids == segment_ids[0])
            recovered[segment_ids[0]] = label
        assert recovered == expected


def test_coco_targets_follow_the_resize():
    processor = DearliImageProcessor()
    image, png, mapping, _ = next(coco_sample())
    out = processor(image, segmentation_maps=png, instance_id_to_semantic_id=mapping)
    masks = out["mask_labels"][0]
    valid = out["pixel_mask"][0].bool()
    height, width = int(valid.any(1).sum()), int(valid.any(0).sum())
    assert (height, width) == (640, 959)
    assert masks.sum(0).max() <= 1 and not masks[:, ~valid].any()
    resized = torch.from_numpy(rgb_to_id(np.asarray(png.resize((width, height), Image.NEAREST))).astype(np.int64))
    kept = torch.tensor([i for i, c in mapping.items() if c >= 0])
    assert masks.sum() == torch.isin(resized, kept).sum()


def test_semantic_maps_without_mapping():
    processor = DearliImageProcessor(do_resize=False)
    seg = np.array([[0, 0, 2], [255, 2, 1]], dtype=np.uint8)
    out = processor(np.zeros((2, 3, 3), np.uint8), segmentation_maps=seg)
    assert out["class_labels"][0].tolist() == [0, 1, 2]
    assert out["mask_labels"][0][:, :2, :3].sum(0).tolist() == [[1, 1, 1], [0, 1, 1]]  # 255 = ignored


def test_save_load_round_trip(tmp_path):
    processor = DearliImageProcessor(
        size={"shortest_edge": 800, "longest_edge": 1333}, num_labels=3, label_ids_to_fuse=[2, 1], ensemble_alpha=0.4
    )
    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert config["auto_map"]["AutoImageProcessor"] == "image_processing_dearli.DearliImageProcessor"
    assert {"image_processing_dearli.py", "ensembling.py", "segmentation_inference.py"} <= {
        p.name for p in tmp_path.iterdir()
    }
    loaded = DearliImageProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == processor.to_dict()
    assert loaded.label_ids_to_fuse == [1, 2] and loaded.ensemble_alpha == 0.4 and loaded.size["shortest_edge"] == 800
    auto = AutoImageProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    image = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    torch.testing.assert_close(auto(image)["pixel_values"], processor(image)["pixel_values"])
    assert DearliImageProcessor.from_pretrained(tmp_path, ensemble_alpha=0.9).ensemble_alpha == 0.9


@pytest.mark.slow
def test_remote_code_loads_without_the_package(tmp_path):
    DearliImageProcessor(num_labels=2, label_ids_to_fuse=[1]).save_pretrained(tmp_path)
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["modeling_dearli"] = None  # as on a machine without this repository
        import torch
        from transformers import AutoImageProcessor
        from transformers.utils import ModelOutput
        processor = AutoImageProcessor.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)
        assert type(processor).__module__.startswith("transformers_modules"), type(processor).__module__
        outputs = ModelOutput(class_queries_logits=torch.randn(1, 4, 3), masks_queries_logits=torch.randn(1, 4, 8, 8))
        result = processor.post_process_panoptic_segmentation(outputs)[0]
        assert result["segmentation"].shape == (32, 32)
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


def test_from_model_config():
    from modeling_dearli.presets import tiny_config

    config = tiny_config(class_names=["person", "sky", "grass", "car"], thing_ids=[0, 3])
    processor = DearliImageProcessor.from_model_config(config, size={"shortest_edge": 512, "longest_edge": 2048})
    assert processor.num_labels == 4 and processor.label_ids_to_fuse == [1, 2]
    assert processor.ensemble_alpha == config.ensemble_alpha and processor.size["shortest_edge"] == 512
