"""
Batched generation with a KV cache: one engine for chat, evals, RL rollouts and the diversity eval.

    engine = Engine(model, tokenizer)
    results, masks = engine.generate_batch(prompts, num_samples=8, max_tokens=256, top_k=50, seed=seed)

The prompts are left-padded and prefilled together once; each prompt's cache rows are replicated
num_samples times into one cache for the whole batch; every row samples its own first token, then
all rows decode in lockstep until each stops (<|assistant_end|> or <|bos|>) or max_tokens is reached.
Row (prompt i, sample j) draws its randomness from a stream seeded by (seed, i, j), so its tokens
depend only on the model, its prompt, its indices and the seed, not on the rest of the batch; pass a
different seed per call for fresh samples. Calculator calls (<|python_start|> ... <|python_end|>)
get their result forced in as <|output_start|> result <|output_end|>; masks are 1 for sampled
tokens, 0 for forced ones. Determinism on GPU: dev/NOTES.md, "Engine determinism".
"""

import hashlib
from collections import deque
from contextlib import nullcontext

import torch

from nanochat.calculator import use_calculator
from nanochat.gpt import KVCache


def row_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """A 63-bit seed for one row, the same on every machine and Python version."""
    digest = hashlib.sha256(f"{seed}:{prompt_index}:{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)


def _inverse_cdf(probs, uniforms):
    """Index i with cdf[i-1] < u*total <= cdf[i]; u in (0, 1] never lands on a zero-probability token."""
    cdf = probs.cumsum(dim=-1)
    targets = uniforms.unsqueeze(1) * cdf[:, -1:]
    return torch.searchsorted(cdf, targets).clamp_(max=probs.size(-1) - 1)


def sample_tokens(logits, uniforms, temperature=1.0, top_k=None, top_p=None):
    """
    One token per row from logits (B, V) fp32. uniforms (B,) in (0, 1] drive the choice, so the
    caller controls every row's randomness. temperature 0 is greedy (argmax).

    Filters work by thresholds and the CDF is inverted in vocabulary order, never in sorted
    order: bf16 logits tie often, GPU sorts order ties arbitrarily, and a sorted CDF would then
    map the same uniform to different tokens from run to run. Tokens tied with the k-th largest
    logit (top-k) or with the last one inside the nucleus (top-p) are all kept.
    """
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        # the nucleus: the most likely tokens whose mass before them is still below top_p
        sorted_probs = torch.sort(probs, dim=-1, descending=True).values
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        smallest_kept = sorted_probs.masked_fill(mass_before >= top_p, float("inf")).amin(dim=-1, keepdim=True)
        probs = probs * (probs >= smallest_kept)
    return _inverse_cdf(probs, uniforms).squeeze(1)


class _RowState:
    """What one row needs between steps: stopped or not, tokens waiting to be forced, tool state."""

    def __init__(self):
        self.done = False
        self.forced = deque()
        self.in_python = False
        self.python_tokens = []


class _DecodeStep:
    """
    One decoding step for every row: forward the rows' current tokens through the cache, then
    sample each row's next token. The cache keeps its position on the device, so every step
    has the same shapes; on CUDA the step is run once for real, captured in a CUDA graph, and
    replayed from then on. That removes the ~600 kernel launches of an eager d20 step from the
    host's critical path, which otherwise dominates small-batch decoding.
    """

    def __init__(self, model, cache, uniforms, sampling, first_step, capture):
        cache.use_device_position()
        self.model, self.cache, self.uniforms, self.sampling = model, cache, uniforms, sampling
        self.tokens = torch.zeros(cache.batch_size, dtype=torch.long, device=uniforms.device)
        self.uniform_column = torch.tensor(first_step, dtype=torch.long, device=uniforms.device)
        self.capture = capture
        self.graph = None

    def _run(self):
        logits = self.model(self.tokens.unsqueeze(1), kv_cache=self.cache)[:, -1]
        uniforms = self.uniforms.index_select(1, self.uniform_column.view(1)).squeeze(1)
        self.tokens.copy_(sample_tokens(logits, uniforms, **self.sampling))
        self.uniform_column.add_(1)

    def __call__(self, tokens):
        """tokens: (rows,) on the device, the tokens just emitted. Returns the next ones (a reused buffer)."""
        if tokens is not self.tokens:
            self.tokens.copy_(tokens)
        if self.graph is not None:
            self.graph.replay()
        elif not self.capture:
            self._run()
        else:
            # the first step runs for real on a side stream (the warm-up capture needs: cuBLAS
            # handles, autocast's cached bf16 weights), then the same step is recorded, not run
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._run()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self._run()
        return self.tokens


def utf8_pieces(tokenizer, tokens):
    """Decode a stream of tokens into text pieces that are always whole UTF-8 characters: a token
    ending inside a multi-byte character waits for the tokens completing it."""
    pending = []  # tokens whose text has not been yielded yet
    for token in tokens:
        pending.append(token)
        text = tokenizer.decode(pending)
        # U+FFFD at the end marks bytes of a character still to come (or truly invalid bytes,
        # which are flushed at the end); UTF-8 resynchronises, so a clean end is a clean boundary
        if not text.endswith("\ufffd"):
            yield text
            pending = []
    if pending:
        yield tokenizer.decode(pending)


class Engine:
    def __init__(self, model, tokenizer, cuda_graphs=True):
        self.model = model
        self.tokenizer = tokenizer
        self.cuda_graphs = cuda_graphs  # off only to measure what they buy
        special = tokenizer.encode_special
        self.stop_tokens = {special("<|assistant_end|>"), tokenizer.get_bos_token_id()}
        self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")
        self.pad_token = tokenizer.get_bos_token_id()  # never attended to: any valid id works

    def _autocast(self):
        device = self.model.get_device()
        if device.type == "cuda" and not torch.is_autocast_enabled("cuda"):
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def _cache_dtype(self):
        device = self.model.get_device()
        if device.type == "cuda":
            return torch.bfloat16  # the dtype attention runs in under autocast
        return self.model.lm_head.weight.dtype

    def _check_request(self, prompts, num_samples, max_tokens, temperature, top_k, top_p):
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, (list, tuple)) for p in prompts):
            raise TypeError("prompts must be a list of token-id lists; for a single prompt pass [prompt_ids]")
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token (start chat prompts with <|bos|>)")
        vocab = self.model.config.vocab_size
        for i, prompt in enumerate(prompts):
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt {i} has token ids outside [0, {vocab}): {bad[:5]}")
        if num_samples < 1 or max_tokens < 1:
            raise ValueError(f"num_samples and max_tokens must be >= 1, got {num_samples} and {max_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")
        longest = max(len(p) for p in prompts) + max_tokens
        if longest > self.model.rotary_seq_len:
            raise ValueError(f"prompt + max_tokens = {longest} positions exceeds the model's {self.model.rotary_seq_len}")

    def _steps(self, prompts, num_samples, max_tokens, temperature, top_k, top_p, seed, capture):
        """Yield, once per decoding step, (tokens, masks, was_done): one entry per row, rows ordered
        prompt-major (prompt i, sample j is row i*num_samples + j). was_done[r] means row r had
        stopped before this step and its token is to be ignored."""
        self._check_request(prompts, num_samples, max_tokens, temperature, top_k, top_p)
        model, device = self.model, self.model.get_device()
        num_rows = len(prompts) * num_samples
        prompt_len = max(len(p) for p in prompts)
        pads = [prompt_len - len(p) for p in prompts]
        padded = torch.tensor([[self.pad_token] * pad + list(p) for p, pad in zip(prompts, pads)], device=device)

        # every row's random stream, drawn up front: (rows, max_tokens) uniforms in (0, 1]. Sampling
        # inverts the CDF of the row's filtered distribution, so on CPU seeded runs repeat exactly (tested).
        uniforms = torch.stack([
            1.0 - torch.rand(max_tokens, generator=torch.Generator().manual_seed(row_seed(seed, i, j)), dtype=torch.float64)
            for i in range(len(prompts)) for j in range(num_samples)
        ]).to(device=device, dtype=torch.float32).clamp_(min=1e-7)

        dtype = self._cache_dtype()
        prefill_cache = KVCache.for_model(model, len(prompts), prompt_len, dtype, pad=pads)
        hidden = model.forward_hidden(padded, kv_cache=prefill_cache)
        last_logits = model.logits_from_hidden(hidden[:, -1])  # (prompts, V): only the last position is needed
        row_prompt = torch.arange(len(prompts), device=device).repeat_interleave(num_samples)
        cache = KVCache.for_model(model, num_rows, prompt_len + max_tokens, dtype)
        cache.prefill_from(prefill_cache, row_prompt)
        del prefill_cache, hidden
        sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
        # each row samples its first token with its own stream: samples differ from the very first token
        next_tokens = sample_tokens(last_logits[row_prompt], uniforms[:, 0], **sampling)
        decode_step = _DecodeStep(model, cache, uniforms, sampling, first_step=1, capture=capture)

        rows = [self._row_state(prompts[r // num_samples]) for r in range(num_rows)]
        for step in range(max_tokens):
            sampled = next_tokens.tolist()  # the one host sync per step
            tokens, masks, was_done, any_forced = [], [], [], False
            for r, state in enumerate(rows):
                was_done.append(state.done)
                if state.forced:
                    token, mask, any_forced = state.forced.popleft(), 0, True
                else:
                    token, mask = sampled[r], 1
                tokens.append(token)
                masks.append(mask)
                if not state.done:
                    self._advance_row(state, token)
            yield tokens, masks, was_done
            if all(state.done for state in rows) or step == max_tokens - 1:
                return
            if any_forced:
                next_tokens = torch.tensor(tokens, device=device)
            next_tokens = decode_step(next_tokens)

    def _row_state(self, prompt):
        """A fresh row; a prompt that ends inside an open <|python_start|> block continues that tool call."""
        state = _RowState()
        starts = [i for i, t in enumerate(prompt) if t == self.python_start]
        if starts and self.python_end not in prompt[starts[-1]:]:
            state.in_python, state.python_tokens = True, list(prompt[starts[-1] + 1:])
        return state

    def _advance_row(self, state, token):
        if token in self.stop_tokens:
            state.done = True
        elif token == self.python_start:
            state.in_python, state.python_tokens = True, []
        elif token == self.python_end and state.in_python:
            state.in_python = False
            result = use_calculator(self.tokenizer.decode(state.python_tokens))
            if result is not None:
                state.forced.extend([self.output_start, *self.tokenizer.encode(str(result)), self.output_end])
        elif state.in_python:
            state.python_tokens.append(token)

    @torch.inference_mode()
    def generate_batch(self, prompts, num_samples=1, max_tokens=256, temperature=1.0, top_k=None, top_p=None,
                       seed=42, keep_stop_token=False):
        """
        prompts: list of token-id lists (different lengths are fine).
        Returns (results, masks): results[i][j] is sample j of prompt i, the generated tokens only
        (no prompt); masks[i][j][t] is 1 where the token was sampled, 0 where the tool forced it.
        The stop token (<|assistant_end|> or <|bos|>) is left out unless keep_stop_token=True;
        keep it for RL, where the policy must learn to stop.
        """
        results = [[[] for _ in range(num_samples)] for _ in prompts]
        masks = [[[] for _ in range(num_samples)] for _ in prompts]
        # One autocast context around the whole loop: its cached bf16 copies of the weights are
        # what the captured CUDA graph reads, so they must outlive the graph.
        capture = self.cuda_graphs and self.model.get_device().type == "cuda" and max_tokens > 2
        with self._autocast():
            steps = self._steps(prompts, num_samples, max_tokens, temperature, top_k, top_p, seed, capture)
            for tokens, step_masks, was_done in steps:
                for r, (token, mask, done) in enumerate(zip(tokens, step_masks, was_done)):
                    if done or (token in self.stop_tokens and not keep_stop_token):
                        continue
                    i, j = divmod(r, num_samples)
                    results[i][j].append(token)
                    masks[i][j].append(mask)
        return results, masks

    def generate_stream(self, prompt_ids, max_tokens=256, temperature=1.0, top_k=None, top_p=None, seed=42):
        """Yield the text of one sample as it is generated, in pieces that are always whole UTF-8
        characters (see utf8_pieces)."""
        tokens = (token for token, _ in self.stream_tokens(prompt_ids, max_tokens, temperature, top_k, top_p, seed))
        yield from utf8_pieces(self.tokenizer, tokens)

    def stream_tokens(self, prompt_ids, max_tokens=256, temperature=1.0, top_k=None, top_p=None, seed=42):
        """Yield (token, mask) of one sample as generated (mask 0: forced by the tool), ending
        before the stop token; fewer than max_tokens were yielded iff the sample stopped."""
        for tokens, masks, was_done in self._stream_steps(prompt_ids, max_tokens, temperature, top_k, top_p, seed):
            if was_done[0] or tokens[0] in self.stop_tokens:
                return
            yield tokens[0], masks[0]

    def _stream_steps(self, prompt_ids, max_tokens, temperature, top_k, top_p, seed):
        # autocast and inference mode only around each step, never while suspended at a yield,
        # so the caller's own code between pieces runs in its own modes
        # no CUDA graph here: autocast is entered per step, so its cached weights would not outlive one
        steps = self._steps([list(prompt_ids)], 1, max_tokens, temperature, top_k, top_p, seed, capture=False)
        while True:
            with torch.inference_mode(), self._autocast():
                step = next(steps, None)
            if step is None:
                return
            yield step
