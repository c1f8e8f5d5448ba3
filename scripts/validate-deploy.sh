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
print("validate-deploy: docker-compose.yml has postgres, manager and a scalable runner")
PY

if docker compose version >/dev/null 2>&1; then
  echo "validate-deploy: docker compose config -q"
  docker compose config -q
else
  echo "validate-deploy: skipped docker-compose.yml check: 'docker compose' is not available here"
fi
echo "validate-deploy: ok"
