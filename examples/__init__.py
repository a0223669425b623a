"""Runnable examples for the ``storage`` library (importable so the CLI can load ``examples.migrations``)."""
