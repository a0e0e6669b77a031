"""deploy/ offline: every manifest parses and deserialises into the Kubernetes client's models.

The Role's verbs are compared with the requests the code really made in
tests/cluster (test_role_grants_exactly_the_verbs_the_code_used); here they
are pinned so a change to the Role is a deliberate one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
MODELS = {
    "ServiceAccount": client.V1ServiceAccount,
    "Role": client.V1Role,
    "ClusterRole": client.V1ClusterRole,
    "RoleBinding": client.V1RoleBinding,
    "Job": client.V1Job,
    "PersistentVolumeClaim": client.V1PersistentVolumeClaim,
}


def manifests() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((path.name, doc))
    return out


@pytest.mark.parametrize(
    ("name", "doc"), manifests(), ids=lambda v: v if isinstance(v, str) else v.get("kind")
)
def test_manifest_deserialises_into_the_client_model(name: str, doc: dict[str, Any]) -> None:
    model = MODELS[doc["kind"]].from_dict(doc)
    assert model is not None
    assert model.metadata.name.startswith("meridio-debug"), name
    # a misspelt field would be dropped by the model: the round trip must be lossless
    assert client.ApiClient().sanitize_for_serialization(model) == doc


def test_kustomization_lists_every_manifest() -> None:
    kust = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    # rbac-optional.yaml is optional on purpose (README, section RBAC)
    files = {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml", "rbac-optional.yaml"}
    assert set(kust["resources"]) == files


def test_role_grants_the_runtime_verbs_and_binds_the_job_account() -> None:
    docs = {d["kind"]: d for n, d in manifests() if n != "rbac-optional.yaml"}
    role = client.V1Role.from_dict(docs["Role"])
    granted = {(v, r) for rule in role.rules for r in rule.resources for v in rule.verbs}
    assert granted == {
        ("get", "pods"),
        ("list", "pods"),
        ("watch", "pods"),
        ("patch", "pods"),
        ("patch", "pods/ephemeralcontainers"),
        ("get", "pods/portforward"),
        ("create", "pods/portforward"),
        ("get", "pods/log"),
    }
    assert all(rule.api_groups == [""] for rule in role.rules)
    binding = client.V1RoleBinding.from_dict(docs["RoleBinding"])
    assert binding.role_ref.name == role.metadata.name
    assert binding.subjects[0].name == docs["ServiceAccount"]["metadata"]["name"]
    job = client.V1Job.from_dict(docs["Job"])
    pod = job.spec.template.spec
    assert pod.service_account_name == docs["ServiceAccount"]["metadata"]["name"]
    (c,) = pod.containers
    assert c.args[0] == "analyze" and any(a.startswith("--report=/reports/") for a in c.args)
    assert {m.mount_path for m in c.volume_mounts} >= {"/reports"}
