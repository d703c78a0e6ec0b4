"""`sparsecode steer` and `sparsecode ablate`: a run's feature edited inside its model, effects printed."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .errors import SparsecodeError


def _target_token(t, text: str | None) -> int | None:
    """The first token of --target (its id), for a causal LM."""
    from .splice import is_causal_lm

    if text is None:
        return None
    if not is_causal_lm(t.model):
        raise SparsecodeError("--target needs a causal LM; this model has no LM head")
    ids = t.tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise SparsecodeError(f"--target {text!r} has no tokens")
    return ids[0]


def cmd_steer(a: argparse.Namespace) -> int:
    """Causal LMs: clean and steered greedy continuations; encoders: the pooled embedding's change and the tokens
    nearest the atom (it is what steering adds, read in the input-embedding basis: a rough lens mid-network)."""
    from .effects import effect, generate, load_target, nearest_tokens, plot_sweep, side_effect, sweep
    from .intervene import feature_values
    from .splice import is_causal_lm

    if a.value is None and a.scale is None and not a.sweep:
        raise SparsecodeError("steer needs --value V (clamp the feature), --scale A (add A x its atom) or --sweep")
    t = load_target(a.run, a.model, a.hook, a.device)
    causal = is_causal_lm(t.model)
    ids, content = t.prompt(a.prompt, a.max_new_tokens if causal and (a.value is not None or a.scale is not None)
                            else 0)
    target = _target_token(t, a.target)
    f = t.intervention().check_feature(a.feature)
    atom = t.coder.atoms()[f].detach().float()
    print(f"{t.coder.name} (m={t.coder.cfg.m}) on {t.model_name} at {t.hook} ({t.point}); feature {f}, "
          f"|atom| {atom.norm():.3f}; prompt {a.prompt!r}: {int(content.sum())} of {len(ids)} tokens edited"
          + (" and every new one" if causal else ""))
    heldout = t.heldout_contexts(a.contexts)
    if a.value is not None or a.scale is not None:
        iv = t.intervention(positions=content)
        if a.value is not None:
            iv.clamp(f, a.value)
            what = f"clamped to {a.value:g} on every token"
        else:
            iv.steer(f, a.scale, a.keep_norm)
            what = f"steered by {a.scale:g} x atom" + (", norm kept" if a.keep_norm else "")
        r = effect(iv, ids[None], targets=[target] if target is not None else None)  # fills iv.codes
        fires = feature_values(iv.first_code(), f) != 0
        print(f"feature {f} fires on {int(fires[content].sum())} of {int(content.sum())} prompt tokens; {what}")
        if causal:
            clean = generate(t.model, ids, a.max_new_tokens)
            steered = generate(t.model, ids, a.max_new_tokens, iv, content)
            n = len(ids)
            print(f"clean:   {t.tokenizer.decode(clean[n:].tolist())!r}")
            print(f"steered: {t.tokenizer.decode(steered[n:].tolist())!r}")
            line = f"next token after the prompt: KL(clean||steered) {r['kl']:.4g}"
            if target is not None:
                line += (f"; p({t.tokenizer.decode([target])!r}) {r['target_p_clean']:.4f} -> "
                         f"{r['target_p_edited']:.4f} (log-prob {r['target_logp_change']:+.4f})")
            print(line)
        else:
            print(f"pooled embedding of the prompt: 1 - cos(clean, steered) = {r['efficacy']:.4f}")
            near = ", ".join(f"{tok!r} {cos:.2f}" for tok, cos in nearest_tokens(t.model, t.tokenizer, atom))
            print(f"tokens nearest atom {f} (cosine with the input embeddings): {near}")
        if heldout is not None:
            s = side_effect(iv, *heldout)
            extra = f" ({s['ce_clean']:.4f} -> {s['ce_edited']:.4f})" if causal else ""
            print(f"side effect on {s['contexts']} held-out contexts: {s['metric']} {s['side_effect']:+.4f}{extra}")
    if a.sweep:
        targets = [target] if target is not None else None
        rows = sweep(lambda alpha: t.intervention(positions=content).steer(f, alpha, a.keep_norm), a.sweep,
                     ids[None], targets=targets, heldout=heldout)
        side = f"side effect: {rows[0]['side_metric']} on held-out text" if heldout is not None else \
            "no held-out text (the run has no store)"
        print(f"sweep of the steering strength (efficacy: {rows[0]['metric']} on the prompt; {side})")
        print(f"{'alpha':>8}  {'efficacy':>10}  {'side effect':>11}")
        for row in rows:
            print(f"{row['alpha']:>8g}  {row['efficacy']:>10.4f}  {row.get('side_effect', float('nan')):>11.4f}")
        png = plot_sweep(rows, Path(a.run) / "report" / "steer_sweep.png",
                         f"feature {f} of {t.coder.name} at {t.hook}")
        print(f"plot written to {png}")
    return 0


def cmd_ablate(a: argparse.Namespace) -> int:
    from .effects import attribution, load_target
    from .splice import is_causal_lm

    t = load_target(a.run, a.model, a.hook, a.device)
    ids, content = t.prompt(a.prompt)
    target = _target_token(t, a.target)
    f = t.intervention().check_feature(a.feature)
    r = attribution(t.model, t.coder, t.hook, ids, f, t.point, target, content.nonzero()[:, 0].tolist())
    metric = (f"the logit of {t.tokenizer.decode([target])!r} after the prompt" if target is not None else
              "the mean next-token CE" if is_causal_lm(t.model) else "1 - cos(pooled embedding) vs clean")
    print(f"{t.coder.name} (m={t.coder.cfg.m}) on {t.model_name} at {t.hook} ({t.point}); feature {f} ablated at "
          f"one token at a time; effect: change of {metric}")
    print(f"{'pos':>4}  {'token':<16} {'value':>9}  {'effect':>10}")
    for p, tok in enumerate(ids.tolist()):
        value, eff = (f"{r['values'][p]:9.4f}", f"{r['effect'][p]:+10.4f}") if content[p] else (f"{'-':>9}",
                                                                                              f"{'-':>10}")
        print(f"{p:>4}  {t.tokenizer.decode([tok])!r:<16} {value}  {eff}")
    fired = (r["values"] != 0) & content
    if not fired.any():
        print(f"feature {f} does not fire on the prompt: ablating it changes nothing")
        return 0
    effects = r["effect"].masked_fill(~content, 0)
    top = int(effects.abs().argmax())
    print(f"feature {f} fires on {int(fired.sum())} of {int(content.sum())} prompt tokens; largest effect "
          f"{float(effects[top]):+.4f} at position {top} ({t.tokenizer.decode([int(ids[top])])!r})")
    return 0


def add_intervention_commands(sub: Any) -> None:
    """Add `sparsecode steer` and `sparsecode ablate` to the CLI."""
    for name, doc in (("steer", "steer, clamp or sweep a feature of a run inside its model; print the effect"),
                      ("ablate", "ablate a feature at each token of a prompt in turn; print the per-token effect")):
        s = sub.add_parser(name, help=doc)
        s.add_argument("run")
        s.add_argument("--prompt", required=True)
        s.add_argument("--feature", type=int, required=True, help="atom (or code) index, 0..m-1")
        s.add_argument("--model", help="model id or folder (default: the run's store's)")
        s.add_argument("--hook", help="module path (default: the run's store's)")
        s.add_argument("--target", help="a token (its first one) whose log-prob / logit to follow (causal LMs)")
        s.add_argument("--device", default="cpu", help="cpu (default) | auto | cuda[:N]")
        if name == "steer":
            v = s.add_mutually_exclusive_group()
            v.add_argument("--value", type=float, help="clamp the feature to this weight on every token")
            v.add_argument("--scale", type=float, help="add this multiple of the feature's atom on every token")
            s.add_argument("--keep-norm", action="store_true", help="rescale each steered activation to its norm")
            s.add_argument("--max-new-tokens", type=int, default=20, help="greedy continuation length (causal LMs)")
            s.add_argument("--sweep", type=float, nargs="+", metavar="A",
                           help="steering strengths: print efficacy vs side effect, plot RUN/report/steer_sweep.png")
            s.add_argument("--contexts", type=int, default=8, help="held-out contexts for the side effect (0 = skip)")
        s.set_defaults(fn=cmd_steer if name == "steer" else cmd_ablate)
