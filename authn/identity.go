package authn

import (
	"strings"
	"time"
)

// Identity is who a verified token speaks for. It holds no part of the token.
type Identity struct {
	// Subject is the token's subject claim (or the configured subject claim).
	Subject string
	// Name is a display name (preferred_username, email or name), or Subject.
	Name string
	// Groups are the values of the configured groups claim.
	Groups []string
	// Issuer is the token's iss.
	Issuer string
	// Expiry is the token's exp. It is never zero for a verified token.
	Expiry time.Time
}

// lookupPath walks a dotted claim path such as "realm_access.roles".
func lookupPath(claims map[string]any, path string) (any, bool) {
	var cur any = claims
	for part := range strings.SplitSeq(path, ".") {
		m, ok := cur.(map[string]any)
		if !ok {
			return nil, false
		}
		if cur, ok = m[part]; !ok {
			return nil, false
		}
	}
	return cur, true
}

// stringsClaim reads a claim that is a string or a list of strings.
func stringsClaim(claims map[string]any, path string) []string {
	v, ok := lookupPath(claims, path)
	if !ok {
		return nil
	}
	switch v := v.(type) {
	case string:
		return []string{v}
	case []any:
		out := make([]string, 0, len(v))
		for _, e := range v {
			if s, ok := e.(string); ok {
				out = append(out, s)
			}
		}
		return out
	}
	return nil
}

func stringClaim(claims map[string]any, path string) string {
	v, _ := lookupPath(claims, path)
	s, _ := v.(string)
	return s
}
