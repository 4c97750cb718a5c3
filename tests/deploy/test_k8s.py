"""The Kubernetes manifests against the Kubernetes API's own schemas (``kubernetes-validate``
ships them), strictly (an unknown field is an error), for every version the README names: the
files of deploy/k8s (the trainer's and the inference server's), and what the deploy/k8s-replicas
overlay renders (by kustomize)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
K8S_REPLICAS = K8S.parent / "k8s-replicas"
README = Path(__file__).resolve().parents[2] / "README.md"
# the versions the README's deployment section states (keep the two in step)
VERSIONS = [f"1.{minor}.0" for minor in range(29, 38)]
CUSTOM_RESOURCES = {"monitoring.coreos.com/v1"}  # the Prometheus Operator's CRD: no API schema
#: what must be among the validated manifests: the trainer's and the inference server's
WORKLOADS = {("Deployment", "streamcl"), ("Service", "streamcl"),
             ("Deployment", "streamcl-serve"), ("Service", "streamcl-serve")}


def manifests() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def test_the_readme_names_the_validated_versions() -> None:
    assert f"Kubernetes {VERSIONS[0][:-2]} to {VERSIONS[-1][:-2]}" in README.read_text()


@pytest.mark.parametrize("version", VERSIONS)
def test_manifests_validate_against_the_kubernetes_api(version: str) -> None:
    import kubernetes_validate

    checked = set()
    for name, doc in manifests():
        if doc["apiVersion"] in CUSTOM_RESOURCES:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name} ({doc['kind']}) is not valid Kubernetes {version}: "
                        f"{exc.message} at {list(exc.path)}")
        checked.add((doc["kind"], doc["metadata"]["name"]))
    assert len(checked) >= 6 and checked >= WORKLOADS, checked


def test_a_broken_manifest_is_caught() -> None:
    """The validation is not vacuous: a misspelt field fails it."""
    import kubernetes_validate

    for _, deployment in [(n, d) for n, d in manifests() if d["kind"] == "Deployment"]:
        broken = yaml.safe_load(yaml.safe_dump(deployment))
        broken["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, VERSIONS[-1], strict=True)
        probe = yaml.safe_load(yaml.safe_dump(deployment))  # a probe's misspelt field too
        probe["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"][
            "pth"] = "/"
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(probe, VERSIONS[-1], strict=True)


@pytest.fixture(scope="module")
def replicas_rendered(kustomize_build: Callable[[Path], list[dict[str, Any]]]
                      ) -> list[dict[str, Any]]:
    return kustomize_build(K8S_REPLICAS)


@pytest.mark.parametrize("version", VERSIONS)
def test_the_replicas_overlay_validates_against_the_kubernetes_api(
        version: str, replicas_rendered: list[dict[str, Any]]) -> None:
    import kubernetes_validate

    for doc in replicas_rendered:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"deploy/k8s-replicas renders a {doc['kind']} that is not valid "
                        f"Kubernetes {version}: {exc.message} at {list(exc.path)}")
    assert {"StatefulSet", "Service", "ConfigMap", "Deployment"} <= \
        {d["kind"] for d in replicas_rendered}
    assert ("Deployment", "streamcl-serve") in \
        {(d["kind"], d["metadata"]["name"]) for d in replicas_rendered}
