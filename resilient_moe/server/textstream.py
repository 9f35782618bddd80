"""A request's output as text: incremental detokenization and stop strings, in time linear in the output.

The API runs this on its event loop for every token, next to the frontend's link I/O, so each token
must cost a bounded amount of work whatever the model emits (long runs of invalid UTF-8 and special
tokens included):
- each step decodes a bounded window of tokens, never the whole output;
- stop strings are matched by one Knuth-Morris-Pratt automaton per string, fed each character once.
"""

from __future__ import annotations

from typing import Protocol

REPLACEMENT = "\ufffd"
# Tokens a character may still be completing over: a UTF-8 character has at most 4 bytes and a token
# carries at least one, so a window this long that still ends in U+FFFD holds bytes that will never
# form a character. Past it the settled part is emitted (with its U+FFFD) and the window moves on.
MAX_PENDING_TOKENS = 8
INCOMPLETE_TAIL_TOKENS = 3  # the most tokens an incomplete last character can span


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class StopMatcher:
    """Finds the earliest stop string in text fed piece by piece; `held` is the longest suffix of the
    text so far that is a proper prefix of some stop string (text that must not be sent yet)."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self._fail = [_prefix_function(s) for s in stops]
        self._state = [0] * len(stops)

    def feed(self, text: str) -> int | None:
        """Consume `text`. Returns where (relative to `text`, negative when it began in earlier, held
        text) the earliest-starting stop string that completed in it begins, or None."""
        first: int | None = None
        for s, (stop, fail) in enumerate(zip(self.stops, self._fail)):
            matched = self._state[s]
            for i, char in enumerate(text):
                while matched and stop[matched] != char:
                    matched = fail[matched - 1]
                if stop[matched] == char:
                    matched += 1
                if matched == len(stop):
                    start = i + 1 - len(stop)
                    first = start if first is None else min(first, start)
                    matched = fail[matched - 1]
                    break  # this string's first occurrence is the only one that can cut the output
            self._state[s] = matched
        return first

    @property
    def held(self) -> int:
        return max(self._state, default=0)


def _prefix_function(pattern: str) -> list[int]:
    """KMP failure table: fail[i] = length of the longest proper prefix of pattern[:i+1] that is also its suffix."""
    fail = [0] * len(pattern)
    k = 0
    for i in range(1, len(pattern)):
        while k and pattern[i] != pattern[k]:
            k = fail[k - 1]
        if pattern[i] == pattern[k]:
            k += 1
        fail[i] = k
    return fail


class TextStream:
    """Detokenizes a request's output incrementally and applies its stop strings.

    Each step decodes a short window (the tokens since the last emitted character, plus the step
    before them for context), so characters split across tokens wait until complete and a leading
    space survives (`prompt_tail` gives the first output token its context). Text that might be the
    start of a stop string is held back until it is known not to be, so a client never sees part of
    a stop string; the stop string itself is never emitted. Stop strings are looked for only in the text
    that comes after the first `min_tokens` tokens (min_tokens: no stop before then)."""

    def __init__(self, tokenizer: Decoder | None, stops: list[str], prompt_tail: list[int] = (),
                 min_tokens: int = 0) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_tail)
        self._prefix = 0  # ids[_prefix:_read]: the window's context, already decoded
        self._read = len(self.ids)
        self._matcher = StopMatcher([s for s in stops if s]) if any(stops) else None
        self._held = ""  # decoded, not sent: it may start a stop string
        self._sent: list[str] = []
        self.stopped = False
        self._unmatched = min_tokens  # tokens still to come before stop strings count

    def add(self, token_id: int) -> str:
        """Text newly safe to send after `token_id`; sets `stopped` when a stop string completed."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        self._unmatched -= 1
        return self._release(self._advance(final=False))

    def flush(self) -> str:
        """The rest (held-back text, incomplete characters), once the request finished otherwise.
        The final text can still complete a stop string: `stopped` tells."""
        if self.stopped:
            return ""
        out = self._release(self._advance(final=True))
        if not self.stopped and self._held:
            out += self._held
            self._sent.append(self._held)
            self._held = ""
        return out

    @property
    def sent(self) -> str:
        return "".join(self._sent)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else ""

    def _advance(self, final: bool) -> str:
        """Newly complete text; moves the window on."""
        if self.tokenizer is None:
            return ""
        context = self._decode(self.ids[self._prefix:self._read])
        window = self._decode(self.ids[self._prefix:])
        pending = len(self.ids) - self._read
        end = len(self.ids)
        if not final and window.endswith(REPLACEMENT):
            if pending <= MAX_PENDING_TOKENS:
                return ""  # a character may still be completing
            end, window = self._settled(context, window)
        new = window[len(context):] if len(window) > len(context) else ""
        if new or final or pending > MAX_PENDING_TOKENS:  # (tokens that decode to nothing must not pile up)
            self._prefix, self._read = self._read, end
        return new

    def _settled(self, context: str, window: str) -> tuple[int, str]:
        """A long run of bytes that are not a character: the window's end and text up to a split that
        leaves the last few tokens pending (they may start a real character) without cutting through
        a character the full window decodes; the whole window when no such split exists."""
        last = len(self.ids) - INCOMPLETE_TAIL_TOKENS
        for end in range(last, max(self._read, last - 4), -1):
            part = self._decode(self.ids[self._prefix:end])
            if len(part) >= len(context) and window.startswith(part):
                return end, part
        return len(self.ids), window

    def _release(self, new: str) -> str:
        """What of `new` may be sent now, given the stop strings."""
        if not new:
            return ""
        if self._matcher is None or self._unmatched > 0:
            self._sent.append(new)
            return new
        hit = self._matcher.feed(new)
        pending = self._held + new
        if hit is not None:
            out = pending[:len(self._held) + hit]
            self._held, self.stopped = "", True
        else:
            keep = min(self._matcher.held, len(pending))
            out, self._held = pending[:len(pending) - keep], pending[len(pending) - keep:]
        self._sent.append(out)
        return out
