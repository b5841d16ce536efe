"""The architecture read off a release (its files and the checkpoint's key names and shapes), at tiny size
with weights and at full size from shapes alone; checkpoint choice, hub download, missing experts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from conftest import FIXTURES
from flax import traverse_util

import convert_torch_weights
from almtok_jax.component import DIT_CONFIG, SQ_CONFIG, WHISPER_CONFIG, DeriveError
from almtok_jax.config import ALMTokenizer2Config, load_model_config
from almtok_jax.experts.whisper import WHISPER
from almtok_jax.mapping import MappingError, Rule, convert_state_dict, linear
from almtok_jax.model import COMPONENTS, abstract_variables
from almtok_jax.quantizer.query import QUANTIZER
from almtok_jax.weights.convert import convert_checkpoint, derive_config
from almtok_jax.weights.release import checkpoint_order, newest_checkpoint, read_release, select_checkpoint
from almtok_jax.weights.torch_io import load_state_dict
from tests.fake_hub import fake_hub
from tests.synthetic_release import FULL_FILES, full_size_shapes

RELEASE = FIXTURES / "release_tiny"
TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny_release.yaml"

MODEL_SHAPES, CODEC_SHAPES = full_size_shapes(FIXTURES)


def _abstract(shapes: dict) -> dict[str, jax.ShapeDtypeStruct]:
    return {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}


@pytest.fixture(scope="module")
def tiny_states():
    return (load_state_dict(RELEASE / "ep5.checkpoint", select="model"),
            load_state_dict(RELEASE / "sqcodec.pth", select="codec_model"))


def test_tiny_release_derives_exactly_the_tiny_preset():
    assert read_release(RELEASE).config == load_model_config(TINY)


def test_every_converted_component_derives_its_architecture():
    assert {c.name for c in COMPONENTS if c.source is not None and c.derive is None} == set()


def test_full_size_architecture_from_key_shapes_alone():
    """Derived from the full-size manifest's shapes (no weights): the release architecture, and every key
    maps to exactly one variable of the full-size model with its shape, no variable left without a key."""
    model_state, codec_state = _abstract(MODEL_SHAPES), _abstract(CODEC_SHAPES)
    config = derive_config(model_state, codec_state, FULL_FILES)
    assert config == ALMTokenizer2Config()
    variables = convert_checkpoint(model_state, codec_state, config, source="full-size manifest")
    expected = abstract_variables(config)
    assert set(variables) == set(expected) - {"gpt"}
    for name, tree in variables.items():
        got = {k: v.shape for k, v in traverse_util.flatten_dict(tree).items()}
        want = {k: v.shape for k, v in traverse_util.flatten_dict(expected[name]).items()}
        assert got == want, name
    assert all(isinstance(v, jax.ShapeDtypeStruct) for v in jax.tree.leaves(variables))


def _without_layers(state: dict, prefix: str, keep: int) -> dict:
    """``state`` without the layers ``<prefix>N.`` with ``N >= keep``."""
    return {k: v for k, v in state.items()
            if not (k.startswith(prefix) and int(k[len(prefix):].split(".")[0]) >= keep)}


def test_full_size_release_with_other_depths_and_codebooks():
    """Counts no preset has (Whisper 12 layers, WavLM 10, query encoder 3 / decoder 5, 5 codebooks of 4096,
    DiT 20 blocks and a 2000-frame position table) are read off the keys, and every key still maps."""
    model_state = _abstract(MODEL_SHAPES)
    for prefix, keep in (("whisper_encoder.layers.", 12), ("wavlm_encoder.encoder.layers.", 10),
                         ("encoder_transformers.", 3), ("decoder_transformers.", 5), ("vq_embed.layers.", 5),
                         ("cfm_wrapper.estimator.transformer_blocks.", 20)):
        model_state = _without_layers(model_state, prefix, keep)
    for k, v in model_state.items():
        if k.startswith("vq_embed.layers."):
            model_state[k] = jax.ShapeDtypeStruct((1, 4096, *v.shape[2:]), v.dtype)
    model_state["cfm_wrapper.estimator.pos_embed.pe"] = jax.ShapeDtypeStruct((1, 2000, 1536), jnp.float32)
    files = {**FULL_FILES, WHISPER_CONFIG: {**FULL_FILES[WHISPER_CONFIG], "encoder_layers": 12},
             DIT_CONFIG: {**FULL_FILES[DIT_CONFIG], "num_layers": 20}}
    config = derive_config(model_state, _abstract(CODEC_SHAPES), files)
    q = config.quantizer
    assert (config.experts.whisper.encoder_layers, config.experts.wavlm.num_hidden_layers) == (12, 10)
    assert (q.encoder_depth, q.decoder_depth, q.rvq.num_quantizers, q.rvq.codebook_size) == (3, 5, 5, 4096)
    assert (config.dit.num_layers, config.dit.num_positional_embeddings) == (20, 2000)
    for c in (c for c in COMPONENTS if c.name in ("whisper", "wavlm", "quantizer", "flow")):
        c.load(model_state, c.config(config))  # raises on any key or shape that does not fit


def test_full_size_without_whisper_and_dit_files():
    """Without model_config.json and whisper-medium/config.json the sizes come from the shapes and the head
    sizes from the release architecture: the same config."""
    model_state, codec_state = _abstract(MODEL_SHAPES), _abstract(CODEC_SHAPES)
    assert derive_config(model_state, codec_state, {SQ_CONFIG: FULL_FILES[SQ_CONFIG]}) == ALMTokenizer2Config()


def test_full_size_manifest_refuses_a_wrong_shape():
    model_state = _abstract(MODEL_SHAPES)
    key = "decoder_transformers.3.ff.ff.2.parametrizations.weight.original1"
    model_state[key] = jax.ShapeDtypeStruct((768, 3000), jnp.float32)
    message = (r"decoder_transformers/blocks/ff/out/weight_v: layer 3 \(decoder_transformers\.3\.ff\.ff\.2\."
               r"parametrizations\.weight\.original1\) gives \(3000, 768\), model expects \(3072, 768\) per layer")
    with pytest.raises(MappingError, match=message):
        QUANTIZER.load(model_state, ALMTokenizer2Config().quantizer)


def test_shape_only_mapping_and_a_doubly_mapped_variable():
    rules = [Rule(r"a\.weight", "params/a/kernel", linear), Rule(r"b\.weight", "params/a/kernel", linear)]
    shapes = convert_state_dict({"a.weight": jax.ShapeDtypeStruct((3, 5), jnp.float32)}, rules[:1])
    assert shapes["params"]["a"]["kernel"].shape == (5, 3)
    with pytest.raises(MappingError, match="both a.weight and b.weight map to it"):
        convert_state_dict({"a.weight": np.zeros((3, 5)), "b.weight": np.zeros((3, 5))}, rules)


def test_whisper_folder_is_needed_only_for_its_config_json(tmp_path):
    release = tmp_path / "release"
    release.mkdir()
    for f in RELEASE.iterdir():
        if f.is_file():
            (release / f.name).symlink_to(f)
    assert read_release(release).config == load_model_config(TINY)  # no whisper-medium/: sizes from the keys
    (release / "whisper-medium").mkdir()
    hf = json.loads((RELEASE / "whisper-medium" / "config.json").read_text())
    (release / "whisper-medium" / "config.json").write_text(json.dumps({**hf, "encoder_ffn_dim": 96}))
    rel = read_release(release)  # the file states the size; the tensors contradict it
    assert rel.config.experts.whisper.encoder_ffn_dim == 96
    with pytest.raises(MappingError, match="fc1/kernel: checkpoint gives"):
        WHISPER.load(rel.model_state, rel.config.experts.whisper)


def test_missing_expert_is_one_error_naming_it(tiny_states):
    model_state, codec_state = tiny_states
    without = {k: v for k, v in model_state.items() if not k.startswith("wavlm_")}
    with pytest.raises(DeriveError) as e:
        derive_config(without, codec_state, {SQ_CONFIG: yaml.safe_load((RELEASE / "sq_config.yaml").read_text())
                                             ["generator"]["config"]})
    message = str(e.value)
    assert "component wavlm is missing" in message and "musicfm" not in message
    needed = len(jax.tree.leaves(abstract_variables(ALMTokenizer2Config(), ("wavlm",))))
    assert f"none of the {needed} tensors" in message
    no_musicfm = {k: v for k, v in model_state.items() if not k.startswith("pretrained_model.")}
    with pytest.raises(MappingError, match="component musicfm is missing"):
        convert_checkpoint(no_musicfm, codec_state, load_model_config(TINY))


def test_checkpoint_order_by_epoch_then_iteration(tmp_path):
    names = ["ep4-iter5000.checkpoint", "ep5-iter100.checkpoint", "ep5.checkpoint", "ep10-iter1.checkpoint",
             "ep9.checkpoint"]
    assert sorted(names, key=checkpoint_order) == ["ep4-iter5000.checkpoint", "ep5-iter100.checkpoint",
                                                   "ep5.checkpoint", "ep9.checkpoint", "ep10-iter1.checkpoint"]
    assert checkpoint_order("ep_best.checkpoint") is None
    for name in [*names, "ep_best.checkpoint"]:
        (tmp_path / name).write_bytes(b"")
    assert newest_checkpoint(tmp_path).name == "ep10-iter1.checkpoint"
    assert select_checkpoint(tmp_path, "ep_best.checkpoint").name == "ep_best.checkpoint"


def test_checkpoint_file_option(tmp_path, capsys):
    rc = convert_torch_weights.main(["--release", str(RELEASE), "--checkpoint-file", "ep4.checkpoint",
                                     "--out", str(tmp_path / "o")])
    assert rc == 1 and "checkpoint file ep4.checkpoint not found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_hub_download_fetches_only_the_files_read(monkeypatch, tmp_path):
    requested: list[str] = []
    monkeypatch.setitem(sys.modules, "huggingface_hub", fake_hub(RELEASE, requested))
    folder = convert_torch_weights.fetch_release("Dongchao/almtokenizer2")
    assert folder == RELEASE
    assert sorted(requested) == sorted(["config.yaml", "ep5.checkpoint", "model_config.json", "sq_config.yaml",
                                        "sqcodec.pth", "whisper-medium/config.json"])


def test_hub_repo_id_without_huggingface_hub(monkeypatch, tmp_path, capsys):
    """A repo id (not a folder) needs huggingface_hub: without it the converter says so and writes nothing."""
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    rc = convert_torch_weights.main(["--release", "Dongchao/almtokenizer2", "--out", str(tmp_path / "o")])
    assert rc == 1 and "huggingface_hub" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_hub_offline_failure_is_one_line(monkeypatch, tmp_path, capsys):
    offline = OSError("cannot reach the hub\nTraceback-like detail\nmore")
    monkeypatch.setitem(sys.modules, "huggingface_hub", fake_hub(RELEASE, fail=offline))
    rc = convert_torch_weights.main(["--release", "Dongchao/almtokenizer2", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1
    assert "could not download Dongchao/almtokenizer2" in err and "cannot reach the hub" in err
    assert not (tmp_path / "o").exists()
