"""What defines a run (`TrainConfig`, saved as its config.json), the trainer's defaults per method, and reading and
comparing saved configs.

Three options left at None take the method's own default (`Coder.train_defaults`), else `TRAIN_DEFAULTS`; the
trainer resolves them before it writes config.json, so a saved run names the schedule it trained with.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from . import checkpoint as ck
from .coder import get_method
from .config import check, from_dict, non_negative, positive, to_dict
from .data.source import SourceConfig
from .errors import SparsecodeError

CONFIG = "config.json"
# options a method may set for itself (Coder.train_defaults); these values otherwise
TRAIN_DEFAULTS: dict[str, Any] = {"warmup_steps": 10, "decay": "cosine", "grad_norm": "clip"}


@dataclass
class TrainConfig:
    """Everything that defines a run; saved as the run's config.json."""

    method: str = "topk"
    coder: dict[str, Any] = field(default_factory=dict)  # the method's options (its config dataclass)
    source: SourceConfig | None = None  # None: an in-memory source handed to the Trainer ("memory")
    steps: int = 1000
    batch_size: int = 1024
    lr: float = 1e-3
    warmup_steps: int | None = None  # linear warm-up steps; None: the method's, else 10 (50 cost short runs FVU)
    decay: str | None = None  # cosine | linear | constant, from lr down to lr * min_lr_ratio; None: the method's
    min_lr_ratio: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    grad_norm: str | None = None  # clip: at grad_clip | unit: every step's gradient scaled to norm 1; None: method's
    grad_clip: float = 1.0  # max global gradient norm (grad_norm clip); 0 = off
    init_rows: int | None = None  # rows handed to init_from_data (k-means, b_dec); None: 16,384 or the method's
    seed: int = 0
    log_every: int = 50
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    device: str = "auto"
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16 (autocast of the forward)
    deterministic: bool = False  # deterministic kernels (CUDA resume bit-exact; slower); CPU runs always are

    def validate(self) -> None:
        get_method(self.method)
        positive(self, "batch_size")
        non_negative(self, "steps")  # 0: an imported run, never trained here (the Trainer needs steps > 0)
        check(self.lr > 0 and math.isfinite(self.lr), f"lr must be positive, got {self.lr}")
        if self.warmup_steps is not None:
            non_negative(self, "warmup_steps")
        check(self.decay in (None, "cosine", "linear", "constant"),
              f"decay must be cosine, linear or constant, got {self.decay!r}")
        check(self.grad_norm in (None, "clip", "unit"), f"grad_norm must be clip or unit, got {self.grad_norm!r}")
        check(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        non_negative(self, "grad_clip")
        if self.init_rows is not None:
            non_negative(self, "init_rows")
        check(self.log_every > 0 and self.ckpt_every > 0, "log_every and ckpt_every must be positive")
        check(self.device in ("auto", "cpu") or self.device.startswith("cuda"),
              f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        check(self.precision in ("auto", "fp32", "bf16"),
              f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.source is not None:
            self.source.validate()

    def resolved(self) -> TrainConfig:
        """A copy whose options left at None hold the method's (`Coder.train_defaults`), else TRAIN_DEFAULTS."""
        own = {**TRAIN_DEFAULTS, **get_method(self.method).train_defaults}
        return replace(self, **{k: v for k, v in own.items() if getattr(self, k) is None})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        if isinstance(data, dict) and isinstance(data.get("source"), dict):
            data = {**data, "source": from_dict(SourceConfig, data["source"], "source")}
        if isinstance(data, dict):  # a config saved before grad_norm existed: its run clipped
            data = {"grad_norm": "clip", **data}
        return from_dict(cls, data, "train")

    def lr_factor(self, step: int) -> float:
        """Multiplier of lr at `step`: linear warm-up, then the chosen decay."""
        if self.warmup_steps is None or self.decay is None:
            return self.resolved().lr_factor(step)
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.decay == "constant":
            return 1.0
        t = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        shape = 0.5 * (1 + math.cos(math.pi * min(t, 1.0))) if self.decay == "cosine" else 1 - min(t, 1.0)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * shape


def load_config(run: Path) -> TrainConfig:
    run = Path(run)
    if not run.is_dir():
        raise SparsecodeError(f"run directory not found: {run}")
    try:
        return TrainConfig.from_dict(ck.read_json(run / CONFIG))
    except SparsecodeError as e:
        raise SparsecodeError(f"{run / CONFIG}: {e}") from None


def differing_fields(a: TrainConfig, b: TrainConfig, ignore: tuple[str, ...] = ()) -> list[str]:
    """Names of the options (as saved in JSON; coder options as coder.NAME) where two configs differ."""
    da, db = (json.loads(json.dumps(to_dict(c))) for c in (a, b))
    out = []
    for key in da:
        if key in ignore or da[key] == db[key]:
            continue
        if isinstance(da[key], dict) and isinstance(db[key], dict):
            out += [f"{key}.{k}" for k in sorted(set(da[key]) | set(db[key])) if da[key].get(k) != db[key].get(k)]
        else:
            out.append(key)
    return out
