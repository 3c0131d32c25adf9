"""Bench output: JSON, Markdown tables, the scaling plot, and the docs' Performance section."""

from __future__ import annotations

import json
import os
from pathlib import Path

from hypersd_core.paths import ASSETS, ROOT

SECTION_HEADING = "## Bench figures"
PERFORMANCE_DOC = ROOT / "docs" / "performance.md"  # whose SECTION_HEADING bench rebuilds


def _ms(stats: dict) -> str:
    return f"{1000 * stats['median_s']:.2f}"


def _mark(ok: bool | None) -> str:
    return "" if ok is None else (" (meets target)" if ok else " (**misses target**)")


def header_lines(h: dict) -> list[str]:
    lines = [f"- date: {h['date']}; commit {h.get('git_commit') or '?'}",
             f"- machine: {h['platform']}, {h['cpu']} ({h['cpu_count']} cores, torch threads "
             f"{h['torch_threads']}){', GPU ' + h['gpu'] if h.get('gpu') else ''}",
             f"- python {h['python']}, torch {h['torch']}, diffusers {h['diffusers']}, "
             f"transformers {h['transformers']}, peft {h['peft']}; device {h['device']}"]
    if h.get("loadavg"):
        end = h.get("loadavg_end")
        lines.append(f"- load average (1, 5, 15 min) at start: "
                     f"{', '.join(f'{v:.2f}' for v in h['loadavg'])}"
                     + (f"; at the end: {', '.join(f'{v:.2f}' for v in end)}" if end else "")
                     + f" (on {h['cpu_count']} cores; above about 0.5 per core, other processes "
                     "shared the CPU and absolute times are slower than on an idle machine)")
    jobs = max(len(h.get("concurrent_training") or []), len(h.get("concurrent_training_end") or []))
    if jobs:
        lines.append(f"- **{jobs} training job(s) ran at the same time**: figures are noisy")
    return lines


def summary_lines(s: dict) -> list[str]:
    lines = []
    if "hypersd1_speedup_vs_teacher" in s:
        lines.append(f"- Hyper-SD 1 step vs teacher 25 steps (CFG): **{s['hypersd1_speedup_vs_teacher']:.1f}x** "
                     "faster end to end (batch 1)")
    if "hypersd1_speedup_vs_teacher_interleaved" in s:
        lines.append(f"- the same, the two interleaved in one loop with the parts timed beside "
                     f"them: **{s['hypersd1_speedup_vs_teacher_interleaved']:.1f}x** (breakdown below)")
    if "ours_vs_stock_unfused_1step" in s:
        lines.append(f"- our 1-step `generate` / stock diffusers with `load_lora_weights`: "
                     f"**{s['ours_vs_stock_unfused_1step']:.3f}** (worst method; target <= 0.9)"
                     f"{_mark(s.get('ours_vs_stock_unfused_ok'))}; / stock with `fuse_lora`: "
                     f"**{s['ours_vs_stock_fused_1step']:.3f}** (target <= 1.02)"
                     f"{_mark(s.get('ours_vs_stock_fused_ok'))}; largest pixel difference from "
                     f"stock over all cases: {s['max_pixel_diff_vs_stock']}/255")
    if "grid_s" in s:
        lines.append(f"- compare grid ({s.get('grid_cells', '?')} cells, new prompt and seed, "
                     "the app's default rewards): "
                     f"**{s['grid_s']:.2f} s** (target < 1.5 s on an idle 2-core CPU)"
                     f"{_mark(s.get('grid_ok'))}")
    if "switch_ms" in s:
        lines.append(f"- adapter switch: **{s['switch_ms']:.2f} ms** = "
                     f"{100 * s['switch_share_of_one_step']:.2f}% of a 1-step generation "
                     f"(target < 5%){_mark(s.get('switch_ok'))}")
    if "tscd_step_ratio" in s:
        lines.append(f"- TSCD step / plain student step: **{s['tscd_step_ratio']:.2f}** "
                     f"(no adversarial term; target <= 2.5){_mark(s.get('tscd_step_ratio_ok'))}")
    return lines


def markdown(result: dict) -> str:
    """All tables of a bench result as Markdown."""
    plan = result["plan"]
    big = plan["big_batch"]
    out = [f"### Bench: {result['model']} ({result.get('kind', '?')})", ""]
    out += header_lines(result["header"])
    adapters = sorted(set(result.get("adapters", {}).values()))
    if adapters:
        out.append(f"- adapters: {', '.join(adapters)}")
    out += ["", "Key figures:", ""] + summary_lines(result.get("summary", {}))
    out += ["", f"Sampling (end to end: prompt encoding, denoising, VAE decode, PIL; median of "
            f"{plan['repeats']} after warm-up):", "",
            f"| method | steps | adapter | ms (batch 1) | img/s (batch 1) | img/s (batch {big}) | "
            f"speed-up vs teacher-{plan['teacher_steps']} (b1) | (b{big}) |",
            "|---|---|---|---|---|---|---|---|"]
    for r in result.get("sampling", []):
        b1, bb = r["b1"], r[f"b{big}"]
        out.append(f"| {r['method']} | {r['steps']} | {r['adapter'] or '-'} | {_ms(b1)} | "
                   f"{b1['images_per_s']:.1f} | {bb['images_per_s']:.1f} | "
                   f"{b1['speedup_vs_teacher']:.1f}x | {bb['speedup_vs_teacher']:.1f}x |")
    out += _stock_table(result) + _breakdown_lines(result) + _grid_lines(result)
    sw = result.get("switch", {})
    if "switch" in sw:
        out += ["", f"Adapter switch ({sw['adapters_loaded']} adapters loaded): "
                f"{1000 * sw['switch']['median_s']:.3f} ms between adapters, "
                f"{1000 * sw['switch_base']['median_s']:.3f} ms to/from the base model, "
                f"{1000 * sw['load_from_disk']['median_s']:.1f} ms to load one from disk; "
                f"a 1-step generation takes {1000 * sw['one_step_generation_s']:.2f} ms."]
    if result.get("training"):
        out += ["", f"Training step of each stage type over one plain LoRA-student step "
                f"(eps-MSE forward + backward + update) on the same batch "
                f"(batch {plan['train_batch']}, median of {plan['train_repeats']}, interleaved):", "",
                "| stage | ms / step | plain ms | ratio | samples/s | peak memory MB | notes |",
                "|---|---|---|---|---|---|---|"]
        for r in result["training"]:
            if "skipped" in r:
                out.append(f"| {r['stage']} | - | - | - | - | - | skipped: {r['skipped']} |")
                continue
            mem = r["memory"]
            out.append(f"| {r['stage']} | {_ms(r['step'])} | {_ms(r['plain'])} | {r['ratio']:.2f} | "
                       f"{r['samples_per_s']:.0f} | {mem['peak_mb']:.0f} ({mem['kind']}, "
                       f"+{mem['delta_mb']:.0f}) | {'; '.join(r['notes']) or '-'} |")
    out += _scaling_tables(result)
    if result.get("plot"):
        out += ["", f"![bench scaling]({result['plot']})"]
    out += ["", f"Whole run: {result.get('seconds', 0):.0f} s."]
    return "\n".join(out) + "\n"


def _stock_table(result: dict) -> list[str]:
    rows = result.get("vs_stock") or []
    if not rows:
        return []
    out = ["", "Our `generate` (adapter fused into the base weights, PEFT layers removed, prompt "
           "embeddings cached) against stock diffusers with the same weights, scheduler, steps and "
           "seed, as users call it: `load_lora_weights` (unfused) and `load_lora_weights` + "
           "`fuse_lora`; batch 1, the three interleaved, medians of "
           f"{result['plan']['overhead_pairs']}:", "",
           "| method | steps | adapter | ours ms | stock unfused ms | ours / unfused | stock fused ms "
           "| ours / fused | max pixel diff (unfused / fused) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['method']} | {r['steps']} | {r['adapter'] or '-'} | {_ms(r['ours'])} | "
                   f"{_ms(r['stock_unfused'])} | {r['ratio_vs_unfused']:.3f} | "
                   f"{_ms(r['stock_fused'])} | {r['ratio_vs_fused']:.3f} | "
                   f"{r['max_pixel_diff_vs_unfused']} / {r['max_pixel_diff_vs_fused']} |")
    return out


def _breakdown_lines(result: dict) -> list[str]:
    br = result.get("breakdown")
    if not br:
        return []
    one, teacher = br["hypersd_1step_parts_s"], br["teacher_parts_s"]
    out = ["", f"Where the time goes (batch 1; Hyper-SD 1 step and the teacher at "
           f"{br['teacher_steps']} steps with CFG end to end through `generate`, the parts timed "
           f"on their own in the same interleaved loop, medians of {br['pairs']}; overhead = end "
           "to end minus the parts: latents, scheduler, input checks, device look-ups):", "",
           "| part | Hyper-SD 1 step ms | share | teacher ms | share |", "|---|---|---|---|---|"]
    for key in one:
        out.append(f"| {key} | {1000 * one[key]:.2f} | {100 * one[key] / br['hypersd_1step_s']:.0f}% "
                   f"| {1000 * teacher[key]:.2f} | {100 * teacher[key] / br['teacher_s']:.0f}% |")
    out.append(f"| **end to end** | **{1000 * br['hypersd_1step_s']:.2f}** | 100% | "
               f"**{1000 * br['teacher_s']:.2f}** | 100% |")
    out += ["", f"Speed-up {br['speedup']:.1f}x end to end; the UNet alone "
            f"({br['teacher_steps']} CFG calls at batch 2 against one at batch 1) would allow "
            f"{br['unet_only_speedup']:.1f}x. The text encoder costs "
            f"{1000 * br['text_encoder_uncached_s']:.2f} ms per uncached prompt "
            f"({1000 * br['text_encoder_cfg_uncached_s']:.2f} ms with the CFG negative); "
            "`generate` takes embeddings from its prompt cache instead. The 1-step figure "
            f"leaves out the adapter switch the interleaving causes ({1000 * br['switch_s']:.2f} ms)."]
    return out


def _grid_lines(result: dict) -> list[str]:
    g = result.get("grid")
    if not g:
        return []
    return ["", f"Compare grid (the app's `compare_grid`: {g['cells']} cells, one prompt, rewards "
            f"{', '.join(g['rewards']) or 'none'}; medians of {g['new_prompt_seed']['n']}): "
            f"**{g['new_prompt_seed']['median_s']:.3f} s** for a new prompt and seed, "
            f"{g['same_again']['median_s']:.3f} s for the same again (teacher reference and "
            f"embeddings cached), {g['no_rewards']['median_s']:.3f} s without reward scoring; "
            f"the first click after loading the model took {g['first_click_s']:.2f} s (it loads "
            "the adapters and reward nets). CPU time the process used for a new grid: "
            f"{g.get('cpu_s', {}).get('new_prompt_seed', float('nan')):.3f} s (less stretched "
            "than wall time when other jobs share the cores)."]


def _scaling_tables(result: dict) -> list[str]:
    samp = {r["batch"]: r for r in result.get("scaling_sampling", [])}
    train = {r["batch"]: r for r in result.get("scaling_training", [])}
    if not samp and not train:
        return []
    out = ["", "Scaling with batch size (Hyper-SD 1-step sampling; TSCD and plain training steps):", "",
           "| batch | sampling img/s | ms / image | TSCD samples/s | plain samples/s | TSCD/plain |",
           "|---|---|---|---|---|---|"]
    for b in sorted(set(samp) | set(train)):
        s, t = samp.get(b), train.get(b)
        cells = [f"{s['images_per_s']:.1f}", f"{1000 * s['median_s'] / b:.2f}"] if s else ["-", "-"]
        cells += ([f"{t['tscd_samples_per_s']:.1f}", f"{t['plain_samples_per_s']:.1f}",
                   f"{t['ratio']:.2f}"] if t else ["-", "-", "-"])
        out.append(f"| {b} | " + " | ".join(cells) + " |")
    return out


def gpu_lines(gpu: dict | None) -> list[str]:
    """A short table of the GPU check, or the line saying it was not run."""
    if not gpu or gpu.get("dry_run"):
        return ["GPU check (`bench --gpu`: latency and a training smoke run of every stage): "
                "not run on a GPU yet (the speed check below is a separate command). It is "
                "ready: `python -m hypersd_core bench --gpu` (full-size SDXL at 1024 "
                "and SD1.5 at 512 with random weights from `assets/configs/`, bf16: sampling "
                "latency and a 2-step training smoke run of every stage type with its peak "
                "memory; sized for under 7 minutes on one H100, exits non-zero if any part "
                "fails; `--dry-run` runs the same code on the CPU at tiny sizes, as the tests do)."]
    head = gpu["header"]
    out = [f"GPU check on {head.get('gpu', '?')} ({gpu['dtype']}, random weights, "
           f"{gpu['seconds']:.0f} s):", "",
           "| model | res | 1 step ms | 4 steps ms | teacher 25 + CFG ms | speed-up | VAE share "
           "| fused 1 step ms | train b1 ms / MB | train b2 ms / MB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for kind, m in gpu["models"].items():
        lat, vae, fused = m.get("latency", {}), m.get("vae", {}), m.get("lora_fused", {})
        ms = lat.get("ms", {})
        train = {r["batch"]: r for r in m.get("training", []) if isinstance(r, dict) and "batch" in r}
        teacher = next((v for k, v in ms.items() if k.startswith("teacher")), None)
        out.append(f"| {kind} | {m['resolution']} | {ms.get('hypersd_1step', '-')} | "
                   f"{ms.get('hypersd_4step', '-')} | {teacher or '-'} | "
                   f"{lat.get('speedup_1step_vs_teacher', 0):.1f}x | "
                   f"{100 * vae.get('decode_and_postprocess_share', 0):.0f}% | "
                   f"{fused.get('fused_1step_ms', '-')} | {_train_cell(train, 1)} | "
                   f"{_train_cell(train, 2)} |")
    return out + smoke_lines(gpu)


def smoke_lines(gpu: dict) -> list[str]:
    """Peak allocated memory (GiB) of each stage's 2-step smoke run, batch 1, checkpointing."""
    stages = [n for n in ("tscd", "tscd_adv", "lcm", "tcd", "feedback", "dmd")
              if any(f"smoke_{n}" in m for m in gpu["models"].values())]
    if not stages:
        return []
    out = ["", "Training smoke run (2 steps, batch 1, the preset's rank, gradient checkpointing; "
           "peak allocated GiB, or the error):", "",
           "| model | " + " | ".join(stages) + " |", "|---" * (len(stages) + 1) + "|"]
    for kind, m in gpu["models"].items():
        cells = []
        for n in stages:
            row = m.get(f"smoke_{n}", {})
            cells.append(f"{row['peak_mb'] / 1024:.1f}" if "peak_mb" in row
                         else ("error" if "error" in row else "-"))
        out.append(f"| {kind} | " + " | ".join(cells) + " |")
    if gpu.get("errors"):
        out += ["", "Failed parts: " + "; ".join(gpu["errors"])]
    return out


def gpu_speed_lines(speed: dict | None) -> list[str]:
    """The fused / stock unfused / stock fused table of ``bench --gpu-speed``."""
    if not speed or speed.get("dry_run"):
        return ["GPU speed check (ours fused vs stock `load_lora_weights` vs stock `fuse_lora`, "
                "SD1.5 and SDXL sizes, fp16): not run yet; `python -m hypersd_core bench "
                "--gpu-speed` on a CUDA machine."]
    head = speed["header"]
    out = [f"GPU speed check on {head.get('gpu', '?')} ({speed['dtype']}, random weights, random "
           f"rank-{speed['plan']['rank']} LoRA, batch 1, medians of {speed['plan']['pairs']} "
           f"interleaved; {speed['seconds']:.0f} s; `bench --gpu-speed`):", "",
           "| model | res | steps | ours ms | stock unfused ms | ours / unfused | stock fused ms "
           "| ours / fused | pixel diff | switch ms | kept originals MB | 1 step vs teacher-25 |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for kind, m in speed["models"].items():
        if "vs_stock" not in m:
            out.append(f"| {kind} | - | - | {m.get('skipped', 'failed')} |||||||||")
            continue
        sw, br = m.get("switch", {}), m.get("breakdown", {})
        for r in m["vs_stock"]:
            out.append(f"| {kind} | {m['resolution']} | {r['steps']} | {_ms(r['ours'])} | "
                       f"{_ms(r['stock_unfused'])} | {r['ratio_vs_unfused']:.3f} | "
                       f"{_ms(r['stock_fused'])} | {r['ratio_vs_fused']:.3f} | "
                       f"{max(r['max_pixel_diff_vs_unfused'], r['max_pixel_diff_vs_fused'])} | "
                       f"{1000 * sw.get('median_s', 0):.1f} | {sw.get('originals_mb', 0):.0f} | "
                       f"{br.get('speedup', 0):.1f}x |")
    return out


def _train_cell(train: dict, b: int) -> str:
    row = train.get(b, {})
    return f"{row['step_ms']:.0f} / {row['peak_mb']:.0f}" if "step_ms" in row else "-"


def _link(path: Path, doc: Path) -> str:
    """``path`` relative to the folder of ``doc`` (Markdown links resolve from there)."""
    return Path(os.path.relpath(path, doc.parent)).as_posix()


def gpu_full_lines(full: dict | None) -> list[str]:
    """The 2-process part of ``bench --gpu --full``: one line per run, and the verdict."""
    if not full or full.get("dry_run"):
        return []
    mp, st = full.get("multi_process", {}), full.get("settings", {})
    out = [f"Trainer in {st.get('processes')} processes on one GPU (`bench --gpu --full`: "
           f"{st.get('backend')}, {st.get('model')} at {st.get('resolution')}, mixed precision "
           f"{st.get('mixed_precision')} with loss scaling, {st.get('steps')} steps, batch "
           f"{st.get('batch')}; {full.get('seconds', 0):.0f} s in all):", "",
           "| run | state | step | ranks agree | s | peak GB | resumed = straight |",
           "|---|---|---|---|---|---|---|"]
    for name, row in mp.items():
        same = ""
        if name == "resume":
            same = "bit-identical" if row.get("equals_straight_run") else (
                f"no: max diff {row.get('max_diff_resumed')}" if "max_diff_resumed" in row
                else "no")
        mem = row.get("mem_gb")
        out.append(f"| {name} | {row.get('state')} | {row.get('step')} | "
                   f"{row.get('ranks_agree')} | {row.get('seconds')} | "
                   f"{f'{mem:.1f}' if mem else 'n/a'} | {same} |")
    out += [""] + ([f"Errors: {'; '.join(full['errors'])}"] if full.get("errors") else
                   ["No errors."])
    resumed = mp.get("resume", {})
    if resumed and not resumed.get("equals_straight_run") and "max_diff_repeat" not in resumed:
        out += ["", "These figures predate the repeat of the straight run: bit-identity alone "
                "cannot tell a resume fault from GPU kernels that are not deterministic "
                "(attention and convolution backward). The check now repeats the straight "
                "run and judges the resume against that floor; it has not run on a GPU since."]
    return out


def readme_section(result: dict | None, gpu: dict | None = None,
                   speed: dict | None = None, doc: Path | None = None,
                   full: dict | None = None) -> str:
    """The docs' Performance section: how to reproduce, the bench tables, the GPU status.
    Links to the published files are written relative to ``doc`` (default PERFORMANCE_DOC)."""
    doc = Path(doc or PERFORMANCE_DOC)
    results = ASSETS / "results"
    files = {name: _link(results / name, doc) for name in ("bench.md", "bench.png", "bench.json")}
    out = ["Measured by `python -m hypersd_core bench` (one process; median of several repeats "
           "after a warm-up; `--quick` for a one-minute run; figures go to `--out`, default "
           "`out/bench/`) and published here with `python -m hypersd_core bench --update-readme`, "
           "which writes them to `assets/results/` and rebuilds this section. Full tables: "
           f"[bench.md]({files['bench.md']}); raw figures: [bench.json]({files['bench.json']}).", ""]
    if result is None:
        out.append("Digits-world figures: not measured yet (the shipped adapters were still "
                   "training when this section was written; timing beside training jobs on a "
                   "shared two-core CPU would not mean much).")
    else:
        text = markdown(result).replace("### Bench:", "### Digits world on the CPU:"
                                        if result.get("kind") == "digits" else "### Bench:")
        if result.get("plot"):  # bench.md sits beside the plot; this section does not
            text = text.replace(f"]({result['plot']})", f"]({files['bench.png']})")
        out.append(text)
    out += [""] + gpu_lines(gpu) + [""] + gpu_full_lines(full) + [""] + gpu_speed_lines(speed)
    return "\n".join(out) + "\n"


def plot_scaling(result: dict, out_png: str | Path) -> Path | None:
    """Throughput against batch size: sampling (images/s) and training (samples/s)."""
    samp, train = result.get("scaling_sampling", []), result.get("scaling_training", [])
    if not samp and not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    if samp:
        axes[0].plot([r["batch"] for r in samp], [r["images_per_s"] for r in samp], "o-",
                     label="Hyper-SD 1 step")
    axes[0].set_title("sampling")
    axes[0].set_ylabel("images / s")
    if train:
        bs = [r["batch"] for r in train]
        axes[1].plot(bs, [r["tscd_samples_per_s"] for r in train], "o-", label="TSCD step")
        axes[1].plot(bs, [r["plain_samples_per_s"] for r in train], "s--", label="plain student step")
    axes[1].set_title("training")
    axes[1].set_ylabel("samples / s")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{result['model']} on {result['header']['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)


def write_outputs(result: dict, out: str | Path) -> dict:
    """Write JSON, PNG and Markdown beside each other; return their paths and the text."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    png = plot_scaling(result, out.with_suffix(".png"))
    if png is not None:
        result["plot"] = png.name
    out.write_text(json.dumps(result, indent=1, default=str))
    text = markdown(result)
    out.with_suffix(".md").write_text(text)
    paths: dict = {"json": out, "markdown": out.with_suffix(".md"), "markdown_text": text}
    if png is not None:
        paths["png"] = png
    return paths


def update_readme(readme: str | Path, body: str, heading: str = SECTION_HEADING) -> Path:
    """Replace the ``heading`` section of ``readme`` (up to the next ``## ``) with ``body``;
    append it when absent. Other sections are left byte for byte."""
    readme = Path(readme)
    text = readme.read_text() if readme.is_file() else ""
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == heading), None)
    section = [f"{heading}\n", "\n", body.rstrip() + "\n", "\n"]
    if start is None:
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
        new = lines + (["\n"] if lines and lines[-1].strip() else []) + section
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")),
                   len(lines))
        new = lines[:start] + section + lines[end:]
    readme.write_text("".join(new).rstrip("\n") + "\n")
    return readme
