"""S3 transfer throughput: tuneforge's `storage.publish` and `storage.fetch` against the plain boto3 calls a user
would write, on the same model-like folder and the same real SeaweedFS S3 server, in one run.

    python benchmarks/s3_transfer.py [--size-mb 500] [--repeats 3]

The folder: two safetensors-like files of random bytes (80% and 20% of --size-mb) and small JSON files, with the
manifest `storage.write_manifest` writes. The plain side: `boto3.client("s3").upload_file` / `download_file` of
every file (the manifest too) with a default `TransferConfig()`. tuneforge's side publishes (manifest last) and
fetches (sha256 of every file checked against the manifest, the folder renamed into place when all match).
After one untimed upload (a fresh server grows its volumes on its first writes), sides alternate, each to a fresh
prefix; the table has the median of the repeats, in MiB/s, and the process's peak RSS during each side (VmHWM,
reset before each transfer).

The server is SeaweedFS started as tuneforge's services and tests start it (`tuneforge.services`), on free local
ports; it is stopped and every temporary file removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import boto3
from boto3.s3.transfer import TransferConfig

from tuneforge import services, storage

BUCKET = "bench"


def model_folder(folder: Path, size_mb: int) -> Path:
    folder.mkdir()
    for name, share in (("model-00001-of-00002.safetensors", 0.8), ("model-00002-of-00002.safetensors", 0.2)):
        with open(folder / name, "wb") as f:
            for _ in range(round(size_mb * share)):
                f.write(os.urandom(2**20))
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 576}))
    (folder / "generation_config.json").write_text(json.dumps({"max_new_tokens": 256}))
    (folder / "tokenizer.json").write_text(json.dumps({"vocab": {f"t{i}": i for i in range(20000)}}))
    storage.write_manifest(folder, "merge", {"base_model": "benchmark"}, {})
    return folder


def peak_rss_reset() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux >= 4.0)


def peak_rss_mib() -> float:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def timed(transfer) -> tuple[float, float]:
    peak_rss_reset()
    start = time.perf_counter()
    transfer()
    return time.perf_counter() - start, peak_rss_mib()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="s3bench-") as tmp:
        tmp = Path(tmp)
        folder = model_folder(tmp / "model", args.size_mb)
        files = [p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*")) if p.is_file()]
        mib = sum((folder / f).stat().st_size for f in files) / 2**20

        (tmp / "weed").mkdir()
        key, secret = "bench", "bench-" + os.urandom(12).hex()
        services.write_s3_identity(tmp / "weed" / "s3.json", key, secret)
        weed, url = services.start_seaweedfs(tmp / "weed", tmp / "weed" / "s3.json", services.seaweedfs_ports())
        try:
            os.environ.update(AWS_ACCESS_KEY_ID=key, AWS_SECRET_ACCESS_KEY=secret, AWS_ENDPOINT_URL=url,
                              AWS_DEFAULT_REGION="us-east-1")
            client = boto3.client("s3")  # what a user writes; endpoint and credentials from the environment
            client.create_bucket(Bucket=BUCKET)

            def raw_upload(prefix: str) -> None:
                for f in files:
                    client.upload_file(str(folder / f), BUCKET, f"{prefix}/{f}", Config=TransferConfig())

            def raw_download(prefix: str, target: Path) -> None:
                for f in files:
                    (target / f).parent.mkdir(parents=True, exist_ok=True)
                    client.download_file(BUCKET, f"{prefix}/{f}", str(target / f), Config=TransferConfig())

            sides = {
                "publish": {"tuneforge": lambda i: storage.publish(folder, f"s3://{BUCKET}/tf-{i}"),
                            "raw": lambda i: raw_upload(f"raw-{i}")},
                "fetch": {"tuneforge": lambda i: storage.fetch(f"s3://{BUCKET}/tf-{i}", tmp / f"back-tf-{i}"),
                          "raw": lambda i: raw_download(f"raw-{i}", tmp / f"back-raw-{i}")},
            }
            raw_upload("warm-up")  # untimed: a fresh server grows its volumes on the first writes
            results = {(op, side): [] for op in sides for side in ("tuneforge", "raw")}
            for i in range(args.repeats):
                order = ("tuneforge", "raw") if i % 2 == 0 else ("raw", "tuneforge")
                for op in sides:
                    for side in order:
                        seconds, rss = timed(lambda op=op, side=side, i=i: sides[op][side](i))
                        results[op, side].append((seconds, rss))
                        print(f"repeat {i + 1} {op:7} {side:9} {mib / seconds:7.1f} MiB/s  peak RSS {rss:5.0f} MiB",
                              flush=True)
                for back in tmp.glob("back-*"):
                    shutil.rmtree(back)
        finally:
            os.killpg(weed.pid, signal.SIGTERM)
            try:
                weed.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(weed.pid, signal.SIGKILL)
                weed.wait()

    print(f"\n{mib:.0f} MiB in {len(files)} files, SeaweedFS on 127.0.0.1, median of {args.repeats}\n")
    print("| operation | tuneforge MiB/s | raw boto3 MiB/s | tuneforge / raw | peak RSS tuneforge / raw (MiB) |")
    print("|---|---|---|---|---|")
    for op in sides:
        tf, raw = (statistics.median(mib / s for s, _ in results[op, side]) for side in ("tuneforge", "raw"))
        rss = [max(r for _, r in results[op, side]) for side in ("tuneforge", "raw")]
        print(f"| {op} | {tf:.1f} | {raw:.1f} | {tf / raw:.0%} | {rss[0]:.0f} / {rss[1]:.0f} |")


if __name__ == "__main__":
    main()
