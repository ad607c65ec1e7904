"""The DEARLi model: shapes, freezing, loss, recognition heads, save/load, remote code, input validation."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.nn import functional as F

from modeling_dearli import DearliConfig, DearliForPanopticSegmentation, tiny_model
from modeling_dearli.clip_backbone import (
    ClipTextEncoder,
    build_open_clip_model,
    mask_pool,
)
from modeling_dearli.presets import TINY_CLIP_MODEL_CONFIG


def _labels(batch: int, height: int, width: int, num_classes: int):
    generator = torch.Generator().manual_seed(1)
    masks, classes = [], []
    for n in range(batch):
        count = 2 + n
        ids = torch.randint(0, count, (height // 8, width // 8), generator=generator)
        ids = F.interpolate(ids[None, None].float(), size=(height, width), mode="nearest")[0, 0].long()
        masks.append(torch.stack([(ids == k).float() for k in range(count)]))
        classes.append(torch.randint(0, num_classes, (count,), generator=generator))
    return masks, classes


def test_output_shapes_and_fields(tiny_model):
    pixel_values = torch.randn(2, 3, 128, 96)
    pixel_mask = torch.ones(2, 128, 96, dtype=torch.long)
    pixel_mask[1, 100:, :] = 0
    pixel_mask[1, :, 80:] = 0
    with torch.no_grad():
        out = tiny_model(pixel_values, pixel_mask=pixel_mask, output_auxiliary_logits=True, output_hidden_states=True)
    q, c = tiny_model.config.num_queries, tiny_model.config.num_classes
    assert out.class_queries_logits.shape == (2, q, c + 1)
    assert out.masks_queries_logits.shape == (2, q, 32, 24)
    assert out.clip_class_logits.shape == (2, q, c)
    assert out.unpadded_sizes.tolist() == [[128, 96], [100, 80]]
    assert len(out.auxiliary_logits) == tiny_model.config.decoder_layers - 1
    assert out.auxiliary_logits[0]["class_queries_logits"].shape == (2, q, c + 1)
    assert [f.shape[-1] for f in out.encoder_hidden_states] == [24, 12, 6, 3]  # strides 4..32
    assert out.loss is None
    for name in ("class_queries_logits", "masks_queries_logits", "clip_class_logits"):
        assert torch.isfinite(out[name]).all(), name


def test_only_decoder_is_trainable_and_backbone_stays_eval():
    model = tiny_model(seed=1)
    model.train()
    assert model.training and not model.backbone.training
    assert all(not m.training for m in model.backbone.modules())
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert frozen == {n for n, _ in model.named_parameters() if n.startswith("backbone.")}
    assert trainable and all(not n.startswith("backbone.") for n in trainable)
    assert set(map(id, model.trainable_parameters())) == {id(p) for n, p in model.named_parameters() if n in trainable}
    assert model.text_encoder is None  # not kept by default


def test_loss_is_finite_and_backward_reaches_only_the_decoder():
    model = tiny_model(seed=2).train()
    pixel_values = torch.randn(2, 3, 64, 64)
    masks, classes = _labels(2, 64, 64, model.config.num_classes)
    out = model(pixel_values, mask_labels=masks, class_labels=classes)
    assert torch.isfinite(out.loss)
    expected_terms = {"loss_cross_entropy", "loss_mask", "loss_dice"}
    assert expected_terms <= set(out.loss_dict)
    assert len(out.loss_dict) == 3 * model.config.decoder_layers  # final + auxiliary layers
    assert torch.allclose(out.loss, sum(out.loss_dict.values()))
    assert out.clip_class_logits is None  # not computed while training unless asked
    out.loss.backward()
    for name, parameter in model.named_parameters():
        if name.startswith("backbone."):
            assert parameter.grad is None, name
    grads = [p.grad for p in model.trainable_parameters()]
    assert all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_loss_terms_are_weighted_like_the_paper():
    config = DearliConfig(class_names=["a", "b"], clip_model_config=TINY_CLIP_MODEL_CONFIG)
    weights = (config.class_weight, config.mask_weight, config.dice_weight, config.no_object_weight)
    assert weights == (2.0, 5.0, 5.0, 0.1)
    model = tiny_model(seed=3, class_weight=2.0).train()
    masks, classes = _labels(1, 64, 64, model.config.num_classes)
    pixel_values = torch.randn(1, 3, 64, 64)
    torch.manual_seed(0)
    weighted = model(pixel_values, mask_labels=masks, class_labels=classes).loss_dict
    torch.manual_seed(0)
    raw = model.criterion(
        **{k: v for k, v in model(pixel_values, output_auxiliary_logits=True).items()
           if k in ("masks_queries_logits", "class_queries_logits")},
        mask_labels=masks,
        class_labels=classes,
    )
    assert torch.allclose(weighted["loss_cross_entropy"], 2.0 * raw["loss_cross_entropy"])


def test_localization_only_loss_ignores_classes():
    model = tiny_model(seed=4, localization_only=True).train()
    assert model.criterion.matcher.cost_class == 0
    pixel_values = torch.randn(1, 3, 64, 64)
    masks, _ = _labels(1, 64, 64, 1)
    classes = [torch.zeros(masks[0].shape[0], dtype=torch.long)]
    torch.manual_seed(0)
    before = model(pixel_values, mask_labels=masks, class_labels=classes)
    with torch.no_grad():
        for parameter in model.class_embed.parameters():
            parameter.add_(torch.randn_like(parameter))
        model.void_embedding.weight.add_(1.0)
    torch.manual_seed(0)
    after = model(pixel_values, mask_labels=masks, class_labels=classes)
    assert torch.equal(before.loss, after.loss)
    assert all(float(v.detach()) == 0.0 for k, v in before.loss_dict.items() if k.startswith("loss_cross_entropy"))
    with pytest.raises(ValueError, match="localization-only"):
        model(pixel_values, mask_labels=masks, class_labels=[torch.ones_like(classes[0])])


def test_text_classifier_matches_independent_computation(tiny_model):
    """Class logits = scale * cos(MLP(query), text embedding), max over synonyms, + no-object embedding."""
    queries = torch.randn(2, 5, tiny_model.config.hidden_dim)
    with torch.no_grad():
        logits = tiny_model.classify_queries(queries)
        emb = F.normalize(tiny_model.class_embed(queries), dim=-1)
        scale = tiny_model.logit_scale.exp()
        text = tiny_model.text_embeddings
        per_synonym = scale * emb @ text.t()
        expected = []
        for class_id in range(tiny_model.config.num_classes):
            idx = (tiny_model.text_class_index == class_id).nonzero().flatten()
            expected.append(per_synonym[..., idx].max(dim=-1).values)
        expected.append(scale * (emb @ F.normalize(tiny_model.void_embedding.weight, dim=-1).t())[..., 0])
        expected = torch.stack(expected, dim=-1)
    assert torch.allclose(logits, expected, atol=1e-5)
    # synonyms per class: person,man,woman / sky / grass,lawn
    assert tiny_model.text_class_index.tolist() == [0, 0, 0, 1, 2, 2]
    assert torch.allclose(tiny_model.text_embeddings.norm(dim=-1), torch.ones(6), atol=1e-5)
    assert tiny_model.logit_scale.item() == pytest.approx(2.659260036932778)


def test_text_embeddings_are_template_averages_of_the_clip_text_tower(tmp_path):
    clip = build_open_clip_model(TINY_CLIP_MODEL_CONFIG)
    torch.manual_seed(5)
    for p in clip.parameters():
        p.data.normal_(0, 0.05)
    path = tmp_path / "tiny_clip.pt"
    torch.save(clip.state_dict(), path)
    model = tiny_model(class_names=["cat", "dog,puppy"], clip_checkpoint=str(path))
    import open_clip

    tokenizer = open_clip.tokenizer.SimpleTokenizer()
    templates = model.config.prompt_templates
    with torch.no_grad():
        expected = []
        for synonym in ["cat", "dog", "puppy"]:
            e = F.normalize(clip.encode_text(tokenizer([t.format(synonym) for t in templates])), dim=-1).mean(0)
            expected.append(F.normalize(e, dim=-1))
    assert torch.allclose(model.text_embeddings, torch.stack(expected), atol=1e-5)
    # the backbone carries the checkpoint's image tower and CLIP temperature
    assert torch.equal(model.backbone.visual.trunk.stem[0].weight, clip.visual.trunk.stem[0].weight)
    assert float(model.backbone.logit_scale) == pytest.approx(float(clip.logit_scale.detach()))


def test_text_encoding_over_the_used_context_equals_the_full_77_token_context():
    """encode_tokens runs the text tower only up to the longest prompt's end-of-text token; with the causal mask that
    must give OpenCLIP's full-context encode_text exactly (up to float rounding), for prompts of different lengths."""
    config = copy.deepcopy(TINY_CLIP_MODEL_CONFIG)
    config["text_cfg"].update(layers=3, width=64, heads=2)
    clip = build_open_clip_model(config)
    torch.manual_seed(11)
    for p in clip.parameters():
        p.data.normal_(0, 0.05)
    reference = copy.deepcopy(clip).eval()
    encoder = ClipTextEncoder(clip, config["text_cfg"])
    prompts = ["a photo of a cat.", "There is a pair of very long striped trousers with pockets in the scene", "x"]
    tokens = encoder.tokenize(prompts)
    assert tokens.shape[1] == 77 and int(tokens.argmax(-1).max()) + 1 < 20  # only a fraction of the context is used
    lengths = []
    clip.transformer.register_forward_pre_hook(lambda module, args, kwargs: lengths.append(args[0].shape[1]),
                                               with_kwargs=True)
    with torch.no_grad():
        got = encoder.encode_tokens(tokens)
        expected = reference.encode_text(tokens)
    assert lengths == [int(tokens.argmax(-1).max()) + 1]  # the tower ran over the used columns only
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4), (got - expected).abs().max()
    # the tower is left as it was (full positional table and causal mask)
    assert clip.positional_embedding.shape[0] == 77 and clip.attn_mask.shape == (77, 77)
    assert torch.equal(clip.positional_embedding, reference.positional_embedding)


def test_mask_pooling_branch_matches_reference_and_handles_empty_masks(tiny_model):
    torch.manual_seed(6)
    features = torch.randn(1, tiny_model.backbone.channels[-1], 4, 4)
    mask_logits = torch.full((1, 3, 16, 16), -10.0)
    mask_logits[0, 0, :8, :8] = 10.0  # top-left quadrant
    mask_logits[0, 1] = 10.0  # everything; query 2 stays empty
    with torch.no_grad():
        logits = tiny_model.clip_classify_masks(features, mask_logits)
        assert torch.isfinite(logits).all()
        pooled = torch.stack(
            [features[0, :, :2, :2].mean(dim=(1, 2)), features[0].mean(dim=(1, 2)), torch.zeros(features.shape[1])]
        )
        emb = F.normalize(tiny_model.backbone.embed_pooled_features(pooled), dim=-1)
        per_synonym = tiny_model.backbone.logit_scale.exp() * emb @ tiny_model.text_embeddings.t()
        expected = torch.stack(
            [per_synonym[:, tiny_model.text_class_index == c].max(dim=-1).values for c in range(3)], dim=-1
        )
    assert torch.allclose(logits[0], expected, atol=1e-5)
    assert torch.equal(mask_pool(features, torch.zeros(1, 2, 4, 4)), torch.zeros(1, 2, features.shape[1]))


def test_save_load_round_trip_gives_identical_outputs(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "dearli"
    assert config["auto_map"]["AutoModelForUniversalSegmentation"] == "modeling_dearli.DearliForPanopticSegmentation"
    assert config["auto_map"]["AutoModelForImageSegmentation"] == "modeling_dearli.DearliForPanopticSegmentation"
    for name in ("modeling_dearli.py", "configuration_dearli.py", "clip_backbone.py"):
        assert (tmp_path / name).exists(), name
    loaded = DearliForPanopticSegmentation.from_pretrained(tmp_path).eval()
    assert all(not p.requires_grad for p in loaded.backbone.parameters())
    pixel_values = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        a, b = tiny_model(pixel_values), loaded(pixel_values)
    for name in ("class_queries_logits", "masks_queries_logits", "clip_class_logits"):
        assert torch.equal(a[name], b[name]), name


@pytest.mark.slow
def test_remote_code_loads_in_a_fresh_process_without_the_package(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    pixel_values = torch.randn(1, 3, 64, 64)
    torch.save(pixel_values, tmp_path / "input.pt")
    with torch.no_grad():
        torch.save(tiny_model(pixel_values).class_queries_logits, tmp_path / "expected.pt")
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules["modeling_dearli"] = None  # the project package must not be needed
        import torch
        from transformers import AutoModelForImageSegmentation, AutoModelForUniversalSegmentation
        model = AutoModelForUniversalSegmentation.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        AutoModelForImageSegmentation.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)
        with torch.no_grad():
            out = model(torch.load({str(tmp_path / "input.pt")!r}))
        assert torch.equal(out.class_queries_logits, torch.load({str(tmp_path / "expected.pt")!r}))
        print("REMOTE-OK")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )
    assert "REMOTE-OK" in result.stdout, result.stderr[-3000:]


def test_set_class_names_re_encodes_with_kept_text_tower_and_fails_clearly_without(tiny_model, tmp_path):
    model = tiny_model_factory(keep_text_tower=True)
    old = model.text_embeddings.clone()
    model.set_class_names(["tree", "road,street", "car", "bus"], thing_ids=[2, 3])
    assert model.config.num_classes == 4 and model.config.id2label[1] == "road"
    assert model.text_embeddings.shape == (5, old.shape[1])
    assert not torch.allclose(model.text_embeddings[:4], old[:4])  # new vocabulary, new vectors
    with torch.no_grad():
        out = model.eval()(torch.randn(1, 3, 64, 64))
    assert out.class_queries_logits.shape[-1] == 5 and out.clip_class_logits.shape[-1] == 4
    # The kept text tower reproduces the same embeddings for the same names.
    reference = tiny_model_factory(class_names=["tree", "road,street", "car", "bus"], keep_text_tower=True)
    assert torch.allclose(reference.text_embeddings, model.text_embeddings, atol=1e-6)
    # Save/load keeps the tower, so a loaded model can switch vocabulary too.
    model.save_pretrained(tmp_path)
    loaded = DearliForPanopticSegmentation.from_pretrained(tmp_path)
    assert loaded.text_encoder is not None
    assert all(not p.requires_grad for p in loaded.text_encoder.parameters())
    loaded.set_class_names(["person,man,woman", "sky", "grass,lawn"], thing_ids=[0])
    assert torch.allclose(loaded.text_embeddings, tiny_model.text_embeddings, atol=1e-6)
    with pytest.raises(RuntimeError, match="text tower"):
        copy.deepcopy(tiny_model).set_class_names(["a", "b"])


def test_from_pretrained_with_id2label_re_encodes_the_classes_or_refuses(tiny_model, tmp_path):
    """The usual fine-tuning call: new labels re-encode the text embeddings with a kept text tower; without one they
    are refused (labels and classifier would otherwise disagree)."""
    from transformers import AutoModelForUniversalSegmentation

    saved = tiny_model_factory(keep_text_tower=True)
    saved.save_pretrained(tmp_path / "kept")
    new = {0: "cat", 1: "dog,puppy", 2: "grass"}
    reference = tiny_model_factory(class_names=["cat", "dog,puppy", "grass"], keep_text_tower=True)
    for load in (DearliForPanopticSegmentation.from_pretrained, AutoModelForUniversalSegmentation.from_pretrained):
        model = load(tmp_path / "kept", id2label=new, thing_ids=[0, 1])
        assert model.config.class_names == ["cat", "dog,puppy", "grass"] and model.config.thing_ids == [0, 1]
        assert model.config.id2label == {0: "cat", 1: "dog", 2: "grass"} and model.config.label2id["dog"] == 1
        assert torch.allclose(model.text_embeddings, reference.text_embeddings, atol=1e-6)  # the new names
        assert torch.equal(model.state_dict()["class_embed.0.0.weight"], saved.state_dict()["class_embed.0.0.weight"])
        with torch.no_grad():
            out = model.eval()(torch.randn(1, 3, 64, 64))
        assert out.class_queries_logits.shape[-1] == 4 and out.clip_class_logits.shape[-1] == 3
    same = DearliForPanopticSegmentation.from_pretrained(tmp_path / "kept",
                                                         id2label={0: "person", 1: "sky", 2: "grass"})
    assert same.config.class_names == saved.config.class_names  # the saved labels: synonyms and embeddings kept
    assert torch.equal(same.text_embeddings, saved.text_embeddings)
    with pytest.raises(ValueError, match="thing_ids"):
        DearliForPanopticSegmentation.from_pretrained(tmp_path / "kept", id2label={0: "cat"}, thing_ids=[0, 2])

    tiny_model.save_pretrained(tmp_path / "bare")  # saved without its text tower
    with pytest.raises(ValueError, match="keep_text_tower=False"):
        DearliForPanopticSegmentation.from_pretrained(tmp_path / "bare", id2label={0: "cat", 1: "dog"})
    with pytest.raises(ValueError, match="keep_text_tower=False"):
        AutoModelForUniversalSegmentation.from_pretrained(tmp_path / "bare", id2label={0: "cat", 1: "dog"})


def test_base_model_prefix_follows_transformers_convention_for_a_model_without_base_model(tiny_model, tmp_path):
    """No attribute holds a separate base model: the prefix is transformers' default "" and `base_model` is the model
    itself; loading renames no key (the round trip above compares outputs; here every weight)."""
    assert DearliForPanopticSegmentation.base_model_prefix == ""
    assert tiny_model.base_model is tiny_model
    tiny_model.save_pretrained(tmp_path)
    loaded = DearliForPanopticSegmentation.from_pretrained(tmp_path, output_loading_info=True)
    model, info = loaded
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    expected = {k: v for k, v in tiny_model.state_dict().items() if not k.startswith("criterion.")}
    actual = model.state_dict()
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


def tiny_model_factory(class_names=None, **kwargs):
    return tiny_model(class_names=class_names or ["person,man,woman", "sky", "grass,lawn"], thing_ids=[0], seed=0,
                      **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(pixel_values=torch.randn(1, 1, 64, 64)), "3, height, width"),
        (dict(pixel_values=torch.randn(3, 64, 64)), "3, height, width"),
        (
            dict(pixel_values=torch.randn(1, 3, 64, 64), mask_labels=[torch.ones(1, 64, 64)],
                 class_labels=[torch.tensor([3])]),
            r"class_labels must lie in \[0, 3\)",
        ),
        (
            dict(pixel_values=torch.randn(1, 3, 64, 64), mask_labels=[torch.ones(1, 64, 64)],
                 class_labels=[torch.tensor([-1])]),
            r"class_labels must lie in \[0, 3\)",
        ),
        (
            dict(pixel_values=torch.randn(2, 3, 64, 64), mask_labels=[torch.ones(1, 64, 64)],
                 class_labels=[torch.tensor([0])]),
            "for a batch of 2 images",
        ),
        (
            dict(pixel_values=torch.randn(1, 3, 64, 64), mask_labels=[torch.ones(2, 64, 64)],
                 class_labels=[torch.tensor([0])]),
            "matching class_labels",
        ),
        (dict(pixel_values=torch.randn(1, 3, 64, 64), mask_labels=[torch.ones(1, 64, 64)]), "together"),
    ],
)
def test_bad_inputs_give_clear_errors(tiny_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_model(**kwargs)


def test_config_validation_and_synonyms():
    config = DearliConfig(class_names=["person,child", "sky"], thing_ids=[0], clip_model_config=TINY_CLIP_MODEL_CONFIG)
    assert config.id2label == {0: "person", 1: "sky"} and config.num_labels == 2
    assert config.stuff_ids == [1]
    assert len(config.prompt_templates) == 14  # ViLD templates
    with pytest.raises(ValueError, match="thing_ids"):
        DearliConfig(class_names=["a"], thing_ids=[3], clip_model_config=TINY_CLIP_MODEL_CONFIG)
    with pytest.raises(ValueError, match="Unknown OpenCLIP model name"):
        DearliConfig(class_names=["a"], clip_model_name="no-such-model")
    with pytest.raises(ValueError, match="ensemble_alpha"):
        DearliConfig(class_names=["a"], ensemble_alpha=1.5, clip_model_config=TINY_CLIP_MODEL_CONFIG)
    default = DearliConfig(class_names=["a"])
    assert default.clip_model_name == "convnext_base_w_320"
    assert default.clip_pretrained == "laion_aesthetic_s13b_b82k_augreg"
    sizes = (default.num_queries, default.decoder_layers, default.hidden_dim, default.encoder_layers)
    assert sizes == (200, 10, 256, 6)
    assert default.ensemble_alpha == 0.6


@pytest.mark.slow
def test_full_size_default_config_runs_a_640_forward_on_cpu():
    names = ["person", "car", "sky", "grass"]
    model = DearliForPanopticSegmentation(DearliConfig(class_names=names, thing_ids=[0, 1])).eval()
    trainable = sum(p.numel() for p in model.trainable_parameters())
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert frozen > 80e6 and 15e6 < trainable < 25e6  # ConvNeXt-B image tower; Mask2Former decoder
    with torch.no_grad():
        out = model(torch.randn(1, 3, 640, 640))
    assert out.class_queries_logits.shape == (1, 200, 5)
    assert out.masks_queries_logits.shape == (1, 200, 160, 160)
    assert out.clip_class_logits.shape == (1, 200, 4)
