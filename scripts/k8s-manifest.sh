#!/usr/bin/env bash
# Renders the server's Kubernetes objects (deploy/ files numbered 30 and up: its ConfigMap,
# Deployment and Service) into one multi-document YAML file for `kubectl apply`, with the
# Deployment's image set to the digest reference of an OCI archive from scripts/oci-image.sh:
# IMAGE_REPOSITORY@sha256:<manifest digest>. A digest pins exactly the image that was built.
#
#   IMAGE_REPOSITORY=registry.example/shipinator scripts/k8s-manifest.sh IMAGE.tar OUT.yaml
#
# The files below 30 (namespace, service accounts, RBAC, claims) are applied once by an
# administrator (deploy/README.md), not by the deploy stage.
set -euo pipefail
export LC_ALL=C

die() { printf 'k8s-manifest: error: %s\n' "$*" >&2; exit 2; }

[ $# -eq 2 ] || die "usage: $0 IMAGE.tar OUT.yaml"
archive=$1
out=$2
repo=$(cd "$(dirname "$0")/.." && pwd)
# The image line of 40-server-deployment.yaml that the rendering replaces.
placeholder='registry.example/shipinator:latest'

repository=${IMAGE_REPOSITORY:-}
[ -n "$repository" ] || die "IMAGE_REPOSITORY is not set: name the repository the image is pushed to (registry.example/shipinator)"
[[ $repository =~ ^[a-z0-9.-]+(:[0-9]+)?(/[a-z0-9._-]+)+$ ]] \
    || die "IMAGE_REPOSITORY '$repository' is not a repository (host[:port]/path, lowercase, no tag or digest)"

[ -f "$archive" ] || die "$archive does not exist (write it with scripts/oci-image.sh)"
index=$(tar -xOf "$archive" index.json 2>/dev/null) || die "$archive is not an OCI archive: it has no index.json"
digest=$(grep -oE '"digest":"sha256:[0-9a-f]{64}"' <<<"$index" | head -n1 | cut -d'"' -f4)
[ -n "$digest" ] || die "$archive: index.json names no manifest digest"
image="$repository@$digest"

files=("$repo"/deploy/[3-9][0-9]-*.yaml)
[ -e "${files[0]}" ] || die "no files numbered 30 and up in $repo/deploy"
found=$(cat "${files[@]}" | grep -c "^ *image: $placeholder\$" || true)
[ "$found" = 1 ] || die "expected one 'image: $placeholder' line in deploy/ files 30 and up, found $found"

mkdir -p "$(dirname "$out")"
{
    for f in "${files[@]}"; do
        printf -- '---\n# From deploy/%s\n' "$(basename "$f")"
        sed "s|^\( *image: \)$placeholder\$|\1$image|" "$f"
    done
} >"$out.tmp"
mv "$out.tmp" "$out"
printf 'k8s-manifest: wrote %s (%d objects, image %s)\n' "$out" "${#files[@]}" "$image" >&2
