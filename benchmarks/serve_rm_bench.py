"""Reward-server benchmark: `rlhf serve-rm` over HTTP against in-process `scorer.score`, same pairs, same run.

    .venv/bin/python benchmarks/serve_rm_bench.py [--model RUN_DIR] [--pairs 128] [--batch-sizes 1,8,64]
        [--clients 8] [--repeat 2] [--data ../shared/data/hh-rlhf-harmless/dev.jsonl] [--json]

The model: --model (a train-rm run or ensemble directory), or else all-MiniLM-L6-v2 (default:
settings.model_dir/all-MiniLM-L6-v2, i.e. after `rlhf models fetch`) with an untrained score head,
saved the way train-rm saves a run (max_length 256, train-rm's default); the head's weights do not
change the speed. The pairs: the first --pairs lines of the HH-RLHF harmless dev file, prompt and
chosen response.

- in-process: `scorer.score(prompts, responses, batch_size=B)` on consecutive chunks of B pairs.
- http: the same chunks, each one POST /get_reward in OpenRLHF's shape (query = prompt + response,
  prompts, labels), one request at a time, a new connection each (as OpenRLHF's requests.post does),
  to `rlhf serve-rm --batch-size 64` running in its own process.
- http, --clients concurrent clients sending one pair per request (OpenRLHF's vLLM executor sends
  one per sample): the server scores the requests waiting together; compared with in-process batch 1.

Each arm runs --repeat times and the fastest pass counts (the machine may be shared). Prints
requests/s and pairs/s for each, the http/in-process ratio, and the largest difference
between the rewards from the two paths (it should be ~1e-6).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEFAULT_DATA = REPO.parent / "shared" / "data" / "hh-rlhf-harmless" / "dev.jsonl"
SERVER_BATCH = 64


def untrained_minilm(base: str, out: Path) -> Path:
    from reward.data import PairEncoder
    from reward.train import TrainParams, load_base

    model, tokenizer, _ = load_base(base)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    PairEncoder(tokenizer, TrainParams().max_length).save(out, base=base)
    return out


def load_bench_pairs(path: Path, n: int) -> tuple[list[str], list[str]]:
    from annotation.io import pair_text
    from reward.data import load_pairs

    pairs = load_pairs(data=path)[:n]
    return [p.prompt if isinstance(p.prompt, str) else pair_text(p.prompt) for p in pairs], [p.chosen for p in pairs]


def post(url: str, prompts: list[str], responses: list[str]) -> list[float]:
    payload = {"query": [p + r for p, r in zip(prompts, responses)], "prompts": prompts, "labels": [""] * len(prompts)}
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as resp:
        return json.loads(resp.read())["rewards"]


def start_server(model: Path) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "app.cli", "serve-rm", "--model", str(model), "--port", "0", "--json",
           "--batch-size", str(SERVER_BATCH), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line:
        raise SystemExit(f"rlhf serve-rm did not start (exit code {proc.wait()})")
    return proc, json.loads(line)["get_reward"]


def chunks(n: int, size: int):
    return [(i, min(n, i + size)) for i in range(0, n, size)]


def time_in_process(scorer, prompts, responses, b: int) -> tuple[float, list[float]]:
    out: list[float] = []
    started = time.perf_counter()
    for i, j in chunks(len(prompts), b):
        out += scorer.score(prompts[i:j], responses[i:j], batch_size=b).tolist()
    return time.perf_counter() - started, out


def time_http(url, prompts, responses, b: int) -> tuple[float, list[float]]:
    out: list[float] = []
    started = time.perf_counter()
    for i, j in chunks(len(prompts), b):
        out += post(url, prompts[i:j], responses[i:j])
    return time.perf_counter() - started, out


def time_http_concurrent(url, prompts, responses, clients: int) -> tuple[float, list[float]]:
    out: list[float | None] = [None] * len(prompts)
    next_index = iter(range(len(prompts)))
    lock = threading.Lock()

    def client():
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            out[i] = post(url, [prompts[i]], [responses[i]])[0]

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - started, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="A train-rm run directory; default: untrained MiniLM head.")
    parser.add_argument("--base", help="Base for the untrained model; default settings.model_dir/all-MiniLM-L6-v2.")
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--pairs", type=int, default=128, help="First N pairs of --data.")
    parser.add_argument("--batch-sizes", default="1,8,64", help="Pairs per request (and per in-process call).")
    parser.add_argument("--clients", type=int, default=8, help="Concurrent single-pair clients; 0 skips that row.")
    parser.add_argument("--repeat", type=int, default=2, help="Passes per arm; the fastest counts.")
    parser.add_argument("--json", action="store_true", help="Print one JSON object.")
    args = parser.parse_args()

    import torch

    from reward.score import load_reward_model

    prompts, responses = load_bench_pairs(Path(args.data), args.pairs)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else None
        if model is None:
            from app.settings import get_settings

            base = args.base or str(Path(get_settings().model_dir) / "all-MiniLM-L6-v2")
            model = untrained_minilm(base, Path(tmp) / "rm")
        scorer = load_reward_model(model)
        proc, url = start_server(model)
        try:
            scorer.score(prompts[:8], responses[:8])  # warm both paths up
            post(url, prompts[:8], responses[:8])
            rows, max_diff = [], 0.0

            def best(fn, *a):  # the fastest of --repeat passes: the others were disturbed by something else
                runs = [fn(*a) for _ in range(args.repeat)]
                return min(t for t, _ in runs), runs[0][1]

            for b in sizes:
                t_in, r_in = best(time_in_process, scorer, prompts, responses, b)
                t_http, r_http = best(time_http, url, prompts, responses, b)
                max_diff = max(max_diff, max(abs(x - y) for x, y in zip(r_in, r_http)))
                rows.append({"arm": f"batch {b}", "requests": len(chunks(len(prompts), b)), "http_s": t_http,
                             "in_process_s": t_in})
                if b == 1:
                    t_in_1, r_in_1 = t_in, r_in
            if args.clients:
                if 1 not in sizes:
                    t_in_1, r_in_1 = best(time_in_process, scorer, prompts, responses, 1)
                t_c, r_c = best(time_http_concurrent, url, prompts, responses, args.clients)
                max_diff = max(max_diff, max(abs(x - y) for x, y in zip(r_in_1, r_c)))
                rows.append({"arm": f"batch 1 x {args.clients} clients", "requests": len(prompts), "http_s": t_c,
                             "in_process_s": t_in_1})
        finally:
            proc.terminate()
            proc.wait(30)

    n = len(prompts)
    for row in rows:
        row.update(http_requests_per_s=row["requests"] / row["http_s"], http_pairs_per_s=n / row["http_s"],
                   in_process_pairs_per_s=n / row["in_process_s"], ratio=row["in_process_s"] / row["http_s"])
    report = {"model": str(args.model or "untrained MiniLM head"), "pairs": n, "torch_threads": torch.get_num_threads(),
              "server_batch_size": SERVER_BATCH, "max_abs_reward_diff": max_diff, "rows": rows}
    if args.json:
        print(json.dumps(report, default=float))
        return
    print(f"{n} HH-RLHF pairs, {report['model']}, {report['torch_threads']} torch threads, "
          f"server --batch-size {SERVER_BATCH}; largest |http - in-process| reward difference {max_diff:.2e}")
    print(f"{'arm':<22} {'requests':>8} {'http req/s':>11} {'http pairs/s':>13} {'in-proc pairs/s':>16} {'http/in-proc':>13}")
    for r in rows:
        print(f"{r['arm']:<22} {r['requests']:>8} {r['http_requests_per_s']:>11.1f} {r['http_pairs_per_s']:>13.1f} "
              f"{r['in_process_pairs_per_s']:>16.1f} {r['ratio']:>13.2f}")


if __name__ == "__main__":
    main()
