# pg-tls-proxy container image: a multi-stage build, a distroless (glibc,
# no shell) runtime, running as a non-root user.
#
#   docker build -t pg-tls-proxy .
#   docker run --rm -p 6432:6432 -v $PWD/proxy.toml:/etc/pg-tls-proxy/pg-tls-proxy.toml:ro \
#     -v $PWD/certs:/etc/pg-tls-proxy/tls:ro pg-tls-proxy
#
# The image has no shell, so Kubernetes preStop hooks use the native
# `sleep` action (examples/kubernetes/statefulset.yaml).

FROM rust:1.95-bookworm AS build
WORKDIR /src
# Dependencies first, so that source edits do not rebuild them.
COPY Cargo.toml Cargo.lock build.rs ./
RUN mkdir -p src benches && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && echo 'fn main() {}' > benches/micro.rs \
    && cargo build --release --locked --bin pg-tls-proxy || true
COPY src ./src
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin pg-tls-proxy \
    && strip target/release/pg-tls-proxy

# glibc (malloc_trim) and CA certificates, no shell, uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/pg-tls-proxy /usr/local/bin/pg-tls-proxy
COPY config/pg-tls-proxy.toml /etc/pg-tls-proxy/pg-tls-proxy.toml
USER nonroot:nonroot
EXPOSE 6432 9187
ENTRYPOINT ["/usr/local/bin/pg-tls-proxy"]
CMD ["--config", "/etc/pg-tls-proxy/pg-tls-proxy.toml"]
