"""Token bytes to text, incrementally, with stop strings held back until decided."""

from __future__ import annotations

import codecs


class TextStream:
    """Accumulates token bytes and releases text that cannot be part of a stop string.

    Multi-byte UTF-8 characters split across tokens are completed before they
    are released; a suffix that could still grow into a stop string is held.
    """

    def __init__(self, stop: list[str]) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = [s for s in stop if s]
        self._held = ""
        self.text = ""  # everything released so far
        self.stopped = False
        self.stop_hit: str | None = None  # the stop string that ended the text

    def push(self, data: bytes) -> str:
        """Add a token's bytes; return the newly released text."""
        if self.stopped:
            return ""
        self._held += self._decoder.decode(data)
        return self._release(final=False)

    def flush(self) -> str:
        """End of generation: release whatever is held (no stop string completed)."""
        if self.stopped:
            return ""
        self._held += self._decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        hit = self._first_stop(self._held)
        if hit is not None:
            out = self._held[:hit]
            self._held = ""
            self.stopped = True
        elif final:
            out, self._held = self._held, ""
        else:
            keep = self._partial_suffix(self._held)
            out = self._held[: len(self._held) - keep]
            self._held = self._held[len(self._held) - keep:]
        self.text += out
        return out

    def _first_stop(self, text: str) -> int | None:
        best: int | None = None
        for s in self._stop:
            i = text.find(s)
            if i != -1 and (best is None or i < best):
                best = i
                self.stop_hit = s
        return best

    def _partial_suffix(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        longest = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:n]):
                    longest = n
                    break
        return longest
