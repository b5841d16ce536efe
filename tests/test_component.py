"""The component contract (almtok_jax/component.py, model.COMPONENTS): key routing, one init path, and a
model directory's config checked against its weights and itself (issue 17 item 7)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import jax
import numpy as np
import pytest
import yaml
from conftest import FIXTURES, REPO

from almtok_jax.component import CODEC_STATE, MODEL_STATE
from almtok_jax.config import load_model_config, to_dict
from almtok_jax.mapping import MappingError
from almtok_jax.model import COMPONENTS, FROZEN, abstract_variables
from almtok_jax.sqcodec import SQCODEC
from almtok_jax.tokenizer import ALMTokenizer2
from almtok_jax.weights.convert import convert_checkpoint
from almtok_jax.weights.model_dir import ModelDirError, save_model_dir, split_variables

TINY = load_model_config(REPO / "configs" / "tiny_release.yaml")
KEYS = FIXTURES / "release_full_keys"


def test_components_are_the_model_picture():
    assert [c.name for c in COMPONENTS] == ["whisper", "wavlm", "musicfm", "fusion", "quantizer", "gpt", "flow",
                                            "sqcodec"]
    assert FROZEN == ("whisper", "wavlm", "musicfm", "sqcodec")
    assert set(abstract_variables(TINY)) == {c.name for c in COMPONENTS} - {"gpt"}  # gpt_loss is off


@pytest.mark.parametrize(("manifest", "state"), [("ep5_model_keys.json", MODEL_STATE),
                                                 ("sqcodec_keys.json", CODEC_STATE)])
def test_every_release_key_has_exactly_one_owner(manifest, state):
    keys = json.loads((KEYS / manifest).read_text())
    owners = {k: [c.name for c in COMPONENTS if c.source == state and c.owns(k)] for k in keys}
    assert {k: o for k, o in owners.items() if len(o) != 1} == {}
    if state == MODEL_STATE:
        counts = {name: sum(o == [name] for o in owners.values()) for name in ("whisper", "flow", "musicfm")}
        assert counts == {"whisper": 367, "flow": 433, "musicfm": 465}


def test_a_key_no_component_owns_is_named():
    with pytest.raises(MappingError, match=r"1 keys of ep\*\.checkpoint\['model'\] belong to no component:\n"
                                           r"\s+bogus\.weight \(3,\)"):
        convert_checkpoint({"bogus.weight": np.zeros(3, np.float32)}, {}, TINY, source="x")


def test_module_initializers_are_the_training_init():
    """PReLU slopes 0.25 and weight-norm g = |v| per output channel (unit-scale kernels); LayerScale from the
    config: tests/test_quantizer.py."""
    sq = replace(TINY.sqcodec, downsample_factors=(2,), downsample_kernel_sizes=(4,), upsample_factors=(2,),
                 upsample_kernel_sizes=(4,))
    codec = SQCODEC.init(sq, jax.random.key(0))["params"]
    assert float(codec["encoder"]["down_activation"][0]) == 0.25
    v, g = (np.asarray(codec["encoder"]["layers_0"][k]) for k in ("weight_v", "weight_g"))
    np.testing.assert_allclose(g, np.linalg.norm(v.reshape(-1, v.shape[-1]), axis=0), rtol=1e-6)


# ------------------------------------------------------------------------------------ model directories


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny model directory with zero weights of the tiny preset's shapes (only shapes are checked here)."""
    variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract_variables(TINY))
    out = tmp_path_factory.mktemp("component") / "tiny"
    return save_model_dir(out, split_variables(variables), yaml.safe_dump(to_dict(TINY), sort_keys=False))


def _with_config(model_dir, tmp_path, section: str, key: str, value) -> str:
    target = tmp_path / "model"
    shutil.copytree(model_dir, target)
    config = yaml.safe_load((target / "config.yaml").read_text())
    node = config
    for part in section.split("."):
        node = node[part]
    node[key] = value
    (target / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return str(target)


def test_a_consistent_directory_loads(model_dir):
    tok = ALMTokenizer2.load(model_dir)
    assert tok.sample_rate == 24000 and set(tok.variables) == set(abstract_variables(TINY))


@pytest.mark.parametrize(("section", "key", "value", "message"), [
    ("pipeline", "sample_rate", 16000,
     r"config\.yaml: ALMTokenizer2Config: every part reads the same waveform, but the rates differ: "
     r"\{'pipeline\.sample_rate': 16000, "
     r"'sqcodec\.sample_rate': 24000"),
    ("quantizer.rvq", "codebook_size", 65,
     r"component quantizer: codebook/vq_embed/embed: stored shape \(8, 64, 8\), the config implies \(8, 65, 8\)"),
    ("pipeline", "min_duration", 6.0,
     r"pipeline\.prompt_frames 64 is longer than the 42 latent frames two windows of pipeline\.min_duration 6\.0"),
    ("pipeline", "min_duration", 12.04,
     r"min_duration 12\.04 s gives 150 tokens and 301 latent frames"),
    ("dit", "num_layers", 3,
     r"component flow: params/estimator/transformer_blocks/attn1/to_k/bias: stored shape \(2, 128\), the config "
     r"implies \(3, 128\)"),
])
def test_config_that_contradicts_the_model_is_refused(model_dir, tmp_path, section, key, value, message):
    directory = _with_config(model_dir, tmp_path, section, key, value)
    with pytest.raises(ModelDirError, match=message) as info:
        ALMTokenizer2.load(directory)
    assert str(info.value).startswith(f"model directory {directory}: config.yaml")


def test_training_start_checks_the_directory_against_the_training_preset(model_dir):
    from almtok_jax.train.task import directory_variables

    variables = directory_variables(model_dir, TINY)
    assert set(variables) == set(abstract_variables(TINY))
    wider = replace(TINY, fusion=replace(TINY.fusion, codec_dim=2 * TINY.fusion.codec_dim))
    with pytest.raises(ModelDirError, match=r"for the training model config\): config.yaml does not match "
                                                  r"the stored weights:\n  component fusion: "):
        directory_variables(model_dir, wider)
