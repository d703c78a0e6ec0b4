"""AuxK's dead window acts within any run: by default it is a tenth of the run's tokens (at most 10M)."""

import json

from sae_helpers import one_thread

from sparsecode.coder import auto_dead_tokens, build
from sparsecode.data.source import SourceConfig
from sparsecode.train import TrainConfig, train


def test_the_auto_window_is_a_tenth_of_the_run_capped_at_the_papers_10m():
    assert auto_dead_tokens(717_000) == 35_850 and auto_dead_tokens(10**9) == 10_000_000
    assert auto_dead_tokens(5) == 1
    assert build("topk", {"d_in": 8, "m": 16, "k": 2}).dead_tokens == 1_000_000  # no run to tie it to


def test_auxk_acts_within_a_run_shorter_than_the_old_1m_window(tmp_path):
    """25,600 tokens of training: the default window (1,280) lets AuxK act from early on; the old fixed
    default of 1M tokens never let it act."""
    src = SourceConfig(kind="synthetic", options={"d": 32, "n_features": 64, "active": 2})
    base = dict(method="topk", source=src, steps=100, batch_size=256, lr=1e-2, log_every=10)
    acted = {}
    with one_thread():
        for name, coder in (("auto", {"m": 512, "k": 4}), ("1m", {"m": 512, "k": 4, "dead_tokens": 1_000_000})):
            coder_ = train(TrainConfig(**base, coder=coder), tmp_path / name)
            log = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            acted[name] = [r["step"] for r in log if r.get("loss/auxk", 0) > 0]
            saved = json.loads((tmp_path / name / "config.json").read_text())["coder"]["dead_tokens"]
            assert saved == coder_.cfg.dead_tokens == coder.get("dead_tokens", 1280)
    assert acted["1m"] == [] and acted["auto"][0] <= 20 and len(acted["auto"]) >= 9, acted
