"""The study under hostile clients: the export never unblinds a pair nobody voted on,
a forged X-Forwarded-For entry does not make a new voter, and one voter's votes are capped."""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd
import pytest

from hypersd_core.study.store import RateLimited, StudyConfig, StudyStore

SALT = "test-salt-0123456789abcdef"


@pytest.fixture()
def store(tmp_path):
    s = StudyStore(tmp_path / "votes.db", salt=SALT, durable=False)
    yield s
    s.close()


def test_export_never_names_the_methods_of_an_unvoted_pair(store, tmp_path):
    cfg = StudyConfig(methods=["lcm", "hypersd"], steps=[1])
    voted = store.next_pair(cfg, viewer_id="cookie:v1")
    store.record_vote(voted.token, "A", "cookie:v1", "cookie")
    store.next_pair(cfg, viewer_id="cookie:v2")  # on someone's screen now
    df = pd.read_csv(store.export_csv(tmp_path / "votes.csv"), keep_default_na=False)
    on_screen = df[df.status != "voted"]
    assert len(on_screen) == 1
    for col in ("method_left", "method_right", "adapter_left", "adapter_right",
                "hash_left", "hash_right"):
        assert (on_screen[col] == "").all(), col
    assert set(df[df.status == "voted"][["method_left", "method_right"]].iloc[0]) == \
        {"lcm", "hypersd"}


def _request(peer: str, forwarded: str | None = None):
    headers = {"x-forwarded-for": forwarded} if forwarded else {}
    return SimpleNamespace(client=SimpleNamespace(host=peer), headers=headers)


def test_forged_forwarded_entries_do_not_make_new_voters(store):
    """Eight voters, each behind a made-up X-Forwarded-For entry, from one address:
    only the configured number of new voters is counted."""
    from compare_tab.study import client_ip

    cfg = StudyConfig(methods=["lcm", "hypersd"], steps=[1], new_voters_per_ip_per_hour=3)
    counted = 0
    for i in range(8):
        # no trusted proxy: the header is ignored; one trusted proxy: only the entry it
        # appended (the rightmost) is read, never the client's own
        for trusted, forwarded in ((0, f"10.0.0.{i}"), (1, f"10.0.0.{i}, 203.0.113.7")):
            pair = store.next_pair(cfg)
            ip = client_ip(_request("203.0.113.7" if trusted == 0 else "127.0.0.1", forwarded),
                           trusted)
            assert ip == "203.0.113.7"
            try:
                store.record_vote(pair.token, "A", f"cookie:{i}-{trusted}", "cookie", ip=ip,
                                  new_voters_per_hour=cfg.new_voters_per_ip_per_hour)
                counted += 1
            except RateLimited:
                pass
    assert counted == 3


def test_votes_per_voter_are_capped(store):
    cfg = StudyConfig(methods=["lcm", "hypersd"], steps=[1], votes_per_voter=5)
    stored = 0
    for _ in range(8):
        pair = store.next_pair(cfg)
        try:
            store.record_vote(pair.token, "tie", "cookie:one", "cookie",
                              votes_per_voter=cfg.votes_per_voter)
            stored += 1
        except RateLimited as err:
            assert "cap per voter" in str(err)
    assert stored == 5
    with pytest.raises(ValueError, match="votes_per_voter"):
        StudyConfig(votes_per_voter=0)
