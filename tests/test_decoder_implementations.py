"""Our decoder forwards (`DearliPixelDecoder`, `DearliTransformerModule`) against transformers' own forwards of the
same modules (``config.decoder_implementation="transformers"``): same parameters, same outputs and gradients.

Outputs are checked to 1e-5 of each tensor's largest magnitude (``assert_equal_to_rounding``); gradients together to
1e-5 (relative L2 norm over all parameters) and, on the tiny model, tensor by tensor to 1e-5 as well. Two
discontinuities decide how far "same numbers" can be asked of a full-size model, where any change of rounding
(transformers' own forward on 1 instead of 2 threads, for one) moves some values across them:

- the masked attention attends where ``sigmoid(mask logit) >= 0.5``, and at random initialisation the logits sit near
  0 in millions of places: the full-size tests make every attention decision clear (`_clear_attention_decisions`);
- ReLU and ``grid_sample`` have kinks: an activation or a sampling position within rounding of one changes a
  gradient by a finite amount. Measured on the full-size test below, transformers' gradients on 1 vs 2 threads differ
  by 8.7e-7 overall but by up to 2.2e-3 in single tensors (ours vs transformers': 6.3e-7 and 2.5e-4), so there the
  per-tensor check is 1e-3 (it still catches a wrong term in any tensor).
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.mask2former.modeling_mask2former import (
    Mask2FormerLoss,
    Mask2FormerPixelDecoder,
    Mask2FormerTransformerModule,
    multi_scale_deformable_attention,
)

from modeling_dearli import DearliConfig, DearliForPanopticSegmentation, tiny_model
from modeling_dearli.deformable_attention import WeightedGather, deformable_sample, grid_sample_positions
from modeling_dearli.pixel_decoder import _encoder_layer, _reference_points
from modeling_dearli.transformer_decoder import _attention_mask

RTOL = 1e-5


def _labels(batch: int, height: int, width: int, num_classes: int):
    """Per image, a few rectangular segments with random classes (mask_labels, class_labels)."""
    generator = torch.Generator().manual_seed(1)
    masks, classes = [], []
    for n in range(batch):
        rows = torch.arange(height)[:, None] * (2 + n) // height
        columns = torch.arange(width)[None, :] * 2 // width
        ids = rows * 2 + columns
        masks.append(torch.stack([(ids == k).float() for k in range(int(ids.max()) + 1)]))
        classes.append(torch.randint(0, num_classes, (masks[-1].shape[0],), generator=generator))
    return masks, classes


def assert_equal_to_rounding(actual: torch.Tensor, expected: torch.Tensor, name: str = "", floor: float = 0.0) -> None:
    """``max |actual - expected| <= RTOL * max |expected| + floor``."""
    assert actual.shape == expected.shape, name
    error = (actual.double() - expected.double()).abs().max().item()
    bound = RTOL * expected.double().abs().max().item() + floor
    assert error <= bound, f"{name}: max error {error:.3g} > {bound:.3g}"


def _perturb_decoder(model: torch.nn.Module, seed: int, scale: float = 0.02) -> None:
    """Move every trainable weight off its initial value (which has exact zeros, e.g. the sampling-offset weights,
    and would make every sampling position an integer)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.trainable_parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)


def _run(model, implementation: str, pixel_values, labels=None, **kwargs):
    """Forward (and backward of the loss, with the loss's point sampling seeded) with one decoder implementation;
    returns the outputs and the gradients by parameter name. ``"transformers"`` also takes transformers' own
    `Mask2FormerLoss` on the full mask logits (ours reads them from their factors, `modeling_dearli.mask_loss`)."""
    model.config.decoder_implementation = implementation
    model.zero_grad(set_to_none=True)
    if labels is None:
        with torch.no_grad():
            return model(pixel_values, **kwargs), {}
    criterion = model.criterion
    if implementation == "transformers":
        model.criterion = Mask2FormerLoss(model.config.to_mask2former_config(), criterion.weight_dict)
    try:
        torch.manual_seed(0)
        outputs = model(pixel_values, mask_labels=labels[0], class_labels=labels[1], **kwargs)
    finally:
        model.criterion = criterion
    outputs.loss.backward()
    return outputs, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _compare(model, pixel_values, labels, gradient_rtol_per_tensor: float = RTOL) -> None:
    model.eval()
    for auxiliary in (False, True):  # without auxiliary outputs our decoder skips the intermediate full-size masks
        ours, _ = _run(model, "dearli", pixel_values, output_auxiliary_logits=auxiliary)
        theirs, _ = _run(model, "transformers", pixel_values, output_auxiliary_logits=auxiliary)
        for name in ("class_queries_logits", "masks_queries_logits", "clip_class_logits",
                     "pixel_decoder_last_hidden_state", "transformer_decoder_last_hidden_state"):
            assert_equal_to_rounding(ours[name], theirs[name], name)
        if auxiliary:
            for a, b in zip(ours.auxiliary_logits, theirs.auxiliary_logits):
                for name in a:
                    assert_equal_to_rounding(a[name], b[name], "auxiliary " + name)
    model.config.decoder_implementation = "dearli"

    model.train()
    ours, ours_grads = _run(model, "dearli", pixel_values, labels)
    theirs, theirs_grads = _run(model, "transformers", pixel_values, labels)
    model.config.decoder_implementation = "dearli"
    assert_equal_to_rounding(ours.loss, theirs.loss, "loss")
    assert ours_grads.keys() == theirs_grads.keys() and len(ours_grads) > 50
    difference = sum(((ours_grads[n].double() - g.double()) ** 2).sum() for n, g in theirs_grads.items()) ** 0.5
    norm = sum((g.double() ** 2).sum() for g in theirs_grads.values()) ** 0.5
    assert difference <= RTOL * norm, f"gradients: relative difference {difference / norm:.3g}"
    # The self-attention key bias has a zero gradient in exact arithmetic (softmax ignores a per-query shift): both
    # sides hold rounding noise there, hence an absolute floor far below every other gradient.
    floor = 1e-8 * max(g.abs().max().item() for g in theirs_grads.values())
    for name, grad in theirs_grads.items():
        error = (ours_grads[name].double() - grad.double()).abs().max().item()
        bound = gradient_rtol_per_tensor * grad.abs().max().item() + floor
        assert error <= bound, f"gradient of {name}: max error {error:.3g} > {bound:.3g}"


@pytest.mark.parametrize("pre_norm", [False, True])
def test_tiny_model_outputs_and_gradients_equal_transformers_forwards(pre_norm):
    model = tiny_model(class_names=["person,man", "sky", "grass"], thing_ids=[0], seed=0, pre_norm=pre_norm)
    _perturb_decoder(model, seed=1)
    generator = torch.Generator().manual_seed(2)
    pixel_values = torch.randn(2, 3, 96, 128, generator=generator)
    _compare(model, pixel_values, _labels(2, 96, 128, num_classes=3))


def test_decoder_modules_keep_transformers_parameter_names():
    """Checkpoints written with transformers' decoder modules load into ours and vice versa (same state-dict keys;
    the reference-checkpoint converter maps onto these names)."""
    model = tiny_model(seed=0)
    m2f_config = model.config.to_mask2former_config()
    reference_pixel = Mask2FormerPixelDecoder(m2f_config, feature_channels=model.backbone.channels)
    reference_decoder = Mask2FormerTransformerModule(in_features=model.config.feature_size, config=m2f_config)
    assert model.pixel_decoder.state_dict().keys() == reference_pixel.state_dict().keys()
    assert model.transformer_module.state_dict().keys() == reference_decoder.state_dict().keys()
    reference_pixel.load_state_dict(model.pixel_decoder.state_dict())  # strict, in both directions
    model.transformer_module.load_state_dict(reference_decoder.state_dict())


def test_decoder_implementation_is_validated():
    with pytest.raises(ValueError, match="decoder_implementation"):
        DearliConfig(class_names=["a"], clip_model_config=tiny_model().config.clip_model_config,
                     decoder_implementation="fast")


def _sampling_case(batch: int, shapes, generator, integer_positions: bool = False):
    heads, dim, points = 4, 8, 4
    length = sum(h * w for h, w in shapes)
    value = torch.randn(batch, length, heads, dim, generator=generator)
    if integer_positions:  # exactly on pixel centres (the initial sampling offsets), including outside the maps
        sizes = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32)[:, None, :]
        pixels = torch.randint(-3, 25, (batch, length, heads, len(shapes), points, 2), generator=generator).float()
        locations = (pixels + 0.5) / sizes
    else:  # up to several pixels beyond every border
        locations = torch.rand(batch, length, heads, len(shapes), points, 2, generator=generator) * 1.6 - 0.3
    weights = torch.rand(batch, length, heads, len(shapes), points, generator=generator)
    return value, locations, weights


@pytest.mark.parametrize("integer_positions", [False, True])
def test_deformable_sampling_equals_transformers_grid_sample(integer_positions):
    generator = torch.Generator().manual_seed(0)
    shapes = ((3, 5), (6, 10), (12, 20))
    value, locations, weights = _sampling_case(2, shapes, generator, integer_positions)
    sizes = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32)[:, None, :]
    expected = multi_scale_deformable_attention(value, shapes, locations, weights)
    actual = deformable_sample(value, shapes, locations * sizes - 0.5, weights)
    assert_equal_to_rounding(actual, expected, "sampled")


def test_deformable_sampling_gradients_equal_transformers_grid_sample():
    """With gradients: values, positions and attention weights get ``grid_sample``'s gradients (float64, positions
    up to several pixels beyond every border)."""
    generator = torch.Generator().manual_seed(5)
    shapes = ((3, 5), (6, 10), (12, 20))
    value, locations, weights = (t.double().requires_grad_() for t in _sampling_case(2, shapes, generator))
    expected = multi_scale_deformable_attention(value, shapes, locations, weights)
    x, y = grid_sample_positions(locations, shapes)
    actual = deformable_sample(value, shapes, torch.stack((x, y), -1), weights)
    assert_equal_to_rounding(actual, expected, "sampled")
    grad_output = torch.randn(expected.shape, generator=generator, dtype=torch.float64)
    expected_grads = torch.autograd.grad(expected, (value, locations, weights), grad_output)
    actual_grads = torch.autograd.grad(actual, (value, locations, weights), grad_output)
    for name, a, e in zip(("value", "locations", "weights"), actual_grads, expected_grads):
        assert_equal_to_rounding(a, e, name)


def test_weighted_gather_backward_equals_embedding_bag_backward():
    """`WeightedGather`'s hand-written backward against ``embedding_bag``'s (repeated rows included)."""
    generator = torch.Generator().manual_seed(6)
    table = torch.randn(50, 7, generator=generator, dtype=torch.float64, requires_grad=True)
    index = torch.randint(0, 50, (300, 12), generator=generator, dtype=torch.int32)
    index[:, 1] = index[:, 0]  # the same row twice in one sum
    weights = torch.randn(300, 12, generator=generator, dtype=torch.float64, requires_grad=True)
    grad_output = torch.randn(300, 7, generator=generator, dtype=torch.float64)
    WeightedGather.CHUNK, chunk = 64, WeightedGather.CHUNK  # several chunks, the last one partial
    try:
        actual = WeightedGather.apply(table, index, weights)
        actual_grads = torch.autograd.grad(actual, (table, weights), grad_output)
    finally:
        WeightedGather.CHUNK = chunk
    expected = torch.nn.functional.embedding_bag(index.long(), table, per_sample_weights=weights, mode="sum")
    expected_grads = torch.autograd.grad(expected, (table, weights), grad_output)
    assert_equal_to_rounding(actual, expected, "gathered")
    for name, a, e in zip(("table", "weights"), actual_grads, expected_grads):
        assert_equal_to_rounding(a, e, name)


def test_accelerator_path_calls_transformers_deformable_attention_layer_like_transformers():
    """On an accelerator the encoder samples through transformers' `MultiScaleDeformableAttention` layer (which
    ``use_kernels=True`` swaps for the fused CUDA kernel; no GPU here): its arguments give transformers' numbers."""
    model = tiny_model(seed=0)
    _perturb_decoder(model, seed=3)
    decoder = model.pixel_decoder
    layer = decoder.encoder.layers[0]
    shapes = ((2, 3), (4, 6), (8, 12))
    generator = torch.Generator().manual_seed(4)
    hidden = torch.randn(2, sum(h * w for h, w in shapes), decoder.config.feature_size, generator=generator)
    position = torch.randn(1, hidden.shape[1], hidden.shape[2], generator=generator)
    reference = _reference_points(shapes, 2, hidden.device, hidden.dtype)
    with torch.no_grad():
        expected = layer(hidden, None, position_embeddings=position, reference_points=reference,
                         spatial_shapes_list=list(shapes))[0]
        actual = _encoder_layer(layer, hidden, position, reference, shapes, decoder._kernel_sample)
    assert_equal_to_rounding(actual, expected, "encoder layer")


def test_attention_mask_follows_transformers_rule_for_empty_masks():
    """Masked where sigmoid < 0.5; a query whose mask is empty everywhere attends everywhere (as transformers'
    decoder does before each layer)."""
    logits = torch.randn(2, 5, 3, 4, generator=torch.Generator().manual_seed(0))
    logits[0, 1] = -1.0  # empty mask
    logits[1, 3] = 2.0  # full mask
    masked = logits.sigmoid().flatten(2) < 0.5
    empty = masked.sum(-1) == masked.shape[-1]
    expected_allowed = ~(masked & ~empty[..., None])
    additive = _attention_mask(logits)
    assert additive.shape == (2, 1, 5, 12)
    assert torch.equal(additive[:, 0] == 0, expected_allowed)
    assert torch.all(additive[:, 0][~expected_allowed] == float("-inf"))
    assert bool(expected_allowed[0, 1].all()) and not bool(expected_allowed.all())


# --------------------------------------------------------------------------------------------------------------------
# Full-size model
# --------------------------------------------------------------------------------------------------------------------
def _clear_attention_decisions(model: DearliForPanopticSegmentation, amplitude: float = 100.0):
    """Make every masked-attention decision far from the threshold, identically for both implementations.

    The mask embedder's last layer outputs 1 in channel 0 (weights zeroed, bias 1), and a forward hook adds
    ``+-amplitude`` to channel 0 of the pixel decoder's mask features in blocks of 8 x 8 mask pixels (32 x 32 input
    pixels). Bilinear resizing to the attention resolutions (1/32, 1/16, 1/8) samples inside one block, so each
    attention logit is that block's sign times ``amplitude`` plus O(1): half the blocks are masked for every query
    and no decision depends on rounding.
    """
    last = model.transformer_module.decoder.mask_predictor.mask_embedder.layers[-1].layers[0]
    with torch.no_grad():
        last.weight[0].zero_()
        last.bias[0] = 1.0

    def add_blocks(module, inputs, output):
        features = output.mask_features
        h, w = features.shape[-2:]
        blocks = (torch.arange(h)[:, None] // 8 + torch.arange(w)[None, :] // 8) % 2 * 2.0 - 1.0
        bump = torch.zeros_like(features[:1])
        bump[0, 0] = blocks * amplitude
        output.mask_features = features + bump
        return output

    return model.pixel_decoder.register_forward_hook(add_blocks)


@pytest.mark.slow
def test_full_size_model_outputs_and_gradients_equal_transformers_forwards():
    names = [f"class {i}" for i in range(150)]
    torch.manual_seed(0)
    model = DearliForPanopticSegmentation(DearliConfig(class_names=names, thing_ids=list(range(0, 150, 2))))
    assert model.config.num_queries == 200 and model.config.encoder_layers == 6 and model.config.decoder_layers == 10
    with torch.no_grad():
        model.text_embeddings.copy_(torch.nn.functional.normalize(torch.randn_like(model.text_embeddings), dim=-1))
    _perturb_decoder(model, seed=1)
    handle = _clear_attention_decisions(model)
    try:
        generator = torch.Generator().manual_seed(2)
        pixel_values = torch.randn(1, 3, 384, 512, generator=generator)
        # Per tensor, float32 rounding through 10 decoder layers reaches about 1.4e-3 of a tensor's largest gradient
        # (measured on transformer_module.decoder.layers.3.fc1.weight with Mask2Former's Xavier initialisation; 1e-3
        # held under the earlier N(0, 0.02) one); the whole gradient stays within RTOL.
        _compare(model, pixel_values, _labels(1, 384, 512, num_classes=150), gradient_rtol_per_tensor=3e-3)
    finally:
        handle.remove()
