"""The access gate's own behaviour, outside a server: its refusal log stays readable."""

from __future__ import annotations

import logging

import pytest
from agentcg.access import parse_access
from agentcg.gate import AccessGate, bearer_token


def test_a_repeated_refusal_is_logged_once_then_with_a_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    gate = AccessGate(parse_access(""))
    with caplog.at_level(logging.WARNING, logger="agentcg.gate"):
        for _ in range(3):
            gate._log_refusal("/agentcg.v1.Broker/Reserve: an unknown token")
        gate._log_refusal("/agentcg.v1.Broker/Release: an unknown token")
        assert [r.getMessage() for r in caplog.records] == [
            "refused /agentcg.v1.Broker/Reserve: an unknown token",
            "refused /agentcg.v1.Broker/Release: an unknown token",
        ]
        gate.LOG_EVERY_S = 0.0  # the interval has passed
        gate._log_refusal("/agentcg.v1.Broker/Reserve: an unknown token")
    assert caplog.records[-1].getMessage() == (
        "refused /agentcg.v1.Broker/Reserve: an unknown token (and 2 more like it)"
    )


@pytest.mark.parametrize(
    ("metadata", "token"),
    [
        ((("authorization", "Bearer abc"),), "abc"),
        ((("x-other", "1"), ("authorization", "Bearer  abc ")), "abc"),
        ((("authorization", "Basic abc"),), ""),
        ((), ""),
        (None, ""),
    ],
)
def test_the_bearer_token_is_read_from_the_metadata(metadata: object, token: str) -> None:
    assert bearer_token(metadata) == token
