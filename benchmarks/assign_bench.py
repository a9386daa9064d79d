"""Assignment latency: next_item + submit for 20 concurrent annotators on a 100k-item project.

    .venv/bin/python benchmarks/assign_bench.py                  # SQLite, and PostgreSQL (see below)
    .venv/bin/python benchmarks/assign_bench.py --db sqlite --items 100000 --annotators 20 --cycles 30 --think-ms 500,100,0

PostgreSQL: the URL in RLHF_BENCH_PG_URL (a server database; the bench creates and drops its own
database in it), else a throwaway server started with scripts/pg_test_server.sh on port 55460 and
stopped afterwards; `--db sqlite` skips it.

The project is mid-way: `--done` of the items (default 30%) already have their k=3 annotations from
60 earlier annotators and 2% are in progress, so the queue walks past finished and half-finished
items as it would in real use. Each of the `--annotators` threads then repeats "next_item, think,
submit, think" `--cycles` times, all sharing one engine as the Streamlit server does. Think time is
exponential with the mean given; each mean in `--think-ms` is one run. People take seconds per
item, so even 500 ms (the first run: each of 20 annotators judging an item a second) is a load far
above a real team's; 100 ms is a stress test and 0 the saturated case, where latency is mostly
queueing behind the other 19.
Printed: p50/p95 of next_item, of submit and of their sum per cycle, per database and think time,
with the target (p95 of the sum under 25 ms on SQLite) and, as the peer measured in the same run,
the obvious next-item query that counts annotations per item with GROUP BY instead of reading the
trigger-kept count through ix_items_queue.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sqlalchemy import create_engine, func, insert, literal, select, text  # noqa: E402

from annotation.assign import next_item, submit  # noqa: E402
from annotation.store import Annotation, Item, ItemFlag, Project, User, init_db, make_engine  # noqa: E402

K = 3
TARGET_P95_MS = 25.0
PG_PORT = 55460


def populate(engine, n_items: int, done: float, annotators: int) -> tuple[int, list[int]]:
    """A k=3 project of n_items items, `done` of them complete and 2% in progress; returns (project id, bench annotator ids)."""
    rng = random.Random(0)
    earlier = 60
    with engine.begin() as conn:
        conn.execute(insert(User), [{"username": f"earlier{i}", "role": "annotator", "active": True} for i in range(earlier)])
        conn.execute(insert(User), [{"username": f"bench{i}", "role": "annotator", "active": True} for i in range(annotators)])
        project_id = conn.execute(insert(Project).values(name="bench", overlap=K, choices=["a", "b", "tie", "both_bad"], criteria=[])).inserted_primary_key[0]
        ids = conn.execute(select(User.id).order_by(User.id)).scalars().all()
        earlier_ids, bench_ids = ids[:earlier], ids[earlier:]
        filler = "lorem ipsum dolor sit amet " * 12
        for start in range(0, n_items, 10_000):
            conn.execute(
                insert(Item),
                [
                    {"project_id": project_id, "prompt": f"prompt {i}: {filler}", "response_a": f"A {filler}", "response_b": f"B {filler}",
                     "content_hash": f"{i:064d}", "meta": {}}
                    for i in range(start, min(n_items, start + 10_000))
                ],
            )
        item_ids = conn.execute(select(Item.id).where(Item.project_id == project_id).order_by(Item.id)).scalars().all()
        n_done, n_partial = int(n_items * done), int(n_items * 0.02)
        rows = []
        for position, item_id in enumerate(item_ids[: n_done + n_partial]):
            wanted = K if position < n_done else rng.randint(1, K - 1)
            for annotator in rng.sample(earlier_ids, wanted):
                rows.append({"item_id": item_id, "annotator_id": annotator, "choice": rng.choice("ab"), "criteria": {}, "shown_swapped": False})
        postgres = engine.dialect.name == "postgresql"
        if postgres:
            # Bulk load without the per-row count trigger (a minute on a busy machine), then set the
            # counts in one statement, as migration 0002 does for existing rows.
            conn.execute(text("ALTER TABLE annotations DISABLE TRIGGER USER"))
        for start in range(0, len(rows), 20_000):
            conn.execute(insert(Annotation), rows[start : start + 20_000])
        if postgres:
            conn.execute(text("ALTER TABLE annotations ENABLE TRIGGER USER"))
            conn.execute(text("UPDATE items SET annotation_count = (SELECT count(*) FROM annotations WHERE annotations.item_id = items.id)"))
    if postgres:
        # A live database is vacuumed by autovacuum; a freshly bulk-loaded one is not yet.
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE"))
    else:
        with engine.connect() as conn:
            conn.exec_driver_sql("ANALYZE")
    return project_id, bench_ids


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run_annotators(engine, project_id: int, annotator_ids: list[int], cycles: int, think_ms: float) -> dict:
    timings = {"next_item": [], "submit": [], "cycle": []}
    errors: list[str] = []
    lock = threading.Lock()
    start_line = threading.Barrier(len(annotator_ids))

    def annotator(annotator_id: int) -> None:
        rng = random.Random(annotator_id)
        mine = {"next_item": [], "submit": [], "cycle": []}
        start_line.wait()
        try:
            for _ in range(cycles):
                t0 = time.perf_counter()
                task = next_item(engine, project_id, annotator_id)
                t1 = time.perf_counter()
                if task is None:
                    errors.append(f"annotator {annotator_id}: nothing left to do")
                    return
                if think_ms:
                    time.sleep(rng.expovariate(1000.0 / think_ms))
                t2 = time.perf_counter()
                submit(engine, annotator_id, task.item_id, rng.choice(["a", "b", "tie"]), strength=2, duration_ms=1000)
                t3 = time.perf_counter()
                mine["next_item"].append((t1 - t0) * 1000)
                mine["submit"].append((t3 - t2) * 1000)
                mine["cycle"].append((t1 - t0 + t3 - t2) * 1000)
                if think_ms:
                    time.sleep(rng.expovariate(1000.0 / think_ms))
        except Exception as exc:
            errors.append(f"annotator {annotator_id}: {type(exc).__name__}: {exc}")
        with lock:
            for key in timings:
                timings[key].extend(mine[key])

    threads = [threading.Thread(target=annotator, args=(a,)) for a in annotator_ids]
    wall = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - wall
    if errors:
        raise SystemExit("benchmark failed: " + "; ".join(errors[:5]))
    n = len(timings["cycle"])
    return {key: (statistics.median(v), percentile(v, 0.95)) for key, v in timings.items()} | {"cycles": n, "throughput": n / wall}


def naive_next_item_ms(engine, project_id: int, annotator_id: int, repeats: int = 5) -> float:
    """The peer: the same choice (closest to completion, then id; not mine) counting annotations per item with GROUP BY."""
    counts = (
        select(Item.id.label("id"), func.count(Annotation.id).label("n"))
        .select_from(Item)
        .outerjoin(Annotation, Annotation.item_id == Item.id)
        .where(Item.project_id == project_id, Item.gold_choice.is_(None))
        .group_by(Item.id)
        .subquery()
    )
    mine = select(Annotation.item_id).where(Annotation.annotator_id == annotator_id)
    flagged = select(ItemFlag.item_id).where(ItemFlag.annotator_id == annotator_id)
    stmt = (
        select(counts.c.id)
        .where(counts.c.n < literal(K), counts.c.id.not_in(mine), counts.c.id.not_in(flagged))
        .order_by(counts.c.n.desc(), counts.c.id)
        .limit(1)
    )
    times = []
    with engine.connect() as conn:
        for _ in range(repeats):
            t0 = time.perf_counter()
            conn.execute(stmt).first()
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def bench(name: str, url: str, args) -> dict:
    print(f"\n== {name}: populating {args.items:,} items ({args.done:.0%} complete) ...", flush=True)
    t0 = time.perf_counter()
    setup_engine = init_db(url)
    project_id, annotators = populate(setup_engine, args.items, args.done, args.annotators)
    setup_engine.dispose()
    print(f"   populated in {time.perf_counter() - t0:.1f} s", flush=True)
    engine = make_engine(url, pool_size=args.annotators + 2, max_overflow=5)
    run_annotators(engine, project_id, annotators, 2, 0)  # warm-up: statement compilation, connections
    results = {}
    for think in args.think_ms:
        result = results[think] = run_annotators(engine, project_id, annotators, args.cycles, think)
        print(f"   think {think:g} ms: {result['cycles']} cycles by {args.annotators} annotators, {result['throughput']:.0f} cycles/s")
        for key in ("next_item", "submit", "cycle"):
            p50, p95 = result[key]
            print(f"     {key:<10} p50 {p50:6.2f} ms   p95 {p95:6.2f} ms")
    naive = naive_next_item_ms(engine, project_id, annotators[0])
    single = results[args.think_ms[0]]["next_item"][0]
    print(f"   peer: GROUP BY next-item query {naive:.1f} ms per call (one caller) vs next_item p50 {single:.2f} ms "
          f"(20 callers, think {args.think_ms[0]:g} ms): {naive / single:.0f}x")
    engine.dispose()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", choices=["all", "sqlite", "postgres"], default="all", help="which databases to measure")
    parser.add_argument("--items", type=int, default=100_000, help="items in the project")
    parser.add_argument("--done", type=float, default=0.3, help="share of items already complete before the run")
    parser.add_argument("--annotators", type=int, default=20, help="concurrent annotator threads")
    parser.add_argument("--cycles", type=int, default=30, help="next_item + submit cycles per annotator and run")
    parser.add_argument("--think-ms", default="500,100,0", help="mean think times between calls, one run each (0: saturated)")
    args = parser.parse_args()
    args.think_ms = [float(t) for t in args.think_ms.split(",")]
    print(f"assign bench: {args.items:,} items, k={K}, {args.annotators} annotators, {args.cycles} cycles each per run, "
          f"think {', '.join(f'{t:g}' for t in args.think_ms)} ms; machine load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")

    results = {}
    if args.db in ("all", "sqlite"):
        with tempfile.TemporaryDirectory() as tmp:
            results["sqlite"] = bench("SQLite (file, WAL)", f"sqlite:///{tmp}/bench.db", args)
    if args.db in ("all", "postgres"):
        results["postgres"] = with_postgres(lambda url: bench("PostgreSQL", url, args))

    print("\nsummary (next_item + submit per cycle):")
    for name, runs in results.items():
        for think, result in runs.items():
            p50, p95 = result["cycle"]
            target = f"   target p95 < {TARGET_P95_MS:g} ms: {'met' if p95 < TARGET_P95_MS else 'NOT met'}" if name == "sqlite" else ""
            print(f"   {name:<9} think {think:>4g} ms   p50 {p50:6.2f} ms   p95 {p95:6.2f} ms{target}")
    print(f"   (load average now {os.getloadavg()[0]:.1f}: other work on this machine inflates these figures)")


def with_postgres(work):
    base = os.environ.get("RLHF_BENCH_PG_URL")
    started = False
    if not base:
        env = dict(os.environ, RLHF_TEST_PG_PORT=str(PG_PORT), RLHF_TEST_PG_DIR=f"/tmp/rlhf-bench-pg-{PG_PORT}")
        base = subprocess.run(["bash", str(REPO / "scripts/pg_test_server.sh"), "start"], env=env, check=True, capture_output=True, text=True).stdout.strip()
        started = True
    name = f"bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        return work(base.rsplit("/", 1)[0] + f"/{name}")
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
        if started:
            subprocess.run(["bash", str(REPO / "scripts/pg_test_server.sh"), "stop"], env=env, check=False)


if __name__ == "__main__":
    main()
