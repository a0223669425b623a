"""The library's version, in a module of its own so that anything (a backup manifest, the CLI) can read it
without importing the package root."""

__version__ = "0.1.0"
