"""`meshd inject`: add meshd to every Pod template of Kubernetes YAML, as `linkerd inject`.

Each document of the input (multi-document YAML) that holds a Pod template -- a Pod,
Deployment, StatefulSet, DaemonSet, ReplicaSet, Job or CronJob, or such items of a List
-- gets, in the template's spec:

- the init container ``meshd-init``, running ``meshd iptables`` as root with NET_ADMIN and
  NET_RAW only: the pod's TCP traffic goes through meshd from the first packet;
- the sidecar ``meshd``, by default a restartable init container (Kubernetes >= 1.29:
  the application starts once meshd is ready, a Job completes without it), else the
  first container (``--container-sidecar``). It runs as uid 2102, the uid the rules
  exempt: ``meshd run`` on the config
  of a ConfigMap volume, liveness and readiness probes on ``/live`` and ``/ready`` of the
  probe port (``[admin] probe_listen``, skipped by the inbound rules), resources, the pod
  IP, name, namespace and service account in the environment (for ``${VAR}`` in the
  config), a service-account token of its own mounted where the kubernetes discovery
  plugin looks (so it works with ``automountServiceAccountToken: false`` too), and a
  memory-backed emptyDir for its runtime files;
- the annotation ``meshd.io/injected`` with the version.

Every other document is passed on as it was, byte for byte. Injecting again replaces
meshd's own containers and volumes and so changes nothing: the output of injecting
twice equals that of injecting once. A template annotated ``meshd.io/inject: disabled``
is left alone, and so is one with ``hostNetwork: true`` (the init container's rules
would redirect the node's own traffic). ``inject_documents`` is the pure core; the command reads a file or stdin.
"""

from __future__ import annotations

import copy
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import click

from meshd import __version__

PROXY_UID = 2102
ANNOTATION_INJECTED = "meshd.io/injected"
ANNOTATION_INJECT = "meshd.io/inject"
SIDECAR = "meshd"
INIT = "meshd-init"
VOLUMES = ("meshd-config", "meshd-run", "meshd-token", "meshd-xtables-lock")
TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"
MAX_INPUT = 16 << 20  # bytes of YAML read (a manifest, not a data set)
_DOC_START = re.compile(r"^---(?:[ \t].*)?$", re.MULTILINE)


@dataclass(frozen=True)
class InjectOptions:
    image: str = f"meshd:{__version__}"
    config_map: str = "meshd-config"
    inbound_port: int = 4143
    outbound_port: int = 4140
    probe_port: int = 4192
    skip_inbound_ports: str = ""
    skip_outbound_ports: str = ""
    cpu_request: str = "100m"
    memory_request: str = "64Mi"
    memory_limit: str = "256Mi"
    # a restartable init container (Kubernetes >= 1.29): the application's containers
    # start once meshd is ready, and a Job completes when its own containers do
    native_sidecar: bool = True
    iptables_restore: str = "iptables-restore"  # iptables-legacy-restore on legacy nodes


def pod_specs(doc: Any) -> Iterator[dict[str, Any]]:
    """The Pod template specs of one document (its items, for a List)."""
    if not isinstance(doc, dict):
        return
    kind = doc.get("kind")
    spec = doc.get("spec")
    if kind == "List":
        for item in doc.get("items") or []:
            yield from pod_specs(item)
        return
    if not isinstance(spec, dict):
        return
    if kind == "Pod":
        yield doc  # the Pod itself plays the template: metadata beside spec
    elif kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        template = spec.get("template")
        if isinstance(template, dict):
            yield template
    elif kind == "CronJob":
        job = spec.get("jobTemplate")
        job_spec = job.get("spec") if isinstance(job, dict) else None
        template = job_spec.get("template") if isinstance(job_spec, dict) else None
        if isinstance(template, dict):
            yield template


def inject_template(template: dict[str, Any], opts: InjectOptions) -> bool:
    """Add meshd to one Pod template (``metadata`` + ``spec``) in place. Returns whether
    it was injected (False: opted out, host network, or no spec)."""
    spec = template.get("spec")
    if not isinstance(spec, dict):
        return False
    if template.get("metadata") is None:
        template["metadata"] = {}
    metadata = template["metadata"]
    if not isinstance(metadata, dict):
        return False
    annotations = metadata.get("annotations") or {}
    if str(annotations.get(ANNOTATION_INJECT, "")).lower() == "disabled":
        return False
    if spec.get("hostNetwork") is True:  # the rules would capture the node's own traffic
        return False
    ours = (INIT, SIDECAR)
    init = [c for c in spec.get("initContainers") or [] if c.get("name") not in ours]
    containers = [c for c in spec.get("containers") or [] if c.get("name") not in ours]
    sidecar = _sidecar(opts)
    if opts.native_sidecar:
        spec["initContainers"] = [_init_container(opts), sidecar, *init]
        spec["containers"] = containers
    else:  # first, so that it starts first (without waiting for it)
        spec["initContainers"] = [_init_container(opts), *init]
        spec["containers"] = [sidecar, *containers]
    volumes = [v for v in spec.get("volumes") or [] if v.get("name") not in VOLUMES]
    spec["volumes"] = [*volumes, *_volumes(opts)]
    metadata["annotations"] = {**annotations, ANNOTATION_INJECTED: __version__}
    return True


def inject_documents(text: str, opts: InjectOptions) -> str:
    """``text`` (multi-document YAML) with every Pod template injected; documents
    without one come out exactly as they went in."""
    import yaml  # here, not at the top: every `meshd` command (the master too) imports this module

    out: list[str] = []
    for chunk in _split_documents(text):
        docs = list(yaml.safe_load_all(chunk))
        if len(docs) > 1:  # "..." then a document without "---"
            raise yaml.YAMLError("a document follows '...' without a '---' line")
        doc = docs[0] if docs else None
        changed = False
        if doc is not None:
            doc = copy.deepcopy(doc)
            for template in pod_specs(doc):
                changed = inject_template(template, opts) or changed
        if not changed:
            out.append(chunk)
            continue
        head = _leading_marker(chunk)
        out.append(head + yaml.safe_dump(doc, sort_keys=False, default_flow_style=False,
                                         width=100))
    return "".join(out)


def _split_documents(text: str) -> list[str]:
    """The documents of a YAML stream as text, each with its own leading ``---`` line
    (a marker at column 0 always starts a document in block YAML)."""
    starts = [m.start() for m in _DOC_START.finditer(text)]
    if not starts or starts[0] != 0:
        starts.insert(0, 0)
    bounds = [*starts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if text[a:b]]


def _leading_marker(chunk: str) -> str:
    m = _DOC_START.match(chunk)
    return m.group(0) + "\n" if m else ""


def _init_container(opts: InjectOptions) -> dict[str, Any]:
    skip_in = ",".join(p for p in (str(opts.probe_port), opts.skip_inbound_ports) if p)
    args = ["iptables", "--proxy-uid", str(PROXY_UID),
            "--inbound-port", str(opts.inbound_port),
            "--outbound-port", str(opts.outbound_port),
            "--skip-inbound-ports", skip_in]
    if opts.skip_outbound_ports:
        args += ["--skip-outbound-ports", opts.skip_outbound_ports]
    if opts.iptables_restore != InjectOptions.iptables_restore:
        args += ["--iptables-restore", opts.iptables_restore]
    return {
        "name": INIT,
        "image": opts.image,
        "args": args,
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": False,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
        },
        "resources": {"requests": {"cpu": "10m", "memory": "32Mi"},
                      "limits": {"memory": "64Mi"}},
        # iptables takes its lock file in /run; the root file system is read-only
        "volumeMounts": [{"name": "meshd-xtables-lock", "mountPath": "/run"}],
    }


def _field(name: str, path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def _sidecar(opts: InjectOptions) -> dict[str, Any]:
    def probe(path: str, period: int) -> dict[str, Any]:
        return {"httpGet": {"path": path, "port": opts.probe_port},
                "periodSeconds": period, "timeoutSeconds": 2}
    container: dict[str, Any] = {
        "name": SIDECAR,
        "image": opts.image,
        "args": ["run", "-c", "/etc/meshd/meshd.toml"],
        "ports": [
            {"name": "meshd-inbound", "containerPort": opts.inbound_port},
            {"name": "meshd-probe", "containerPort": opts.probe_port},
        ],
        "env": [
            _field("POD_IP", "status.podIP"),
            _field("POD_NAME", "metadata.name"),
            _field("POD_NAMESPACE", "metadata.namespace"),
            _field("POD_SERVICE_ACCOUNT", "spec.serviceAccountName"),
        ],
        "securityContext": {
            "runAsUser": PROXY_UID,
            "runAsGroup": PROXY_UID,
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "livenessProbe": probe("/live", 10),
        "readinessProbe": probe("/ready", 5),
        "resources": {"requests": {"cpu": opts.cpu_request, "memory": opts.memory_request},
                      "limits": {"memory": opts.memory_limit}},
        "volumeMounts": [
            {"name": "meshd-config", "mountPath": "/etc/meshd", "readOnly": True},
            {"name": "meshd-run", "mountPath": "/run/meshd"},
            {"name": "meshd-token", "mountPath": TOKEN_PATH, "readOnly": True},
        ],
    }
    if opts.native_sidecar:
        container["restartPolicy"] = "Always"
        container["startupProbe"] = {**probe("/ready", 1), "failureThreshold": 120}
    return container


def _volumes(opts: InjectOptions) -> list[dict[str, Any]]:
    return [
        {"name": "meshd-config", "configMap": {"name": opts.config_map}},
        {"name": "meshd-run", "emptyDir": {"medium": "Memory", "sizeLimit": "64Mi"}},
        {"name": "meshd-xtables-lock", "emptyDir": {}},
        {"name": "meshd-token", "projected": {"sources": [
            {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
            {"configMap": {"name": "kube-root-ca.crt",
                           "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
            {"downwardAPI": {"items": [{"path": "namespace",
                                        "fieldRef": {"fieldPath": "metadata.namespace"}}]}},
        ]}},
    ]


@click.command()
@click.option("-f", "--filename", "source", default="-", show_default=True,
              help="YAML file to inject ('-': standard input).")
@click.option("--image", default=InjectOptions.image, show_default=True,
              help="The meshd image (sidecar and init container).")
@click.option("--config-map", default=InjectOptions.config_map, show_default=True,
              help="ConfigMap holding meshd.toml.")
@click.option("--inbound-port", type=click.IntRange(1, 65535), default=4143, show_default=True)
@click.option("--outbound-port", type=click.IntRange(1, 65535), default=4140, show_default=True)
@click.option("--probe-port", type=click.IntRange(1, 65535), default=4192, show_default=True,
              help="[admin] probe_listen's port: the probes' target, never redirected.")
@click.option("--skip-inbound-ports", default="", metavar="PORTS",
              help="Inbound ports not redirected to meshd (beside the probe port).")
@click.option("--skip-outbound-ports", default="", metavar="PORTS",
              help="Outbound ports not redirected to meshd.")
@click.option("--native-sidecar/--container-sidecar", default=True, show_default=True,
              help="meshd as a restartable init container (Kubernetes >= 1.29), or as the "
                   "first container (older clusters; a Job's pod then never completes).")
@click.option("--iptables-restore", "iptables_restore", default="iptables-restore",
              show_default=True, type=click.Choice(["iptables-restore", "iptables-nft-restore",
                                                    "iptables-legacy-restore"]),
              help="The init container's restore command: the node's iptables backend.")
def inject(source: str, image: str, config_map: str, inbound_port: int, outbound_port: int,
           probe_port: int, skip_inbound_ports: str, skip_outbound_ports: str,
           native_sidecar: bool, iptables_restore: str) -> None:
    """Print Kubernetes YAML with meshd added to every Pod template (kubectl apply -f -)."""
    from meshd.cli.iptables import parse_ports
    for value, flag in ((skip_inbound_ports, "--skip-inbound-ports"),
                        (skip_outbound_ports, "--skip-outbound-ports")):
        try:
            parse_ports(value)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint=flag) from None
    try:
        if source == "-":
            text = sys.stdin.read(MAX_INPUT + 1)
        else:
            with open(source, encoding="utf-8") as f:
                text = f.read(MAX_INPUT + 1)
    except OSError as e:
        raise click.ClickException(f"cannot read {source}: {e.strerror or e}") from None
    if len(text) > MAX_INPUT:
        raise click.ClickException(f"{source}: more than {MAX_INPUT} bytes of YAML")
    opts = InjectOptions(image, config_map, inbound_port, outbound_port, probe_port,
                         skip_inbound_ports, skip_outbound_ports,
                         native_sidecar=native_sidecar, iptables_restore=iptables_restore)
    import yaml

    try:
        click.echo(inject_documents(text, opts), nl=False)
    except yaml.YAMLError as e:
        raise click.ClickException(f"{source}: not valid YAML: {e}") from None
