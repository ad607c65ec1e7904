"""Conversion of the reference implementation's (helen1c/DEARLi, detectron2) checkpoints.

The synthetic checkpoint below is built from the reference's module definitions (key names and shapes read from
``open_clip_backbone.py``, ``msdeformattn.py``, ``vision_language_mask2former_transformer_decoder.py`` and
``vision_language_maskformer_student.py``), not from our converter's rules, so the round trip is a real check.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from modeling_dearli import DearliConfig, DearliForPanopticSegmentation, tiny_config
from modeling_dearli.clip_backbone import build_open_clip_model
from training.publishing.reference_conversion import (
    ReferenceCheckpointError,
    convert_reference_state_dict,
    load_reference_state_dict,
    reference_config,
    verify_converted_model,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
CLASS_NAMES = ["person,man,woman", "car", "sky", "grass,lawn"]
THING_IDS = [0, 1]


def reference_state_dict(config: DearliConfig, seed: int = 0, num_trained_classes: int | None = None) -> dict:
    """A state dict with the names and shapes of the reference's ``VisionLanguageMaskFormerStudent`` for `config`'s
    architecture, random values."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator) * 0.05

    state: dict[str, torch.Tensor] = {}
    # backbone: OpenCLIPBackbone keeps the whole OpenCLIP model as `clip_model` (image and text towers).
    torch.manual_seed(seed + 1)
    clip_model = build_open_clip_model(config.clip_model_config)
    for key, value in clip_model.state_dict().items():
        state[f"backbone.clip_model.{key}"] = value.clone() + (rand(*value.shape) if value.is_floating_point() else 0)
    channels = [int(info["num_chs"]) for info in clip_model.visual.trunk.feature_info][-4:]

    conv, mask_dim, h = config.feature_size, config.mask_feature_size, config.hidden_dim
    heads, levels, points = config.num_attention_heads, 3, 4
    d = config.clip_embed_dim
    # MSDeformAttnPixelDecoder: input_proj (res5, res4, res3), transformer encoder, 1x1 mask_features, one FPN level.
    pd = "sem_seg_head.pixel_decoder."
    for i, c in enumerate(channels[1:][::-1]):
        state[f"{pd}input_proj.{i}.0.weight"] = rand(conv, c, 1, 1)
        state[f"{pd}input_proj.{i}.0.bias"] = rand(conv)
        state[f"{pd}input_proj.{i}.1.weight"] = 1 + rand(conv)  # GroupNorm
        state[f"{pd}input_proj.{i}.1.bias"] = rand(conv)
    state[f"{pd}transformer.level_embed"] = rand(levels, conv)
    for layer in range(config.encoder_layers):
        p = f"{pd}transformer.encoder.layers.{layer}."
        for name, rows in (
            ("sampling_offsets", heads * levels * points * 2),
            ("attention_weights", heads * levels * points),
            ("value_proj", conv),
            ("output_proj", conv),
        ):
            state[f"{p}self_attn.{name}.weight"] = rand(rows, conv)
            state[f"{p}self_attn.{name}.bias"] = rand(rows)
        state[f"{p}linear1.weight"] = rand(config.encoder_feedforward_dim, conv)
        state[f"{p}linear1.bias"] = rand(config.encoder_feedforward_dim)
        state[f"{p}linear2.weight"] = rand(conv, config.encoder_feedforward_dim)
        state[f"{p}linear2.bias"] = rand(conv)
        for norm in ("norm1", "norm2"):
            state[f"{p}{norm}.weight"] = 1 + rand(conv)
            state[f"{p}{norm}.bias"] = rand(conv)
    state[f"{pd}mask_features.weight"] = rand(mask_dim, conv, 1, 1)
    state[f"{pd}mask_features.bias"] = rand(mask_dim)
    # detectron2 Conv2d(norm=GN, bias=False): weight + norm.{weight,bias}
    state[f"{pd}adapter_1.weight"] = rand(conv, channels[0], 1, 1)
    state[f"{pd}layer_1.weight"] = rand(conv, conv, 3, 3)
    for name in ("adapter_1", "layer_1"):
        state[f"{pd}{name}.norm.weight"] = 1 + rand(conv)
        state[f"{pd}{name}.norm.bias"] = rand(conv)

    # VisionLanguageMultiScaleMaskedTransformerDecoder (DEC_LAYERS - 1 attention layers).
    pr = "sem_seg_head.predictor."
    for i in range(config.decoder_layers - 1):
        for group, attn in (
            ("transformer_self_attention_layers", "self_attn"),
            ("transformer_cross_attention_layers", "multihead_attn"),
        ):
            state[f"{pr}{group}.{i}.{attn}.in_proj_weight"] = rand(3 * h, h)
            state[f"{pr}{group}.{i}.{attn}.in_proj_bias"] = rand(3 * h)
            state[f"{pr}{group}.{i}.{attn}.out_proj.weight"] = rand(h, h)
            state[f"{pr}{group}.{i}.{attn}.out_proj.bias"] = rand(h)
            state[f"{pr}{group}.{i}.norm.weight"] = 1 + rand(h)
            state[f"{pr}{group}.{i}.norm.bias"] = rand(h)
        state[f"{pr}transformer_ffn_layers.{i}.linear1.weight"] = rand(config.dim_feedforward, h)
        state[f"{pr}transformer_ffn_layers.{i}.linear1.bias"] = rand(config.dim_feedforward)
        state[f"{pr}transformer_ffn_layers.{i}.linear2.weight"] = rand(h, config.dim_feedforward)
        state[f"{pr}transformer_ffn_layers.{i}.linear2.bias"] = rand(h)
        state[f"{pr}transformer_ffn_layers.{i}.norm.weight"] = 1 + rand(h)
        state[f"{pr}transformer_ffn_layers.{i}.norm.bias"] = rand(h)
    state[f"{pr}decoder_norm.weight"] = 1 + rand(h)
    state[f"{pr}decoder_norm.bias"] = rand(h)
    state[f"{pr}query_feat.weight"] = rand(config.num_queries, h)
    state[f"{pr}query_embed.weight"] = rand(config.num_queries, h)
    state[f"{pr}level_embed.weight"] = rand(levels, h)
    for j, (rows, cols) in enumerate(((h, h), (h, h), (mask_dim, h))):
        state[f"{pr}mask_embed.layers.{j}.weight"] = rand(rows, cols)
        state[f"{pr}mask_embed.layers.{j}.bias"] = rand(rows)
    for j, (rows, cols) in enumerate(((h, h), (h, h), (d, h))):
        state[f"{pr}class_embed.layers.{j}.weight"] = rand(rows, cols)
        state[f"{pr}class_embed.layers.{j}.bias"] = rand(rows)
    state[f"{pr}logit_scale"] = torch.tensor(2.5)
    state["void_embedding.weight"] = rand(1, d)
    n = (num_trained_classes or config.num_classes) + 1
    state["criterion_labeled.empty_weight"] = torch.ones(n)
    state["criterion_pseudolabeled.empty_weight"] = torch.ones(n)
    return state


@pytest.fixture(scope="module")
def config() -> DearliConfig:
    return reference_config(CLASS_NAMES, THING_IDS, base_config=tiny_config())


@pytest.fixture(scope="module")
def reference(config) -> dict:
    return reference_state_dict(config)


@pytest.fixture(scope="module")
def converted(config, reference):
    return convert_reference_state_dict(reference, config)


def test_reference_config_keeps_architecture_and_sets_vocabulary(config):
    tiny = tiny_config()
    assert config.class_names == CLASS_NAMES and config.thing_ids == THING_IDS
    assert config.num_queries == tiny.num_queries and config.clip_model_config == tiny.clip_model_config
    assert config.ensemble_alpha == pytest.approx(0.6)  # reference GEOMETRIC_ENSEMBLE_ALPHA 0.4 weights CLIP
    full = reference_config(CLASS_NAMES, THING_IDS)
    assert full.clip_model_name == "convnext_base_w_320" and full.num_queries == 200 and full.decoder_layers == 10


def test_reference_config_takes_only_the_architecture_from_a_base_config():
    """--config is architecture only: the converted model keeps the reference's 14 prompt templates (its text
    embeddings follow them), its ensembling weight and loss settings, whatever the base config says."""
    from modeling_dearli.configuration_dearli import VILD_PROMPT_TEMPLATES

    base = tiny_config(prompt_templates=["a {}."], ensemble_alpha=0.9, train_num_points=77, num_queries=12)
    config = reference_config(CLASS_NAMES, THING_IDS, base_config=base)
    assert config.prompt_templates == list(VILD_PROMPT_TEMPLATES) and len(config.prompt_templates) == 14
    assert config.ensemble_alpha == pytest.approx(0.6) and config.train_num_points == 12544
    assert config.num_queries == 12 and config.clip_model_config == base.clip_model_config
    assert config.hidden_dim == base.hidden_dim and config.decoder_layers == base.decoder_layers
    assert reference_config(CLASS_NAMES, THING_IDS, base_config=base, ensemble_alpha=0.5).ensemble_alpha == 0.5


def _text_tower_keys(reference: dict) -> set[str]:
    clip = "backbone.clip_model."
    return {k for k in reference if k.startswith(clip) and not k.startswith((clip + "visual.", clip + "logit_scale"))}


def test_converted_keys_counts_each_copied_reference_tensor_once(converted, reference, config):
    """conversion_info's count: every key copied into our model, once (the image tower and logit_scale were counted
    twice, and the text tower counted although only read to encode the class names)."""
    ignored = {k for k in reference if k.startswith("criterion")}
    text_tower = _text_tower_keys(reference)
    assert text_tower and converted.converted_keys == len(reference) - len(ignored) - len(text_tower)
    # A kept text tower is copied (counted); a checkpoint text classifier is copied too.
    kept = reference_config(CLASS_NAMES, THING_IDS, base_config=tiny_config(), keep_text_tower=True)
    with_tower = convert_reference_state_dict(reference, kept)
    assert with_tower.converted_keys == len(reference) - len(ignored)
    classifier = {**reference, "text_classifier": torch.randn(7, config.clip_embed_dim)}
    assert convert_reference_state_dict(classifier, config).converted_keys == converted.converted_keys + 1


def test_round_trip_copies_every_reference_tensor(converted, reference, config):
    ours = converted.model.state_dict()
    h = config.hidden_dim
    explicit = {
        "sem_seg_head.pixel_decoder.input_proj.0.0.weight": "pixel_decoder.input_projections.0.0.weight",
        "sem_seg_head.pixel_decoder.input_proj.2.1.bias": "pixel_decoder.input_projections.2.1.bias",
        "sem_seg_head.pixel_decoder.transformer.level_embed": "pixel_decoder.level_embed",
        "sem_seg_head.pixel_decoder.transformer.encoder.layers.0.self_attn.sampling_offsets.weight":
            "pixel_decoder.encoder.layers.0.self_attn.sampling_offsets.weight",
        "sem_seg_head.pixel_decoder.transformer.encoder.layers.0.linear1.weight":
            "pixel_decoder.encoder.layers.0.fc1.weight",
        "sem_seg_head.pixel_decoder.transformer.encoder.layers.0.norm1.bias":
            "pixel_decoder.encoder.layers.0.self_attn_layer_norm.bias",
        "sem_seg_head.pixel_decoder.transformer.encoder.layers.0.norm2.weight":
            "pixel_decoder.encoder.layers.0.final_layer_norm.weight",
        "sem_seg_head.pixel_decoder.adapter_1.weight": "pixel_decoder.adapter_1.0.weight",
        "sem_seg_head.pixel_decoder.adapter_1.norm.weight": "pixel_decoder.adapter_1.1.weight",
        "sem_seg_head.pixel_decoder.layer_1.norm.bias": "pixel_decoder.layer_1.1.bias",
        "sem_seg_head.pixel_decoder.mask_features.weight": "pixel_decoder.mask_projection.weight",
        "sem_seg_head.predictor.query_feat.weight": "transformer_module.queries_features.weight",
        "sem_seg_head.predictor.query_embed.weight": "transformer_module.queries_embedder.weight",
        "sem_seg_head.predictor.level_embed.weight": "transformer_module.level_embed.weight",
        "sem_seg_head.predictor.transformer_cross_attention_layers.1.multihead_attn.in_proj_weight":
            "transformer_module.decoder.layers.1.cross_attn.in_proj_weight",
        "sem_seg_head.predictor.transformer_cross_attention_layers.1.norm.weight":
            "transformer_module.decoder.layers.1.cross_attn_layer_norm.weight",
        "sem_seg_head.predictor.transformer_self_attention_layers.0.self_attn.out_proj.weight":
            "transformer_module.decoder.layers.0.self_attn.out_proj.weight",
        "sem_seg_head.predictor.transformer_self_attention_layers.0.norm.bias":
            "transformer_module.decoder.layers.0.self_attn_layer_norm.bias",
        "sem_seg_head.predictor.transformer_ffn_layers.1.linear2.weight":
            "transformer_module.decoder.layers.1.fc2.weight",
        "sem_seg_head.predictor.transformer_ffn_layers.1.norm.weight":
            "transformer_module.decoder.layers.1.final_layer_norm.weight",
        "sem_seg_head.predictor.decoder_norm.weight": "transformer_module.decoder.layernorm.weight",
        "sem_seg_head.predictor.mask_embed.layers.2.weight":
            "transformer_module.decoder.mask_predictor.mask_embedder.2.0.weight",
        "sem_seg_head.predictor.class_embed.layers.2.weight": "class_embed.2.0.weight",
        "sem_seg_head.predictor.logit_scale": "logit_scale",
        "void_embedding.weight": "void_embedding.weight",
        "backbone.clip_model.logit_scale": "backbone.logit_scale",
        "backbone.clip_model.visual.trunk.stem.0.weight": "backbone.visual.trunk.stem.0.weight",
        "backbone.clip_model.visual.head.proj.weight": "backbone.visual.head.proj.weight",
    }
    for ref_key, our_key in explicit.items():
        assert torch.equal(ours[our_key], reference[ref_key]), (ref_key, our_key)
    # The fused self-attention projection is split into query / key / value thirds.
    for i in range(config.decoder_layers - 1):
        prefix = f"sem_seg_head.predictor.transformer_self_attention_layers.{i}.self_attn."
        for part, name in enumerate("qkv"):
            rows = slice(part * h, (part + 1) * h)
            assert torch.equal(
                ours[f"transformer_module.decoder.layers.{i}.self_attn.{name}_proj.weight"],
                reference[prefix + "in_proj_weight"][rows],
            )
            assert torch.equal(
                ours[f"transformer_module.decoder.layers.{i}.self_attn.{name}_proj.bias"],
                reference[prefix + "in_proj_bias"][rows],
            )
    # Every decoder / image-tower tensor of the reference ends up somewhere in our model, unchanged.
    our_values = list(ours.values())
    for key, value in reference.items():
        if key.startswith(("criterion", "backbone.clip_model.")) and not key.startswith("backbone.clip_model.visual."):
            continue
        if "self_attention_layers" in key and ".in_proj_" in key:
            continue  # split above
        assert any(v.shape == value.shape and torch.equal(v, value) for v in our_values), key


def test_converted_self_attention_equals_the_reference_fused_attention(converted, reference, config):
    h, heads = config.hidden_dim, config.num_attention_heads
    prefix = "sem_seg_head.predictor.transformer_self_attention_layers.0.self_attn."
    fused = nn.MultiheadAttention(h, heads, dropout=0.0)
    fused.load_state_dict(
        {
            "in_proj_weight": reference[prefix + "in_proj_weight"],
            "in_proj_bias": reference[prefix + "in_proj_bias"],
            "out_proj.weight": reference[prefix + "out_proj.weight"],
            "out_proj.bias": reference[prefix + "out_proj.bias"],
        }
    )
    tgt, pos = torch.randn(7, 2, h), torch.randn(7, 2, h)  # (queries, batch, channels), as in the reference
    with torch.no_grad():
        expected = fused(tgt + pos, tgt + pos, value=tgt)[0]
        ours = converted.model.transformer_module.decoder.layers[0].self_attn(
            hidden_states=tgt, position_embeddings=pos
        )[0]
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)


def test_text_embeddings_are_re_encoded_like_the_reference(converted, reference, config):
    clip_model = build_open_clip_model(config.clip_model_config)
    clip_model.load_state_dict(
        {k[len("backbone.clip_model.") :]: v for k, v in reference.items() if k.startswith("backbone.clip_model.")}
    )
    import open_clip

    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=77)
    rows = []
    with torch.no_grad():  # reference get_text_classifier: encode, L2-normalise, template mean, re-normalise
        for name in CLASS_NAMES:
            for synonym in name.split(","):
                features = clip_model.encode_text(tokenizer([t.format(synonym) for t in config.prompt_templates]))
                rows.append(F.normalize(F.normalize(features, dim=-1).mean(0), dim=-1))
    torch.testing.assert_close(converted.model.text_embeddings, torch.stack(rows), atol=1e-5, rtol=1e-4)
    assert converted.text_embeddings_source.startswith("re-encoded")
    assert converted.model.text_class_index.tolist() == [0, 0, 0, 1, 2, 3, 3]


def test_backbone_features_equal_the_reference_clip_trunk(converted, reference, config):
    clip_model = build_open_clip_model(config.clip_model_config)
    clip_model.load_state_dict(
        {k[len("backbone.clip_model.") :]: v for k, v in reference.items() if k.startswith("backbone.clip_model.")}
    )
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():  # OpenCLIPBackbone.extract_features_convnext
        y = clip_model.visual.trunk.stem(x)
        expected = []
        for stage in clip_model.visual.trunk.stages:
            y = stage(y)
            expected.append(y)
        ours = converted.model.backbone(x)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b)


def test_verify_converted_model_checks_output_shapes(converted, config):
    shapes = verify_converted_model(converted.model, image_size=64)
    assert shapes["class_queries_logits"] == (1, config.num_queries, len(CLASS_NAMES) + 1)
    assert shapes["masks_queries_logits"] == (1, config.num_queries, 16, 16)


def test_missing_unexpected_and_mismatched_keys_fail_clearly(reference, config):
    target = DearliForPanopticSegmentation(config)  # reused: every failure happens before any weight is loaded

    def convert(state):
        return convert_reference_state_dict(state, config, model=target)

    def edited(remove: str | None = None, **replace: torch.Tensor) -> dict:
        """The reference checkpoint without key `remove` and with `replace` (keys with "/" for ".")."""
        state = {k: v for k, v in reference.items() if k != remove}
        state.update({k.replace("/", "."): v for k, v in replace.items()})
        return state

    with pytest.raises(
        ReferenceCheckpointError, match=r"missing reference keys \(1\)[\s\S]*transformer_ffn_layers\.1\.linear1\.bias"
    ):
        convert(edited("sem_seg_head.predictor.transformer_ffn_layers.1.linear1.bias"))

    moved = reference["sem_seg_head.predictor.class_embed.layers.2.weight"]
    renamed = edited(
        "sem_seg_head.predictor.class_embed.layers.2.weight",
        **{"sem_seg_head/predictor/class_embed/layers/9/weight": moved},
    )
    with pytest.raises(ReferenceCheckpointError) as error:
        convert(renamed)
    assert "class_embed.layers.2.weight" in str(error.value) and "class_embed.layers.9.weight" in str(error.value)
    assert "unexpected reference keys (1)" in str(error.value)

    wrong_shape = edited(**{"sem_seg_head/predictor/query_feat/weight": torch.zeros(200, config.hidden_dim)})
    with pytest.raises(ReferenceCheckpointError, match=r"shape mismatches[\s\S]*query_feat\.weight \(200, 64\)"):
        convert(wrong_shape)

    clip_key = "backbone.clip_model.ln_final.weight"
    with pytest.raises(ReferenceCheckpointError, match=r"missing CLIP keys[\s\S]*" + re.escape(clip_key)):
        convert(edited(clip_key))

    with pytest.raises(ReferenceCheckpointError, match="trained with 133 classes"):
        convert(edited(**{"criterion_labeled/empty_weight": torch.ones(134)}))


def test_class_agnostic_warm_up_checkpoint_is_accepted(reference, config):
    """The decoder warm-up weights (trained with one class-agnostic class) convert to any vocabulary."""
    warm_up = dict(reference)
    del warm_up["criterion_pseudolabeled.empty_weight"]  # VisionLanguageMaskFormer has a single `criterion`
    warm_up["criterion.empty_weight"] = warm_up.pop("criterion_labeled.empty_weight")[:2]
    result = convert_reference_state_dict(warm_up, config)
    assert result.class_agnostic
    assert torch.equal(result.model.void_embedding.weight, reference["void_embedding.weight"])


def test_detectron2_wrapper_and_unsafe_pickles(reference, tmp_path):
    path = tmp_path / "model_final.pth"
    torch.save({"model": reference, "iteration": 80000, "__author__": "detectron2"}, path)
    loaded = load_reference_state_dict(path)
    assert loaded.keys() == reference.keys()
    bad = tmp_path / "bad.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "cfg": Path("x")}, bad)  # a non-tensor object needs full unpickling
    with pytest.raises(ReferenceCheckpointError, match="weights_only=True"):
        load_reference_state_dict(bad)


def test_convert_script_end_to_end(tmp_path, caplog, load_script):
    """The command-line converter (run in-process) with the tiny architecture and a real dataset vocabulary
    (COCO-Objects, 81 classes): a loadable folder with processor and provenance; a broken checkpoint exits non-zero."""
    from modeling_dearli.image_processing_dearli import DearliImageProcessor
    from training.publishing.reference_conversion import dataset_vocabulary

    cli = load_script("convert_reference_checkpoint")
    names, things = dataset_vocabulary("coco_objects")
    config = reference_config(names, things, base_config=tiny_config())
    state = reference_state_dict(config, seed=5)
    checkpoint = tmp_path / "DEAR_coco_obj_1_512.pth"
    torch.save({"model": state, "iteration": 80000}, checkpoint)
    tiny_config().save_pretrained(tmp_path / "arch")
    output = tmp_path / "converted"
    args = ["--dataset", "coco_objects", "--config", str(tmp_path / "arch"), "--verify_size", "64"]
    assert cli.main(["--checkpoint", str(checkpoint), "--output_dir", str(output), *args]) == 0

    model = DearliForPanopticSegmentation.from_pretrained(output).eval()
    assert model.config.num_classes == 81 and model.config.thing_ids == list(range(1, 81))
    assert model.config.id2label[0] == "background" and model.config.id2label[1] == "person"
    assert torch.equal(model.void_embedding.weight, state["void_embedding.weight"])
    assert (output / "model.safetensors").is_file()
    processor = DearliImageProcessor.from_pretrained(output)
    assert processor.size == {"shortest_edge": 512, "longest_edge": 2048}  # the reference's COCO test size
    assert processor.label_ids_to_fuse == [0] and processor.num_labels == 81  # background is the only stuff class
    info = json.loads((output / "conversion_info.json").read_text())
    assert info["dataset"] == "coco_objects" and info["source_checkpoint"] == checkpoint.name
    assert len(info["source_sha256"]) == 64 and not info["class_agnostic_warm_up"]
    copied = [k for k in state if not k.startswith("criterion") and k not in _text_tower_keys(state)]
    assert info["reference_tensors_converted"] == len(copied) < len(state)

    # A broken checkpoint: non-zero exit status, the offending key in the log and nothing written.
    broken = tmp_path / "broken.pth"
    del state["void_embedding.weight"]
    torch.save(state, broken)
    with caplog.at_level(logging.ERROR):
        status = cli.main(["--checkpoint", str(broken), "--output_dir", str(tmp_path / "no"), *args])
    assert status == 1 and "missing reference keys (1)" in caplog.text and "void_embedding.weight" in caplog.text
    assert not (tmp_path / "no").exists()
