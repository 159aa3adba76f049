"""The model server's small parts, alone: stop-string hold-back and shadow sampling."""
from types import SimpleNamespace

import pytest

from deployments.shadow import ShadowSampler
from deployments.streaming import HoldBack, StepFailed
from engine import SamplingParams
from engine.sequence import ExitRecord, RequestOutput, StepOutput


def _out(text, finished=False, reason=None, error=None, tokens=(1,)):
    return RequestOutput("r", list(tokens), text, finished, reason, 3, len(text), error)


def test_text_that_a_stop_string_may_still_cut_is_held_back_until_the_end():
    stream = HoldBack(SamplingParams(stop=["END"]))  # holds back 2 characters
    assert stream.delta(_out("ab")) == ""
    assert stream.delta(_out("abcdE")) == "abc"
    assert stream.delta(_out("abcdEN")) == "d"
    assert stream.delta(_out("abcd", finished=True, reason="stop")) == ""  # the engine cut "END"
    assert stream.sent == "abcd"
    plain = HoldBack(SamplingParams())
    assert plain.delta(_out("ab")) == "ab" and plain.delta(_out("abc")) == "c"


def test_a_failed_step_becomes_the_streams_error():
    with pytest.raises(StepFailed, match="boom"):
        HoldBack(SamplingParams()).delta(_out("", True, "error", "boom"))


def _exit(rid, position, layer, greedy=False):
    return ExitRecord(rid, position, layer, 0.9, greedy, "m", 30)


def test_shadow_samples_carry_the_prefix_and_name_greedy_exits_layer_0():
    sent = []
    verifier = SimpleNamespace(verify=SimpleNamespace(remote=lambda name, samples: sent.append((name, samples))))
    shadow = ShadowSampler("m", verifier, rate=1.0, num_layers=30)
    shadow.track("a", [5, 6], SamplingParams(temperature=0.7, top_p=0.9))
    shadow.track("b", [7], SamplingParams())
    step = StepOutput([_out("x", tokens=[11]), RequestOutput("b", [12], "y", False, None, 1, 1)],
                      [_exit("r", 2, 12), _exit("b", 1, 30)], False)
    step.outputs[0].request_id = step.exits[0].request_id = "a"
    shadow.sample(step)  # a left early at 12: sampled; b at full depth: nothing to check
    assert sent == [("m", [([5, 6], 11, 12, 0.7, 0.9)])]
    shadow.sample(StepOutput([RequestOutput("a", [13], "xz", False, None, 2, 2)], [_exit("a", 3, 20, greedy=True)],
                             False))
    assert sent[-1] == ("m", [([5, 6, 11], 13, 0, 0.7, 0.9)])  # the history grew; greedy: layer 0
    shadow.forget("a")
    shadow.sample(StepOutput([RequestOutput("a", [14], "xzw", False, None, 2, 3)], [_exit("a", 4, 8)], False))
    assert len(sent) == 2


def test_without_a_verifier_nothing_is_tracked():
    shadow = ShadowSampler("m", None, rate=1.0, num_layers=30)
    shadow.track("a", [1], SamplingParams())
    assert shadow.rate == 0.0 and not shadow._history
