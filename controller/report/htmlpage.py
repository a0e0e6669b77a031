"""``-o html``: one self-contained page a person would rather look at than read.

Why this shape: the page is a CI artifact opened from a job's artifact list
or a mail attachment, often offline. So everything is inline (CSS and SVG, no
script, no external font or image) and it is readable top-down: a verdict
line, the trench as a picture (gateway -> LB/FEs -> proxies -> targets, broken
pods and links red, warnings amber, healthy green), then the findings grouped
by pod with their evidence and hints. Info findings and healthy pods are
folded away (``<details>``, no JavaScript needed).
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

from meridio_debug.controller.analysis import Finding, Severity
from meridio_debug.controller.report import topology
from meridio_debug.controller.report._model import (
    Report,
    by_pod,
    evidence_lines,
    plural,
)

_SEV_CLASS = {Severity.ERROR: "error", Severity.WARNING: "warning", Severity.INFO: "info"}
_STROKE = {"error": "#c5221f", "warning": "#e37400", "ok": "#1e8e3e", "none": "#9aa0a6"}
_FILL = {"error": "#fce8e6", "warning": "#fef7e0", "ok": "#e6f4ea", "none": "#f1f3f4"}

CSS = """
:root { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #202124; }
body { margin: 0; background: #f8f9fa; }
main { max-width: 1200px; margin: 0 auto; padding: 24px 32px 48px; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 17px; margin: 32px 0 12px; }
.sub { color: #5f6368; font-size: 13px; }
.verdict { display: flex; gap: 10px; align-items: center; margin: 16px 0 8px; flex-wrap: wrap; }
.pill { display: inline-block; border-radius: 12px; padding: 2px 10px; font-size: 13px;
        font-weight: 600; border: 1px solid transparent; white-space: nowrap; }
.pill.error { background: #fce8e6; color: #a50e0e; border-color: #f6aea9; }
.pill.warning { background: #fef7e0; color: #8a4b00; border-color: #fdd663; }
.pill.info { background: #e8f0fe; color: #174ea6; border-color: #aecbfa; }
.pill.ok { background: #e6f4ea; color: #0d652d; border-color: #a8dab5; }
.pill.big { font-size: 15px; padding: 4px 14px; }
.card { background: #fff; border: 1px solid #dadce0; border-radius: 8px; padding: 16px 20px;
        margin: 12px 0; }
.card.error { border-left: 5px solid #c5221f; }
.card.warning { border-left: 5px solid #e37400; }
.card.ok { border-left: 5px solid #1e8e3e; }
.pod-head { display: flex; gap: 12px; align-items: baseline; }
.pod-head b { font-size: 16px; }
.role { color: #5f6368; font-size: 13px; }
table { border-collapse: collapse; width: 100%; margin-top: 10px; font-size: 13.5px; }
th { text-align: left; color: #5f6368; font-weight: 600; border-bottom: 1px solid #dadce0;
     padding: 6px 8px; }
td { vertical-align: top; border-bottom: 1px solid #f1f3f4; padding: 8px; }
td.code { font-family: ui-monospace, Menlo, Consolas, monospace; white-space: nowrap; }
.evidence { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12px;
            color: #3c4043; background: #f8f9fa; border-radius: 4px; padding: 6px 8px;
            margin-top: 6px; white-space: pre-wrap; word-break: break-word; }
.hint { margin-top: 6px; color: #174ea6; }
.hint::before { content: "hint: "; font-weight: 600; }
details { margin-top: 8px; }
summary { cursor: pointer; color: #5f6368; font-size: 13px; }
.picture { background: #fff; border: 1px solid #dadce0; border-radius: 8px; padding: 8px;
           overflow-x: auto; }
.legend { display: flex; gap: 18px; font-size: 12.5px; color: #5f6368; margin: 8px 4px 0; }
.legend i { display: inline-block; width: 22px; height: 4px; vertical-align: middle;
            margin-right: 6px; border-radius: 2px; }
.healthy { color: #5f6368; font-size: 13.5px; }
footer { margin-top: 40px; color: #80868b; font-size: 12px; }
"""

COL_X = {"gateway": 20, "lb-fe": 300, "proxy": 600, "target": 900}
BOX_W = {"gateway": 180, "lb-fe": 200, "proxy": 200, "target": 200}
BOX_H = 62
ROW = 84
TOP = 44


def _state(sev: Severity | None, synthetic: bool = False) -> str:
    if synthetic:
        return "none"
    if sev is None:
        return "ok"
    return "error" if sev >= Severity.ERROR else "warning" if sev >= Severity.WARNING else "ok"


Pos = dict[str, tuple[float, float, str, float]]  # id -> x, y, role, box height


def _layout(topo: topology.Topology) -> tuple[Pos, float, bool]:
    """Targets grouped under their proxy; each proxy centred on its targets; LBs and gateway
    centred on the proxies. Many targets (a scaled trench) get compact one-line boxes."""
    columns = {role: topo.column(role) for role in topology.COLUMNS}
    compact = len(columns["target"]) > 8
    t_h, t_row = (30.0, 38.0) if compact else (float(BOX_H), float(ROW))
    proxy_of: dict[str, str] = {}
    for e in topo.edges:
        if e.b in {n.id for n in columns["target"]}:
            proxy_of.setdefault(e.b, e.a)
    pos: Pos = {}
    y = float(TOP)
    placed: set[str] = set()
    proxy_y: dict[str, float] = {}
    for proxy in columns["proxy"]:
        group = [t for t in columns["target"] if proxy_of.get(t.id) == proxy.id]
        start = y
        for t in group:
            pos[t.id] = (COL_X["target"], y, "target", t_h)
            placed.add(t.id)
            y += t_row
        if group:
            centre = (start + y - t_row + t_h) / 2
            y += t_row * 0.35  # a gap between nodes
        else:
            centre = y + BOX_H / 2
            y += ROW
        proxy_y[proxy.id] = max(centre - BOX_H / 2, TOP)
    for t in columns["target"]:
        if t.id not in placed:  # no proxy seen (unreachable target)
            pos[t.id] = (COL_X["target"], y, "target", t_h)
            y += t_row
    # proxies: at their groups' centres, pushed apart so boxes never overlap
    last = -1e9
    for proxy in columns["proxy"]:
        py = max(proxy_y[proxy.id], last + ROW)
        pos[proxy.id] = (COL_X["proxy"], py, "proxy", float(BOX_H))
        last = py
    bottom = max([TOP + ROW, y, *(p[1] + p[3] + 10 for p in pos.values())])
    for role in ("lb-fe", "gateway"):
        nodes = columns[role]
        span = len(nodes) * ROW
        start = max(TOP, TOP + (bottom - TOP - span) / 2)
        for i, n in enumerate(nodes):
            pos[n.id] = (COL_X[role], start + i * ROW, role, float(BOX_H))
    height = max(bottom, *(p[1] + p[3] for p in pos.values())) + 16
    return pos, height, compact


def _svg(topo: topology.Topology) -> str:
    pos, height, compact = _layout(topo)
    width = COL_X["target"] + BOX_W["target"] + 20
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="trench topology" '
        'font-family="system-ui, sans-serif">'
    ]
    for role, title in (
        ("gateway", "gateway"),
        ("lb-fe", "LB / FE"),
        ("proxy", "proxies (bridge0)"),
        ("target", "targets (TAPA)"),
    ):
        x = COL_X[role] + BOX_W[role] / 2
        out.append(
            f'<text x="{x}" y="22" text-anchor="middle" font-size="13" font-weight="600" '
            f'fill="#5f6368">{escape(title)}</text>'
        )
    # edges first, under the boxes; the broken ones last so they are on top
    order = {"ok": 0, "none": 0, "warning": 1, "error": 2}
    for e in sorted(topo.edges, key=lambda e: order[_state(e.severity)]):
        if e.a not in pos or e.b not in pos:
            continue
        ax, ay, arole, ah = pos[e.a]
        bx, by, _, bh = pos[e.b]
        x1, y1 = ax + BOX_W[arole], ay + ah / 2
        x2, y2 = bx, by + bh / 2
        mid = (x1 + x2) / 2
        st = _state(e.severity)
        width_px = 3.5 if st in ("error", "warning") else 2
        dash = ' stroke-dasharray="7 5"' if st == "error" else ""
        title = f"{e.a} -> {e.b}"
        if e.label:
            title += f" ({e.label})"
        if e.why:
            title += ": " + ", ".join(e.why)
        out.append(
            f'<path d="M{x1:.0f},{y1:.0f} C{mid:.0f},{y1:.0f} {mid:.0f},{y2:.0f} {x2:.0f},{y2:.0f}" '
            f'fill="none" stroke="{_STROKE[st]}" stroke-width="{width_px}"{dash} '
            f'opacity="{1 if st != "ok" else 0.55}"><title>{escape(title)}</title></path>'
        )
        if e.why:
            lx, ly = mid, (y1 + y2) / 2
            text = " ".join(e.why)
            w = 7.2 * len(text) + 12
            out.append(
                f'<rect x="{lx - w / 2:.0f}" y="{ly - 10:.0f}" width="{w:.0f}" height="19" rx="9" '
                f'fill="#fff" stroke="{_STROKE[st]}" stroke-width="1.2"/>'
                f'<text x="{lx:.0f}" y="{ly + 4:.0f}" text-anchor="middle" font-size="11" '
                f'font-weight="600" fill="{_STROKE[st]}">{escape(text)}</text>'
            )
    for n in topo.nodes:
        if n.id not in pos:
            continue
        x, y, role, h = pos[n.id]
        st = _state(n.severity, n.synthetic)
        w = BOX_W[role]
        one_line = compact and role == "target"
        dash = ' stroke-dasharray="6 4"' if n.unreachable or n.synthetic else ""
        tip = n.label + (" (unreachable)" if n.unreachable else "")
        out.append(
            f'<g><title>{escape(tip)}</title><rect x="{x}" y="{y}" width="{w}" height="{h}" '
            f'rx="10" fill="{_FILL[st]}" stroke="{_STROKE[st]}" stroke-width="2"{dash}/>'
        )
        out.append(
            f'<text x="{x + 12}" y="{y + (20 if one_line else 22)}" font-size="{13 if one_line else 14}" '
            f'font-weight="700" fill="#202124">{escape(n.label)}</text>'
        )
        badge = ""
        if n.unreachable:
            badge = "unreachable"
        elif n.counts[0] or n.counts[1]:
            parts = []
            if n.counts[0]:
                parts.append(f"{n.counts[0]}E")
            if n.counts[1]:
                parts.append(f"{n.counts[1]}W")
            badge = " ".join(parts)
        if badge:
            bw = 7.5 * len(badge) + 12
            out.append(
                f'<rect x="{x + w - bw - 8:.0f}" y="{y + 8}" width="{bw:.0f}" height="18" rx="9" '
                f'fill="{_STROKE[st]}"/><text x="{x + w - 8 - bw / 2:.0f}" y="{y + 21}" '
                f'text-anchor="middle" font-size="11" font-weight="700" fill="#fff">'
                f"{escape(badge)}</text>"
            )
        if one_line and n.detail:
            out.append(
                f'<text x="{x + 96}" y="{y + 19}" font-size="10.5" fill="#5f6368" '
                f'font-family="ui-monospace, Menlo, monospace">{escape(n.detail[0])}</text>'
            )
        for i, line in enumerate(() if one_line else n.detail[:2]):
            out.append(
                f'<text x="{x + 12}" y="{y + 40 + i * 14}" font-size="11" fill="#5f6368" '
                f'font-family="ui-monospace, Menlo, monospace">{escape(line)}</text>'
            )
        out.append("</g>")
    out.append("</svg>")
    return "".join(out)


def _finding_row(f: Finding) -> str:
    cls = _SEV_CLASS[f.severity]
    ev = "\n".join(evidence_lines(dict(f.evidence)))
    others = [p for p in f.pods if p != f.pod]
    also = f'<div class="sub">also involves: {escape(", ".join(others))}</div>' if others else ""
    hint = f'<div class="hint">{escape(f.hint)}</div>' if f.hint else ""
    evidence = f'<div class="evidence">{escape(ev)}</div>' if ev else ""
    return (
        f'<tr><td><span class="pill {cls}">{f.severity.label}</span></td>'
        f'<td class="code">{escape(f.code)}</td>'
        f"<td><div>{escape(f.summary)}</div>{evidence}{also}{hint}</td></tr>"
    )


def _table(findings: Sequence[Finding]) -> str:
    rows = "".join(_finding_row(f) for f in findings)
    return (
        '<table><thead><tr><th style="width:90px">severity</th><th style="width:80px">code</th>'
        f"<th>finding, evidence and hint</th></tr></thead><tbody>{rows}</tbody></table>"
    )


def _pods(report: Report) -> str:
    grouped = by_pod(report.result.findings)
    cards: list[str] = []
    healthy: list[str] = []
    for pod in report.pod_names():
        fs = grouped.get(pod, [])
        serious = [f for f in fs if f.severity >= Severity.WARNING]
        info = [f for f in fs if f.severity < Severity.WARNING]
        result = report.state.pod(pod)
        unreachable = result is not None and not result.reachable
        if not serious and not unreachable:
            healthy.append(pod)
            continue
        worst = max(f.severity for f in serious) if serious else Severity.ERROR
        cls = _SEV_CLASS[worst]
        counts = []
        for sev in (Severity.ERROR, Severity.WARNING):
            n = sum(1 for f in serious if f.severity == sev)
            if n:
                counts.append(f'<span class="pill {_SEV_CLASS[sev]}">{plural(n, sev.label)}</span>')
        if unreachable and result is not None:
            counts.insert(0, f'<span class="pill error">unreachable: {escape(result.error)}</span>')
        body = _table(serious) if serious else ""
        if info:
            body += f"<details><summary>{plural(len(info), 'info finding')}</summary>{_table(info)}</details>"
        cards.append(
            f'<section class="card {cls}"><div class="pod-head"><b>{escape(pod or "(trench)")}</b>'
            f'<span class="role">{escape(report.role_of(pod))}</span>{"".join(counts)}</div>{body}</section>'
        )
    if healthy:
        info_all = [f for p in healthy for f in grouped.get(p, [])]
        folded = ""
        if info_all:
            folded = (
                f"<details><summary>{plural(len(info_all), 'info finding')} on healthy pods"
                f"</summary>{_table(info_all)}</details>"
            )
        cards.append(
            f'<section class="card ok"><div class="pod-head"><b>healthy</b>'
            f'<span class="pill ok">{plural(len(healthy), "pod")}</span></div>'
            f'<p class="healthy">{escape(", ".join(healthy))}: no warning or error.</p>{folded}</section>'
        )
    return "".join(cards)


def render(report: Report) -> str:
    result = report.result
    counts = result.summary()
    topo = topology.build(report.state, result.findings)
    if report.fail_on is None:
        verdict = '<span class="pill info big">report only (--fail-on never)</span>'
    elif report.failed:
        verdict = (
            f'<span class="pill error big">FAIL: findings at or above {report.fail_on.label}</span>'
        )
    else:
        verdict = (
            f'<span class="pill ok big">PASS: nothing at or above {report.fail_on.label}</span>'
        )
    pills = "".join(
        f'<span class="pill {cls}">{plural(counts.get(key, 0), key)}</span>'
        for key, cls in (("error", "error"), ("warning", "warning"), ("info", "info"))
    ).replace("infos", "info")
    suppressed = (
        f'<span class="sub">{plural(len(result.suppressed), "finding")} suppressed</span>'
        if result.suppressed
        else ""
    )
    pods = len(report.state.pods)
    sub = (
        f"{escape(report.source or 'trench')} &middot; {escape(report.created or '')} UTC &middot; "
        f"{plural(pods, 'pod')}, {plural(len(result.runs), 'check')} run"
    )
    legend = (
        '<div class="legend"><span><i style="background:#1e8e3e"></i>healthy</span>'
        '<span><i style="background:#e37400"></i>warning</span>'
        '<span><i style="background:#c5221f"></i>error (dashed: broken link or unreachable pod)</span>'
        "<span>labels on links: the codes that concern them</span></div>"
    )
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>meridio-debug analysis: {escape(report.source)}</title><style>{CSS}</style></head>"
        f"<body><main><h1>Meridio trench analysis</h1><div class='sub'>{sub}</div>"
        f"<div class='verdict'>{verdict}{pills}{suppressed}</div>"
        f"<h2>Trench</h2><div class='picture'>{_svg(topo)}</div>{legend}"
        f"<h2>Findings by pod</h2>{_pods(report)}"
        f"<footer>meridio-debug {escape(report.tool_version)} &middot; host {escape(report.hostname)}"
        " &middot; codes: findings catalog (MDB0xx access, 1xx LB/FE, 2xx proxy, 3xx target,"
        " 4xx across pods)</footer></main></body></html>\n"
    )
