"""The world-agnostic protocol: statistics (FD, KID, cluster bootstraps, Holm), budgets
counted in UNet forward-equivalents, and the world registry."""

import numpy as np
import pytest
import torch

from hypersd_core.protocol import stats
from hypersd_core.protocol.budget import ForwardCounter, budget_table, row_budget
from hypersd_core.protocol.summary import Measures, References, paired_differences, summarize_row


def test_holm_matches_the_step_down_rule():
    # sorted p 0.01, 0.02, 0.03, 0.04 with m = 4: x4, x3, x2, x1, then monotone
    assert np.allclose(stats.holm([0.03, 0.01, 0.04, 0.02]), [0.06, 0.04, 0.06, 0.06])
    assert stats.holm([0.5, 0.9]) == [1.0, 1.0]
    assert stats.holm([]) == []


def test_bootstrap_p_is_small_far_from_zero_and_one_at_zero():
    rng = np.random.default_rng(0)
    assert stats.bootstrap_p(rng.normal(5.0, 1.0, 1000)) < 1e-4
    assert stats.bootstrap_p(rng.normal(0.0, 1.0, 1000)) > 0.05
    assert stats.bootstrap_p(np.zeros(100)) == 1.0


def test_cluster_resample_draws_whole_clusters():
    clusters = np.repeat(np.arange(50), 8)
    idx = stats.cluster_resample(clusters, np.random.default_rng(0))
    assert len(idx) == 400
    drawn = np.bincount(clusters[idx], minlength=50)
    assert set(drawn.tolist()) <= {0, 8, 16, 24, 32, 40, 48}  # multiples of a whole cluster
    w = stats.cluster_weights(clusters, np.random.default_rng(0))
    assert w.sum() == 400 and all(len(set(w[clusters == c])) == 1 for c in range(50))
    a, b = stats.cluster_split(clusters, np.random.default_rng(0))
    assert not set(clusters[a]) & set(clusters[b]) and len(a) + len(b) == 400


def test_cluster_bootstrap_is_wider_when_members_share_their_source():
    """8 near-copies per source: resampling by image treats them as 8 independent draws
    and gives too narrow an interval; by cluster it does not."""
    rng = np.random.default_rng(1)
    base = rng.normal(size=(60, 3))
    ref = np.repeat(base, 8, 0) + 0.01 * rng.normal(size=(480, 3))
    clusters = np.repeat(np.arange(60), 8)
    row = rng.normal(size=(300, 3))
    spread = {}
    for name, cl in (("image", None), ("cluster", clusters)):
        b = stats.BootstrapReference(ref, cl, 300, 0)
        mu, cov = stats.weighted_stats(row, np.ones(300))
        spread[name] = np.std([b.fd(mu, cov, r) for r in range(300)])
    assert spread["cluster"] > 2 * spread["image"]


def test_fast_fd_and_kid_equal_the_direct_formulas():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(200, 6)), rng.normal(size=(300, 6)) + 0.5
    ref = stats.BootstrapReference(b, None, 2, 0)
    mu, cov = stats.weighted_stats(a, np.ones(200))
    assert abs(ref.fd(mu, cov) - stats.fd(a, b)) < 1e-8
    kaa, kab = stats.kid_kernels(a, b)
    kbb, _ = stats.kid_kernels(b, b[:1])
    assert abs(stats.kid_weighted(kaa, kbb, kab, np.ones(200), np.ones(300)) - stats.kid(a, b)) < 1e-9
    assert abs(stats.kid(a, rng.normal(size=(300, 6)))) < 0.05 < stats.kid(a, b)


def test_summary_pairs_rows_and_flips_rates_so_negative_means_better():
    rng = np.random.default_rng(3)
    m = Measures(spaces={"f": ""}, kid_spaces=("f",), rates={"ok": "acc"}, means=("err",))
    real = {"f": rng.normal(size=(400, 4)), "cluster": np.repeat(np.arange(100), 4)}
    refs = References({"real": real}, m, n_boot=200)
    x = rng.normal(size=(150, 4))
    good = {"f": x, "ok": np.ones(150, bool), "err": np.full(150, 1.0)}
    bad = {"f": x + 0.7, "ok": np.zeros(150, bool), "err": np.full(150, 3.0)}
    row = summarize_row(good, refs)
    assert row["fd_real_ci"][0] <= row["fd_real"] <= row["fd_real_ci"][1] and row["n_boot"] == 200
    d = paired_differences(good, bad, refs)
    for key in ("fd_real", "kid_real", "acc", "err"):
        assert d[key]["diff"] < 0 and d[key]["ci"][1] < 0 and d[key]["p"] < 1e-3, key
    same = paired_differences(good, good, refs)
    assert same["fd_real"]["diff"] == 0 and same["fd_real"]["p"] == 1.0


class UNet2DConditionModel(torch.nn.Module):  # counted by class name, as diffusers' UNet
    def forward(self, sample, t=None):
        return sample * 2


def test_forward_counter_counts_rows_and_backward():
    unet = UNet2DConditionModel()
    x = torch.ones(4, 3, requires_grad=True)
    with ForwardCounter() as c:
        with torch.no_grad():
            unet(torch.ones(6, 3))  # a teacher call: 6 rows, forward only
        unet(x).sum().backward()  # a student call: 4 rows, forward + backward
        torch.nn.Linear(3, 3)(x)  # not a UNet: not counted
    assert (c.calls, c.rows, c.rows_grad) == (2, 6, 4)
    assert c.forward_equivalents == 6 + 3 * 4
    unet(x)  # after the block: not counted
    assert c.calls == 2


def test_row_budget_includes_the_parents():
    runs = {"k8": {"steps": 10, "batch_size": 4, "parent": None, "fe_per_sample": 6.0,
                   "seconds": 5.0, "lora_rank": 16},
            "k4": {"steps": 20, "batch_size": 4, "parent": "k8", "fe_per_sample": 15.0,
                   "seconds": 7.0, "lora_rank": 16},
            "x": {"steps": 1, "batch_size": 2, "parent": "k4", "lora_rank": 32}}
    assert row_budget(runs, "k4") == {"samples": 120, "forward_equivalents": 40 * 6 + 80 * 15,
                                      "seconds": 12.0, "rank": 16}
    assert row_budget(runs, "x")["forward_equivalents"] is None  # a cost not measured
    table = budget_table(runs)
    assert "| k4 | k8 | 120 | 1,440 | 12 | 16 |" in table and "| x | k4 | 122 | - |" in table


def test_worlds_load_by_name_and_unknown_is_one_clear_error():
    from hypersd_core.protocol.world import load_world

    world = load_world("digits")
    assert world.name == "digits" and {"k8", "lcm", "tcd", "dmd"} <= {r.name for r in world.runs()}
    with pytest.raises(ValueError, match="unknown world 'moon'"):
        load_world("moon")


def test_protocol_cli_budget(tmp_path, capsys):
    import json

    from hypersd_core.protocol.__main__ import main

    (tmp_path / "protocol.json").write_text(json.dumps({"runs": {
        "lcm": {"steps": 3, "batch_size": 2, "parent": None, "fe_per_sample": 6.0,
                "seconds": 1.5, "lora_rank": 16}}}))
    assert main(["budget", "--world", "digits", "--protocol", str(tmp_path / "protocol.json")]) == 0
    assert "| lcm | - | 6 | 36 | 2 | 16 |" in capsys.readouterr().out


@pytest.mark.usefixtures("one_thread")
def test_a_later_invocation_keeps_finished_runs_and_resumes_an_interrupted_one(tmp_path):
    """The run graph is resumable across invocations: a run finished by an earlier one is
    kept with its record (not retrained, not refused as an existing folder); a run left
    without its final adapter continues from its folder."""
    import json

    from hypersd_core.protocol.runner import WEIGHTS, RunSpec, run_protocol

    root = tmp_path / "root"
    runs = [RunSpec("a", "digits-tscd-k8"), RunSpec("b", "digits-tscd-k4", parent="a")]
    quiet = dict(steps_scale=0.004, log=lambda *_: None, costs=False)
    first = run_protocol(root, 1, ["a"], runs=runs, **quiet)
    assert first["runs"]["a"]["state"] == "done"
    weights_a = (root / "a" / WEIGHTS).stat().st_mtime_ns
    second = run_protocol(root, 1, ["a", "b"], runs=runs, **quiet)
    assert (root / "a" / WEIGHTS).stat().st_mtime_ns == weights_a  # a was not retrained
    assert second["runs"]["a"] == first["runs"]["a"]
    assert second["runs"]["b"]["state"] == "done"
    assert second["runs"]["b"]["samples"] == 2 * second["runs"]["a"]["samples"]
    (root / "b" / WEIGHTS).unlink()  # as if killed before the end
    third = run_protocol(root, 1, ["a", "b"], runs=runs, **quiet)
    assert third["runs"]["b"]["state"] == "done" and (root / "b" / WEIGHTS).is_file()
    assert json.loads((root / "protocol.json").read_text())["runs"]["a"] == first["runs"]["a"]


def test_matched_adapter_picks_the_baseline_checkpoint_at_the_compared_rows_samples(tmp_path):
    import json

    from hypersd_core.protocol.runner import matched_adapter, run_samples

    root = tmp_path
    for step in (300, 600, 900):
        (root / "lcm" / "checkpoints" / f"step-{step:07d}").mkdir(parents=True)
    (root / "protocol.json").write_text(json.dumps({"runs": {
        "lcm": {"steps": 1200, "batch_size": 32, "samples": 38400, "parent": None},
        "k8": {"steps": 600, "batch_size": 32, "samples": 19200, "parent": None}}}))
    assert run_samples(root) == {"lcm": 38400, "k8": 19200}
    ck = matched_adapter(root, "lcm", 19200)
    assert ck == root / "lcm" / "checkpoints" / "step-0000600" / "lora.safetensors"
    assert matched_adapter(root, "lcm", 19201).parent.name == "step-0000900"  # never fewer
    final = root / "lcm" / "final" / "pytorch_lora_weights.safetensors"
    assert matched_adapter(root, "lcm", 38400) == final and matched_adapter(root, "lcm", None) == final
    assert run_samples(tmp_path / "none") == {}


def test_cluster_moments_give_the_statistics_of_the_materialised_replicate():
    """A replicate's mean and covariance from per-cluster sums equal np.cov of the images
    the replicate draws (each cluster's members repeated as often as it was drawn)."""
    from hypersd_core.protocol.stats import ClusterMoments

    rng = np.random.default_rng(3)
    x = rng.normal(size=(90, 5)) + rng.normal(size=5)
    inverse = rng.integers(0, 12, 90)
    inverse[:12] = np.arange(12)  # every cluster has a member
    counts = np.bincount(rng.integers(0, 12, 12), minlength=12).astype(float)
    mu, cov = ClusterMoments(x, inverse).stats(counts)
    drawn = np.repeat(np.arange(90), counts[inverse].astype(int))
    np.testing.assert_allclose(mu, x[drawn].mean(0), atol=1e-10)
    np.testing.assert_allclose(cov, np.cov(x[drawn], rowvar=False), atol=1e-10)
