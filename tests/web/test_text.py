"""How the pages show text: breakable model names, Markdown, and the params that differ from the defaults."""

from __future__ import annotations

from helix_api.web.text import breakable, changed_params, markdown


def test_a_model_name_may_break_after_a_slash_and_before_a_dash():
    assert breakable("mistralai/Mistral-7B-v0.1") == "mistralai/<wbr>Mistral<wbr>-7B<wbr>-v0.1"
    assert breakable("/srv/.helix-data/tiny_sdxl") == "/<wbr>srv/<wbr>.helix<wbr>-data/<wbr>tiny<wbr>_sdxl"
    assert breakable("<b>&") == "&lt;b&gt;&amp;"  # escaped like any text
    assert breakable(None) == ""


def test_markdown_renders_code_and_escapes_html():
    shown = markdown("a `chat.completion` <b>x</b>", inline=True)
    assert shown == "a <code>chat.completion</code> &lt;b&gt;x&lt;/b&gt;"
    assert markdown("one\n\ntwo") == "<p>one</p>\n<p>two</p>"
    assert markdown("[x](javascript:alert(1))", inline=True) == "[x](javascript:alert(1))"  # no such link


def test_a_message_shows_only_the_params_that_differ_from_the_defaults():
    sent = {"max_new_tokens": 256, "do_sample": True, "temperature": 1, "seed": 0, "stop": ["\n"]}
    assert changed_params(sent, "text") == {"do_sample": True, "seed": 0, "stop": ["\n"]}
    assert changed_params({"num_inference_steps": 30, "width": 512}, "image") == {"width": 512}
    assert changed_params({"max_new_tokens": 256}, "text") == {}
    assert changed_params(None, "text") == {}
