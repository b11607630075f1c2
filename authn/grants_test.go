package authn_test

import (
	"strings"
	"testing"

	"github.com/pgwarden/pgwarden/authn"
	"github.com/pgwarden/pgwarden/pgerror"
)

func devGrants(t *testing.T) *authn.Grants {
	t.Helper()
	g, err := authn.NewGrants([]authn.Database{{Name: "app", Levels: []authn.Level{
		{Name: "reader", Groups: []string{"analyst", "engineer"}},
		{Name: "writer", Groups: []string{"engineer"}},
		{Name: "admin", Groups: []string{"dba"}},
	}}})
	if err != nil {
		t.Fatal(err)
	}
	return g
}

func TestDecide(t *testing.T) {
	t.Parallel()
	g := devGrants(t)
	analyst := &authn.Identity{Subject: "alice", Groups: []string{"analyst"}}
	engineer := &authn.Identity{Subject: "bob", Groups: []string{"engineer"}}
	nobody := &authn.Identity{Subject: "eve", Groups: []string{"marketing"}}
	cases := []struct {
		name     string
		id       *authn.Identity
		db, user string
		level    string
		code     string
		mentions string
	}{
		{"granted level", engineer, "app", "writer", "writer", "", ""},
		{"own subject means default (least) level", engineer, "app", "bob", "reader", "", ""},
		{"level not granted lists the granted ones", analyst, "app", "writer", "", pgerror.InsufficientPrivilege, "grants: reader"},
		{"no level at all", nobody, "app", "reader", "", pgerror.InsufficientPrivilege, "no access level"},
		{"own subject with no level", nobody, "app", "eve", "", pgerror.InsufficientPrivilege, "any access level"},
		{"unknown level lists the granted levels", analyst, "app", "root", "", pgerror.InvalidAuthorization, "grants: reader."},
		{"unknown database lists the token's databases", analyst, "payroll", "reader", "", pgerror.InvalidCatalogName, "grants access to: app"},
		{"unknown database, no grant anywhere", nobody, "payroll", "reader", "", pgerror.InvalidCatalogName, "no database"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			level, err := g.Decide(tc.id, tc.db, tc.user)
			if tc.code == "" {
				if err != nil || level != tc.level {
					t.Fatalf("Decide = %q, %v; want %q", level, err, tc.level)
				}
				return
			}
			pe := pgerror.From(err)
			if pe.Code != tc.code {
				t.Fatalf("SQLSTATE = %s (%v), want %s", pe.Code, err, tc.code)
			}
			if text := pe.Message + " " + pe.Detail + " " + pe.Hint; !strings.Contains(text, tc.mentions) {
				t.Errorf("%q does not mention %q", text, tc.mentions)
			}
		})
	}
}

func TestNewGrantsRefusesAmbiguity(t *testing.T) {
	t.Parallel()
	for name, dbs := range map[string][]authn.Database{
		"duplicate database": {{Name: "a"}, {Name: "a"}},
		"unnamed database":   {{}},
		"duplicate level":    {{Name: "a", Levels: []authn.Level{{Name: "r"}, {Name: "r"}}}},
	} {
		if _, err := authn.NewGrants(dbs); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

// An unknown database is refused naming only the databases the token grants,
// never every database pgwarden serves (hardening issue, item 7).
func TestUnknownDatabaseShowsOnlyWhatTheTokenGrants(t *testing.T) {
	t.Parallel()
	g, err := authn.NewGrants([]authn.Database{
		{Name: "app", Levels: []authn.Level{{Name: "reader", Groups: []string{"analyst"}}}},
		{Name: "hr", Levels: []authn.Level{{Name: "reader", Groups: []string{"people"}}}},
	})
	if err != nil {
		t.Fatal(err)
	}
	_, err = g.Decide(&authn.Identity{Subject: "alice", Groups: []string{"analyst"}}, "payroll", "reader")
	pe := pgerror.From(err)
	text := pe.Message + " " + pe.Detail + " " + pe.Hint
	if pe.Code != pgerror.InvalidCatalogName || !strings.Contains(text, "app") || strings.Contains(text, "hr") {
		t.Fatalf("%s %q: want 3D000 naming app and not hr", pe.Code, text)
	}
}

func BenchmarkDecide(b *testing.B) {
	g, err := authn.NewGrants([]authn.Database{{Name: "app", Levels: []authn.Level{
		{Name: "reader", Groups: []string{"analyst", "engineer"}}, {Name: "writer", Groups: []string{"engineer"}}}}})
	if err != nil {
		b.Fatal(err)
	}
	id := &authn.Identity{Subject: "bob", Groups: []string{"engineer"}}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := g.Decide(id, "app", "writer"); err != nil {
			b.Fatal(err)
		}
	}
}
