"""Integrations with other libraries; each submodule imports its library lazily.

- :mod:`galore_opt.integrations.transformers`: ``GaLoreTrainer`` and ``galore_optimizer`` for the
  Hugging Face ``Trainer`` (transformers is an optional extra: ``pip install galore-opt[hf]``).
"""
