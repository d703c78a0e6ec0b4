import pytest
import torch

transformers = pytest.importorskip("transformers")

from data_helpers import gpt2_dir, minilm_store, write_corpus  # noqa: E402, F401

from sparsecode.cli import main  # noqa: E402
from sparsecode.code import Code  # noqa: E402
from sparsecode.coder import build  # noqa: E402
from sparsecode.data.source import SourceConfig  # noqa: E402
from sparsecode.effects import attribution, effect, side_effect  # noqa: E402
from sparsecode.errors import SparsecodeError  # noqa: E402
from sparsecode.intervene import Intervention, clamp_code, feature_values, force_code  # noqa: E402
from sparsecode.train import TrainConfig, train  # noqa: E402

HOOK = "transformer.h.0"


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=97, n_positions=64)
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 97, (3, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def sae():
    torch.manual_seed(0)
    return build("topk", {"d_in": 32, "m": 64, "k": 4}).eval()


@pytest.fixture
def by_hand(gpt2):
    """Run the model with a hand-written hook that replaces the hooked output by fn(output)."""

    def run(ids, fn, hook=HOOK):
        module = gpt2.get_submodule(hook)
        handle = module.register_forward_hook(
            lambda m, args, out: (fn(out[0]), *out[1:]) if isinstance(out, tuple) else fn(out))
        try:
            with torch.no_grad():
                return gpt2(input_ids=ids).logits
        finally:
            handle.remove()

    return run


def first(out):
    return out[0] if isinstance(out, tuple) else out


def hooked_output(gpt2, ids, hook=HOOK, inside=None):
    """(clean output, output after the intervention's hook) of the module at `hook`."""
    seen = {}
    module = gpt2.get_submodule(hook)
    h1 = module.register_forward_hook(lambda m, a, out: seen.setdefault("x", first(out).clone()))
    try:
        with inside:  # registered after the intervention's hook: sees its result
            h2 = module.register_forward_hook(lambda m, a, out: seen.setdefault("new", first(out).clone()))
            try:
                with torch.no_grad():
                    gpt2(input_ids=ids)
            finally:
                h2.remove()
    finally:
        h1.remove()
    return seen["x"], seen["new"]


def firing(coder, gpt2, ids, hook=HOOK):
    """(a feature that fires on some tokens of ids, its [B, T] weights)."""
    iv = Intervention(gpt2, coder, hook).at(torch.zeros(ids.shape, dtype=torch.bool))
    with iv, torch.no_grad():
        gpt2(input_ids=ids)
    code = iv.codes[0]
    f = int(code.indices[0, 0])
    return f, feature_values(code, f).reshape(ids.shape)


# --- exactness on the tiny GPT-2 ------------------------------------------------------------------------------
def test_error_term_without_edit_is_the_clean_model(gpt2, sae, ids):
    r = Intervention(gpt2, sae, HOOK).run(ids)
    assert (r.edited - r.clean).abs().max() < 1e-5
    spliced = Intervention(gpt2, sae, HOOK, error_term=False).run(ids)
    assert (spliced.edited - spliced.clean).abs().max() > 1e-3  # the reconstruction alone does change it


def test_splice_without_error_term_is_x_hat_substituted(gpt2, sae, ids, by_hand):
    r = Intervention(gpt2, sae, HOOK, error_term=False).run(ids)
    want = by_hand(ids, lambda a: sae.decode(sae.encode(a.reshape(-1, 32))).reshape(a.shape))
    assert (r.edited - want).abs().max() < 1e-5


def test_ablation_is_its_decoded_contribution_pushed_through(gpt2, sae, ids, by_hand):
    f, w = firing(sae, gpt2, ids)
    assert (w != 0).any()
    atom = sae.atoms()[f].detach()
    r = Intervention(gpt2, sae, HOOK).ablate(f).run(ids)
    want = by_hand(ids, lambda a: a - w[..., None] * atom)
    assert (r.edited - want).abs().max() < 1e-5
    assert (r.edited - r.clean).abs().max() > 1e-4


def test_positions_limit_the_edit(gpt2, sae, ids):
    r = Intervention(gpt2, sae, HOOK, positions=[5]).steer(3, 4.0).run(ids)
    diff = (r.edited - r.clean).abs().amax((0, 2))
    assert diff[:5].max() == 0 and diff[5:].min() > 1e-4  # causal: only position 5 and later move


def test_hook_is_removed_on_exit_and_after_an_exception(gpt2, sae, ids):
    module = gpt2.get_submodule(HOOK)
    with Intervention(gpt2, sae, HOOK).steer(1, 2.0):
        assert len(module._forward_hooks) == 1
    assert not module._forward_hooks
    with pytest.raises(RuntimeError, match="boom"), Intervention(gpt2, sae, HOOK, point="input"):
        assert len(module._forward_pre_hooks) == 1
        raise RuntimeError("boom")
    assert not module._forward_pre_hooks and not module._forward_hooks
    narrow = build("topk", {"d_in": 16, "m": 32, "k": 4}).eval()
    with pytest.raises(SparsecodeError, match="reads d_in=16, but 'transformer.h.0' gives width 32"), \
            Intervention(gpt2, narrow, HOOK), torch.no_grad():
        gpt2(input_ids=ids)
    assert not module._forward_hooks


def test_feature_outside_the_dictionary_is_one_line(gpt2, sae):
    with pytest.raises(SparsecodeError, match=r"feature 64 is outside the run's dictionary of m=64 atoms"):
        Intervention(gpt2, sae, HOOK).ablate([1, 64])


# --- steering -------------------------------------------------------------------------------------------------
def test_steering_along_a_planted_unembedding_direction_raises_the_token_monotonically(gpt2, ids):
    t = 42
    w = gpt2.lm_head.weight[t].detach()
    coder = build("topk", {"d_in": 32, "m": 16, "k": 2}).eval()
    with torch.no_grad():
        u = w - w.mean()  # the final LayerNorm centres its input: plant the centred direction
        coder.W_dec[7] = u / u.norm()
    probs = []
    for alpha in range(9):
        r = Intervention(gpt2, coder, "transformer.h.1").steer(7, float(alpha)).run(ids)
        probs.append(r.next_token_probs()[1][:, -1, t].mean().item())
    assert all(b > a for a, b in zip(probs, probs[1:], strict=False)), probs
    e = effect(Intervention(gpt2, coder, "transformer.h.1").steer(7, 8.0), ids, targets=[t])
    assert e["target_logp_change"] > 0 and e["kl"] > 0 and e["efficacy"] == e["target_logp_change"]
    assert effect(Intervention(gpt2, coder, "transformer.h.1").steer(7, 0.0), ids, targets=[t])["kl"] == 0


def test_keep_norm_keeps_each_tokens_norm(gpt2, sae, ids):
    x, new = hooked_output(gpt2, ids, inside=Intervention(gpt2, sae, HOOK).steer(2, 6.0, keep_norm=True))
    assert torch.allclose(new.norm(dim=-1), x.norm(dim=-1), rtol=1e-5)
    assert (new - x).abs().max() > 1e-2


def test_side_effect_of_no_edit_is_zero_and_of_a_steer_is_positive(gpt2, sae, ids):
    mask = torch.ones_like(ids)
    none = side_effect(Intervention(gpt2, sae, HOOK), ids, mask)
    assert none["side_effect"] == 0 and none["metric"] == "next-token CE increase"
    some = side_effect(Intervention(gpt2, sae, HOOK).steer(3, 20.0), ids, mask)
    assert some["side_effect"] != 0 and some["ce_clean"] == pytest.approx(none["ce_clean"])


# --- the same edits for codebooks and quantizers --------------------------------------------------------------
def test_forcing_and_forbidding_a_vq_code(gpt2, ids):
    torch.manual_seed(0)
    vq = build("vq", {"d_in": 32, "m": 64}).eval()
    atoms = vq.atoms().detach()
    c = 9
    x, new = hooked_output(gpt2, ids, inside=Intervention(gpt2, vq, HOOK).force(c))
    rows = x.reshape(-1, 32)
    x_hat = atoms[vq.encode(rows).indices[:, 0]]
    assert (new.reshape(-1, 32) - (rows + atoms[c] - x_hat)).abs().max() < 1e-5
    used = int(vq.encode(rows).indices[:, 0].mode().values)
    x, new = hooked_output(gpt2, ids, inside=Intervention(gpt2, vq, HOOK).forbid(used))
    first = torch.cdist(rows, atoms).argmin(1)
    second = torch.cdist(rows, atoms).topk(2, largest=False).indices[:, 1]
    moved = torch.where((first == used)[:, None], atoms[second] - atoms[first], 0)
    assert (first == used).any() and (new.reshape(-1, 32) - (rows + moved)).abs().max() < 1e-5


def test_force_replaces_the_slot_of_the_codes_group():
    code = Code(torch.tensor([[1, 5, 9], [2, 6, 10]]), torch.ones(2, 3), 12)  # rvq: 3 stages of 4 codes
    assert force_code(code, 7, group=4).indices.tolist() == [[1, 7, 9], [2, 7, 10]]
    assert force_code(code, 7).indices.tolist() == [[7, 5, 9], [7, 6, 10]]


def test_clamp_everywhere_or_where_active():
    code = Code(torch.tensor([[3, 1], [0, -1]]), torch.tensor([[2.0, 1.0], [0.5, 0.0]]), 5)
    every = clamp_code(code, [3], 4.0, "all").to_dense()
    active = clamp_code(code, [3], 4.0, "active").to_dense()
    assert every.tolist() == [[0, 1, 0, 4, 0], [0.5, 0, 0, 4, 0]]
    assert active.tolist() == [[0, 1, 0, 4, 0], [0.5, 0, 0, 0, 0]]


def test_clamping_a_scalar_quantizer_level(gpt2, ids):
    torch.manual_seed(0)
    fsq = build("fsq", {"d_in": 32, "levels": [5, 5, 5]}).eval()
    with torch.no_grad():
        fsq.W_in.mul_(20)  # the tiny GPT-2's activations are small: spread them over the levels
    x, new = hooked_output(gpt2, ids, inside=Intervention(gpt2, fsq, HOOK).clamp(1, 0.75))
    rows = x.reshape(-1, 32)
    q = fsq.encode(rows).values[:, 1]
    assert len(q.unique()) > 2
    want = rows + (0.75 - q)[:, None] * fsq.atoms()[1].detach()
    assert (new.reshape(-1, 32) - want).abs().max() < 1e-5


# --- attribution ----------------------------------------------------------------------------------------------
def test_attribution_is_the_loss_change_of_ablating_one_position(gpt2, sae, ids, by_hand):
    seq = ids[0]
    f, w = firing(sae, gpt2, seq[None])
    r = attribution(gpt2, sae, HOOK, seq, f)
    assert torch.equal(r["values"], w[0])
    atom = sae.atoms()[f].detach()

    def ce(logits):
        return torch.nn.functional.cross_entropy(logits[0, :-1], seq[1:]).item()

    clean = ce(by_hand(seq[None], lambda a: a))
    for t in range(len(seq)):
        one = torch.zeros(1, len(seq), 1)
        one[0, t] = w[0, t]
        want = ce(by_hand(seq[None], lambda a, one=one: a - one * atom)) - clean
        assert r["effect"][t].item() == pytest.approx(want, abs=1e-5)
    assert (r["effect"][w[0] != 0].abs() > 0).all() and (r["effect"][w[0] == 0] == 0).all()
    logit = attribution(gpt2, sae, HOOK, seq, f, target=5, positions=[0, 1])
    assert logit["effect"][2:].isnan().all() and not logit["effect"][:2].isnan().any()


# --- the CLI --------------------------------------------------------------------------------------------------
def cli(args, capsys):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def gpt2_run(gpt2_dir, tmp_path_factory):  # noqa: F811
    """A topk run on a store harvested from the tiny GPT-2's transformer.h.1 over a small corpus."""
    from sparsecode.data.harvest import HarvestConfig, harvest

    root = tmp_path_factory.mktemp("gpt2run")
    corpus = write_corpus(root / "corpus", docs=40)
    harvest(HarvestConfig(out=str(root / "store"), model=str(gpt2_dir), hook="transformer.h.1",
                          corpus=str(corpus), tokens=2000, context=32, dtype="fp32"))
    train(TrainConfig(method="topk", coder={"m": 64, "k": 4}, source=SourceConfig(kind="store",
                      path=str(root / "store"), heldout=0.2), steps=20, batch_size=128), root / "run",
          progress=False)
    return root / "run"


@pytest.fixture(scope="module")
def loose_runs(tmp_path_factory):
    """Runs without a store (they need --model and --hook): d=32 (the tiny GPT-2's width) and d=16."""
    root = tmp_path_factory.mktemp("loose")
    for d in (32, 16):
        train(TrainConfig(method="topk", coder={"m": 64, "k": 4}, source=SourceConfig(kind="synthetic",
                          options={"d": d}), steps=5, batch_size=64), root / f"d{d}", progress=False)
    return root


def test_steer_a_causal_lm_prints_continuations_and_the_sweep(gpt2_run, capsys):
    code, out, err = cli(["steer", gpt2_run, "--prompt", "the model reads a sentence", "--feature", "3",
                          "--scale", "6", "--max-new-tokens", "5", "--target", " codebooks",
                          "--sweep", "0", "4", "8"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    clean = next(ln for ln in lines if ln.startswith("clean:   '"))
    steered = next(ln for ln in lines if ln.startswith("steered: '"))
    assert clean.split("'")[1] != steered.split("'")[1]  # feature 3 at 6x its atom changes the continuation
    assert any(ln.startswith("next token after the prompt: KL(clean||steered) ") and "log-prob" in ln for ln in lines)
    assert any(ln.startswith("side effect on 8 held-out contexts: next-token CE increase") for ln in lines)
    table = lines[lines.index(next(ln for ln in lines if ln.strip().startswith("alpha"))) + 1:][:3]
    assert [float(r.split()[0]) for r in table] == [0, 4, 8]
    assert float(table[0].split()[1]) == 0 and float(table[0].split()[2]) == 0  # alpha 0: exactly clean
    assert float(table[2].split()[1]) != 0
    png = gpt2_run / "report" / "steer_sweep.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and str(png) in lines[-1]
    from sparsecode.report import write_report

    page = write_report(gpt2_run, {"fvu": 0.5}, diagnosis={"text": "ok"}).read_text()
    assert 'alt="steer_sweep"' in page


def test_clamping_to_zero_on_a_causal_lm_is_the_ablation_everywhere(gpt2_run, capsys):
    from sparsecode.effects import load_target

    prompt = "the model reads a sentence"
    t = load_target(gpt2_run)
    ids, content = t.prompt(prompt)
    iv = t.intervention(positions=content)
    iv.run(ids[None])
    f = int(iv.codes[0].indices[-1, 0])  # fires on the last token: the hook is the last block, so it must be there
    code, out, err = cli(["steer", gpt2_run, "--prompt", prompt, "--feature", f, "--max-new-tokens", 2,
                          "--value", 0], capsys)
    assert code == 0 and "clamped to 0 on every token" in out, err
    kl = float(out.split("KL(clean||steered) ")[1].split()[0])
    assert kl > 0 and kl == pytest.approx(effect(t.intervention(positions=content).ablate(f), ids[None])["kl"],
                                          rel=1e-3)


def test_ablate_a_causal_lm_prints_per_token_effects(gpt2_run, capsys):
    code, out, err = cli(["ablate", gpt2_run, "--prompt", "the model reads a sentence", "--feature", "3"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert "effect: change of the mean next-token CE" in lines[0] and lines[1].split() == ["pos", "token", "value",
                                                                                          "effect"]
    assert lines[2].split()[2:] == ["-", "-"]  # the BOS the store's contexts start with is not edited
    assert lines[-1].startswith("feature 3 ")


def test_steer_and_ablate_on_minilm(minilm_store, tmp_path, capsys):  # noqa: F811
    from sparsecode.effects import load_target

    run = tmp_path / "run"
    train(TrainConfig(method="topk", coder={"m": 256, "k": 8}, source=SourceConfig(kind="store",
                      path=str(minilm_store), heldout=0.1), steps=20, batch_size=256), run, progress=False)
    prompt = "def read the file and return its lines"
    t = load_target(run)
    ids, content = t.prompt(prompt)
    iv = t.intervention()
    iv.run(ids[None])
    f = int(iv.codes[0].indices[2, 0])  # the strongest feature of the prompt's second word
    code, out, err = cli(["steer", run, "--prompt", prompt, "--feature", 3, "--scale", 4, "--contexts", 2], capsys)
    assert code == 0, err
    assert "pooled embedding of the prompt: 1 - cos(clean, steered) = " in out
    assert "tokens nearest atom 3 (cosine with the input embeddings): '" in out
    assert "side effect on 2 held-out contexts: 1 - cos(pooled embedding) +" in out
    gap = float(out.split("1 - cos(clean, steered) = ")[1].split()[0])
    assert 0 < gap < 1
    code, out, err = cli(["ablate", run, "--prompt", prompt, "--feature", f], capsys)
    assert code == 0, err
    rows = {int(ln.split()[0]): ln.split() for ln in out.splitlines()[2:-1]}
    assert float(rows[2][-2]) > 0 and float(rows[2][-1]) > 0  # it fires there, and ablating it moves the embedding
    assert out.splitlines()[-1].startswith(f"feature {f} fires on ")


AT = ["--model", "{gpt2}", "--hook", "transformer.h.1"]
SHORT = ["--prompt", "the model reads"]


@pytest.mark.parametrize("args, message", [
    (["steer", "{d32}", *SHORT, "--feature", "64", "--scale", "1", *AT],
     "feature 64 is outside the run's dictionary of m=64 atoms"),
    (["ablate", "{d32}", *SHORT, "--feature", "-1", *AT], "feature -1 is outside the run's dictionary of m=64"),
    (["steer", "{d32}", *SHORT, "--feature", "1", "--scale", "1", "--model", "{gpt2}", "--hook", "transformer.h.9"],
     "the model has no module 'transformer.h.9'; closest: transformer.h"),
    (["steer", "{d16}", *SHORT, "--feature", "1", "--scale", "1", *AT],
     "the run's coder reads d_in=16, but 'transformer.h.1' gives width 32"),
    (["ablate", "{d16}", *SHORT, "--feature", "1", *AT],
     "the run's coder reads d_in=16, but 'transformer.h.1' gives width 32"),
    (["steer", "{d32}", "--prompt", "{long}", "--feature", "1", "--scale", "1", *AT],
     "the prompt has [0-9]+ tokens but the run takes at most 64"),
    (["ablate", "{d32}", "--prompt", "{long}", "--feature", "1", *AT],
     "the prompt has [0-9]+ tokens but the run takes at most 64"),
    (["steer", "{d32}", *SHORT, "--feature", "1", "--scale", "1", "--max-new-tokens", "62", *AT],
     "and 62 new ones exceed the model's context of 64"),
    (["steer", "{d32}", *SHORT, "--feature", "1", *AT], "steer needs --value V"),
    (["steer", "{d32}", *SHORT, "--feature", "1", "--scale", "1"], "pass --model and --hook"),
])
def test_bad_input_is_one_line_and_exit_2(gpt2_dir, loose_runs, capsys, args, message):  # noqa: F811
    import re

    long = " ".join(["the model reads a sentence and"] * 12)
    args = [a.format(d32=loose_runs / "d32", d16=loose_runs / "d16", gpt2=gpt2_dir, long=long) for a in args]
    code, out, err = cli(args, capsys)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err
