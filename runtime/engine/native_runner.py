"""The native paged runner: step plans → one flattened forward of the native model over a paged KV cache.

Per sequence it keeps a row of a persistent device block table (extended by the plan's new block ids, never
resent), its prompt-prefix embeddings and its LoRA slot. Per step it copies the plan's token ids and a few ints per
row to the device and derives positions and cache slots there, so host work grows with the step's new tokens and
rows, never with context length. Decode-only steps on CUDA replay captured graphs (runtime/engine/cuda_graphs.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

from runtime.engine.config import EngineConfig
from runtime.engine.kv_cache import free_memory_bytes
from runtime.engine.plan import ModelOutput, RowPlan, StepPlan
from runtime.engine.staging import to_device
from runtime.models.loader import LoadedModel
from runtime.models.native.attention import FP8, AttentionMetadata, TorchAttention, storage
from runtime.models.native.llama import NativeCausalLM
from runtime.models.native.lora import NativeLoraManager

log = logging.getLogger(__name__)


@dataclass
class _SeqState:
    row: int  # row of the persistent block table
    num_blocks: int = 0
    prefix: torch.Tensor | None = None  # prompt-tuning embeddings of positions [0, n)
    lora_slot: int = -1


@dataclass
class StepInputs:
    """A step's device inputs; `sample_index` picks the hidden rows whose logits are sampled."""

    ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    sample_index: torch.Tensor
    query_start: list[int]  # host copy: where each row's tokens start


def attention_backend(config: EngineConfig, device: torch.device):
    name = config.attention_backend
    if name == "auto":
        name = "triton" if device.type == "cuda" else "cpu" if device.type == "cpu" else "torch"
    if name == "triton":
        from runtime.models.native.triton_attention import TritonAttention

        return TritonAttention()
    if name == "cpu":
        from runtime.models.native.cpu_attention import CpuAttention

        return CpuAttention()
    return TorchAttention()


class NativeRunner:
    paged = True
    chunked_prefill = True
    reads_device_tokens = True  # takes a row's last id from the previous step's device tensor (async scheduling)
    failure: str | None = None

    def __init__(self, loaded: LoadedModel, config: EngineConfig):
        self.loaded = loaded
        self.model: NativeCausalLM = loaded.model
        self.device, self.dtype = loaded.device, loaded.dtype
        self.cache_dtype = FP8 if config.kv_cache_dtype == "fp8" else self.dtype
        self.config = config
        self.block_size = config.block_size
        self.backend = attention_backend(config, self.device)
        self.states: dict[str, _SeqState] = {}
        self.free_rows = list(range(config.max_batch_size))
        self.block_table: torch.Tensor | None = None
        self.caches: torch.Tensor | None = None
        self.lora: NativeLoraManager | None = None
        self.graphs = None
        self.sharded = dist.is_initialized() and dist.get_world_size() > 1
        if not isinstance(self.backend, TorchAttention):  # Triton is there: batch-1 projections use its GEMV
            from runtime.models.native.triton_gemv import install

            install(self.model)
        elif self.device.type == "cpu" and config.onednn:
            from runtime.models.native import onednn

            onednn.install(self.model)
        if config.compile or (config.compile is None and self.device.type == "cuda"):
            self.model.compile()  # fuses the norms, rotary, activation and residuals between the kernels

    # ---- KV cache ----------------------------------------------------------------------------------------
    def _block_bytes(self) -> int:
        attn = self.model.layers[0].attn
        per_token = 2 * attn.kv_heads * attn.head_dim * self.cache_dtype.itemsize
        return len(self.model.layers) * self.block_size * per_token

    def kv_capacity(self, config: EngineConfig, max_sequence_length: int) -> int:
        """Blocks: from `kv_cache_tokens`, else what fits in `kv_cache_memory_fraction` of the memory left after
        weights and a full-budget forward's activations (on the CPU, at most what full batches can use).
        Allocates the cache (and captures decode graphs on CUDA)."""
        per_seq = -(-max_sequence_length // self.block_size)
        self.block_table = torch.zeros(config.max_batch_size, per_seq, dtype=torch.int32, device=self.device)
        if config.kv_cache_tokens:
            blocks = -(-config.kv_cache_tokens // self.block_size) + 1
        else:
            blocks = self._fit_blocks(config, per_seq)
        if self.sharded:  # every rank must hold the same blocks
            count = torch.tensor([blocks], device=self.device)
            dist.all_reduce(count, op=dist.ReduceOp.MIN)
            blocks = int(count.item())
        attn = self.model.layers[0].attn
        # not zero-filled: a block is zeroed when it joins a block table, so on the CPU the pool takes memory only
        # as it is used; the null block (padding rows read it) is zeroed now
        self.caches = torch.empty(len(self.model.layers), 2, blocks, self.block_size, attn.kv_heads, attn.head_dim,
                                  dtype=self.cache_dtype, device=self.device)
        self.caches[:, :, 0].zero_()
        log.info("KV cache: %d blocks of %d tokens (%.2f GiB, %s)", blocks, self.block_size,
                 blocks * self._block_bytes() / 2**30, str(self.cache_dtype).removeprefix("torch."))
        if config.cuda_graphs and self.device.type == "cuda" and not isinstance(self.backend, TorchAttention):
            from runtime.engine.cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(self, config.max_batch_size, capture=True)
        if self.device.type == "cuda":
            self.warm_up()
        return blocks

    def warm_up(self) -> None:
        """Compile before serving what the JIT compilers specialise on first use: a Triton kernel is compiled again
        for every pointer alignment (a mixed step's prompt rows start `num_decodes` int32s into the step's length
        vector: 16-byte aligned or not) and the compiled layer stages per kind of step. Measured on an H200: the
        first mixed steps of a fresh server took 0.7-1.1 s instead of ~0.1. Runs prompt-only, mixed (3 and 4
        decode rows) and continued-chunk steps on blocks 1.. of the pool, which no sequence holds yet, and leaves
        nothing behind."""
        lengths = [5, 20, 40, 64, 40, 8]  # the fifth prompt comes in two chunks
        blocks = [-(-(n + 2) // self.block_size) for n in lengths]
        if (self.caches.shape[2] <= sum(blocks) or len(self.free_rows) < len(lengths)
                or max(blocks) > self.block_table.shape[1]):  # a tiny pool, batch or sequence length
            return
        first, ids = 1, []
        for n in blocks:
            ids.append(list(range(first, first + n)))
            first += n
        names = [f"warm-up-{i}" for i in range(len(lengths))]

        def prompt(i: int, start: int, stop: int) -> RowPlan:
            return RowPlan(names[i], [1] * (stop - start), start, sample=stop == lengths[i], new=start == 0,
                           new_blocks=ids[i] if start == 0 else [])

        def decode(i: int, step: int) -> RowPlan:
            return RowPlan(names[i], [1], lengths[i] + step, sample=True)

        self.execute(StepPlan([prompt(0, 0, 5), prompt(1, 0, 20), prompt(2, 0, 40), prompt(4, 0, 24)]))
        self.execute(StepPlan([decode(0, 0), decode(1, 0), decode(2, 0), prompt(4, 24, 40), prompt(3, 0, 64)]))
        self.execute(StepPlan([decode(0, 1), decode(1, 1), decode(2, 1), decode(4, 0), prompt(5, 0, 8)]))
        self.execute(StepPlan([], released=names))
        storage(self.caches).index_fill_(2, torch.tensor([b for row in ids for b in row], device=self.device), 0)

    def _fit_blocks(self, config: EngineConfig, per_seq: int) -> int:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            self._profile(config.token_budget("cuda"))
            activations = torch.cuda.max_memory_allocated(self.device) - before
            torch.cuda.empty_cache()
            room = free_memory_bytes(self.device) * config.kv_cache_memory_fraction - activations
            return max(2, int(room) // self._block_bytes())
        room = free_memory_bytes(self.device) * config.kv_cache_memory_fraction
        return max(2, min(int(room) // self._block_bytes(), per_seq * config.max_batch_size + 1))

    @torch.inference_mode()
    def _profile(self, tokens: int) -> None:
        """One forward of a full token budget (one sequence, writes into the null block) to measure activations."""
        attn = self.model.layers[0].attn
        caches = torch.zeros(len(self.model.layers), 2, 1, self.block_size, attn.kv_heads, attn.head_dim,
                             dtype=self.cache_dtype, device=self.device)
        ids = torch.zeros(tokens, dtype=torch.long, device=self.device)
        positions = torch.arange(tokens, device=self.device) % self.model.rope.shape[0]
        meta = AttentionMetadata(slot_mapping=torch.zeros_like(ids),
                                 block_tables=torch.zeros(1, -(-tokens // self.block_size), dtype=torch.int32,
                                                          device=self.device),
                                 seq_lens=torch.tensor([tokens], dtype=torch.int32, device=self.device),
                                 query_start=torch.tensor([0, tokens], dtype=torch.int32, device=self.device),
                                 num_decodes=0, seq_lens_host=[tokens], query_lens_host=[tokens])
        hidden = self.model(self.model.embed(ids), positions, caches, meta, self.backend)
        self.model.logits(hidden[-1:])
        del caches, hidden

    # ---- a step --------------------------------------------------------------------------------------------
    def execute(self, plan: StepPlan) -> ModelOutput:
        for seq_id in plan.released:
            state = self.states.pop(seq_id, None)
            if state is not None:
                self.free_rows.append(state.row)
        if not plan.rows:
            return ModelOutput(torch.empty(0, device=self.device))
        states = [self._state(r) for r in plan.rows]
        self._update_tables(plan.rows, states)
        with torch.inference_mode():
            return self._forward(plan, states)

    def _state(self, row: RowPlan) -> _SeqState:
        if not row.new:
            return self.states[row.seq_id]
        if row.seq_id in self.states:  # resumed after a preemption whose release did not arrive yet
            self.free_rows.append(self.states.pop(row.seq_id).row)
        state = _SeqState(self.free_rows.pop(), prefix=row.decoder_prefix)
        if row.lora is not None:
            in_use = {s.lora_slot for s in self.states.values()}
            state.lora_slot = self._loras().slot_for(row.lora, in_use)
        self.states[row.seq_id] = state
        return state

    def _loras(self) -> NativeLoraManager:
        if self.lora is None:
            self.lora = NativeLoraManager(self.model.projections(), self.config.max_loras, self.device, self.dtype)
        return self.lora

    def check_adapter(self, ref) -> None:
        """ValueError (the client's message) when the adapter cannot be applied to this model."""
        self._loras().check(ref)

    def _update_tables(self, rows: list[RowPlan], states: list[_SeqState]) -> None:
        """Write the plan's new block ids into the persistent table (one indexed copy)."""
        index_rows, index_cols, blocks, fresh = [], [], [], []
        for row, state in zip(rows, states, strict=True):
            for i, block in enumerate(row.new_blocks):
                index_rows.append(state.row)
                index_cols.append(state.num_blocks)
                blocks.append(block)
                state.num_blocks += 1
                if i >= row.reused_blocks:
                    fresh.append(block)
        if blocks:
            where = to_device([index_rows, index_cols], torch.long, self.device)
            self.block_table[where[0], where[1]] = to_device(blocks, torch.int32, self.device)
        # a backend that reads a partly filled block's unwritten slots (masked) needs finite values there
        if fresh and self.backend.reads_unwritten_slots:
            storage(self.caches).index_fill_(2, to_device(fresh, torch.long, self.device), 0)

    def inputs(self, plan: StepPlan, states: list[_SeqState]) -> StepInputs:
        """Token ids, positions, cache slots and attention metadata of a plan: O(rows + new tokens) on the host,
        two host-to-device copies, the rest derived on the device."""
        rows = plan.rows
        b = len(rows)
        lens = [len(r.tokens) for r in rows]
        seq_lens = [r.start + n for r, n in zip(rows, lens, strict=True)]
        query_start = [0]
        for n in lens:
            query_start.append(query_start[-1] + n)
        sample = [query_start[i + 1] - 1 for i, r in enumerate(rows) if r.sample]
        num_decodes = sum(1 for r in rows if r.is_decode)
        packed = to_device([r.start for r in rows] + [s.row for s in states] + seq_lens + query_start + sample + lens,
                           torch.int32, self.device)
        ids = to_device([t for r in rows for t in r.tokens], torch.long, self.device)
        plan.take_pending(ids, [q - 1 for q in query_start[1:]])
        starts, table_rows, seq_lens_t, query_start_t, sample_index, lens_t = packed.split(
            [b, b, b, b + 1, len(sample), b])
        if num_decodes == b:
            positions, row_of_token = starts.long(), torch.arange(b, device=self.device)
        else:
            row_of_token = torch.repeat_interleave(torch.arange(b, device=self.device), lens_t.long(),
                                                   output_size=len(ids))
            offset = torch.arange(len(ids), device=self.device) - query_start_t[:-1].long()[row_of_token]
            positions = starts.long()[row_of_token] + offset
        table_rows = table_rows.long()
        blocks = self.block_table[table_rows[row_of_token], positions // self.block_size].long()
        meta = AttentionMetadata(blocks * self.block_size + positions % self.block_size, self.block_table[table_rows],
                                 seq_lens_t, query_start_t, num_decodes, seq_lens, lens)
        return StepInputs(ids, positions, meta, sample_index.long(), query_start)

    def _forward(self, plan: StepPlan, states: list[_SeqState]) -> ModelOutput:
        lora = self._lora_tokens(plan.rows, states)
        if (self.graphs is not None and lora is None and all(r.is_decode for r in plan.rows)
                and self.graphs.fits(len(plan.rows))):
            return ModelOutput(self.graphs.run(plan, states))
        step = self.inputs(plan, states)
        x = self.model.embed(step.ids)
        self._write_prefixes(x, plan.rows, states, step.meta)
        if self.lora is not None:
            self.lora.slots.active = lora
        try:
            hidden = self.model(x, step.positions, self.caches, step.meta, self.backend)
        finally:
            if self.lora is not None:
                self.lora.slots.active = None
        out = ModelOutput(self.model.logits(hidden[step.sample_index]))
        starts = step.query_start
        for i, row in enumerate(plan.rows):
            if row.prompt_logits:
                out.prompt_logits[row.seq_id] = self.model.logits(hidden[starts[i]:starts[i + 1]])
        return out

    def _lora_tokens(self, rows: list[RowPlan], states: list[_SeqState]) -> torch.Tensor | None:
        if not any(s.lora_slot >= 0 for s in states):
            return None
        slots = [s.lora_slot for r, s in zip(rows, states, strict=True) for _ in r.tokens]
        return to_device(slots, torch.long, self.device)

    @staticmethod
    def _write_prefixes(x: torch.Tensor, rows: list[RowPlan], states: list[_SeqState],
                        meta: AttentionMetadata) -> None:
        """Prompt-tuning embeddings over the placeholder positions this step computes."""
        start = 0
        for row, state, n in zip(rows, states, meta.query_lens_host, strict=True):
            prefix = state.prefix
            if prefix is not None and row.start < prefix.shape[0]:
                count = min(n, prefix.shape[0] - row.start)
                x[start:start + count] = prefix[row.start:row.start + count].to(x)
            start += n

    def close(self) -> None:
        """Let go of the KV cache and the graphs now: their memory should not wait for the last reference."""
        self.caches = self.graphs = None
        self.states.clear()

