# ghostwire, built from this repository. The default command runs the proxy in front of the
# `postgres` service of docker-compose.yml; any other ghostwire command works too:
#   docker compose run --rm ghostwire-proxy plan --database-url postgres://app:app@postgres/app "ALTER TABLE …"
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends libclang-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --bin ghostwire

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/* \
    && useradd --system --no-create-home ghostwire
COPY --from=build /src/target/release/ghostwire /usr/local/bin/ghostwire
USER ghostwire
EXPOSE 6432 6433
ENTRYPOINT ["ghostwire"]
CMD ["proxy", "--listen", "0.0.0.0:6432", "--upstream", "postgres:5432", "--control", "0.0.0.0:6433"]
