"""Bench output: JSON, Markdown tables, the scaling plot, and README's Performance section."""

from __future__ import annotations

import json
from pathlib import Path

README_HEADING = "## Performance"


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
        lines.append(f"- load average at start: {', '.join(f'{v:.2f}' for v in h['loadavg'])}")
    if h.get("concurrent_training"):
        lines.append(f"- **{len(h['concurrent_training'])} training job(s) ran at the same time**: "
                     "figures are noisy")
    return lines


def summary_lines(s: dict) -> list[str]:
    lines = []
    if "hypersd1_speedup_vs_teacher" in s:
        lines.append(f"- Hyper-SD 1 step vs teacher 25 steps (CFG): **{s['hypersd1_speedup_vs_teacher']:.1f}x** "
                     "faster end to end (batch 1)")
    if "generate_vs_stock_ratio" in s:
        lines.append(f"- `generate` / stock diffusers call: **{s['generate_vs_stock_ratio']:.3f}** "
                     f"(worst case; target <= 1.05){_mark(s.get('generate_vs_stock_ok'))}")
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
    if result.get("overhead"):
        out += ["", "`Sampler.generate` vs a stock diffusers pipeline call (same weights, "
                "scheduler, steps, seed; interleaved; batch 1):", "",
                "| method | steps | generate ms | stock ms | ratio | our pipeline called directly, ms "
                "| generate / direct | adapters resident | max pixel diff |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in result["overhead"]:
            out.append(f"| {r['method']} | {r['steps']} | {_ms(r['generate'])} | {_ms(r['stock'])} | "
                       f"{r['ratio']:.3f} | {_ms(r['same_pipe'])} | {r['wrapper_ratio']:.3f} | "
                       f"{r['adapters_resident']} | {r['max_pixel_diff']} |")
        out += ["", "The stock pipeline holds only the adapter in use; ours holds every loaded "
                "adapter (diffusers' per-call device and hook look-ups walk all modules, so "
                "resident adapters cost time even when inactive)."]
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
        return ["GPU figures: not run (no GPU in this environment). The check is ready: "
                "`python -m hypersd_core bench --gpu` (full-size SDXL at 1024 and SD1.5 at 512 "
                "with random weights from `assets/configs/`, sized for under 8 minutes on one H100 "
                "but not yet run on one; `--dry-run` runs the same code on the CPU at tiny sizes, "
                "as the tests do)."]
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
    return out


def _train_cell(train: dict, b: int) -> str:
    row = train.get(b, {})
    return f"{row['step_ms']:.0f} / {row['peak_mb']:.0f}" if "step_ms" in row else "-"


def readme_section(result: dict | None, gpu: dict | None = None) -> str:
    """README's Performance section: how to reproduce, the bench tables, the GPU status."""
    out = ["Measured by `python -m hypersd_core bench` (one process; median of several repeats "
           "after a warm-up; `--quick` for a one-minute run) and written here with "
           "`python -m hypersd_core bench --update-readme`. Full tables and the plot: "
           "`assets/results/bench.md`, `assets/results/bench.png`; raw figures: `assets/results/bench.json`.", ""]
    if result is None:
        out.append("Digits-world figures: not measured yet (the shipped adapters were still "
                   "training when this section was written; timing beside training jobs on a "
                   "shared two-core CPU would not mean much).")
    else:
        out.append(markdown(result).replace("### Bench:", "### Digits world on the CPU:"
                                            if result.get("kind") == "digits" else "### Bench:"))
    out += [""] + gpu_lines(gpu)
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


def update_readme(readme: str | Path, body: str, heading: str = README_HEADING) -> Path:
    """Replace the ``heading`` section of README (up to the next ``## ``) with ``body``;
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
