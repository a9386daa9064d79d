"""The data layer's one exception type, and its input-validation flavour.

The CLI and the app turn any AnnotationError into a message for the user; code in this package
raises nothing else on bad input.
"""

from __future__ import annotations


class AnnotationError(Exception):
    """Something the user asked of the data layer cannot be done; the message says why."""


class InputError(AnnotationError):
    """Bad input in a file: names the file, line and field, what was wrong and what was expected."""

    def __init__(self, path: str, line: int | None, field: str | None, problem: str, expected: str | None = None):
        self.path, self.line, self.field, self.problem, self.expected = path, line, field, problem, expected
        where = str(path) + (f":{line}" if line is not None else "")
        what = f"field '{field}': {problem}" if field else problem
        tail = f"; expected {expected}" if expected else ""
        super().__init__(f"{where}: {what}{tail}")


class StoreError(AnnotationError):
    """The store's database cannot be opened: a malformed URL, a driver that is not installed, or a
    server that does not answer. `url` is the URL with any password masked (None when it is not
    shown because it could not be parsed), `reason` the one-line cause."""

    def __init__(self, url: str | None, reason: str):
        self.url, self.reason = url, reason
        super().__init__(f"cannot open the database{f' {url}' if url else ''}: {reason}")


class JobCancelled(Exception):
    """Raised inside a job when its cancellation was requested; the job runner (app.jobs) marks the job cancelled.

    It lives here, in the lowest layer, so the job handlers in reward/ and ppo/ can raise it without
    importing app/ (DESIGN.md, Layers). It is not an AnnotationError: nothing was wrong with the input.
    """
