"""Traffic-path tracing: where does a flow go through the trench, and where is it lost?

Pure, like analysis: snapshots (the domain model) and the kernels' FIB
answers in, the path out -- no gRPC, no clock, no I/O. The I/O layer that
gathers both is controller/services/trace.py; the command is ``meridio-debug
trace`` (controller/cli/trace.py). Public entry points::

    from meridio_debug.controller.trace import parse_flow, plan, trace

    flow = parse_flow("tcp 200.100.0.7:40000 -> 20.0.0.1:4000")
    queries = plan(state, flow)             # pod -> (RouteQuery, ...)
    result = trace(state, flow, answers)    # pod -> {query id: RouteAnswer}
    result.to_dict()                        # the JSON contract

The active trace's pure half (controller/trace/active.py) follows captured
packets across pods: ``correlate(flow, sightings, roles, static_result,
probe_run)`` -> ``ActiveResult``; its I/O is controller/services/active_trace.py.
"""

from meridio_debug.controller.trace.core import mark_choice, plan, trace
from meridio_debug.controller.trace.flow import FLOW_FORMS, Flow, FlowError, parse_flow
from meridio_debug.controller.trace.types import (
    Answers,
    Broken,
    Hop,
    RouteAnswer,
    RouteQuery,
    TracePath,
    TraceResult,
)

__all__ = [
    "FLOW_FORMS",
    "Answers",
    "Broken",
    "Flow",
    "FlowError",
    "Hop",
    "RouteAnswer",
    "RouteQuery",
    "TracePath",
    "TraceResult",
    "mark_choice",
    "parse_flow",
    "plan",
    "trace",
]
