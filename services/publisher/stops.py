"""Stop strings, matched in the text a request streams, across chunk boundaries.

Text that could still be the beginning of a stop string is held back until the next
tokens show whether it is; the stop string itself (and anything after it) is never sent,
as OpenAI's API behaves."""

from __future__ import annotations


class StopMatcher:
    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """The text that is safe to send now, and whether a stop string was reached."""
        if not self.stops:
            return text, False
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return buf[:min(hits)], True
        keep = max((self._partial(buf, s) for s in self.stops), default=0)
        self.held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        """What was held back, when the request ends for another reason."""
        held, self.held = self.held, ""
        return held

    @staticmethod
    def _partial(buf: str, stop: str) -> int:
        """Length of the longest end of ``buf`` that begins ``stop``."""
        for k in range(min(len(stop) - 1, len(buf)), 0, -1):
            if buf.endswith(stop[:k]):
                return k
        return 0
