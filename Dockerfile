# For those who build images with a container daemon. Without one, `cargo xtask image`
# writes an equivalent OCI archive (see README.md, "The image").
#
# The eBPF programs are built by the agent's build.rs with the nightly toolchain and
# bpf-linker; `cargo xtask build` sets that up (rust-src, bpf-linker against the nightly's
# LLVM), so the builder runs it.
FROM rust:1.95-bookworm AS build
RUN rustup toolchain install nightly --profile minimal --component rust-src
WORKDIR /src
COPY . .
RUN cargo xtask build

# glibc, libgcc_s and libm are what the binary links (ldd); distroless/cc has them.
FROM gcr.io/distroless/cc-debian12
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="pipeguard" \
      org.opencontainers.image.source="https://github.com/pipeguard/pipeguard" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /src/target/release/pipeguard /usr/local/bin/pipeguard
ENTRYPOINT ["/usr/local/bin/pipeguard"]
CMD ["agent"]
