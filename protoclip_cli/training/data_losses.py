"""What a run lost of its data: broken samples skipped (undecodable images, captions that are not
UTF-8, damaged tar records) and shards that end before the count the episode plan holds for them
(a cut tar). The trainer notes both from every batch; the episode line, metrics.jsonl and the run
manifest report them, naming each short shard so that ``protoclip download NAME --verify`` can
repair it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator


@dataclass
class DataLosses:
    broken: int = 0  # broken samples skipped in the whole run
    broken_by_episode: dict[int, int] = field(default_factory=dict)
    short_by_episode: dict[int, dict[str, tuple[int, int]]] = field(default_factory=dict)  # shard -> (read, held)

    def count_broken(self, episode: int, broken: int) -> None:
        if broken:
            self.broken += broken
            self.broken_by_episode[episode] = self.broken_by_episode.get(episode, 0) + broken

    def note(self, episode: int, batch: dict) -> None:
        """Record a batch's broken samples and the shards it reports as ending early (each shard once
        per episode, whichever pass saw it)."""
        self.count_broken(episode, int(batch.get("broken", 0)))
        for shard, read, held in batch.get("short", ()):
            self.short_by_episode.setdefault(episode, {})[shard] = (int(read), int(held))

    def noting_short_shards(self, episode: int, batches: Iterator[dict]) -> Iterator[dict]:
        """``batches`` unchanged, their short shards noted (the extraction pass counts its broken samples itself)."""
        for batch in batches:
            for shard, read, held in batch.get("short", ()):
                self.short_by_episode.setdefault(episode, {})[shard] = (int(read), int(held))
            yield batch

    def short_shards(self) -> dict[str, list[int]]:
        """Shard id -> [records read, records the plan counts], for every shard that ended early."""
        return {shard: list(counts) for shards in self.short_by_episode.values() for shard, counts in shards.items()}

    def lost(self, episode: int | None = None) -> int:
        """Samples the plan counts but cut shards no longer hold: those of ``episode``'s shards, or of
        every shard that ended early (None; each counted once, however many episodes read it)."""
        shards = self.short_by_episode.get(episode, {}) if episode is not None else self.short_shards()
        return sum(held - read for read, held in shards.values())

    def episode_record(self, episode: int) -> dict[str, Any]:
        """The episode's metrics.jsonl fields."""
        record: dict[str, Any] = {"broken": self.broken_by_episode.get(episode, 0), "broken_total": self.broken}
        short = self.short_by_episode.get(episode, {})
        if short:
            record["lost"] = self.lost(episode)
            record["short_shards"] = {shard: list(counts) for shard, counts in short.items()}
        return record

    def episode_words(self, episode: int) -> str:
        """What the episode line adds: ', N broken samples skipped', ', M samples lost: shard ...'."""
        words = f", {self.broken_by_episode[episode]} broken samples skipped" if self.broken_by_episode.get(episode) else ""
        short = self.short_by_episode.get(episode, {})
        if short:
            words += f", {self.lost(episode)} samples lost: " + "; ".join(
                f"shard {shard} ends after {read} of its {held} samples" for shard, (read, held) in sorted(short.items()))
        return words

    def run_summary(self) -> dict[str, Any]:
        """The run manifest's fields."""
        summary: dict[str, Any] = {"broken_samples": self.broken}
        if self.short_by_episode:
            summary["lost_samples"], summary["short_shards"] = self.lost(), self.short_shards()
        return summary
