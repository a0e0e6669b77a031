"""Reports as their readers see them: the JSON contract, JUnit read by real consumers, the table.

The trench is the healthy lab model (lab_fixture) broken in three places:
an LB table emptied (error), a proxy sysctl off (warning), a target
unreachable (error, and its other checks skipped).
"""

from __future__ import annotations

import dataclasses
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import xmlschema
from junitparser import Failure, JUnitXml, Skipped
from lab_fixture import build_lab, drop, snap, with_pod

from meridio_debug.controller.analysis import CHECKS, Severity, analyze
from meridio_debug.controller.model import TrenchState
from meridio_debug.controller.report import Report, format_for_path, render

DATA = Path(__file__).parent / "data"
SCHEMA = xmlschema.XMLSchema(str(DATA / "junit" / "JUnit.xsd"))


def broken_trench() -> TrenchState:
    state = build_lab()
    state = dataclasses.replace(state, pods=tuple(p for p in state.pods if p.role != "gateway"))
    lb = snap(state, "lb-fe-a")
    table = next(r.table for r in lb.routes if r.family == 4 and r.gateway == "172.16.1.6")
    state = with_pod(
        state,
        "lb-fe-a",
        lambda s: dataclasses.replace(
            s, routes=drop(s.routes, lambda r: r.table == table and r.family == 4)
        ),
    )
    state = with_pod(
        state,
        "proxy-a",
        lambda s: dataclasses.replace(s, sysctls={**s.sysctls, "net.ipv4.conf.all.rp_filter": "1"}),
    )
    pods = tuple(
        dataclasses.replace(p, snapshot=None, error="agent did not start")
        if p.pod == "target-b2"
        else p
        for p in state.pods
    )
    return dataclasses.replace(state, pods=pods)


def make_report(
    fail_on: Severity | None = Severity.ERROR, suppress: tuple[str, ...] = ()
) -> Report:
    state = broken_trench()
    return Report(
        result=analyze(state, suppress=suppress),
        state=state,
        fail_on=fail_on,
        source="lab mdl-",
        created="2026-11-20T23:30:00",
        hostname="ci-7",
        tool_version="0.1.0",
    )


def codes(doc: dict[str, object], pod: str) -> set[str]:
    findings = doc["findings"]
    assert isinstance(findings, list)
    return {f["code"] for f in findings if f["pod"] == pod and f["severity"] != "info"}


# --------------------------------------------------------------------------- json


def test_json_follows_the_catalog_output_contract() -> None:
    doc = json.loads(render("json", make_report()))
    assert doc["summary"] == {
        "error": sum(f["severity"] == "error" for f in doc["findings"]),
        "warning": sum(f["severity"] == "warning" for f in doc["findings"]),
        "info": sum(f["severity"] == "info" for f in doc["findings"]),
    }
    for f in doc["findings"]:
        assert {"code", "severity", "pod", "role", "summary", "evidence", "hint"} <= set(f)
        assert isinstance(f["evidence"], dict)
    assert "MDB110" in codes(doc, "lb-fe-a")
    assert codes(doc, "proxy-a") == {"MDB208"}
    assert "MDB002" in codes(doc, "target-b2")
    assert doc["failed"] is True


def test_json_checks_run_says_what_ran_was_skipped_and_found() -> None:
    doc = json.loads(render("json", make_report()))
    runs = {(r["code"], r["pod"]): r for r in doc["checks_run"]}
    assert runs[("MDB110", "lb-fe-a")]["status"] == "findings"
    assert runs[("MDB110", "lb-fe-b")]["status"] == "ok"
    assert runs[("MDB301", "target-b2")]["status"] == "skipped"
    assert "unreachable" in runs[("MDB301", "target-b2")]["skipped_reason"]
    # every finding is reachable from checks_run
    for f in doc["findings"]:
        assert (f["code"], f["pod"]) in runs


def test_suppressed_findings_leave_findings_and_summary() -> None:
    doc = json.loads(render("json", make_report(suppress=("MDB208=proxy-*",))))
    assert codes(doc, "proxy-a") == set()
    assert [f["code"] for f in doc["suppressed"]] == ["MDB208"]
    assert doc["summary"]["warning"] == 0


# --------------------------------------------------------------------------- junit


def test_junit_validates_against_the_ant_junit_schema() -> None:
    for fail_on in (Severity.ERROR, Severity.WARNING, None):
        SCHEMA.validate(render("junit", make_report(fail_on)))


def test_junit_is_read_by_junitparser(tmp_path: Path) -> None:
    report = make_report()
    path = tmp_path / "report.xml"
    path.write_text(render("junit", report))
    xml = JUnitXml.fromfile(str(path))
    suites = {s.name: s for s in xml}
    assert list(suites) == [p.pod for p in report.state.pods]
    # one testcase per check that ran (or was skipped) for that pod
    for name, suite in suites.items():
        if name == "target-b2":
            continue  # unreachable: every target check is listed as skipped
        expected = {r.code for r in report.result.runs if r.pod == name}
        assert {c.name.split()[0] for c in suite} == expected
        assert suite.tests == len(expected)
    failed = {
        (suite.name, case.name.split()[0])
        for suite in xml
        for case in suite
        if any(isinstance(r, Failure) for r in case.result)
    }
    errors = {(f.pod, f.code) for f in report.result.findings if f.severity == Severity.ERROR}
    assert failed == errors
    assert ("proxy-a", "MDB208") not in failed  # a warning fails only with --fail-on warning
    skipped = {
        case.name.split()[0]
        for case in suites["target-b2"]
        if any(isinstance(r, Skipped) for r in case.result)
    }
    assert "MDB301" in skipped and "MDB002" not in skipped
    assert suites["lb-fe-a"].failures >= 1


def test_junit_warning_fails_with_fail_on_warning() -> None:
    xml = ET.fromstring(render("junit", make_report(Severity.WARNING)))
    proxy = next(s for s in xml if s.get("name") == "proxy-a")
    case = next(c for c in proxy if (c.get("name") or "").startswith("MDB208"))
    failure = case.find("failure")
    assert failure is not None
    assert "rp_filter" in (failure.text or "")
    assert proxy.get("failures") == "1"


def test_junit_lists_non_failing_findings_in_system_out() -> None:
    xml = ET.fromstring(render("junit", make_report()))
    proxy = next(s for s in xml if s.get("name") == "proxy-a")
    assert "MDB208" in (proxy.findtext("system-out") or "")


# --------------------------------------------------------------------------- table / html


def test_table_groups_by_pod_and_has_colour_only_when_asked() -> None:
    report = make_report()
    plain = render("table", report)
    assert "\x1b[" not in plain
    assert "\x1b[" in render("table", report, color=True)
    lines = plain.splitlines()
    lb = next(i for i, line in enumerate(lines) if line.startswith("lb-fe-a"))
    lb_b = next(i for i, line in enumerate(lines) if line.startswith("lb-fe-b"))
    block = "\n".join(lines[lb:lb_b])
    assert "MDB110" in block and "hint:" in block
    assert "ok" in lines[lb_b]
    assert "FAIL" in lines[-1]


def test_html_is_one_self_contained_file() -> None:
    page = render("html", make_report())
    assert page.lstrip().lower().startswith("<!doctype html>")
    assert "<script" not in page.lower()
    for attr in ("src=", "href=", "@import", "url("):
        assert attr not in page.lower().replace('href="#', "")
    assert "MDB110" in page and "lb-fe-a" in page


@pytest.mark.parametrize(
    ("path", "fmt"),
    [
        ("r.json", "json"),
        ("out/R.XML", "junit"),
        ("r.html", "html"),
        ("r.txt", "table"),
        ("r", None),
    ],
)
def test_report_format_follows_the_extension(path: str, fmt: str | None) -> None:
    assert format_for_path(path) == fmt


def test_every_lb_check_is_a_testcase_of_an_lb_suite() -> None:
    xml = ET.fromstring(render("junit", make_report()))
    lb = next(s for s in xml if s.get("name") == "lb-fe-b")
    names = {c.get("name") for c in lb.iter("testcase")}
    for check in CHECKS:
        if check.roles == () or "lb-fe" in check.roles:
            assert f"{check.code} {check.title}" in names


def test_the_picture_links_pods_by_subnet_and_colours_the_broken_path() -> None:
    from meridio_debug.controller.report import topology

    report = make_report()
    topo = topology.build(report.state, report.result.findings)
    ids = {n.id for n in topo.nodes}
    assert {"gateway", "lb-fe-a", "lb-fe-b", "proxy-a", "proxy-b", "target-a1"} <= ids
    pairs = {(e.a, e.b): e for e in topo.edges}
    # every LB reaches every proxy (one conduit per node), each target its node's proxy
    for lb in ("lb-fe-a", "lb-fe-b"):
        for proxy in ("proxy-a", "proxy-b"):
            assert (lb, proxy) in pairs
    assert ("proxy-a", "target-a1") in pairs and ("proxy-b", "target-b1") in pairs
    assert ("proxy-a", "target-b1") not in pairs
    nodes = {n.id: n for n in topo.nodes}
    assert nodes["lb-fe-a"].severity == Severity.ERROR  # MDB110
    assert nodes["proxy-a"].severity == Severity.WARNING  # MDB208
    assert nodes["target-b2"].unreachable
    assert nodes["lb-fe-b"].severity is None
    assert pairs[("gateway", "lb-fe-b")].severity is None
    # the emptied table routed to target-a1: its path from lb-fe-a is red, lb-fe-b's is not
    assert pairs[("lb-fe-a", "proxy-a")].severity == Severity.ERROR
    assert pairs[("lb-fe-b", "proxy-a")].severity is None
    assert pairs[("proxy-a", "target-a1")].severity == Severity.ERROR
    assert pairs[("proxy-a", "target-a2")].severity is None


def test_html_draws_every_pod_and_the_codes_on_broken_links() -> None:
    page = render("html", make_report())
    assert page.count("<svg") == 1
    for pod in ("lb-fe-a", "lb-fe-b", "proxy-a", "proxy-b", "target-a1", "target-b2"):
        assert f">{pod}</text>" in page
    assert "FAIL" in page and "unreachable" in page
    assert "rp_filter" in page  # evidence of the warning
