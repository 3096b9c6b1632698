"""W3C trace context in agentcg's messages (agentcg.tracecontext): what is passed on, what is
not, and what a malformed value gives."""

from __future__ import annotations

import pytest
from agentcg.tracecontext import parent_context, traceparent
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
SPAN_ID = 0xB7AD6B7169203331
SAMPLED = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def _context(flags: int) -> object:
    span = NonRecordingSpan(
        SpanContext(TRACE_ID, SPAN_ID, is_remote=False, trace_flags=TraceFlags(flags))
    )
    return trace.set_span_in_context(span)


def test_a_sampled_span_is_passed_on() -> None:
    assert traceparent(_context(TraceFlags.SAMPLED)) == SAMPLED


def test_an_unsampled_span_is_not() -> None:
    # "This process exports nothing": passed on, it would stop a broker that exports.
    assert traceparent(_context(TraceFlags.DEFAULT)) == ""


def test_no_span_no_traceparent() -> None:
    assert traceparent() == ""


def test_parent_context_continues_the_trace() -> None:
    context = parent_context(SAMPLED)
    assert context is not None
    span = trace.get_current_span(context).get_span_context()
    assert (span.trace_id, span.span_id, span.is_remote) == (TRACE_ID, SPAN_ID, True)
    assert traceparent(context) == SAMPLED  # round trip


@pytest.mark.parametrize(
    "value",
    [
        "",
        "garbage",
        "00-00000000000000000000000000000000-b7ad6b7169203331-01",  # all-zero trace id
        "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",  # all-zero span id
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",  # no flags
    ],
)
def test_a_malformed_value_starts_no_trace(value: str) -> None:
    assert parent_context(value) is None
