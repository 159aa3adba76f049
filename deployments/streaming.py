"""What a request's stream shows: engine outputs become Chunks, text held back where a stop
string may still cut it."""
from __future__ import annotations

from engine import SamplingParams
from engine.sequence import RequestOutput


class StepFailed(RuntimeError):
    """The engine step that carried this request failed; the replica and its other requests go on."""


class HoldBack:
    """A stop string can begin in text already produced; holding back its length minus one keeps
    what the client has received a prefix of the final, cut text."""

    def __init__(self, params: SamplingParams):
        self.hold = max((len(s) for s in params.stop), default=1) - 1
        self.sent = ""

    def delta(self, out: RequestOutput) -> str:
        """The text to send now for this output (all of it once the request finished)."""
        if out.finish_reason == "error":
            raise StepFailed(f"generation failed: {out.error}")
        shown = out.text if out.finished else out.text[:max(len(self.sent), len(out.text) - self.hold)]
        delta, self.sent = shown[len(self.sent):], shown
        return delta
