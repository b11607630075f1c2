// Package testenv starts real components for tests and for `make dev`: a
// throwaway PostgreSQL cluster (scram-sha-256, free loopback port, removed
// afterwards), a Vault dev server configured through the same code path as
// `pgwarden vault-init`, an in-process OIDC issuer that mints tokens, a CA and
// server certificate, and pgwarden wired to all of them (Stack).
//
// PostgreSQL refuses to run as root: when root, initdb and postgres run as the
// `postgres` OS user on a directory it owns. Every child process is started in
// its own process group with a parent-death signal, so a killed test leaves no
// server behind.
//
// Product code never imports testenv.
package testenv
