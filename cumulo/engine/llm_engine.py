"""`LLMEngine`: one model on one device set. `add_request` queues a prompt, `step` runs one scheduled forward
pass and returns what each touched request gained, `abort` cancels. Thread-safe: the async wrapper steps it
from a background thread while requests arrive from the event loop.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import torch

from cumulo.contracts import ModelInfo, RequestOutput, SamplingParams
from cumulo.engine.block_manager import BlockManager
from cumulo.engine.kv_sizing import KVPlan
from cumulo.engine.lora import AdapterCache
from cumulo.engine.model_runner import ModelRunner
from cumulo.engine.pipeline import PipelineRunner
from cumulo.engine.sampler import Sampler, make_state
from cumulo.engine.scheduler import Scheduler
from cumulo.engine.sequence import Sequence
from cumulo.engine.stop import StopChecker
from cumulo.errors import ContextLengthExceeded, InvalidRequest
from cumulo.models.attention import KVCache
from cumulo.models.detokenize import IncrementalDetokenizer


@dataclass(slots=True)
class EngineConfig:
    device: str = "auto"
    dtype: str = "auto"  # "auto": float32 on CPUs without fast 16-bit matmul, bfloat16 on accelerators
    format: str | None = None  # convert weights to a compact number format on load (see cumulo.formats)
    head: str | None = None  # with format: the output head, "bf16" or "body" (packed); None: the default
    block_size: int = 16  # tokens per KV block (engine/kv_sizing.py sizes the cache)
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None  # default: the model's context, capped by what the cache holds
    kv_cache_gib: float | None = None  # CPU budget; accelerators use kv_cache_fraction of free memory
    kv_cache_fraction: float | None = None
    enable_prefix_caching: bool = True
    threads: int | None = None
    decode_graphs: bool = True  # replay decode steps as recorded kernel graphs where the platform offers them
    max_adapters: int = 8  # LoRA adapters kept in memory (least recently used evicted; reread on demand)
    # Pipeline parallel (engine/pipeline.py): the decoder layers split into this many stages, in proportion to
    # stage_weights (each stage's relative speed; equal when None). Each stage's cache holds its layers only.
    pipeline_stages: int = 1
    stage_weights: tuple[float, ...] | None = None
    kv_cache_blocks: int | None = None  # exactly this many KV blocks (placement's for a split), not a budget


class LLMEngine:
    def __init__(
        self,
        model: torch.nn.Module | None,
        tokenizer,
        config: EngineConfig,
        kv_plan: KVPlan,
        *,
        device: torch.device,
        name: str = "",
        seal: str = "",
        paged_decode_attention: Callable[..., torch.Tensor] | None = None,
        graph_recorder: type | None = None,
        pipeline: PipelineRunner | None = None,
    ) -> None:
        """`kv_plan` (from `kv_sizing.plan_kv_cache`): the KV cache to allocate and the longest sequence.
        `pipeline`: a split model's runner (its stages hold the weights and caches); `model` is then None."""
        cfg = model.config if pipeline is None else pipeline.model_config
        self.model_config = cfg
        self.config = config
        self.tokenizer = tokenizer
        self.model_name = name
        self.seal = seal
        self.device = device
        self.max_model_len = kv_plan.max_model_len
        self.block_manager = BlockManager(
            kv_plan.num_blocks, kv_plan.block_size, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.sampler = Sampler()
        self.eos_token_ids: set[int] = set(getattr(tokenizer, "eos_token_ids", set()) or cfg.eos_token_ids)
        self._seqs: dict[str, Sequence] = {}
        self._aborted: list[str] = []
        self._lock = threading.RLock()
        self.num_steps = 0
        self.runner: ModelRunner | PipelineRunner
        self.adapters: AdapterCache | None = None
        if pipeline is not None:
            self.kv_cache = None
            self.runner = pipeline
            return
        assert model is not None
        self.kv_cache = KVCache(
            cfg.num_hidden_layers,
            kv_plan.num_blocks,
            kv_plan.block_size,
            cfg.num_key_value_heads,
            cfg.head_dim,
            kv_plan.dtype,
            device,
            latent_dim=cfg.kv_lora_rank + cfg.qk_rope_head_dim if cfg.kv_lora_rank else 0,
        )
        self.runner = ModelRunner(
            model, self.kv_cache, device, paged_decode_attention, graph_recorder,
            max_blocks_per_seq=-(-kv_plan.max_model_len // kv_plan.block_size),
        )  # fmt: skip
        self.adapters = AdapterCache(model, seal, config.max_adapters)

    # -- requests ----------------------------------------------------------------------------------------
    def add_request(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> str:
        params.validate()
        if not prompt_token_ids:
            raise InvalidRequest("the prompt is empty")
        vocab = self.model_config.vocab_size
        if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab:
            raise InvalidRequest(f"prompt token ids must be in [0, {vocab})")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ContextLengthExceeded(
                f"the prompt has {len(prompt_token_ids)} tokens; this model's context is {self.max_model_len} "
                "tokens including the completion"
            )
        request_id = request_id or uuid.uuid4().hex
        seq = Sequence(request_id, prompt_token_ids, params)
        # Read (or found in the cache) now: a bad adapter refuses this request only.
        if params.adapter is not None:
            if self.adapters is None:
                raise InvalidRequest("LoRA adapters are not served by a model split over pipeline stages")
            seq.adapter = self.adapters.get(params.adapter)
            seq.cache_salt = seq.adapter.salt
        seq.sampling_state = make_state(params, prompt_token_ids, self.device)
        seq.detokenizer = IncrementalDetokenizer(self.tokenizer)
        seq.stop_checker = StopChecker(params.stop, params.include_stop_str_in_output)
        with self._lock:
            if request_id in self._seqs:
                raise InvalidRequest(f"request id {request_id} is already in use")
            if seq.adapter is not None:
                self.runner.enable_lora()
            self._seqs[request_id] = seq
            self.scheduler.add(seq)
        return request_id

    def abort(self, request_id: str) -> None:
        with self._lock:
            if request_id in self._seqs:
                self._aborted.append(request_id)

    def has_unfinished_requests(self) -> bool:
        with self._lock:
            return bool(self._seqs)

    def model_info(self) -> ModelInfo:
        """Who this engine serves, as every client of it sees it."""
        return ModelInfo(
            name=self.model_name,
            seal=self.seal,
            max_model_len=self.max_model_len,
            chat_template=getattr(self.tokenizer, "chat_template", None),
            device=str(self.device),
            kv_block_size=self.block_manager.block_size,
        )

    def load(self) -> tuple[int, int]:
        """(running, waiting) requests."""
        with self._lock:
            return len(self.scheduler.running), len(self.scheduler.waiting)

    # -- one step ------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        with self._lock:
            outputs = [self._finish(self._seqs[rid], "abort") for rid in self._aborted if rid in self._seqs]
            self._aborted.clear()
            batch = self.scheduler.schedule()
            if not batch:
                return outputs
            # Each adapter's rows contiguous: one low-rank product per adapter.
            if self.runner.lora is not None:
                batch.decodes.sort(key=_adapter_key)
                batch.prefills.sort(key=lambda item: _adapter_key(item[0]))
            logits = self.runner.execute(batch)
            self.num_steps += 1
            sampled: list[Sequence] = []
            for seq in batch.decodes:
                seq.num_computed_tokens += 1
                sampled.append(seq)
            for seq, n in batch.prefills:
                seq.num_computed_tokens += n
                if seq.num_computed_tokens == seq.num_tokens:
                    sampled.append(seq)
            for seq in batch.decodes + [s for s, _ in batch.prefills]:
                self.block_manager.commit(seq)
            if not sampled:
                return outputs
            token_ids, logprobs = self.sampler(logits, [s.sampling_state for s in sampled])
            now = time.perf_counter()
            for seq, token, lp in zip(sampled, token_ids, logprobs, strict=True):
                outputs.append(self._append_token(seq, token, lp, now))
            return outputs

    def _append_token(self, seq: Sequence, token: int, logprob, now: float) -> RequestOutput:
        params = seq.params
        seq.token_ids.append(token)
        seq.sampling_state.output_token_ids.append(token)
        if seq.metrics.first_token_time is None:
            seq.metrics.first_token_time = now
        reason = None
        is_stop_token = token in params.stop_token_ids or (
            not params.ignore_eos and token in self.eos_token_ids
        )
        text = ""
        if is_stop_token:
            reason = "stop"
        else:
            text, hit = seq.stop_checker.feed(seq.detokenizer.push([token]))
            if hit:
                reason = "stop"
        if reason is None and (
            seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len
        ):
            reason = "length"
        if reason is not None:
            if reason == "length" or is_stop_token:
                more, _ = seq.stop_checker.feed(seq.detokenizer.flush())
                text += more + seq.stop_checker.flush()
            return self._finish(seq, reason, [token], text, [logprob] if logprob is not None else [])
        return self._output(seq, [token], text, [logprob] if logprob is not None else [], finished=False)

    def _finish(
        self,
        seq: Sequence,
        reason: str,
        new_ids: list[int] | None = None,
        new_text: str = "",
        new_logprobs: list | None = None,
    ) -> RequestOutput:
        self.scheduler.finish(seq, reason)
        seq.metrics.finished_time = time.perf_counter()
        del self._seqs[seq.request_id]
        return self._output(seq, new_ids or [], new_text, new_logprobs or [], finished=True)

    def _output(
        self, seq: Sequence, new_ids: list[int], new_text: str, new_logprobs: list, finished: bool
    ) -> RequestOutput:
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=new_ids,
            new_text=new_text,
            finished=finished,
            finish_reason=seq.finish_reason if finished else None,
            num_cached_tokens=seq.num_cached_tokens,
            new_logprobs=new_logprobs,
        )


def _adapter_key(seq: Sequence) -> tuple[str, str]:
    ref = seq.params.adapter
    return ("", "") if ref is None else (ref.name, ref.path)
