"""The session page shows a reply asked for as JSON indented, and a reply of tool calls call by call."""

from __future__ import annotations

import html
import re

from sqlalchemy import select

from helix_api import models
from helix_api.models import Interaction
from helix_api.web.replies import asks_for_json, pretty_json
from tests.web.conftest import submit
from tests.web.test_views import finish, new_chat, session_id_of, tasks


def reply_of(page: str) -> str:
    """The HTML of the page's last reply."""
    return page.split('<li class="turn reply"')[-1].split('<form method="post"')[0]


def unescaped(pattern: str, page: str) -> str:
    found = re.search(pattern, page, re.S)
    assert found, page[-3000:]
    return html.unescape(found.group(1))


def test_params_ask_for_json_with_a_json_response_format_only():
    assert asks_for_json({"response_format": {"type": "json_object"}})
    assert asks_for_json({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}})
    assert not asks_for_json({"response_format": {"type": "text"}})
    assert not asks_for_json({"response_format": "json_object"}) and not asks_for_json({}) and not asks_for_json(None)


def test_json_text_is_indented_and_anything_else_is_left_as_it_is():
    assert pretty_json('{"city":"Paris","days":[1,2],"note":"é"}') == (
        '{\n  "city": "Paris",\n  "days": [\n    1,\n    2\n  ],\n  "note": "é"\n}')
    assert pretty_json('{"city": "Par') == '{"city": "Par'  # a reply cut short by max_new_tokens
    assert pretty_json("sunny") == "sunny" and pretty_json("") == "" and pretty_json(None) == ""


def test_a_reply_asked_for_as_json_from_the_form_is_shown_indented(browser, client, runner, db):
    page = browser.get("/new/chat").data.decode()
    assert 'type="checkbox" name="response_format" value="json_object"' in page and "Reply as JSON" in page
    session_id = session_id_of(new_chat(browser, "Weather as JSON", response_format="json_object"))
    [task] = tasks(db)
    assert task.params == {"response_format": {"type": "json_object"}}
    finish(client, runner, text='{"city":"<b>Paris</b>","days":[1,2]}')

    page = browser.get(f"/sessions/{session_id}").data.decode()

    reply = reply_of(page)
    assert 'data-format="json"' in reply and "<b>" not in reply  # escaped like any text
    assert unescaped(r'<pre class="output json">(.*?)</pre>', reply) == (
        '{\n  "city": "<b>Paris</b>",\n  "days": [\n    1,\n    2\n  ]\n}')
    assert 'name="response_format" value="json_object"\n         >' in page  # the next message asks anew
    path = f"/sessions/{session_id}"
    assert submit(browser, f"{path}/messages", {"message": "And Rome?", "response_format": "json_object"},
                  page=path).status_code == 302
    assert tasks(db)[-1].params == {"response_format": {"type": "json_object"}}


def test_a_json_reply_that_does_not_parse_is_shown_as_it_came(browser, client, runner):
    session_id = session_id_of(new_chat(browser, "Weather as JSON", response_format="json_object"))
    finish(client, runner, text='{"city": "Par')

    reply = reply_of(browser.get(f"/sessions/{session_id}").data.decode())

    assert unescaped(r'<pre class="output json">(.*?)</pre>', reply) == '{"city": "Par'


def test_a_plain_reply_is_not_shown_as_json(browser, client, runner):
    session_id = session_id_of(new_chat(browser, "Hello"))
    finish(client, runner, text='{"a": 1}')

    reply = reply_of(browser.get(f"/sessions/{session_id}").data.decode())

    assert '<div class="output">{&#34;a&#34;: 1}</div>' in reply and "data-format" not in reply


def test_the_json_choice_takes_only_its_value(browser, db):
    response = new_chat(browser, "Hi", response_format="yes please")

    assert response.status_code == 400
    assert b'data-field="params.response_format">Response format must be one of json_object' in response.data
    assert tasks(db) == []


def _tool_call_reply(browser, client, runner, db) -> tuple[int, int]:
    """A chat whose reply is two tool calls, the first with its result, stored as rows of tool_calls."""
    session_id = session_id_of(new_chat(browser, "Weather in Paris?"))
    finish(client, runner, text="")
    reply_id = browser.get(f"/sessions/{session_id}/state").json["interactions"][-1]["id"]
    calls = [("call_1_0", "get_weather", '{"city":"Paris","unit":"c"}', '{"temp": 21}'),
             ("call_1_1", "<script>alert(1)</script>", "not json", None)]
    with db.orm_write() as s:
        for position, (call_id, name, arguments, result) in enumerate(calls):
            s.add(models.ToolCall(session_id=session_id, interaction_id=reply_id, position=position,
                                  call_id=call_id, name=name, arguments=arguments, result=result))
    return session_id, reply_id


def test_a_reply_of_tool_calls_shows_each_name_arguments_and_result(browser, client, runner, db):
    session_id, _ = _tool_call_reply(browser, client, runner, db)

    reply = reply_of(browser.get(f"/sessions/{session_id}").data.decode())

    first, second = reply.split('<li class="tool-call"')[1:]
    assert 'data-call-id="call_1_0"' in first and '<code class="tool-name">get_weather</code>' in first
    assert unescaped(r'<pre class="arguments">(.*?)</pre>', first) == '{\n  "city": "Paris",\n  "unit": "c"\n}'
    assert unescaped(r'<pre class="result">(.*?)</pre>', first) == '{\n  "temp": 21\n}'
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in second and "<script>alert" not in second
    assert unescaped(r'<pre class="arguments">(.*?)</pre>', second) == "not json"
    assert 'class="result"' not in second  # no result sent back yet


def test_the_pages_script_reads_the_tool_calls_from_the_state_twin(browser, client, runner, db):
    session_id, reply_id = _tool_call_reply(browser, client, runner, db)

    state = browser.get(f"/sessions/{session_id}/state").json

    assert [c["name"] for c in state["interactions"][-1]["tool_calls"]] == ["get_weather", "<script>alert(1)</script>"]
    assert state["interactions"][0]["tool_calls"] == []


def test_tool_call_rows_are_shown_under_their_reply(browser, client, runner, db):
    session_id = session_id_of(new_chat(browser, "Weather in Paris?"))
    finish(client, runner, text="")
    with db.orm_write() as s:
        reply_id = s.scalars(select(Interaction.id).where(Interaction.session_id == session_id)
                             .order_by(Interaction.id.desc())).first()
        for position, name in ((1, "get_time"), (0, "get_weather")):
            s.add(models.ToolCall(session_id=session_id, interaction_id=reply_id, position=position,
                                  call_id=f"call_x_{position}", name=name, arguments='{"city":"Paris"}',
                                  result="21 C" if position == 0 else None))

    reply = reply_of(browser.get(f"/sessions/{session_id}").data.decode())

    assert re.findall(r'<code class="tool-name">(\w+)</code>', reply) == ["get_weather", "get_time"]
    assert unescaped(r'<pre class="result">(.*?)</pre>', reply) == "21 C"
