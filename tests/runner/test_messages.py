"""Claim replies become frozen messages."""

from __future__ import annotations

import dataclasses

import pytest

from runner.messages import Claim, Lease


def test_claim_from_json(claim_json):
    claim = Claim.from_json(claim_json(task_id=9, adapter="a1", files=["f"]))
    assert claim.task.id == 9 and claim.task.adapter == "a1" and claim.task.files == ["f"]
    assert claim.task.model_name == "mistralai/Mistral-7B-Instruct-v0.1"
    assert claim.lease == Lease(token="l_9", expires_at="2026-11-22T04:00:30+00:00", ttl_seconds=30,
                                heartbeat_seconds=10)
    with pytest.raises(dataclasses.FrozenInstanceError):
        claim.task.id = 1  # type: ignore[misc]


def test_lease_without_heartbeat_hint_renews_three_times_per_ttl():
    assert Lease.from_json({"token": "t", "ttl_seconds": 30}).heartbeat_seconds == 10
