"""Feature database build (issue 17): pass throughput against an encode-only pass over the same tokens, peak
memory at two token counts, and page latency over HTTP.

    OMP_NUM_THREADS=1 .venv/bin/python bench/features_bench.py [--store runs/stores/minilm-h] [--tokens 200000]
        [--sizes 4096,16384] [--k 32] [--steps 100]

Per size m: a TopK run (k, `--steps` steps of 1,024 tokens) is trained on the store; then, each in a fresh
process (its peak RSS is its own), an encode-only pass (the same chunked reads and `coder.encode`, nothing
kept) and `build_features` over the store's first N/2 and N tokens. The pass figure is the streaming pass
alone (tokens/s as build_features measures it); "build" adds the final step (contexts, co-firing, neighbours,
the database). Page latency: the median and max of 20 GETs of each page against the largest database.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import torch


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_encode(run: str, tokens: int, chunk: int) -> dict:
    """An encode-only pass: what the feature pass does minus all bookkeeping."""
    from sparsecode.feature_final import read_rows
    from sparsecode.features import acts_tensor, encode, resolve_store
    from sparsecode.interop import load_coder

    store, coder = resolve_store(Path(run), None), load_coder(run).eval()
    n = min(tokens, store.n)
    t0 = time.perf_counter()
    for lo in range(0, n, chunk):
        encode(coder, acts_tensor(store, read_rows(store, lo, min(lo + chunk, n), "acts")))
    return {"seconds": time.perf_counter() - t0, "tokens": n, "peak_mib": peak_mib()}


def child_build(run: str, tokens: int, chunk: int) -> dict:
    from sparsecode.feature_db import DB, FeatureDB
    from sparsecode.features import FeatureConfig, build_features

    (Path(run) / DB).unlink(missing_ok=True)
    t0 = time.perf_counter()
    build_features(run, cfg=FeatureConfig(tokens=tokens, chunk_rows=chunk, save_every=1e9))
    total = time.perf_counter() - t0
    meta = FeatureDB(run).meta
    return {"seconds": total, "pass_seconds": meta["rows"] / meta["tokens_per_s"], "tokens": meta["rows"],
            "peak_mib": peak_mib(), "db_mib": (Path(run) / DB).stat().st_size / 2**20}


def child(kind: str, run: Path, tokens: int, chunk: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", kind, "--run", str(run), "--tokens", str(tokens),
                          "--chunk", str(chunk)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def train_run(store: str, out: Path, m: int, k: int, steps: int) -> Path:
    from sparsecode.data.source import SourceConfig
    from sparsecode.train import TrainConfig, train

    train(TrainConfig(method="topk", coder={"m": m, "k": k}, source=SourceConfig(kind="store", path=store),
                      steps=steps, batch_size=1024, log_every=max(1, steps)), out)
    return out


def page_latency(run: Path, repeats: int = 20) -> dict[str, tuple[float, float]]:
    """(median, max) milliseconds of GETs of each page, served by the app on a free port."""
    from sparsecode.browse import make_server
    from sparsecode.feature_db import FeatureDB

    fdb = FeatureDB(run)
    busiest = fdb.features("count", True, limit=1)[0][0]["id"]
    typical = fdb.features("count", True, offset=fdb.meta["m"] // 2, limit=1)[0][0]["id"]
    server, sock = make_server(run, port=0)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    host, port = sock.getsockname()[:2]
    base = f"http://{host}:{port}"
    pages = {"overview": "/", "feature list": "/features", "list by max, page 50": "/features?sort=max&page=50",
             "list filtered by density": "/features?min_density=0.001&max_density=0.01",
             "token search `def`": "/features?q=def", "feature page (busiest)": f"/features/{busiest}",
             "feature page (median)": f"/features/{typical}"}
    out = {}
    try:
        for name, path in pages.items():
            times = []
            for _ in range(repeats + 1):
                t0 = time.perf_counter()
                with urllib.request.urlopen(base + path) as r:
                    r.read()
                times.append((time.perf_counter() - t0) * 1000)
            out[name] = (statistics.median(times[1:]), max(times[1:]))
    finally:
        server.should_exit = True
        thread.join(10)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", default="runs/stores/minilm-h")
    p.add_argument("--tokens", type=int, default=200_000)
    p.add_argument("--sizes", default="4096,16384")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--chunk", type=int, default=8192)
    p.add_argument("--child", choices=["encode", "build"])
    p.add_argument("--run")
    a = p.parse_args()
    if a.child:
        fn = child_encode if a.child == "encode" else child_build
        print(json.dumps(fn(a.run, a.tokens, a.chunk)))
        return
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}, {time.strftime('%Y-%m-%d %H:%M')}")
    print("| m | tokens | encode-only tok/s | pass tok/s | pass / encode | build s (pass + final) | "
          "peak MiB encode-only | peak MiB build | DB MiB |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        last = None
        for m in (int(s) for s in a.sizes.split(",")):
            run = train_run(str(Path(a.store).resolve()), Path(tmp) / f"m{m}", m, a.k, a.steps)
            for tokens in (a.tokens // 2, a.tokens):
                enc = child("encode", run, tokens, a.chunk)
                b = child("build", run, tokens, a.chunk)
                print(f"| {m} | {b['tokens']} | {enc['tokens'] / enc['seconds']:.0f} | "
                      f"{b['tokens'] / b['pass_seconds']:.0f} | {b['pass_seconds'] / enc['seconds']:.2f} | "
                      f"{b['seconds']:.1f} ({b['pass_seconds']:.1f} + {b['seconds'] - b['pass_seconds']:.1f}) | "
                      f"{enc['peak_mib']:.0f} | {b['peak_mib']:.0f} | {b['db_mib']:.1f} |", flush=True)
            last = run
        print(f"\npage latency, m = {m} ({a.tokens} tokens): median / max ms of 20 GETs")
        for name, (med, worst) in page_latency(last).items():
            print(f"| {name} | {med:.1f} | {worst:.1f} |")
        print(f"load after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
