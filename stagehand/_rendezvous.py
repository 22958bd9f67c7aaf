"""Rendezvous (highest random weight) hashing: which peer owns a key.

Every peer computes a score for each pair of key and peer id and picks the
peer with the highest one. All peers that see the same set of peers agree
on the owner without talking to each other. When a peer leaves, only the
keys it owned move, each to the peer with its next highest score. When a
peer joins, it takes over only the keys for which it scores highest.

Cluster mode routes each unique job to the owner of its fingerprint.
"""

from __future__ import annotations

from collections.abc import Iterable
from hashlib import blake2b

__all__ = ["owner", "ranked"]


def score(key: str, peer_id: str) -> int:
    """Return the weight of `peer_id` for `key`, the same on every machine."""
    # The peer id's length goes first, so no two pairs hash the same bytes.
    peer = peer_id.encode()
    data = len(peer).to_bytes(4, "big") + peer + key.encode()
    return int.from_bytes(blake2b(data, digest_size=8).digest(), "big")


def owner(key: str, peer_ids: Iterable[str]) -> str:
    """Return the peer that owns `key` among `peer_ids`.

    Raises:
        ValueError: `peer_ids` is empty.
    """
    best: str | None = None
    best_score = -1
    for peer_id in peer_ids:
        weight = score(key, peer_id)
        # Ties, which need two equal 64-bit hashes, go to the smaller id.
        if weight > best_score or (
            weight == best_score and best is not None and peer_id < best
        ):
            best, best_score = peer_id, weight
    if best is None:
        raise ValueError("no peers to choose an owner from; pass at least one peer id")
    return best


def ranked(key: str, peer_ids: Iterable[str]) -> list[str]:
    """Return `peer_ids` from the owner of `key` to the last in line."""
    return sorted(peer_ids, key=lambda peer_id: (-score(key, peer_id), peer_id))
