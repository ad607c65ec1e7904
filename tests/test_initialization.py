"""Initial decoder weights: transformers' Mask2Former initialisation (checked against a plain
`Mask2FormerForUniversalSegmentation` of the same sizes), the reference's pixel-decoder fills, assigned by parameter
role so that an equivalent pixel decoder of another class gets them too, and the legacy N(0, 0.02) as an option."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from modeling_dearli import tiny_model
from modeling_dearli.initialization import deformable_sampling_grid

# transformers' port keeps the generic N(0, 0.02) for these pixel-decoder weights where the reference (Mask2Former's
# MSDeformAttnPixelDecoder) uses Xavier fills; we follow the reference (test_pixel_decoder_follows_the_reference).
REFERENCE_ONLY = re.compile(r"^pixel_decoder\.(input_projections\.\d+\.0|encoder\.layers\.\d+\.fc[12]|mask_projection|"
                            r"adapter_\d+\.0|layer_\d+\.0)\.")


@pytest.fixture(scope="module")
def ours():
    return tiny_model(class_names=["a", "b"], thing_ids=[0], seed=0)


@pytest.fixture(scope="module")
def plain_mask2former(ours):
    """transformers' own Mask2Former built from our decoder's config, on a ConvNeXt backbone with our channels."""
    from transformers import ConvNextConfig, Mask2FormerForUniversalSegmentation

    config = ours.config.to_mask2former_config()
    config.backbone_config = ConvNextConfig(hidden_sizes=list(ours.backbone.channels), depths=[1, 1, 1, 1],
                                            out_features=["stage1", "stage2", "stage3", "stage4"])
    torch.manual_seed(0)
    model = Mask2FormerForUniversalSegmentation(config)
    rename = {"model.pixel_level_module.decoder.": "pixel_decoder.", "model.transformer_module.": "transformer_module."}
    params = {}
    for name, value in model.named_parameters():
        for prefix, ours_prefix in rename.items():
            if name.startswith(prefix):
                params[ours_prefix + name[len(prefix):]] = value.detach()
    return params


def _decoder_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters()
            if n.startswith(("pixel_decoder.", "transformer_module.", "class_embed.", "void_embedding."))}


def _assert_same_distribution(name: str, ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape, name
    if float(theirs.std()) == 0.0 or theirs.numel() == 1:  # constants (zeros, ones) are compared exactly
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0, msg=name)
        return
    ratio = float(ours.std()) / float(theirs.std())
    tolerance = 0.2 if theirs.numel() >= 1024 else 0.4  # sampling error of the std estimate
    assert abs(math.log(ratio)) < tolerance, f"{name}: std {float(ours.std()):.4f} vs {float(theirs.std()):.4f}"


def test_decoder_initialisation_matches_transformers_mask2former(ours, plain_mask2former):
    """Every parameter of our pixel decoder and transformer decoder that transformers initialises like the reference
    has the distribution (constants: the values) of the plain transformers model's; the sampling-offset bias is the
    deformable grid (before the fix every one of these was N(0, 0.02) and the grid was all zeros)."""
    params = _decoder_params(ours)
    shared = [n for n in plain_mask2former if n in params and not REFERENCE_ONLY.match(n)]
    assert len(shared) > 60 and not [n for n in plain_mask2former if n not in params]
    for name in shared:
        _assert_same_distribution(name, params[name], plain_mask2former[name])
    grid = params["pixel_decoder.encoder.layers.0.self_attn.sampling_offsets.bias"]
    assert grid[:8].tolist() == [1.0, 0.0, 2.0, 0.0, 3.0, 0.0, 4.0, 0.0]  # head 0 points along x, at 1..4
    assert float(params["transformer_module.decoder.layers.0.fc1.weight"].std()) > 0.09  # xavier, not 0.02


def test_heads_outside_transformers_get_its_mask2former_conventions(ours):
    """M2F-Lang's class MLP as the reference's (PyTorch's default nn.Linear: U(+-1/sqrt(fan_in))), the no-object
    embedding N(0, 1) like every nn.Embedding of Mask2Former, the M2F-Lang temperature log(1/0.07)."""
    for i in range(3):
        linear = ours.get_submodule(f"class_embed.{i}.0")
        weight, bias = linear.weight.detach(), linear.bias.detach()
        bound = 1 / math.sqrt(weight.shape[1])
        assert float(weight.abs().max()) <= bound and float(weight.std()) > 0.8 * bound / math.sqrt(3)
        assert float(bias.abs().max()) <= bound and float(bias.std()) > 0.5 * bound / math.sqrt(3)
    assert 0.5 < float(ours.void_embedding.weight.detach().std()) < 1.5
    assert float(ours.logit_scale.detach()) == pytest.approx(math.log(1 / 0.07), abs=1e-6)


def _check_reference_pixel_decoder(model: nn.Module) -> None:
    for name, value in _decoder_params(model).items():
        if not REFERENCE_ONLY.match(name):
            continue
        if name.endswith(".bias"):
            if ".fc" in name:  # nn.Linear's default bias, untouched by the reference's Xavier pass
                fan_in = model.get_parameter(name[: -len("bias")] + "weight").shape[1]
                assert float(value.abs().max()) <= 1 / math.sqrt(fan_in) and float(value.std()) > 0, name
            else:
                assert not value.any(), name
            continue
        fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(value)
        if ".input_projections." in name or ".fc" in name:  # xavier_uniform_(gain=1)
            bound = math.sqrt(6 / (fan_in + fan_out))
        else:  # c2_xavier_fill: kaiming_uniform_(a=1)
            bound = math.sqrt(3 / fan_in)
        assert float(value.abs().max()) <= bound + 1e-7, name
        assert abs(math.log(float(value.std()) * math.sqrt(3) / bound)) < 0.2, name


def test_pixel_decoder_follows_the_reference(ours):
    """Input projections Xavier (gain 1, bias 0), encoder FFN Xavier with nn.Linear's default bias, mask projection
    and FPN convolutions c2_xavier_fill -- where transformers' port leaves N(0, 0.02)."""
    _check_reference_pixel_decoder(ours)


def test_initialisation_is_by_parameter_role_not_by_class(ours):
    """A pixel decoder of another class with the same parameter names (what an optimised rewrite keeps) is initialised
    the same way, also when its deformable attention does not carry n_heads / n_levels / n_points."""
    import copy

    model = copy.deepcopy(ours)
    decoder = model.pixel_decoder
    for module in decoder.modules():
        if type(module).__module__.startswith("transformers."):
            module.__class__ = type(f"Own{type(module).__name__}", (nn.Module,), {})
    attention = decoder.encoder.layers[0].self_attn
    for attribute in ("n_heads", "n_levels", "n_points"):
        delattr(attention, attribute)
    with torch.no_grad():
        for p in decoder.parameters():
            p.fill_(0.5)
    for module in model.modules():
        module.__dict__.pop("_is_hf_initialized", None)
    model.initialize_weights()

    offsets = attention.sampling_offsets
    heads = ours.config.num_attention_heads
    expected = deformable_sampling_grid(heads, 3, offsets.out_features // (2 * heads * 3))
    torch.testing.assert_close(offsets.bias.detach(), expected, rtol=0, atol=0)
    assert not offsets.weight.any() and not attention.attention_weights.weight.any()
    assert not attention.attention_weights.bias.any() and not attention.value_proj.bias.any()
    assert 0.5 < float(decoder.level_embed.detach().std()) < 1.5
    _check_reference_pixel_decoder(model)


def test_normal_initialisation_is_selectable(ours):
    """--decoder_init normal draws N(0, init_std) on every decoder weight, with a zero sampling-offset grid; an
    unknown scheme is refused, the earlier spelling of 'xavier' is accepted."""
    import copy

    from training.model_init import apply_decoder_init

    model = copy.deepcopy(ours)
    apply_decoder_init(model, "normal")
    params = _decoder_params(model)
    for name in ("pixel_decoder.encoder.layers.0.self_attn.sampling_offsets.weight",
                 "transformer_module.decoder.layers.0.fc1.weight", "pixel_decoder.mask_projection.weight",
                 "class_embed.0.0.weight"):
        assert float(params[name].std()) == pytest.approx(0.02, rel=0.15), name
    assert not params["pixel_decoder.encoder.layers.0.self_attn.sampling_offsets.bias"].any()
    with pytest.raises(ValueError, match="decoder_init"):
        apply_decoder_init(model, "uniform")
    kept = {name: p.clone() for name, p in _decoder_params(model).items()}
    apply_decoder_init(model, "reference")  # = "xavier": keeps the weights the model has
    assert all(torch.equal(kept[name], p) for name, p in _decoder_params(model).items())
