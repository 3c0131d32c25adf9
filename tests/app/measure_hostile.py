"""Before/after figures for docs/security.md: hostile inputs against the code in the
current directory (run it from an old checkout to measure the old code).

    nice -n 5 env OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python tests/app/measure_hostile.py all
    (cd OLD_CHECKOUT && nice ... python /path/to/measure_hostile.py all)

Each item runs in a fresh process and prints one JSON line: seconds, peak resident
memory above the process's baseline (MB), and the item's own count. Items: export,
endpoints, blobs, yaml, voters, queue, shard. Nothing is written outside a temp folder.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path.cwd()))  # the checkout being measured
os.environ.setdefault("HYPERSD_STUDY_SALT", "measure-salt-0123456789abcdef")
ITEMS = ("export", "endpoints", "blobs", "yaml", "voters", "queue", "shard")


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RssPeak:
    """Highest resident memory while the block runs (sampled every 5 ms), above its start."""

    def __enter__(self):
        self.start = self.high = rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.high = max(self.high, rss_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.high = max(self.high, rss_mb())
        self.above = self.high - self.start


def settings(tmp: Path, **kw):
    from hypersd_core.app.service import AppSettings

    return AppSettings.from_env(runs_dir=tmp / "runs", study_db=tmp / "study" / "votes.db",
                                lora_dir=tmp / "loras", models_dir=tmp / "models",
                                data_dir=tmp / "data", port=0, **kw)


def launched(s):
    """The app (digits model, not loaded) on a free port; (demo, url)."""
    import socket

    import app

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        s.port = sock.getsockname()[1]
    demo = app.build_demo(s)
    kwargs = app.launch_kwargs(s)
    kwargs.update(prevent_thread_lock=True, quiet=True)
    _, url, _ = demo.launch(**kwargs)
    return demo, url.rstrip("/")


def http_call(url: str, fn_index: int, data: list, headers=None) -> dict:
    import httpx

    session = os.urandom(5).hex()
    with httpx.Client(base_url=url, timeout=300, headers=headers or {}) as http:
        join = http.post("/gradio_api/queue/join", json={"data": data, "fn_index": fn_index,
                                                         "session_hash": session})
        if join.status_code != 200:
            return {"success": False, "status": join.status_code}
        event = join.json()["event_id"]
        with http.stream("GET", "/gradio_api/queue/data", params={"session_hash": session}) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    msg = json.loads(line[5:])
                    if msg.get("event_id") == event and msg.get("msg") == "process_completed":
                        return msg
    return {}


def fn_named(demo, *names) -> int | None:
    for i, f in demo.fns.items():
        if f.api_name in names or getattr(f.fn, "__name__", "") in names:
            return i
    return None


# ---------------------------------------------------------------- items
def item_export(tmp: Path) -> dict:
    """Public mode: an anonymous client asks for the CSV export by fn_index."""
    import pandas as pd

    from hypersd_core.study.store import StudyConfig

    os.environ["HYPERSD_PUBLIC"] = "1"
    demo, url = launched(settings(tmp))
    store = demo.hypersd["store"]
    cfg = StudyConfig(methods=["lcm", "hypersd"], steps=[1])
    voted = store.next_pair(cfg)
    store.record_vote(voted.token, "A", "cookie:x", "cookie")
    store.next_pair(cfg)  # the pair now on someone's screen
    export = next(i for i, f in demo.fns.items() if f.outputs and
                  type(f.outputs[0]).__name__ == "File")
    n_in = len(demo.fns[export].inputs)
    msg = http_call(url, export, [""] * n_in)
    unblinded = 0
    if msg.get("success"):
        csv = msg["output"]["data"][0][0]["path"]
        df = pd.read_csv(csv, keep_default_na=False)
        unblinded = int(((df.status != "voted") & (df.method_left != "")).sum())
    demo.close()
    return {"anonymous_export_answered": bool(msg.get("success")),
            "unvoted_pairs_named_in_export": unblinded}


def item_endpoints(tmp: Path) -> dict:
    """Public mode: which events carry auto-made names, and which non-public ones answer."""
    import re

    import app

    os.environ["HYPERSD_PUBLIC"] = "1"
    demo = app.build_demo(settings(tmp))
    auto = []
    for f in demo.fns.values():
        if f.fn is None or (f.api_visibility == "public" and not hasattr(f.fn, "access_role")):
            continue  # the public endpoints were always named by hand
        name = re.sub(r"[^\w-]", "", getattr(f.fn, "__name__", ""))
        if re.fullmatch(re.escape(name) + r"(_\d+)?", str(f.api_name)) and \
                not hasattr(f.fn, "access_role"):
            auto.append(f.api_name)
    guarded = sum(1 for f in demo.fns.values() if hasattr(f.fn, "access_role"))
    private = sum(1 for f in demo.fns.values() if f.fn is not None and f.api_visibility != "public")
    return {"events": len(demo.fns), "hidden": private, "auto_named": len(auto),
            "examples": auto[:6], "with_server_side_role": guarded}


def item_blobs(tmp: Path) -> dict:
    """The image editor's blob route: one 12 KB request with index 100,000,000, then
    twenty 9 MB blobs under fresh ids; resident memory after each."""
    import httpx

    os.environ["HYPERSD_PUBLIC"] = "1"
    s = settings(tmp)
    demo, url = launched(s)
    pad = next(b for b in demo.blocks.values() if "Sketchpad" in type(b).__name__)

    def post(index, blob_id, size):
        return httpx.post(f"{url}/gradio_api/component_server", timeout=120, data={
            "component_id": str(pad._id), "session_hash": "s", "fn_name": "accept_blobs",
            "type": "layer", "index": str(index), "id": blob_id},
            files={"blob": ("blob", io.BytesIO(os.urandom(size)), "application/octet-stream")}
        ).status_code

    base = rss_mb()
    first = post(100_000_000, "bomb", 12_000)
    after_index = rss_mb() - base
    codes = [post(0, f"u{i}", 9 * 2**20) for i in range(20)]
    after_uploads = rss_mb() - base - after_index
    demo.close()
    return {"index_bomb_status": first, "index_bomb_mb": round(after_index),
            "twenty_9mb_status": sorted(set(codes)), "twenty_9mb_kept_mb": round(after_uploads)}


def alias_bomb(levels: int) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]")
    lines.append(f"seed: *a{levels - 1}")
    return "\n".join(lines) + "\n"


def item_yaml(tmp: Path, levels: int = int(os.environ.get("BOMB_LEVELS", 7))) -> dict:
    """The Train tab's settings check on an alias bomb (levels 7: 436 bytes)."""
    from train_tab import controller as ctl

    text = alias_bomb(levels)
    s = settings(tmp)
    t0 = time.perf_counter()
    with RssPeak() as peak:
        checked = ctl.check_settings(text, "digits", "", "digits", s)
    return {"bytes": len(text), "levels": levels, "refused": checked.config is None,
            "check_seconds": round(time.perf_counter() - t0, 2),
            "check_peak_mb": round(peak.above), "message": checked.message[:100]}


def item_voters(tmp: Path) -> dict:
    """Eight new voters from one address behind a Space's proxy, each sending a made-up
    X-Forwarded-For entry (the proxy appends the real address)."""
    from compare_tab.study import COOKIE, StudyHandlers
    from hypersd_core.study.store import StudyConfig, StudyStore

    os.environ["SPACE_ID"] = "measure/space"  # the old code trusted the header on a Space
    s = settings(tmp)
    store = StudyStore(s.study_db)
    cfg = StudyConfig(methods=["lcm", "hypersd"], steps=[1])
    trusted = getattr(s, "trusted_proxies", None)  # None: the code before the setting
    handlers = (StudyHandlers(None, store, cfg) if trusted is None
                else StudyHandlers(None, store, cfg, s))
    counted = 0
    for i in range(8):
        pair = store.next_pair(cfg)
        request = SimpleNamespace(
            headers={"x-forwarded-for": f"10.9.{i}.1, 203.0.113.7"},
            client=SimpleNamespace(host="10.0.0.1"), cookies={COOKIE: handlers.cookies.mint()},
            session_hash=f"s{i}", username=None)
        counted += handlers.vote("A", pair.token, request)[0].startswith("Thanks")
    return {"new_voters": 8, "counted": counted,
            "limit_per_address": cfg.new_voters_per_ip_per_hour}


def item_queue(tmp: Path, seconds: float = float(os.environ.get("QUEUE_EVENT_S", 0.25))) -> dict:
    """One client joins 40 calls of a ``seconds`` event (``QUEUE_EVENT_S``; make it long
    enough that the joins outpace the calls on a loaded machine); how many are accepted,
    and how long another client's call is refused with "Queue is full"."""
    import httpx

    demo, url = launched(settings(tmp))
    generate = fn_named(demo, "generate")
    service = demo.hypersd["service"]
    service.generate = lambda *a, **k: (time.sleep(seconds), [SimpleNamespace(
        error="stub", image=None, seconds=0)])[1]
    args = ["a red handwritten digit 7", "teacher", 1, 0]
    with httpx.Client(base_url=url, timeout=60) as http:
        codes = [http.post("/gradio_api/queue/join", json={
            "data": args, "fn_index": generate, "session_hash": f"flood{i}"}).status_code
            for i in range(40)]
        t0, refused = time.perf_counter(), 0
        while http.post("/gradio_api/queue/join", json={
                "data": args, "fn_index": generate,
                "session_hash": f"other{refused}"},
                headers={"x-forwarded-for": "198.51.100.9"}).status_code != 200:
            refused += 1
            time.sleep(0.1)
        locked = time.perf_counter() - t0
    demo.close()
    return {"event_s": seconds, "flood_accepted": codes.count(200),
            "flood_refused": len(codes) - codes.count(200),
            "other_client_locked_out_s": round(locked, 2), "other_client_refusals": refused}


def item_shard(tmp: Path, mib: int = 64) -> dict:
    """A gzip webdataset shard holding a ``mib`` MiB caption, read by the trainer's reader."""
    from hypersd_core.training.batch import DataOptions
    from hypersd_core.training.datasets import WebDataset

    shard = tmp / "bomb.tar.gz"
    with open(shard, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb") as gz, \
            tarfile.open(fileobj=gz, mode="w|") as tar:
        info = tarfile.TarInfo("0.txt")
        info.size = mib * 2**20
        tar.addfile(info, io.BytesIO(b"a" * info.size))
        png = io.BytesIO()
        from PIL import Image

        Image.new("RGB", (32, 32)).save(png, format="PNG")
        img = tarfile.TarInfo("0.png")
        img.size = len(png.getvalue())
        tar.addfile(img, io.BytesIO(png.getvalue()))
    on_disk = shard.stat().st_size
    ds = WebDataset(SimpleNamespace(resolution=32), str(shard), DataOptions())
    with RssPeak() as peak:
        got = list(ds)
    return {"caption_mib": mib, "shard_kb": round(on_disk / 1024), "samples": len(got),
            "skipped": ds.skipped, "peak_above_baseline_mb": round(peak.above)}


def run_one(name: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        base = peak_mb()
        t0 = time.perf_counter()
        out = globals()[f"item_{name}"](Path(tmp))
        out["seconds"] = round(time.perf_counter() - t0, 2)
        out.setdefault("peak_above_baseline_mb", round(peak_mb() - base))
        return out


def main(argv: list[str]) -> None:
    names = ITEMS if not argv or argv[0] == "all" else argv
    for name in names:
        if len(names) > 1:  # each item in its own process: peaks do not add up
            subprocess.run([sys.executable, __file__, name], check=False)
            continue
        print(json.dumps({"item": name, "load": os.getloadavg()[0], **run_one(name)}),
              flush=True)
        os._exit(0)  # launched apps leave server threads behind


if __name__ == "__main__":
    threading.excepthook = lambda args: None
    main(sys.argv[1:])
