# ShopVerse: one image for every role (appliance, gateway, a single service).
#   docker build -t shopverse .
#   docker run -p 8080:8080 -p 9090:9090 -v shopverse:/var/lib/shopverse shopverse up --demo
# Build stage: the workspace with its locked dependencies.
FROM rust:1.88-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked \
 && strip target/release/shopverse

# Runtime stage: the binary, the shipped configuration, a non-root user, nothing else.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/shopverse --shell /usr/sbin/nologin shopverse \
 && install -d -o shopverse -g shopverse -m 0700 /var/lib/shopverse
COPY --from=build /src/target/release/shopverse /usr/local/bin/shopverse
COPY configs/ /etc/shopverse/
USER 10001:10001
# In a container the listeners face the container network, not loopback.
ENV SHOPVERSE_GATEWAY__LISTEN=0.0.0.0:8080 \
    SHOPVERSE_ADMIN__LISTEN=0.0.0.0:9090 \
    SHOPVERSE_TELEMETRY__LOG_FORMAT=json \
    SHOPVERSE_DATA__DIR=/var/lib/shopverse
VOLUME ["/var/lib/shopverse"]
EXPOSE 8080 9090
HEALTHCHECK --interval=10s --timeout=3s CMD ["curl", "-fsS", "http://127.0.0.1:9090/readyz"]
ENTRYPOINT ["/usr/local/bin/shopverse"]
CMD ["up", "--config", "/etc/shopverse/shopverse.toml"]
