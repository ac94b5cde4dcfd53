"""bench.sse: chunked framing stripped however the bytes arrive, and event blocks split out."""

from __future__ import annotations

from bench import sse


def _chunked(*payloads: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in payloads) + b"0\r\n\r\n"


EVENTS = [b"retry: 1000\n\n", b"id: 12.345\nevent: token\ndata: {\"text\": \"a\\r\\nb\"}\n\n",
          b": keepalive\n\n", b"id: 13\nevent: state\ndata: {\"state\": \"complete\"}\n\n"]


def test_dechunker_gives_the_payload_whatever_the_pieces():
    body = _chunked(*EVENTS)
    for size in (1, 2, 3, 7, 64, len(body)):
        dechunk = sse.Dechunker()
        out = b"".join(dechunk.feed(body[i:i + size]) for i in range(0, len(body), size))
        assert out == b"".join(EVENTS), size
        assert dechunk.done


def test_dechunker_ignores_chunk_extensions_and_stops_at_the_last_chunk():
    dechunk = sse.Dechunker()
    assert dechunk.feed(b"3;name=value\r\nabc\r\n0\r\n\r\n") == b"abc"
    assert dechunk.done


def test_stream_feed_splits_event_blocks_across_reads():
    stream = sse.Stream("127.0.0.1", 1, "/", {}, 1.0)
    stream._dechunk = sse.Dechunker()
    body = _chunked(*EVENTS)
    blocks = stream.feed(body[:40]) + stream.feed(body[40:])
    assert blocks == [e.removesuffix(b"\n\n") for e in EVENTS]
    assert stream.ended


def test_fields_keep_the_id_opaque():
    assert sse.fields(EVENTS[1].strip()) == (b"12.345", b"token", b'{"text": "a\\r\\nb"}')
    assert sse.fields(b": keepalive") == (None, None, None)
    assert sse.fields(b"data: one\ndata: two") == (None, None, b"one\ntwo")
