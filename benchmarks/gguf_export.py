"""GGUF export: tuneforge's writer against llama.cpp's own converter (convert_hf_to_gguf.py), same checkpoint,
same type, in one run. Reports wall time and peak memory of each (and their ratio), then checks that both
files carry the same tensors (names, shapes, storage types) and the same key metadata.

    python benchmarks/gguf_export.py [--model smollm2-135m-instruct] [--type q8_0] [--repeats 2]

The converter comes from the llama-cpp-python sdist (it vendors llama.cpp), fetched with pip into
~/.cache/tuneforge/llama-cpp-src once; it runs with that sdist's own gguf-py, as llama.cpp ships it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

LLAMA_CPP_VERSION = "0.3.36"
KEYS = [
    "general.architecture", "{arch}.block_count", "{arch}.context_length", "{arch}.embedding_length",
    "{arch}.feed_forward_length", "{arch}.attention.head_count", "{arch}.attention.head_count_kv",
    "{arch}.rope.freq_base", "{arch}.attention.layer_norm_rms_epsilon", "general.file_type",
    "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.chat_template",
]


def converter() -> Path:
    cache = Path(os.environ.get("TUNEFORGE_CACHE", Path.home() / ".cache" / "tuneforge")) / "llama-cpp-src"
    script = cache / f"llama_cpp_python-{LLAMA_CPP_VERSION}" / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    if not script.exists():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={LLAMA_CPP_VERSION}", "-d", str(cache)], check=True)
        with tarfile.open(next(cache.glob("llama_cpp_python-*.tar.gz"))) as archive:
            archive.extractall(cache, filter="data")
    return script


def timed(command: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of a command, from GNU time."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        subprocess.run(["/usr/bin/time", "-f", "%e %M", "-o", report.name, *command], check=True,
                       env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seconds, kib = report.read().split()[-2:]
    return float(seconds), int(kib) / 1024


def describe(path: Path) -> tuple[dict, dict]:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    tensors = {t.name: (tuple(int(x) for x in t.shape), t.tensor_type.name) for t in reader.tensors}
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    metadata = {}
    for key in (k.format(arch=arch) for k in KEYS):
        field = reader.fields.get(key)
        if field is None:
            metadata[key] = None
        elif field.types and field.types[0].name == "STRING":
            metadata[key] = bytes(field.parts[-1]).decode()
        else:
            metadata[key] = field.parts[-1].tolist()
    return tensors, metadata


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="built-in name or HF directory")
    parser.add_argument("--type", default="q8_0", choices=["f16", "bf16", "q8_0"])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    from tuneforge.config import BaseModelSettings
    from tuneforge.models import resolve

    model_dir = Path(resolve(BaseModelSettings(source=args.model)))
    script = converter()
    work = Path(tempfile.mkdtemp(prefix="gguf-bench-"))
    ours_file, theirs_file = work / "tuneforge.gguf", work / "llama-cpp.gguf"
    ours_cmd = [sys.executable, "-c", (
        "import json, sys; from pathlib import Path; from transformers import AutoTokenizer; "
        "from tuneforge.gguf_writer import write_gguf; d = Path(sys.argv[1]); t = AutoTokenizer.from_pretrained(d); "
        "write_gguf(d, Path(sys.argv[2]), sys.argv[3], name='bench', chat_template=t.chat_template, "
        "stop_tokens=[t.eos_token])"), str(model_dir), str(ours_file), args.type]
    theirs_cmd = [sys.executable, str(script), str(model_dir), "--outfile", str(theirs_file), "--outtype", args.type]
    theirs_env = {"PYTHONPATH": str(script.parent / "gguf-py")}

    runs = {"tuneforge": [], "llama.cpp convert_hf_to_gguf.py": []}
    for _ in range(args.repeats):  # interleaved, so both see the same machine load
        runs["tuneforge"].append(timed(ours_cmd))
        runs["llama.cpp convert_hf_to_gguf.py"].append(timed(theirs_cmd, theirs_env))
    best = {name: (min(s for s, _ in r), max(m for _, m in r)) for name, r in runs.items()}

    ours_tensors, ours_meta = describe(ours_file)
    theirs_tensors, theirs_meta = describe(theirs_file)
    tensor_diff = sorted(set(ours_tensors.items()) ^ set(theirs_tensors.items()))
    meta_diff = {k: (ours_meta[k], theirs_meta[k]) for k in ours_meta if ours_meta[k] != theirs_meta[k]}

    (t_ours, m_ours), (t_theirs, m_theirs) = best["tuneforge"], best["llama.cpp convert_hf_to_gguf.py"]
    print(f"model {model_dir.name}, type {args.type}, best of {args.repeats} (time) / max (memory)\n")
    print("| exporter | wall s | peak RSS MiB | file MiB |")
    print("|---|---|---|---|")
    print(f"| tuneforge | {t_ours:.1f} | {m_ours:.0f} | {ours_file.stat().st_size / 2**20:.1f} |")
    print(f"| llama.cpp convert_hf_to_gguf.py | {t_theirs:.1f} | {m_theirs:.0f} | {theirs_file.stat().st_size / 2**20:.1f} |")
    print(f"\nratio tuneforge / llama.cpp: time {t_ours / t_theirs:.2f}x, peak memory {m_ours / m_theirs:.2f}x")
    print(f"tensors: {len(ours_tensors)} vs {len(theirs_tensors)}; differing (name, shape, type): {tensor_diff or 'none'}")
    print(f"key metadata differing: {json.dumps(meta_diff) if meta_diff else 'none'} (of {len(ours_meta)} keys)")
    if tensor_diff:
        sys.exit(1)


if __name__ == "__main__":
    main()
