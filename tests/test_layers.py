"""The package's layers import only downward (issue 13): the folders draw the architecture, and this test keeps it.

From the top: the entry points (``api``, ``cli``, ``commands``, ``__main__``), then ``stores`` (a backend plus the
features), then the features written once (``members``, ``messages``, ``backup``, ``migrations``), then the two
backends (``backends``), then the core every layer shares (the contract in ``interfaces``, ``documents``,
``protocol``, ``models``, ``codec``, ``errors``...). A backend never imports a feature; a feature never imports a
backend; the core imports neither. Imports under ``if TYPE_CHECKING:`` are names for the type checker only and
are not counted. Every import is read with :mod:`ast`, wherever it stands (also inside a function).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "storage"

ENTRY = ("storage.api", "storage.cli", "storage.commands", "storage.__main__", "storage.stores")
FEATURES = ("storage.members", "storage.messages.queries", "storage.backup", "storage.migrations",
            "storage.lifecycle")
BACKENDS = ("storage.backends",)
#: Modules of ``messages/`` that are data definitions both layers use (record checks, column blocks), not features.
SHARED_MODELS = ("storage.messages.records", "storage.messages.columns")


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _in(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imports_of(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` for every runtime import of the module at ``path``, relative ones resolved."""
    tree = ast.parse(path.read_text(), str(path))
    module = _module(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    skip = _type_checking_lines(tree)
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # ``from . import x`` may import the submodule x
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names] if not node.module else []
            found.append((node.lineno, target))
    return [(line, name) for line, name in found if name == "storage" or name.startswith("storage.")]


def _modules() -> list[Path]:
    return sorted(ROOT.rglob("*.py"))


def _violations(rule: str) -> list[str]:
    out = []
    for path in _modules():
        module = _module(path)
        for line, target in imports_of(path):
            if _in(target, SHARED_MODELS) or target in ("storage", "storage.messages", "storage.backends"):
                continue
            bad = False
            if rule == "backends" and _in(module, BACKENDS):
                bad = _in(target, FEATURES + ENTRY)
            elif rule == "features" and _in(module, FEATURES) and not _in(module, SHARED_MODELS):
                bad = _in(target, BACKENDS + ENTRY)
            elif rule == "core" and not _in(module, FEATURES + BACKENDS + ENTRY + SHARED_MODELS) \
                    and module not in ("storage", "storage.messages", "storage.backends"):
                bad = _in(target, FEATURES + BACKENDS + ENTRY)
            if bad:
                out.append(f"{path.relative_to(ROOT.parent)}:{line}: {module} imports {target}")
    return out


@pytest.mark.parametrize("rule", ["backends", "features", "core"])
def test_layers_import_only_downward(rule: str):
    assert _violations(rule) == []


def test_the_rule_sees_a_violation(tmp_path: Path):
    """The checker itself: an import that breaks the rule is found (relative, absolute, inside a function)."""
    bad = ROOT / "backends" / "json" / "_layer_probe.py"
    bad.write_text("from ...members import MEMBERS\n\ndef f():\n    import storage.backup.copy\n")
    try:
        found = _violations("backends")
    finally:
        bad.unlink()
    assert any("_layer_probe.py:1:" in v and "storage.members" in v for v in found)
    assert any("_layer_probe.py:4:" in v and "storage.backup.copy" in v for v in found)


def test_a_json_bot_never_loads_the_postgresql_backend(tmp_path: Path):
    """``import storage``, ``python -m storage``'s modules and a JSON store's whole life leave asyncpg and the
    PostgreSQL backend unimported (they cost a JSON-only bot memory for nothing); the name
    ``storage.PostgresStore`` still works, and loads them then."""
    script = f"""
import asyncio, sys
import storage, storage.cli

async def main():
    async with storage.open_store(backend="json", path={str(tmp_path / "config")!r}) as store:
        await store.save_member_data(1, 2, {{"roles": []}})
        assert (await store.get_member_data(1, 2))["roles"] == []

asyncio.run(main())
loaded = sorted(m for m in sys.modules if m == "asyncpg" or m.startswith(("asyncpg.", "storage.backends.postgres",
                                                                          "storage.stores.postgres")))
assert loaded == [], loaded
from storage import PostgresStore
from storage.stores import AnyStore, store_class
assert PostgresStore.__name__ == "PostgresStore" and "asyncpg" in sys.modules
assert AnyStore == storage.JsonStore | PostgresStore
assert store_class(storage.StoreConfig(backend="postgres", dsn="postgresql://u@h/db")) is PostgresStore
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=ROOT.parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
