"""Tiny reward-model bases built offline from configs, and a synthetic preference task, for the reward tests.

The task: prompts and responses are random words; the chosen response contains the word "good"
and the rejected one the word "bad", so a model that reads the response can learn the preference.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

WORDS = [f"w{i}" for i in range(40)] + ["good", "bad", "user", "assistant"]


@dataclasses.dataclass
class FakePair:
    """Same attributes as annotation.io.Pair."""

    prompt: object
    chosen: str
    rejected: str
    margin: float | None = None
    metadata: dict = dataclasses.field(default_factory=dict)
    line: int = 0


def synthetic_pairs(n: int, seed: int = 0, prompt_words: int = 6, response_words: int = 5) -> list[FakePair]:
    rng = random.Random(seed)
    fillers = WORDS[:40]
    pairs = []
    for i in range(n):
        prompt = " ".join(rng.choice(fillers) for _ in range(prompt_words))

        def response(marker: str) -> str:
            words = [rng.choice(fillers) for _ in range(response_words - 1)]
            words.insert(rng.randrange(response_words), marker)
            return " ".join(words)

        pairs.append(FakePair(prompt=prompt, chosen=response("good"), rejected=response("bad"), margin=1.0,
                              metadata={"agreement": [0.4, 0.7, 1.0][i % 3]}, line=i + 1))
    return pairs


def _word_level(specials: list[str], **named):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=named["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, **named)


def save_tiny_bert(path: Path, seed: int = 0) -> Path:
    """A 2-layer BERT encoder (no head, like all-MiniLM-L6-v2) with a [CLS]/[SEP] tokenizer and no EOS."""
    import torch
    from transformers import BertConfig, BertModel

    tokenizer = _word_level(["[PAD]", "[UNK]", "[CLS]", "[SEP]"], pad_token="[PAD]", unk_token="[UNK]",
                            cls_token="[CLS]", sep_token="[SEP]")
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_tiny_llama(path: Path, seed: int = 0) -> Path:
    """A 2-layer Llama causal LM (like SmolLM2: the score head is new) with BOS/EOS and a separate pad."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _word_level(["<pad>", "<unk>", "<s>", "</s>"], pad_token="<pad>", unk_token="<unk>",
                            bos_token="<s>", eos_token="</s>")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_untrained_rm(out: Path, bert: Path, seed: int) -> Path:
    """A reward-model run directory as reward.train writes one (model, tokenizer, reward_config.json), untrained."""
    import torch

    from reward.data import PairEncoder
    from reward.train import load_base

    torch.manual_seed(seed)
    model, tokenizer, _ = load_base(str(bert))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    PairEncoder(tokenizer, 32).save(out, base=str(bert))
    return out


def save_reward_models(root: Path) -> dict:
    """Untrained reward-model runs on a tiny BERT: a single model and a two-member ensemble (reward.score reads both)."""
    import json

    from reward.score import ENSEMBLE_FILE

    base = save_tiny_bert(root / "bert")
    single = save_untrained_rm(root / "rm", base, seed=1)
    ens = root / "ens"
    for i in range(2):
        save_untrained_rm(ens / f"member_{i}", base, seed=10 + i)
    (ens / ENSEMBLE_FILE).write_text(json.dumps({"members": ["member_0", "member_1"], "seeds": [10, 11]}))
    return {"base": base, "single": single, "ensemble": ens}
