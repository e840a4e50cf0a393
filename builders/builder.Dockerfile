# The worker image: holds a statically linked `shipinator` binary that the Kubernetes
# executor's init container copies into each execution pod (`K8sConfig::worker_binary`).
# Static (musl) so it runs inside any user image, whatever its libc.
#
#   docker build -f builders/builder.Dockerfile -t registry.example/shipinator-worker:1 .

FROM rust:1.89-bookworm AS build
RUN rustup target add x86_64-unknown-linux-musl \
    && apt-get update \
    && apt-get install -y --no-install-recommends musl-tools \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --target x86_64-unknown-linux-musl -p shipinator-server --bin shipinator

# `cp` must exist in this image: the init container runs `cp <worker_binary> <dest>`.
FROM busybox:1.36-musl
COPY --from=build /src/target/x86_64-unknown-linux-musl/release/shipinator /usr/local/bin/shipinator
ENTRYPOINT ["/usr/local/bin/shipinator"]
