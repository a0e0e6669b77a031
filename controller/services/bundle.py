"""Evidence: every pod's snapshot of one moment, live or from a saved bundle.

Why bundles: a pipeline that fails at 3 a.m. (Meridio e2e ``on_failure``)
must keep what the trench looked like, and the analysis of that evidence
must be reproducible later, on another machine, by a newer meridio-debug.
So ``collect`` writes a versioned tar.gz and ``analyze --from`` replays it
through exactly the code a live run uses (Hubble's ``--input-file``)::

    snapshot dict --(json_format.ParseDict)--> pb.Snapshot --(wire/convert)--> model --> analyze

Layout (format version 1)::

    meta.json          kind, format_version, created, meridio-debug version,
                       command line, runtime, trench expectations, pods with
                       roles, locations, agent infos and errors
    pods/<pod>.json    the per-pod object of ``snapshot -o json``
                       (output.snapshot_to_dict), also for unreachable pods

Everything that can go wrong reading a bundle (missing, truncated, not a
tar.gz, a plain tar without meta.json, another format version, a pod file
that does not parse) is a one-line ``BundleError``, never a traceback.
Bundles are read in memory and never extracted, so a hostile member name
cannot write anywhere. A hostile bundle cannot exhaust the reader either: the
member count, each member's size and the total (from the tar headers, before
any data is read) and the JSON nesting depth are bounded, so reading any
bundle costs at most about MAX_TOTAL_BYTES of data plus its parsed JSON, and a
bundle over a bound is a one-line BundleError.
"""

from __future__ import annotations

import dataclasses
import datetime
import gzip
import io
import json
import tarfile
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Final

from google.protobuf import json_format

from meridio_debug.controller.errors import BundleError, ConfigError
from meridio_debug.controller.model import (
    ContainerHealth,
    KubeState,
    PodHealth,
    PodResult,
    ReadProblem,
    Timeline,
    TrenchConfig,
    TrenchState,
)
from meridio_debug.controller.model.meridio_config import config_from_crs, to_crs
from meridio_debug.controller.report import snapshot as output
from meridio_debug.controller.report.snapshot import PodSnapshot
from meridio_debug.controller.runtime import PodRef
from meridio_debug.controller.wire import convert
from meridio_debug.protos import agent_pb2 as pb

BUNDLE_KIND: Final = "meridio-debug/bundle"
FORMAT_VERSION: Final = 1
META_NAME: Final = "meta.json"
KUBE_NAME: Final = "kubernetes.json"  # optional: pod status and log tails (Kubernetes runs)
WATCH_NAME: Final = "watch.json"  # optional: events and bird samples of analyze --watch
POD_DIR: Final = "pods"
# A snapshot of a big LB is a few MiB; anything far beyond is not ours (or a zip bomb).
MAX_MEMBER_BYTES: Final = 64 * 1024 * 1024
MAX_TOTAL_BYTES: Final = 128 * 1024 * 1024  # uncompressed, all members
MAX_MEMBERS: Final = 10_000  # a pod file each, plus a few
MAX_JSON_DEPTH: Final = 64  # a snapshot nests about 6 deep

__all__ = [
    "BUNDLE_KIND",
    "FORMAT_VERSION",
    "Evidence",
    "pod_dict_to_proto",
    "read_bundle",
    "trench_state",
    "write_bundle",
]


@dataclass(frozen=True)
class Recording:
    """A watched window as the agents sent it (``analyze --watch S``); converted in trench_state."""

    start_unix_ns: int
    end_unix_ns: int
    events: tuple[tuple[str, pb.Event], ...] = ()  # (pod, event)
    samples: tuple[tuple[str, int, pb.Snapshot], ...] = ()  # (pod, unix_ns, bird-only snapshot)
    errors: tuple[str, ...] = ()


@dataclass(frozen=True)
class Evidence:
    """What analysis needs: the pods' snapshots plus what the trench should look like.

    ``source`` says where it came from (``lab mdl-``, ``netns ...``, ``bundle PATH``)
    for report headers; ``meta`` is the bundle's meta.json when read from one.
    """

    items: tuple[PodSnapshot, ...]
    config: TrenchConfig | None = None
    source: str = ""
    runtime: str = ""
    created_unix_ns: int = 0
    meta: Mapping[str, Any] = field(default_factory=dict)
    kube: KubeState | None = None  # pods' Kubernetes status and log tails (cluster runs)
    recording: Recording | None = None  # netlink events and bird samples of a watched window


def trench_state(evidence: Evidence) -> TrenchState:
    """The analysis input: every pod through the one conversion boundary (convert.py).

    A pod without a snapshot becomes an unreachable PodResult, which MDB002 reports.
    """
    pods: list[PodResult] = [
        convert.pod_result_from_proto(item.pod.name, item.pod.role, item.snapshot, error=item.error)
        for item in evidence.items
    ]
    timeline = None
    rec = evidence.recording
    if rec is not None:
        timeline = Timeline(
            start_unix_ns=rec.start_unix_ns,
            end_unix_ns=rec.end_unix_ns,
            events=tuple(convert.event_from_proto(pod, e) for pod, e in rec.events),
            samples=tuple(convert.sample_from_proto(pod, t, snap) for pod, t, snap in rec.samples),
            errors=rec.errors,
        )
    return TrenchState(
        pods=tuple(pods), config=evidence.config, kube=evidence.kube, timeline=timeline
    )


# --------------------------------------------------------------------------- writing


def _config_to_dict(config: TrenchConfig | None) -> dict[str, Any] | None:
    if config is None:
        return None
    return {
        "name": config.name,
        "vips": list(config.vips),
        "external_interface": config.external_interface,
        "open_targets": None if config.open_targets is None else list(config.open_targets),
        # The Meridio objects as CRs: the same reader as `--config` takes them back.
        "meridio": None if config.meridio is None else to_crs(config.meridio),
        "meridio_source": None if config.meridio is None else config.meridio.source,
    }


def _config_from_dict(data: Any) -> TrenchConfig | None:
    if data is None:
        return None
    if not isinstance(data, Mapping):
        raise BundleError("meta.json: 'trench' is not an object")
    open_targets = data.get("open_targets")
    meridio = None
    crs = data.get("meridio")
    if crs is not None:
        if not isinstance(crs, list) or not all(isinstance(d, Mapping) for d in crs):
            raise BundleError("meta.json: 'trench.meridio' is not a list of Meridio objects")
        try:
            meridio = config_from_crs(crs, source=str(data.get("meridio_source") or "bundle"))
        except ConfigError as exc:
            raise BundleError(f"meta.json: trench.meridio: {exc}") from exc
    return TrenchConfig(
        name=str(data.get("name", "")),
        vips=tuple(str(v) for v in data.get("vips", ())),
        external_interface=str(data.get("external_interface", "")),
        open_targets=None if open_targets is None else tuple(str(t) for t in open_targets),
        meridio=meridio,
    )


def _pod_file(name: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return f"{POD_DIR}/{safe}.json"


def build_meta(
    evidence: Evidence, command_line: Sequence[str], tool_version: str
) -> dict[str, Any]:
    """meta.json: enough to know what the bundle is without reading any pod file."""
    created_ns = evidence.created_unix_ns or time.time_ns()
    created = datetime.datetime.fromtimestamp(created_ns / 1e9, tz=datetime.UTC)
    pods = []
    for item in evidence.items:
        pods.append(
            {
                "name": item.pod.name,
                "role": item.pod.role,
                "location": item.pod.location,
                "runtime": item.pod.runtime,
                "file": _pod_file(item.pod.name),
                "reachable": item.snapshot is not None,
                "error": item.error or None,
                "agent": (
                    output.message_to_dict(item.snapshot.info)
                    if item.snapshot is not None and item.snapshot.HasField("info")
                    else None
                ),
            }
        )
    return {
        "kind": BUNDLE_KIND,
        "format_version": FORMAT_VERSION,
        "created": created.isoformat(timespec="seconds"),
        "created_unix_ns": created_ns,
        "meridio_debug_version": tool_version,
        "command_line": list(command_line),
        "runtime": evidence.runtime,
        "source": evidence.source,
        "trench": _config_to_dict(evidence.config),
        "pods": pods,
    }


def _add(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(mtime)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def write_bundle(
    evidence: Evidence,
    path: str | Path,
    command_line: Sequence[str] = (),
    tool_version: str = "",
) -> dict[str, Any]:
    """Write ``evidence`` as a bundle at ``path`` (atomically); return its meta.json."""
    if not tool_version:
        tool_version = _tool_version()
    meta = build_meta(evidence, command_line, tool_version)
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp")
    mtime = meta["created_unix_ns"] / 1e9
    try:
        with tarfile.open(tmp, "w:gz") as tar:
            _add(tar, META_NAME, _dump(meta), mtime)
            if evidence.kube is not None:
                _add(tar, KUBE_NAME, _dump(kube_to_dict(evidence.kube)), mtime)
            if evidence.recording is not None:
                _add(tar, WATCH_NAME, _dump(recording_to_dict(evidence.recording)), mtime)
            for item, pod in zip(evidence.items, meta["pods"], strict=True):
                _add(tar, pod["file"], _dump(output.snapshot_to_dict(item)), mtime)
        tmp.replace(target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise BundleError(f"cannot write bundle {target}: {exc.strerror or exc}") from exc
    return meta


def _dump(doc: Any) -> bytes:
    return json.dumps(doc, indent=1).encode()


def _tool_version() -> str:
    try:
        return version("meridio-debug")
    except PackageNotFoundError:
        return "unknown"


def kube_to_dict(kube: KubeState) -> dict[str, Any]:
    doc = dataclasses.asdict(kube)
    doc["timings"] = [list(t) for t in kube.timings]
    return doc


def kube_from_dict(data: Any, path: Path) -> KubeState:
    """kubernetes.json back into the model; BundleError (one line) when it does not fit."""
    try:
        if not isinstance(data, Mapping):
            raise TypeError("not an object")
        pods = tuple(
            PodHealth(
                **{
                    **{k: v for k, v in pod.items() if k != "containers"},
                    "containers": tuple(
                        ContainerHealth(
                            **{
                                **c,
                                "log": tuple(c.get("log", ())),
                                "previous_log": tuple(c.get("previous_log", ())),
                            }
                        )
                        for c in pod.get("containers", ())
                    ),
                }
            )
            for pod in data.get("pods", ())
        )
        return KubeState(
            read_unix=float(data["read_unix"]),
            since_unix=float(data.get("since_unix", 0.0)),
            pods=pods,
            problems=tuple(ReadProblem(**p) for p in data.get("problems", ())),
            trench=str(data.get("trench", "")),
            timings=tuple((str(g), float(t)) for g, t in data.get("timings", ())),
        )
    except (TypeError, KeyError, ValueError, AttributeError) as exc:
        raise BundleError(f"{path}: {KUBE_NAME} does not fit this version ({exc})") from exc


def _msg(message: Any) -> dict[str, Any]:
    doc: dict[str, Any] = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return doc


def recording_to_dict(rec: Recording) -> dict[str, Any]:
    return {
        "start_unix_ns": rec.start_unix_ns,
        "end_unix_ns": rec.end_unix_ns,
        "errors": list(rec.errors),
        "events": [{"pod": pod, "event": _msg(e)} for pod, e in rec.events],
        "samples": [
            {"pod": pod, "unix_ns": t, "bird": _msg(snap.bird)} for pod, t, snap in rec.samples
        ],
    }


def recording_from_dict(data: Any, path: Path) -> Recording:
    """watch.json back into the agents' messages (then the live conversion)."""
    try:
        if not isinstance(data, Mapping):
            raise TypeError("not an object")
        events = []
        for item in data.get("events", ()):
            event = pb.Event()
            json_format.ParseDict(item["event"], event, ignore_unknown_fields=True)
            events.append((str(item["pod"]), event))
        samples = []
        for item in data.get("samples", ()):
            snap = pb.Snapshot()
            json_format.ParseDict(item["bird"], snap.bird, ignore_unknown_fields=True)
            samples.append((str(item["pod"]), int(item["unix_ns"]), snap))
        return Recording(
            start_unix_ns=int(data["start_unix_ns"]),
            end_unix_ns=int(data["end_unix_ns"]),
            events=tuple(events),
            samples=tuple(samples),
            errors=tuple(str(e) for e in data.get("errors", ())),
        )
    except (TypeError, KeyError, ValueError, json_format.ParseError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BundleError(f"{path}: {WATCH_NAME} does not fit this version ({first})") from exc


# --------------------------------------------------------------------------- reading

# output.snapshot_to_dict renames a few pb.Snapshot fields for readers; undo that.
_RENAMED: Final = {"agent": "info", "section_status": "sections"}
_POD_KEYS: Final = frozenset({"pod", "role", "location", "runtime", "error"})
_STRUCT_KEYS: Final = frozenset({"nftables"})


def _drop_nulls(value: Any) -> Any:
    """message_to_dict writes unset sub-messages as null; ParseDict wants them absent.

    Inside a Struct (the nftables ruleset) null is data (``{"notrack": null}``): kept.
    """
    if isinstance(value, dict):
        return {
            k: v if k in _STRUCT_KEYS else _drop_nulls(v) for k, v in value.items() if v is not None
        }
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def pod_dict_to_proto(data: Mapping[str, Any]) -> pb.Snapshot | None:
    """The ``snapshot -o json`` per-pod object back into a pb.Snapshot (None when unreachable).

    Unknown fields (written by a newer agent) are ignored. Raises
    ``json_format.ParseError`` / ``ValueError`` / ``TypeError`` on malformed data.
    """
    if "section_status" not in data and "taken_unix_ns" not in data:
        return None
    msg: dict[str, Any] = {}
    for key, value in data.items():
        if key in _POD_KEYS:
            continue
        if key == "sysctls" and isinstance(value, Mapping):
            msg["sysctls"] = [{"key": k, "value": v} for k, v in value.items()]
        else:
            msg[_RENAMED.get(key, key)] = value
    snap = pb.Snapshot()
    json_format.ParseDict(_drop_nulls(msg), snap, ignore_unknown_fields=True)
    return snap


def _read_members(path: Path) -> dict[str, bytes]:
    try:
        with tarfile.open(path, "r:gz") as tar:
            members: dict[str, bytes] = {}
            total = 0
            for count, info in enumerate(tar, 1):
                if count > MAX_MEMBERS:
                    raise BundleError(
                        f"{path}: more than {MAX_MEMBERS} members; not a meridio-debug bundle"
                    )
                # tarfile keeps every header it read: not a million of them
                tar.members.clear()  # type: ignore[attr-defined]
                if not info.isfile():
                    continue
                total += info.size
                if info.size > MAX_MEMBER_BYTES or total > MAX_TOTAL_BYTES:
                    raise BundleError(
                        f"{path}: member {info.name[:80]!r} makes the bundle larger than a "
                        f"bundle can be ({MAX_MEMBER_BYTES >> 20} MiB a member, "
                        f"{MAX_TOTAL_BYTES >> 20} MiB in all); not a meridio-debug bundle"
                    )
                f = tar.extractfile(info)
                if f is None:
                    continue
                data = f.read()
                if len(data) != info.size:
                    raise BundleError(f"{path}: truncated (member {info.name} is cut short)")
                members[info.name] = data
    except FileNotFoundError as exc:
        raise BundleError(f"{path}: no such bundle file") from exc
    except IsADirectoryError as exc:
        raise BundleError(f"{path}: is a directory, not a bundle (.tar.gz)") from exc
    except PermissionError as exc:
        raise BundleError(f"{path}: cannot read the bundle: permission denied") from exc
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise BundleError(f"{path}: truncated or corrupt bundle ({exc}); collect it again") from exc
    except tarfile.ReadError as exc:
        # tarfile says "not a gzip file" for any non-gzip input (a plain tar too).
        what = "a gzip file but not a tar archive" if _is_gzip(path) else "not a tar.gz"
        raise BundleError(
            f"{path}: not a meridio-debug bundle ({what}: {exc}); "
            "make one with `meridio-debug collect -o FILE.tar.gz`"
        ) from exc
    except OSError as exc:
        raise BundleError(f"{path}: cannot read the bundle: {exc.strerror or exc}") from exc
    return members


def _is_gzip(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(2) == b"\x1f\x8b"
    except OSError:
        return False


def _too_deep(doc: Any) -> bool:
    """Whether ``doc`` nests arrays/objects deeper than MAX_JSON_DEPTH (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children: Any = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        if depth > MAX_JSON_DEPTH:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def _json(path: Path, name: str, data: bytes) -> Any:
    deep = BundleError(
        f"{path}: {name} nests JSON deeper than {MAX_JSON_DEPTH} levels; not a meridio-debug bundle"
    )
    try:
        doc = json.loads(data)
    except RecursionError:
        raise deep from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(
            f"{path}: {name} is not valid JSON ({str(exc)[:100]}); the bundle is damaged"
        ) from exc
    if _too_deep(doc):
        raise deep
    return doc


def read_bundle(path: str | Path) -> Evidence:
    """Load a bundle written by :func:`write_bundle`; BundleError (one line) on any problem."""
    p = Path(path)
    members = _read_members(p)
    if META_NAME not in members:
        raise BundleError(
            f"{p}: not a meridio-debug bundle (no {META_NAME}); "
            "make one with `meridio-debug collect -o FILE.tar.gz`"
        )
    meta = _json(p, META_NAME, members[META_NAME])
    if not isinstance(meta, dict) or meta.get("kind") != BUNDLE_KIND:
        raise BundleError(
            f"{p}: not a meridio-debug bundle ({META_NAME} has no kind {BUNDLE_KIND!r})"
        )
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{p}: bundle format version {version!r} (written by meridio-debug "
            f"{meta.get('meridio_debug_version', '?')}); this meridio-debug reads version "
            f"{FORMAT_VERSION}: use a matching meridio-debug"
        )
    pods = meta.get("pods")
    if not isinstance(pods, list):
        raise BundleError(f"{p}: {META_NAME} has no pod list; the bundle is damaged")
    items: list[PodSnapshot] = []
    for entry in pods:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise BundleError(f"{p}: {META_NAME} has a malformed pod entry; the bundle is damaged")
        name = entry["name"]
        file = entry.get("file") or _pod_file(name)
        if file not in members:
            raise BundleError(f"{p}: pod {name}: {file} is missing from the bundle")
        data = _json(p, file, members[file])
        if not isinstance(data, dict):
            raise BundleError(f"{p}: {file} is not a pod snapshot object")
        try:
            snap = pod_dict_to_proto(data)
        except (json_format.ParseError, ValueError, TypeError, AttributeError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise BundleError(f"{p}: {file} is not a valid snapshot: {first}") from exc
        ref = PodRef(
            name=name,
            role=str(entry.get("role") or data.get("role") or "unknown"),
            location=str(entry.get("location") or data.get("location") or ""),
            runtime=str(entry.get("runtime") or data.get("runtime") or ""),
        )
        error = str(data.get("error") or entry.get("error") or "")
        if snap is None and not error:
            error = "no snapshot in the bundle"
        items.append(PodSnapshot(ref, snap, error if snap is None else ""))
    kube = None
    if KUBE_NAME in members:
        kube = kube_from_dict(_json(p, KUBE_NAME, members[KUBE_NAME]), p)
    recording = None
    if WATCH_NAME in members:
        recording = recording_from_dict(_json(p, WATCH_NAME, members[WATCH_NAME]), p)
    created = meta.get("created_unix_ns")
    return Evidence(
        kube=kube,
        recording=recording,
        items=tuple(items),
        config=_config_from_dict(meta.get("trench")),
        source=f"bundle {p.name} ({meta.get('source') or meta.get('runtime') or 'unknown source'})",
        runtime=str(meta.get("runtime", "")),
        created_unix_ns=created if isinstance(created, int) else 0,
        meta=meta,
    )
