"""Loop machinery: YAML presets + the argument builder, resumable sampler, schedule, checkpoint helpers, model init."""

from __future__ import annotations

import argparse

import pytest
import torch
import yaml

from training.arguments import (
    CONFIG_DIR,
    add_common_training_args,
    add_model_args,
    build_parser,
    load_config_file,
    parse_args_with_config,
)
from training.checkpointing import (
    CheckpointError,
    NonFiniteError,
    assert_finite_parameters,
    list_checkpoints,
    resolve_resume_path,
)
from training.data.sampler import ResumableSampler, unpack_index
from training.schedules import build_optimizer, build_poly_scheduler


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    parser.add_argument("--names", type=str, nargs="+", default=None, help="names")
    add_common_training_args(parser, train_batch_size=16)
    add_model_args(parser)
    return parser


def test_every_flag_has_help():
    for action in _parser()._actions:
        assert action.help, action.dest


def test_config_values_replace_defaults_and_cli_wins(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("learning-rate: 0.5\ntrain_batch_size: 4\ncrop_size: [32, 48]\nnames: [a, b]\n"
                      "model_preset: tiny\n")
    args = parse_args_with_config(_parser(), ["--config", str(config), "--train_batch_size", "8"])
    assert args.learning_rate == 0.5 and args.train_batch_size == 8 and args.crop_size == [32, 48]
    assert args.names == ["a", "b"] and args.model_preset == "tiny" and args.config == str(config)
    assert args.weight_decay == 0.05 and args.gradient_clip == 0.01 and args.lr_power == 0.9  # untouched defaults
    plain = parse_args_with_config(_parser(), [])
    assert plain.train_batch_size == 16 and plain.learning_rate == 1e-4 and plain.config is None


def test_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("no_such_flag: 1\n")
    with pytest.raises(ValueError, match="no_such_flag"):
        parse_args_with_config(_parser(), ["--config", str(bad)])
    unquoted = tmp_path / "unquoted.yaml"
    unquoted.write_text("init_from: 1_128\n")  # YAML reads an integer
    with pytest.raises(ValueError, match="quote"):
        parse_args_with_config(_parser(), ["--config", str(unquoted)])
    choice = tmp_path / "choice.yaml"
    choice.write_text("mixed_precision: fp8\n")
    with pytest.raises(ValueError, match="mixed_precision"):
        parse_args_with_config(_parser(), ["--config", str(choice)])
    with pytest.raises(FileNotFoundError):
        parse_args_with_config(_parser(), ["--config", "no_such_preset"])


def test_presets_inherit_from_their_bases(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "a.yaml").write_text("learning_rate: 0.5\ntrain_batch_size: 4\n")
    (tmp_path / "base" / "b.yaml").write_text("_base_: a\ntrain_batch_size: 6\nseed: 3\n")
    (tmp_path / "base" / "c.yaml").write_text("seed: 5\nlr-power: 2.0\n")
    run = tmp_path / "run.yaml"
    run.write_text("_base_: [base/b, base/c]\nseed: 7\n")  # later bases win, the preset's own values win over all
    assert load_config_file(run) == {"learning_rate": 0.5, "train_batch_size": 6, "seed": 7, "lr_power": 2.0}
    args = parse_args_with_config(_parser(), ["--config", str(run), "--seed", "9"])
    assert (args.learning_rate, args.train_batch_size, args.lr_power, args.seed) == (0.5, 6, 2.0, 9)
    circular = tmp_path / "circular.yaml"
    circular.write_text("_base_: circular\n")
    with pytest.raises(ValueError, match="inherits from itself"):
        load_config_file(circular)
    # A paper run states only what differs from its stage and dataset bases.
    run_keys = set(yaml.safe_load((CONFIG_DIR / "ssl_coco_objects_1_64.yaml").read_text()))
    assert run_keys == {"_base_", "dataset_name", "partition", "project_name"}
    assert load_config_file("ssl_coco_objects_1_64")["crop_size"] == [512]


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
def test_packaged_presets_parse(name):
    """Every preset parses with its loop's parser (named in the preset's name: ``ssl_*``, ``miniature_ssl``, ...;
    the rest are supervised) and sets what it says."""
    values = load_config_file(name)
    loop = next((loop for loop in ("dewa", "ssl") if loop in name.split("_")), "supervised")
    args = parse_args_with_config(build_parser(loop), ["--config", name, "--output_dir", "x"])
    assert args.output_dir == "x"
    for key, value in values.items():
        assert key == "output_dir" or getattr(args, key) == value, key
    if "partition" in values:
        assert isinstance(args.partition, str)


def test_resumable_sampler_is_a_function_of_seed_and_epoch():
    sampler = ResumableSampler(5, seed=3, epoch_length=12)
    sampler.set_epoch(2)
    first = list(sampler)
    sampler.set_epoch(0)
    other = list(sampler)
    sampler.set_epoch(2)
    assert list(sampler) == first and first != other
    assert len(first) == 12 and sorted(i for i, _ in first[:5]) == list(range(5))  # whole permutations first
    assert len({s for _, s in first}) == 12
    assert unpack_index((4, 99)) == (4, 99) and unpack_index(7) == (7, 0)
    assert [i for i, _ in ResumableSampler(4, shuffle=False)] == [0, 1, 2, 3]


def test_poly_schedule_and_optimizer_on_trainable_parameters_only():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[0].weight.requires_grad_(False)
    model.trainable_parameters = lambda: [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, 1e-4, 0.05)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == 3
    assert optimizer.defaults["weight_decay"] == 0.05
    scheduler = build_poly_scheduler(optimizer, max_steps=10, power=0.9)
    lrs = []
    for _ in range(10):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    expected = [1e-4 * (1 - s / 10) ** 0.9 for s in range(10)]
    assert lrs == pytest.approx(expected, rel=1e-6)
    assert scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)


def test_checkpoint_lookup_and_finite_guard(tmp_path):
    assert resolve_resume_path(None, tmp_path) is None
    assert resolve_resume_path("latest", tmp_path) is None
    for step, complete in ((2, True), (10, True), (12, False)):
        folder = tmp_path / "checkpoints" / f"step_{step:08d}"
        folder.mkdir(parents=True)
        if complete:
            (folder / "COMPLETE").write_text(str(step))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002", "step_00000010"]  # incomplete skipped
    with pytest.raises(CheckpointError, match="no usable checkpoint.*model.safetensors is missing"):
        resolve_resume_path("latest", tmp_path)  # marked complete, but empty (tests/test_faults.py: real ones)
    with pytest.raises(FileNotFoundError):
        resolve_resume_path(str(tmp_path / "missing"), tmp_path)
    layer = torch.nn.Linear(2, 2)
    assert_finite_parameters(layer)
    with torch.no_grad():
        layer.bias[0] = float("nan")
    with pytest.raises(NonFiniteError, match="bias"):
        assert_finite_parameters(layer, step=7)


def test_init_from_adapts_class_names(tmp_path):
    from modeling_dearli import DearliForPanopticSegmentation, tiny_model
    from training.model_init import adapt_class_names, build_model

    kept = tiny_model(class_names=["object"], keep_text_tower=True, localization_only=True, seed=1)
    kept.save_pretrained(tmp_path / "kept")
    args = argparse.Namespace(init_from=str(tmp_path / "kept"), seed=0, clip_pretrained=None)
    model = build_model(args, ["cat", "dog,puppy", "grass"], [0, 1])
    assert model.config.class_names == ["cat", "dog,puppy", "grass"] and model.config.thing_ids == [0, 1]
    assert model.text_embeddings.shape == (4, model.config.clip_embed_dim)
    assert not model.config.localization_only
    reference = tiny_model(class_names=["cat", "dog,puppy", "grass"], keep_text_tower=True, seed=1)
    assert torch.allclose(model.text_embeddings, reference.text_embeddings, atol=1e-5)  # same CLIP text tower
    assert all(not p.requires_grad for p in model.backbone.parameters())

    bare = tiny_model(class_names=["object"], seed=2)  # no text tower
    rebuilt = adapt_class_names(bare, ["a", "b"], [0])
    assert isinstance(rebuilt, DearliForPanopticSegmentation) and rebuilt is not bare
    assert rebuilt.config.class_names == ["a", "b"] and rebuilt.text_embeddings.shape[0] == 2
    for name, tensor in bare.state_dict().items():
        if name.startswith(("pixel_decoder.", "transformer_module.", "class_embed.", "backbone.")):
            assert torch.equal(tensor, rebuilt.state_dict()[name]), name
    assert adapt_class_names(rebuilt, ["a", "b"], [0, 1]) is rebuilt and rebuilt.config.thing_ids == [0, 1]


def test_dataloader_workers_never_exceed_the_cpus(monkeypatch, caplog):
    """The default (4) and any --num_workers are lowered to the CPUs this process may use, with one log line; the
    loader then builds without DataLoader's "creates N worker processes" warning."""
    import warnings

    from training import loop

    monkeypatch.setattr(loop, "available_cpus", lambda: 2)
    with caplog.at_level("INFO", logger=loop.__name__):
        assert loop.clamp_num_workers(4) == 2
    assert [r.getMessage() for r in caplog.records] == ["DataLoader workers: 4 requested, 2 CPUs available: using 2"]
    caplog.clear()
    assert loop.clamp_num_workers(2) == 2 and loop.clamp_num_workers(0) == 0 and not caplog.records
    monkeypatch.undo()
    cpus = loop.available_cpus()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # DataLoader warns (UserWarning) when workers exceed the CPUs
        loader = loop.build_train_dataloader(list(range(8)), 2, 1, seed=0, num_workers=loop.clamp_num_workers(cpus + 3))
    assert loader.num_workers == cpus


def test_weight_decay_spares_norms_and_embeddings_as_the_reference(tiny_model):
    """detectron2's WEIGHT_DECAY_NORM = WEIGHT_DECAY_EMBED = 0: normalisation layers and nn.Embedding parameters are
    not decayed; everything else, biases, the pixel decoder's level_embed parameter and logit_scale included, is."""
    import copy

    model = copy.deepcopy(tiny_model)
    optimizer = build_optimizer(model, 1e-2, 0.05)
    decay = {name: group["weight_decay"] for group in optimizer.param_groups for name in group["names"]}
    assert set(decay) == {n for n, p in model.named_parameters() if p.requires_grad}
    zero = {n for n, d in decay.items() if d == 0.0}
    norms = {n for n, m in model.named_modules() if isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm))}
    embeddings = {"transformer_module.queries_embedder.weight", "transformer_module.queries_features.weight",
                  "transformer_module.level_embed.weight", "void_embedding.weight"}
    assert zero == {n for n in decay if n.rsplit(".", 1)[0] in norms} | embeddings and len(zero) > 20
    for name in ("logit_scale", "pixel_decoder.level_embed", "transformer_module.decoder.layers.0.fc1.bias",
                 "transformer_module.decoder.layers.0.cross_attn.in_proj_weight", "class_embed.0.0.weight"):
        assert decay[name] == 0.05, name
    # AdamW's decoupled decay on a zero gradient: only the decayed parameters shrink, by lr * 0.05.
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, param in model.named_parameters():
        if name in before:
            torch.testing.assert_close(param.detach(), before[name] * (1 - 1e-2 * decay[name]), msg=name)
    # --weight_decay_norm / --weight_decay_embed equal to --weight_decay: one group, every parameter decayed.
    uniform = build_optimizer(model, 1e-4, 0.05, weight_decay_norm=0.05, weight_decay_embed=0.05)
    assert [g["weight_decay"] for g in uniform.param_groups] == [0.05]
