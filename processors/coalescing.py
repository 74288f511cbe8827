"""Identical requests computed once: the first miss of a key leads, later
misses of the same key (in any batch, while it is queued or computing)
follow and take its answer."""

from __future__ import annotations

from processors.items import Item


class Coalescer:
    def __init__(self) -> None:
        self._leaders: dict[str, Item] = {}  # cache key -> the miss that will compute it

    def __len__(self) -> int:
        return len(self._leaders)

    def join(self, it: Item) -> bool:
        """Lead the item's key, or follow its leader; True if it follows."""
        assert it.serve is not None
        key = it.serve.key_hash
        lead = self._leaders.get(key)
        if lead is None:
            self._leaders[key] = it
            return False
        it.leader, it.cache = lead, "coalesced"
        if lead.followers is None:
            lead.followers = []
        lead.followers.append(it)
        return True

    def orphaned(self, it: Item) -> bool:
        """A follower whose leader will never compute (dropped in a revoke,
        or expired) computes itself; say whether that happened."""
        lead = it.leader
        if lead is None or not (lead.dropped or lead.status == "expired"):
            return False
        it.leader, it.cache = None, "miss"
        if it.serve is not None:
            self._leaders.setdefault(it.serve.key_hash, it)
        return True

    def release(self, it: Item) -> None:
        """The item's computation is over (or will not happen): later misses
        of its key lead anew."""
        if it.serve is not None and self._leaders.get(it.serve.key_hash) is it:
            del self._leaders[it.serve.key_hash]
