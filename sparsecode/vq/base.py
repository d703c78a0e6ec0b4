"""What the codebooks with a computed codebook share (simvq, frozen_projector, vqbridge).

The codebook C = f(θ) is a function of trainable parameters; each row picks its nearest code (L2 or
cosine, chunked search), weight 1. The codebook loss ‖sg(x) − q‖² trains θ (so every code moves, not
only the chosen ones), the commitment loss β‖x − sg(q)‖² trains whatever feeds the quantizer, and the
straight-through estimator passes gradients from q to x. Both losses are on the FVU scale. Each code also
has a frozen offset (zero at first): restarts (our addition, `restart_after` > 0) set a long-unused code's
offset so that it splits a busy code, as `vq` does (`split_targets`); `restart_after=0` is the papers' method.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..code import Code, decode
from ..coder import Coder, Output, dead_window
from ..config import check, non_negative
from ..metrics import fvu
from .kmeans import kmeans
from .search import SearchConfig, nearest


def identity_linear(d: int) -> nn.Linear:
    """A d×d linear layer (with bias) that starts as the identity map."""
    lin = nn.Linear(d, d)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(d))
        lin.bias.zero_()
    return lin


@torch.no_grad()
def covariance_root(xc: Tensor) -> Tensor:
    """[d, d] symmetric square root of the covariance of centred rows xc (eigenvalues clamped at 0)."""
    cov = (xc.double().t() @ xc.double()) / max(xc.shape[0] - 1, 1)
    evals, evecs = torch.linalg.eigh(cov)
    return ((evecs * evals.clamp_min(0).sqrt()) @ evecs.t()).to(xc.dtype)


RESTART_WINDOW_PARTS = 4  # a codebook's dead window (dead_tokens=None): a quarter of the run (`restart_age`)
KMEANS_ROWS_PER_CODE = 8  # init rows per code for a k-means start (one on 2 per code fits new rows poorly)


@dataclass
class QuantizerConfig(SearchConfig):
    """Nearest-code lookup with a commitment loss: these methods' options and `vq`'s."""

    metric: str = "l2"  # l2 | cosine
    beta: float = 0.25  # commitment weight
    restart_after: float = 16.0  # restart a code unused for restart_after·m rows (expected hits); 0 = never
    split_step: float = 0.05  # a restarted code lands this share of the way from a busy code to a row it holds

    def validate(self) -> None:
        super().validate()
        check(self.metric in ("l2", "cosine"), f"metric must be 'l2' or 'cosine', got {self.metric!r}")
        non_negative(self, "beta", "restart_after")
        check(0 < self.split_step <= 1, f"split_step must be in (0, 1], got {self.split_step}")


@dataclass
class OffsetConfig(QuantizerConfig):
    """Options of the quantizers whose codebook is computed (a shared map) plus a per-code offset."""

    # each step, a used code's offset moves this share of the way to the mean of its batch rows (online k-means on
    # top of the shared map, which still learns by gradient); 0: offsets stay where the start and restarts put
    # them, and codes move only with the shared map (the papers' reading)
    refine: float = 0.03

    def validate(self) -> None:
        super().validate()
        check(0 <= self.refine < 1, f"refine must be in [0, 1), got {self.refine}")


@torch.no_grad()
def due_codes(coder: Coder, n_rows: int) -> tuple[Tensor, Tensor] | None:
    """(candidates, dead mask) among the longest-unused codes, at most one per batch row; None when none is due.

    Nothing waits for the device: on the CPU the number due is read (`idle_count`); on a GPU it stays there and
    the min(m, B) longest idle codes are candidates, those due (a prefix of them) marked dead.
    """
    _, due = coder.idle_count()
    if due == 0:
        return None
    idle, cand = coder.since_fired.float().topk(min(coder.cfg.m if due is None else due, n_rows))
    return cand, idle >= coder.idle_watch()


def restart_age(cfg: QuantizerConfig) -> float:
    """Rows a code goes unused before it restarts: restart_after·m (that many expected hits at uniform use), or the
    run's dead window where that is shorter (`dead_tokens`: a quarter of the run), so restarts act in any run."""
    return min(cfg.restart_after * cfg.m, dead_window(cfg))


@torch.no_grad()
def draw_rows(coder: Coder, weight: Tensor, n: int) -> Tensor:
    """[n] distinct row indices drawn ∝ weight without replacement (the top keys w / Exp(1), as
    torch.multinomial draws them), from the run's generator on the rows' device."""
    w = weight.double() + 1e-12
    return (w / torch.empty_like(w).exponential_(generator=coder.generator_for(w.device))).topk(n).indices


def split_targets(coder: Coder, x: Tensor, q: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """(rows, places): n uniformly drawn rows and, for each, a point `split_step` of the way from its code q to it.

    A code placed there halves that busy code's cell: in high dimensions a code placed on a row itself (or on
    a row drawn ∝ its error) holds little more than that row, and dies again."""
    rows = draw_rows(coder, torch.ones(x.shape[0], device=x.device), n)
    return rows, q[rows] + coder.cfg.split_step * (x[rows] - q[rows])


class Quantizer(Coder):
    """Nearest code of a computed codebook `codes()`; the codebook is cached while not training."""

    dead_window_parts = RESTART_WINDOW_PARTS
    init_rows_per_atom = KMEANS_ROWS_PER_CODE

    def __init__(self, cfg: QuantizerConfig):
        super().__init__(cfg)
        self._cache: Tensor | None = None
        self.register_buffer("offset", torch.zeros(cfg.m, cfg.d_in))  # frozen per-code shift (k-means start, restarts)
        self.register_load_state_dict_post_hook(lambda module, keys: module.clear_cache())

    def computed(self) -> Tensor:
        """[m, d_in] the method's codebook as a differentiable function of its parameters."""
        raise NotImplementedError

    def codes(self) -> Tensor:
        """[m, d_in] the codebook in use: the computed one plus each code's frozen offset."""
        return self.computed() + self.offset

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.setdefault(prefix + "offset", torch.zeros_like(self.offset))  # checkpoints from before offsets
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def start_at_kmeans(self, x: Tensor, iters: int) -> None:
        """Offsets that put the codebook on k-means centres of x (our start; the computed part keeps training)."""
        c = kmeans(x, self.cfg.m, iters, self.cfg.metric, self.generator, self.cfg.search_budget)
        if self.cfg.metric == "cosine":  # keep the data's scale: lookup is normalised, decoding is not
            c = c * x.norm(dim=1).mean()
        self.offset.copy_(c - self.computed())
        self.clear_cache()

    def idle_watch(self) -> float:
        return restart_age(self.cfg)

    @torch.no_grad()
    def restart(self, x: Tensor, q: Tensor, codes: Tensor) -> Tensor:
        """Move each long-unused code to split a busy one (`split_targets`), through its offset; how many moved."""
        picked = due_codes(self, x.shape[0])
        if picked is None:
            return torch.zeros((), dtype=torch.long, device=x.device)
        cand, dead = picked
        _, places = split_targets(self, x, q, cand.shape[0])
        self.offset[cand] += torch.where(dead[:, None], places - codes[cand], 0.0)
        self.since_fired[cand] = torch.where(dead, 0, self.since_fired[cand])
        self.idle_lowered()
        return dead.sum()

    @torch.no_grad()
    def refine_offsets(self, x: Tensor, code: Code, codes: Tensor) -> None:
        """offset_i += refine · (mean of the batch's rows at code i − code i), for the codes the batch used."""
        idx = code.indices[:, 0]
        counts = code.counts().to(codes.dtype)
        means = torch.zeros_like(codes).index_add_(0, idx, x.to(codes.dtype)) / counts.clamp_min(1)[:, None]
        self.offset += self.cfg.refine * (means - codes) * (counts > 0)[:, None]

    def clear_cache(self) -> None:
        self._cache = None

    def train(self, mode: bool = True):
        self.clear_cache()
        return super().train(mode)

    def current_codes(self) -> Tensor:
        """The codebook without gradient, computed once per evaluation (cached in eval mode)."""
        if self.training or self._cache is None:
            with torch.no_grad():
                codes = self.codes()
            if self.training:
                return codes
            self._cache = codes
        return self._cache

    def lookup(self, x: Tensor, codes: Tensor) -> Code:
        idx = nearest(x.detach(), codes.detach(), self.cfg.metric, self.cfg.search_budget)
        return Code.ones(idx, self.cfg.m, x.dtype)

    def encode(self, x: Tensor) -> Code:
        self.check_input(x)
        return self.lookup(x, self.current_codes())

    def decode(self, code: Code) -> Tensor:
        return decode(code, self.current_codes())

    def atoms(self) -> Tensor:
        return self.current_codes()

    def forward(self, x: Tensor) -> Output:
        self.check_input(x)
        codes = self.codes()
        code = self.lookup(x, codes)
        q = decode(code, codes)
        losses = {"codebook": fvu(x.detach(), q), "commit": self.cfg.beta * fvu(x, q.detach())}
        stats = {}
        if self.training:
            self.track(code)
            if getattr(self.cfg, "refine", 0.0):
                self.refine_offsets(x.detach(), code, codes.detach())
            if self.cfg.restart_after:
                stats["restarts"] = self.restart(x.detach(), q.detach(), codes.detach()).float()
        return Output(x + (q - x).detach(), code, losses, stats)

    def after_step(self) -> None:
        self.clear_cache()
