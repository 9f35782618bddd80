"""Tool calls in /v1/chat/completions: the request's tools, the grammar that forces a call, and the call
parsed out of the generated text.

The tools are rendered into the prompt by the checkpoint's chat template (`tools=`, as HF's
apply_chat_template passes them). A call is generated as one JSON object

    {"name": "<tool name>", "arguments": {...the tool's parameters schema...}}

  tool_choice "required": the output is constrained (engine/guided.py) to a call of one of the tools;
  tool_choice {"type": "function", "function": {"name": N}}: to a call of tool N;
  tool_choice "auto" (the default with tools): unconstrained; if the whole text (stripped) parses as such
    an object naming one of the tools, it is answered as a call, else as content. This is a heuristic:
    a model that wraps its call in other text or in its own markup (<tool_call> tags...) is answered as
    content;
  tool_choice "none": the tools are rendered but no call is produced (the text is content), like vLLM.

One call per response (no parallel calls). Its id is derived from the request id, so a resumed stream
names the same call.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from resilient_moe.server.protocol import ApiError


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it

    def to_openai(self, call_id: str, index: int | None = None) -> dict[str, Any]:
        call: dict[str, Any] = {"id": call_id, "type": "function",
                                "function": {"name": self.name, "arguments": self.arguments}}
        if index is not None:
            call = {"index": index, **call}
        return call


def call_id(request_id: str, index: int = 0) -> str:
    return "call_" + hashlib.sha256(f"{request_id}:{index}".encode()).hexdigest()[:24]


def checked_tools(tools: list[Any] | None) -> list[dict[str, Any]]:
    """The request's tools as {"name", "description", "parameters"} function specs (400 naming `tools`)."""
    out = []
    for i, tool in enumerate(tools or []):
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise ApiError(400, f'tools[{i}]: a tool is {{"type": "function", "function": {{...}}}}', param="tools")
        fn = tool["function"]
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise ApiError(400, f"tools[{i}].function.name: a non-empty string is required", param="tools")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise ApiError(400, f"tools[{i}].function.parameters must be a JSON schema object", param="tools")
        if name in (t["name"] for t in out):
            raise ApiError(400, f"tools[{i}]: the tool name {name!r} is used twice", param="tools")
        out.append({"name": name, "description": fn.get("description"), "parameters": params})
    return out


def choice_of(tool_choice: Any, tools: list[dict[str, Any]]) -> str | None:
    """"none", "auto", "required" or the name of the forced tool (None: no tools, no choice)."""
    if tool_choice is None:
        return "auto" if tools else None
    if tool_choice in ("none", "auto", "required"):
        if tool_choice != "none" and not tools:
            raise ApiError(400, f'tool_choice "{tool_choice}" needs tools', param="tool_choice")
        return tool_choice
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function" \
            and isinstance(tool_choice.get("function"), dict):
        name = tool_choice["function"].get("name")
        if name not in [t["name"] for t in tools]:
            raise ApiError(400, f"tool_choice names the function {name!r}, which is not among the tools",
                           param="tool_choice")
        return name
    raise ApiError(400, 'tool_choice is "none", "auto", "required" or {"type": "function", "function": '
                        '{"name": ...}}', param="tool_choice")


def call_schema(tools: list[dict[str, Any]], only: str | None = None) -> dict[str, Any]:
    """The JSON schema of one call of a tool (of `only`, when named)."""
    variants = [{"type": "object", "properties": {"name": {"const": t["name"]}, "arguments": t["parameters"]},
                 "required": ["name", "arguments"], "additionalProperties": False}
                for t in tools if only is None or t["name"] == only]
    return variants[0] if len(variants) == 1 else {"anyOf": variants}


def template_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The tools as chat templates see them (OpenAI's shape, as transformers passes them)."""
    return [{"type": "function", "function": {k: v for k, v in t.items() if v is not None}} for t in tools]


# The start of a call, up to its arguments: what a stream must see before it names the call.
_HEAD = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


def parse_call(text: str, tools: list[dict[str, Any]]) -> ToolCall | None:
    """The call in `text` when all of it is {"name": <a tool>, "arguments": {...}}; else None. The
    arguments are the generated text of them (so a stream, which sends them as they come, agrees)."""
    text = text.strip()
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, dict) or set(value) != {"name", "arguments"}:
        return None
    if value["name"] not in [t["name"] for t in tools] or not isinstance(value["arguments"], dict):
        return None
    head = _HEAD.match(text)
    if head is None:  # "arguments" first: re-serialized
        return ToolCall(value["name"], json.dumps(value["arguments"], ensure_ascii=False))
    return ToolCall(value["name"], text[head.end():-1].rstrip())


class CallStream:
    """One streamed choice of a chat with tools: turns its text deltas into content deltas, or into a
    call's deltas (its id and name once they are known, then chunks of its arguments).

    Text that starts with "{" is held back until it shows a call's head (then streamed as arguments,
    the last character held back: it may be the call's closing brace) or the choice ends; other text is
    streamed as content."""

    def __init__(self, tools: list[dict[str, Any]], call_id: str) -> None:
        self.tools = tools
        self.call_id = call_id
        self.text = ""
        self.mode: str | None = None  # None: undecided, "content", "call"
        self.pending = ""  # text not sent yet

    def feed(self, text: str, finish_reason: str | None) -> tuple[dict[str, Any], str | None]:
        """The delta for `text` (empty: nothing to send yet) and the finish reason to send with it."""
        self.text += text
        self.pending += text
        if self.mode is None:
            stripped = self.pending.lstrip()
            if stripped and not stripped.startswith("{"):
                self.mode = "content"
            elif (head := _HEAD.match(stripped)) is not None and head.group(1) in [t["name"] for t in self.tools]:
                self.mode = "call"
                self.pending = stripped[head.end():]
                opening = {"tool_calls": [{"index": 0, "id": self.call_id, "type": "function",
                                           "function": {"name": json.loads(f'"{head.group(1)}"'), "arguments": ""}}]}
                if finish_reason is None:
                    return opening, None
                return self._finish(opening, finish_reason)
        if finish_reason is not None:
            return self._finish({}, finish_reason)
        if self.mode == "content":
            out, self.pending = self.pending, ""
            return ({"content": out} if out else {}), None
        if self.mode == "call" and len(self.pending) > 1:
            out, self.pending = self.pending[:-1], self.pending[-1:]
            return self._arguments(out), None
        return {}, None

    def _arguments(self, text: str) -> dict[str, Any]:
        return {"tool_calls": [{"index": 0, "function": {"arguments": text}}]}

    def _finish(self, opening: dict[str, Any], finish_reason: str) -> tuple[dict[str, Any], str]:
        call = parse_call(self.text, self.tools)
        if self.mode is None:
            if call is None:
                return ({"content": self.pending} if self.pending else {}), finish_reason
            return {"tool_calls": [call.to_openai(self.call_id, index=0)]}, "tool_calls"
        if self.mode == "content":
            return ({"content": self.pending} if self.pending else {}), finish_reason
        rest = self.pending
        if call is not None:  # the call's closing brace is not part of its arguments
            rest = rest.rstrip()[:-1].rstrip()
        delta = opening or self._arguments(rest)
        if opening and rest:
            delta["tool_calls"][0]["function"]["arguments"] = rest
        return delta, "tool_calls" if call is not None else finish_reason
