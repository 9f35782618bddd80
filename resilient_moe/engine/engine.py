"""The engine: scheduler, model runner and sampler around one attention side.

Colocated, its experts are a function call (`LocalExperts`); inside an attention worker the same
engine drives remote expert workers through another `ExpertExecutor`. A step reads as
schedule -> run -> postprocess.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from resilient_moe.engine.config import EngineConfig, SamplingParams
from resilient_moe.model.config import ModelConfig
from resilient_moe.engine.kv_cache import BlockAllocator, RestoredRows, cache_blocks, new_kv_cache, prefix_root
from resilient_moe.engine.model_runner import ModelRunner
from resilient_moe.engine.pipeline import ExpertExecutor, LocalExperts
from resilient_moe.engine.scheduler import ScheduledBatch, Scheduler
from resilient_moe.engine.sequence import Sequence, TokenEvent
from resilient_moe.engine.guided import GuideCompiler, tokenizer_info
from resilient_moe.engine.tokenizer import TextTokenizer
from resilient_moe.errors import RequestError
from resilient_moe.model import ops
from resilient_moe.model.attention_side import AttentionSide
from resilient_moe.model.weights import Checkpoint, torch_dtype
from resilient_moe.model.expert_side import ExpertSide
from resilient_moe.model.kernel_choice import KernelSet


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class GenerationResult:
    """Everything a finished request produced."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    text: str = ""


class LLMEngine:
    """Continuous-batching engine over a paged KV cache."""

    def __init__(
        self,
        model_dir: str | Path,
        config: EngineConfig | None = None,
        experts: ExpertExecutor | None = None,
        checkpoint: Checkpoint | None = None,
    ) -> None:
        self.config = config or EngineConfig()
        ops.configure_threads(self.config.threads, self.config.dtype, self.config.device)
        self.model_dir = Path(model_dir)
        self.checkpoint = checkpoint or Checkpoint(self.model_dir)  # a caller's, to follow the load's progress
        self.model_config: ModelConfig = self.checkpoint.cfg
        self.dtype = torch_dtype(self.config.dtype)
        self.device = resolve_device(self.config.device)
        self.max_model_len = min(
            self.config.max_model_len or self.model_config.max_position_embeddings,
            self.model_config.max_position_embeddings,
        )
        self.kernels = KernelSet.for_device(self.config.kernels, self.device, self.dtype)
        self.attention = AttentionSide(self.checkpoint, self.dtype, self.device, max_positions=self.max_model_len,
                                       kernels=self.kernels)
        num_blocks = cache_blocks(self.model_config, self.config, self.dtype)
        self.cache = new_kv_cache(self.model_config, num_blocks, self.config.block_size, self.dtype, self.device)
        self.allocator = BlockAllocator(num_blocks, caching=self.config.enable_prefix_caching)
        self.tokenizer = TextTokenizer.from_dir(self.model_dir)
        guides = None
        if self.tokenizer is not None:
            guides = GuideCompiler(tokenizer_info(self.tokenizer.to_json(), self.model_config.vocab_size,
                                                  tuple(self.model_config.eos_token_ids)))
        self.scheduler = Scheduler(
            self.config, self.allocator, self.config.block_size, self.model_config.eos_token_ids, self.max_model_len,
            self.kernels.sampling_log_softmax, guides,
            prefix_root(str(self.model_dir.resolve()), self.dtype, self.kernels.name),
        )
        if experts is None:
            experts = LocalExperts(ExpertSide(self.checkpoint, None, self.dtype, self.device, self.kernels))
        self.runner = ModelRunner(self.attention, self.cache, self.config.block_size, experts)
        self.step_count = 0
        self.last_logits: dict[str, torch.Tensor] = {}  # request id -> logits of its latest token (tests, logprobs)
        self.keep_logits = False
        self.failures: list[tuple[str, str]] = []
        # Called with each step's sequences before it runs (an attention worker tells its frontends
        # which requests start; chaos testing injects poison there).
        self.on_scheduled: Callable[[list[Sequence]], None] | None = None

    # ---- requests ---------------------------------------------------------------------------

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise RequestError when a request can never run here."""
        if not prompt_ids:
            raise RequestError("prompt is empty: give at least one token")
        if params.guide is not None and self.scheduler.guides is None:
            raise RequestError("structured outputs need the checkpoint's tokenizer (tokenizer.json), which it lacks")
        vocab = self.model_config.vocab_size
        for token in prompt_ids:
            if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < vocab:
                raise RequestError(f"prompt token id {token!r} is outside the vocabulary [0, {vocab})")
        if len(prompt_ids) >= self.max_model_len:
            raise RequestError(
                f"prompt has {len(prompt_ids)} tokens; the context limit is {self.max_model_len} "
                "(prompt plus at least one generated token)"
            )
        needed = self.scheduler.blocks_for(min(len(prompt_ids) + params.max_tokens, self.max_model_len))
        if needed > self.allocator.num_blocks:
            raise RequestError(
                f"request needs {needed} KV blocks but the cache has {self.allocator.num_blocks}; "
                "lower max_tokens or enlarge the KV cache"
            )

    def new_sequence(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        output_ids: list[int] | None = None,
        seed: int | None = None,
    ) -> Sequence:
        """A checked request, not yet queued. `output_ids` resumes one that produced tokens elsewhere."""
        self.validate(prompt_ids, params)
        if seed is None:
            seed = params.seed if params.seed is not None else secrets.randbits(63)
        return Sequence(request_id, list(prompt_ids), params, seed, output_ids=list(output_ids or []))

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    output_ids: list[int] | None = None, seed: int | None = None) -> Sequence:
        """Queue a request (see `new_sequence`)."""
        seq = self.new_sequence(request_id, prompt_ids, params, output_ids, seed)
        self.scheduler.add(seq)
        return seq

    def resume(self, seq: Sequence, rows: RestoredRows | None = None, n: int = 0) -> int:
        """Queue a sequence moved here from another worker, with the KV rows of its first `n` positions
        when they were restored (only the rest is then computed); returns the positions restored (0
        when the cache has no room for it now: everything is recomputed, prefix cache hits included).

        Restored full blocks enter the prefix cache like computed ones, unless the model has
        sliding-window layers: a restore brings their rows of the last window only (`RestoredRows`),
        so its earlier blocks are not whole and no other request may reuse them."""
        if n > 0 and rows is not None:
            need = self.scheduler.blocks_for(seq.num_tokens)
            if self.allocator.num_free >= need:
                bs = self.config.block_size
                seq.block_table = self.allocator.allocate(need)
                positions = torch.arange(n)
                table = torch.tensor(seq.block_table, dtype=torch.long)
                rows.scatter_into(self.cache, (table[positions // bs] * bs + positions % bs).to(self.device))
                seq.num_cached = n
                if rows.windows.window is None:
                    self.scheduler.register_computed(seq, 0)
            else:
                n = 0
        self.scheduler.add(seq)
        return n

    def add_with_prefix(self, seq: Sequence, start: int, rows: RestoredRows | None) -> int:
        """Queue a new request whose full blocks from block `start` on were read from the KV store
        (`rows`: whole blocks, their positions from start * block_size on; the first `start` were in the
        prefix cache when it was looked up). Returns the positions taken from `rows`: 0 when there are
        none, the prefix cache no longer holds the first `start` blocks, or holds the restored ones too
        by now, or the cache has no room; then the scheduler's own lookup decides what is computed.
        The restored blocks enter the prefix cache like computed ones."""
        bs = self.config.block_size
        count = rows.n // bs if rows is not None else 0
        hashes = self.scheduler.prefix_hashes(seq)
        count = min(count, len(hashes) - start)  # never the last token's block: it is computed, for its logits
        hit = self.allocator.match(hashes[: start + count])
        if count <= 0 or seq.block_table or len(hit) < start or len(hit) >= start + count \
                or count + self.allocator.num_reclaimed(hit[:start]) > self.allocator.num_free:
            self.scheduler.add(seq)
            return 0
        seq.block_table = self.allocator.acquire(hit[:start])  # held first: allocating cannot evict them
        seq.block_table += self.allocator.allocate(count)
        positions = torch.arange(start * bs, (start + count) * bs)
        table = torch.tensor(seq.block_table, dtype=torch.long)
        slots = table[positions // bs] * bs + positions % bs
        if rows.n > count * bs:  # a windowless model's rows (the only ones looked up): every layer in `full`
            rows = RestoredRows(rows.windows, count * bs, 0, rows.full[:, : count * bs], rows.windowed[:, :0])
        rows.scatter_into(self.cache, slots.to(self.device))
        seq.num_cached = (start + count) * bs
        self.scheduler.register_computed(seq, start * bs)
        self.scheduler.prefix_query_tokens += seq.num_tokens
        self.scheduler.prefix_hit_tokens += start * bs
        self.scheduler.add(seq)
        return count * bs

    def abort(self, request_id: str) -> bool:
        self.last_logits.pop(request_id, None)
        return self.scheduler.abort(request_id) is not None

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the step ---------------------------------------------------------------------------

    def step(self) -> list[TokenEvent]:
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        if self.on_scheduled is not None:
            self.on_scheduled(batch.seqs)
        self.step_count += 1
        began = time.perf_counter()
        output = self.runner.run(batch.seqs, self.config.micro_batches, self.step_count)
        self.scheduler.observe(time.perf_counter() - began)
        for request_id, message in output.failed.items():
            self.scheduler.fail(request_id)
            self.failures.append((request_id, message))
        if not output.seqs:
            return []
        logits = output.all_logits()
        if self.keep_logits:
            for seq, row in zip(output.seqs, logits):
                self.last_logits[seq.request_id] = row
        return self.scheduler.postprocess(ScheduledBatch(output.seqs), logits)

    def pop_failures(self) -> list[tuple[str, str]]:
        """(request id, message) of requests that failed since the last call (e.g. no expert replica left)."""
        failures, self.failures = self.failures, []
        return failures

    # ---- convenience ------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[GenerationResult]:
        """Run prompts to completion as one continuous batch; results in prompt order."""
        per_prompt = params if isinstance(params, list) else [params] * len(prompts)
        results: dict[str, GenerationResult] = {}
        for i, (prompt, p) in enumerate(zip(prompts, per_prompt)):
            request_id = f"gen-{i}"
            self.add_request(request_id, prompt, p)
            results[request_id] = GenerationResult(request_id, list(prompt))
        while self.has_unfinished():
            for event in self.step():
                result = results[event.request_id]
                result.token_ids.append(event.token_id)
                if event.logprob is not None:
                    result.logprobs.append(event.logprob)
                if event.finish_reason is not None:
                    result.finish_reason = event.finish_reason
        ordered = [results[f"gen-{i}"] for i in range(len(prompts))]
        if self.tokenizer is not None:
            for result in ordered:
                result.text = self.tokenizer.decode(result.token_ids)
        return ordered
