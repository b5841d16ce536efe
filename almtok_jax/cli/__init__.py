"""The commands (apps layer): ``convert``, ``infer``, ``evaluate``, ``tokenize``; training is
:mod:`almtok_jax.train.run`. Each is a module with a ``main`` (the ``[project.scripts]`` entry points of
``pyproject.toml``) and runs as ``python -m almtok_jax.cli.<name>``."""
