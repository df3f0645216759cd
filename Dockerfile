# syntax=docker/dockerfile:1
# The gateway's container images (the Helm chart in charts/dispatch-gateway runs them):
#
#   docker build -t dispatch:0.1.0 .                        the gateway alone, on distroless
#   docker build --target local -t dispatch:0.1.0-local .   plus python3 and node, for functions
#                                                           run by the local driver (no OpenFaaS)
#
# Both run `dispatch serve` as user 65532 (numeric, so that Kubernetes' runAsNonRoot can
# check it), listening on 0.0.0.0:8080, with the data dir /var/lib/dispatch. charts/check.sh
# lints this file (hadolint) and checks that .dockerignore keeps every file the build reads.

ARG RUST_IMAGE=rust:1.95-slim-bookworm

# ---- build: the release binary (fat LTO, as Cargo.toml's release profile says) ----
FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
# The cache mounts keep the crates and the dependencies' objects between builds (BuildKit).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin dispatch \
    && install -D -m 0755 target/release/dispatch /out/dispatch \
    && install -d -m 0700 /out/data

# ---- local: the binary with the interpreters of the local driver's runtimes ----
FROM debian:bookworm-slim AS local
# python3 and node on PATH are what [runtimes] in config/dispatch.toml looks for; tini
# reaps processes that function handlers leave behind and passes SIGTERM on to the gateway.
# Debian's versions are those of the base image's bookworm release (python 3.11, node 18).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 nodejs tini \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 65532 nonroot \
    && useradd --system --uid 65532 --gid 65532 --no-create-home \
        --home-dir /var/lib/dispatch --shell /usr/sbin/nologin nonroot \
    && install -d -m 0700 -o 65532 -g 65532 /var/lib/dispatch
COPY --from=build /out/dispatch /usr/local/bin/dispatch
ENV DISPATCH_LISTEN=0.0.0.0:8080 \
    DISPATCH_API_HTTP=0.0.0.0:8081 \
    DISPATCH_API_HTTPS=0.0.0.0:8443 \
    DISPATCH_DATA_DIR=/var/lib/dispatch
USER 65532:65532
WORKDIR /var/lib/dispatch
# 8080: control API, OpenFaaS surface, /healthz, /readyz, /metrics. 8081 and 8443: API
# endpoints over HTTP and HTTPS (on all addresses, as the ports are exposed; the flags
# --api-http and --api-https, which the chart passes, override the variables).
EXPOSE 8080 8081 8443
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/dispatch", "serve"]

# ---- gateway (the default target, the last stage): the binary alone ----
# distroless/cc brings glibc and libgcc_s, all the binary links; it has no shell.
FROM gcr.io/distroless/cc-debian12:nonroot AS gateway
COPY --from=build /out/dispatch /usr/local/bin/dispatch
COPY --from=build --chown=65532:65532 /out/data/ /var/lib/dispatch/
ENV DISPATCH_LISTEN=0.0.0.0:8080 \
    DISPATCH_API_HTTP=0.0.0.0:8081 \
    DISPATCH_API_HTTPS=0.0.0.0:8443 \
    DISPATCH_DATA_DIR=/var/lib/dispatch
USER 65532:65532
WORKDIR /var/lib/dispatch
EXPOSE 8080 8081 8443
ENTRYPOINT ["/usr/local/bin/dispatch", "serve"]
