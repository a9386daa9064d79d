"""The layer contract of DESIGN.md: app/ above ppo/ above reward/ above annotation/, and nothing imports upwards.

    .venv/bin/python -m pytest tests/test_layers.py

Every .py file under annotation/, reward/ and ppo/ is parsed with `ast`, and every import in it is
checked, at any depth (inside functions and `if TYPE_CHECKING:` blocks too): `import x`, `from x
import y`, relative imports resolved against the file's package, and `importlib.import_module` /
`__import__` with a literal name. The same rule as import-linter's layers contract, without the
dependency; the second test makes sure the checker itself still catches a violation.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# What each layer must not import (top-level package names). Streamlit belongs to app/ alone.
FORBIDDEN = {
    "annotation": ("app", "streamlit", "reward", "ppo"),
    "reward": ("app", "streamlit", "ppo"),
    "ppo": ("app", "streamlit"),
}


def _module_parts(root: Path, path: Path) -> list[str]:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def _imports(root: Path, path: Path):
    """(line, imported module, source text) for every import in one file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    module = _module_parts(root, path)
    package = module if path.name == "__init__.py" else module[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, f"import {alias.name}"
        elif isinstance(node, ast.ImportFrom):
            text = f"from {'.' * node.level}{node.module or ''} import {', '.join(a.name for a in node.names)}"
            if node.level == 0:
                yield node.lineno, node.module, text
                continue
            if node.level - 1 >= len(package):
                # Python refuses this at import time; name it rather than guess what was meant.
                yield node.lineno, "<above the top-level package>", text
                continue
            base = package[:len(package) - (node.level - 1)]
            if node.module:
                yield node.lineno, ".".join(base + [node.module]), text
            else:
                for alias in node.names:  # `from . import x`: x may be a submodule
                    yield node.lineno, ".".join(base + [alias.name]), text
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
            first = node.args[0]
            if name in ("import_module", "__import__") and isinstance(first, ast.Constant) and isinstance(first.value, str):
                if not first.value.startswith("."):  # a relative name needs its package argument; not checked
                    yield node.lineno, first.value, f"{name}({first.value!r})"


def layer_violations(root: Path) -> tuple[int, list[str]]:
    """(files checked, violations as 'path:line: import ... (layer/ must not import x)') under `root`."""
    checked, found = 0, []
    for layer, forbidden in FORBIDDEN.items():
        for path in sorted((root / layer).rglob("*.py")):
            checked += 1
            for line, target, text in _imports(root, path):
                top = target.split(".")[0]
                if target.startswith("<") or top in forbidden:
                    why = "climbs above its package" if target.startswith("<") else f"{layer}/ must not import {top}"
                    found.append(f"{path.relative_to(root)}:{line}: {text} ({why})")
    return checked, found


def test_lower_layers_do_not_import_upwards():
    checked, found = layer_violations(REPO)
    assert checked >= 30, f"only {checked} files found under {REPO}/annotation, reward, ppo; is the checker looking in the right place?"
    assert not found, "imports against the layer contract (DESIGN.md, Layers):\n" + "\n".join(found)


def test_the_checker_catches_violations(tmp_path):
    files = {
        "annotation/__init__.py": "",
        "annotation/errors.py": "class AnnotationError(Exception):\n    pass\n",
        "annotation/io/__init__.py": "from .formats import parse\nfrom . import formats\n",
        "annotation/io/formats.py": (
            "import json\n"
            "from ..errors import AnnotationError\n"
            "def parse(path, settings=None):\n"
            "    if settings is None:\n"
            "        from app.settings import get_settings\n"
            "        settings = get_settings()\n"
            "    return json.loads(path)\n"
        ),
        "annotation/late.py": "def f():\n    import reward.train as t\n    return t\n",
        "annotation/climb.py": "from .. import app\n",
        "annotation/dyn.py": "import importlib\nmod = importlib.import_module('ppo.jobs')\n",
        "reward/__init__.py": "",
        "reward/jobs.py": "from annotation.errors import AnnotationError\nfrom app import jobs\n",
        "reward/score.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ppo.train import PPOConfig\n",
        "ppo/__init__.py": "",
        "ppo/page.py": "import reward.score, annotation.store\ndef show():\n    import streamlit as st\n",
        "ppo/fine.py": "from reward import score\nfrom annotation.io import formats\nimport apps, application\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)

    checked, found = layer_violations(tmp_path)

    assert checked == len(files)
    assert found == [
        "annotation/climb.py:1: from .. import app (climbs above its package)",
        "annotation/dyn.py:2: import_module('ppo.jobs') (annotation/ must not import ppo)",
        "annotation/io/formats.py:5: from app.settings import get_settings (annotation/ must not import app)",
        "annotation/late.py:2: import reward.train (annotation/ must not import reward)",
        "reward/jobs.py:2: from app import jobs (reward/ must not import app)",
        "reward/score.py:3: from ppo.train import PPOConfig (reward/ must not import ppo)",
        "ppo/page.py:3: import streamlit (ppo/ must not import streamlit)",
    ]


STORE_SESSIONS = {"transaction", "reading", "session_factory", "read_connection", "Session"}


def page_sessions(pages_dir: Path) -> list[str]:
    """Calls by which a page would open a store session or transaction itself: pages call domain
    functions that take an Engine and own their transactions (DESIGN.md)."""
    found = []
    for path in sorted(pages_dir.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                func = node.func
                name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
                if name in STORE_SESSIONS or name in ("begin", "connect") and isinstance(func, ast.Attribute):
                    found.append(f"{path.name}:{node.lineno}: {name}(...)")
    return found


def test_pages_never_open_a_store_session_themselves(tmp_path):
    root = Path(__file__).resolve().parent.parent
    assert page_sessions(root / "app" / "pages") == []
    (tmp_path / "9_Bad.py").write_text("from annotation.store import transaction\nwith transaction(engine) as s:\n    pass\n")
    assert page_sessions(tmp_path) == ["9_Bad.py:2: transaction(...)"]
