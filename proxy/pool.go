package proxy

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgwarden/pgwarden/broker"
	"github.com/pgwarden/pgwarden/pgerror"
)

// poolSet holds one pool per (database, access level) and bounds the total
// number of upstream connections. A connection is never handed out, and never
// kept idle, past its credential's RetireAt: Vault drops the role at the
// lease's end and a session of a dropped role still answers `select 1` while
// failing every privilege check, so no liveness probe could catch it.
type poolSet struct {
	cfg   *Config
	total chan struct{} // semaphore: one token per open upstream connection

	mu     sync.Mutex
	pools  map[poolKey]*pool // guarded by mu
	closed bool              // guarded by mu

	stop      chan struct{}
	reaperWG  sync.WaitGroup
	closeOnce sync.Once
}

type poolKey struct{ database, level string }

type pool struct {
	key    poolKey
	tmpl   *pgconn.Config
	sem    chan struct{} // one token per open connection of this pool
	idle   []*serverConn // guarded by poolSet.mu; most recently used last
	active int           // guarded by poolSet.mu
}

func newPoolSet(cfg *Config) (*poolSet, error) {
	ps := &poolSet{cfg: cfg, total: make(chan struct{}, cfg.Pool.MaxTotal), pools: map[poolKey]*pool{}, stop: make(chan struct{})}
	// Parse every upstream now, so a bad connection string fails at start.
	for db, r := range cfg.Routes {
		if _, err := parseUpstream(r.Upstream); err != nil {
			return nil, fmt.Errorf("proxy: route %q: %w", db, err)
		}
	}
	ps.reaperWG.Add(1)
	go ps.reap()
	return ps, nil
}

// parseUpstream parses a route's connection string. User and password are
// replaced by each credential's; client settings are applied per session, so
// none from the environment (PGAPPNAME, PGOPTIONS…) may ride along.
func parseUpstream(conn string) (*pgconn.Config, error) {
	cfg, err := pgconn.ParseConfig(conn)
	if err != nil {
		return nil, err
	}
	cfg.RuntimeParams = map[string]string{}
	return cfg, nil
}

func (ps *poolSet) get(database, level string, route Route) (*pool, error) {
	k := poolKey{database, level}
	ps.mu.Lock()
	defer ps.mu.Unlock()
	if ps.closed {
		return nil, pgerror.New(pgerror.AdminShutdown, "pgwarden is shutting down")
	}
	if p := ps.pools[k]; p != nil {
		return p, nil
	}
	tmpl, err := parseUpstream(route.Upstream)
	if err != nil {
		return nil, pgerror.Wrap(err, pgerror.ConfigurationFileError, "upstream connection string is invalid")
	}
	p := &pool{key: k, tmpl: tmpl, sem: make(chan struct{}, ps.cfg.Pool.MaxPerPool)}
	ps.pools[k] = p
	return p, nil
}

// acquire returns an idle connection of (database, level) whose credential is
// still good, or opens one under cred, waiting up to AcquireTimeout for room.
func (ps *poolSet) acquire(ctx context.Context, database, level string, route Route, cred *broker.Credential) (*serverConn, error) {
	p, err := ps.get(database, level, route)
	if err != nil {
		return nil, err
	}
	now := ps.cfg.Now()
	var stale []*serverConn
	ps.mu.Lock()
	var sc *serverConn
	for len(p.idle) > 0 {
		c := p.idle[len(p.idle)-1]
		p.idle = p.idle[:len(p.idle)-1]
		if now.Before(c.cred.RetireAt) {
			sc = c
			break
		}
		stale = append(stale, c)
	}
	if sc != nil {
		p.active++
	}
	ps.mu.Unlock()
	for _, c := range stale {
		ps.closeConn(c)
	}
	if sc != nil {
		return sc, nil
	}

	wait, cancel := context.WithTimeout(ctx, ps.cfg.Pool.AcquireTimeout)
	defer cancel()
	if err := ps.slot(wait, p); err != nil {
		return nil, err
	}
	sc, err = dialServer(ctx, p.tmpl, cred, ps.cfg.Pool.DialTimeout)
	if err != nil {
		<-ps.total
		<-p.sem
		return nil, err
	}
	sc.pool = p
	ps.mu.Lock()
	p.active++
	ps.mu.Unlock()
	return sc, nil
}

// slot takes one connection token from the pool and one from the total.
func (ps *poolSet) slot(ctx context.Context, p *pool) error {
	tooMany := func() error {
		return pgerror.Newf(pgerror.TooManyConnections,
			"too many upstream connections for database %q at level %q", p.key.database, p.key.level).
			WithHint(fmt.Sprintf("Waited %v for a free connection; try again, or raise the pool limits.", ps.cfg.Pool.AcquireTimeout))
	}
	select {
	case p.sem <- struct{}{}:
	case <-ctx.Done():
		return tooMany()
	}
	select {
	case ps.total <- struct{}{}:
		return nil
	case <-ctx.Done():
		<-p.sem
		return tooMany()
	}
}

// release resets sc and makes it idle, or closes it when it cannot be reused:
// reset failed, its credential retires soon, or the set is closed.
func (ps *poolSet) release(sc *serverConn) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	err := sc.reset(ctx)
	cancel()
	now := ps.cfg.Now()
	ps.mu.Lock()
	sc.pool.active--
	if err == nil && !ps.closed && now.Before(sc.cred.RetireAt) {
		sc.lastUsed = now
		sc.pool.idle = append(sc.pool.idle, sc)
		ps.mu.Unlock()
		return
	}
	ps.mu.Unlock()
	if err != nil {
		ps.cfg.Logger.Debug("upstream reset failed; closing", "error", err, "backend_pid", sc.pid)
	}
	ps.closeConn(sc)
}

// discard closes an active connection that must not be reused.
func (ps *poolSet) discard(sc *serverConn) {
	ps.mu.Lock()
	sc.pool.active--
	ps.mu.Unlock()
	ps.closeConn(sc)
}

// closeConn closes a connection no longer counted as idle or active and
// frees its slots.
func (ps *poolSet) closeConn(sc *serverConn) {
	sc.close()
	<-ps.total
	<-sc.pool.sem
}

// reap closes idle connections whose credential retires or that sat idle too
// long, every second.
func (ps *poolSet) reap() {
	defer ps.reaperWG.Done()
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-ps.stop:
			return
		case <-t.C:
		}
		now := ps.cfg.Now()
		var dead []*serverConn
		ps.mu.Lock()
		for _, p := range ps.pools {
			keep := p.idle[:0]
			for _, c := range p.idle {
				if !now.Before(c.cred.RetireAt) || now.Sub(c.lastUsed) >= ps.cfg.Pool.IdleTimeout {
					dead = append(dead, c)
				} else {
					keep = append(keep, c)
				}
			}
			clear(p.idle[len(keep):])
			p.idle = keep
		}
		ps.mu.Unlock()
		for _, c := range dead {
			ps.closeConn(c)
		}
	}
}

// close stops the reaper and closes idle connections; active ones are closed
// by their sessions, which see closed and do not return them.
func (ps *poolSet) close() {
	ps.closeOnce.Do(func() {
		close(ps.stop)
		ps.reaperWG.Wait()
		ps.mu.Lock()
		ps.closed = true
		var idle []*serverConn
		for _, p := range ps.pools {
			idle = append(idle, p.idle...)
			p.idle = nil
		}
		ps.mu.Unlock()
		for _, c := range idle {
			ps.closeConn(c)
		}
	})
}

func (ps *poolSet) stats() []PoolStat {
	ps.mu.Lock()
	defer ps.mu.Unlock()
	out := make([]PoolStat, 0, len(ps.pools))
	for k, p := range ps.pools {
		out = append(out, PoolStat{Database: k.database, Level: k.level, Idle: len(p.idle), Active: p.active})
	}
	return out
}
