"""A run's checkpoint state: what is saved beside the student LoRA (optimiser, schedule,
stage, loss scale, loader position), loading it back on every process alike, and the
per-step random generators that make a resumed run draw the batches the straight run does."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

from hypersd_core.training import collective
from hypersd_core.training import runs as runs_mod
from hypersd_core.training.config import StageConfig
from hypersd_core.training.runs import Run
from hypersd_core.training.student import STUDENT


class ResumeRefusedError(RuntimeError):
    """The processes of a run cannot resume from the same checkpoint."""


def _step_generator(cfg: StageConfig, step: int, rank: int, world: int = 1) -> torch.Generator:
    """A generator per (seed, step, process): a resumed run draws the same batches, and no
    two (step, process) pairs of a run share one."""
    return torch.Generator().manual_seed(collective.step_seed(cfg.seed, step, rank, world))


def _save_state(tmp: Path, unet, optimizer, lr_sched, stage, step: int, nonfinite: int,
                scaler=None, data=None):
    from safetensors.torch import save_file

    from hypersd_core.models.lora import lora_state_dict

    state = {k: v.detach().cpu().contiguous() for k, v in lora_state_dict(unet, STUDENT).items()}
    save_file(state, str(tmp / "lora.safetensors"))
    extra = {"optimizer": optimizer.state_dict(), "lr_sched": lr_sched.state_dict(),
             "step": step, "nonfinite": nonfinite}
    if hasattr(stage, "state_dict"):
        extra["stage"] = stage.state_dict()
    if scaler is not None:  # fp16: the loss scale and its growth count
        extra["scaler"] = scaler.state_dict()
    if data is not None:  # the loader's position (a streamed source resumes where it was)
        extra["data"] = data.state_dict()
    torch.save(extra, tmp / "trainer.pt")


def _load_state(ckpt: Path, unet, optimizer, lr_sched, stage, scaler=None,
                data=None) -> tuple[int, int]:
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(unet, load_file(str(ckpt / "lora.safetensors")), adapter_name=STUDENT)
    extra = torch.load(ckpt / "trainer.pt", weights_only=True)
    optimizer.load_state_dict(extra["optimizer"])
    lr_sched.load_state_dict(extra["lr_sched"])
    if "stage" in extra and hasattr(stage, "load_state_dict"):
        stage.load_state_dict(extra["stage"])
    if scaler is not None and "scaler" in extra:
        scaler.load_state_dict(extra["scaler"])
    if "data" in extra and data is not None:
        data.load_state_dict(extra["data"])
    return int(extra["step"]), int(extra["nonfinite"])


def _resume_state(run: Run, unet, optimizer, lr_sched, stage, scaler=None,
                  data=None) -> tuple[int, int]:
    """Load the newest intact checkpoint, the same one on every process.

    Rank 0 lists the checkpoints and verifies them (it alone reads their SHA-256) and
    sends their names. Every process checks that it sees the chosen one (manifest and
    sizes), or all refuse naming the ranks that do not: a process never falls back to
    another checkpoint, or to step 0, alone. One that fails its checksums or does not load
    is skipped on every process with a warning naming it (kept in status.json); (0, 0)
    when there is none.
    """
    main = collective.rank() == 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        names = collective.broadcast([p.name for p in run.checkpoints()] if main else None)
        state = None
        for name in reversed(names):
            ckpt = run.checkpoints_dir / name
            lacking = collective.missing_on(not runs_mod.checkpoint_problem(ckpt, hashes=False))
            if lacking:
                raise ResumeRefusedError(
                    f"checkpoint {ckpt} (the newest intact one on rank 0) is missing or incomplete "
                    f"on rank(s) {lacking}: every process must see the run folder; no process resumed")
            try:
                loaded, why = _load_state(ckpt, unet, optimizer, lr_sched, stage, scaler, data), ""
            except Exception as err:  # e.g. a manifest without checksums over a bad file
                loaded, why = None, (str(err).strip().splitlines() or [""])[0][:200]
                why = f"{type(err).__name__}: {why}"
            failed = collective.missing_on(loaded is not None)
            if not failed:
                state = loaded
                break
            warnings.warn(f"skipping checkpoint {ckpt}: it does not load on rank(s) {failed}"
                          + (f" ({why})" if why else ""), stacklevel=2)
    notes = collective.broadcast([str(w.message) for w in caught])  # rank 0's view
    if main:
        for note in notes:
            print(f"warning: {note}", file=sys.stderr, flush=True)
    if state is None and notes:
        raise RuntimeError(f"no intact checkpoint to resume {run.dir} from ({'; '.join(notes)})")
    if notes and main:
        run.write_status(warning="; ".join(notes) + f"; resumed from step {state[0]}")
    return state or (0, 0)


def _scaler_update(scaler, overflow: bool) -> None:
    """Advance the fp16 loss scale by the collective verdict (the same on every process),
    not by this process's own found-inf flag: an overflow lowers it, a finite step counts
    towards growing it."""
    if overflow:
        scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
    else:
        scaler.update()


def _weights_finite(unet) -> bool:
    from hypersd_core.models.lora import lora_state_dict

    return all(bool(torch.isfinite(v).all()) for v in lora_state_dict(unet, STUDENT).values())
