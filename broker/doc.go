// Package broker turns a verified client token and a route into database
// credentials issued by Vault's database secrets engine, and owns their
// leases.
//
// Every client logs in to Vault's JWT auth method with its own token, under
// the auth role of the chosen access level, so Vault's role bindings decide
// whether this identity may have that level. Logins are cached per distinct
// client token (keyed by its SHA-256, never the token) until the earlier of
// the token's exp and the Vault token's TTL; a cached login Vault refuses
// (403) is replaced once. A login's Vault token is revoked once the client
// token has expired and no lease it read is held.
//
// Who shares a credential is the level's scope:
//
//   - identity (the default): one lease per subject, read with that person's
//     own login, shared by their connections; it retires at the expiry of
//     the token that read it and ends a grace later. A later token of the
//     person shares it when it ends within a slack of that one (a tenth of
//     its life, at most 5m); one that outlives it by more reads a new lease.
//   - role: one lease per Vault role, read, renewed and revoked by
//     pgwarden's own Vault identity (Self: token, AppRole or Kubernetes
//     auth). Static roles (static-creds) are role-scoped: they retire after
//     each rotation of the password and never end.
//
// The Broker is the lease registry (lease.go): lease → credential → the
// upstream connections holding it (Hold, Release). Only the broker renews a
// lease (vault/api's LifetimeWatcher), retires it (a jittered margin before
// its end, when renewal can extend it no further, when Vault says it is
// gone, or when the client token that read it expires), ends it, and revokes
// it once it is retired and unheld (role scope with Self; identity scope
// through the login's token). Sessions learn of retirement and end through
// Credential.OnRetire and OnEnd. Concurrent first requests collapse into one
// Vault call, which runs detached from any one caller and bounded by
// VaultTimeout. Close stops renewal and, when asked, revokes everything the
// broker holds.
package broker
