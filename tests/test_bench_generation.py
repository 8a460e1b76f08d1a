"""bench/generation.py end to end on the tiny model (CPU): every side's provenance, the exactness checks, the files.

No timing assertions: which side is faster is what the benchmark measures, not something a test may assume."""

import json
import math
from pathlib import Path

import pytest

from tests.bench import load_bench

ROOT = Path(__file__).resolve().parents[1]


gb = load_bench("generation")


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    r = gb.main(["--model", "tiny", "--prompts", "5", "--n", "2", "--max_new_tokens", "6", "--batch_size", "4",
                 "--rounds", "2", "--threads", "1", "--results_dir", str(out)])
    return r, out


def test_every_side_samples_every_response_with_finite_throughput(result):
    r, _ = result
    assert list(r["sides"]) == ["naive", "ours", "ours+static"]
    for side in r["sides"].values():
        assert side["responses"] == 5 * 2
        assert 0 < side["new_tokens"] <= 5 * 2 * 6
        assert len(side["seconds_all"]) == 2
        for key in ("responses_per_s", "tokens_per_s"):
            assert math.isfinite(side[key]) and side[key] > 0
    # The static cache changes how generate() stores keys and values, not what it samples.
    assert r["sides"]["ours+static"]["same_samples_as_ours"] == 1.0


def test_ratio_is_ours_over_naive(result):
    r, _ = result
    naive, ours = r["sides"]["naive"], r["sides"]["ours"]
    assert r["ratio"] == pytest.approx(ours["responses_per_s"] / naive["responses_per_s"], rel=1e-12)
    assert r["ratios"]["ours+static"] == pytest.approx(
        r["sides"]["ours+static"]["responses_per_s"] / naive["responses_per_s"], rel=1e-12)


def test_stored_logps_are_exact(result):
    r, _ = result
    assert set(r["exactness"]) == {"ours", "ours+static"}
    for check in r["exactness"].values():
        assert check["tolerance"] == 1e-4  # float32 on CPU
        assert 0 <= check["rescore_max_abs"] < 1e-4
        assert 0 <= check["sampler_max_abs"] < 1e-4
        assert check["pass"]


def test_with_batch_size_n_ours_draws_naive_samples(tmp_path):
    """One prompt per chunk, seeded as the naive loop seeds it: both sides then sample the very same tokens."""
    r = gb.main(["--model", "tiny", "--prompts", "3", "--n", "2", "--max_new_tokens", "5", "--batch_size", "2",
                 "--rounds", "1", "--sides", "naive,ours", "--results_dir", str(tmp_path)])
    assert r["sides"]["ours"]["same_samples_as_naive"] == 1.0
    assert r["sides"]["ours"]["new_tokens"] == r["sides"]["naive"]["new_tokens"]


def test_result_files_are_written(result):
    r, out = result
    data = json.loads((out / "generation_tiny_cpu.json").read_text())
    assert data["ratio"] == r["ratio"] and data["settings"]["prompts"] == 5
    assert data["command"].startswith("python bench/generation.py --model tiny")
    md = (out / "generation_tiny_cpu.md").read_text()
    assert "ratio to naive" in md and "PASS" in md and "PLUMBING CHECK ONLY" in md and data["hardware"] in md
