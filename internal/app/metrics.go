package app

import (
	"context"
	"time"

	"github.com/pgwarden/pgwarden/authn"
	"github.com/pgwarden/pgwarden/metrics"
	"github.com/pgwarden/pgwarden/proxy"
)

// timedVerifier times every token verification for
// pgwarden_token_verify_duration_seconds. It wraps the verifier here, where
// the two are wired, so that neither authn nor proxy learns of metrics.
type timedVerifier struct {
	v proxy.TokenVerifier
	m *metrics.Metrics
}

var _ proxy.TokenVerifier = timedVerifier{}

// Verify implements proxy.TokenVerifier.
func (t timedVerifier) Verify(ctx context.Context, token string) (*authn.Identity, error) {
	start := time.Now()
	id, err := t.v.Verify(ctx, token)
	result := metrics.VerifyOK
	if err != nil {
		result = metrics.VerifyRefused
	}
	t.m.TokenVerified(result, time.Since(start))
	return id, err
}

// poolSizes is srv's pools for metrics; none before srv exists.
func poolSizes(srv *proxy.Server) []metrics.PoolSize {
	if srv == nil {
		return nil
	}
	st := srv.PoolStats()
	out := make([]metrics.PoolSize, 0, len(st))
	for _, p := range st {
		out = append(out, metrics.PoolSize{Database: p.Database, Level: p.Level, Idle: p.Idle, Active: p.Active, Waiting: p.Waiting})
	}
	return out
}

// leaseStates are the states broker.LeaseInfo reports, each exported (at
// zero when no lease is in it) so that the series exist from the start.
var leaseStates = []string{"active", "superseded", "retired", "ended"}

// readMetrics gives the collectors what they read at scrape time: the
// proxy's per-database traffic and the broker's leases by state.
func (a *App) readMetrics() {
	srv, b := a.server, a.broker
	a.metrics.ReadTraffic(func() []metrics.Traffic {
		tr := srv.Traffic()
		out := make([]metrics.Traffic, 0, len(tr))
		for _, t := range tr {
			out = append(out, metrics.Traffic{Database: t.Database, Transactions: t.Transactions, Queries: t.Queries,
				Received: t.Received, Sent: t.Sent})
		}
		return out
	})
	a.metrics.ReadLeases(func() map[string]int {
		n := make(map[string]int, len(leaseStates))
		for _, s := range leaseStates {
			n[s] = 0
		}
		for _, l := range b.Leases() {
			n[l.State]++
		}
		return n
	})
}
