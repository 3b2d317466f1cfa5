# syntax=docker/dockerfile:1
#
# etcd-guard container image: the Rust binary and the shipped policies on a distroless base, as a non-root user.
#
#   docker build -t etcd-guard:dev .
#   docker run --rm etcd-guard:dev --help
#   docker run --rm -v $PWD/pki:/certs:ro -v $PWD/etcd-guard.yaml:/etc/etcd-guard/etcd-guard.yaml:ro \
#       -p 23790:23790 etcd-guard:dev
#
# docker-compose.yml builds this file; docs/deployment.md describes the deployments.

# --- build -------------------------------------------------------------------------------------------------
FROM rust:1-bookworm AS build
WORKDIR /src
# The protos are compiled by protox (pure Rust): no protoc needed.
COPY . .
# Cache mounts keep the crate registry and build output between builds (BuildKit, the default builder).
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p etcd-guard \
    && install -D -m 0755 target/release/etcd-guard /out/usr/local/bin/etcd-guard \
    && mkdir -p /out/certs /out/var/log/etcd-guard

# --- runtime -----------------------------------------------------------------------------------------------
# glibc and libgcc_s only (Debian 12, the same release as the builder), no shell, no package manager.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/usr/local/bin/etcd-guard /usr/local/bin/etcd-guard
COPY --chown=0:0 policies/ /etc/etcd-guard/policies/
# Mount points owned by the runtime user, so fresh named volumes mounted there are writable by it
# (`certs init --dir /certs` in docker-compose.yml, an audit log directory).
COPY --from=build --chown=65532:65532 /out/certs /certs
COPY --from=build --chown=65532:65532 /out/var/log/etcd-guard /var/log/etcd-guard
# distroless's `nonroot` user (65532:65532); never root.
USER 65532:65532
# 23790: the etcd v3 gRPC listener for clients (mutual TLS).
# 9090: the plain-HTTP health and metrics listener (`metrics_listen`: /healthz, /readyz, /metrics) — it comes
# with the metrics work of issue #4; until then nothing listens there.
EXPOSE 23790 9090
# No HEALTHCHECK: the image has no shell or HTTP client. Orchestrators probe http://<host>:9090/healthz and
# /readyz once the metrics listener exists (see deploy/kubernetes/etcd-guard.yaml).
ENTRYPOINT ["/usr/local/bin/etcd-guard"]
CMD ["serve", "--config", "/etc/etcd-guard/etcd-guard.yaml"]
