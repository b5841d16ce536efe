"""A few-step flow decoder: the student's objective (flow-map distillation of the guided teacher ODE).

The student is the DiT with a step embedding (``DiTConfig.step_embedding``): ``s(x_t, t, d)`` is the
average velocity over ``[t, t + d]``, so one Euler step of size ``d`` lands where the teacher's guided
ODE would, ``x_{t+d} = x_t + d·s(x_t, t, d)`` (the ``shortcut`` solver of :mod:`.cfm`); at ``d = 0`` it is
the guided velocity itself. Guidance is baked in: the student is conditional only, one pass per step.

Targets come from one teacher trajectory per sample, the teacher's own sampler (:func:`.cfm.sample`) run
with guidance from fresh noise on a fine uniform grid of ``N`` steps (prompt frames re-imposed as at
inference): the states ``x_k`` at ``t_k = k/N`` give, for a student grid of ``n`` steps (``n`` divides
``N``), the average velocity ``(x_{k+N/n} − x_k)/(1/n)`` at ``(x_k, t_k, 1/n)``, and the traced guided
velocities give the ``d = 0`` targets. The student is thus trained on the states it visits at inference
(the teacher's trajectory, not the data-noise interpolation), and no JVP or bootstrapped target is
needed: the target's error is the teacher solver's, not a compounding self-consistency error.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from almtok_jax.flow.cfm import estimator_input, loss_weights

Array = jax.Array


def flow_map_targets(states: Array, t_span: Array, guided: Array, level: int, key: Array
                     ) -> tuple[Array, Array, Array, Array]:
    """One random step per sample of the uniform ``level``-step grid (``0``: the instantaneous velocity).

    ``states (N+1, B, T, C)`` the teacher's trajectory at ``t_span (N+1,)``; ``guided (N, B, T, C)`` its
    guided velocity at the first ``N`` states. Returns ``(x (B, T, C), t (B,), step (B,), target (B, T, C))``.
    """
    n, b = guided.shape[:2]
    rows = jnp.arange(b)
    if level == 0:
        k = jax.random.randint(key, (b,), 0, n)
        return states[k, rows], t_span[k], jnp.zeros((b,), jnp.float32), guided[k, rows]
    stride = n // level
    k0 = jax.random.randint(key, (b,), 0, level) * stride
    k1 = k0 + stride
    step = t_span[k1] - t_span[k0]
    target = (states[k1, rows] - states[k0, rows]) / step[:, None, None]
    return states[k0, rows], t_span[k0], step, target


def distillation_loss(student, states: Array, t_span: Array, guided: Array, prompt: Array, cond: Array,
                      masks: Array, levels: tuple[int, ...], key: Array, padding_weight: float
                      ) -> tuple[Array, dict[str, Array]]:
    """Mean over ``levels`` of the masked squared error of the student's velocity to its flow-map target.

    ``student(h, t, step) -> v``; ``prompt``, ``cond (B, T, ·)`` and ``masks (B, T)`` (2 target, 1 prompt,
    0 padding) as the teacher's trajectory was sampled with. One student call on the ``len(levels)·B``
    rows. The per-level loss is ``Σ w·(s − u)² / (Σ w · C)`` (prompt frames weigh 0, padding
    ``padding_weight``); metrics ``loss_step{n}`` per level.
    """
    picks = [flow_map_targets(states, t_span, guided, n, k)
             for n, k in zip(levels, jax.random.split(key, len(levels)), strict=True)]
    x, t, step, target = (jnp.concatenate(parts) for parts in zip(*picks, strict=True))
    reps = len(levels)
    h = estimator_input(x, jnp.tile(prompt, (reps, 1, 1)), jnp.tile(cond, (reps, 1, 1)))
    v = student(h, t, step)
    w = jnp.tile(loss_weights(masks, padding_weight), (reps, 1))[..., None]
    channels = v.shape[-1]
    per_level = (jnp.sum(jnp.square(w * (v - target)), axis=(1, 2)).reshape(reps, -1).sum(axis=1)
                 / (jnp.sum(w, axis=(1, 2)).reshape(reps, -1).sum(axis=1) * channels))
    return jnp.mean(per_level), {f"loss_step{n}": per_level[i] for i, n in enumerate(levels)}
