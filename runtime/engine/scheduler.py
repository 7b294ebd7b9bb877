"""Iteration-level scheduling with chunked prefill: who computes how many tokens this step, who waits, who is
preempted.

Each step spends a token budget (`max_num_batched_tokens`): first one token for every running decode, then prompt
chunks of running sequences that are still prefilling, then new sequences from the queue. So a long prompt that
arrives never holds running streams back for more than one chunk step. TGIS policies (spec §2.3–§2.4):
- FIFO admission while the batch has room (`max_batch_size`), the budget has tokens and the KV cache has room.
- Bounded queue jump: an entry that does not fit is skipped, but scanning stops at the first entry queued more than
  `max_queue_jump_s` after the first skipped one, so a long request cannot starve.
- Min-join rule: while several requests run, a join waits until enough requests are waiting or a waiting request has
  waited `max_waiting_tokens` steps.
- When the cache cannot hold the next decode step, the newest running request is preempted: its cache is dropped and
  it goes back to the front of the queue, to be recomputed from prompt + generated ids (with prefix caching, mostly
  from blocks that are still cached).
Runners that cannot continue a prompt (the padded transformers runner) get whole prompts, charged at their padded
size.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from runtime.engine.config import EngineConfig
from runtime.engine.kv_cache import KVManager
from runtime.engine.sequence import SeqStatus, Sequence


@dataclass
class Scheduled:
    """A step's schedule: (sequence, tokens to compute) with decodes first, and who was preempted or joined."""

    rows: list[tuple[Sequence, int]] = field(default_factory=list)
    admitted: list[Sequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)


class Scheduler:
    def __init__(self, config: EngineConfig, kv: KVManager, budget: int, chunked: bool, padded: bool):
        self.config = config
        self.kv = kv
        self.chunked = chunked
        self.padded = padded
        self.budget = max(budget, config.max_batch_size)  # every running sequence can always decode
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last is the newest
        self.waiting_steps = 0  # steps since the last join

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

    def finish(self, seqs: list[Sequence]) -> None:
        """Running sequences that are done (finished or aborted) leave the batch and give their cache back."""
        gone = set(map(id, seqs))
        for seq in seqs:
            self.kv.release(seq)
            seq.status = SeqStatus.FINISHED
        self.running = [s for s in self.running if id(s) not in gone]

    def expired(self, now: float) -> list[Sequence]:
        """Queued requests whose deadline passed (answered TIME_LIMIT with no tokens)."""
        return [s for s in self.waiting if s.deadline_passed(now)]

    # ---- the step --------------------------------------------------------------------------------------------
    def schedule(self) -> Scheduled:
        out = Scheduled()
        budget = self.budget
        for seq in [s for s in self.running if s.to_compute == 1]:
            if seq.status is not SeqStatus.RUNNING:
                continue  # preempted for an older sequence in this loop
            if self._make_room(seq, out.preempted):
                out.rows.append((seq, 1))
                budget -= 1
        for seq in [s for s in self.running if s.to_compute > 1]:
            if seq.status is SeqStatus.RUNNING and budget > 0:
                n = min(seq.to_compute, budget) if self.chunked else seq.to_compute
                out.rows.append((seq, n))
                budget -= n
        if not out.preempted:
            self._admit(out, budget)
        self.waiting_steps = 0 if out.admitted else self.waiting_steps + 1
        return out

    def _make_room(self, seq: Sequence, preempted: list[Sequence]) -> bool:
        """Room for `seq`'s next token, preempting the newest running sequences; False if `seq` itself went."""
        while not self.kv.grow(seq):
            victim = self.running.pop()
            self.kv.release(victim)
            victim.status = SeqStatus.WAITING
            self.waiting.appendleft(victim)  # the oldest victim ends up first in the queue
            preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _min_join(self) -> int:
        running = len(self.running)
        max_wait = self.config.max_waiting_tokens
        if running <= 1 or self.waiting_steps >= max_wait:
            return 1
        return max(1, running * (max_wait - self.waiting_steps) // max_wait)

    def _admit(self, out: Scheduled, budget: int) -> None:
        room = self.config.max_batch_size - len(self.running)
        if self.padded:
            budget = self.budget  # a padded prefill is its own forward: only the group's padded size counts
        if room <= 0 or budget <= 0 or len(self.waiting) < self._min_join():
            return
        loras = {s.request.lora.name for s in self.running if s.request.lora}
        chosen: list[tuple[Sequence, int]] = []
        skipped_at: float | None = None
        width = 0  # padded runners: the new group's padded prompt width
        for seq in self.waiting:
            if len(chosen) == room or budget <= 0:
                break
            if skipped_at is not None and seq.arrival - skipped_at > self.config.max_queue_jump_s:
                break
            lora = seq.request.lora
            fits = lora is None or lora.name in loras or len(loras) < self.config.max_loras
            if fits and self.kv.admit(seq):
                n = min(seq.to_compute, budget) if self.chunked else seq.to_compute
                if self.padded:
                    new_width = max(width, len(seq.tokens) + seq.encoder_length)
                    fits = new_width * (len(chosen) + 1) <= max(self.budget, new_width)
                else:
                    fits = n <= budget or not (out.rows or chosen)  # a whole prompt may exceed an empty step
                if fits:
                    chosen.append((seq, n))
                    if self.padded:
                        width = new_width
                    else:
                        budget -= n
                    if lora is not None:
                        loras.add(lora.name)
                    continue
                self.kv.release(seq)
            if skipped_at is None:
                skipped_at = seq.arrival
        if len(chosen) < self._min_join():
            for seq, _ in chosen:
                self.kv.release(seq)
            return
        self.remove_waiting([seq for seq, _ in chosen])
        for seq, _ in chosen:
            seq.status = SeqStatus.RUNNING
        self.running.extend(seq for seq, _ in chosen)
        out.rows.extend(chosen)
        out.admitted = [seq for seq, _ in chosen]
