"""Batched scoring of (prompt, response) pairs by a trained reward model or an ensemble of them.

    scorer = load_reward_model("runs/rm-1")            # a run dir, an ensemble dir, or a RegisteredModel
    rewards = scorer.score(prompts, responses)          # torch.Tensor, one float per pair
    mean, std = scorer.score_with_spread(prompts, responses)   # std is 0 for a single model

Used by PPO (which decodes its responses to text: the reward model re-tokenizes with its own
tokenizer) and by the app. Pairs are sorted by length before batching so that padding stays small.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from reward.data import ENCODER_FILE, PairEncoder
from reward.errors import RewardError

ENSEMBLE_FILE = "ensemble.json"


class RewardScorer:
    """One reward model loaded for inference (fp32 on CPU, eval mode, no gradients)."""

    def __init__(self, path: str | Path, device: str | None = None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = Path(path)
        cfg_file = path / ENCODER_FILE
        if not cfg_file.is_file():
            raise RewardError(f"{path}: not a reward model run directory (no {ENCODER_FILE}); train one with `rlhf train-rm`")
        self.path = path
        self.config = json.loads(cfg_file.read_text())
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.encoder = PairEncoder(self.tokenizer, int(self.config["max_length"]))
        self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).to(self.device).eval()
        self.model.config.pad_token_id = self.tokenizer.pad_token_id

    @torch.inference_mode()
    def score(self, prompts: Sequence[Any], responses: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        if len(prompts) != len(responses):
            raise RewardError(f"{len(prompts)} prompts but {len(responses)} responses; expected one response per prompt")
        encoded = [self.encoder.encode(p, r)[0] for p, r in zip(prompts, responses)]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        out = torch.empty(len(encoded), dtype=torch.float32)
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            width = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, : len(encoded[i])] = torch.tensor(encoded[i])
                mask[row, : len(encoded[i])] = 1
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            out[torch.tensor(idx)] = logits[:, 0].float().cpu()
        return out

    def score_with_spread(self, prompts, responses, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.score(prompts, responses, batch_size)
        return scores, torch.zeros_like(scores)


class EnsembleScorer:
    """Several reward models trained on bootstrap resamples: the mean is the reward, the spread its doubt."""

    def __init__(self, path: str | Path, device: str | None = None):
        path = Path(path)
        manifest = json.loads((path / ENSEMBLE_FILE).read_text())
        self.path = path
        self.manifest = manifest
        self.members = [RewardScorer(path / m, device) for m in manifest["members"]]
        if not self.members:
            raise RewardError(f"{path}/{ENSEMBLE_FILE} lists no members")

    def member_scores(self, prompts, responses, batch_size: int = 32) -> torch.Tensor:
        return torch.stack([m.score(prompts, responses, batch_size) for m in self.members])

    def score_with_spread(self, prompts, responses, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        stacked = self.member_scores(prompts, responses, batch_size)
        return stacked.mean(0), stacked.std(0, unbiased=False)

    def score(self, prompts, responses, batch_size: int = 32) -> torch.Tensor:
        return self.score_with_spread(prompts, responses, batch_size)[0]


def is_ensemble(path: str | Path) -> bool:
    return (Path(path) / ENSEMBLE_FILE).is_file()


def load_reward_model(path_or_registered, device: str | None = None) -> RewardScorer | EnsembleScorer:
    """A scorer for a run directory, an ensemble directory, or a registered model row (anything with .path)."""
    path = getattr(path_or_registered, "path", path_or_registered)
    path = Path(os.fspath(path))
    if not path.is_dir():
        raise RewardError(f"reward model {path}: no such directory")
    return EnsembleScorer(path, device) if is_ensemble(path) else RewardScorer(path, device)
