#!/usr/bin/env bash
# Validates the packaging offline: the Kubernetes manifests under deploy/ against the
# API schemas bundled in kubernetes-validate (strict: unknown fields are errors), that
# every file deploy/kustomization.yaml names exists, and docker-compose.yml: its shape
# always, and `docker compose config` where the compose plugin is present.
#
#   bash scripts/validate-deploy.sh
set -euo pipefail
cd "$(dirname "$0")/.."

K8S_VERSION=1.29.0
KUBERNETES_VALIDATE_VERSION=1.37.0

venv=target/tools/deploy-venv
if [ ! -x "$venv/bin/kubernetes-validate" ]; then
  echo "validate-deploy: installing kubernetes-validate==$KUBERNETES_VALIDATE_VERSION into $venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
fi

manifests=()
for file in deploy/*.yaml; do
  # kustomize's own file is not a Kubernetes resource.
  [ "$(basename "$file")" = kustomization.yaml ] || manifests+=("$file")
done
echo "validate-deploy: kubernetes-validate --strict -k $K8S_VERSION ${manifests[*]}"
"$venv/bin/kubernetes-validate" --strict --quiet -k "$K8S_VERSION" "${manifests[@]}"

"$venv/bin/python" - <<'PY'
import pathlib, sys
import yaml  # comes with kubernetes-validate
k = yaml.safe_load(pathlib.Path("deploy/kustomization.yaml").read_text())
missing = [r for r in k.get("resources", []) if not (pathlib.Path("deploy") / r).is_file()]
if missing:
    sys.exit(f"validate-deploy: deploy/kustomization.yaml names missing files: {missing}")
print(f"validate-deploy: kustomization.yaml resources present ({len(k['resources'])})")
# The Secret comes from a generator reading a file nobody commits; its example must
# carry every key the Deployments read.
generated = {g["name"]: g for g in k.get("secretGenerator", [])}
if "agentrun" not in generated:
    sys.exit("validate-deploy: kustomization.yaml must generate the Secret agentrun")
example = pathlib.Path("deploy/agentrun.env.example").read_text()
keys = {line.split("=", 1)[0] for line in example.splitlines() if "=" in line and not line.startswith("#")}
import re
wanted = set(re.findall(r"key: ([a-z-]+)", pathlib.Path("deploy/manager.yaml").read_text()
                        + pathlib.Path("deploy/runner.yaml").read_text()))
if wanted - keys:
    sys.exit(f"validate-deploy: agentrun.env.example lacks {sorted(wanted - keys)}")
print(f"validate-deploy: the Secret is generated from agentrun.env ({sorted(keys)})")

# KEDA's ScaledObject is a custom resource (no schema here): its shape, and that it
# scales the runner Deployment in place of the HPA.
keda = yaml.safe_load(pathlib.Path("deploy/keda/runner-scaledobject.yaml").read_text())
assert keda["apiVersion"] == "keda.sh/v1alpha1" and keda["kind"] == "ScaledObject", keda
assert keda["spec"]["scaleTargetRef"]["name"] == "agentrun-runner", keda
trigger = keda["spec"]["triggers"][0]
assert trigger["type"] == "prometheus" and "agentrun_queue_depth" in trigger["metadata"]["query"], trigger
kk = yaml.safe_load(pathlib.Path("deploy/keda/kustomization.yaml").read_text())
assert "runner-scaledobject.yaml" in kk["resources"] and "../" in kk["resources"], kk
assert any(p["target"]["kind"] == "HorizontalPodAutoscaler" for p in kk["patches"]), kk
print("validate-deploy: deploy/keda: a ScaledObject on queue depth replacing the HPA")
PY

# The Grafana dashboard: valid JSON, and every metric its queries name is one the
# manager or the runner registers (names read from their code).
"$venv/bin/python" - <<'PY'
import json, pathlib, re, sys
dashboard = json.loads(pathlib.Path("deploy/grafana/agentrun.json").read_text())
exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
known = set()
for path, prefix in [("manager/src/metrics.rs", "agentrun_"), ("runner/src/observe.rs", "agentrun_runner_")]:
    for name in re.findall(r'register\(\s*"([a-z_]+)"', pathlib.Path(path).read_text()):
        full = name if name.startswith("grpc_") else prefix + name
        known |= {full, full + "_total", full + "_bucket", full + "_sum", full + "_count"}
# Label matchers and `by (...)` name labels, not metrics.
bare = [re.sub(r"\{[^}]*\}|by \([^)]*\)", "", e) for e in exprs]
used = {m for e in bare for m in re.findall(r"\b((?:agentrun|grpc)_[a-z_]+)", e)}
unknown = sorted(used - known)
if unknown:
    sys.exit(f"validate-deploy: the dashboard queries unknown metrics: {unknown}")
print(f"validate-deploy: deploy/grafana/agentrun.json: {len(exprs)} queries over {len(used)} known metrics")
PY

# Without the compose plugin, at least: the file parses, has the three services, and the
# runner can be scaled (no container_name, no fixed host port).
"$venv/bin/python" - <<'PY'
import pathlib, sys
import yaml
services = yaml.safe_load(pathlib.Path("docker-compose.yml").read_text())["services"]
missing = {"postgres", "manager", "runner"} - services.keys()
if missing:
    sys.exit(f"validate-deploy: docker-compose.yml lacks services {sorted(missing)}")
runner = services["runner"]
if "container_name" in runner or "ports" in runner:
    sys.exit("validate-deploy: the runner service cannot be scaled (container_name or ports)")
conditions = {"service_started", "service_healthy", "service_completed_successfully"}
for name, service in services.items():
    for needed, how in (service.get("depends_on") or {}).items():
        if needed not in services:
            sys.exit(f"validate-deploy: {name} depends on an unknown service {needed}")
        condition = how.get("condition", "service_started")
        if condition not in conditions:
            sys.exit(f"validate-deploy: {name}: unknown condition {condition}")
        if condition == "service_healthy" and "healthcheck" not in services[needed]:
            sys.exit(f"validate-deploy: {name} waits for {needed} to be healthy, which has no healthcheck")
if runner["depends_on"].get("runner-key", {}).get("condition") != "service_completed_successfully":
    sys.exit("validate-deploy: the runners must wait for their key (runner-key)")
print("validate-deploy: docker-compose.yml has postgres, a healthy manager, the runner key bootstrap and a scalable runner")
PY

if docker compose version >/dev/null 2>&1; then
  echo "validate-deploy: docker compose config -q"
  docker compose config -q
else
  echo "validate-deploy: skipped docker-compose.yml check: 'docker compose' is not available here"
fi
echo "validate-deploy: ok"
