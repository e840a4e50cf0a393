#!/usr/bin/env bash
# Assembles the server's OCI image as an OCI image-layout archive (a plain tar holding
# `oci-layout`, `index.json` and `blobs/sha256/*`), without a container engine or a base image:
# one layer with the `shipinator` binary, exactly the shared libraries `ldd` says it needs (and
# the dynamic loader), the CA certificates when the machine has them, a non-root user and /tmp.
# The layer is deterministic (sorted entries, mtime 0, owner 0:0, gzip without name or time),
# so the same binary gives the same digests.
#
#   scripts/oci-image.sh OUT.tar        # prints the manifest digest (sha256:...) on stdout
#
# Which binary:
#   IMAGE_BINARY=PATH     that file
#   IMAGE_PROFILE=release (default) cargo build --release --locked -p shipinator-server --bin shipinator
#   IMAGE_PROFILE=debug   the debug binary cargo already built ($CARGO_TARGET_DIR/debug/shipinator)
# IMAGE_TAG names the image in index.json (org.opencontainers.image.ref.name; default `latest`).
# Needs bash, coreutils, GNU tar, gzip and ldd.
set -euo pipefail
export LC_ALL=C

die() { printf 'oci-image: error: %s\n' "$*" >&2; exit 2; }
say() { printf 'oci-image: %s\n' "$*" >&2; }

[ $# -eq 1 ] || die "usage: $0 OUT.tar (the OCI archive to write)"
out=$1
repo=$(cd "$(dirname "$0")/.." && pwd)
target_dir=${CARGO_TARGET_DIR:-$repo/target}
tag=${IMAGE_TAG:-latest}
case $tag in
    '' | *[!A-Za-z0-9_.-]*) die "IMAGE_TAG '$tag' is not a tag: use letters, digits, '_', '.' and '-'" ;;
esac

if [ -n "${IMAGE_BINARY:-}" ]; then
    binary=$IMAGE_BINARY
else
    case ${IMAGE_PROFILE:-release} in
        release)
            say "building the release binary"
            (cd "$repo" && cargo build --release --locked -p shipinator-server --bin shipinator >&2)
            binary=$target_dir/release/shipinator
            ;;
        debug)
            binary=$target_dir/debug/shipinator
            [ -e "$binary" ] || die "IMAGE_PROFILE=debug: $binary does not exist; build it first (cargo build -p shipinator-server --bin shipinator)"
            ;;
        *) die "IMAGE_PROFILE '${IMAGE_PROFILE}' is neither release nor debug" ;;
    esac
fi
[ -f "$binary" ] && [ -x "$binary" ] || die "$binary is not an executable file"

case $(uname -m) in
    x86_64) arch=amd64 ;;
    aarch64) arch=arm64 ;;
    *) die "unsupported machine $(uname -m): the image's architecture is that of the binary, which ldd reads here" ;;
esac

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
umask 022
root=$work/rootfs
mkdir -p "$root/usr/local/bin" "$root/etc" "$root/tmp"
chmod 1777 "$root/tmp"
install -m 0755 "$binary" "$root/usr/local/bin/shipinator"

# The shared objects, at the paths the loader looks for them. `ldd` prints
# `name => /path (0x...)` for libraries, `/path (0x...)` for the loader and no path for the vDSO.
ldd_out=$(ldd "$binary" 2>&1) || true
if grep -q 'not found' <<<"$ldd_out"; then
    die "ldd cannot resolve every library of $binary: $(grep 'not found' <<<"$ldd_out" | tr -s '\t\n' ' ')"
fi
libs=()
while read -r line; do
    case $line in
        *'=> /'*) lib=${line#*=> }; libs+=("${lib%% (*}") ;;
        /*) libs+=("${line%% (*}") ;;
    esac
done <<<"$ldd_out"
if [ ${#libs[@]} -eq 0 ]; then
    grep -qE 'statically linked|not a dynamic executable' <<<"$ldd_out" \
        || die "cannot read the libraries of $binary from ldd: $ldd_out"
fi
for lib in "${libs[@]}"; do
    real=$(readlink -f "$lib") || die "cannot resolve $lib"
    mkdir -p "$root$(dirname "$lib")"
    cp "$real" "$root$lib"
    chmod "$(stat -c %a "$real")" "$root$lib"
done

env_json='"PATH=/usr/local/bin:/usr/bin:/bin"'
certs=/etc/ssl/certs/ca-certificates.crt
if [ -f "$certs" ]; then
    mkdir -p "$root/etc/ssl/certs"
    install -m 0644 "$certs" "$root$certs"
    env_json="$env_json,\"SSL_CERT_FILE=$certs\""
else
    say "no $certs here: the image holds no CA certificates"
fi
printf 'root:x:0:0:root:/root:/sbin/nologin\nshipinator:x:65532:65532:shipinator:/tmp:/sbin/nologin\n' >"$root/etc/passwd"
printf 'root:x:0:\nshipinator:x:65532:\n' >"$root/etc/group"
printf 'hosts: files dns\n' >"$root/etc/nsswitch.conf"

# Every directory and file the same on every build: the walk is sorted, times and owners fixed.
find "$root" -mindepth 1 -type d -exec chmod u=rwx,go=rx {} +
chmod 1777 "$root/tmp"
tar_det=(--format=ustar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner)
layout=$work/layout
mkdir -p "$layout/blobs/sha256"
(cd "$root" && tar "${tar_det[@]}" -cf "$work/layer.tar" -- *)
diff_id=$(sha256sum "$work/layer.tar" | cut -d' ' -f1)
gzip -n -6 -c "$work/layer.tar" >"$work/layer.tar.gz"

blob() { # FILE -> moves it into the layout, prints "<hex> <size>"
    local hex size
    hex=$(sha256sum "$1" | cut -d' ' -f1)
    size=$(stat -c %s "$1")
    mv "$1" "$layout/blobs/sha256/$hex"
    printf '%s %s\n' "$hex" "$size"
}
read -r layer_hex layer_size < <(blob "$work/layer.tar.gz")

printf '%s' '{"architecture":"'"$arch"'","os":"linux","config":{"User":"65532:65532","Env":['"$env_json"'],"Entrypoint":["/usr/local/bin/shipinator"],"Cmd":["serve","--config","/etc/shipinator/server.toml"],"WorkingDir":"/","ExposedPorts":{"8080/tcp":{}}},"rootfs":{"type":"layers","diff_ids":["sha256:'"$diff_id"'"]}}' >"$work/config.json"
read -r config_hex config_size < <(blob "$work/config.json")

printf '%s' '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:'"$config_hex"'","size":'"$config_size"'},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:'"$layer_hex"'","size":'"$layer_size"'}]}' >"$work/manifest.json"
read -r manifest_hex manifest_size < <(blob "$work/manifest.json")

printf '%s' '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:'"$manifest_hex"'","size":'"$manifest_size"',"annotations":{"org.opencontainers.image.ref.name":"'"$tag"'"}}]}' >"$layout/index.json"
printf '%s' '{"imageLayoutVersion":"1.0.0"}' >"$layout/oci-layout"
find "$layout" -type f -exec chmod 0644 {} +

mkdir -p "$(dirname "$out")"
(cd "$layout" && tar "${tar_det[@]}" -cf "$work/image.tar" oci-layout index.json blobs)
mv "$work/image.tar" "$out"
say "wrote $out: ${#libs[@]} shared objects, layer $layer_size bytes, manifest sha256:$manifest_hex"
printf 'sha256:%s\n' "$manifest_hex"
