"""The OpenAI-compatible request bodies and the error shape of the HTTP API.

Requests are pydantic models, so FastAPI validates them and publishes them in the OpenAPI schema.
Field bounds live here (they show up in the schema); what depends on the model or deployment
(context length, vocabulary) is checked in api.py. Every error leaves the server as

    {"error": {"message": str, "type": str, "param": str | null, "code": str | null}}

with the HTTP status in `ApiError.status`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

MAX_STOP_SEQUENCES = 16
MAX_STOP_CHARS = 256
MAX_CHOICES = 16  # n x prompts of one request (each choice is a request of its own at an attention worker)

# OpenAI's error "type" for each status we send.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


class ApiError(Exception):
    """An error answered as OpenAI-style JSON; `param` names the request field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in (
        (400, "Invalid request: a parameter is out of range, or the prompt exceeds the context length"),
        (404, "Unknown model"),
        (413, "Request body too large"),
        (429, "Too many requests in flight or queued; retry later"),
        (503, "No attention worker is available, or no replica of a needed expert is left"),
    )
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = Field(False, description="A last chunk with the usage and no choices (and \"usage\": "
                                                   "null on the others)")


def _unicode(text: str) -> str:
    """JSON may carry lone UTF-16 surrogates ("\\ud800"); they are not text, and no tokenizer takes them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"contains the lone surrogate U+{ord(text[e.start]):04X} at character {e.start}, "
                         "which is not valid Unicode text") from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]
# A stop sequence: text, or (our extension, like vLLM's stop_token_ids) a token id.
Stop = Text | list[Text | int] | None


class _SamplingFields(BaseModel):
    """Parameters shared by completions and chat completions."""

    # Every parameter is honoured or refused: an unknown one is a 400 naming it, never ignored.
    model_config = ConfigDict(extra="forbid")

    model: Text | None = Field(None, description="Served model name (GET /v1/models); default: the only one")
    max_tokens: int | None = Field(None, ge=1, description="Tokens to generate at most")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 is greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, description="Extension: keep the k most likely tokens (0 or -1: off)")
    seed: int | None = Field(None, ge=0, lt=2**63, description="Same seed, same tokens, failover or not")
    stop: Stop = Field(None, description=f"Up to {MAX_STOP_SEQUENCES} stop strings of at most {MAX_STOP_CHARS} "
                                         "characters (or token ids)")
    stop_token_ids: list[int] | None = Field(None, description="Extension: stop on these token ids")
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="Choices per prompt, each with a seed of its own "
                                                         "derived from the request's (the same seed, the same "
                                                         f"choices); at most {MAX_CHOICES} choices per request")
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(False, description="Extension: keep generating past end-of-sequence tokens")
    return_token_ids: bool = Field(False, description="Extension: add prompt_token_ids and token_ids to choices")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="Subtracted from the logit of each token "
                                                                       "generated so far")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="Times its count so far, subtracted from "
                                                                        "the logit of each generated token")
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0, description="Extension (vLLM's): logits of tokens in "
                                      "the prompt or the output are divided by it (positive) or multiplied (negative)")
    logit_bias: dict[str, float] | None = Field(None, description="Token id (as a string) -> bias in [-100, 100] "
                                                "added to its logit (-100 bans it, 100 all but forces it)")
    min_tokens: int = Field(0, ge=0, description="Extension: end-of-sequence and stop token ids are masked until "
                                                 "this many tokens are generated")
    user: Text | None = Field(None, description="An end-user id; it does not change the output")
    # Structured outputs (engine/guided.py): at most one of these per request.
    guided_json: Any = Field(None, description="Extension (vLLM's): the output is JSON valid against this schema")
    guided_regex: Any = Field(None, description="Extension (vLLM's): the output fully matches this regex")
    guided_choice: Any = Field(None, description="Extension (vLLM's): the output is one of these strings")
    guided_grammar: Any = Field(None, description="Extension (vLLM's): the output follows this grammar (Lark "
                                                  "syntax, llguidance's dialect, or GBNF)")
    response_format: Any = Field(None, description='{"type": "text"}, {"type": "json_object"} or {"type": '
                                 '"json_schema", "json_schema": {"name": ..., "schema": {...}}} (always strict)')

    @field_validator("stop")
    @classmethod
    def _stop_limits(cls, stop: Stop) -> Stop:
        """Bounded, so that matching them costs the event loop little per token."""
        items = [stop] if isinstance(stop, str) else stop or []
        if len(items) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(items)}")
        longest = max((len(s) for s in items if isinstance(s, str)), default=0)
        if longest > MAX_STOP_CHARS:
            raise ValueError(f"a stop string has at most {MAX_STOP_CHARS} characters, got one of {longest}")
        return stop


class CompletionRequest(_SamplingFields):
    """POST /v1/completions."""

    prompt: Text | list[int] | list[Text] | list[list[int]] = Field(
        ..., description="Text, or token ids, or a list of those: choices n x i to n x i + n - 1 are prompt i's"
    )
    max_tokens: int | None = Field(16, ge=1, description="Tokens to generate at most")
    logprobs: int | None = Field(None, ge=0, le=20, description="Log probability of each generated token, and "
                                 "(N > 0) the N most likely tokens at each position")
    echo: bool = Field(False, description="Prepend the prompt to each choice's text (not with logprobs)")
    suffix: Text | None = Field(None, description="Not supported (the model has no infill)")
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES, description="Generate this many choices per prompt "
                                "(default n) and return the n with the highest cumulative log probability; not "
                                "with stream")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None
    tool_calls: list[Any] | None = Field(None, description="An assistant's earlier tool calls (to the template)")
    tool_call_id: Text | None = Field(None, description="A tool message: the call it answers")


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="Alias of max_tokens")
    logprobs: bool = Field(False, description="Log probability of each generated token")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="With logprobs: the N most likely tokens at "
                                     "each position")
    tools: list[Any] | None = Field(None, description="Functions the model may call (server/tool_calls.py)")
    tool_choice: Any = Field(None, description='"none", "auto" (the default with tools), "required" or {"type": '
                             '"function", "function": {"name": ...}}')
    functions: list[Any] | None = Field(None, description="Not supported (deprecated: use tools); absent or empty")
    function_call: Any = Field(None, description='Only "none" (deprecated: use tool_choice)')
