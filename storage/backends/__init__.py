"""Backends implementing :class:`storage.protocol.Store`: ``json_files`` (embedded default) and ``postgres``."""
