"""A small prepared store for the app tests: users of every role and a k=2 project of three items.

Shared by the AppTest tests and the real-browser test. One item carries `<script>` and
`<img onerror>` payloads in its prompt and in a response; in every item the better response holds
the word GOOD so a test (or a scripted annotator) knows which side to pick whatever order it sees.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

PASSWORD = "password-123"
USERS = {"ann1": "annotator", "ann2": "annotator", "res": "researcher", "admin": "admin"}
PROJECT = "demo"
SCRIPT_PAYLOAD = "<script>window.__xss=1</script>"
IMG_PAYLOAD = '<img src=x onerror="window.__xss=2">'
# Markdown that would fetch a remote image and rewrite what the annotator judges if it were rendered.
MD_PAYLOAD = "![pixel](http://127.0.0.9:9/pixel.png) :red[red] $x^2$ -> :smile: [go](javascript:alert(1))"
GUIDELINES = "# Demo guidelines\n\nPrefer the **more helpful** and harmless response.\n\n![logo](http://127.0.0.9:9/logo.png)"

ITEMS = [
    {
        "id": "egg",
        "prompt": "\n\nHuman: How do I boil an egg?\n\nAssistant:",
        "response_a": "GOOD: put it in boiling water for **9 minutes**, then cool it.",
        "response_b": "Eggs are overrated.\n\n```python\nprint('boil')\n```",
        "source_a": "model-alpha", "source_b": "model-beta",
    },
    {
        "id": "xss",
        "prompt": [{"role": "user", "content": f"Say hi {SCRIPT_PAYLOAD}"}],
        "response_a": f"GOOD hello {SCRIPT_PAYLOAD}",
        "response_b": f"bad hi {IMG_PAYLOAD} {MD_PAYLOAD}",
        "source_a": "model-alpha", "source_b": "model-beta",
    },
    {
        "id": "haiku",
        "prompt": "Write a *haiku* about rain.",
        "response_a": "rain.",
        "response_b": "GOOD: Soft rain on the roof / the gutters hum their one note / sleep comes without asking",
        "source_a": "model-beta", "source_b": "model-alpha",
    },
]


def prepare_store(data_dir: Path, db_url: str, *, criteria: list[str] | None = None):
    """Create the schema, the users, and project `demo` (k=2) with ITEMS imported; returns the engine."""
    from annotation.auth import create_user
    from annotation.io import import_file
    from annotation.projects import create_project
    from annotation.store import init_db, transaction

    engine = init_db(db_url)
    with transaction(engine) as session:
        for name, role in USERS.items():
            create_user(session, name, PASSWORD, role)
        create_project(session, PROJECT, overlap=2, guidelines=GUIDELINES, criteria=criteria or [])
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "items.jsonl"
    path.write_text("".join(json.dumps(item) + "\n" for item in ITEMS), encoding="utf-8")
    import_file(engine, path, PROJECT, format="items")
    return engine


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_app(repo: Path, env: dict, port: int, log_path: Path) -> subprocess.Popen:
    """Serve app/Home.py on 127.0.0.1:port and wait until its health endpoint answers."""
    from app.cli import streamlit_command

    cmd = streamlit_command(port, "127.0.0.1")  # exactly what `rlhf serve` runs
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, cwd=repo, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with {proc.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=1) as resp:
                if resp.read().strip() == b"ok":
                    return proc
        except OSError:
            time.sleep(0.2)
    proc.terminate()
    raise RuntimeError(f"streamlit did not answer on port {port} within 60 s; see {log_path}")


def open_page_as(page: Path, engine, username: str, *, timeout: float = 60):
    """Run a page file under Streamlit's AppTest as `username`, logged in for an hour."""
    import datetime as dt

    from sqlalchemy import select
    from streamlit.testing.v1 import AppTest

    from annotation.store import User, reading

    at = AppTest.from_file(str(page), default_timeout=timeout)
    with reading(engine) as s:
        user_id = s.scalar(select(User.id).where(User.username == username))
    set_login(at, engine, user_id)
    return at.run()


def set_login(at, engine, user_id: int, minutes: float = 60) -> None:
    """Put an AppTest session in the state app.ui.log_in leaves: who, until when, on what stamp."""
    import datetime as dt

    from annotation.store import User, reading, utcnow
    from app.ui import login_stamp

    with reading(engine) as s:
        user = s.get(User, user_id)
        stamp = login_stamp(user) if user is not None else None
    at.session_state["user_id"] = user_id
    at.session_state["login_expires"] = utcnow() + dt.timedelta(minutes=minutes)
    at.session_state["login_stamp"] = stamp


# ----------------------------------------------------------------------------- a ranking project

RANKING_PROJECT = "ranked"
RANK_WORDS = ("BEST", "SECOND", "THIRD", "WORST")
"""Each response of RANKING_ITEMS starts with its true place, so a test (or a scripted annotator)
knows the order to press whatever order it is shown; in the tie item two responses are SECOND."""
RANKING_ITEMS = [
    {
        "id": "capital",
        "prompt": "What is the capital of France?",
        "responses": [
            {"text": "THIRD: Lyon, I think.", "source": "model-gamma"},
            {"text": "BEST: Paris, on the Seine.", "source": "model-alpha"},
            {"text": f"WORST: no idea {SCRIPT_PAYLOAD}", "source": "model-delta"},
            {"text": "SECOND: Paris.", "source": "model-beta"},
        ],
    },
    {
        "id": "tie",
        "prompt": "Name a primary colour.",
        "responses": [
            "SECOND: Blue.",
            "WORST: Green is one, in paint.",
            "BEST: Red, yellow and blue are the primary colours of paint.",
            "SECOND: Red.",
        ],
    },
]


def ranking_order(texts) -> list[list[int]]:
    """The true order of texts shown (0-based positions), best first, tied positions grouped."""
    places: dict[str, list[int]] = {}
    for position, text in enumerate(texts):
        places.setdefault(next(w for w in RANK_WORDS if text.startswith(w)), []).append(position)
    return [places[w] for w in RANK_WORDS if w in places]


def add_ranking_project(engine, data_dir: Path, *, overlap: int = 2) -> None:
    """Project `ranked` (k=`overlap`) holding RANKING_ITEMS, 4 responses each, imported as the `responses` format."""
    from annotation.io import import_file
    from annotation.projects import create_project
    from annotation.store import transaction

    with transaction(engine) as session:
        create_project(session, RANKING_PROJECT, overlap=overlap, guidelines="Rank the answers, best first.")
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "ranking_items.jsonl"
    path.write_text("".join(json.dumps(item) + "\n" for item in RANKING_ITEMS), encoding="utf-8")
    import_file(engine, path, RANKING_PROJECT, format="responses")
