package vaultinit

import (
	"encoding/json"
	"fmt"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"
)

// diff collects the fields of one object that differ from the spec, each as
// its name or, when the values are not secret and short, "name old → new".
type diff []string

func (d diff) String() string { return strings.Join(d, ", ") }

// text compares a string field; show prints the values.
func (d *diff) text(field, want string, got any, show bool) {
	if g := str(got); g != want {
		if show {
			*d = append(*d, fmt.Sprintf("%s %q → %q", field, g, want))
		} else {
			*d = append(*d, field)
		}
	}
}

// set compares a list whose order Vault does not keep, ignoring case when
// fold (Vault lower-cases policy names).
func (d *diff) set(field string, want []string, got any, fold bool) {
	g := strs(got)
	if !sameSet(want, g, fold) {
		*d = append(*d, fmt.Sprintf("%s %v → %v", field, sorted(g), sorted(want)))
	}
}

// list compares a list whose order matters (statements), without showing it.
func (d *diff) list(field string, want []string, got any) {
	if !slices.Equal(nonNil(want), nonNil(strs(got))) {
		*d = append(*d, field)
	}
}

// secs compares a duration Vault returns as a number of seconds.
func (d *diff) secs(field string, want int64, got any) {
	if g := num(got); g != want {
		*d = append(*d, fmt.Sprintf("%s %s → %s", field, ttl(g), ttl(want)))
	}
}

func (d *diff) flag(field string, want bool, got any) {
	if g := truth(got); g != want {
		*d = append(*d, fmt.Sprintf("%s %t → %t", field, g, want))
	}
}

// claims compares bound_claims, which Vault returns as a map of []any, with
// the one claim the spec binds.
func (d *diff) claims(field, claim string, want []string, got any) {
	m, _ := got.(map[string]any)
	same := len(m) == 1
	if v, ok := m[claim]; same && ok {
		same = sameSet(want, strs(v), false)
	} else {
		same = false
	}
	if !same {
		*d = append(*d, fmt.Sprintf("%s → %s in %v", field, claim, sorted(want)))
	}
}

func sameSet(a, b []string, fold bool) bool {
	norm := func(s []string) []string {
		out := make([]string, 0, len(s))
		for _, e := range s {
			if fold {
				e = strings.ToLower(e)
			}
			if !slices.Contains(out, e) {
				out = append(out, e)
			}
		}
		sort.Strings(out)
		return out
	}
	return slices.Equal(norm(a), norm(b))
}

func sorted(s []string) []string {
	s = slices.Clone(s)
	sort.Strings(s)
	return s
}

// strs reads a list Vault returned: []any from JSON, a lone string, or nil.
func strs(v any) []string {
	switch v := v.(type) {
	case nil:
		return nil
	case []string:
		return v
	case []any:
		out := make([]string, 0, len(v))
		for _, e := range v {
			out = append(out, str(e))
		}
		return out
	case string:
		if v == "" {
			return nil
		}
		return []string{v}
	}
	return []string{str(v)}
}

func str(v any) string {
	switch v := v.(type) {
	case nil:
		return ""
	case string:
		return v
	}
	return fmt.Sprint(v)
}

// num reads a number of seconds: json.Number (the Vault client decodes with
// UseNumber), float64, or a string holding seconds or a Go duration.
func num(v any) int64 {
	switch v := v.(type) {
	case json.Number:
		if i, err := v.Int64(); err == nil {
			return i
		}
		f, _ := v.Float64()
		return int64(f)
	case float64:
		return int64(v)
	case int:
		return int64(v)
	case int64:
		return v
	case string:
		if i, err := strconv.ParseInt(v, 10, 64); err == nil {
			return i
		}
		if d, err := time.ParseDuration(v); err == nil {
			return int64(d / time.Second)
		}
	}
	return 0
}

func truth(v any) bool {
	switch v := v.(type) {
	case bool:
		return v
	case string:
		b, _ := strconv.ParseBool(v)
		return b
	}
	return false
}
