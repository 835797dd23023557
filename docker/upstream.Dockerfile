# syntax=docker/dockerfile:1
#
# The compose demo's upstream: the repo's test Worker (tests/worker, a
# global registry Durable Object and one object per room) on workerd,
# Cloudflare's Workers runtime, which `npm ci` installs from package-lock.json.
# Build from the repository root (docker/compose.yaml does).

FROM node:20-slim
WORKDIR /worker
COPY tests/worker/package.json tests/worker/package-lock.json ./
RUN npm ci --no-audit --no-fund --loglevel=error
COPY tests/worker/config.capnp tests/worker/worker.js ./
EXPOSE 8787
# workerd waits for every open WebSocket on SIGTERM, with no time limit;
# compose stops it with SIGKILL after its stop_grace_period.
CMD ["node_modules/.bin/workerd", "serve", "config.capnp", "--socket-addr", "http=0.0.0.0:8787"]
