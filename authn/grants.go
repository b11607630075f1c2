package authn

import (
	"fmt"
	"slices"
	"strings"

	"github.com/pgwarden/pgwarden/pgerror"
)

// Level is one access level of a database (for example reader, writer, admin)
// and the groups whose members may use it.
type Level struct {
	Name   string
	Groups []string
}

// Database lists a database's access levels, least privileged first: the
// first level an Identity is granted is its default level.
type Database struct {
	Name   string
	Levels []Level
}

// Grants decides which access level an Identity may use on a database. It is
// immutable after NewGrants and safe for concurrent use.
type Grants struct {
	dbs   map[string]Database
	names []string
}

// NewGrants checks dbs (unique, non-empty names) and returns Grants over them.
func NewGrants(dbs []Database) (*Grants, error) {
	g := &Grants{dbs: make(map[string]Database, len(dbs))}
	for _, d := range dbs {
		if d.Name == "" {
			return nil, fmt.Errorf("authn: database with no name")
		}
		if _, dup := g.dbs[d.Name]; dup {
			return nil, fmt.Errorf("authn: database %q listed twice", d.Name)
		}
		seen := map[string]bool{}
		for _, l := range d.Levels {
			if l.Name == "" || seen[l.Name] {
				return nil, fmt.Errorf("authn: database %q: level name %q empty or repeated", d.Name, l.Name)
			}
			seen[l.Name] = true
		}
		g.dbs[d.Name] = d
		g.names = append(g.names, d.Name)
	}
	slices.Sort(g.names)
	return g, nil
}

// Granted returns the levels id may use on database, in declared order.
func (g *Grants) Granted(id *Identity, database string) []string {
	var out []string
	for _, l := range g.dbs[database].Levels {
		if slices.ContainsFunc(l.Groups, func(gr string) bool { return slices.Contains(id.Groups, gr) }) {
			out = append(out, l.Name)
		}
	}
	return out
}

// Decide returns the access level id gets on database when it asks for user.
// user names a level, or equals id.Subject to mean "my default level" (the
// least privileged granted). Refusals are *pgerror.Error: 3D000 for an unknown
// database, 28000 for an unknown level, 42501 for a level not granted; the
// message says which levels (or, for an unknown database, which databases)
// the token does grant, and never what it does not: the configuration is not
// shown to whoever holds some valid token.
func (g *Grants) Decide(id *Identity, database, user string) (string, error) {
	db, ok := g.dbs[database]
	if !ok {
		e := pgerror.Newf(pgerror.InvalidCatalogName, "database %q does not exist", pgerror.Clip(database))
		var mine []string
		for _, name := range g.names {
			if len(g.Granted(id, name)) > 0 {
				mine = append(mine, name)
			}
		}
		if len(mine) == 0 {
			return "", e.WithDetail("The token's groups grant access to no database here.")
		}
		return "", e.WithDetail("The token grants access to: " + strings.Join(mine, ", ") + ".").
			WithHint("Connect with the database set to one of those.")
	}
	granted := g.Granted(id, database)
	if user == id.Subject && !g.isLevel(db, user) {
		if len(granted) == 0 {
			return "", noGrant(id, database, "any access level", nil)
		}
		return granted[0], nil
	}
	if !g.isLevel(db, user) {
		e := pgerror.Newf(pgerror.InvalidAuthorization, "unknown access level %q for database %q", pgerror.Clip(user), database)
		if len(granted) == 0 {
			return "", e.WithDetail("The token's groups grant no access level on this database.")
		}
		return "", e.WithDetail("The token grants: " + strings.Join(granted, ", ") + ".").
			WithHint("Connect with the user set to one of those, or to your own subject for your default level.")
	}
	if !slices.Contains(granted, user) {
		return "", noGrant(id, database, fmt.Sprintf("access level %q", user), granted)
	}
	return user, nil
}

func (g *Grants) isLevel(db Database, name string) bool {
	return slices.ContainsFunc(db.Levels, func(l Level) bool { return l.Name == name })
}

func noGrant(id *Identity, database, what string, granted []string) error {
	e := pgerror.Newf(pgerror.InsufficientPrivilege,
		"token for %q does not grant %s on database %q", id.Subject, what, database)
	if len(granted) == 0 {
		return e.WithDetail("The token's groups grant no access level on this database.")
	}
	return e.WithDetail("The token grants: " + strings.Join(granted, ", ") + ".").
		WithHint("Connect with the user set to one of the granted levels.")
}
