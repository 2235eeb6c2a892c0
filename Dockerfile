# casnix container image: one static binary on an empty base.
#
#   podman build -t casnix .                                      # compiles in golang:1.26 (needs a registry)
#   CGO_ENABLED=0 go build -o casnix . &&
#     podman build --build-arg BINARY=prebuilt -t casnix .        # packs ./casnix (works offline)
#   podman run -d -v casnix-data:/data -v /run/casnix:/run/casnix:U casnix
#   nix path-info --store unix:///run/casnix/daemon.sock --all   # on the host
#
# Configuration: CASNIX_* environment variables or flags after the image name
# (`casnix --help`); the data dir is the /data volume, the socket
# /run/casnix/daemon.sock (mount a host directory there for the host's Nix).

# Where the binary comes from: "golang" builds it here, "prebuilt" takes
# ./casnix from the build context (built with CGO_ENABLED=0).
ARG BINARY=golang
ARG VERSION=dev

FROM docker.io/library/golang:1.26-bookworm AS binary-golang
ARG VERSION
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
RUN CGO_ENABLED=0 go build -trimpath \
      -ldflags "-s -w -X github.com/casnix/casnix/cli.Version=${VERSION}" \
      -o /out/casnix . && /out/casnix version

FROM scratch AS binary-prebuilt
COPY casnix /out/casnix

FROM binary-${BINARY} AS binary

FROM scratch
ARG VERSION
LABEL org.opencontainers.image.title="casnix" \
      org.opencontainers.image.description="A content-addressed Nix store in one static binary, serving Nix over the nix-daemon protocol" \
      org.opencontainers.image.source="https://github.com/casnix/casnix" \
      org.opencontainers.image.version="${VERSION}"
COPY contrib/container/passwd contrib/container/group /etc/
COPY --from=binary /out/casnix /usr/local/bin/casnix
# Non-root by default. WORKDIR after USER creates each directory owned by
# the user; a named volume mounted on /data or /run/casnix starts with that
# ownership. A bind-mounted host directory must be writable by uid 10001
# (podman: -v DIR:/run/casnix:U), or run with --user 0.
USER 10001:10001
WORKDIR /tmp
WORKDIR /run/casnix
WORKDIR /data
ENV CASNIX_DIR=/data \
    CASNIX_SOCKET=/run/casnix/daemon.sock \
    CASNIX_HTTP=:8080 \
    CASNIX_LOG_FORMAT=json \
    TMPDIR=/tmp
VOLUME ["/data", "/run/casnix"]
# The HTTP binary cache (casnix serve --http, CASNIX_HTTP; set it empty to
# serve only the socket): every store path's narinfo and NAR, and /metrics,
# to anyone who reaches the port, unauthenticated (README, "Container image").
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["casnix", "ping"]
ENTRYPOINT ["casnix"]
CMD ["serve"]
