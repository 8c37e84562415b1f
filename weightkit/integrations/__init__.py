"""Integrations with other libraries. Each submodule imports its library only when it is imported itself:
``weightkit.integrations.transformers`` needs ``transformers`` (and, for its ``Trainer``, ``accelerate``)."""
