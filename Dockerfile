# syntax=docker/dockerfile:1
#
# etcd-guard container image: the Rust binary and the shipped policies on a distroless base, as a non-root user.
#
#   docker build -t etcd-guard:dev .
#   docker run --rm etcd-guard:dev --help
#   docker run --rm -v $PWD/pki:/certs:ro -v $PWD/etcd-guard.yaml:/etc/etcd-guard/etcd-guard.yaml:ro \
#       -v etcd-guard-audit:/var/log/etcd-guard -p 127.0.0.1:23790:23790 -p 127.0.0.1:23791:23791 etcd-guard:dev
#
# The configuration should set `audit.file: /var/log/etcd-guard/audit.log` (the default, audit.log beside the
# configuration, is in a read-only place here) and, to publish the health listener, `metrics_listen: "0.0.0.0:23791"`.
# The image runs as uid 65532: the keys in ./pki must be readable by it (`etcd-guard certs init` writes them 0600 for
# the user who ran it: `sudo chown -R 65532 pki`, or `docker run --user "$(id -u)"`).
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
# (`certs init --dir /certs` in docker-compose.yml; `audit.file: /var/log/etcd-guard/audit.log`).
COPY --from=build --chown=65532:65532 /out/certs /certs
COPY --from=build --chown=65532:65532 /out/var/log/etcd-guard /var/log/etcd-guard
# distroless's `nonroot` user (65532:65532); never root.
USER 65532:65532
# 23790: the etcd v3 gRPC listener for clients (mutual TLS).
# 23791: the plain-HTTP listener (`metrics_listen`): /healthz (alive), /readyz (an etcd endpoint is healthy and the
# audit log is writable), /metrics (Prometheus, etcd_guard_*). It has no authentication and listens on
# 127.0.0.1:23791 by default, which nothing outside the container reaches: to publish it, set
# `metrics_listen: "0.0.0.0:23791"` in the configuration (deploy/compose/etcd-guard.yaml does) and publish the port
# on a trusted address only.
EXPOSE 23790 23791
# No HEALTHCHECK: the image has no shell or HTTP client. Orchestrators probe /healthz and /readyz on 23791
# (docker-compose.yml publishes it on the host's 127.0.0.1; deploy/kubernetes/etcd-guard.yaml probes it).
# Reload policy and certificates with SIGHUP (`docker kill -s HUP <container>`); SIGTERM stops gracefully.
ENTRYPOINT ["/usr/local/bin/etcd-guard"]
CMD ["serve", "--config", "/etc/etcd-guard/etcd-guard.yaml"]
