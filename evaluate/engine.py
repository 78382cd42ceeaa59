"""An inference engine that owns prefill and decode for the Llama-family models we load.

Why not `model.generate`: timing needs each phase apart (prefill, one decode step, the token
loop), a cache allocated once outside the timed region, and a decode step that can be compiled
(CUDA graphs) without HF's generation machinery in the loop. The model's own forward is reused
with transformers' `StaticCache` (pre-allocated, fixed addresses, built for torch.compile), so
quantized modules swapped into the model run unchanged.

Positions: every sequence of a batch shares the cache offset (StaticCache keeps one counter);
left-padded prompts carry an attention mask and per-row RoPE positions, as HF generate does.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from compress.adapters import cache_argument
from compress.errors import UserError
from compress.evaluate.timing import synchronize


@dataclass
class Sampling:
    """temperature 0 = greedy. top_k 0 and top_p 1.0 disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise UserError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class Generation:
    tokens: torch.Tensor      # [batch, steps] new tokens; after a sequence's EOS, the pad id
    lengths: torch.Tensor     # [batch] new tokens per sequence, its EOS included


def select_tokens(logits: torch.Tensor, sampling: Sampling,
                  generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids [batch] from last-position logits [batch, vocab]."""
    if sampling.greedy:
        return logits.argmax(dim=-1)
    scores = logits.float() / sampling.temperature
    if sampling.top_k and sampling.top_k < scores.shape[-1]:
        kth = torch.topk(scores, sampling.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        probs = sorted_scores.softmax(dim=-1)
        # Nucleus: the smallest set of top tokens holding at least top_p of the mass (as in
        # transformers' TopPLogitsWarper). A token is dropped when the tokens ranked above it
        # already hold top_p; the most likely token is always kept.
        drop = probs.cumsum(dim=-1) - probs >= sampling.top_p
        scores = scores.scatter(-1, order, sorted_scores.masked_fill(drop, float("-inf")))
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class Engine:
    """Prefill and decode with a static KV cache for `batch` sequences of up to `max_len` tokens.

    `allocate` (re)builds the cache for a new batch size or length; `compile_decode` compiles the
    one-token step. The model must be in eval mode on its device; inputs live on that device.
    """

    def __init__(self, model):
        config = getattr(model, "config", None)
        if config is None or not hasattr(config, "num_key_value_heads"):
            raise UserError("the inference engine needs a decoder-only transformers model with "
                            "num_key_value_heads in its config (Llama family)")
        self.model = model
        self.config = config
        self._cache_arg = cache_argument(model)
        self.device = next(model.parameters()).device
        self.dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        self.cache = None
        self.batch = self.max_len = 0
        self.compile_seconds: float | None = None
        self._step = self._eager_step
        self._compiled = None
        self._prefill_forward = self._eager_prefill_forward
        self._mask: torch.Tensor | None = None     # [batch, max_len] 2D padding mask, or None
        self._offsets: torch.Tensor | None = None  # [batch] left padding per row
        # Quantized layers build their kernel layouts now, outside any timed or compiled region.
        for module in model.modules():
            prepare = getattr(module, "prepare_fast", None)
            if callable(prepare):
                prepare(self.dtype)

    # -- cache -------------------------------------------------------------------------------
    def allocate(self, batch: int, max_len: int) -> None:
        from transformers import StaticCache

        if batch < 1 or max_len < 1:  # one slot serves a one-token prefill (TTFT of N x 1)
            raise UserError(f"batch and max_len must be >= 1, got {batch} and {max_len}")
        limit = getattr(self.config, "max_position_embeddings", None)
        if limit and max_len > limit:
            raise UserError(f"{max_len} tokens exceed the model's {limit} positions")
        if self.cache is not None and (batch, max_len) == (self.batch, self.max_len):
            return
        self.cache = None  # free the old cache before allocating the new one
        cache = StaticCache(config=self.config, max_cache_len=max_len)
        _unslide_short_windows(cache, max_len)
        head_dim = getattr(self.config, "head_dim", None) or \
            self.config.hidden_size // self.config.num_attention_heads
        # Allocate now, not lazily inside the first (timed or compiled) forward.
        cache.early_initialization(batch, self.config.num_key_value_heads, head_dim, self.dtype,
                                   self.device)
        self.cache, self.batch, self.max_len = cache, batch, max_len
        # A compiled step captured the old cache tensors: compile again for the new shapes.
        if self._compiled is not None:
            self._compiled = None
            self._step = self._eager_step
        self._mask = torch.ones(batch, max_len, dtype=torch.long, device=self.device)

    def kv_cache_bytes(self) -> int:
        if self.cache is None:
            return 0
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in self.cache.layers)

    def reset(self) -> None:
        """Empty the cache, keeping its memory.

        Only the fill counters are rewound: stale keys and values beyond them are masked out by
        the causal mask, so zeroing the whole cache (HF's `reset`) would only add time to TTFT.
        """
        for layer in self.cache.layers:
            length = getattr(layer, "cumulative_length", None)
            if not isinstance(length, torch.Tensor):
                self.cache.reset()
                return
            length.zero_()
            if hasattr(layer, "cumulative_length_int"):
                # Sliding-window layers keep a second, Python-int counter that picks their
                # update path and mask sizes: left alone, every later prompt sees a full cache.
                layer.cumulative_length_int = 0

    # -- phases ------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Prompt [batch, n] (left-padded when `attention_mask` has zeros) into an empty cache.

        Returns the logits of the last position, [batch, vocab].
        """
        batch, length = input_ids.shape
        if self.cache is None or batch != self.batch:
            raise UserError(f"prefill of batch {batch} needs allocate({batch}, ...) first")
        if length > self.max_len:
            raise UserError(f"prompt of {length} tokens exceeds the cache of {self.max_len}")
        self.reset()
        if attention_mask is None:
            self._offsets = None
            positions = torch.arange(length, device=self.device).expand(batch, length)
            mask = None
        else:
            attention_mask = attention_mask.to(self.device, torch.long)
            self._offsets = length - attention_mask.sum(dim=1)
            positions = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
            self._mask.fill_(1)
            self._mask[:, :length] = attention_mask
            mask = self._mask
        return self._prefill_forward(input_ids, mask, positions)

    def _eager_prefill_forward(self, input_ids: torch.Tensor, mask: torch.Tensor | None,
                               positions: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                         use_cache=True, logits_to_keep=1, **{self._cache_arg: self.cache})
        return out.logits[:, -1]

    def compile_prefill(self, enabled: bool = True) -> None:
        """Run the prefill forward through torch.compile (one graph per prompt shape, compiled
        at its first call; no CUDA graphs: a prompt is one long launch sequence already), so
        that inductor fuses the element-wise work between the matmuls (norms, rotary
        embeddings, the MLP's activation), which eagerly makes several passes over memory.
        `enabled=False` goes back to the eager prefill."""
        if not enabled:
            self._prefill_forward = self._eager_prefill_forward
            return
        torch.compiler.reset()  # as in compile_decode: earlier models' graphs count to the limit
        self._prefill_forward = torch.compile(self._eager_prefill_forward, dynamic=False,
                                              fullgraph=True)

    def _eager_step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        mask = None if self._offsets is None else self._mask
        out = self.model(input_ids=tokens[:, None], attention_mask=mask,
                         position_ids=positions[:, None], use_cache=True,
                         **{self._cache_arg: self.cache})
        return out.logits[:, -1]

    @torch.inference_mode()
    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One token per sequence at `positions` [batch]: logits [batch, vocab].

        Under CUDA graphs the returned logits are overwritten by the next step: consume them first.
        """
        return self._step(tokens, positions)

    def compile_decode(self, prompt_len: int = 8, tune: bool = False) -> float:
        """Compile the decode step (CUDA graphs on CUDA) and run it until it is captured; `tune`:
        with inductor's coordinate-descent tuning of its Triton kernels (gpt-fast's setting),
        else with whatever the process has set.

        Returns the seconds spent compiling and capturing, reported apart from steady-state timing.
        """
        from torch._inductor import config as inductor_config

        if self.cache is None:
            raise UserError("compile_decode needs allocate() first")
        mode = "reduce-overhead" if self.device.type == "cuda" else "default"
        # Every engine compiles the same method (one code object): without a reset, models
        # compiled earlier in this process count against dynamo's recompile limit, and a sweep's
        # fifth model failed with FailOnRecompileLimitHit.
        torch.compiler.reset()
        self._compiled = torch.compile(self._eager_step, mode=mode, fullgraph=True)
        self._step = self._compiled
        # Within the allocated cache (a benchmark of a 4-token prompt allocates 6 slots).
        prompt_len = max(1, min(prompt_len, self.max_len - 3))
        steps = min(4, self.max_len - prompt_len + 1)
        ids = random_tokens(self.batch, prompt_len, self.config.vocab_size, self.device, seed=1)
        started = time.perf_counter()
        # Dynamo traces on the first call; CUDA-graph trees warm up then record on later calls.
        # Inductor reads its config when it compiles, that is inside this first run. Without
        # `tune` the process's setting stays (torchao's quantize_ turns tuning on for its rows).
        with inductor_config.patch(coordinate_descent_tuning=True) if tune else nullcontext():
            self.generate(ids, max_new_tokens=steps, stop_on_eos=False)
            # A sliding-window layer that fills up inside this cache takes another update path
            # from then on: capture a step of that too, or it compiles inside the timed loop.
            for window in sorted({layer.max_cache_len for layer in self.cache.layers
                                  if getattr(layer, "is_sliding", False)
                                  and prompt_len < layer.max_cache_len < self.max_len}):
                filled = random_tokens(self.batch, window, self.config.vocab_size, self.device,
                                       seed=1)
                self.generate(filled, max_new_tokens=2, stop_on_eos=False)
        synchronize(self.device)
        self.compile_seconds = time.perf_counter() - started
        # Then one eager run, whose last forward is a decode step: the layers' kernel labels
        # describe decode shapes (a compiled step cannot set them).
        self._step = self._eager_step
        self.generate(ids, max_new_tokens=2, stop_on_eos=False)
        self._step = self._compiled
        return self.compile_seconds

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int,
                 sampling: Sampling | None = None, eos_token_id: int | None = None,
                 pad_token_id: int | None = None, attention_mask: torch.Tensor | None = None,
                 stop_on_eos: bool = True) -> Generation:
        """Prefill, then decode one token at a time until every sequence hit EOS or the limit.

        The first new token comes from the prefill logits; `max_new_tokens - 1` decode steps
        follow. With `stop_on_eos=False` (benchmarks) no step waits on the host.
        """
        batch, length = input_ids.shape
        if max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        # The last new token comes from the last forward's logits: it needs no cache slot.
        if length + max_new_tokens - 1 > self.max_len:
            raise UserError(f"{length} prompt + {max_new_tokens} new tokens exceed the cache of "
                            f"{self.max_len}; allocate a longer one")
        logits = self.prefill(input_ids, attention_mask)
        return self.decode(logits, self.next_positions(length), max_new_tokens, sampling,
                           eos_token_id, pad_token_id, stop_on_eos)

    def next_positions(self, prompt_len: int) -> torch.Tensor:
        """RoPE positions [batch] of the first decoded token after a prefill of `prompt_len`.

        Always a normal tensor, also inside `generate` (inference mode): the compiled step's
        guards include its inputs' dispatch keys, and compile_decode captures through `generate`,
        so an inference tensor there and a normal one from a caller (the bench's setup) compiled
        the step a second time, at the first timed call, outside compile_s."""
        with torch.inference_mode(False):
            positions = torch.full((self.batch,), prompt_len, dtype=torch.long,
                                   device=self.device)
            return positions if self._offsets is None else positions - self._offsets

    @torch.inference_mode()
    def decode(self, logits: torch.Tensor, positions: torch.Tensor, steps: int,
               sampling: Sampling | None = None, eos_token_id: int | None = None,
               pad_token_id: int | None = None, stop_on_eos: bool = True) -> Generation:
        """The token loop: select a token from `logits`, feed it back, `steps` tokens in all
        (`steps - 1` forward steps). `positions` [batch] is advanced in place."""
        sampling = sampling or Sampling()
        generator = None
        if sampling.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(sampling.seed)
        batch = logits.shape[0]
        pad = pad_token_id if pad_token_id is not None else (eos_token_id or 0)
        out = torch.full((batch, steps), pad, dtype=torch.long, device=self.device)
        finished = torch.zeros(batch, dtype=torch.bool, device=self.device)
        done = steps
        for step in range(steps):
            token = select_tokens(logits, sampling, generator)
            if eos_token_id is not None:
                token = torch.where(finished, torch.full_like(token, pad), token)
                finished |= token == eos_token_id
            out[:, step] = token
            if step == steps - 1:
                break
            # The only host sync of the loop, and only when asked to stop early.
            if eos_token_id is not None and stop_on_eos and bool(finished.all()):
                done = step + 1
                break
            logits = self.decode_step(token, positions)
            positions += 1
        return Generation(out[:, :done], _lengths(out[:, :done], eos_token_id))


def _unslide_short_windows(cache, max_len: int) -> None:
    """Sliding-window layers whose window holds the whole cache never slide: give them a plain
    static layer. Theirs keeps a Python-int fill counter that a compiled step takes as an input,
    and CUDA graphs record one graph per value of it, one per decode position (Mistral-7B-v0.1's
    window is 4096). The model still applies its window in the mask."""
    from transformers.cache_utils import StaticLayer, StaticSlidingWindowLayer

    for index, layer in enumerate(cache.layers):
        if type(layer) is StaticSlidingWindowLayer and layer.max_cache_len >= max_len:
            cache.layers[index] = StaticLayer(max_cache_len=max_len)


def _lengths(tokens: torch.Tensor, eos_token_id: int | None) -> torch.Tensor:
    batch, steps = tokens.shape
    if eos_token_id is None:
        return torch.full((batch,), steps, dtype=torch.long)
    hit = (tokens == eos_token_id).cpu()
    first = torch.where(hit.any(dim=1), hit.float().argmax(dim=1) + 1, torch.tensor(steps))
    return first.long()


def random_tokens(batch: int, length: int, vocab: int, device, seed: int = 0) -> torch.Tensor:
    """Random ids in [1, vocab): never zeros, reproducible, generated on the CPU then moved."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (batch, length), generator=generator).to(device)
