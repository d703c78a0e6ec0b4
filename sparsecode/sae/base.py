"""What every sparse autoencoder shares: unit-norm atoms and their decoder (`Dictionary`, also MP's), the
encoder tied to it at init (`SAE`), with its sparse-gradient path, and the packing of dense activations."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from ..code import Code, decode
from ..coder import Coder, Output
from ..errors import SparsecodeError
from ..kernels.sparse_encoder import picked
from ..kernels.sparse_encoder import pre_acts as scores
from ..metrics import fvu, total_variance


def dense_to_code(z: Tensor, m: int) -> Code:
    """The non-zero entries of dense activations [B, m] as a Code (k = most non-zeros in one row).

    The encoder side already holds [B, m] pre-activations; this only packs them for the O(B·k·d) decoder.
    Gradients flow to `z` through the gathered values. The width is read from the device (a host sync):
    `encode` uses it; training steps of dense encoders use `full_code` instead.
    """
    k = max(1, int((z != 0).sum(1).max()))
    _, indices = z.detach().abs().topk(k, dim=1, sorted=False)
    values = z.gather(1, indices)
    return Code(indices.masked_fill(values == 0, -1), values, m)


def full_code(z: Tensor, m: int) -> Code:
    """Dense activations [B, m] as a Code of all m slots (slot j holds latent j; zeros are inactive).

    Its shape is fixed, so building it reads nothing from the device; the indices are one shared row
    (an expanded view), so it costs no memory beyond `z`. Decode it with `SAE.decode_dense`.
    """
    return Code(torch.arange(m, device=z.device).expand(z.shape[0], m), z, m)


def per_row_scale(x: Tensor) -> Tensor:
    """√(‖x − mean‖² / B): the rms distance to the batch mean, to make penalties in x-units unitless."""
    return (total_variance(x) / x.shape[0]).sqrt()


def unit_rows(m: int, d: int) -> Tensor:
    """[m, d] random atoms of unit norm (one draw of randn(m, d) from the global generator)."""
    w = torch.randn(m, d)
    return w / w.norm(dim=1, keepdim=True)


class Dictionary(Coder):
    """x̂ = z · W_dec + b_dec, with the rows of W_dec kept unit-norm: the decoder side every SAE shares.

    Subclasses create `W_dec` [m, d] and `b_dec` [d] (and any encoder) themselves, in their checkpoint order.
    """

    unit_atoms: ClassVar[bool] = True  # False where a penalty uses the decoder norms instead (ReLU + L1)
    W_dec: nn.Parameter
    b_dec: nn.Parameter

    def decode(self, code: Code) -> Tensor:
        return decode(code, self.W_dec, self.b_dec)

    def atoms(self) -> Tensor:
        return self.W_dec

    def site_norms(self) -> Tensor:
        """[m, sites] each atom's decoder norm at each site (a crosscoder's W_dec [m, L·d] read as [m, L, d];
        [m, 1]: the atoms' norms): near 0 at a site where the latent writes nothing."""
        return self.W_dec.view(self.cfg.m, self.cfg.sites, -1).norm(dim=2)

    @torch.no_grad()
    def init_from_data(self, x: Tensor, target: Tensor | None = None) -> None:
        """b_dec from the mean of what the decoder outputs: the target's (a transcoder), else x's."""
        self.b_dec.copy_((x if target is None else target).mean(0))

    @torch.no_grad()
    def after_backward(self) -> None:
        # keep only the gradient component orthogonal to each unit-norm atom
        g, w = self.W_dec.grad, self.W_dec
        if g is not None and self.unit_atoms:
            g -= (g * w).sum(1, keepdim=True) * w

    @torch.no_grad()
    def after_step(self) -> None:
        if self.unit_atoms:
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)


class SAE(Dictionary):
    """z = f(W_enc (x − b_dec) + b_enc); the encoder starts as the decoder's transpose. With `center_input`
    off (an option of the SAEs other formats hold) the encoder reads x itself: z = f(W_enc x + b_enc).

    A transcoder (cfg.d_out > 0, methods with `transcodes`) decodes to a target: W_dec [m, d_out], b_dec
    [d_out], encoder and decoder drawn apart; with `skip`, output = decode(code) + x · W_skipᵀ (W_skip [d_out,
    d_in], zero at init). Its encoder reads x itself (b_dec lives in the target space; sparsify's choice).

    A crosscoder (cfg.sites = L > 1, methods with `crosscodes`) reads rows of L sites side by side: W_enc over
    the concatenation is the sum of per-site projections, W_dec [m, L·d] one decoder per site (`site_norms`)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        if cfg.d_out:  # a transcoder: the decoder writes the target space
            w_enc, w = unit_rows(cfg.m, cfg.d_in), unit_rows(cfg.m, cfg.d_out)
        else:
            w = unit_rows(cfg.m, cfg.d_in)
            w_enc = w.clone()
        self.W_dec = nn.Parameter(w)  # [m, d_out]: one atom per row
        self.W_enc = nn.Parameter(w_enc)
        self.b_enc = nn.Parameter(torch.zeros(cfg.m))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_out or cfg.d_in))
        if cfg.skip:
            self.W_skip = nn.Parameter(torch.zeros(cfg.d_out, cfg.d_in))

    @torch.no_grad()
    def init_from_data(self, x: Tensor, target: Tensor | None = None) -> None:
        """b_dec as Dictionary's. A transcoder with k (its encoder drawn apart from its decoder) also gets b_enc so
        each latent's pre-activation is positive on a k/m share of the init rows, and each atom the mean target of
        the rows its latent codes: without them a quarter of a MiniLM MLP transcoder's latents never fired."""
        super().init_from_data(x, target)
        k = getattr(self.cfg, "k", 0)
        if not self.cfg.d_out or not k or x.shape[0] * k < self.cfg.m:
            return
        pre = self.centred(x) @ self.W_enc.t()
        rank = max(1, round(x.shape[0] * (1 - k / self.cfg.m)))  # the (1 − k/m) quantile of each latent
        self.b_enc.copy_(-pre.kthvalue(rank, dim=0).values)
        if target is not None:  # each atom: the mean target (less b_dec) of the rows its latent codes, weighted
            z = self.encode(x).to_dense().clamp_min(0)
            atoms = z.t() @ (target - self.b_dec)
            norms = atoms.norm(dim=1, keepdim=True)
            self.W_dec.copy_(torch.where(norms > 0, atoms / norms.clamp_min(1e-12), self.W_dec))

    def predict(self, x: Tensor, code: Code) -> Tensor:
        """The output for inputs x with their code: decode(code), plus the skip path if any."""
        return self.with_skip(x, self.decode(code))

    def with_skip(self, x: Tensor, out: Tensor) -> Tensor:
        """A decoded output plus a transcoder's skip path x · W_skipᵀ (unchanged without one)."""
        return out + x @ self.W_skip.t() if self.cfg.skip else out

    def check_target(self, x: Tensor, target: Tensor | None) -> Tensor:
        """What the output is scored against: `target` [B, d_out] for a transcoder (required), else x."""
        if not self.cfg.d_out:
            if target is not None:
                raise SparsecodeError(f"{self.name}: got a target but d_out=0 (an autoencoder); set d_out")
            return x
        if target is None or target.ndim != 2 or target.shape != (x.shape[0], self.cfg.d_out):
            shape = None if target is None else tuple(target.shape)
            raise SparsecodeError(f"{self.name}: a transcoder needs a target of shape [{x.shape[0]}, "
                                  f"{self.cfg.d_out}], got {shape}")
        return target

    def pre_acts(self, x: Tensor, grad: bool = True) -> Tensor:
        """[B, m] dense pre-activations; `grad=False`: without autograd, scores for a selection whose kept
        values `attach` makes differentiable (kernels/sparse_encoder.py)."""
        if not grad:
            return scores(self.centred(x), self.W_enc, self.b_enc)
        return torch.addmm(self.b_enc, self.centred(x), self.W_enc.t())

    def centred(self, x: Tensor) -> Tensor:
        """What the encoder reads: x − b_dec, or x itself where `center_input` is off (SAELens's
        apply_b_dec_to_input=False, dictionary_learning's JumpReLU)."""
        return x - self.b_dec if getattr(self.cfg, "center_input", True) and not self.cfg.d_out else x

    def attach(self, x: Tensor, code: Code) -> Code:
        """The sparse-gradient path: make a code picked from `pre_acts(x, grad=False)` differentiable in the
        encoder again, at its slots only (each active value is its pre-activation; inactive slots stay 0)."""
        values = picked(self.centred(x), self.W_enc, self.b_enc, code.indices.clamp_min(0), code.values)
        return Code(code.indices, values * code.active(), code.size)

    def decode_dense(self, z: Tensor) -> Tensor:
        """x̂ = z · W_dec + b_dec for dense activations [B, m]: one matmul, the encoder's own cost."""
        return torch.addmm(self.b_dec, z, self.W_dec)

    def dense_output(self, x: Tensor, z: Tensor, target: Tensor | None = None, **losses: Tensor) -> Output:
        """The training pass of a dense encoder: the full-width code of z, decoded by one matmul (no
        packing, so no host sync), FVU (of `target`, a transcoder's, else of x) plus `losses`, usage tracking."""
        code = full_code(z, self.cfg.m)
        x_hat = self.with_skip(x, self.decode_dense(z))
        if self.training:
            self.track(code)
        return Output(x_hat, code, {"fvu": fvu(x if target is None else target, x_hat), **losses})
