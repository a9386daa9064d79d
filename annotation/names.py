"""The one check for each kind of name users give: projects, usernames, registered models.

Every writer of a name calls its check here, so SQLite and PostgreSQL refuse the same names with
the same message (PostgreSQL would otherwise raise a raw DataError for an over-long or NUL-bearing
name, and SQLite would store it). Project names also end up in file names and paths, so they keep
to a small safe character set.
"""

from __future__ import annotations

import unicodedata

from annotation.errors import AnnotationError

MAX_PROJECT_NAME_CHARS = 100
"""Half the column (projects.name is 200): the default names of trained models are built from a
project name ("ppo-<project>-job<id>") and must still fit models.name (200)."""
MAX_USERNAME_CHARS = 128
"""users.username is String(128)."""
MAX_MODEL_NAME_CHARS = 200
"""models.name is String(200)."""
PROJECT_NAME_PUNCTUATION = " -_."


def _control(name: str) -> str | None:
    """The first control, format or unassigned character of `name`, or None."""
    return next((c for c in name if unicodedata.category(c).startswith("C")), None)


def _length(what: str, name: str, limit: int) -> None:
    if len(name) > limit:
        raise AnnotationError(f"{what} is {len(name):,} characters long; expected at most {limit}")


def _printable(what: str, name: str) -> None:
    bad = _control(name)
    if bad is not None:
        raise AnnotationError(f"{what} contains the control character U+{ord(bad):04X}; expected printable text")


def check_project_name(name: str, what: str = "project name") -> str:
    """`name` stripped, or AnnotationError: 1 to MAX_PROJECT_NAME_CHARS letters, digits, spaces,
    '-', '_' and '.', not starting with '.' or '-' (so it is never a path, a hidden file or an option)."""
    name = name.strip()
    if not name:
        raise AnnotationError(f"{what} must not be empty")
    _length(what, name, MAX_PROJECT_NAME_CHARS)
    _printable(what, name)
    bad = next((c for c in name if not (c.isalnum() or c in PROJECT_NAME_PUNCTUATION)), None)
    if bad is not None:
        raise AnnotationError(f"{what} {name!r} contains {bad!r}; expected letters, digits, spaces, '-', '_' and '.'")
    if name[0] in ".-":
        raise AnnotationError(f"{what} {name!r} starts with {name[0]!r}; expected a letter, digit or '_' first")
    return name


def can_be_looked_up(name: str) -> bool:
    """Whether a lookup by `name` may go to the database: PostgreSQL refuses a NUL character in a
    query, and no stored name holds one, so such a name is answered as unknown without asking.
    (Lookups are not checked like new names: names stored before the checks still work.)"""
    return "\x00" not in name


def check_username(name: str, what: str = "username") -> str:
    """`name` stripped, or AnnotationError: 1 to MAX_USERNAME_CHARS printable characters."""
    name = name.strip()
    if not name:
        raise AnnotationError(f"{what} must not be empty")
    _length(what, name, MAX_USERNAME_CHARS)
    _printable(what, name)
    return name


def check_model_name(name: str, what: str = "--name") -> str:
    """`name` stripped, or AnnotationError: 1 to MAX_MODEL_NAME_CHARS printable characters.
    `what` says where the name came from (an option, a job param, a derived default)."""
    name = (name or "").strip()
    if not name:
        raise AnnotationError(f"{what}: a model name must not be empty")
    _length(f"{what}: the model name", name, MAX_MODEL_NAME_CHARS)
    _printable(f"{what}: the model name", name)
    return name


def registry_name(name: str | None, default: str, what: str = "--name") -> str:
    """The name a training run will be registered under: `name`, or `default` (derived from the
    output directory, project or file) when none was given; checked before any work starts."""
    return check_model_name(name or default, what if name else f"{what} (not given, so derived from the run)")
