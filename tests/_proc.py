"""Starting child processes of tests/_child.py with a store config (shared by the process tests)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

from storage import StoreConfig

CHILD = Path(__file__).with_name("_child.py")
ROOT = Path(__file__).resolve().parent.parent


def config_arg(config: StoreConfig) -> str:
    return json.dumps(dataclasses.asdict(config))


def spawn(mode: str, config: StoreConfig, *args: object, stdout: int = subprocess.PIPE) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen(
        [sys.executable, str(CHILD), mode, config_arg(config), *map(str, args)],
        stdout=stdout, stderr=subprocess.PIPE, text=True, env=env,
    )
