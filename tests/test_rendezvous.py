"""Rendezvous hashing: stable owners that move only when they must."""

from __future__ import annotations

from collections import Counter

import pytest

from stagehand._rendezvous import owner, ranked, score

PEERS = ["a1f3", "b7c2", "c90e", "d44b"]
KEYS = [f"fingerprint-{n}" for n in range(4000)]


def test_score_same_on_every_machine() -> None:
    # Peers must agree on owners, so the score comes from blake2b, whose
    # output is fixed by its specification, and not from hash().
    assert score("k", "a1f3") == 16309132966226265555
    assert score("fingerprint-1", "c90e") == 6530314835847644602


def test_score_separates_key_from_peer() -> None:
    assert score("ab", "c") != score("b", "ca")


def test_owner_ignores_peer_order() -> None:
    for key in KEYS[:200]:
        assert owner(key, PEERS) == owner(key, reversed(PEERS))


def test_owner_is_first_of_ranked() -> None:
    for key in KEYS[:200]:
        order = ranked(key, PEERS)
        assert sorted(order) == sorted(PEERS)
        assert order[0] == owner(key, PEERS)


def test_owners_spread_over_peers() -> None:
    counts = Counter(owner(key, PEERS) for key in KEYS)
    assert set(counts) == set(PEERS)
    # 1,000 keys each on average, with a standard deviation of about 27.
    assert all(700 < count < 1300 for count in counts.values())


def test_leaving_peer_moves_only_its_keys() -> None:
    before = {key: owner(key, PEERS) for key in KEYS}
    survivors = [peer for peer in PEERS if peer != "b7c2"]
    for key, old in before.items():
        new = owner(key, survivors)
        if old != "b7c2":
            assert new == old
        else:
            assert new == ranked(key, PEERS)[1]


def test_joining_peer_takes_only_keys_it_wins() -> None:
    before = {key: owner(key, PEERS) for key in KEYS}
    joined = [*PEERS, "e512"]
    moved = 0
    for key, old in before.items():
        new = owner(key, joined)
        assert new in (old, "e512")
        moved += new == "e512"
    assert 0 < moved < len(KEYS) / 2


def test_owner_without_peers_raises() -> None:
    with pytest.raises(ValueError, match="no peers to choose an owner from"):
        owner("k", [])
