"""Request checks that depend on the model or the deployment, and the SamplingParams they produce.

Field bounds that depend on nothing live in protocol.py (they show up in the OpenAPI schema); what
needs the context length or the vocabulary is checked here. Every failure is an `ApiError` (400)
naming the field.
"""

from __future__ import annotations

from resilient_moe.engine.config import SamplingParams
from resilient_moe.errors import ConfigError
from resilient_moe.server.protocol import ApiError, ChatCompletionRequest, CompletionRequest


def reject_unsupported(body: CompletionRequest | ChatCompletionRequest) -> None:
    if body.n != 1:
        raise ApiError(400, f"n must be 1 (one choice per request), got {body.n}", param="n")
    if body.presence_penalty or body.frequency_penalty:
        param = "presence_penalty" if body.presence_penalty else "frequency_penalty"
        raise ApiError(400, f"{param} is not supported (must be 0)", param=param)
    if body.logit_bias:
        raise ApiError(400, "logit_bias is not supported", param="logit_bias")
    if isinstance(body, CompletionRequest):
        if body.echo:
            raise ApiError(400, "echo is not supported", param="echo")
        if body.suffix:
            raise ApiError(400, "suffix is not supported", param="suffix")
        if body.best_of not in (None, 1):
            raise ApiError(400, f"best_of must be 1, got {body.best_of}", param="best_of")
    elif body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")


def check_ids(ids: list[int], vocab: int, param: str) -> None:
    for token in ids:
        if not 0 <= token < vocab:
            raise ApiError(400, f"{param}: token id {token} is outside the vocabulary [0, {vocab})", param=param)


def stops(body: CompletionRequest | ChatCompletionRequest, vocab: int) -> tuple[list[str], list[int]]:
    """The stop strings and stop token ids of a request (their count and length are bounded by protocol.py)."""
    raw = [] if body.stop is None else [body.stop] if isinstance(body.stop, str) else list(body.stop)
    strings = [s for s in raw if isinstance(s, str) and s]
    ids = [s for s in raw if isinstance(s, int)] + list(body.stop_token_ids or [])
    check_ids(ids, vocab, "stop_token_ids" if body.stop_token_ids else "stop")
    return strings, ids


def logprobs_wanted(body: CompletionRequest | ChatCompletionRequest) -> int | None:
    """SamplingParams.logprobs: None (none), 0 (the sampled token's) or N (also the N most likely)."""
    if isinstance(body, CompletionRequest):
        return body.logprobs
    return (body.top_logprobs or 0) if body.logprobs else None


def sampling(body: CompletionRequest | ChatCompletionRequest, prompt_len: int, max_tokens: int | None,
             stop_ids: list[int], max_model_len: int, prompt_param: str) -> SamplingParams:
    if prompt_len >= max_model_len:
        raise ApiError(400, f"this model's maximum context length is {max_model_len} tokens; the prompt has "
                            f"{prompt_len} (at least one token must remain for the output)", param=prompt_param,
                       code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = max_model_len - prompt_len
    elif prompt_len + max_tokens > max_model_len:
        raise ApiError(400, f"this model's maximum context length is {max_model_len} tokens; you requested "
                            f"{prompt_len + max_tokens} ({prompt_len} in the prompt, {max_tokens} for the output): "
                            "lower max_tokens", param="max_tokens", code="context_length_exceeded")
    try:
        return SamplingParams(
            max_tokens=max_tokens, temperature=float(body.temperature), top_p=float(body.top_p),
            top_k=max(0, body.top_k), seed=body.seed, stop_token_ids=tuple(stop_ids), ignore_eos=body.ignore_eos,
            logprobs=logprobs_wanted(body),
        )
    except ConfigError as e:
        raise ApiError(400, str(e), param=str(e).split(" ", 1)[0]) from None
