"""Routing policies: which pool member gets a prompt.

`RoundRobin` spreads requests in turn. `PrefixAware` sends a prompt where its prefix is most likely cached:
every policy remembers, per member, the chained block hashes of the prompts it routed there (an LRU-bounded
set, hashed as the engine's prefix cache keys its blocks), and `PrefixAware` prefers the member holding the
longest matched prefix unless that member is more than `gate` requests busier than the least-loaded one. Both
keep the same hit statistics (blocks matched on the chosen member / blocks routed), so the two can be compared.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from cumulo.engine.block_manager import block_hashes
from cumulo.errors import InvalidRequest

DEFAULT_MAX_BLOCKS = 65536  # hashes remembered per member; an engine's cache rarely holds more blocks


@dataclass(slots=True)
class PrefixStats:
    blocks_routed: int = 0
    blocks_matched: int = 0

    @property
    def hit_rate(self) -> float:
        return self.blocks_matched / self.blocks_routed if self.blocks_routed else 0.0


class Router:
    """Base: the per-member memory of routed prefixes and the hit counts; subclasses choose."""

    def __init__(self, block_size: int, max_blocks: int = DEFAULT_MAX_BLOCKS) -> None:
        self.block_size = block_size
        self.max_blocks = max_blocks
        self._hashes: dict[str, OrderedDict[bytes, None]] = {}
        self.stats: dict[str, PrefixStats] = {}

    def route(self, prompt_token_ids: list[int], loads: dict[str, int]) -> str:
        """Picks one of `loads` (member name -> requests it has or has queued) for the prompt, and records the
        prompt's blocks as cached there. `loads` must not be empty."""
        hashes = block_hashes(prompt_token_ids, self.block_size)
        matched = {name: self._matched(name, hashes) for name in loads}
        name = self.choose(matched, loads)
        self._record(name, hashes, matched[name])
        return name

    def choose(self, matched: dict[str, int], loads: dict[str, int]) -> str:
        raise NotImplementedError

    def forget(self, name: str) -> None:
        """A member removed or lost: its cache is gone (its counts stay for the record)."""
        self._hashes.pop(name, None)

    def hit_rate(self, name: str | None = None) -> float:
        """Blocks matched / blocks routed, for one member or all of them."""
        if name is not None:
            return self.stats.get(name, PrefixStats()).hit_rate
        total = PrefixStats(
            sum(s.blocks_routed for s in self.stats.values()),
            sum(s.blocks_matched for s in self.stats.values()),
        )
        return total.hit_rate

    def _matched(self, name: str, hashes: list[bytes]) -> int:
        """Leading blocks of the prompt this member was sent before (hashes are chained: a prefix)."""
        held = self._hashes.get(name)
        if not held:
            return 0
        n = 0
        for h in hashes:
            if h not in held:
                break
            n += 1
        return n

    def _record(self, name: str, hashes: list[bytes], matched: int) -> None:
        held = self._hashes.setdefault(name, OrderedDict())
        for h in hashes:
            held[h] = None
            held.move_to_end(h)
        while len(held) > self.max_blocks:
            held.popitem(last=False)
        stats = self.stats.setdefault(name, PrefixStats())
        stats.blocks_routed += len(hashes)
        stats.blocks_matched += matched


class RoundRobin(Router):
    def __init__(self, block_size: int, max_blocks: int = DEFAULT_MAX_BLOCKS) -> None:
        super().__init__(block_size, max_blocks)
        self._turn = 0

    def choose(self, matched: dict[str, int], loads: dict[str, int]) -> str:
        names = sorted(loads)
        name = names[self._turn % len(names)]
        self._turn += 1
        return name


class PrefixAware(Router):
    """Longest cached prefix wins, unless its member has more than `gate` requests more than the least-loaded
    member: then the least-loaded wins, so affinity never piles work on one replica."""

    def __init__(self, block_size: int, max_blocks: int = DEFAULT_MAX_BLOCKS, gate: int = 4) -> None:
        super().__init__(block_size, max_blocks)
        self.gate = gate
        self._turn = 0

    def choose(self, matched: dict[str, int], loads: dict[str, int]) -> str:
        names = sorted(loads)
        self._turn += 1
        # Ties in load go round the members in turn, so an idle pool still spreads its first prompts.
        rotated = names[self._turn % len(names) :] + names[: self._turn % len(names)]
        least = min(rotated, key=lambda n: loads[n])
        best = min(rotated, key=lambda n: (-matched[n], loads[n]))
        if matched[best] == 0 or loads[best] - loads[least] > self.gate:
            return least
        return best


POLICIES = {"prefix": PrefixAware, "round-robin": RoundRobin}


def make_router(policy: str, block_size: int) -> Router:
    try:
        return POLICIES[policy](block_size)
    except KeyError:
        raise InvalidRequest(
            f"unknown routing policy {policy!r}; choose from {', '.join(POLICIES)}"
        ) from None
