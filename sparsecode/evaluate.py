"""Evaluation of a trained method on held-out activations, through the Code seam alone."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from .checkpoint import latest_checkpoint, load_coder
from .coder import Coder
from .data.source import ActivationSource, SourceConfig, open_source, source_from_spec
from .diagnose import active_units, code_infomec, neural_collapse
from .diagnose.doctor import DIAGNOSIS, diagnose, record
from .errors import SparsecodeError
from .files import atomic_write_json, read_json, read_jsonl
from .metrics import CodeStats, atom_cosines, effective_rank, frequency_histogram, perplexity, recovery, site_shares
from .run_config import load_config
from .splice import splice_store

MAX_NC_CODE_ELEMENTS = 1 << 26  # NC on dense codes holds a few float64 copies of [nc_rows, m]; above: skipped
MAX_COSINE_ATOMS = 8192  # atom-pair cosines cost m²·d: above this, a fixed random subset of atoms


def pairs(coder: Coder, source: ActivationSource, rows: int, batch_size: int):
    """Held-out (input, what the output is scored against) batches on the coder's device, checked for width and
    finiteness: a transcoder's (x, target) from a source with a target, an autoencoder's (x, x)."""
    if source.d != coder.cfg.d_in:
        raise SparsecodeError(f"the data has d={source.d} but the run expects d_in={coder.cfg.d_in}")
    d_out, want = int(getattr(source, "d_out", 0) or 0), coder.cfg.d_out
    if want and d_out != want:
        raise SparsecodeError(f"the run is a transcoder (d_out={want}) but the data gives " + (
            f"a target of d_out={d_out}" if d_out else "no target: use a paired store (harvest --target)"))
    device = next(iter(coder.buffers())).device
    if hasattr(source, "__len__"):  # a finite split: one pass at most, no row counted twice
        rows = min(rows, len(source))
    done, d = 0, coder.cfg.d_in
    while done < rows:
        x = source.next_batch(min(batch_size, rows - done)).to(device, torch.float32)
        if not torch.isfinite(x).all():
            raise SparsecodeError("the evaluation data contains NaN or inf values")
        done += x.shape[0]
        yield (x[:, :d], x[:, d:]) if want else (x[:, :d], x[:, :d])  # a paired source's target unused: dropped


def batches(coder: Coder, source: ActivationSource, rows: int, batch_size: int):
    """Held-out input rows [B, d_in] on the coder's device (a transcoder's target columns dropped)."""
    for x, _ in pairs(coder, source, rows, batch_size):
        yield x


@torch.no_grad()
def evaluate(coder: Coder, source: ActivationSource, rows: int = 65536, batch_size: int = 4096,
             details: bool = True, nc_rows: int = 4096, infomec_rows: int = 2048) -> dict[str, Any]:
    """FVU, L0, usage and perplexity; with `details` also atom geometry, the frequency histogram,
    ground-truth recovery, neural collapse (labelled sources), posterior collapse (variational methods)
    and InfoMEC of the codes against the true factors (sources with `factored_batch`: synthetic features).
    A transcoder's FVU is of its target (its output from the code of x; `fvu_of` says which)."""
    was_training = coder.training
    coder.eval()
    sites = coder.cfg.sites
    stats = CodeStats(coder.cfg.m, sites)
    implicit = getattr(coder, "implicit_size", None)  # per-dimension quantizers: count the tuples of levels
    ids = []
    for x, y in pairs(coder, source, rows, batch_size):
        code = coder.encode(x)
        stats.update(y, coder.predict(x, code), code)
        if implicit is not None:
            ids.append(coder.code_ids(code).cpu())
    result: dict[str, Any] = {"rows": stats.rows, **stats.result(), "fvu_of": "target" if coder.cfg.d_out else "input"}
    if sites > 1:  # a crosscoder: each site's FVU, and how its atoms' decoder norms split over the sites
        result["sites"] = {**{f"fvu_{i}": f for i, f in enumerate(stats.site_fvu())},
                           **site_shares(coder.site_norms(), stats.counts > 0)}
    if implicit is not None:
        counts = torch.unique(torch.cat(ids), return_counts=True)[1]
        result.update(implicit_codes=implicit(), implicit_used=int(counts.numel()),
                      implicit_utilisation=counts.numel() / implicit(), implicit_perplexity=perplexity(counts))
    if details:
        atoms, counts = coder.atoms().detach().float().cpu(), stats.counts
        result["effective_rank_used_atoms"] = effective_rank(atoms[counts > 0])
        if atoms.shape[0] > MAX_COSINE_ATOMS:
            atoms = atoms[torch.randperm(atoms.shape[0], generator=torch.Generator().manual_seed(0))[:MAX_COSINE_ATOMS]]
        result.update(atom_cosines(atoms))
        result["frequency_histogram"] = frequency_histogram(counts, stats.rows)
        truth = getattr(source, "truth", None)
        if truth is not None:
            result.update(recovery(coder.atoms().cpu(), truth))
        labelled = getattr(source, "labelled_batch", None)
        if labelled is not None:
            x, labels = labelled(nc_rows)
            x = x.to(next(iter(coder.buffers())).device, torch.float32)
            result["nc_activations"] = neural_collapse(x, labels.to(x.device))
            if x.shape[0] * coder.cfg.m <= MAX_NC_CODE_ELEMENTS:  # bounded memory
                result["nc_codes"] = neural_collapse(coder.encode(x).to_dense(), labels.to(x.device))
        posterior = getattr(coder, "posterior", None)
        if posterior is not None:
            x = next(batches(coder, source, min(rows, nc_rows), nc_rows))
            mu, logvar = posterior(x)
            result["posterior"] = active_units(mu, logvar)
        factored = getattr(source, "factored_batch", None)
        if factored is not None and infomec_rows > 0:  # last: the rows drawn for the figures above stay as they were
            x, factors = factored(infomec_rows)
            result["infomec"] = code_infomec(coder.encode(x.to(next(iter(coder.buffers())).device, torch.float32)),
                                             factors)
    coder.train(was_training)
    return result


def held_out_source(run: Path, cfg: Any, data: str | None, verb: str) -> tuple[SourceConfig, ActivationSource]:
    """(config, opened source) of a run's held-out split, or of all of `data` (a .npy file or store)."""
    if data:
        src_cfg = source_from_spec(data, None, cfg.source.seed)
        src_cfg.heldout = 0.0
        return src_cfg, open_source(src_cfg, "train")
    if cfg.source.kind == "memory":
        why = "was imported" if (Path(run) / "origin.json").is_file() else "was trained on in-memory data"
        data = "--data PAIRED_STORE (harvest --target)" if cfg.coder.get("d_out") else "--data FILE.npy or --data STORE"
        raise SparsecodeError(f"run {run} {why}; {verb} it with {data}")
    return cfg.source, open_source(cfg.source, "eval")


def evaluate_run(run: Path, data: str | None = None, rows: int = 65536, batch_size: int = 4096,
                 splice_contexts: int = 16) -> dict[str, Any]:
    """Evaluate a run folder on its held-out split (or on `data`, a .npy file or store), splice a store's
    code into its model, and save the result as the run's eval.json."""
    run = Path(run)
    cfg, coder = load_config(run), load_coder(run)
    src_cfg, source = held_out_source(run, cfg, data, "evaluate")
    result = evaluate(coder, source, rows=rows, batch_size=batch_size)
    if src_cfg.kind == "store" and splice_contexts > 0 and coder.cfg.sites == 1:  # a crosscoder splices nowhere yet
        result["spliced"] = splice_store(coder, src_cfg.path, src_cfg.heldout, splice_contexts)
    atomic_write_json(run / "eval.json", result)
    return result


def run_eval(run: Path, rows: int = 65536, splice_contexts: int = 16) -> dict[str, Any]:
    """The run's eval.json, computed (and saved) first if it is missing."""
    if not (Path(run) / "eval.json").is_file():
        return evaluate_run(run, rows=rows, splice_contexts=splice_contexts)
    return read_json(Path(run) / "eval.json")


def diagnose_run(run: Path, data: str | None = None, rows: int = 4096, reuse: bool = False) -> dict[str, Any]:
    """The collapse doctor on a run folder (its config, log, last checkpoint and held-out rows, or `data`), kept
    as the run's diagnosis.json: checkpoint, rows, data, findings and their text. `reuse`: the kept one, when
    it is of the run's last checkpoint."""
    run = Path(run)
    if rows < 1:
        raise SparsecodeError(f"rows must be positive, got {rows}")
    cfg, coder = load_config(run), load_coder(run)
    ckpt = latest_checkpoint(run)
    about = {"checkpoint": ckpt.name if ckpt else None, "rows": rows, "data": data}
    kept = None
    if reuse and (run / DIAGNOSIS).is_file():
        with contextlib.suppress(SparsecodeError):  # a corrupt copy is computed afresh
            kept = read_json(run / DIAGNOSIS)
    if isinstance(kept, dict) and kept.get("checkpoint") == about["checkpoint"] and isinstance(kept.get("text"), str):
        return kept
    log = read_jsonl(run / "metrics.jsonl") if (run / "metrics.jsonl").is_file() else []
    _, source = held_out_source(run, cfg, data, "diagnose")
    x = next(batches(coder, source, rows, rows), None)
    if x is None:
        raise SparsecodeError(f"no held-out rows to diagnose {run} on; give some with --data FILE.npy")
    result = record(diagnose(cfg, log, coder, x), **about)
    with contextlib.suppress(OSError):  # a read-only run is still diagnosed; it only keeps no copy
        atomic_write_json(run / DIAGNOSIS, result)
    return result
