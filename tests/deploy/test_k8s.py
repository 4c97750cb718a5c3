"""The Kubernetes manifests against the Kubernetes API's own schemas (``kubernetes-validate``
ships them), strictly (an unknown field is an error), for every version the README names."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
README = Path(__file__).resolve().parents[2] / "README.md"
# the versions the README's deployment section states (keep the two in step)
VERSIONS = [f"1.{minor}.0" for minor in range(29, 38)]
CUSTOM_RESOURCES = {"monitoring.coreos.com/v1"}  # the Prometheus Operator's CRD: no API schema


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

    checked = 0
    for name, doc in manifests():
        if doc["apiVersion"] in CUSTOM_RESOURCES:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{name} ({doc['kind']}) is not valid Kubernetes {version}: "
                        f"{exc.message} at {list(exc.path)}")
        checked += 1
    assert checked >= 4


def test_a_broken_manifest_is_caught() -> None:
    """The validation is not vacuous: a misspelt field fails it."""
    import kubernetes_validate

    _, deployment = next((n, d) for n, d in manifests() if d["kind"] == "Deployment")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[-1], strict=True)
