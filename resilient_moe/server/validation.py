"""Request checks that depend on the model or the deployment, and the SamplingParams they produce.

Field bounds that depend on nothing live in protocol.py (they show up in the OpenAPI schema); what
needs the context length or the vocabulary is checked here, and so is a structured output's grammar
(`guide`: it must compile). Every failure is an `ApiError` (400) naming the field.
"""

from __future__ import annotations

import json
from typing import Any

from resilient_moe.engine.config import SamplingParams
from resilient_moe.engine.guided import GuideError, guide_from
from resilient_moe.errors import ConfigError
from resilient_moe.server.protocol import ApiError, ChatCompletionRequest, CompletionRequest


def _refuse(param: str, why: str) -> None:
    raise ApiError(400, f"{param} is not supported: {why}", param=param, code="unsupported_parameter")


def reject_unsupported(body: CompletionRequest | ChatCompletionRequest) -> None:
    """A 400 naming each parameter that this server cannot honour (an unknown one is refused by protocol.py)."""
    if body.stream_options is not None and not body.stream:
        raise ApiError(400, "stream_options is only allowed with stream: true", param="stream_options")
    if isinstance(body, CompletionRequest):
        if body.suffix:
            _refuse("suffix", "the model has no infill")
        if body.best_of is not None and body.best_of < body.n:
            raise ApiError(400, f"best_of must be at least n ({body.n}), got {body.best_of}", param="best_of")
        if body.best_of is not None and body.best_of > body.n and body.stream:
            raise ApiError(400, "best_of > n cannot be streamed: the best choices are known only at the end",
                           param="best_of")
        if body.echo and body.logprobs is not None:
            _refuse("echo", "with logprobs it needs the prompt's log probabilities, which are not computed")
    else:
        if body.functions:
            _refuse("functions", "the deprecated functions are not; use tools")
        if body.function_call is not None and body.function_call != "none":
            _refuse("function_call", 'the deprecated function_call is not; use tool_choice')
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")


def _response_format(fmt: Any) -> dict[str, Any] | None:
    """The JSON schema that response_format asks for (None: text)."""
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text" and set(fmt) == {"type"}:
        return None
    if kind == "json_object" and set(fmt) == {"type"}:
        return {"type": "object"}
    if kind == "json_schema" and set(fmt) == {"type", "json_schema"}:
        spec = fmt["json_schema"]
        if isinstance(spec, dict) and isinstance(spec.get("schema"), dict) \
                and set(spec) <= {"name", "description", "schema", "strict"}:
            return spec["schema"]
        raise ApiError(400, 'response_format: json_schema is {"name": str, "schema": {...}, "strict": bool}',
                       param="response_format")
    raise ApiError(400, 'response_format is {"type": "text"}, {"type": "json_object"} or {"type": "json_schema", '
                        '"json_schema": {"name": ..., "schema": {...}}}', param="response_format")


def guide(body: CompletionRequest | ChatCompletionRequest, tool_call: dict[str, Any] | None = None) -> str | None:
    """The grammar of a request (SamplingParams.guide), from the one parameter that gives it: response_format,
    guided_json, guided_regex, guided_choice, guided_grammar, or (`tool_call`) the schema of a forced tool
    call. A 400 names the parameter when its grammar is not valid, or when several are given."""
    given: list[tuple[str, str, Any]] = []
    if body.response_format is not None and (schema := _response_format(body.response_format)) is not None:
        given.append(("response_format", "json_schema", schema))
    if body.guided_json is not None:
        schema = body.guided_json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise ApiError(400, f"guided_json: not valid JSON ({e})", param="guided_json") from None
        given.append(("guided_json", "json_schema", schema))
    for param, kind in (("guided_regex", "regex"), ("guided_choice", "choice"), ("guided_grammar", "lark")):
        if getattr(body, param) is not None:
            given.append((param, kind, getattr(body, param)))
    if tool_call is not None:
        given.append(("tool_choice", "json_schema", tool_call))
    if len(given) > 1:
        names = ", ".join(p for p, _, _ in given)
        raise ApiError(400, f"{given[1][0]}: one structured output at a time, got {names}", param=given[1][0])
    if not given:
        return None
    param, kind, spec = given[0]
    try:
        return guide_from(kind, spec)
    except GuideError as e:
        raise ApiError(400, f"{param}: {e}", param=param) from None


def logit_bias(body: CompletionRequest | ChatCompletionRequest, vocab: int) -> tuple[tuple[int, float], ...]:
    """The request's logit_bias as (token id, bias) pairs, in token order."""
    pairs = []
    for key, bias in (body.logit_bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise ApiError(400, f"logit_bias: {key!r} is not a token id", param="logit_bias") from None
        if not 0 <= token < vocab:
            raise ApiError(400, f"logit_bias: token id {token} is outside the vocabulary [0, {vocab})",
                           param="logit_bias")
        if not -100.0 <= bias <= 100.0:
            raise ApiError(400, f"logit_bias: the bias of token {token} must be in [-100, 100], got {bias}",
                           param="logit_bias")
        pairs.append((token, float(bias)))
    return tuple(sorted(pairs))


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
             stop_ids: list[int], max_model_len: int, prompt_param: str, vocab: int,
             guide: str | None = None) -> SamplingParams:
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
            logprobs=logprobs_wanted(body), presence_penalty=float(body.presence_penalty),
            frequency_penalty=float(body.frequency_penalty), repetition_penalty=float(body.repetition_penalty),
            logit_bias=logit_bias(body, vocab), min_tokens=body.min_tokens, guide=guide,
        )
    except ConfigError as e:
        raise ApiError(400, str(e), param=str(e).split(" ", 1)[0]) from None
