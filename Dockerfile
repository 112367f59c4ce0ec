# The operator node as a container: `rba tangle run`, what the Blueprint Manager starts for a
# container source (blueprint.json), and `rba serve` for a plain node.
#
#   docker build -t rba .
#   docker run --rm rba run --test-mode   # with the blueprint environment (BLUEPRINT_ID, …)
#
# The node runs cargo for its customers, so the runtime image is a Rust image, not a slim base;
# the sandbox (hakoniwa: user namespaces, seccomp) needs the container started with user
# namespaces allowed (e.g. `--security-opt seccomp=unconfined` or a profile allowing `clone`
# with CLONE_NEWUSER) and `newuidmap`.

FROM rust:1-bookworm AS build
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      libseccomp-dev pkg-config cmake protobuf-compiler libprotobuf-dev libclang-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p rba-agent --features tangle \
 && install -m 0755 target/release/rba /usr/local/bin/rba

FROM rust:1-slim-bookworm
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      libseccomp2 uidmap ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 rba
COPY --from=build /usr/local/bin/rba /usr/local/bin/rba
USER rba
# Listen on the container's interfaces (the defaults are loopback): libp2p on 7420 (TCP and
# QUIC), HTTP/WebSocket on 7421 (customers follow their sessions there; register its public
# URL with --rpc-address / RBA_TANGLE_RPC_ADDRESS).
ENV DATA_DIR=/home/rba/blueprint \
    RBA_LISTEN=/ip4/0.0.0.0/tcp/7420 \
    RBA_HTTP_LISTEN=0.0.0.0:7421
VOLUME ["/home/rba/blueprint"]
EXPOSE 7420 7421
ENTRYPOINT ["/usr/local/bin/rba", "tangle"]
CMD ["run"]
