# The worker image: what the Kubernetes executor runs (`[kubernetes] worker_image`,
# `default_image` and `deploy_image` in deploy/30-server-config.yaml).
#
# - `/usr/local/bin/shipinator`, statically linked (musl): the init container of every execution
#   pod copies it (`cp`, so the image keeps coreutils) into the step's image, whatever its libc
#   (`K8sConfig::worker_binary`).
# - Build and deploy tools: git, kubectl, helm, a Go toolchain, buildah and skopeo for OCI images
#   (daemonless; `BUILDAH_ISOLATION=chroot` and the vfs driver work in an unprivileged pod), and
#   the Rust toolchain of the base image, so Shipinator's own pipeline (.shipinator.yaml) builds
#   in it too.
#
# Every download is pinned to a version and checked against its published SHA-256 before use;
# Debian packages come through apt's signed archives. To bump a tool, change its version and
# both checksums together (Go: https://go.dev/dl/?mode=json; kubectl: the `.sha256` file next to
# the binary on dl.k8s.io; helm: the `.sha256sum` file next to the archive on get.helm.sh).
#
#   docker build -f builders/builder.Dockerfile -t registry.example/shipinator-worker:1 .
#
# Not built by CI: the machines the project runs on cannot pull base images (no registry but
# the package registries). The server image needs no Dockerfile: scripts/oci-image.sh assembles
# it without a container engine, and CI builds and checks that one.

ARG RUST_VERSION=1.89

FROM rust:${RUST_VERSION}-bookworm AS build
ARG TARGETARCH
RUN apt-get update \
    && apt-get install -y --no-install-recommends musl-tools \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN set -eux; \
    case "${TARGETARCH:-amd64}" in \
        amd64) triple=x86_64-unknown-linux-musl ;; \
        arm64) triple=aarch64-unknown-linux-musl ;; \
        *) echo "unsupported architecture ${TARGETARCH}" >&2; exit 1 ;; \
    esac; \
    rustup target add "$triple"; \
    cargo build --release --locked --target "$triple" -p shipinator-server --bin shipinator; \
    install -D -m 0755 "target/$triple/release/shipinator" /out/shipinator

FROM debian:bookworm-slim AS tools
ARG TARGETARCH
ARG GO_VERSION=1.26.1
ARG GO_SHA256_AMD64=031f088e5d955bab8657ede27ad4e3bc5b7c1ba281f05f245bcc304f327c987a
ARG GO_SHA256_ARM64=a290581cfe4fe28ddd737dde3095f3dbeb7f2e4065cab4eae44dfc53b760c2f7
ARG KUBECTL_VERSION=v1.37.1
ARG KUBECTL_SHA256_AMD64=65691ff77eb6fa44c908b77a1082c9f092c3b9733b5cefabec0d1104890e21a8
ARG KUBECTL_SHA256_ARM64=ff749f4b78d9c4f1ec87307df9b50119ed819e2094aa9810cb9acffc3286c8c7
ARG HELM_VERSION=v3.21.0
ARG HELM_SHA256_AMD64=0093eb572e3d2380f094df162ddb525e219249de88957afe24cfbb19632acd36
ARG HELM_SHA256_ARM64=8de5a0c9a47431e59fd560e91e0779c8cf9316c383da7efb84128a4c339ecb2d
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*
RUN set -eux; \
    arch="${TARGETARCH:-amd64}"; \
    case "$arch" in \
        amd64) go_sha="$GO_SHA256_AMD64"; kubectl_sha="$KUBECTL_SHA256_AMD64"; helm_sha="$HELM_SHA256_AMD64" ;; \
        arm64) go_sha="$GO_SHA256_ARM64"; kubectl_sha="$KUBECTL_SHA256_ARM64"; helm_sha="$HELM_SHA256_ARM64" ;; \
        *) echo "unsupported architecture $arch" >&2; exit 1 ;; \
    esac; \
    mkdir -p /out/bin; cd /tmp; \
    curl -fsSL -o go.tar.gz "https://go.dev/dl/go${GO_VERSION}.linux-${arch}.tar.gz"; \
    echo "${go_sha}  go.tar.gz" | sha256sum -c -; \
    tar -C /out -xzf go.tar.gz; \
    curl -fsSL -o kubectl "https://dl.k8s.io/release/${KUBECTL_VERSION}/bin/linux/${arch}/kubectl"; \
    echo "${kubectl_sha}  kubectl" | sha256sum -c -; \
    install -m 0755 kubectl /out/bin/kubectl; \
    curl -fsSL -o helm.tar.gz "https://get.helm.sh/helm-${HELM_VERSION}-linux-${arch}.tar.gz"; \
    echo "${helm_sha}  helm.tar.gz" | sha256sum -c -; \
    tar -xzf helm.tar.gz "linux-${arch}/helm"; \
    install -m 0755 "linux-${arch}/helm" /out/bin/helm; \
    rm -rf /tmp/*

FROM rust:${RUST_VERSION}-slim-bookworm
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        ca-certificates git openssh-client buildah skopeo fuse-overlayfs uidmap \
    && rm -rf /var/lib/apt/lists/*
COPY --from=tools /out/go /usr/local/go
COPY --from=tools /out/bin/kubectl /out/bin/helm /usr/local/bin/
COPY --from=build /out/shipinator /usr/local/bin/shipinator
ENV PATH="/usr/local/go/bin:${PATH}" \
    BUILDAH_ISOLATION=chroot \
    STORAGE_DRIVER=vfs
RUN set -eux; \
    shipinator --version; git --version; kubectl version --client; helm version --short; \
    go version; buildah --version; skopeo --version; cargo --version; cp --version >/dev/null
ENTRYPOINT ["/usr/local/bin/shipinator"]
