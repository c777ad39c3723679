"""`meshd inject` and deploy/kubernetes/: what comes out loads into the official Kubernetes
client's models field for field, for every workload kind; injecting twice changes
nothing; documents without a Pod template pass byte for byte; the init container's
arguments are a working `meshd iptables` command; the shipped example is what `meshd
inject` makes of its source, and the shipped ConfigMap's meshd.toml passes `meshd check`."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from kubernetes.client import ApiClient

from meshd.cli.iptables import iptables

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "kubernetes"

MODELS = {
    "Pod": "V1Pod", "Deployment": "V1Deployment", "StatefulSet": "V1StatefulSet",
    "DaemonSet": "V1DaemonSet", "ReplicaSet": "V1ReplicaSet", "Job": "V1Job",
    "CronJob": "V1CronJob", "Service": "V1Service", "ConfigMap": "V1ConfigMap",
    "ServiceAccount": "V1ServiceAccount", "ClusterRole": "V1ClusterRole",
    "ClusterRoleBinding": "V1ClusterRoleBinding",
}

APP = {"name": "app", "image": "example/app:1", "ports": [{"containerPort": 8080}]}
LABELS = {"app": "demo"}


def _template() -> dict[str, Any]:
    return {"metadata": {"labels": LABELS}, "spec": {"containers": [dict(APP)]}}


def _workload(kind: str, api: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": api, "kind": kind, "metadata": {"name": kind.lower()}, "spec": spec}


def _workloads() -> list[dict[str, Any]]:
    sel = {"selector": {"matchLabels": LABELS}}
    job_template = _template()
    job_template["spec"]["restartPolicy"] = "Never"
    return [
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "pod", "labels": LABELS},
         "spec": {"containers": [dict(APP)]}},
        _workload("Deployment", "apps/v1", {**sel, "replicas": 2, "template": _template()}),
        _workload("StatefulSet", "apps/v1", {**sel, "serviceName": "st", "template": _template()}),
        _workload("DaemonSet", "apps/v1", {**sel, "template": _template()}),
        _workload("ReplicaSet", "apps/v1", {**sel, "template": _template()}),
        _workload("Job", "batch/v1", {"template": job_template}),
        _workload("CronJob", "batch/v1", {"schedule": "*/5 * * * *",
                                          "jobTemplate": {"spec": {"template": job_template}}}),
    ]


# Written by hand (comments, flow style): it must come out exactly as it went in.
SERVICE = """\
apiVersion: v1
kind: Service   # not a workload
metadata: {name: demo}
spec:
  selector: {app: demo}
  ports: [{port: 80, targetPort: 8080}]
"""


def _source() -> str:
    docs = [yaml.safe_dump(d, sort_keys=False) for d in _workloads()]
    return SERVICE + "---\n" + "---\n".join(docs)


def run_inject(text: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "meshd", "inject", "-f", "-", *args],
                          input=text, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


class _Response:
    def __init__(self, doc: dict[str, Any]) -> None:
        self.data = json.dumps(doc)


def load_model(doc: dict[str, Any]) -> Any:
    """The document as the Kubernetes client's model; every field of the document must
    survive (a misspelt or misplaced field is dropped by the model and caught here)."""
    api = ApiClient()
    if "content_type" in inspect.signature(api.deserialize).parameters:  # client >= 34
        model = api.deserialize(json.dumps(doc), MODELS[doc["kind"]], "application/json")
    else:  # older clients take a response object
        model = api.deserialize(_Response(doc), MODELS[doc["kind"]])
    assert api.sanitize_for_serialization(model) == doc
    return model


def pod_spec(model: Any) -> Any:
    kind = model.kind
    if kind == "Pod":
        return model.spec
    if kind == "CronJob":
        return model.spec.job_template.spec.template.spec
    return model.spec.template.spec


def test_every_workload_kind_loads_into_the_kubernetes_models_injected() -> None:
    out = run_inject(_source())
    docs = list(yaml.safe_load_all(out))
    assert [d["kind"] for d in docs] == ["Service"] + [w["kind"] for w in _workloads()]
    for doc in docs[1:]:
        spec = pod_spec(load_model(doc))
        init = [c.name for c in spec.init_containers]
        assert init == ["meshd-init", "meshd"], doc["kind"]
        assert [c.name for c in spec.containers] == ["app"], doc["kind"]
        init_c, sidecar = spec.init_containers
        assert set(init_c.security_context.capabilities.add) == {"NET_ADMIN", "NET_RAW"}
        assert init_c.security_context.run_as_user == 0
        assert sidecar.restart_policy == "Always"  # a native sidecar: a Job still completes
        assert sidecar.security_context.run_as_user == 2102
        assert sidecar.security_context.run_as_non_root is True
        assert sidecar.liveness_probe.http_get.path == "/live"
        assert sidecar.readiness_probe.http_get.path == "/ready"
        assert sidecar.liveness_probe.http_get.port == 4192
        assert sidecar.resources.requests and sidecar.resources.limits["memory"]
        env = {e.name: e.value_from.field_ref.field_path for e in sidecar.env}
        assert env["POD_IP"] == "status.podIP"
        assert env["POD_NAMESPACE"] == "metadata.namespace"
        mounts = {m.mount_path: m.name for m in sidecar.volume_mounts}
        assert mounts["/etc/meshd"] == "meshd-config"
        assert mounts["/var/run/secrets/kubernetes.io/serviceaccount"] == "meshd-token"
        volumes = {v.name: v for v in spec.volumes}
        assert volumes["meshd-config"].config_map.name == "meshd-config"
        sources = volumes["meshd-token"].projected.sources
        assert any(s.service_account_token is not None for s in sources)


def test_injected_twice_is_injected_once_and_other_documents_pass_unchanged() -> None:
    once = run_inject(_source())
    assert run_inject(once) == once
    assert once.startswith(SERVICE + "---\n")  # byte for byte, comment and flow style kept


def test_legacy_sidecar_placement_loads_too_and_is_idempotent() -> None:
    out = run_inject(_source(), "--container-sidecar")
    for doc in list(yaml.safe_load_all(out))[1:]:
        spec = pod_spec(load_model(doc))
        assert [c.name for c in spec.init_containers] == ["meshd-init"]
        assert [c.name for c in spec.containers] == ["meshd", "app"]
    assert run_inject(out, "--container-sidecar") == out
    # switching placement moves meshd, never duplicates it
    again = list(yaml.safe_load_all(run_inject(out)))[1]
    spec = again["spec"]
    assert [c["name"] for c in spec["initContainers"]] == ["meshd-init", "meshd"]
    assert [c["name"] for c in spec["containers"]] == ["app"]


def test_opted_out_template_and_documents_without_a_template_are_left_alone() -> None:
    pod = _workloads()[0]
    pod["metadata"]["annotations"] = {"meshd.io/inject": "disabled"}
    host = _workloads()[3]  # a DaemonSet on the node's network: never captured
    host["spec"]["template"]["spec"]["hostNetwork"] = True
    text = (yaml.safe_dump(pod, sort_keys=False) + "---\n" + "# only a comment\n"
            + "---\n" + yaml.safe_dump(host, sort_keys=False))
    assert run_inject(text) == text


def test_items_of_a_list_are_injected() -> None:
    doc = {"apiVersion": "v1", "kind": "List", "items": _workloads()[:2]}
    out = yaml.safe_load(run_inject(yaml.safe_dump(doc)))
    for item in out["items"]:
        spec = pod_spec(load_model(item))
        assert [c.name for c in spec.init_containers] == ["meshd-init", "meshd"]


def test_init_container_arguments_are_a_working_iptables_command() -> None:
    doc = list(yaml.safe_load_all(run_inject(_source(), "--skip-outbound-ports", "5432",
                                             "--iptables-restore", "iptables-legacy-restore")))[2]
    init = doc["spec"]["template"]["spec"]["initContainers"][0]
    assert init["args"][0] == "iptables"
    result = CliRunner().invoke(iptables, [*init["args"][1:], "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "--uid-owner 2102 -j RETURN" in result.output
    assert "--dports 4192 -j RETURN" in result.output  # the probe port reaches meshd directly
    assert "--dports 5432 -j RETURN" in result.output
    assert init["args"][-2:] == ["--iptables-restore", "iptables-legacy-restore"]


def test_bad_input_is_refused_with_a_message() -> None:
    proc = subprocess.run([sys.executable, "-m", "meshd", "inject"], input="a: [b\n",
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "not valid YAML" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "meshd", "inject", "--skip-inbound-ports",
                           "99999"], input="", capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--skip-inbound-ports" in proc.stderr


def test_shipped_example_is_the_injection_of_its_source() -> None:
    source = (DEPLOY / "example" / "web.yaml").read_text()
    injected = (DEPLOY / "example" / "web.injected.yaml").read_text()
    assert run_inject(source) == injected, (
        "regenerate: meshd inject -f deploy/kubernetes/example/web.yaml "
        "> deploy/kubernetes/example/web.injected.yaml")
    for doc in yaml.safe_load_all(injected):
        load_model(doc)


def test_shipped_rbac_and_configmap_load_and_the_config_checks(tmp_path: Path) -> None:
    kinds = []
    for name in ("rbac.yaml", "configmap.yaml"):
        for doc in yaml.safe_load_all((DEPLOY / name).read_text()):
            load_model(doc)
            kinds.append(doc["kind"])
    assert kinds == ["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap"]
    rules = list(yaml.safe_load_all((DEPLOY / "rbac.yaml").read_text()))[1]["rules"]
    granted = {(g, r, v) for rule in rules for g in rule["apiGroups"]
               for r in rule["resources"] for v in rule["verbs"]}
    assert granted == {("discovery.k8s.io", "endpointslices", "list"),
                       ("discovery.k8s.io", "endpointslices", "watch"),
                       ("", "services", "get")}
    cm = list(yaml.safe_load_all((DEPLOY / "configmap.yaml").read_text()))[0]
    config = tmp_path / "meshd.toml"
    config.write_text(cm["data"]["meshd.toml"])
    env = dict(os.environ, POD_IP="10.1.2.3", POD_NAME="web-1", POD_NAMESPACE="default",
               POD_SERVICE_ACCOUNT="web", KUBERNETES_SERVICE_HOST="10.96.0.1",
               KUBERNETES_SERVICE_PORT="443")
    check = [sys.executable, "-m", "meshd", "check", "-c", str(config)]
    proc = subprocess.run(check, capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    # the sidecar's environment is what the config expects: without it, check names it
    del env["POD_NAMESPACE"]
    proc = subprocess.run(check, capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2
    assert "discovery[0].namespace: environment variable POD_NAMESPACE is not set" in proc.stderr


@pytest.mark.parametrize("kind", ["Pod", "Deployment", "CronJob"])
def test_a_template_already_holding_volumes_and_init_containers_keeps_them(kind: str) -> None:
    doc = next(w for w in _workloads() if w["kind"] == kind)
    text = yaml.safe_dump(doc, sort_keys=False)
    out = yaml.safe_load(run_inject(text))
    spec = pod_spec(load_model(out))
    spec_doc = spec.to_dict()
    assert spec_doc["containers"][0]["name"] == "app"
    # an application init container and volume survive, after meshd's
    mine = yaml.safe_load(text)
    tmpl = mine if kind == "Pod" else (mine["spec"]["template"] if kind != "CronJob"
                                       else mine["spec"]["jobTemplate"]["spec"]["template"])
    tmpl["spec"]["initContainers"] = [{"name": "migrate", "image": "example/migrate:1"}]
    tmpl["spec"]["volumes"] = [{"name": "data", "emptyDir": {}}]
    out = yaml.safe_load(run_inject(yaml.safe_dump(mine, sort_keys=False)))
    spec = pod_spec(load_model(out))
    assert [c.name for c in spec.init_containers] == ["meshd-init", "meshd", "migrate"]
    assert spec.volumes[0].name == "data"
