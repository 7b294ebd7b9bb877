"""Iteration-level scheduling: who joins the running batch, who waits, who is preempted.

Policy (TGIS §2.3–§2.4, adapted to a slot-accounted KV cache):
- FIFO admission between decode steps while the batch has room (`max_batch_size`), the new group's padded prefill
  fits the per-step token budget, and the merged batch still fits the KV capacity after its next step.
- Bounded queue jump: an entry that does not fit is skipped, but scanning stops at the first entry queued more than
  `max_queue_jump_s` after the first skipped one, so a long request cannot starve.
- Joining is batched up: while several requests run, a join waits until enough requests are waiting or a waiting
  request has waited `max_waiting_tokens` decode steps (TGIS' min-size rule).
- When the cache cannot hold the next step, the newest running request is preempted: its cache is dropped and it
  goes back to the front of the queue, to be recomputed from prompt + generated ids.
"""

from __future__ import annotations

from collections import deque

from runtime.engine.config import EngineConfig
from runtime.engine.kv_cache import KVCacheManager
from runtime.engine.sequence import SeqStatus, Sequence


class Scheduler:
    def __init__(self, config: EngineConfig, kv: KVCacheManager):
        self.config = config
        self.kv = kv
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in batch-row order
        self.waiting_steps = 0  # decode steps since the last join

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def find(self, request_id: str) -> Sequence | None:
        for seq in (*self.waiting, *self.running):
            if seq.id == request_id:
                return seq
        return None

    def remove_waiting(self, seqs: list[Sequence]) -> None:
        gone = set(map(id, seqs))
        self.waiting = deque(s for s in self.waiting if id(s) not in gone)

    def expired(self, now: float) -> list[Sequence]:
        """Queued requests whose deadline passed (answered TIME_LIMIT with no tokens)."""
        return [s for s in self.waiting if s.deadline_passed(now)]

    def _min_join(self) -> int:
        running = len(self.running)
        max_wait = self.config.max_waiting_tokens
        if running <= 1 or self.waiting_steps >= max_wait:
            return 1
        return max(1, running * (max_wait - self.waiting_steps) // max_wait)

    def schedule_prefill(self) -> list[Sequence]:
        """Pick waiting requests to prefill now (possibly none)."""
        room = self.config.max_batch_size - len(self.running)
        if room <= 0 or len(self.waiting) < self._min_join():
            return []
        chosen: list[Sequence] = []
        skipped_at: float | None = None
        for seq in self.waiting:
            if skipped_at is not None and seq.arrival - skipped_at > self.config.max_queue_jump_s:
                break
            group = [*chosen, seq]
            width = max(s.decoder_length(self.kv.start_id) for s in group)
            if width * len(group) <= max(self.config.max_prefill_tokens, width) and self.kv.fits(
                self.running + group
            ):
                chosen.append(seq)
                if len(chosen) == room:
                    break
            elif skipped_at is None:
                skipped_at = seq.arrival
        if len(chosen) < self._min_join():
            return []
        self.remove_waiting(chosen)
        for seq in chosen:
            seq.status = SeqStatus.RUNNING
        self.waiting_steps = 0
        return chosen

    def preempt_for_step(self) -> list[Sequence]:
        """Preempt newest running requests until the next decode step fits the cache."""
        preempted: list[Sequence] = []
        while len(self.running) > 1 and not self.kv.fits(self.running):
            seq = self.running.pop()
            seq.status = SeqStatus.WAITING
            preempted.append(seq)
        for seq in preempted:  # newest-last order is preserved at the queue's front
            self.waiting.appendleft(seq)
        return preempted
