# pgwarden's container image: a static binary on a distroless base, run as a
# non-root user, with no shell. `make image` builds it (a Docker engine is
# needed); docker-compose.yml builds it and the dev issuer's image from here.
#
#   docker build --build-arg VERSION=$(git describe --tags --always --dirty) -t pgwarden .
#
# Stages: build (the Go toolchain), devissuer (the compose stack's dev OIDC
# issuer, not for production), and the last one, pgwarden, the default.

# A Go release of the line go.mod asks for (deploy's tests check the two agree).
ARG GO_VERSION=1.26.8

FROM golang:${GO_VERSION}-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
# What `pgwarden version` prints: the Makefile's LDFLAGS, the same variable.
ARG VERSION=dev
ENV CGO_ENABLED=0
RUN go build -trimpath -ldflags "-s -w -X main.buildVersion=${VERSION}" -o /out/pgwarden ./cmd/pgwarden && \
    go build -trimpath -ldflags "-s -w" -o /out/healthprobe ./deploy/cmd/healthprobe && \
    go build -trimpath -ldflags "-s -w" -o /out/devissuer ./testenv/cmd/devissuer && \
    mkdir -p /out/certs

# The compose stack's dev OIDC issuer (testenv/cmd/devissuer): https on 8443,
# its throwaway CA and certificates in the /certs volume, which starts out
# owned by the non-root user because the image's /certs is.
FROM gcr.io/distroless/static-debian12:nonroot AS devissuer
COPY --from=build /out/devissuer /out/healthprobe /usr/local/bin/
COPY --from=build --chown=65532:65532 /out/certs /certs
USER 65532:65532
EXPOSE 8443
HEALTHCHECK --interval=5s --timeout=3s --start-period=5s --retries=5 \
    CMD ["/usr/local/bin/healthprobe", "-cacert", "/certs/ca.crt", "https://localhost:8443/.well-known/openid-configuration"]
ENTRYPOINT ["/usr/local/bin/devissuer"]
CMD ["serve"]

# pgwarden. Mount the config at /etc/pgwarden/pgwarden.json (or give the
# container other arguments); in a container set listen and metrics_listen to
# 0.0.0.0:… in it, since the defaults are loopback.
FROM gcr.io/distroless/static-debian12:nonroot AS pgwarden
COPY --from=build /out/pgwarden /out/healthprobe /usr/local/bin/
USER 65532:65532
EXPOSE 6432 9632
# /healthz on the default metrics port (healthprobe's default URL); a
# metrics_listen on another port needs the healthcheck overridden.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/healthprobe"]
ENTRYPOINT ["/usr/local/bin/pgwarden"]
CMD ["serve", "-config", "/etc/pgwarden/pgwarden.json"]
