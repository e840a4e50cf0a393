#!/usr/bin/env bash
# Pushes an OCI archive from scripts/oci-image.sh to IMAGE_REPOSITORY with skopeo, keeping its
# digests (the deploy stage's manifest names the image by digest), tagged with the commit.
#
#   IMAGE_REPOSITORY=registry.example/shipinator scripts/oci-push.sh IMAGE.tar
#
# IMAGE_PUSH=0 skips the push and says so: for runs with no registry (CI's dogfood run).
# Registry credentials: skopeo's usual places (REGISTRY_AUTH_FILE, $XDG_RUNTIME_DIR/containers/auth.json).
set -euo pipefail

die() { printf 'oci-push: error: %s\n' "$*" >&2; exit 2; }

[ $# -eq 1 ] || die "usage: $0 IMAGE.tar"
archive=$1
[ -f "$archive" ] || die "$archive does not exist (write it with scripts/oci-image.sh)"
if [ "${IMAGE_PUSH:-1}" = 0 ]; then
    printf 'oci-push: IMAGE_PUSH=0: not pushing %s\n' "$archive" >&2
    exit 0
fi
[ -n "${IMAGE_REPOSITORY:-}" ] || die "IMAGE_REPOSITORY is not set: name the repository to push to"
command -v skopeo >/dev/null 2>&1 || die "skopeo is not installed (the worker image has it; or set IMAGE_PUSH=0 to skip the push)"
tag=${IMAGE_TAG:-${SHIPINATOR_SHORT_COMMIT:-}}
[ -n "$tag" ] || die "no tag: set IMAGE_TAG (inside a pipeline, SHIPINATOR_SHORT_COMMIT is used)"
skopeo copy --preserve-digests "oci-archive:$archive" "docker://$IMAGE_REPOSITORY:$tag"
