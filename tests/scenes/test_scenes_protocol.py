"""The scenes world in the protocol: its run graph with equal budgets, rows that pair each
Hyper-SD row with the baselines' checkpoint at its training samples, and who-leads
verdicts with Holm's correction."""

import json

import numpy as np
import pytest

from hypersd_core.protocol.world import load_world
from hypersd_core.training.config import load_preset


def test_scenes_world_loads_and_its_baselines_reach_the_unified_count():
    world = load_world("scenes")
    runs = {r.name: r for r in world.runs()}
    cfg = {n: load_preset(r.preset, list(r.overrides)) for n, r in runs.items()}
    chain = sum(cfg[f"k{k}"].steps * cfg[f"k{k}"].batch_size for k in (8, 4, 2, 1))
    unified = chain + cfg["dmd"].steps * cfg["dmd"].batch_size
    for b in ("lcm", "tcd"):
        assert cfg[b].steps * cfg[b].batch_size == unified
        per_ckpt = cfg[b].checkpoint_every * cfg[b].batch_size
        assert cfg["k8"].steps * cfg["k8"].batch_size % per_ckpt == 0
    assert runs["dmd"].parent == "k1" and all(c.lora_rank == 16 for c in cfg.values())


def test_rows_pair_each_baseline_checkpoint_with_the_compared_rows_samples(tmp_path):
    from hypersd_core.scenes.protocol import lead_pairs, row_specs

    for step in (600, 1200, 1800, 2400):
        (tmp_path / "lcm" / "checkpoints" / f"step-{step:07d}").mkdir(parents=True)
    runs = {f"k{k}": {"samples": s, "batch_size": 16, "steps": 600}
            for k, s in ((8, 9600), (4, 19200), (2, 28800), (1, 38400))}
    runs["lcm"] = {"samples": 46400, "batch_size": 16, "steps": 2900}
    (tmp_path / "protocol.json").write_text(json.dumps({"runs": runs}))
    rows = {r["label"]: r for r in row_specs(tmp_path)}
    assert rows["lcm@4"]["adapter"].parent.name == "step-0001200"  # 19,200 = k4's count
    assert rows["lcm@1"]["adapter"].parent.name == "step-0002400"
    assert rows["lcm@1/u"]["adapter"].parent.name == "final"
    assert ("unified@2", "tcd@2/u") in lead_pairs(set(rows))
    assert ("hypersd@2", "tcd@2") in lead_pairs(set(rows))


def test_the_adversarial_ablation_replaces_k2_k1_and_dmd_at_their_budgets(tmp_path):
    from hypersd_core.scenes.protocol import lead_pairs, row_specs

    runs = {r.name: r for r in load_world("scenes").runs()}
    cfg = {n: load_preset(r.preset, list(r.overrides)) for n, r in runs.items()}
    for name, main in (("k2-advoff", "k2"), ("k1-advoff", "k1"), ("dmd-advoff", "dmd")):
        assert runs[name].group == "ablation" and runs[name].preset == runs[main].preset
        assert cfg[name].steps * cfg[name].batch_size == cfg[main].steps * cfg[main].batch_size
    assert cfg["k2-advoff"].adv_weight == 0.0 < cfg["k2"].adv_weight
    assert (runs["k2-advoff"].parent, runs["k1-advoff"].parent, runs["dmd-advoff"].parent) \
        == ("k4", "k2-advoff", "k1-advoff")
    assert not any(r["label"].startswith(("hypersd-advoff", "unified-advoff"))
                   for r in row_specs(tmp_path))  # no rows until the runs exist
    for name in ("k1-advoff", "dmd-advoff"):
        (tmp_path / name).mkdir()
    labels = {r["label"] for r in row_specs(tmp_path)}
    assert {"hypersd-advoff@1", "unified-advoff@1", "unified-advoff@8"} <= labels
    assert "hypersd-advoff@2" not in labels
    assert ("unified-advoff@1", "lcm@1/u") in lead_pairs(labels)
    (tmp_path / "dmd-advoff-long").mkdir()  # beyond the budget: rows, never a who-leads pair
    labels = {r["label"] for r in row_specs(tmp_path)}
    assert {"unified-advoff-long@1", "unified-advoff-long@2"} <= labels
    assert "unified-advoff-long@4" not in labels
    assert not any(a.startswith("unified-advoff-long") for a, _ in lead_pairs(labels))
    pairs = lead_pairs(labels)  # the stricter pairs come after the equal-budget ones
    assert pairs.index(("unified-advoff@1", "lcm@1")) > pairs.index(("unified-advoff@8", "tcd@8/u"))


def _row(rng, n, shift=0.0, acc=0.9):
    out = {"source": np.repeat(np.arange(n // 4), 4)}
    for k in ("class_acc", "colour_acc", "size_acc", "position_acc", "all_correct"):
        out[k] = (rng.random(n) < acc).astype(float)
    for s in ("detector", "random", "pixels"):
        out[f"f_{s}"] = rng.normal(size=(n, 4)) + shift
    return out


@pytest.mark.usefixtures("one_thread")
def test_leads_call_a_clearly_better_row_ahead_and_a_copy_level():
    from hypersd_core.scenes.protocol import leads

    rng = np.random.default_rng(0)
    ref = {"source": np.repeat(np.arange(100), 4),
           **{f"f_{s}": rng.normal(size=(400, 4)) for s in ("detector", "random", "pixels")}}
    good, bad = _row(rng, 400, 0.0, 0.95), _row(rng, 400, 1.5, 0.5)
    arrays = {"hypersd@1": good, "lcm@1": bad, "hypersd@2": good, "tcd@2": dict(good)}
    rows = {(r["hypersd"], r["baseline"]): r for r in leads(arrays, ref, n_boot=200)}
    assert rows[("hypersd@1", "lcm@1")]["verdict"] == "ahead on 8 of 8"
    assert rows[("hypersd@2", "tcd@2")]["verdict"] == "level"
    assert all(v["p_holm"] >= v["p"] for k, v in rows[("hypersd@1", "lcm@1")].items()
               if isinstance(v, dict))


def test_a_rows_cache_key_follows_the_adapters_content_not_its_label(tmp_path):
    """A label that later names another checkpoint must not read a stale cached row; the
    same adapter under another path or label is the same row."""
    from hypersd_core.scenes.evaluate import row_key
    from hypersd_core.worlds import scenes as world

    items = world.scenes("eval", 4)
    a, b, a2 = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "c.safetensors"
    a.write_bytes(b"first checkpoint")
    b.write_bytes(b"second checkpoint")
    a2.write_bytes(b"first checkpoint")
    row = {"label": "lcm@2", "method": "lcm", "steps": 2}
    key_a = row_key({**row, "adapter": str(a)}, items)
    assert key_a != row_key({**row, "adapter": str(b)}, items)
    assert key_a == row_key({**row, "label": "lcm@2/u", "adapter": str(a2)}, items)
    assert key_a != row_key({**row, "adapter": str(a)}, world.scenes("tune", 4))
    assert key_a != row_key({**row, "steps": 4, "adapter": str(a)}, items)
    teacher = {"label": "teacher@4", "method": "teacher", "steps": 4, "adapter": None}
    assert row_key(teacher, items) != row_key(teacher, items, guidance=5.0)
    # a rebuilt teacher (other weights) never reads the previous teacher's rows
    assert row_key(teacher, items, model="aaaa") != row_key(teacher, items, model="bbbb")


def test_shipped_scenes_adapters_carry_the_names_the_samplers_recipes_load():
    from hypersd_core.models.sampling import RECIPES, TSCD_STAGES
    from hypersd_core.scenes.protocol import SHIPPED, WORLD

    wanted = {RECIPES["lcm"].adapter, RECIPES["tcd"].adapter, RECIPES["hypersd-unified"].adapter,
              *(RECIPES["hypersd"].adapter.format(k=k) for k in TSCD_STAGES)}
    assert set(SHIPPED.values()) == wanted
    assert WORLD.ship is not None and set(WORLD.shipped) == set(SHIPPED)
