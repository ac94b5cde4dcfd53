"""Streaming: runners' events taken in, live replies, the token bus, and following a session."""
