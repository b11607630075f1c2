// Package deploy holds pgwarden's deployment artifacts and the tests that keep
// them true to the code: the top-level Dockerfile and docker-compose.yml, the
// compose stack's configuration (compose/, prometheus/, grafana/), Grafana's
// dashboard (grafana/dashboards), the Kubernetes examples (kubernetes/) and
// healthprobe (cmd/healthprobe), the images' HEALTHCHECK.
//
// No Docker engine runs where the tests run, so nothing here builds or
// starts a container. Instead the tests check what can drift: every
// PGWARDEN_* variable and config file the compose file and the manifests give
// pgwarden is one internal/config reads, and loads and validates; ports,
// hosts, probe paths, certificate paths, token audiences and mount paths agree
// across services and with the config; images are pinned; the Dockerfile
// builds packages that exist with the Makefile's version stamp; the dashboard
// queries only metrics pgwarden exports, with their labels. And the compose
// stack's own pieces run for real against real PostgreSQL, Vault and the dev
// issuer: its database seed, its pgwarden.json through `pgwarden vault-init`
// and `pgwarden serve`, a token from `devissuer mint`, psql; the Kubernetes
// sidecar's configuration against Vault's JWT auth method with a service
// account's token.
package deploy
