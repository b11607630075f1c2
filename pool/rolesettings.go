package pool

import (
	"context"
	"fmt"
	"slices"
	"strings"
)

// Role-level settings of a shared database user.
//
// PostgreSQL lets any role set its own defaults (ALTER ROLE CURRENT_USER SET
// search_path = …, default_transaction_read_only = on, statement_timeout =
// '1ms'…), and every later session of that role starts with them. A
// credential is shared by everyone on its Vault role, so one identity could
// change every other identity's sessions. pgwarden therefore records a
// credential's role settings when it opens the first session under it — as
// Vault's creation statements left them, before any client has used it — and
// checks every later new session against that baseline. A session that
// differs is closed, the baseline is restored, and a clean session is opened
// in its place. Sessions already open are unaffected: PostgreSQL reads role
// defaults at login.

// roleSetting is one role-level default: the database it applies in ("" for
// all), the setting's name and its value as PostgreSQL stores it.
type roleSetting struct{ database, name, value string }

// safeTx starts pgwarden's own transactions on a session whose role settings
// may have been tampered with: writable, no statement timeout a role default
// could shorten, a lock timeout of pgwarden's own (a session of the shared
// user holding its role row locked must not hold a new server's opening for
// ever), pg_catalog first, and acting as the session user (a role default
// may say SET ROLE).
const safeTx = "BEGIN READ WRITE; SET LOCAL statement_timeout = 0; SET LOCAL lock_timeout = '5s'; " +
	"SET LOCAL idle_in_transaction_session_timeout = 0; SET LOCAL search_path = pg_catalog; SET LOCAL ROLE NONE; "

// roleSettingsQuery lists the session user's role-level defaults.
const roleSettingsQuery = safeTx + `SELECT COALESCE(d.datname, ''), pg_catalog.split_part(c, '=', 1),
  pg_catalog.substr(c, pg_catalog.strpos(c, '=') + 1)
FROM pg_catalog.pg_db_role_setting s
LEFT JOIN pg_catalog.pg_database d ON d.oid = s.setdatabase, pg_catalog.unnest(s.setconfig) c
WHERE s.setrole = (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = session_user)
ORDER BY 1, 2; COMMIT`

// readRoleSettings returns the session user's role-level defaults, sorted.
func (sc *Server) readRoleSettings(ctx context.Context) ([]roleSetting, error) {
	var out []roleSetting
	_, err := sc.SimpleQuery(ctx, roleSettingsQuery, func(v [][]byte) {
		if len(v) == 3 {
			out = append(out, roleSetting{string(v[0]), string(v[1]), string(v[2])})
		}
	})
	return out, err
}

// restoreRoleSettings makes the session user's role-level defaults equal
// want again: settings added since are reset, changed or removed ones set
// back to their recorded value (through set_config and SET ... FROM CURRENT,
// so a value is restored exactly as PostgreSQL parsed it). It returns the
// names that differed, for the log.
func (sc *Server) restoreRoleSettings(ctx context.Context, got, want []roleSetting) ([]string, error) {
	var b strings.Builder
	b.WriteString(safeTx)
	var changed []string
	alter := func(db string) string {
		if db == "" {
			return "ALTER ROLE SESSION_USER "
		}
		return "ALTER ROLE SESSION_USER IN DATABASE " + QuoteIdent(db) + " "
	}
	key := func(r roleSetting) string { return r.database + "\x00" + r.name }
	wantBy := map[string]roleSetting{}
	for _, w := range want {
		wantBy[key(w)] = w
	}
	gotBy := map[string]roleSetting{}
	for _, g := range got {
		gotBy[key(g)] = g
		if _, ok := wantBy[key(g)]; !ok {
			changed = append(changed, g.name)
			b.WriteString(alter(g.database) + "RESET " + QuoteSettingName(g.name) + "; ")
		}
	}
	for _, w := range want {
		if g, ok := gotBy[key(w)]; ok && g.value == w.value {
			continue
		}
		changed = append(changed, w.name)
		b.WriteString("SELECT pg_catalog.set_config(" + QuoteLiteral(w.name) + ", " + QuoteLiteral(w.value) + ", true); ")
		b.WriteString(alter(w.database) + "SET " + QuoteSettingName(w.name) + " FROM CURRENT; ")
	}
	b.WriteString("COMMIT")
	if len(changed) == 0 {
		return nil, nil
	}
	st, err := sc.SimpleQuery(ctx, b.String(), nil)
	if err == nil && st != 'I' {
		err = fmt.Errorf("session not idle after restoring role settings (status %q)", st)
	}
	if err != nil {
		_, _ = sc.SimpleQuery(ctx, "ROLLBACK", nil)
	}
	return changed, err
}

// QuoteSettingName quotes a setting name for ALTER ROLE or RESET: each
// dotted part (myapp.tenant) as an identifier of its own.
func QuoteSettingName(name string) string {
	parts := strings.Split(name, ".")
	for i, p := range parts {
		parts[i] = QuoteIdent(p)
	}
	return strings.Join(parts, ".")
}

func sameRoleSettings(a, b []roleSetting) bool { return slices.Equal(a, b) }
