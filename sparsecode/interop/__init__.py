"""Other libraries' formats in and out: `export_run`, `import_folder` and `load_coder` for SAELens, sparsify and
dictionary_learning. Every conversion ends with a self-check: the coder against the format's own forward on
the files' tensors (same active set, values and reconstructions within TOLERANCE), refused otherwise."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import checkpoint
from ..coder import Coder
from ..errors import SparsecodeError
from ..files import atomic_write_json, check_folder, make_temp, read_json, sha256, writing
from . import dictlearn, saelens, sparsify
from .foreign import Foreign, Reference, build_coder

FORMATS = {f.NAME: f for f in (saelens, sparsify, dictlearn)}
TOLERANCE = 1e-5  # largest |ours − theirs| / max |theirs| of activations and reconstructions
CHECK_ROWS = 512
ORIGIN = "origin.json"  # an imported run's provenance


# --- finding a coder in a folder ---------------------------------------------------------------------------
def is_run(path: Path) -> bool:
    return (path / checkpoint.CONFIG).is_file() and ((path / "checkpoints").is_dir() or (path / checkpoint.MODEL)
                                                       .is_file())


def found(path: Path) -> list[tuple[str, Path]]:
    """(format, folder) of each coder in `path`: the folder itself, or each subfolder of a release folder."""
    here = [(name, path) for name, f in FORMATS.items() if f.found(path)]
    if here:
        return here[:1]
    subs = sorted(p for p in path.iterdir() if p.is_dir()) if path.is_dir() else []
    return [(name, p) for p in subs for name, f in FORMATS.items() if f.found(p)]


def locate(path: str | Path, sae: str | None = None) -> tuple[str, Path]:
    """The format and folder of one coder: a local folder, or a Hugging Face repo id (its cached snapshot
    when offline); `sae` picks one of a release folder's coders by its subfolder."""
    path = resolve_hub(path)
    if not path.is_dir():
        raise SparsecodeError(f"{path} is not a folder")
    if sae is not None:
        path = path / sae
        if not path.is_dir():
            raise SparsecodeError(f"{path}: no such SAE in the release")
    hits = found(path)
    if not hits:
        raise SparsecodeError(f"{path} holds no SAELens, sparsify or dictionary_learning files (cfg.json + "
                              f"sae_weights.safetensors, cfg.json + sae.safetensors, or config.json + ae.pt)")
    if len(hits) > 1:
        names = [p.name for _, p in hits]
        more = f", ... ({len(names)} in all)" if len(names) > 8 else ""
        raise SparsecodeError(f"{path} holds {len(names)} SAEs; pick one with --sae: {', '.join(names[:8])}{more}")
    return hits[0]


def resolve_hub(path: str | Path) -> Path:
    """A local path as it is; `org/name` that is no local folder: its Hugging Face snapshot (cache first)."""
    local = Path(path)
    text = str(path)
    if local.exists() or text.count("/") != 1 or text.startswith((".", "/")):
        return local
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.utils import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:
        return local
    try:
        return Path(snapshot_download(text, local_files_only=True))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError):
        pass
    try:
        return Path(snapshot_download(text))
    except Exception as e:  # noqa: BLE001 (offline, unknown repo, no access: all one line)
        raise SparsecodeError(f"{text} is no local folder and could not be fetched from the Hugging Face hub: "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def read_foreign(path: str | Path, sae: str | None = None) -> Foreign:
    name, folder = locate(path, sae)
    return FORMATS[name].read(folder)


def load_coder(path: str | Path, sae: str | None = None, device: str | torch.device = "cpu") -> Coder:
    """Any coder: a sparsecode run or checkpoint folder, or another library's files (checked on probe rows)."""
    p = Path(path)
    if is_run(p) or (p / checkpoint.STATE_JSON).is_file():
        return checkpoint.load_coder(p, device)
    foreign = read_foreign(path, sae)
    coder = build_coder(foreign)
    self_check(coder, foreign.reference, probe_rows(coder))
    return coder.to(device)


# --- the numerical self-check -------------------------------------------------------------------------------
def probe_rows(coder: Coder, n: int = CHECK_ROWS, seed: int = 0) -> Tensor:
    """Rows near the coder's own atoms when no data is at hand: b_dec plus a few atoms with weights around the
    scale where its thresholds sit, plus noise, so that probes fire some latents and leave others."""
    g = torch.Generator().manual_seed(seed)
    W, b = coder.W_dec.detach().float(), coder.b_dec.detach().float()
    theta = getattr(coder, "theta", getattr(coder, "threshold", None))
    theta = theta.detach() if theta is not None else None
    scale = float(theta.float().clamp_min(0).median()) * 3 if theta is not None else 0.0
    if coder.cfg.d_out:  # a transcoder's inputs: along its encoder rows (pre-activation ≈ weight · ‖row‖²)
        W = coder.W_enc.detach().float()
        b, scale = torch.zeros(W.shape[1]), scale / float(W.norm(dim=1).pow(2).median().clamp_min(1e-12))
    scale = scale if scale > 0 else float(W.norm(dim=1).mean()) or 1.0
    picks = torch.randint(0, W.shape[0], (n, 8), generator=g)
    weights = torch.rand(n, 8, generator=g) * 2 * scale
    noise = torch.randn(n, W.shape[1], generator=g) * scale / W.shape[1] ** 0.5
    return b + (weights[:, :, None] * W[picks]).sum(1) + noise


@torch.no_grad()
def self_check(coder: Coder, reference: Reference, x: Tensor, values: bool = True) -> dict[str, Any]:
    """Ours against the format's forward on rows x: identical active sets, values (unless `values` is off: a
    format that rescales them) and reconstructions within TOLERANCE. Raises with the first difference."""
    coder = coder.eval()
    code = coder.encode(x)
    z, x_hat = code.to_dense(), coder.predict(x, code)  # a transcoder's output: the target's width
    rz, rx = reference(x)
    differ = (z != 0) != (rz != 0)
    if differ.any():
        row, latent = (int(i) for i in differ.nonzero()[0])
        raise SparsecodeError(f"self-check failed: {int(differ.sum())} of {differ.numel()} activations differ in "
                              f"being active (first: row {row}, latent {latent})")
    val = float((z - rz).abs().max() / rz.abs().max().clamp_min(1e-12)) if values else 0.0
    rec = float((x_hat - rx).abs().max() / rx.abs().max().clamp_min(1e-12))
    if val > TOLERANCE or rec > TOLERANCE:
        raise SparsecodeError(f"self-check failed: activations differ by {val:.2e} and reconstructions by "
                              f"{rec:.2e} (relative; tolerance {TOLERANCE:g})")
    l0 = float((z != 0).sum(1).float().mean())
    return {"rows": x.shape[0], "l0": l0, "values": val if values else None, "reconstructions": rec,
            "tolerance": TOLERANCE}


def check_line(r: dict[str, Any]) -> str:
    vals = f"values within {r['values']:.1e}, " if r["values"] is not None else "values rescaled by atom norms, "
    return (f"self-check on {r['rows']} rows (L0 {r['l0']:.1f}): active sets identical, {vals}"
            f"reconstructions within {r['reconstructions']:.1e} (relative; tolerance {r['tolerance']:g})")


# --- export -------------------------------------------------------------------------------------------------
def run_about(run: Path) -> dict[str, Any]:
    """Model, hook and corpus of a run's store (when it was trained on one) for the target's metadata."""
    from ..run_config import load_config

    cfg = load_config(run)
    about: dict[str, Any] = {}
    if cfg.source is not None and cfg.source.kind == "store" and cfg.source.path:
        manifest = Path(cfg.source.path) / "manifest.json"
        if manifest.is_file():
            m = read_json(manifest)
            about = {"model": m.get("model"), "hook": m.get("hook"), "context": m.get("context"),
                     "corpus": m.get("corpus"), "prepend_bos": m.get("prepend_bos")}
            if m.get("target"):  # a paired store: the transcoder's target site
                about.update(hook_out=m["target"], hook_point=m.get("hook_point"), hook_point_out=m.get("target_point"))
    return about


def held_out_rows(run: Path, coder: Coder, rows: int) -> tuple[Tensor | None, Tensor | None]:
    """(check rows, firing density over them) from the run's held-out split, or (None, None) without one."""
    from ..evaluate import batches, held_out_source
    from ..run_config import load_config

    cfg = load_config(run)
    if cfg.source is None or cfg.source.kind == "memory":
        return None, None
    try:
        _, source = held_out_source(run, cfg, None, "export")
        counts, seen, first = torch.zeros(coder.cfg.m), 0, None
        for x in batches(coder, source, rows, 4096):
            first = x[:CHECK_ROWS] if first is None else first
            counts += coder.encode(x).counts().float().cpu()
            seen += x.shape[0]
    except (SparsecodeError, OSError):
        return None, None
    return first, counts / max(seen, 1)


def export_run(run: str | Path, to: str, out: str | Path, rows: int = 65536) -> dict[str, Any]:
    """Write a run in another library's layout at `out` (a new folder, written whole or not at all) and check
    the written files against the run on held-out rows (probe rows without a store)."""
    run, out = Path(run), Path(out)
    if to not in FORMATS:
        raise SparsecodeError(f"unknown format {to!r}; one of {', '.join(FORMATS)}")
    fmt = FORMATS[to]
    check_folder(out.parent, "output folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SparsecodeError(f"{out} exists and is not an empty folder; pick a new --out")
    coder = checkpoint.load_coder(run)
    if coder.cfg.sites > 1:
        raise SparsecodeError(f"{run} is a crosscoder (sites={coder.cfg.sites}); {to} holds coders of one site")
    if coder.cfg.d_out:  # a transcoder
        holds = getattr(fmt, "TRANSCODES", ())
        if coder.name not in holds:
            raise SparsecodeError(f"{to} has no transcoder like {coder.name}: " + (
                f"it holds {', '.join(holds)} transcoders" if holds else "it holds no transcoders"))
    elif coder.name not in fmt.HOLDS:
        raise SparsecodeError(f"{to} has no equivalent of {coder.name}: it holds {', '.join(fmt.HOLDS)}")
    if hasattr(coder, "threshold") and float(coder.threshold) < 0:
        raise SparsecodeError(f"{run}: the inference threshold of {coder.name} was never estimated")
    about = run_about(run)
    x, density = held_out_rows(run, coder, rows)
    about["density"] = density
    x = probe_rows(coder) if x is None else x
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp(out.parent, out.name, directory=True)
    try:
        fmt.write(coder, about, tmp)
        written = tmp / sparsify.hookpoint(about) if fmt is sparsify else tmp
        foreign = fmt.read(written)
        rescaled = getattr(fmt, "RESCALED", ())
        result = self_check(coder, foreign.reference, x, values=coder.name not in rescaled)
        self_check(build_coder(foreign), foreign.reference, x)  # and what sparsecode reads back from them
        if out.is_dir():
            out.rmdir()  # empty, checked above
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**result, "format": to, "method": coder.name, "out": str(out), "data": "probe" if density is None
            else "held-out"}


# --- import -------------------------------------------------------------------------------------------------
def import_folder(src: str | Path, out: str | Path, sae: str | None = None) -> dict[str, Any]:
    """Make a sparsecode run at `out` of another library's coder: config, one checkpoint (step 0) and
    origin.json (format, source path, file digests, self-check). Nothing is written if any check fails."""
    from ..config import to_dict
    from ..data.source import SourceConfig
    from ..run_config import TrainConfig

    out = Path(out)
    check_folder(out, "run folder")
    if out.exists() and any(p.name not in (".lock",) for p in out.iterdir()):
        raise SparsecodeError(f"{out} exists and is not empty; pick a new --out")
    name, folder = locate(src, sae)
    foreign = FORMATS[name].read(folder)
    coder = build_coder(foreign)
    result = self_check(coder, foreign.reference, probe_rows(coder))
    cfg = TrainConfig(method=foreign.method, coder=coder.config_dict(), source=SourceConfig(kind="memory"), steps=0)
    digests = {p.name: sha256(p) for p in sorted(folder.iterdir()) if p.is_file()}
    with writing(out, "run", keep=lambda: False):
        atomic_write_json(out / checkpoint.CONFIG, to_dict(cfg))
        checkpoint.save_checkpoint(out, 0, coder, {})
        atomic_write_json(out / ORIGIN, {**foreign.origin, "source": str(src), "sae": sae, "sha256": digests,
                                         "self_check": result})
    return {**result, "format": name, "method": foreign.method, "out": str(out), "from": str(folder),
            "d_out": coder.cfg.d_out}
