"""InfoMEC of latentquant (QLAE) vs a plain (linear) autoencoder vs FSQ on a synthetic factor dataset.

Factors (all uniform, independent): position x, position y, scale, hue (8 ordinal values each) and shape
(4 categories). Each ordinal factor bends along its own random 2-d plane (v·u + 0.5·v²·w), each shape is
a random vector; x = the sum plus Gaussian noise, then a fixed random rotation into d dims.

    .venv/bin/python bench/latent_quant.py [--rows 20000] [--steps 1500] [--d 32] [--seeds 0 1]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch import nn

from sparsecode.data.source import TensorSource
from sparsecode.diagnose.infomec import infomec
from sparsecode.train import TrainConfig, train

ORDINAL, SHAPES = 4, 4


def factor_data(rows: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([rows, d] vectors, [rows, 5] factor values)."""
    g = torch.Generator().manual_seed(seed)
    factors = torch.cat([torch.randint(8, (rows, ORDINAL), generator=g),
                         torch.randint(SHAPES, (rows, 1), generator=g)], 1)
    planes = torch.linalg.qr(torch.randn(d, 2 * ORDINAL, generator=g))[0].t()  # orthonormal u_i, w_i
    v = factors[:, :ORDINAL].float() / 3.5 - 1  # in [−1, 1]
    x = v @ planes[0::2] + 0.5 * v.pow(2) @ planes[1::2]
    x = x + torch.randn(SHAPES, d, generator=g)[factors[:, ORDINAL]] * 0.7
    return x + 0.05 * torch.randn(rows, d, generator=g), factors


class LinearAE(nn.Module):
    def __init__(self, d: int, latents: int):
        super().__init__()
        self.enc, self.dec = nn.Linear(d, latents), nn.Linear(latents, d)


def train_ae(x: torch.Tensor, latents: int, steps: int, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    ae = LinearAE(x.shape[1], latents)
    opt = torch.optim.Adam(ae.parameters(), lr=3e-3)
    for _ in range(steps):
        batch = x[torch.randint(x.shape[0], (512,))]
        loss = (ae.dec(ae.enc(batch)) - batch).pow(2).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return ae.enc(x)


def train_coder(method: str, coder: dict, x: torch.Tensor, steps: int, seed: int) -> torch.Tensor:
    cfg = TrainConfig(method=method, coder=coder, steps=steps, batch_size=512, lr=3e-3, seed=seed,
                      log_every=steps, ckpt_every=10**9, init_rows=4096)
    with tempfile.TemporaryDirectory() as d:
        trained = train(cfg, Path(d), source=TensorSource(x, seed))
    with torch.no_grad():
        code = trained.encode(x)
        return trained.level_index(code.values)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=20000)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--d", type=int, default=32)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = p.parse_args()
    latents = 2 * (ORDINAL + 1)  # twice the number of factors, as the QLAE authors
    print("| model | seed | InfoM | InfoE | InfoC |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for seed in args.seeds:
        x, factors = factor_data(args.rows, args.d, seed)
        runs = {
            "latentquant (QLAE)": (train_coder("latentquant", {"m": latents, "values": 10}, x, args.steps, seed), True),
            "latentquant, no weight decay": (
                train_coder("latentquant", {"m": latents, "values": 10, "weight_decay": 0.0}, x, args.steps, seed),
                True),
            "fsq (10 dims × 5 levels)": (train_coder("fsq", {"levels": [5] * latents}, x, args.steps, seed), True),
            "plain linear AE": (train_ae(x, latents, args.steps, seed), False),
        }
        for name, (z, discrete) in runs.items():
            r = infomec(factors, z, discrete)
            print(f"| {name} | {seed} | {r['infom']:.3f} | {r['infoe']:.3f} | {r['infoc']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
