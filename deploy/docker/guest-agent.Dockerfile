# syntax=docker/dockerfile:1
# periscope guest-agent: the introspection-VM agent (podman + deploy/guest-agent/periscope-guest-agent.service).
#
# Build from the repository root (the build context):
#   docker build -f deploy/docker/guest-agent.Dockerfile -t periscope/guest-agent:$VERSION .
# The base is pinned by digest (multi-arch index of node:20-bookworm-slim); refresh it with
#   docker buildx imagetools inspect node:20-bookworm-slim --format '{{json .Manifest.Digest}}'
# and update all three Dockerfiles together (deploy/test/dockerfile.test.ts checks they agree).

FROM node:20-bookworm-slim@sha256:2cf067cfed83d5ea958367df9f966191a942351a2df77d6f0193e162b5febfc0 AS build
# The /dev/kvmmem addon (node-addon-api) compiles against the image's own Node headers: nothing downloaded.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 make g++ \
 && rm -rf /var/lib/apt/lists/*
ENV npm_config_nodedir=/usr/local
WORKDIR /src
COPY . .
RUN npm ci --no-audit --no-fund
RUN npm run build
# The runtime layout: the app's production dependency closure and its entry point, nothing else.
RUN node deploy/scripts/bundle.mjs guest-agent /out

FROM node:20-bookworm-slim@sha256:2cf067cfed83d5ea958367df9f966191a942351a2df77d6f0193e162b5febfc0 AS runtime
LABEL org.opencontainers.image.title="periscope-guest-agent" \
      org.opencontainers.image.description="Periscope guest-agent" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV NODE_ENV=production
WORKDIR /opt/periscope
COPY --from=build --chown=0:0 /out/ /opt/periscope/
# Non-root, no home, no shell needed; the root filesystem can be mounted read-only.
USER 65532:65532
ENTRYPOINT ["node", "/opt/periscope/guest-agent.mjs"]
CMD ["--help"]
