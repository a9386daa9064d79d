"""Job handlers used only by tests/test_jobs.py, enabled through RLHF_EXTRA_JOB_HANDLERS.

Each writes its process id to <run_dir>/pid so that a test can check the job process is gone.
"""

from __future__ import annotations

import os
import signal
import time

from app.jobs import JobCancelled


def _start(ctx) -> None:
    (ctx.run_dir / "pid").write_text(str(os.getpid()))


def succeed(params, ctx):
    """Three progress steps, then one model to register (params: name, steps)."""
    _start(ctx)
    steps = int(params.get("steps", 3))
    for i in range(steps):
        ctx.progress((i + 1) / steps, f"step {i + 1}/{steps}")
        ctx.log.info("did step %d", i + 1)
    out = ctx.run_dir / "model"
    out.mkdir()
    return {"register": [{"kind": "reward", "name": params.get("name", "rm-test"), "path": str(out),
                          "metrics": {"accuracy": 0.75}}], "accuracy": 0.75}


def fail(params, ctx):
    """Progress, then an error; returns nothing, so nothing could be registered anyway."""
    _start(ctx)
    ctx.progress(0.5, "half way")
    raise ValueError(params.get("why", "the handler broke on purpose"))


def fail_after_register_list(params, ctx):
    """Returns a register list whose second entry is invalid: the first must not be registered either."""
    _start(ctx)
    return {"register": [{"kind": "reward", "name": "ok", "path": str(ctx.run_dir)},
                         {"kind": "not-a-kind", "name": "bad", "path": str(ctx.run_dir)}]}


def loop(params, ctx):
    """Loops until cancelled, polling ctx.cancelled() (params: seconds, the most it loops).
    If it were allowed to finish it would register a model."""
    _start(ctx)
    deadline = time.monotonic() + float(params.get("seconds", 30))
    i = 0
    while time.monotonic() < deadline:
        if ctx.cancelled():
            raise JobCancelled("saw the cancel request")
        i += 1
        ctx.progress(min(0.99, i / 1000), f"tick {i}")
        time.sleep(0.1)
    return {"register": [{"kind": "reward", "name": "should-not-exist", "path": str(ctx.run_dir)}]}


def stubborn(params, ctx):
    """Ignores SIGTERM and never polls for cancel: only SIGKILL stops it."""
    _start(ctx)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    ctx.progress(0.1, "ignoring you")
    deadline = time.monotonic() + float(params.get("seconds", 30))
    while time.monotonic() < deadline:
        time.sleep(0.05)
    return {"register": [{"kind": "reward", "name": "should-not-exist", "path": str(ctx.run_dir)}]}
