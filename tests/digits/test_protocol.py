"""The comparison protocol: equal budgets, the teacher's few-step recipe, the eta table,
the two-space metrics with intervals, and the trajectory diagnostic."""

import numpy as np
import pytest
import torch

from hypersd_core.digits.metrics import RandomFeatureNet, fd, summarize
from hypersd_core.digits.protocol import protocol_runs
from hypersd_core.models.sampling import Recipe, recipe_eta, scheduler_kwargs
from hypersd_core.training.config import load_preset


def test_baselines_get_the_samples_of_the_whole_tscd_chain():
    runs = {r.name: r for r in protocol_runs()}
    cfg = {n: load_preset(runs[n].preset, list(runs[n].overrides)) for n in runs}
    chain = sum(cfg[n].steps * cfg[n].batch_size for n in ("k8", "k4", "k2", "k1"))
    for name in ("lcm", "tcd", "k1-direct"):
        assert cfg[name].steps * cfg[name].batch_size >= chain, name
    # equal budgets: the baselines reach the unified adapter's count (parents included),
    # with a checkpoint at every N-step adapter's count
    unified = sum(cfg[n].steps * cfg[n].batch_size for n in ("k1-direct", "dmd"))
    for name in ("lcm", "tcd"):
        assert cfg[name].steps * cfg[name].batch_size == unified, name
        per_ckpt = cfg[name].checkpoint_every * cfg[name].batch_size
        assert chain % per_ckpt == 0 and cfg[name].keep_checkpoints * cfg[name].checkpoint_every \
            >= cfg[name].steps, name
    for name in runs:  # one target, batch and rank for every consistency run
        if cfg[name].stage in ("tscd", "lcm", "tcd"):
            assert (cfg[name].w_min, cfg[name].w_max) == (1.0, 1.0), name
            assert (cfg[name].batch_size, cfg[name].lora_rank) == (32, 16), name
    assert all(r.parent is None or r.parent in runs for r in runs.values())
    assert load_preset("digits-dmd").dmd_real_guidance == 2.0


def test_teacher_few_step_rows_use_trailing_spacing():
    from diffusers import DDIMScheduler

    from hypersd_core.models.sampling import get_recipe

    teacher = get_recipe("teacher")
    base = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                set_alpha_to_one=False, steps_offset=1)
    few = DDIMScheduler(**base, **scheduler_kwargs(teacher, 4))
    few.set_timesteps(4)
    assert few.timesteps.tolist() == [999, 749, 499, 249]
    stock = DDIMScheduler(**base, **scheduler_kwargs(teacher, 25))
    stock.set_timesteps(25)
    assert stock.timesteps[0] == 961  # 25 steps stays the stock (leading) teacher


def test_eta_table_uses_the_nearest_measured_step_count():
    r = Recipe("x", "TCDScheduler", eta=1.0, eta_by_steps=((2, 0.0), (4, 0.1), (8, 0.3)))
    assert [recipe_eta(r, n) for n in (1, 2, 3, 4, 5, 6, 7, 8, 16)] == \
        [0.0, 0.0, 0.0, 0.1, 0.1, 0.1, 0.3, 0.3, 0.3]
    assert recipe_eta(Recipe("y", "TCDScheduler", eta=0.3), 4) == 0.3  # no table: the default


def test_fd_and_bootstrap_intervals():
    rng = np.random.default_rng(0)
    real = {"project": rng.normal(size=(600, 8)), "random": rng.normal(size=(600, 8))}
    same = {"project": rng.normal(size=(400, 8)), "random": rng.normal(size=(400, 8)),
            "digit_ok": rng.random(400) < 0.9, "colour_ok": np.ones(400, bool)}
    shifted = {**same, "project": same["project"] + 1.0}
    a, b = summarize(same, real, n_boot=40), summarize(shifted, real, n_boot=40)
    assert a["fd_real"] < 0.2 and abs(b["fd_real"] - 8.0) < 1.0  # |mu|^2 = 8
    lo, hi = b["fd_real_ci"]
    assert lo < b["fd_real"] < hi and hi < a["fd_real"] + 10
    assert a["digit_acc_ci"][0] < a["digit_acc"] < a["digit_acc_ci"][1]
    assert abs(fd(same["project"], same["project"])) < 1e-6


def test_paired_difference_separates_rows_whose_own_intervals_overlap():
    """Two rows with a large shared error (as methods distilled from one teacher have) and
    a small difference: each row's interval overlaps the other's, the paired one does not."""
    from hypersd_core.digits.metrics import paired_difference

    rng = np.random.default_rng(1)
    refs = {k: {"project": rng.normal(size=(300, 6)), "random": rng.normal(size=(300, 6))}
            for k in ("real", "teacher")}
    x = rng.normal(size=(200, 6))
    ok = np.ones(200, bool)
    base = {"project": x + 1.0, "random": rng.normal(size=(200, 6)), "digit_ok": ok,
            "colour_ok": ok}
    worse = {**base, "project": x + 1.0 + 0.25 * np.array([1, -1, 1, -1, 1, -1])}
    d = paired_difference(base, worse, refs, "fd_real", n_boot=60)
    assert d["ci"][1] < 0 < -d["diff"] and d["a_better"] > 0.95
    a, b = summarize(base, refs["real"], n_boot=40), summarize(worse, refs["real"], n_boot=40)
    assert a["fd_real_ci"][1] > b["fd_real_ci"][0]  # the rows' own intervals overlap
    same = paired_difference(base, base, refs, "fd_real_random", n_boot=20)
    assert same["diff"] == 0 and same["ci"] == [0, 0]
    with pytest.raises(ValueError, match="same images"):
        paired_difference(base, {k: v[:100] for k, v in base.items()}, refs)


def test_random_features_are_fixed_and_see_colour():
    x = torch.zeros(2, 3, 32, 32)
    x[0, 0, 8:24, 14:18] = 1.0  # a red stroke
    x[1, 2, 8:24, 14:18] = 1.0  # the same stroke in blue
    f1, f2 = RandomFeatureNet()(x), RandomFeatureNet()(x)
    assert torch.equal(f1, f2) and f1.shape == (2, 160)
    assert (f1[0] - f1[1]).abs().max() > 1e-3


def test_offset_noise_on_any_device():
    from hypersd_core.distill import schedule as S

    noise = torch.zeros(2, 4, 3, 3, device="meta")
    out = S.offset_noise(noise, 0.1, torch.Generator().manual_seed(0))
    assert out.device.type == "meta" and out.shape == noise.shape


@pytest.mark.slow
def test_trajectory_error_is_zero_for_the_teacher_on_its_own_grid(tiny_sd15):
    """DDIM trailing with 8 steps visits exactly the 8-step solver grid, so the teacher's
    own sampler must match its ODE states there."""
    from hypersd_core.digits.trajectory import trajectory_error
    from hypersd_core.models.backbone import load_backbone
    from hypersd_core.models.sampling import Sampler

    sampler = Sampler(load_backbone(str(tiny_sd15)))
    res = trajectory_error(sampler, "teacher", 8, ["a red handwritten digit 7"] * 2, [0, 1],
                           teacher_steps=8)
    assert res["timesteps"] == [874, 749, 624, 499, 374, 249, 124, -1]
    assert max(res["rmse"]) < 1e-4, res["rmse"]
    far = trajectory_error(sampler, "teacher", 2, ["a red handwritten digit 7"] * 2, [0, 1])
    assert far["rmse"][-1] > 10 * max(res["rmse"])


def test_report_names_the_tuned_hypersd_row_and_its_lead(tmp_path):
    """protocol_report on synthetic rows: the Hyper-SD row is picked on the tune seeds,
    and its paired lead over a worse baseline is reported as ahead."""
    import json

    from hypersd_core.digits.protocol_eval import save_arrays
    from hypersd_core.digits.protocol_report import report

    rng = np.random.default_rng(2)
    n, dim = 160, 5
    real = {"project": rng.normal(size=(400, dim)), "random": rng.normal(size=(400, dim))}
    x = rng.normal(size=(n, dim))

    def row(shift):
        return {"project": x + shift, "random": x + shift, "digit_ok": np.ones(n, bool),
                "colour_ok": np.ones(n, bool)}

    saved = {"ref/teacher@25": row(0.0)}
    rows = []
    for rid, shift, tune_fd in (("hypersd@2", 0.3, 5.0), ("unified@2/eta1.0", 0.8, 1.0),
                                ("lcm@2", 1.0, 9.0), ("tcd@2", 1.0, 9.0)):
        saved[f"eval/{rid}"] = row(shift)
        meta = {"id": rid, "method": rid.split("@")[0], "steps": 2, "eta": None}
        rows.append({**meta, "seeds": "eval", "fd_real": 0.0})
        rows.append({**meta, "seeds": "tune", "fd_real": tune_fd})
    save_arrays(saved, real, tmp_path)
    (tmp_path / "rows.json").write_text(json.dumps({"rows": rows, "fd_floor": 0.1}))
    rec = report(tmp_path, tmp_path / "missing.json", tmp_path / "out", n_boot=20)
    picked = {r["baseline"]: r for r in rec["leads"]}
    # the unified row had the lower tune FD, so it is named, though hypersd@2 is better here
    assert picked["lcm@2"]["hypersd"] == "unified@2/eta1.0"
    assert picked["lcm@2"]["fd_real"]["ci"][1] < 0 and picked["lcm@2"]["verdict"] == "ahead on 4 of 4"
    assert "| 2 | unified@2/eta1.0 | lcm@2 |" in (tmp_path / "out.md").read_text()


def test_ship_exports_a_finished_protocol_and_refuses_a_partial_one(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    from hypersd_core.digits.protocol import SHIPPED, ship
    from hypersd_core.training.runs import Run

    root, out = tmp_path / "protocol", tmp_path / "adapters"
    record = {"runs": {}}
    for name in SHIPPED:
        run = Run.create(root / name, load_preset("digits-tscd-k8"))
        run.final_dir.mkdir(parents=True)
        save_file({"w": torch.ones(2, 2)}, str(run.final_dir / "pytorch_lora_weights.safetensors"))
        run.metrics_path.write_text('{"step": 1, "loss_adv_d": 1.2}\n')
        record["runs"][name] = {"state": "done", "seconds": 1.0, "steps": 600, "batch_size": 32,
                                "samples": 19200, "parent": None}
    record["runs"]["dmd"]["state"] = "failed"
    (root / "protocol.json").write_text(json.dumps(record))
    with pytest.raises(SystemExit, match="dmd"):
        ship(root, out)
    assert not out.exists()
    record["runs"]["dmd"]["state"] = "done"
    (root / "protocol.json").write_text(json.dumps(record))
    times = ship(root, out)
    weights = load_file(str(out / "hypersd-k2" / "pytorch_lora_weights.safetensors"))
    assert weights["w"].dtype == torch.float16
    assert (out / "hypersd-unified" / "metrics.jsonl").read_text().startswith('{"step": 1')
    assert times["lcm"]["samples"] == 19200
    assert json.loads((out / "stage_times.json").read_text()) == times


def test_eval_parts_split_the_rows_between_main_runs_and_the_rest(tmp_path):
    from hypersd_core.digits.protocol_eval import row_specs, select_rows

    root = tmp_path / "protocol"
    specs = row_specs(root)
    main, rest = select_rows(specs, root, "main"), select_rows(specs, root, "rest")
    assert len(main) + len(rest) == len(specs) and select_rows(specs, root, "all") == specs
    ids = {s["id"] for s in main}
    assert {"teacher@25", "lcm@4", "tcd@8", "hypersd@2", "unified@1/eta0.3"} <= ids
    assert {s["id"] for s in rest} >= {"k2-advoff@2", "k1-direct@1", "lcm-lr1.0e-3@4"}
    assert all(s["adapter"] is None or "/k2-advoff/" not in s["adapter"] for s in main)


def test_a_training_checkpoint_is_copied_in_the_final_adapter_form(tmp_path):
    from safetensors.torch import load_file, save_file

    from hypersd_core.digits.protocol_eval import copy_adapter

    ckpt, final = tmp_path / "lora.safetensors", tmp_path / "final.safetensors"
    save_file({"down_blocks.0.proj_in.lora_A.weight": torch.ones(2, 2)}, str(ckpt))
    save_file({"unet.down_blocks.0.proj_in.lora_A.weight": torch.ones(2, 2)}, str(final))
    copy_adapter(ckpt, tmp_path / "a.safetensors")
    copy_adapter(final, tmp_path / "b.safetensors")
    assert list(load_file(str(tmp_path / "a.safetensors"))) == ["unet.down_blocks.0.proj_in.lora_A.weight"]
    assert list(load_file(str(tmp_path / "b.safetensors"))) == ["unet.down_blocks.0.proj_in.lora_A.weight"]


def test_faithful_stage_rows_have_equal_budgets():
    """DMD2 with and without rewards, PCM's real = target vs data, and the paper's TSCD
    choices: each pair differs in its one setting only (steps, batch, rank, parent)."""
    runs = {r.name: r for r in protocol_runs()}
    cfg = {n: load_preset(runs[n].preset, list(runs[n].overrides)) for n in runs}

    def budget(n):
        return (cfg[n].steps, cfg[n].batch_size, cfg[n].grad_accum, cfg[n].lora_rank)

    pairs = [("dmd", "dmd-nofb"), ("k2", "k2-advdata"), ("k1", "k1-advdata"),
             ("k2", "k2-advoff"), ("k8", "k8-tuniform"), ("k8", "k8-perturb")]
    for a, b in pairs:
        assert budget(a) == budget(b), (a, b)
    assert runs["dmd"].parent == runs["dmd-nofb"].parent == "k1-direct"
    assert cfg["dmd"].rewards and not cfg["dmd-nofb"].rewards  # rewards truly off
    assert cfg["dmd"].lora_rank == cfg["lcm"].lora_rank == cfg["k1-direct"].lora_rank == 16
    assert cfg["dmd"].dmd_cls_weight > 0 and cfg["dmd"].critic_steps > 1  # DMD2: GAN + TTUR
    assert (cfg["k2"].adv_real, cfg["k2-advdata"].adv_real) == ("target", "data")
    assert (cfg["k8"].t_end, cfg["k8-tuniform"].t_end) == ("edge", "uniform")
    assert (cfg["k8"].offset_noise, cfg["k8-perturb"].offset_noise) == (0.0, 0.1)
    assert all(cfg[f"k{k}"].lr == 1e-3 for k in (8, 4, 2, 1))  # the search's choice
    # the search: three points per method at the same steps, the preset's own included
    from hypersd_core.digits.protocol import LR_POINTS, PRESET_LR, SWEEP_STEPS
    for name in ("lcm", "tcd", "k8"):
        swept = {r.name for r in runs.values() if r.name.startswith(f"{name}-lr")}
        assert swept == {f"{name}-lr{p}" for p in LR_POINTS}
        assert {cfg[n].steps for n in swept} == {SWEEP_STEPS}
        assert {cfg[n].lr for n in swept} == {float(p) for p in LR_POINTS}
        assert float(PRESET_LR[name]) == cfg[name].lr


def test_report_budget_table_compares_every_row_with_lcm():
    from hypersd_core.digits.protocol_report import row_budget_table

    def run(steps, parent=None, fe=6.0, rank=16):
        return {"steps": steps, "batch_size": 32, "parent": parent, "fe_per_sample": fe,
                "seconds": 10.0, "lora_rank": rank}

    runs = {"lcm": run(2400), "tcd": run(2400), "k8": run(600), "k4": run(600, "k8", 15.0),
            "k2": run(600, "k4", 15.0), "k1": run(600, "k2", 15.0),
            "feedback": run(300, "k1", 7.0, 32), "dmd": run(500, "feedback", 17.0, 32)}
    table = row_budget_table(runs)
    assert "| 8 | hypersd@8 | k8 | 19,200 | 0.25 | 115,200 | 0.25 | 10 | 16 |" in table
    assert "| 4 | hypersd@4 | k4 | 38,400 | 0.50 | 403,200 | 0.88 | 20 | 16 |" in table
    assert "| 1 | unified@1 | dmd | 102,400 |" in table


def test_digits_sheet_rows_parse_and_bad_rows_say_what_is_wrong(tmp_path):
    from PIL import Image

    from hypersd_core.digits.sheet import parse
    from hypersd_core.evaluation.sheet import draw_sheet

    assert parse("LCM@1=lcm:1:runs/x/final") == ("LCM@1", "lcm", 1, "runs/x/final")
    assert parse("teacher@25=teacher:25") == ("teacher@25", "teacher", 25, None)
    with pytest.raises(ValueError, match="LABEL=METHOD:STEPS"):
        parse("lcm:1")
    red = [Image.new("RGB", (32, 32), (255, 0, 0))] * 2
    out = draw_sheet({"a": red, "b": red}, ["p one", "p two"], tmp_path / "s.png")
    pixels = np.asarray(Image.open(out).convert("RGB")).reshape(-1, 3)
    assert ((pixels[:, 0] > 200) & (pixels[:, 1] < 50)).mean() > 0.05  # the images are drawn


def test_dmd_curves_read_every_logged_point_and_draw_them(tmp_path):
    import json

    from PIL import Image

    from hypersd_core.digits.dmd_curves import plot, series

    (tmp_path / "dmd").mkdir()
    lines = [{"step": s, "loss_dmd": 1.0 / s, "loss_fake": 0.3, "loss_cls": 1.38} for s in range(1, 31)]
    lines.append({"step": 30, "reward/digits-quality": 0.7})
    (tmp_path / "dmd" / "metrics.jsonl").write_text("\n".join(map(json.dumps, lines)))
    x, y = series(tmp_path / "dmd" / "metrics.jsonl", "loss_dmd")
    assert len(x) == 30 and y[0] == 1.0
    out = plot(tmp_path, tmp_path / "c.png")
    px = np.asarray(Image.open(out).convert("RGB")).reshape(-1, 3).astype(int)
    purple = (abs(px[:, 0] - 148) < 30) & (abs(px[:, 1] - 103) < 30) & (abs(px[:, 2] - 189) < 30)
    assert purple.sum() > 50  # the dmd line is on the figure
    (tmp_path / "dmd" / "metrics.jsonl").write_text("\n".join(map(json.dumps, lines[:-1])))
    wide = Image.open(out).size[0]
    assert Image.open(plot(tmp_path, tmp_path / "d.png")).size[0] < wide  # no reward panel
    with pytest.raises(ValueError, match="no DMD metrics"):
        plot(tmp_path, tmp_path / "e.png", runs=("dmd-advoff",))
