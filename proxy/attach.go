package proxy

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgwarden/pgwarden/broker"
	"github.com/pgwarden/pgwarden/pool"
)

// Attaching a client to a server, in either pool mode: take one from the
// client's pool (acquire), then make its session the client's (apply).

// errKilledWaiting ends a client killed while it waited for a server.
var errKilledWaiting = fmt.Errorf("%w: the client was killed while it waited for a server", errSilentClose)

// clientSettings is what a client needs on every server it uses: its
// run-time settings and its identity.
type clientSettings struct {
	settings map[string]string // run-time settings: startup ones, then reported changes
	idKey    string
	idSets   [][2]string
}

// newClientSettings takes the startup settings (identity ones aside: they
// are pgwarden's) and the client's identity.
func newClientSettings(c *clientConn, startup [][2]string) clientSettings {
	cs := clientSettings{settings: map[string]string{}, idSets: identitySettings(c.id, c.level), idKey: identityKey(c.id, c.level)}
	for _, kv := range startup {
		if !hasIdentityPrefix([]byte(kv[0])) {
			cs.settings[strings.ToLower(kv[0])] = kv[1]
		}
	}
	return cs
}

// acquire takes a server of the client's pool under cred, reading a fresh
// credential first when cred is stale, and once more when PostgreSQL
// refuses it (revoked early, or its password changed by a session of it).
// It returns the credential it used last, which may be new even when it
// fails.
func (c *clientConn) acquire(ctx context.Context, req broker.Request, cred *broker.Credential, stats *dbStats) (*pool.Server, *broker.Credential, error) {
	ps := c.srv.pools
	for attempt := 0; ; attempt++ {
		if cred.Stale() {
			vctx, cancel := context.WithTimeout(ctx, c.srv.cfg.AuthTimeout)
			fresh, err := c.srv.cfg.Credentials.Credential(vctx, req)
			cancel()
			if err != nil {
				return nil, cred, err
			}
			cred = fresh
		}
		// Not held meanwhile: a lease revoked under the dial answers 28P01,
		// which the retry below handles.
		waitFrom := time.Now()
		c.waitSince.Store(waitFrom.UnixNano())
		s, err := ps.Acquire(ctx, c.database, c.level, cred)
		c.waitSince.Store(0)
		stats.waitTime.Add(int64(time.Since(waitFrom)))
		var pgErr *pgconn.PgError
		if err != nil && attempt == 0 && errors.As(err, &pgErr) && strings.HasPrefix(pgErr.Code, "28") {
			c.srv.cfg.Logger.Warn("PostgreSQL refused a credential Vault issued; reading a new one",
				"database", c.database, "level", c.level, "db_user", cred.Username, "lease_id", cred.LeaseID, "error", err)
			c.srv.cfg.Credentials.Forget(cred)
			continue
		}
		if err != nil {
			return nil, cred, err
		}
		if s.Cred.Stale() && attempt == 0 {
			ps.Discard(s)
			continue
		}
		if c.killed.Load() {
			// KILL (or shutdown) came while it waited: the message it
			// waited with must not run.
			ps.Checkin(s, false)
			return nil, cred, errKilledWaiting
		}
		return s, cred, nil
	}
}

// apply makes sc's session the client's: its settings and identity set
// where the server's differ, in one round trip, before the client's first
// message on it.
func (t *clientSettings) apply(ctx context.Context, c *clientConn, sc *pool.Server) error {
	var b strings.Builder
	var sets [][2]string
	for k, v := range t.settings {
		if cur, ok := sc.Applied[k]; ok && cur == v {
			continue
		}
		if _, ok := sc.Applied[k]; !ok && paramValue(sc.Params, k) == v {
			continue
		}
		sets = append(sets, [2]string{k, v})
	}
	var resets []string
	for k := range sc.Applied {
		if _, ok := t.settings[k]; !ok {
			resets = append(resets, k)
		}
	}
	if sc.Identity != t.idKey {
		sets = append(sets, t.idSets...)
	}
	if len(sets) == 0 && len(resets) == 0 {
		return nil
	}
	sort.Slice(sets, func(i, j int) bool { return sets[i][0] < sets[j][0] })
	sort.Strings(resets)
	writeSetConfig(&b, sets)
	for _, k := range resets {
		b.WriteString("; RESET ")
		b.WriteString(pool.QuoteSettingName(k))
	}
	ctx, cancel := context.WithTimeout(ctx, c.srv.pools.Limits().PingTimeout+c.srv.cfg.WriteTimeout)
	defer cancel()
	st, err := sc.SimpleQuery(ctx, b.String(), nil)
	if err == nil && st != 'I' {
		err = fmt.Errorf("session not idle after applying settings (status %q)", st)
	}
	if err != nil {
		return err
	}
	sc.NoteApplied(t.settings, t.idKey)
	return nil
}
