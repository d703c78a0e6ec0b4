"""Wheels of the throughput peers for a GPU machine that reaches no registry (issue 8).

Walks the requirements of the peers as installed in .venv-bench (the versions the CPU benchmark ran),
keeps those the GPU machine lacks or has in a version that does not satisfy them, and downloads them for
its Python (3.12, manylinux x86_64) into an ignored folder to name in the device run's `carry`:

    # on the GPU machine first (seconds): python3 -m pip list --format=freeze > $OUT/have.txt
    .venv-bench/bin/python bench/gpu_wheels.py --have have.txt [--out .whl]
    # then there: python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    #             PYTHONPATH=/tmp/site:. python3 bench/throughput.py

Packages with no wheel for that platform (sdists) are built into wheels here (`pip wheel --no-deps`).
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PEERS = ["sae-lens", "eai-sparsify", "vector-quantize-pytorch"]
NEVER = {"torch", "triton", "torchvision", "torchaudio"}  # the GPU machine's own CUDA builds stay
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64", "any"]


def read_have(path: Path) -> dict[str, str]:
    """{canonical name: version} from `pip list --format=freeze` output."""
    have = {}
    for line in path.read_text().splitlines():
        if "==" in line:
            name, version = line.strip().split("==", 1)
            have[canonicalize_name(name)] = version
    return have


def needed(have: dict[str, str]) -> dict[str, str]:
    """{name: version installed here} of every package in the peers' closure that the GPU machine lacks."""
    out, todo, seen = {}, [Requirement(p) for p in PEERS], set()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen or name in NEVER or (req.marker and not req.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        if name in have and (not req.specifier or req.specifier.contains(have[name], prereleases=True)):
            continue  # present there in a version that serves (its own needs are met there too)
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            raise SystemExit(f"{req.name} is not installed in this venv: run `make bench-throughput` once") from None
        out[name] = dist.version
        todo.extend(Requirement(r) for r in dist.requires or [])
    return out


def download(pkgs: dict[str, str], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    for name, version in sorted(pkgs.items()):
        spec = f"{name}=={version}"
        got = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                              "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(out),
                              spec], capture_output=True, text=True)
        if got.returncode != 0:  # an sdist only: build a wheel here (pure-Python ones serve any platform)
            subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), spec],
                           check=True)
        print(spec, flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--have", type=Path, required=True, help="`pip list --format=freeze` of the GPU machine")
    p.add_argument("--out", type=Path, default=Path(".whl"))
    p.add_argument("--dry-run", action="store_true", help="list what would be fetched")
    args = p.parse_args()
    pkgs = needed(read_have(args.have))
    if args.dry_run:
        print("\n".join(f"{n}=={v}" for n, v in sorted(pkgs.items())))
        return
    download(pkgs, args.out)
    size = sum(f.stat().st_size for f in args.out.glob("*.whl")) / 2**20
    print(f"{len(pkgs)} packages, {size:.1f} MiB of wheels in {args.out}")


if __name__ == "__main__":
    main()
