"""Import and export throughput and memory of annotation.io on SQLite, with 100k synthetic pairs.

    .venv/bin/python benchmarks/io_bench.py            # 100k pairs (the issue's figure)
    .venv/bin/python benchmarks/io_bench.py --rows 20000

Targets (issue 2): import >= 10k pairs/s, export >= 50k pairs/s on a 2-core machine, and import
memory bounded (it streams). Peers measured in the same run, so a busy machine shows in both:
- import: SQLAlchemy ORM objects added one by one (the obvious way) on a 5k-row slice;
- export: a bare sqlite3 cursor + json.dumps of the same columns (no aggregation, no metadata).
Exports are timed best of three, the import once (it is the slow part).
Peak memory: tracemalloc over the import of the first 10% of the file and of all of it; if the
import streams, the two are about equal however long the file is.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sqlite3
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from annotation.io import export, import_file  # noqa: E402
from annotation.store import Item, Project, init_db, transaction  # noqa: E402

IMPORT_TARGET, EXPORT_TARGET = 10_000, 50_000
WORDS = "the a model answer human assistant helpful harmless honest reward policy data pair prompt kind safe clear".split()


def synthetic_file(path: Path, rows: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    text = lambda n: " ".join(rng.choices(WORDS, k=n))  # noqa: E731
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(rows):
            fh.write(json.dumps({"prompt": f"{i}: {text(30)}?", "chosen": " " + text(50), "rejected": " " + text(45)}) + "\n")
    return path


def timed(fn):
    """(result, wall seconds, CPU seconds of this process). On a machine shared with other jobs
    the CPU figure is the fairer measure of the code; both are printed."""
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - start, time.process_time() - cpu


def peak_mib(fn) -> float:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def orm_peer(url: str, path: Path, n: int) -> float:
    """rows/s inserting `n` items as ORM objects one by one (one commit at the end)."""
    engine = init_db(url)
    with open(path, encoding="utf-8") as fh:
        rows = [json.loads(next(fh)) for _ in range(n)]
    start = time.perf_counter()
    with transaction(engine) as s:
        project = Project(name="peer")
        s.add(project)
        s.flush()
        for i, r in enumerate(rows):
            s.add(Item(project_id=project.id, prompt=r["prompt"], response_a=r["chosen"], response_b=r["rejected"], content_hash=f"{i:064d}"))
            s.flush()
    return n / (time.perf_counter() - start)


def sqlite_dump_peer(db: Path, out: Path) -> float:
    conn = sqlite3.connect(db)
    start = time.perf_counter()
    n = 0
    with open(out, "w", encoding="utf-8") as fh:
        for prompt, a, b in conn.execute("SELECT prompt, response_a, response_b FROM items"):
            fh.write(json.dumps({"prompt": json.loads(prompt), "chosen": a, "rejected": b}) + "\n")
            n += 1
    conn.close()
    return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = synthetic_file(tmp / "pairs.jsonl", args.rows)
        small = tmp / "small.jsonl"
        with open(src, encoding="utf-8") as fin, open(small, "w", encoding="utf-8") as fout:
            for _ in range(max(1, args.rows // 10)):
                fout.write(next(fin))
        size_mib = src.stat().st_size / 2**20
        print(f"synthetic TRL file: {args.rows:,} pairs, {size_mib:.1f} MiB; cpu cores {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}")

        db = tmp / "bench.db"
        engine = init_db(f"sqlite:///{db}")
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        report, secs, cpu = timed(lambda: import_file(engine, src, "bench", max_field_chars=10_000))
        rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        imp_rate, imp_cpu_rate = report.items_added / secs, report.items_added / cpu
        _, resecs, _ = timed(lambda: import_file(engine, src, "bench", max_field_chars=10_000))
        peer_imp = orm_peer(f"sqlite:///{tmp / 'peer.db'}", src, min(5_000, args.rows))
        print(f"import:    {report.items_added:,} items + {report.annotations_added:,} annotations in {secs:.2f} s = "
              f"{imp_rate:,.0f} pairs/s wall, {imp_cpu_rate:,.0f} pairs/CPU-s (target {IMPORT_TARGET:,}: "
              f"{'met' if imp_rate >= IMPORT_TARGET else 'NOT met'} on wall time); "
              f"ORM one-by-one peer {peer_imp:,.0f} rows/s (x{imp_rate / peer_imp:.1f})")
        print(f"re-import: {report.lines:,} lines, nothing added, {resecs:.2f} s = {report.lines / resecs:,.0f} lines/s")

        out = tmp / "out.jsonl"
        # Best of three for the export and its peer (seconds each): the machine's load swings.
        runs = [timed(lambda: export(engine, "bench", "trl", out)) for _ in range(3)]
        ex, esecs, ecpu = min(runs, key=lambda r: r[1])
        exp_rate, exp_cpu_rate = ex.exported / esecs, ex.exported / ecpu
        pq, pqsecs, _ = min((timed(lambda: export(engine, "bench", "trl", tmp / "out.parquet")) for _ in range(3)), key=lambda r: r[1])
        peer_exp = max(sqlite_dump_peer(db, tmp / "peer.jsonl") for _ in range(3))
        print(f"export:    {ex.exported:,} pairs (JSONL, majority labels, metadata; best of 3) in {esecs:.2f} s = {exp_rate:,.0f} pairs/s "
              f"wall, {exp_cpu_rate:,.0f} pairs/CPU-s (target {EXPORT_TARGET:,}: {'met' if exp_rate >= EXPORT_TARGET else 'NOT met'} on wall time); "
              f"bare sqlite3+json peer {peer_exp:,.0f} rows/s (x{exp_rate / peer_exp:.2f})")
        print(f"export:    Parquet {pq.exported:,} pairs (best of 3) in {pqsecs:.2f} s = {pq.exported / pqsecs:,.0f} pairs/s")

        mem_small = peak_mib(lambda: import_file(init_db(f"sqlite:///{tmp / 'm1.db'}"), small, "m", max_field_chars=10_000))
        mem_full = peak_mib(lambda: import_file(init_db(f"sqlite:///{tmp / 'm2.db'}"), src, "m", max_field_chars=10_000))
        mem_export = peak_mib(lambda: export(engine, "bench", "trl", tmp / "out2.jsonl"))
        print(f"memory:    import peak (tracemalloc) {mem_small:.1f} MiB for {args.rows // 10:,} lines, {mem_full:.1f} MiB for "
              f"{args.rows:,} lines (file {size_mib:.1f} MiB); process max RSS grew {rss1 - rss0:.0f} MiB during the first import")
        print(f"memory:    export peak (tracemalloc) {mem_export:.1f} MiB for {ex.exported:,} pairs "
              f"(labels for every item are held; item rows stream)")


if __name__ == "__main__":
    main()
