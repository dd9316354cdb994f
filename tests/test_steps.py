"""The session's rules without sockets (``splitwire.steps``): what each side does with each event."""

from __future__ import annotations

import pytest

from splitwire.errors import SessionRewound, StepOrderError
from splitwire.steps import CloudSteps, EdgeSteps


def test_the_cloud_applies_the_next_step_replays_the_last_and_refuses_the_rest():
    steps = CloudSteps("s")
    assert steps.cached_reply(1) is None  # the next step: apply it
    for wrong in (0, 2, 5):
        with pytest.raises(StepOrderError, match="is at step 0; expected step 1"):
            steps.cached_reply(wrong)
    steps.applied(1, "d1", b"reply-1")
    assert steps.cached_reply(1).reply == b"reply-1"  # a resend: the exact reply, not applied again
    assert steps.cached_reply(2) is None
    with pytest.raises(StepOrderError):
        steps.applied(3, "d3", b"reply-3")
    steps.applied(2, "d2", b"reply-2")
    with pytest.raises(StepOrderError, match="expected step 3, got 1"):
        steps.cached_reply(1)  # only the last step is cached
    steps.check_checkpoint(2)
    with pytest.raises(StepOrderError, match="checkpoint of step 1 asked"):
        steps.check_checkpoint(1)


def test_an_edge_meets_the_cloud_where_it_is_or_one_step_behind_a_cached_reply():
    steps = CloudSteps("s", step=4)
    assert steps.meets(4) and not steps.meets(3)  # no reply cached (restored without one): rewind to 3
    steps = CloudSteps("s")
    for step in (1, 2, 3, 4):
        steps.applied(step, f"d{step}", b"r")
    assert steps.meets(4) and steps.meets(3)  # 3: the edge resends step 4, answered from the cache
    assert not steps.meets(2) and not steps.meets(5)


def test_an_edge_resends_only_where_the_resend_is_exact():
    steps = EdgeSteps("s")
    steps.welcomed(6)
    steps.applied(6)
    steps.welcomed(6)
    steps.check_resend(edge_step=6, accept=steps.train_accept(7))  # the cloud has not applied 7: resend
    steps.welcomed(7)
    steps.check_resend(edge_step=6, accept=steps.train_accept(7))  # it has: the cache answers the resend
    steps.welcomed(3)  # it came back from an older checkpoint
    with pytest.raises(SessionRewound, match="came back at step 3") as rewound:
        steps.check_resend(edge_step=6, accept=steps.train_accept(7))
    assert rewound.value.step == 3 and steps.step == 3
