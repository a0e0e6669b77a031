"""The controller's error hierarchy: one root, every third-party error wrapped.

    MeridioDebugError            root; the CLI prints its message on one line, exit 1
    ├── UsageError               bad input from the user (exit 2)
    ├── LabError                 the lab cannot be built, inspected or removed
    ├── RuntimeUnavailable       a pod/namespace cannot be reached (no such netns, agent won't start)
    │   ├── PodNotFound          the named pod/namespace does not exist (or was deleted meanwhile)
    │   ├── AccessDenied         the cluster refused a request: RBAC (names the verb and resource) or credentials
    │   └── InjectionError       the agent container was refused (PSA 403, 422) or never ran (image pull, timeout)
    ├── AgentCallError           an RPC to an agent failed (wraps grpc.RpcError)
    ├── BundleError              an evidence bundle is truncated, of another version, or not a bundle
    └── ConfigError              a trench configuration (Meridio CRs, ConfigMap, YAML file) is unreadable

Third-party exceptions (grpc.RpcError, OSError, subprocess errors, kubernetes'
ApiException) are raised as one of these ``from`` the original, so callers and
the CLI handle one family and users never see a traceback for a known failure.
Messages say what failed, where, and what to do.
"""


class MeridioDebugError(Exception):
    """Root of every error meridio-debug raises on purpose."""

    exit_code = 1


class UsageError(MeridioDebugError):
    """The command line or an argument is wrong."""

    exit_code = 2


class LabError(MeridioDebugError):
    """The lab cannot be built, inspected or removed."""


class RuntimeUnavailable(MeridioDebugError):
    """A pod or namespace cannot be reached by the runtime."""


class PodNotFound(RuntimeUnavailable):
    """The named pod or namespace does not exist."""


class AccessDenied(RuntimeUnavailable):
    """The cluster refused a request for lack of rights (RBAC) or credentials."""


class InjectionError(RuntimeUnavailable):
    """An agent could not be injected or never became ready."""


class AgentCallError(MeridioDebugError):
    """A call to an agent failed."""


class BundleError(MeridioDebugError):
    """An evidence bundle cannot be read."""


class ConfigError(MeridioDebugError):
    """A trench configuration (Meridio CRs, ConfigMap, YAML file) cannot be read."""
