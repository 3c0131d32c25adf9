"""The study in the app, in-process through gradio_client: pairs are not reproducible
through /generate, invented sessions do not become new voters, forged cookies are refused,
the results tab computes, and the export carries every field."""

from __future__ import annotations

import json
import socket

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from hypersd_core.study.export import EXPORT_COLUMNS

NEW_VOTERS_PER_HOUR = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from conftest import build_tiny_sd15

    from hypersd_core.app.service import AppSettings

    root = tmp_path_factory.mktemp("study-app")
    model = root / "tiny"
    build_tiny_sd15(model)
    index = json.loads((model / "model_index.json").read_text())
    index["_hypersd"] = {"kind": "digits", "guidance_scale": 2.0}
    (model / "model_index.json").write_text(json.dumps(index))
    study_yaml = root / "study.yaml"
    study_yaml.write_text(yaml.safe_dump({
        "prompts": ["a red handwritten digit 7", "a blue handwritten digit 3"],
        "methods": ["teacher", "hypersd-unet"], "steps": [1, 2], "seeds": [0, 1],
        "primary": {"method": "hypersd-unet", "against": ["teacher"]},
        "new_voters_per_ip_per_hour": NEW_VOTERS_PER_HOUR}))
    mp = pytest.MonkeyPatch()
    mp.setattr("hypersd_core.models.backbone.DIGITS_ADAPTERS", root / "no-adapters")
    mp.setenv("GRADIO_TEMP_DIR", str(root / "gradio-tmp"))
    mp.setenv("HYPERSD_STUDY_SALT", "test-salt-0123456789abcdef")
    settings = AppSettings.from_env(
        model=str(model), runs_dir=root / "runs", study_db=root / "study" / "votes.db",
        study_config=study_yaml, lora_dir=root / "loras", models_dir=root / "models",
        data_dir=root / "data", port=_free_port())
    yield settings
    mp.undo()


@pytest.fixture(scope="module")
def launched(env):
    import app

    demo = app.build_demo(env)
    kwargs = app.launch_kwargs(env)
    kwargs.update(prevent_thread_lock=True, quiet=True)
    _, url, _ = demo.launch(**kwargs)
    yield demo, url
    demo.close()
    demo.hypersd["store"].close()


def _fn(demo, name: str, first_output_label: str | None = None) -> int:
    """fn_index of the event whose function has ``name`` (and first output label)."""
    for i, fn in demo.fns.items():
        if fn.name == name and (first_output_label is None
                                or getattr(fn.outputs[0], "label", None) == first_output_label):
            return i
    raise KeyError(name)


def _vote_fn(demo, choice_label: str) -> int:
    for i, fn in demo.fns.items():
        if fn.name == "handler" and fn.targets and \
                getattr(demo.blocks[fn.targets[0][0]], "value", None) == choice_label:
            return i
    raise KeyError(choice_label)


def _client(url, **kw):
    from gradio_client import Client

    client = Client(url, verbose=False, **kw)
    for endpoint in client.endpoints.values():  # private events are reachable by fn_index
        endpoint.is_valid = True               # (as an attacker would call them)
    return client


def _vote(client, demo, label: str) -> str:
    out = client.predict(fn_index=_vote_fn(demo, label))
    return out if isinstance(out, str) else out[0]


def _show(client, demo):
    return client.predict(fn_index=_fn(demo, "show_pair"))


def test_study_pairs_not_reproducible_through_generate(launched) -> None:
    demo, url = launched
    store, service = demo.hypersd["store"], demo.hypersd["service"]
    client = _client(url)
    for _ in range(2):
        a_path, b_path, caption, *_ = _show(client, demo)
        pair = store.pairs_frame().iloc[-1]
        shown = np.asarray(Image.open(a_path).convert("RGB"))
        native = service.generate(pair.method_left, int(pair.steps_left), [pair.prompt],
                                  [store.seed_for(pair.prompt, int(pair.seed_slot))])[0].image
        f = shown.shape[0] // native.height
        assert f >= 1 and shown.shape[0] >= 256  # upscaled nearest-neighbour for the screen
        assert np.array_equal(shown[::f, ::f], np.asarray(native.convert("RGB")))  # control
        assert str(pair.seed_slot) not in caption and pair.method_left not in caption
        secret = store.seed_for(pair.prompt, int(pair.seed_slot))
        with pytest.raises(Exception, match="seed must be in"):  # outside /generate's range
            client.predict(pair.prompt, pair.method_left, int(pair.steps_left), secret,
                           api_name="/generate")
        for seed in (0, 1, int(pair.seed_slot), 2**32 - 1, 42):
            path, _ = client.predict(pair.prompt, pair.method_left, int(pair.steps_left), seed,
                                     api_name="/generate")
            public = np.asarray(Image.open(path).convert("RGB"))
            assert not np.array_equal(public, shown[::f, ::f]), seed


def test_invented_sessions_do_not_become_new_voters(launched) -> None:
    demo, url = launched
    store = demo.hypersd["store"]
    before = set(store.votes_frame().voter_hash)
    stored, refused = 0, 0
    for _ in range(10):  # ten fresh clients: ten session hashes and ten fresh cookies
        c = _client(url)
        _show(c, demo)
        message = _vote(c, demo, "A is better")
        if message.startswith("Thanks"):
            stored += 1
        else:
            assert "too many new voters" in message, message
            refused += 1
    new = set(store.votes_frame().voter_hash) - before
    assert len(new) == stored == NEW_VOTERS_PER_HOUR and refused == 10 - stored
    # one browser (one cookie) keeps voting under any number of session hashes
    keeper = _client(url)
    cookie = keeper.cookies.get("hypersd_voter")
    assert cookie and "." in cookie
    forged = _client(url, httpx_kwargs={"cookies": {"hypersd_voter": cookie.split(".")[0] + ".0000"}})
    _show(keeper, demo)  # the viewer's id must also be valid to show a pair
    with pytest.raises(Exception, match="voter cookie"):
        _show(forged, demo)
    message = _vote(forged, demo, "B is better")
    assert "voter cookie" in message
    assert set(store.votes_frame().voter_hash) - before == new  # nothing new was counted


def test_results_tab_and_export_from_a_session(launched, tmp_path) -> None:
    from compare_tab.study_results import compute, export, summary_markdown

    demo, url = launched
    store = demo.hypersd["store"]
    config = demo.hypersd["study_config"] if "study_config" in demo.hypersd else None
    from hypersd_core.study.store import StudyConfig

    config = config or StudyConfig.from_yaml(launched[0].hypersd["settings"].study_config)
    res = compute(store, config, n_boot=100)
    assert {"steps", "method", "n_votes", "strength", "ci_low", "ci_high"} <= set(res.strengths)
    assert "within each step count" in res.note and summary_markdown(res).startswith("**")
    assert "all" not in set(res.strengths.steps)  # step counts are never pooled
    csv, doc = export(store)
    df = pd.read_csv(csv, keep_default_na=False)
    assert list(df.columns) == EXPORT_COLUMNS and {"voted", "skipped"} <= set(df.status)
    voted = df[df.status == "voted"]
    assert set(voted.voter_kind) == {"cookie"} and (voted.code_version != "").all()
    assert set(df.base_model) == {str(demo.hypersd["settings"].model)}
    assert (store.db_path.parent / f"study_config-{df.config_hash[0]}.yaml").exists()


def test_results_event_renders_plot_and_tables(launched) -> None:
    demo, url = launched
    c = _client(url)
    for label in ("A is better", "Tie"):
        _show(c, demo)
        assert _vote(c, demo, label).startswith("Thanks") or len(
            demo.hypersd["store"].votes_frame())  # (this address may be at its voter limit)
    out = c.predict("", "voter", "tie", False, fn_index=_fn(demo, "refresh"))
    summary, plot, strengths = out[0], out[1], out[2]
    assert "votes from" in summary and "within each step count" in summary
    assert plot is not None
    rows = strengths["data"] if isinstance(strengths, dict) else strengths
    assert rows and all(len(r) == 7 for r in rows)
    login_only = c.predict("", "prompt", "exclude", True, fn_index=_fn(demo, "refresh"))
    assert login_only[0].startswith("**0 votes")  # no logged-in voter in this session


def test_login_rules() -> None:
    from types import SimpleNamespace

    from compare_tab.study import COOKIE, VoterCookies, identify
    from hypersd_core.study.store import StudyConfig

    cookies = VoterCookies(b"test-salt-0123456789abcdef")
    valid = cookies.mint()
    req = SimpleNamespace(cookies={COOKIE: valid}, session_hash="s1", username=None,
                          headers={}, client=None)
    assert identify(req, None, cookies, StudyConfig())[1] == "cookie"
    need_login = StudyConfig(require_login=True)
    assert "logged-in voters only" in identify(req, None, cookies, need_login)
    assert identify(req, SimpleNamespace(username="ann"), cookies, need_login) == \
        ("login:ann", "login")
    no_cookie = SimpleNamespace(cookies={}, session_hash="s1", username=None)
    assert "voter cookie" in identify(no_cookie, None, cookies, StudyConfig())
    assert identify(no_cookie, None, cookies, StudyConfig(allow_session=True)) == \
        ("session:s1", "session")
    flipped = valid[:-1] + ("1" if valid[-1] == "0" else "0")  # a different signature
    tampered = SimpleNamespace(cookies={COOKIE: flipped}, session_hash="s1",
                               username=None)
    assert "voter cookie" in identify(tampered, None, cookies, StudyConfig())
