"""Configs as data: type checking when a config is built (from YAML, from overrides), presets as differences
from the release, retired keys of older model directories."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import yaml

from almtok_jax.config import (
    CONFIG_DIR,
    ALMTokenizer2Config,
    ConfigError,
    from_dict,
    load_model_config,
    model_config_from_dict,
    override,
    to_dict,
)
from almtok_jax.sqcodec import SQCodecConfig
from almtok_jax.train.config import TrainConfig, load_train_config


def _error(build, *parts: str) -> str:
    with pytest.raises(ConfigError) as e:
        build()
    msg = str(e.value)
    for part in parts:
        assert part in msg, f"{part!r} not in {msg!r}"
    return msg


def test_scientific_notation_is_a_float_from_yaml_and_overrides(tmp_path):
    # PyYAML (YAML 1.1) reads 3e-4 (no dot) as the string "3e-4".
    assert yaml.safe_load("3e-4") == "3e-4"
    got = override(TrainConfig(), ["optimizer.learning_rate=3e-4"]).optimizer.learning_rate
    assert isinstance(got, float) and got == 3e-4
    (tmp_path / "t.yaml").write_text("optimizer:\n  learning_rate: 3e-4\n  weight_decay: 1\n")
    cfg = load_train_config(tmp_path / "t.yaml")
    assert cfg.optimizer.learning_rate == 3e-4 and isinstance(cfg.optimizer.weight_decay, float)


@pytest.mark.parametrize(("assignment", "parts"), [
    ("steps=ten", ("TrainConfig.steps", "'ten'", "an integer or null")),
    ("data.global_batch_size=8.5", ("TrainConfig.data.global_batch_size", "8.5", "an integer")),
    ("data.crop=middle", ("TrainConfig.data.crop", "'middle'", "one of 'random', 'start'")),
    ("optimizer.learning_rate=fast", ("TrainConfig.optimizer.learning_rate", "'fast'", "a number")),
    ("data.shuffle=1", ("TrainConfig.data.shuffle", "1", "true or false")),
    ("epochs=true", ("TrainConfig.epochs", "True", "an integer")),
    ("data.extensions=[wav, 3]", ("TrainConfig.data.extensions[1]", "3", "a string")),
    ("schedule.kind=linear", ("TrainConfig.schedule.kind", "'linear'", "'cosine', 'constant'")),
])
def test_bad_training_values_name_key_value_and_what_is_allowed(assignment, parts):
    _error(lambda: override(TrainConfig(), [assignment]), *parts)


@pytest.mark.parametrize(("assignment", "parts"), [
    ("dit.dtype=float16", ("dit.dtype", "'float16'", "'float32', 'bfloat16'")),
    ("sampler.solver=rk5", ("sampler.solver", "'rk5'", "'euler', 'midpoint', 'heun', 'rk4', 'ab2'")),
    ("quantizer.rvq.gradient=ste", ("quantizer.rvq.gradient", "'ste'", "'rotation_trick', 'straight_through'")),
    ("quantizer.rvq.codebook_size=64.0", ("quantizer.rvq.codebook_size", "64.0", "an integer")),
    ("experts.wavlm.feature_layers=[1, 2, 3]", ("experts.wavlm.feature_layers", "[1, 2, 3]", "a list of 2 values")),
    ("experts.wavlm.conv_dim=16", ("experts.wavlm.conv_dim", "16", "a list of (an integer)")),
    ("dit=3", ("ALMTokenizer2Config.dit", "3", "a mapping of DiTConfig keys")),
])
def test_bad_model_values_name_key_value_and_what_is_allowed(assignment, parts):
    _error(lambda: override(ALMTokenizer2Config(), [assignment]), *parts)


def test_bad_value_in_a_yaml_file_names_the_file(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("steps: ten\n")
    _error(lambda: load_train_config(path), str(path), "steps", "'ten'")
    path.write_text("data:\n  crop: middle\n")
    _error(lambda: load_train_config(path), "data.crop", "'middle'")
    path.write_text("dit: {num_layers: 2.5}\n")
    _error(lambda: load_model_config(path), str(path), "dit.num_layers", "2.5")
    path.write_text("dit: [unclosed\n")
    _error(lambda: load_model_config(path), str(path), "not valid YAML")


def test_complete_builds_need_every_field():
    data = to_dict(SQCodecConfig())
    assert from_dict(SQCodecConfig, data, complete=True) == SQCodecConfig()
    _error(lambda: from_dict(SQCodecConfig, {k: v for k, v in data.items() if k != "causal"}, complete=True),
           "missing config keys ['causal']")


def test_every_part_reads_the_same_sample_rate():
    _error(lambda: override(ALMTokenizer2Config(), ["pipeline.sample_rate=16000"]),
           "pipeline.sample_rate", "16000", "24000")


def _leaves(tree) -> dict:
    if isinstance(tree, dict):
        return {f"{k}.{p}" if p else k: v for k, sub in tree.items() for p, v in _leaves(sub).items()}
    return {"": tree}


@pytest.mark.parametrize("name", ["tiny_release", "mid"])
def test_presets_hold_only_their_differences_from_the_release(name):
    data = yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text())
    release = _leaves(to_dict(ALMTokenizer2Config()))
    leaves = _leaves(data)
    assert leaves and all(release[k] != v for k, v in leaves.items()), "a preset repeats a release value"
    assert len(leaves) <= 40
    assert _leaves(to_dict(load_model_config(name))) == {**release, **leaves}


def test_the_release_preset_is_the_defaults():
    assert yaml.safe_load((CONFIG_DIR / "almtokenizer2.yaml").read_text()) == {}
    assert load_model_config("almtokenizer2") == ALMTokenizer2Config()
    assert load_train_config("train_almtokenizer2").model == "almtokenizer2" == TrainConfig().model


def test_old_model_directory_config_with_compat_loads_with_a_warning():
    data = to_dict(load_model_config("tiny_release"))
    data["quantizer"]["compat"] = "release"
    with pytest.warns(UserWarning, match=r"old/config.yaml: ignoring quantizer.compat='release'.*runtime"):
        cfg = model_config_from_dict(data, where="old/config.yaml")
    assert cfg == load_model_config("tiny_release")
    assert "compat" not in {f.name for f in dataclasses.fields(type(cfg.quantizer))}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model_config_from_dict(to_dict(cfg))  # today's files give no warning
