"""Two API replicas over one PostgreSQL with a Redis bus: tokens posted to one reach a follower on the other."""

from __future__ import annotations

import uuid

import pytest

from tests.e2e.client import create_session, echo_of, session_events, wait_for_reply
from tests.e2e.test_streaming import LONG_MESSAGE, _complete, _has_words, _tokens

pytestmark = pytest.mark.slow

BUS_URL = "redis://127.0.0.1:6379/12"


@pytest.mark.timeout(120)
def test_a_follower_on_another_replica_sees_each_token_before_it_is_stored(api_server, runner_process, e2e_database):
    if not e2e_database.startswith("postgresql"):
        pytest.skip("replicas share a PostgreSQL")
    # Text reaches SQL only at the end, so what the follower sees mid-reply can only have come by the bus.
    bus = {"bus_url": BUS_URL, "bus_namespace": f"test-{uuid.uuid4().hex}", "flush_seconds": 60}
    posting = api_server(workers=1, **bus)
    following = api_server(workers=1, **bus)
    user = posting.user
    runner_process(posting, "steady")
    session = create_session(posting, user, LONG_MESSAGE, token_delay=0.03, token_progress=0)

    seen = session_events(following, user, session["id"], follow=True, until=_has_words(20))
    (stored,) = posting.sql("SELECT i.output FROM interactions i JOIN tasks t ON t.interaction_id = i.id "
                            "WHERE t.session_id = :s", s=session["id"])
    assert len(stored[0]) < len(_tokens(seen)), "the follower should have had tokens SQL does not hold yet"
    rest = session_events(following, user, session["id"], after=seen[-1]["id"], follow=True, until=_complete)
    reply = wait_for_reply(posting, user, session["id"], 60)
    assert _tokens(seen) + _tokens(rest) == reply["output"] == echo_of(LONG_MESSAGE)
