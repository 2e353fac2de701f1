"""Integrations with other libraries, each an optional extra (``pip install ringattn[hf]``).

- :mod:`ringattn.integrations.hf`: Hugging Face transformers decoder-only models under
  context parallelism, through transformers' own ``AttentionInterface``.

Nothing is imported here, so ``import ringattn`` never needs an optional dependency.
"""
