"""Pairs for reward modelling: where they come from, how they are hashed, and how they become token ids.

A pair is anything with the attributes of `annotation.io.Pair` (prompt, chosen, rejected, margin,
metadata). Training and scoring share one encoder (`PairEncoder`) so that a reward model sees at
scoring time exactly the layout it was trained on:

- BERT-style tokenizers (a [CLS] and a [SEP] token, no EOS): ``[CLS] prompt [SEP] response [SEP]``.
- Causal tokenizers: ``<bos?> prompt response <eos>``; the EOS is left out when it is also the pad
  token, because sequence-classification heads read the last non-pad token and would skip it.

Too long examples are cut from the left of the prompt (the end of the conversation and the whole
response survive) instead of being dropped the way TRL's `max_length` filter drops them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Sequence

from reward.errors import RewardError

ENCODER_FILE = "reward_config.json"


def flatten_prompt(prompt: Any, tokenizer=None) -> str:
    """A prompt (text or chat messages) as one string: the tokenizer's chat template when it has one,
    otherwise annotation.io.pair_text (the flattening export and every other trainer use)."""
    if isinstance(prompt, str):
        return prompt
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
    try:
        from annotation.io import pair_text
    except ImportError:  # io helper's module not there yet; same flattening as its contract describes
        return "".join(f"\n\n{m['role'].capitalize()}: {m['content']}" for m in prompt)
    return pair_text(prompt)


def canonical_pair(pair) -> dict:
    return {"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected, "margin": pair.margin}


def pairs_hash(pairs: Iterable) -> str:
    """sha256 of the pairs in order, each as canonical JSON: the data snapshot a run records."""
    digest = hashlib.sha256()
    for pair in pairs:
        digest.update(json.dumps(canonical_pair(pair), sort_keys=True, ensure_ascii=False).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def pair_key(pair) -> str:
    return hashlib.sha256(json.dumps(canonical_pair(pair), sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def split_pairs(pairs: Sequence, eval_fraction: float) -> tuple[list, list]:
    """A deterministic train/held-out split by a hash of each pair's content (same pair, same side)."""
    if not 0.0 <= eval_fraction < 1.0:
        raise RewardError(f"eval fraction {eval_fraction} is out of range; expected 0 <= fraction < 1")
    train, held = [], []
    for pair in pairs:
        bucket = int(pair_key(pair)[:8], 16) / 0xFFFFFFFF
        (held if bucket < eval_fraction else train).append(pair)
    return train, held


def load_pairs(*, data: str | Path | None = None, project: str | None = None, engine=None,
               split: str | None = None, aggregation: str = "majority", margin: bool = False) -> list:
    """Pairs from a labelled preference file (any format import accepts) or from a project's aggregated
    labels (with `margin`, the project's pairs carry a margin from the aggregation confidence)."""
    if (data is None) == (project is None):
        raise RewardError("give exactly one of --data FILE or --project NAME")
    if data is not None:
        from annotation.io import read_pairs

        if not Path(data).is_file():
            raise RewardError(f"--data {data}: no such file")
        pairs = read_pairs(str(data))
        where = f"file {data}"
    else:
        from annotation.io import project_pairs

        if engine is None:
            raise RewardError("a project needs a database engine")
        pairs = project_pairs(engine, project, aggregation=aggregation, split=split,
                              margin_from="confidence" if margin else "none")
        where = f"project '{project}'" + (f" split {split}" if split else "")
    if not pairs:
        raise RewardError(f"{where} has no labelled pairs to train or evaluate on")
    return list(pairs)


def training_data(*, data: str | Path | None = None, project: str | None = None, engine=None,
                  aggregation: str = "majority", margin: bool = False, eval_fraction: float = 0.1,
                  split: str = "train") -> tuple[list, list]:
    """(train pairs, held-out pairs): a project's export split (`split` trains, the other is held
    out), or a file split by pair hash."""
    if project is not None:
        other = "test" if split == "train" else "train"
        train = load_pairs(project=project, engine=engine, split=split, aggregation=aggregation, margin=margin)
        try:
            held = load_pairs(project=project, engine=engine, split=other, aggregation=aggregation, margin=margin)
        except RewardError:
            held = []  # a small project may have nothing on the test side yet
        return train, held
    pairs = load_pairs(data=data)
    train, held = split_pairs(pairs, eval_fraction)
    if not train:
        raise RewardError(f"--data {data}: all {len(pairs)} pairs fell in the held-out split; lower the eval fraction")
    return train, held


def project_id_of(engine, project: str | None) -> int | None:
    if project is None:
        return None
    from annotation.projects import get_project
    from annotation.store import reading

    with reading(engine) as session:
        return get_project(session, project).id


@dataclasses.dataclass
class EncodeStats:
    pairs: int = 0
    prompt_truncated: int = 0
    """Pairs whose prompt lost tokens from its start to fit max_length."""
    response_truncated: int = 0
    """Pairs where even the whole prompt gone left a response too long; the response's end was cut."""
    tokens: int = 0


class PairEncoder:
    """Turns (prompt, response) into token ids under `max_length`, the same way in training and scoring."""

    def __init__(self, tokenizer, max_length: int):
        if max_length < 8:
            raise RewardError(f"max_length {max_length} is too small; expected at least 8 tokens")
        self.tokenizer = tokenizer
        self.max_length = max_length
        ensure_pad_token(tokenizer)
        cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
        self.bert_style = cls_id is not None and sep_id is not None and tokenizer.eos_token_id is None
        if self.bert_style:
            self.prefix, self.middle, self.suffix = [cls_id], [sep_id], [sep_id]
        else:
            # Whatever the tokenizer adds around an empty text (a BOS for Llama, nothing for GPT-2 BPE).
            self.prefix = list(tokenizer("", add_special_tokens=True)["input_ids"])
            self.middle = []
            eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
            self.suffix = [eos] if eos is not None and eos != pad else []

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode(self, prompt: Any, response: str) -> tuple[list[int], bool, bool]:
        """(ids, prompt_truncated, response_truncated)."""
        prompt_str = flatten_prompt(prompt, self.tokenizer)
        templated = not isinstance(prompt, str) and getattr(self.tokenizer, "chat_template", None)
        prefix = [] if templated and not self.bert_style else self.prefix
        p_ids, r_ids = self._ids(prompt_str), self._ids(response)
        budget = self.max_length - len(prefix) - len(self.middle) - len(self.suffix)
        r_trunc = len(r_ids) > budget
        if r_trunc:
            r_ids = r_ids[:budget]
        room = budget - len(r_ids)
        p_trunc = len(p_ids) > room
        if p_trunc:
            p_ids = p_ids[len(p_ids) - room:] if room > 0 else []
        return prefix + p_ids + self.middle + r_ids + self.suffix, p_trunc, r_trunc

    def config(self) -> dict:
        return {"max_length": self.max_length, "bert_style": self.bert_style}

    def save(self, directory: Path, **extra) -> None:
        (Path(directory) / ENCODER_FILE).write_text(json.dumps({**self.config(), **extra}, indent=2))


def ensure_pad_token(tokenizer) -> None:
    """Sequence-classification heads need a pad token; borrow EOS or UNK when the tokenizer has none."""
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise RewardError("the tokenizer has no pad, eos or unk token to pad batches with; add a pad token")
        tokenizer.pad_token = fallback


def build_dataset(pairs: Sequence, encoder: PairEncoder, *, use_margin: bool = False):
    """A datasets.Dataset in TRL's processed layout (chosen_ids, rejected_ids[, margin]) plus a length
    column for group-by-length sampling, and the truncation counts."""
    from datasets import Dataset

    stats = EncodeStats()
    rows: dict[str, list] = {"chosen_ids": [], "rejected_ids": [], "length": []}
    if use_margin:
        rows["margin"] = []
    for pair in pairs:
        chosen, pc, rc = encoder.encode(pair.prompt, pair.chosen)
        rejected, pr, rr = encoder.encode(pair.prompt, pair.rejected)
        stats.pairs += 1
        stats.prompt_truncated += int(pc or pr)
        stats.response_truncated += int(rc or rr)
        stats.tokens += len(chosen) + len(rejected)
        rows["chosen_ids"].append(chosen)
        rows["rejected_ids"].append(rejected)
        rows["length"].append(max(len(chosen), len(rejected)))
        if use_margin:
            rows["margin"].append(float(pair.margin) if pair.margin is not None else 0.0)
    return Dataset.from_dict(rows), stats
