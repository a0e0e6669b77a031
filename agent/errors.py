"""The agent's error hierarchy.

    AgentError                 root; never escapes the server as a traceback
    ├── SectionAbsent          the component a collector reads is not there (no bird, no nfqlb)
    ├── CollectorError         a collector could not read its section (EPERM, parse error)
    └── ListenError            the listen address is invalid or taken

Third-party errors (pyroute2's NetlinkError, psutil's AccessDenied, OSError)
are wrapped with ``raise ... from exc`` so callers handle one family.
"""


class AgentError(Exception):
    """Root of every error the agent raises on purpose."""


class SectionAbsent(AgentError):
    """The component behind a section does not exist here (reported as ABSENT, not ERROR)."""


class CollectorError(AgentError):
    """A collector failed; the message says what and why (reported as an ERROR section)."""


class ListenError(AgentError):
    """The agent cannot listen where it was asked to."""


def few(names: list[str], limit: int = 5, width: int = 40) -> str:
    """Names for an error message, bounded: never echo unbounded input back to the client."""
    shown = [n if len(n) <= width else n[:width] + "..." for n in names[:limit]]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(shown) + more
