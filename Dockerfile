# Multi-stage build of the project's binaries: gateway, aggregator, simulator.
FROM rust:1.89-bookworm AS build
# librdkafka is built from source by rdkafka-sys with its configure script
# (gcc, g++, make, and OpenSSL's headers for TLS/SASL: all in the rust image).
WORKDIR /src
COPY . .
RUN cargo build --release --locked --workspace --bins \
 && mkdir /out && cp target/release/gateway target/release/aggregator target/release/simulator /out/

FROM debian:bookworm-slim
# TLS to MQTT and Kafka uses the system OpenSSL; public-CA brokers need the CA bundle.
RUN apt-get update && apt-get install -y --no-install-recommends libssl3 ca-certificates \
 && rm -rf /var/lib/apt/lists/*
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin app \
 && mkdir -p /var/lib/iot-gateway/spool && chown -R 10001 /var/lib/iot-gateway
# The gateway's spool (mount a volume here: acknowledged readings live in it).
VOLUME /var/lib/iot-gateway/spool
COPY --from=build /out/ /usr/local/bin/
COPY configs/gateway.toml configs/aggregator.toml /etc/iot-gateway/
COPY simulators/scenarios /etc/iot-gateway/scenarios
USER 10001
# Override per service (docker-compose.yml does).
CMD ["gateway", "run", "--config", "/etc/iot-gateway/gateway.toml"]
