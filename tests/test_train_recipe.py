"""The reference recipe's two starting choices (``configs/train_almtokenizer2.yaml``): the frozen parts come
from a converted release (``frozen_from``), the trained parts start from the modules' own initializers
(``trainable_init: random``); the fine-tune config starts them from the model directory instead.

Run in process on the tiny release for one step at learning rate 0, so the exported trainable parameters are
the step-0 ones."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import AUDIO, REPO

import train
from almtok_jax.config import load_model_config
from almtok_jax.model import init_variables
from almtok_jax.train.task import task_trees
from almtok_jax.weights.model_dir import load_model_dir


def _train_one_step(config: str, tmp_path, *overrides: str, model: str = "tiny_release"):
    export = tmp_path / "export"
    train.main(["--config", str(REPO / "configs" / config), "--workdir", str(tmp_path / "run"), "--steps", "1",
                "--export", str(export), f"model={model}", f"data.train={AUDIO / 'speech'}",
                "data.segment_seconds=1.0", "data.global_batch_size=1", "data.worker_count=0",
                "optimizer.learning_rate=0.0", "schedule.warmup_steps=1", "logging.tensorboard=false",
                *overrides])  # the same step program for both configs: compiled once (the compilation cache)
    return load_model_dir(export)[0]


def _params(tree: dict) -> dict:
    return {k: {"params": v["params"]} for k, v in tree.items()}


def _fresh_trainable(model_config) -> dict:
    """What ``trainable_init: random`` starts from: the modules' own initializers at the recipe's seed."""
    seed = 2336
    fresh, _, _ = task_trees(jax.jit(lambda k: init_variables(model_config, k))(
        jax.random.fold_in(jax.random.key(seed), 0)))
    return jax.device_get(fresh)


def _equal(a, b) -> bool:
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_reference_recipe_trains_from_scratch_on_the_release_frozen_parts(tiny_checkpoint, tmp_path):
    trained = _train_one_step("train_almtokenizer2.yaml", tmp_path, f"frozen_from={tiny_checkpoint}")
    release, _ = load_model_dir(tiny_checkpoint)
    assert _equal(trained["frozen"], release["frozen"])
    assert _equal(trained["trainable"], _fresh_trainable(load_model_config("tiny_release")))
    assert not _equal(trained["trainable"], _params(release["trainable"]))


@pytest.mark.parametrize("gpt", [False, True])
def test_fine_tune_starts_the_trained_parts_from_the_model_directory(tiny_checkpoint, tmp_path, gpt):
    """With the GPT loss on, its predictor (which no model directory holds) starts from its initializer."""
    model = str(REPO / "configs" / "tiny_release.yaml")
    if gpt:
        model = tmp_path / "tiny_gpt.yaml"
        model.write_text((REPO / "configs" / "tiny_release.yaml").read_text().replace(
            "quantizer:\n", "quantizer:\n  gpt_loss: {enabled: true, layers: 1, heads: 2, width: 32}\n", 1))
    overrides = [f"frozen_from={tiny_checkpoint}", f"trainable_init={tiny_checkpoint}"]
    trained = _train_one_step("train_almtokenizer2_finetune.yaml", tmp_path, *overrides, model=str(model))
    release, _ = load_model_dir(tiny_checkpoint)
    assert _equal(trained["frozen"], release["frozen"])
    gpt_params = trained["trainable"].pop("gpt", None)
    assert _equal(trained["trainable"], _params(release["trainable"]))
    if gpt:
        fresh = _fresh_trainable(load_model_config(model))
        assert gpt_params is not None and _equal(gpt_params, fresh["gpt"])
