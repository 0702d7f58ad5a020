"""Turns one step's logits into one next token per request: penalties, temperature, top-k/top-p/min-p, seeds.

The engine keeps one `SamplingState` per running request and appends every token it accepts to
`state.output_token_ids`; the sampler only reads states (it never appends). One call handles the whole batch:
the common case (all greedy, no penalties, no logprobs) is a single argmax; per-row work is done only for rows
that need it.

Order of operations follows vLLM: repetition penalty (HF semantics, over prompt and output tokens), then
presence/frequency penalties (OpenAI semantics, over output tokens), then temperature, then top-k and top-p,
then min-p, then a draw. Greedy rows (temperature below 1e-5) take the argmax of the penalised logits.
A draw is an inverse-CDF lookup with one uniform per sampled row per step; a seeded row takes its uniform
from its own generator, so the same seed gives the same tokens whatever else is in the batch.

Logprobs are taken from the log-softmax of the RAW logits, before penalties and temperature: OpenAI reports
the model's own distribution, and that is what a client comparing logprobs across settings expects.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from cumulo.contracts import SamplingParams, TokenLogprob

# Below this temperature the softmax is numerically a one-hot; treat it as greedy (as vLLM does).
_GREEDY_TEMPERATURE = 1e-5


@dataclass(slots=True)
class SamplingState:
    """Per-request sampling state, owned by the engine (which appends accepted tokens to output_token_ids)."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None  # seeded per request; None draws from torch's global RNG
    # The prompt never changes, so its id tensor is built once, on first use, on the logits' device.
    prompt_ids: torch.Tensor | None = field(default=None, repr=False)

    @property
    def greedy(self) -> bool:
        return self.params.temperature < _GREEDY_TEMPERATURE

    @property
    def has_penalties(self) -> bool:
        p = self.params
        return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0

    @property
    def has_filters(self) -> bool:
        p = self.params
        return p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0


def make_state(
    params: SamplingParams, prompt_token_ids: list[int], device: str | torch.device = "cpu"
) -> SamplingState:
    """A fresh state for a request; a seed gives the request its own generator on `device`."""
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=torch.device(device))
        generator.manual_seed(params.seed)
    return SamplingState(params, list(prompt_token_ids), [], generator)


class Sampler:
    """Callable: `(logits [B, V], states) -> (token ids, logprobs or None per row)`."""

    def __call__(
        self, logits: torch.Tensor, states: list[SamplingState]
    ) -> tuple[list[int], list[TokenLogprob | None]]:
        if logits.dim() != 2 or logits.shape[0] != len(states):
            raise ValueError(f"logits {tuple(logits.shape)} do not match {len(states)} sampling states")
        logits = logits.float()
        raw = logits
        penalised = [i for i, s in enumerate(states) if s.has_penalties]
        if penalised:
            logits = logits.clone()  # never modify the caller's tensor
            for i in penalised:
                apply_penalties(logits[i], states[i])

        sampled = [i for i, s in enumerate(states) if not s.greedy]
        if len(sampled) == len(states):
            tokens = _sample_rows(logits, states)
        else:
            tokens = _argmax(logits)
            if sampled:
                tokens[sampled] = _sample_rows(logits[sampled], [states[i] for i in sampled])
        token_ids = tokens.tolist()
        return token_ids, _logprobs(raw, states, token_ids)


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    """Row-wise argmax [n, V] -> [n]. On the CPU through NumPy, whose vectorised argmax takes about 10 us over a
    49k vocabulary where torch's takes about 70 (one thread); both return the first maximum, a NaN first."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        return torch.from_numpy(logits.numpy().argmax(axis=-1))
    return logits.argmax(dim=-1)


def apply_penalties(row: torch.Tensor, state: SamplingState) -> None:
    """Penalise one row [V] of logits in place with the state's repetition, presence and frequency penalties."""
    p = state.params
    device = row.device
    output = torch.tensor(state.output_token_ids, dtype=torch.long, device=device)
    if p.repetition_penalty != 1.0:
        if state.prompt_ids is None or state.prompt_ids.device != device:
            state.prompt_ids = torch.tensor(state.prompt_token_ids, dtype=torch.long, device=device)
        seen = torch.cat([state.prompt_ids, output]).unique()
        values = row[seen]
        # HF: a penalty > 1 makes seen tokens less likely whatever the logit's sign.
        row[seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
    if (p.presence_penalty != 0.0 or p.frequency_penalty != 0.0) and output.numel():
        ids, counts = output.unique(return_counts=True)
        row[ids] -= p.frequency_penalty * counts.to(row.dtype) + p.presence_penalty


def _sample_rows(logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """Draw one token per row from temperature-scaled, filtered logits [n, V]; returns [n] token ids."""
    device = logits.device
    temperature = torch.tensor([s.params.temperature for s in states], device=device).unsqueeze(1)
    u = _uniforms(states, device)
    filtered = [i for i, s in enumerate(states) if s.has_filters]
    if not filtered:  # the common case, one pass each: exp, cumsum, search
        return _sample_plain(logits, temperature, u)
    if len(filtered) == len(states):
        return _sample_filtered(logits / temperature, states, u)
    tokens = torch.empty(len(states), dtype=torch.long, device=device)
    plain = [i for i, s in enumerate(states) if not s.has_filters]
    tokens[plain] = _sample_plain(logits[plain], temperature[plain], u[plain])
    tokens[filtered] = _sample_filtered(
        logits[filtered] / temperature[filtered], [states[i] for i in filtered], u[filtered]
    )
    return tokens


def _sample_plain(logits: torch.Tensor, temperature: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """A draw from softmax(logits / T) without normalising: the inverse CDF scales the target instead."""
    weights = ((logits - logits.amax(dim=-1, keepdim=True)) / temperature).exp_()
    return _inverse_cdf(weights, u)


def _uniforms(states: list[SamplingState], device: torch.device) -> torch.Tensor:
    """One uniform in (0, 1] per row. A seeded row draws exactly one number per step from its own generator,
    so its stream does not depend on what else is in the batch or where it sits."""
    u = 1.0 - torch.rand(len(states), device=device)  # (0, 1]: see _inverse_cdf
    seeded = [i for i, s in enumerate(states) if s.generator is not None]
    if seeded:
        draws = [torch.rand((), generator=states[i].generator, device=device) for i in seeded]
        u[seeded] = 1.0 - torch.stack(draws)
    return u


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index whose cumulative interval (cdf[j-1], cdf[j]] holds u * total, per row of weights [n, W] (need
    not sum to one).

    With u in (0, 1] the target is in (0, total], so the first index with cdf >= target always has positive
    probability: masked (zero) entries never win, and rounding cannot run past the end.
    """
    cdf = probs.cumsum(dim=-1)
    target = (u * cdf[:, -1]).unsqueeze(1)
    return torch.searchsorted(cdf, target, right=False).squeeze(1)


# Width of the first candidate set for filtered rows; each retry widens it 4x. A top-256 costs a small fraction
# of a full sort of the vocabulary, and most nuclei are far smaller than 256 (docs/benchmarks.md, "Figures behind the code's constants").
_FIRST_WIDTH = 256


def _sample_filtered(logits: torch.Tensor, states: list[SamplingState], u: torch.Tensor) -> torch.Tensor:
    """Top-k, then top-p, then min-p, then a draw, for rows [n, V] that ask for at least one filter.

    Works on each row's best `width` tokens (sorted) and widens only for rows whose kept set might reach past
    them, so the result is exactly what a full sort would give, at a fraction of the cost.
    """
    n, vocab = logits.shape
    device = logits.device
    top_k = torch.tensor(
        [s.params.top_k if 0 < s.params.top_k < vocab else vocab for s in states], device=device
    )
    top_p = torch.tensor([s.params.top_p for s in states], device=device)
    min_p = torch.tensor([s.params.min_p for s in states], device=device)
    log_z = logits.logsumexp(dim=-1)  # the full normaliser, used by top-p when top-k is off

    tokens = torch.empty(n, dtype=torch.long, device=device)
    todo = torch.arange(n, device=device)
    # Every row sees the same widths whatever the batch holds, so a seeded row's arithmetic never depends on
    # its neighbours.
    width = _FIRST_WIDTH
    while todo.numel():
        width = min(width, vocab)
        cand_logits, cand_ids = logits[todo].topk(width, dim=-1)  # sorted, best first
        kept, complete = _keep(cand_logits, log_z[todo], top_k[todo], top_p[todo], min_p[todo], vocab)
        done = complete | (width == vocab)
        probs = torch.softmax(cand_logits[done].masked_fill(~kept[done], float("-inf")), dim=-1)
        chosen = _inverse_cdf(probs, u[todo[done]])
        tokens[todo[done]] = cand_ids[done].gather(1, chosen.unsqueeze(1)).squeeze(1)
        todo = todo[~done]
        width *= 4
    return tokens


def _keep(
    cand: torch.Tensor,
    log_z: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    vocab: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which of the best-first candidate logits [m, W] survive the filters, and whether each row's kept set is
    surely complete (no token beyond the W candidates could survive)."""
    width = cand.shape[1]
    rank = torch.arange(width, device=cand.device).unsqueeze(0)
    kept = rank < top_k.unsqueeze(1)
    k_inside = top_k <= width

    # Top-p runs on the top-k distribution renormalised: its normaliser is known when top-k fits inside the
    # candidates, or when top-k is off (the full log_z). Otherwise the row must widen.
    k_known = k_inside | (top_k >= vocab)
    masked = cand.masked_fill(~kept, float("-inf"))
    norm = torch.where(k_inside, masked.logsumexp(dim=-1), log_z).unsqueeze(1)
    probs = (masked - norm).exp()
    cum = probs.cumsum(dim=-1)
    use_p = (top_p < 1.0).unsqueeze(1)  # rows at 1.0 skip it, so cumsum rounding never trims their tail
    # The best token's preceding mass is 0 < top_p, so it always survives.
    kept &= ~(use_p & (cum - probs >= top_p.unsqueeze(1)))
    p_inside = k_known & (top_p < 1.0) & (cum[:, -1] >= top_p)  # the next token would be dropped

    # Min-p keeps tokens whose probability is at least min_p times the best's: a ratio, so no normaliser.
    floor = (cand[:, 0] + min_p.log()).unsqueeze(1)
    kept &= ~((min_p > 0.0).unsqueeze(1) & (cand < floor))
    m_inside = (min_p > 0.0) & (cand[:, -1] < floor.squeeze(1))

    return kept, k_inside | p_inside | m_inside


def _logprobs(
    raw: torch.Tensor, states: list[SamplingState], token_ids: list[int]
) -> list[TokenLogprob | None]:
    """Chosen-token logprob and the top `params.logprobs` alternatives, from the raw logits."""
    result: list[TokenLogprob | None] = [None] * len(states)
    wanted = [i for i, s in enumerate(states) if s.params.logprobs is not None]
    if not wanted:
        return result
    logprobs = torch.log_softmax(raw[wanted], dim=-1)
    chosen = torch.tensor([token_ids[i] for i in wanted], device=raw.device)
    chosen_lp = logprobs.gather(1, chosen.unsqueeze(1)).squeeze(1).tolist()
    k_max = min(max(states[i].params.logprobs or 0 for i in wanted), raw.shape[1])
    top_lp, top_ids = logprobs.topk(k_max, dim=-1)  # k_max == 0 gives empty rows
    top_lp_rows, top_id_rows = top_lp.tolist(), top_ids.tolist()
    for row, i in enumerate(wanted):
        k = states[i].params.logprobs or 0
        top = list(zip(top_id_rows[row][:k], top_lp_rows[row][:k], strict=True))
        result[i] = TokenLogprob(token_ids[i], chosen_lp[row], top)
    return result
