"""Subcommands of ``python -m storage``, one module per concept (see :mod:`storage.cli`)."""
