"""Rebuilds the sample files in this folder from the shared HH-RLHF harmless-base slice.

    .venv/bin/python data/samples/make_samples.py [PATH/TO/dev.jsonl]

hh_items.jsonl: 300 pairs to annotate ("pairs" format), the chosen response put on side A or B
at random (seeded), the original label kept as metadata.hh_preferred for researchers (gold items,
agreement with the original raters); prompts.jsonl: 100 single-turn prompts from other lines.
Prompts are chat messages so the instruct policy can use its chat template. Deterministic.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from annotation.io.formats import scan_pairs, text_to_messages  # noqa: E402

DEFAULT_SOURCE = HERE.parent.parent.parent / "shared" / "data" / "hh-rlhf-harmless" / "dev.jsonl"
N_ITEMS, N_PROMPTS, SEED = 300, 100, 20221202
SOURCE_NAME = "Anthropic/hh-rlhf harmless-base test"


def usable(messages: list[dict], *responses: str) -> bool:
    return all(m["content"] for m in messages) and all(r.strip() for r in responses)


def main(source: Path) -> None:
    pairs, _ = scan_pairs(source, format="hh")
    rng = random.Random(SEED)
    order = list(range(len(pairs)))
    rng.shuffle(order)
    items, prompts = [], []
    for index in order:
        pair = pairs[index]
        messages = text_to_messages(pair.prompt)
        chosen, rejected = pair.chosen.strip(), pair.rejected.strip()
        if len(items) < N_ITEMS:
            if not usable(messages, chosen, rejected):
                continue
            chosen_first = rng.random() < 0.5
            a, b = (chosen, rejected) if chosen_first else (rejected, chosen)
            items.append({
                "id": f"hh-harmless-test-{pair.line}", "prompt": messages, "response_a": a, "response_b": b,
                "metadata": {"source": SOURCE_NAME, "source_line": pair.line, "hh_preferred": "a" if chosen_first else "b"},
            })
        elif len(prompts) < N_PROMPTS and len(messages) == 1 and usable(messages):
            prompts.append({"id": f"hh-harmless-test-{pair.line}", "prompt": messages,
                            "metadata": {"source": SOURCE_NAME, "source_line": pair.line}})
    for name, rows in (("hh_items.jsonl", sorted(items, key=lambda r: r["metadata"]["source_line"])),
                       ("prompts.jsonl", sorted(prompts, key=lambda r: r["metadata"]["source_line"]))):
        with open(HERE / name, "w", encoding="utf-8", newline="\n") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"{name}: {len(rows)} lines")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_SOURCE)
