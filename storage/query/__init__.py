"""Queries over documents: ``find`` / ``count`` / ``delete_many`` filters, their typing rules, and indexes.

The rules are stated once, in :mod:`storage.query.plan` (what a filter means, what is refused), and implemented
twice: in Python by :mod:`storage.query.evaluate` (the JSON backend, and any backend's fallback), and in SQL by
``storage/backends/postgres/query.py``. The property tests compare both with a third, independent evaluator.
"""

from .evaluate import compile_filter, deep_equal, resolve, sort_pairs, sort_rank
from .ops import IndexOps, QueryOps
from .plan import OPERATORS, Condition, Order, Query, check_path, parse_query

__all__ = ["OPERATORS", "Condition", "Order", "Query", "check_path", "parse_query", "compile_filter", "deep_equal",
           "resolve", "sort_pairs", "sort_rank", "QueryOps", "IndexOps"]
