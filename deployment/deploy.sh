#!/usr/bin/env bash
# Render, apply or delete one overlay, with optional components, image and namespace:
#   IMAGE=quay.io/me/tgis:0.1 COMPONENTS="tls" NAMESPACE=llm deployment/deploy.sh apply flan-ul2
# (`make manifests|deploy|undeploy OVERLAY=...` call this). It builds a throwaway kustomization on top of the
# overlay, so nothing under deployment/ is edited.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
usage() { echo "usage: $0 render|apply|delete OVERLAY (overlays: $(ls "$here/overlays" | tr '\n' ' '))" >&2; exit 2; }
[ $# -eq 2 ] || usage
action=$1 overlay=$2
[ -f "$here/overlays/$overlay/kustomization.yaml" ] || usage
command -v kubectl >/dev/null || { echo "kubectl not found (it renders the manifests: kubectl kustomize)" >&2; exit 1; }

# inside deployment/: kustomize only takes relative paths to the overlay and components
tmp=$(mktemp -d "$here/.render.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
{
  echo "apiVersion: kustomize.config.k8s.io/v1beta1"
  echo "kind: Kustomization"
  echo "resources: [../overlays/$overlay]"
  if [ -n "${COMPONENTS:-}" ]; then
    echo "components:"
    for c in $COMPONENTS; do
      [ -f "$here/components/$c/kustomization.yaml" ] || { echo "no component $c in $here/components" >&2; exit 2; }
      echo "  - ../components/$c"
    done
  fi
  [ -z "${NAMESPACE:-}" ] || echo "namespace: \"$NAMESPACE\""
  if [ -n "${IMAGE:-}" ]; then  # name[:tag] or name@digest; a registry port (host:5000/x) is not a tag
    echo "images:"
    echo "  - name: tgis"
    last=${IMAGE##*/}
    if [[ $IMAGE == *@* ]]; then
      echo "    newName: \"${IMAGE%@*}\""
      echo "    digest: \"${IMAGE#*@}\""
    elif [[ $last == *:* ]]; then
      echo "    newName: \"${IMAGE%:*}\""
      echo "    newTag: \"${IMAGE##*:}\""
    else
      echo "    newName: \"$IMAGE\""
    fi
  fi
} > "$tmp/kustomization.yaml"

case $action in
  render) kubectl kustomize "$tmp" ;;
  apply) kubectl apply -k "$tmp" ;;
  delete) kubectl delete -k "$tmp" ;;
  *) usage ;;
esac
