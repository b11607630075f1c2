// Package broker turns a verified client token and a route into database
// credentials issued by Vault's database secrets engine.
//
// In jwt mode (the only mode so far) pgwarden holds no standing Vault power: it
// logs in to Vault's JWT auth method with the client's own token, under the
// auth role of the chosen access level, so Vault's role bindings decide whether
// this identity may have that level. The Vault token the login returns can only
// read that level's credentials. Logins are cached per distinct client token
// (keyed by its SHA-256, never the token) until the earlier of the token's exp
// and the Vault token's TTL.
//
// Credentials are shared per Vault role ("role" scope): the first client's
// Vault token reads them, later clients — each still logged in on their own —
// reuse them while the lease is valid. Concurrent first requests collapse into
// one Vault call. A credential lives no longer than the earlier of its lease
// and the Vault token that read it (Vault revokes a token's leases with it), and
// is handed out only until its RetireAt, a margin before that end, after which
// the next request reads fresh credentials.
package broker
