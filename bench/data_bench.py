"""Data-path throughput: MiniLM harvest (tokens/s) and store reader (GB/s, batches/s) from page cache.

    .venv/bin/python bench/data_bench.py [--tokens 40000] [--rows 524288] [--batches 200]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from sparsecode.data.harvest import HarvestConfig, harvest
from sparsecode.data.store import Store, StoreOptions, StoreSource, StoreWriter


def bench_harvest(root: Path, tokens: int, hook: str, device: str) -> float:
    cfg = HarvestConfig(out=str(root / f"h-{hook}"), model="minilm", hook=hook, corpus="stdlib", tokens=tokens,
                        context=128, dtype="fp16", device=device)
    harvest(HarvestConfig(**{**cfg.__dict__, "out": str(root / f"warm-{hook}"), "tokens": 2000}))
    t0 = time.perf_counter()
    harvest(cfg)
    return tokens / (time.perf_counter() - t0)


def bench_reader(root: Path, rows: int, d: int, batch: int, batches: int) -> tuple[float, float]:
    w = StoreWriter(root / "r", {"model": "bench", "dtype": "fp16", "file_format": "safetensors",
                                 "tokens_requested": rows}, 131072)
    g = torch.Generator().manual_seed(0)
    for start in range(0, rows, 65536):
        n = min(65536, rows - start)
        z = torch.zeros(n, dtype=torch.long)
        w.add({"acts": torch.randn(n, d, generator=g), "tokens": z, "doc": z, "pos": z}, {"cursor": [0, 0], "row": 0})
    w.finish()
    src = StoreSource(Store(root / "r"), range(rows), 0, StoreOptions())
    for _ in range(-(-rows // batch)):  # one epoch: checksums and page cache
        src.next_batch(batch)
    t0 = time.perf_counter()
    for _ in range(batches):
        src.next_batch(batch)
    dt = time.perf_counter() - t0
    return batches * batch * d * 2 / dt / 1e9, batches / dt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokens", type=int, default=40000)
    p.add_argument("--rows", type=int, default=524288)
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--device", default="auto")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        h3 = bench_harvest(root, a.tokens, "encoder.layer.3", a.device)
        h5 = bench_harvest(root, a.tokens, "encoder.layer.5", a.device)
        gbs, bps = bench_reader(root, a.rows, 384, 4096, a.batches)
    dev = "cuda" if a.device == "auto" and torch.cuda.is_available() else a.device.replace("auto", "cpu")
    print(f"command: {' '.join([os.path.relpath(sys.executable), *sys.argv])}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, device {dev}\n")
    print("| measure | setting | result |")
    print("|---|---|---|")
    print(f"| harvest MiniLM-L6 | encoder.layer.3 output, context 128, batch 32, fp16 store, {a.tokens} tokens "
          f"| {h3:,.0f} tokens/s |")
    print(f"| harvest MiniLM-L6 | encoder.layer.5 output, context 128, batch 32, fp16 store, {a.tokens} tokens "
          f"| {h5:,.0f} tokens/s |")
    print(f"| store reader | batch 4096 x d=384 fp16 -> fp32, {a.rows} rows, shuffle buffer 262144, page cache "
          f"| {gbs:.2f} GB/s, {bps:.1f} batches/s |")


if __name__ == "__main__":
    main()
