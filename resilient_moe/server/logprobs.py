"""Log probabilities in OpenAI's two shapes.

Completions (`"logprobs": N`):
    {"tokens": [str], "token_logprobs": [float], "top_logprobs": [{token text: logprob}] | null,
     "text_offset": [int]}
  with N > 0, each position's dict holds the N most likely tokens and always the sampled one (so N
  or N + 1 entries). The format is keyed by text, and several tokens can decode to the same text
  (byte tokens of one character, say): the most likely keeps the text, each other is keyed
  "token_id:ID" (the form vLLM gives token ids in logprobs), so no entry is lost.
Chat (`"logprobs": true, "top_logprobs": N`):
    {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"} x N]}]}
"""

from __future__ import annotations

from typing import Any, Sequence

from resilient_moe.engine.tokenizer import TextTokenizer

Top = Sequence[tuple[int, float]] | None


def token_text(tokenizer: TextTokenizer | None, token_id: int) -> str:
    """One token as text (special tokens included); `<id>` for a model without a tokenizer."""
    return tokenizer.decode([token_id], skip_special_tokens=False) if tokenizer is not None else f"<{token_id}>"


def completion_logprobs(tokenizer: TextTokenizer | None, ids: list[int], lps: list[float | None], tops: list[Top],
                        offset: int, top_n: int) -> dict[str, Any]:
    """`offset`: characters of the output before the first of `ids` (streaming)."""
    tokens = [token_text(tokenizer, t) for t in ids]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    top_logprobs = None
    if top_n > 0:
        top_logprobs = []
        for token_id, lp, top in zip(ids, lps, tops):
            pairs = list(top or ())
            if token_id not in {t for t, _ in pairs}:
                pairs.append((token_id, lp))
            entry: dict[str, float | None] = {}
            for t, v in pairs:  # most likely first (the sampled token, when not among them, last)
                text = token_text(tokenizer, t)
                entry[f"token_id:{t}" if text in entry else text] = v
            top_logprobs.append(entry)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": top_logprobs, "text_offset": offsets}


def chat_logprobs(tokenizer: TextTokenizer | None, ids: list[int], lps: list[float | None],
                  tops: list[Top]) -> dict[str, Any]:
    def item(token_id: int, logprob: float | None) -> dict[str, Any]:
        text = token_text(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [{**item(t, lp), "top_logprobs": [item(i, v) for i, v in (top or ())]}
                        for t, lp, top in zip(ids, lps, tops)]}
