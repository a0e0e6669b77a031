"""Decorators that turn small relation rules into registered Checks.

Why: a rule should only say what is wrong with one pod (or across pods). The
boilerplate -- iterate the pods of the right role, skip pods whose needed
sections are missing (so missing data never becomes a false finding), build
the shared indexes once, stamp code/severity/pod on every finding -- lives
here once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace

from meridio_debug.controller.analysis._view import PodView, TrenchView, trench_view
from meridio_debug.controller.analysis.findings import Check, Issue, Severity
from meridio_debug.controller.model import Role, TrenchState

PodRule = Callable[[PodView, TrenchView], Iterable[Issue]]
TrenchRule = Callable[[TrenchView], Iterable[Issue]]


def pod_check(
    code: str,
    severity: Severity,
    title: str,
    *,
    roles: tuple[Role, ...],
    needs: tuple[str, ...] = (),
) -> Callable[[PodRule], Check]:
    """Register ``rule(pod, trench)`` as a per-pod check for pods of ``roles``."""

    def wrap(rule: PodRule) -> Check:
        def run(state: TrenchState) -> Iterator[Issue]:
            view = trench_view(state)
            for result in state.pods:
                if not check.applies_to(result) or check.skip_reason(result):
                    continue
                pod = view.by_name.get(result.pod)
                if pod is None:
                    continue
                for issue in rule(pod, view):
                    yield replace(issue, pod=pod.name, pods=issue.pods or (pod.name,))

        run.__doc__ = rule.__doc__
        check = Check(
            code=code,
            severity=severity,
            title=title,
            roles=roles,
            scope="pod",
            run=run,
            needs=needs,
        )
        return check

    return wrap


def trench_check(
    code: str, severity: Severity, title: str, *, roles: tuple[Role, ...]
) -> Callable[[TrenchRule], Check]:
    """Register ``rule(trench)`` as a cross-pod check; each Issue names its pod."""

    def wrap(rule: TrenchRule) -> Check:
        def run(state: TrenchState) -> Iterator[Issue]:
            yield from rule(trench_view(state))

        run.__doc__ = rule.__doc__
        return Check(
            code=code, severity=severity, title=title, roles=roles, scope="trench", run=run
        )

    return wrap
