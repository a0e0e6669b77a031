"""Trace output for people: a table for the terminal, one self-contained HTML page with an SVG.

Why an SVG drawn here (no JS, no external assets): a trace is attached to a
ticket or a CI artefact and must open anywhere, offline. The drawing is the
path as Meridio people picture it -- gateway, LB, proxy, target left to
right on top (forward), and back right to left underneath (return) -- with
the first broken hop in red and the hops after it greyed (never reached).
JSON is ``TraceResult.to_dict()`` (the contract); this module only renders.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Final

from meridio_debug.controller.trace.active import ActiveResult
from meridio_debug.controller.trace.types import Hop, TracePath, TraceResult

_ARROW: Final = {"forward": "→", "return": "←"}


def _status(path: TracePath) -> str:
    first = path.first_broken
    if first is None:
        maybe = path.maybe_broken
        if maybe is not None:
            code = f" [{maybe.code}]" if maybe.code else ""
            return f"uncertain: broken at {maybe.pod} ({maybe.direction}){code} if the kernel picks {maybe.via}"
        if path.degraded:
            return "degraded: " + ", ".join(_degraded_text(h) for h in path.degraded)
        return "whole"
    code = f" [{first.code}]" if first.code else ""
    return f"broken at {first.pod} ({first.direction}){code}"


def _degraded_text(hop: Hop) -> str:
    return f"{hop.pod} ({hop.direction}){f' [{hop.code}]' if hop.code else ''}"


def _state(hop: Hop) -> str:
    if not hop.ok:
        return "BROKEN"
    return "degraded" if hop.degraded else "ok"


def _why(hop: Hop) -> str:
    return f"[if via {hop.via}] {hop.reason}" if hop.via else hop.reason


def _verdict_text(result: TraceResult) -> str:
    broken = result.first_broken
    degraded = "; ".join(f"{_degraded_text(h)}: {h.reason}" for h in result.degraded)
    if broken is None:
        if degraded:
            return f"whole for this flow, DEGRADED for others at {degraded}"
        return "the path is whole, both directions"
    code = f" [{broken.code}]" if broken.code else ""
    head = "BROKEN" if broken.certain else "MAY BREAK (uncertain)"
    text = f"{head} at {broken.pod} ({broken.direction}){code}: {broken.reason}"
    if not broken.certain:
        text += " -- trace --active shows the kernel's pick"
    return text + (f"; also degraded at {degraded}" if degraded else "")


def render_table(result: TraceResult) -> str:
    """Hop by hop, the chosen path (or every candidate), then the verdict."""
    lines = [f"flow  {result.flow}"]
    lines.extend(f"note  {note}" for note in result.notes)
    chosen = result.chosen
    shown: Sequence[TracePath] = [chosen] if chosen is not None else result.paths
    for path in shown:
        flag = "chosen" if path.chosen else "candidate"
        lines.append("")
        lines.append(f"path to {path.target} ({flag}): {_status(path)}")
        rows = [("#", "DIR", "POD", "ROLE", "STATE", "CODE", "WHY")]
        for i, hop in enumerate(path.hops, 1):
            rows.append(
                (
                    str(i),
                    _ARROW[hop.direction],
                    hop.pod,
                    hop.role,
                    _state(hop),
                    hop.code or "",
                    _why(hop),
                )
            )
        widths = [max(len(r[c]) for r in rows) for c in range(6)]
        for row in rows:
            head = "  ".join(cell.ljust(widths[c]) for c, cell in enumerate(row[:6]))
            lines.append(f"  {head}  {row[6]}")
    others = [p for p in result.paths if p is not chosen and chosen is not None]
    if others:
        lines.append("")
        lines.append("other candidates:")
        lines.extend(f"  {p.target}: {_status(p)}" for p in others)
    lines.append("")
    lines.append(f"verdict  {_verdict_text(result)}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- HTML / SVG

_COLUMNS: Final = {"gateway": 0, "lb-fe": 1, "proxy": 2, "target": 3}
_BOX_W, _BOX_H = 224, 74
_COL_X: Final = (16, 278, 540, 802)
_ROW_Y: Final = {"forward": 40, "return": 210}
_OK, _BAD, _GREY, _AMBER = "#2e7d32", "#c62828", "#9e9e9e", "#b26a00"
_CSS: Final = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 20px; } h2 { font-size: 16px; margin-top: 28px; }
.verdict { padding: 10px 14px; border-radius: 6px; font-weight: 600; }
.whole { background: #e8f5e9; color: #1b5e20; } .broken { background: #ffebee; color: #b71c1c; }
.degraded { background: #fff8e1; color: #8d6e00; } tr.degraded td { background: #fff8e1; }
table { border-collapse: collapse; font-size: 13px; margin-top: 8px; }
td, th { border: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f5f5f5; } tr.bad td { background: #ffebee; } tr.unreached td { color: #999; }
code { font-size: 12px; }
"""


def _esc(text: str) -> str:
    return html.escape(text, quote=True)


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _positions(path: TracePath) -> list[tuple[float, float]]:
    """Top-left corner of each hop's box: column by role, row by direction."""
    out: list[tuple[float, float]] = []
    seen: dict[tuple[int, str], int] = {}
    for hop in path.hops:
        col = _COLUMNS.get(hop.role, 3)
        key = (col, hop.direction)
        n = seen.get(key, 0)
        seen[key] = n + 1
        dy = n * (_BOX_H + 12) * (1 if hop.direction == "return" else -1)
        out.append((_COL_X[col], _ROW_Y[hop.direction] + dy))
    return out


def render_svg(path: TracePath) -> str:
    """The path as an inline SVG: boxes per hop, arrows between consecutive hops."""
    pos = _positions(path)
    first = path.first_broken
    broken_at = path.hops.index(first) if first is not None else len(path.hops)
    top = min((y for _x, y in pos), default=0) - 30
    bottom = max((y for _x, y in pos), default=0) + _BOX_H + 30
    shift = -min(top, 0)
    height = bottom + shift
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="1040" height="{height:.0f}" '
        f'viewBox="0 0 1040 {height:.0f}" role="img" aria-label="trace path">',
        "<defs>",
    ]
    for name, color in (("ok", _OK), ("bad", _BAD), ("grey", _GREY)):
        parts.append(
            f'<marker id="arrow-{name}" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" '
            f'markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" '
            f'fill="{color}"/></marker>'
        )
    parts.append("</defs>")
    parts.append(
        f'<text x="16" y="{_ROW_Y["forward"] + shift - 12:.0f}" font-size="13" fill="#555">'
        "forward (client → VIP)</text>"
    )
    parts.append(
        f'<text x="16" y="{_ROW_Y["return"] + shift + _BOX_H + 18:.0f}" font-size="13" '
        'fill="#555">return (VIP → client)</text>'
    )
    # arrows first, boxes on top
    for j, i in _edges(path):
        (x0, y0), (x1, y1) = pos[j], pos[i]
        y0, y1 = y0 + shift, y1 + shift
        if i > broken_at:
            color, marker = _GREY, "grey"
        elif i == broken_at:
            color, marker = _BAD, "bad"
        else:
            color, marker = _OK, "ok"
        if pos[j] == pos[i]:
            continue
        if path.hops[j].direction != path.hops[i].direction:  # the turn: forward row to return
            sx, sy = x0 + _BOX_W / 2, y0 + _BOX_H
            ex, ey = x1 + _BOX_W / 2, y1
        elif x1 > x0:
            sx, sy, ex, ey = x0 + _BOX_W, y0 + _BOX_H / 2, x1, y1 + _BOX_H / 2
        else:
            sx, sy, ex, ey = x0, y0 + _BOX_H / 2, x1 + _BOX_W, y1 + _BOX_H / 2
        dash = ' stroke-dasharray="6 4"' if color == _GREY else ""
        parts.append(
            f'<line x1="{sx:.0f}" y1="{sy:.0f}" x2="{ex:.0f}" y2="{ey:.0f}" stroke="{color}" '
            f'stroke-width="2.5"{dash} marker-end="url(#arrow-{marker})"/>'
        )
    for i, (hop, (x, y0)) in enumerate(zip(path.hops, pos, strict=True)):
        y = y0 + shift
        if i > broken_at:
            stroke, fill = _GREY, "#fafafa"
        elif not hop.ok:
            stroke, fill = _BAD, "#ffebee"
        elif hop.degraded:
            stroke, fill = _AMBER, "#fff8e1"
        else:
            stroke, fill = _OK, "#f1f8e9"
        width = 3 if i == broken_at else 1.5
        parts.append(
            f"<g><title>{_esc(hop.reason)}</title>"
            f'<rect x="{x}" y="{y:.0f}" width="{_BOX_W}" height="{_BOX_H}" rx="8" '
            f'fill="{fill}" stroke="{stroke}" stroke-width="{width}"/>'
            f'<text x="{x + 10}" y="{y + 20:.0f}" font-size="14" font-weight="600" '
            f'fill="#222">{i + 1}. {_esc(_clip(hop.pod, 20))}</text>'
            f'<text x="{x + 10}" y="{y + 38:.0f}" font-size="11" fill="#666">'
            f"{_esc(hop.role)} · {hop.direction}</text>"
            f'<text x="{x + 10}" y="{y + 58:.0f}" font-size="11.5" fill="{stroke}">'
            f"{_esc(_clip(_box_label(hop), 33))}</text></g>"
        )
    parts.append("</svg>")
    return "".join(parts)


def _edges(path: TracePath) -> list[tuple[int, int]]:
    """(from, to) hop indexes: a candidate's branch hangs off the hop before the branches."""
    out: list[tuple[int, int]] = []
    last_common = -1
    run: list[int] = []
    for i, hop in enumerate(path.hops):
        if hop.via:
            prev = path.hops[i - 1] if i else None
            if prev is not None and prev.via == hop.via:
                out.append((i - 1, i))
            elif last_common >= 0:
                out.append((last_common, i))
            run.append(i)
            continue
        if run:
            ends = [
                k
                for k in run
                if k + 1 >= len(path.hops) or path.hops[k + 1].via != path.hops[k].via
            ]
            out.extend((k, i) for k in ends)
            run = []
        elif i:
            out.append((i - 1, i))
        last_common = i
    return out


def _box_label(hop: Hop) -> str:
    if hop.ok:
        return f"⚠ {hop.code}: {hop.label}" if hop.degraded else (hop.label or "ok")
    return f"✗ {hop.code + ': ' if hop.code else ''}{hop.label or 'broken'}"


def _hop_rows(path: TracePath) -> str:
    first = path.first_broken
    broken_at = path.hops.index(first) if first is not None else len(path.hops)
    rows = []
    for i, hop in enumerate(path.hops):
        cls = (
            "unreached"
            if i > broken_at
            else ("bad" if not hop.ok else ("degraded" if hop.degraded else ""))
        )
        rows.append(
            f'<tr class="{cls}"><td>{i + 1}</td><td>{_ARROW[hop.direction]} {hop.direction}</td>'
            f"<td>{_esc(hop.pod)}</td><td>{_esc(hop.role)}</td>"
            f"<td>{_state(hop)}</td><td>{_esc(hop.code or '')}</td>"
            f"<td><code>{_esc(_why(hop))}</code></td></tr>"
        )
    head = "<tr><th>#</th><th>dir</th><th>pod</th><th>role</th><th>state</th><th>code</th><th>why</th></tr>"
    return f"<table>{head}{''.join(rows)}</table>"


def render_html(result: TraceResult) -> str:
    """One self-contained page: verdict, the drawn path, hop table, other candidates."""
    cls = {"whole": "whole", "degraded": "degraded", "uncertain": "degraded"}.get(
        result.verdict, "broken"
    )
    verdict = f'<p class="verdict {cls}">{_esc(_verdict_text(result))}</p>'
    body = [f"<h1>meridio-debug trace: <code>{_esc(str(result.flow))}</code></h1>", verdict]
    body.extend(f"<p>{_esc(note)}</p>" for note in result.notes)
    chosen = result.chosen
    main = [chosen] if chosen is not None else list(result.paths)
    for path in main:
        flag = "chosen target" if path.chosen else "candidate target"
        body.append(f"<h2>{flag}: {_esc(path.target)} — {_esc(_status(path))}</h2>")
        body.append(render_svg(path))
        body.append(_hop_rows(path))
    others = [p for p in result.paths if chosen is not None and p is not chosen]
    if others:
        body.append("<h2>other candidate targets</h2><table><tr><th>target</th><th>state</th></tr>")
        body.extend(
            f"<tr><td>{_esc(p.target)}</td><td>{_esc(_status(p))}</td></tr>" for p in others
        )
        body.append("</table>")
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>trace {_esc(str(result.flow))}</title><style>{_CSS}</style></head>"
        f"<body>{''.join(body)}</body></html>\n"
    )


# --------------------------------------------------------------------------- active trace


def _us(value: float) -> str:
    return f"{value / 1000:.2f} ms" if value >= 1000 else f"{value:.0f} µs"


def active_path(active: ActiveResult) -> TracePath:
    """The path actually taken as a TracePath, so the static drawing can show it."""
    hops = []
    for h in active.hops:
        where = f"{h.in_iface or '·'} → {h.out_iface or '·'}"
        timing = f"+{_us(h.latency_us)}" if h.seen else "no packet"
        hops.append(Hop(h.pod, h.role, h.direction, h.ok, h.reason, h.code, f"{timing} {where}"))
    return TracePath(target=active.target or "?", chosen=True, hops=tuple(hops))


def _active_verdict(active: ActiveResult) -> str:
    broken = active.first_broken
    if broken is None:
        if not active.packets.get("forward"):
            return "no packet of the flow was seen"
        degraded = "; ".join(
            f"{h.pod} ({h.direction}){f' [{h.code}]' if h.code else ''}" for h in active.degraded
        )
        if degraded:
            return f"whole for this flow (packets went through), DEGRADED for others at {degraded}"
        return "the path is whole, both directions (packets went through)"
    code = f" [{broken.code}]" if broken.code else ""
    by = f", by {active.evidence}" if active.evidence else ""
    return f"BROKEN at {broken.pod} ({broken.direction}){code}{by}: {broken.reason}"


def render_active_table(static: TraceResult, active: ActiveResult) -> str:
    """The path the packets took, hop by hop with latency, then both verdicts."""
    p = active.packets
    lines = [f"flow  {active.flow}"]
    if active.mode == "probe":
        lines.append(
            f"probes  {p.get('sent', 0)} sent from {active.sender}, "
            f"{p.get('delivered', 0)} reached a target, {p.get('answered', 0)} answered"
        )
    else:
        lines.append(f"traffic  {p.get('forward', 0)} packets forward, {p.get('return', 0)} back")
    lines.extend(f"note  {note}" for note in active.notes)
    lines.append("")
    lines.append(f"path taken (target {active.target or 'none'}):")
    rows = [("#", "DIR", "POD", "ROLE", "IN", "OUT", "T", "LATENCY", "SEEN", "STATE", "WHY")]
    for i, h in enumerate(active.hops, 1):
        rows.append(
            (
                str(i),
                _ARROW[h.direction],
                h.pod,
                h.role,
                h.in_iface or "-",
                h.out_iface or "-",
                f"{h.t_in_us:.0f}µs" if h.seen else "-",
                _us(h.latency_us) if h.seen else "-",
                f"{h.seen - h.lost}/{h.seen}" if h.seen else f"0/{h.lost}",
                (f"degraded {h.code or ''}".strip() if h.degraded else "ok")
                if h.ok
                else f"BROKEN{' ' + h.code if h.code else ''}",
                h.reason,
            )
        )
    widths = [max(len(r[c]) for r in rows) for c in range(10)]
    for row in rows:
        head = "  ".join(cell.ljust(widths[c]) for c, cell in enumerate(row[:10]))
        lines.append(f"  {head}  {row[10]}")
    if active.rtt_us is not None:
        lines.append(f"  round trip {_us(active.rtt_us)}")
    lines.append("")
    lines.append(f"verdict  {_active_verdict(active)}")
    static_broken = static.first_broken
    same = "agrees" if active.agrees_with_static else "DISAGREES"
    static_text = (
        static.verdict
        if static_broken is None
        else f"{static.verdict} at {static_broken.pod} ({static_broken.direction})"
        + (f" [{static_broken.code}]" if static_broken.code else "")
    )
    target = f", target {static.chosen.target}" if static.chosen is not None else ""
    back = ""
    if active.static_back:
        back = f", back via {' or '.join(active.static_back)}"
        if active.lbs_back:
            back += f" (packets: {', '.join(active.lbs_back)})"
    lines.append(f"static   {static_text}{target}{back} ({same})")
    return "\n".join(lines)


def render_active_html(static: TraceResult, active: ActiveResult) -> str:
    """One page: the path the packets took (latencies, broken hop in red), then the static trace."""
    cls = {"whole": "whole", "degraded": "degraded"}.get(active.verdict, "broken")
    body = [
        f"<h1>meridio-debug trace --active: <code>{_esc(str(active.flow))}</code></h1>",
        f'<p class="verdict {cls}">{_esc(_active_verdict(active))}</p>',
    ]
    body.extend(f"<p>{_esc(note)}</p>" for note in active.notes)
    path = active_path(active)
    body.append(f"<h2>path taken: target {_esc(active.target or 'none')}</h2>")
    body.append(render_svg(path))
    rows = []
    first = next((h for h in active.hops if not h.ok), None)
    for i, h in enumerate(active.hops, 1):
        row_cls = "bad" if h is first else ""
        rows.append(
            f'<tr class="{row_cls}"><td>{i}</td><td>{_ARROW[h.direction]} {h.direction}</td>'
            f"<td>{_esc(h.pod)}</td><td>{_esc(h.in_iface or '-')}</td>"
            f"<td>{_esc(h.out_iface or '-')}</td><td>{h.t_in_us:.0f} µs</td>"
            f"<td>{_esc(_us(h.latency_us))}</td><td>{h.seen - h.lost}/{h.seen or h.lost}</td>"
            f"<td>{('degraded' if h.degraded else 'ok') if h.ok else 'BROKEN'}</td>"
            f"<td>{_esc(h.code or '')}</td>"
            f"<td><code>{_esc(h.reason)}</code></td></tr>"
        )
    head = (
        "<tr><th>#</th><th>dir</th><th>pod</th><th>in</th><th>out</th><th>t</th>"
        "<th>latency</th><th>passed</th><th>state</th><th>code</th><th>why</th></tr>"
    )
    body.append(f"<table>{head}{''.join(rows)}</table>")
    same = "agrees with" if active.agrees_with_static else "disagrees with"
    body.append(f"<h2>static trace ({same} the packets)</h2>")
    static_page = render_html(static)
    inner = static_page[static_page.index("<body>") + 6 : static_page.index("</body>")]
    body.append(inner.replace("<h1>", "<h3>").replace("</h1>", "</h3>"))
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>trace --active {_esc(str(active.flow))}</title><style>{_CSS}</style></head>"
        f"<body>{''.join(body)}</body></html>\n"
    )
