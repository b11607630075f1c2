// Package authn turns a client's token into an Identity, and decides which
// access levels that Identity may use on which database (Grants).
//
// A Verifier checks the token's signature against keys from a JWKS (found
// through OIDC discovery or named directly), restricted to an allow-list of
// asymmetric algorithms — never "none", never HMAC, so a public key can never be
// used as a shared secret. It then checks iss, aud, exp (required) and nbf with a
// bounded leeway. Every refusal is a *TokenError, tagged with SQLSTATE 28P01,
// whose Reason is a short bounded word fit for a metric label; no error text
// ever contains the token.
package authn
