package proxy

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgwarden/pgwarden/broker"
	"github.com/pgwarden/pgwarden/pgerror"
)

// poolSet holds one pool per (database, access level) and bounds the number
// of upstream connections per pool and in total.
//
// It owns every upstream connection: it opens them, lends them to one client
// at a time (acquire), takes them back (release, discard) and is the only one
// to close them. A connection is never handed out, and never kept idle, past
// its credential's retirement: Vault drops the role at the lease's end and a
// session of a dropped role still answers `select 1` while failing every
// privilege check, so no liveness probe could catch it. An idle connection is
// checked before it is lent (see serverConn.alive), since the server may have
// ended it meanwhile.
//
// When the total is reached and a pool needs a connection, the longest-idle
// connection of another pool is closed to make room, so one pool's idle
// connections never starve the others.
type poolSet struct {
	cfg *Config

	mu      sync.Mutex
	pools   map[poolKey]*pool // guarded by mu
	total   int               // guarded by mu; connections open or being opened, all pools
	changed chan struct{}     // guarded by mu; closed (and replaced) when a slot frees or a connection turns idle
	closed  bool              // guarded by mu
	// baselines are each database user's role-level settings as its first
	// session found them (see rolesettings.go), keyed by user name — a
	// static role's user outlives each credential Vault rotates for it, and
	// a tampered setting must not become the next credential's baseline;
	// guarded by mu, dropped when a dynamic user's credential is finished.
	baselines map[string]baseline

	// limits are cfg.Pool, replaced whole by RELOAD.
	limits atomic.Pointer[PoolConfig]
	// servers are every connection open or being checked, for SHOW
	// SERVERS; guarded by mu.
	servers map[*serverConn]struct{}
	// paused databases: no server is lent for them until RESUME; a client
	// that needs one waits (up to AcquireTimeout). resumed is closed (and
	// replaced) by RESUME; guarded by mu.
	paused  map[string]bool
	resumed chan struct{}

	stop      chan struct{}
	reaperWG  sync.WaitGroup
	closeOnce sync.Once
}

// lim is the pool limits in force.
func (ps *poolSet) lim() *PoolConfig { return ps.limits.Load() }

type poolKey struct{ database, level string }

// baseline is a database user's recorded role settings and the newest
// credential seen for it.
type baseline struct {
	settings []roleSetting
	cred     *broker.Credential
}

type pool struct {
	key  poolKey
	tmpl *pgconn.Config
	// All guarded by poolSet.mu.
	open    int           // connections open or being opened: idle + active
	active  int           // lent to a client, being opened or being checked
	idle    []*serverConn // least recently used first
	waiters []*waiter     // clients waiting for a connection, first come first
}

// waiter is a client waiting in acquire. A connection checked in under its
// credential is handed to it directly (already counted active), so a busy
// pool serves its queue in order without waking everyone.
type waiter struct {
	cred *broker.Credential
	ch   chan *serverConn // buffered: the hand-off never blocks
}

func newPoolSet(cfg *Config) (*poolSet, error) {
	ps := &poolSet{cfg: cfg, pools: map[poolKey]*pool{}, changed: make(chan struct{}), stop: make(chan struct{}),
		baselines: map[string]baseline{}, servers: map[*serverConn]struct{}{}, paused: map[string]bool{}, resumed: make(chan struct{})}
	limits := cfg.Pool
	ps.limits.Store(&limits)
	// Parse every upstream now, so a bad connection string fails at start.
	for db, r := range cfg.Routes {
		if _, err := ParseUpstream(r.Upstream, r.Policy); err != nil {
			return nil, fmt.Errorf("proxy: database %q: upstream: %w", db, err)
		}
	}
	ps.reaperWG.Add(1)
	go ps.reap()
	return ps, nil
}

// changedLocked wakes everyone waiting for room.
func (ps *poolSet) changedLocked() {
	close(ps.changed)
	ps.changed = make(chan struct{})
}

func (ps *poolSet) get(database, level string, route Route) (*pool, error) {
	k := poolKey{database, level}
	ps.mu.Lock()
	defer ps.mu.Unlock()
	if ps.closed {
		return nil, errShuttingDown
	}
	if p := ps.pools[k]; p != nil {
		return p, nil
	}
	tmpl, err := ParseUpstream(route.Upstream, route.Policy)
	if err != nil {
		return nil, pgerror.Wrap(err, pgerror.ConfigurationFileError, "upstream connection string is invalid")
	}
	p := &pool{key: k, tmpl: tmpl}
	ps.pools[k] = p
	return p, nil
}

var errShuttingDown = pgerror.New(pgerror.AdminShutdown, "pgwarden is shutting down")

// acquire lends a connection of (database, level) under cred: an idle one
// that is still alive, or a new one. Only a connection under cred itself is
// lent, so one person's lease (identity scope) never serves another, and
// after a rotation new sessions use the new credential. When the pool is full
// of idle connections under other credentials the longest idle is closed to
// make room; when the pool or the total is full of busy ones it waits up to
// AcquireTimeout.
func (ps *poolSet) acquire(ctx context.Context, database, level string, route Route, cred *broker.Credential) (*serverConn, error) {
	p, err := ps.get(database, level, route)
	if err != nil {
		return nil, err
	}
	var wait context.Context
	var w *waiter // in p's queue while set
	defer func() {
		if w != nil {
			if sc := ps.leaveQueue(p, w); sc != nil {
				ps.checkin(sc, false) // handed over after this acquire returned otherwise
			}
		}
	}()
	for {
		ps.mu.Lock()
		if ps.closed {
			ps.mu.Unlock()
			return nil, errShuttingDown
		}
		if ps.paused[database] {
			resumed := ps.resumed
			ps.mu.Unlock()
			if wait == nil {
				var cancel context.CancelFunc
				wait, cancel = context.WithTimeout(ctx, ps.lim().AcquireTimeout)
				defer cancel()
			}
			select {
			case <-resumed:
				continue
			case <-wait.Done():
				return nil, pgerror.Newf(pgerror.TooManyConnections, "database %q is paused", database).
					WithHint(fmt.Sprintf("Waited %v; an operator paused it (PAUSE in the pgwarden console). Try again later.", ps.lim().AcquireTimeout))
			}
		}
		if i := lastIdleUnder(p.idle, cred); i >= 0 {
			sc := p.idle[i]
			copy(p.idle[i:], p.idle[i+1:])
			p.idle[len(p.idle)-1] = nil
			p.idle = p.idle[:len(p.idle)-1]
			p.active++
			ps.mu.Unlock()
			if err := ps.check(ctx, sc); err != nil {
				ps.cfg.Logger.Debug("idle upstream session not reusable; closing", "backend_pid", sc.pid, "error", err)
				ps.discard(sc)
				if isTimeout(err) {
					// A silent network: the sessions idle as long as this one
					// most likely went with it. Do not ping each in turn.
					ps.dropIdleSince(p, sc.lastUsed)
				}
				continue
			}
			return sc, nil
		}
		var victim *serverConn
		if p.open >= ps.lim().MaxPerPool && len(p.idle) > 0 {
			// Full of idle sessions under other credentials: the longest
			// idle makes room.
			victim = p.idle[0]
			p.idle[0] = nil
			p.idle = p.idle[1:]
			p.open--
			ps.total--
		}
		if p.open < ps.lim().MaxPerPool {
			if victim == nil && ps.total >= ps.lim().MaxTotal {
				victim = ps.evictLocked()
			}
			if ps.total < ps.lim().MaxTotal {
				p.open++
				p.active++
				ps.total++
				ps.mu.Unlock()
				if victim != nil {
					ps.cfg.Logger.Debug("closed an idle upstream session to make room",
						"database", victim.pool.key.database, "level", victim.pool.key.level, "backend_pid", victim.pid)
					victim.close()
				}
				sc, err := ps.open(ctx, p, cred)
				if err != nil {
					ps.mu.Lock()
					p.open--
					p.active--
					ps.total--
					ps.changedLocked()
					ps.mu.Unlock()
					return nil, err
				}
				return sc, nil
			}
		}
		if w == nil {
			w = &waiter{cred: cred, ch: make(chan *serverConn, 1)}
			p.waiters = append(p.waiters, w)
		}
		ch := ps.changed
		ps.mu.Unlock()
		if wait == nil {
			var cancel context.CancelFunc
			wait, cancel = context.WithTimeout(ctx, ps.lim().AcquireTimeout)
			defer cancel()
		}
		select {
		case sc := <-w.ch:
			return sc, nil
		case <-ch:
		case <-wait.Done():
			if sc := ps.leaveQueue(p, w); sc != nil {
				return sc, nil // handed over as the wait ended
			}
			w = nil
			if ctx.Err() != nil {
				return nil, pgerror.Wrap(ctx.Err(), pgerror.ConnectionFailure, "timed out waiting for an upstream connection")
			}
			return nil, pgerror.Newf(pgerror.TooManyConnections,
				"too many upstream connections for database %q at level %q", p.key.database, p.key.level).
				WithHint(fmt.Sprintf("Waited %v for a free connection; try again, or raise the pool limits.", ps.lim().AcquireTimeout))
		}
	}
}

// leaveQueue takes w out of p's queue and returns a connection handed to it
// meanwhile, if any.
func (ps *poolSet) leaveQueue(p *pool, w *waiter) *serverConn {
	ps.mu.Lock()
	defer ps.mu.Unlock()
	if i := slices.Index(p.waiters, w); i >= 0 {
		p.waiters = slices.Delete(p.waiters, i, i+1)
	}
	select {
	case sc := <-w.ch:
		return sc
	default:
		return nil
	}
}

// handOffLocked gives sc (lent, counted active) to the first client waiting
// for a connection under its credential, and reports whether there was one.
func (ps *poolSet) handOffLocked(sc *serverConn) bool {
	p := sc.pool
	if ps.paused[p.key.database] {
		return false // PAUSE: it waits idle; the waiters wait for RESUME
	}
	for i, w := range p.waiters {
		if w.cred == sc.cred {
			p.waiters = slices.Delete(p.waiters, i, i+1)
			sc.lastUsed = ps.cfg.Now()
			w.ch <- sc
			return true
		}
	}
	return false
}

// forget takes a closed connection out of the registry.
func (ps *poolSet) forget(sc *serverConn) {
	ps.mu.Lock()
	delete(ps.servers, sc)
	ps.mu.Unlock()
}

// SetPoolConfig replaces the pool limits (RELOAD). Connections already open
// beyond a lowered limit close as they are released or idle out.
func (s *Server) SetPoolConfig(pc PoolConfig) error {
	c := Config{Verifier: s.cfg.Verifier, Authorizer: s.cfg.Authorizer, Credentials: s.cfg.Credentials, Routes: s.cfg.Routes, Pool: pc}
	if err := c.checkAndSetDefaults(); err != nil {
		return err
	}
	s.pools.limits.Store(&c.Pool)
	s.pools.mu.Lock()
	s.pools.changedLocked()
	s.pools.mu.Unlock()
	return nil
}

// pause stops lending servers for database ("" for every one) and waits
// until none of its servers is lent, or ctx ends.
func (ps *poolSet) pause(ctx context.Context, database string) error {
	ps.mu.Lock()
	for db := range ps.cfg.Routes {
		if database == "" || db == database {
			ps.paused[db] = true
		}
	}
	ps.mu.Unlock()
	for {
		ps.mu.Lock()
		busy := 0
		for k, p := range ps.pools {
			if database == "" || k.database == database {
				busy += p.active
			}
		}
		ch := ps.changed
		ps.mu.Unlock()
		if busy == 0 {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return pgerror.Newf(pgerror.ObjectInUse, "%d upstream connections are still in use; the pause stays in effect", busy).
				WithHint("Wait for their transactions or sessions to end, KILL their clients, or RESUME.")
		}
	}
}

// resume lends servers for database ("" for every one) again.
func (ps *poolSet) resume(database string) {
	ps.mu.Lock()
	defer ps.mu.Unlock()
	for db := range ps.paused {
		if database == "" || db == database {
			delete(ps.paused, db)
		}
	}
	close(ps.resumed)
	ps.resumed = make(chan struct{})
}

// lastIdleUnder is the index of the most recently used idle connection
// under cred, or -1.
func lastIdleUnder(idle []*serverConn, cred *broker.Credential) int {
	for i := len(idle) - 1; i >= 0; i-- {
		if idle[i].cred == cred {
			return i
		}
	}
	return -1
}

// evictLocked takes the longest-idle connection of any pool out of the set
// (its slot is the caller's now) and returns it for the caller to close, or
// nil when no connection is idle.
func (ps *poolSet) evictLocked() *serverConn {
	var from *pool
	for _, q := range ps.pools {
		if len(q.idle) > 0 && (from == nil || q.idle[0].lastUsed.Before(from.idle[0].lastUsed)) {
			from = q
		}
	}
	if from == nil {
		return nil
	}
	sc := from.idle[0]
	from.idle[0] = nil
	from.idle = from.idle[1:]
	from.open--
	ps.total--
	return sc
}

// check decides whether an idle connection may be lent: its credential has
// not retired, and it is alive. A ping waits PingTimeout at most, and never
// past ctx's deadline (the client's authentication deadline).
func (ps *poolSet) check(ctx context.Context, sc *serverConn) error {
	now := ps.cfg.Now()
	if sc.cred.Stale() {
		return errors.New("credential retired or superseded")
	}
	if now.Sub(sc.lastUsed) < ps.lim().PingAfterIdle {
		return sc.alive(ctx, false)
	}
	ctx, cancel := context.WithTimeout(ctx, ps.lim().PingTimeout)
	defer cancel()
	return sc.alive(ctx, true)
}

// dropIdleSince closes p's idle connections last used at or before t.
func (ps *poolSet) dropIdleSince(p *pool, t time.Time) {
	ps.mu.Lock()
	dead := ps.takeIdleLocked(p, func(c *serverConn) bool { return !c.lastUsed.After(t) })
	ps.mu.Unlock()
	for _, c := range dead {
		c.close()
	}
}

// takeIdleLocked takes p's idle connections for which drop is true out of
// the set (their slots free) and returns them for the caller to close.
func (ps *poolSet) takeIdleLocked(p *pool, drop func(*serverConn) bool) []*serverConn {
	var dead []*serverConn
	keep := p.idle[:0]
	for _, c := range p.idle {
		if drop(c) {
			dead = append(dead, c)
		} else {
			keep = append(keep, c)
		}
	}
	clear(p.idle[len(keep):])
	p.idle = keep
	if len(dead) > 0 {
		p.open -= len(dead)
		ps.total -= len(dead)
		ps.changedLocked()
	}
	return dead
}

// open dials a new connection of p under cred. The first session under a
// credential records its role-level settings; a later one that finds them
// changed (by some session of that shared user) restores them and is
// replaced by a clean session (see rolesettings.go).
func (ps *poolSet) open(ctx context.Context, p *pool, cred *broker.Credential) (*serverConn, error) {
	for attempt := 0; ; attempt++ {
		sc, err := dialServer(ctx, p.tmpl, cred, ps.lim().DialTimeout, ps.cfg.WriteTimeout)
		if err != nil {
			return nil, err
		}
		sc.maxStmts = ps.lim().MaxPreparedStatements
		got, err := sc.readRoleSettings(ctx)
		if err != nil {
			sc.close()
			return nil, upstreamFailure(err)
		}
		ps.mu.Lock()
		bl, known := ps.baselines[cred.Username]
		if !known {
			bl.settings = got
		}
		bl.cred = cred
		ps.baselines[cred.Username] = bl
		want := bl.settings
		ps.mu.Unlock()
		if sameRoleSettings(got, want) {
			sc.pool = p
			ps.mu.Lock()
			ps.servers[sc] = struct{}{}
			ps.mu.Unlock()
			sc.onClose = ps.forget
			return sc, nil
		}
		changed, err := sc.restoreRoleSettings(ctx, got, want)
		sc.close()
		log := ps.cfg.Logger.With("database", p.key.database, "level", p.key.level, "db_user", cred.Username,
			"settings", strings.Join(changed, ", "))
		if err != nil || attempt > 0 {
			log.Error("a shared database user's role-level settings were changed and could not be restored", "error", err)
			e := pgerror.New(pgerror.ConnectionFailure, "the database user's settings were changed by one of its sessions and could not be restored").
				WithHint("Try again; pgwarden's operator sees the details in its log.")
			e.Err = fmt.Errorf("role-level settings of %s changed (%s): %v", cred.Username, strings.Join(changed, ", "), err)
			return nil, e
		}
		log.Warn("a session of a shared database user changed its role-level settings (ALTER ROLE ... SET); restored them and opened a clean session")
	}
}

// release resets sc (DISCARD ALL) and checks it in: the end of a session
// in session mode.
func (ps *poolSet) release(sc *serverConn) { ps.checkin(sc, true) }

// checkin takes back a lent connection: handed to the first client waiting
// under its credential, or made idle; closed instead when it cannot be
// reused (reset failed, its credential retires, or the set is closed). With
// reset it is returned to its startup state first; without (transaction
// mode) it keeps its prepared statements, and the next client's settings
// are applied over its own when it attaches.
func (ps *poolSet) checkin(sc *serverConn, reset bool) {
	var err error
	if reset {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		err = sc.reset(ctx)
		cancel()
	}
	now := ps.cfg.Now()
	ps.mu.Lock()
	p := sc.pool
	if err == nil && !ps.closed && !sc.cred.Stale() {
		if ps.handOffLocked(sc) {
			ps.mu.Unlock()
			return
		}
		p.active--
		sc.lastUsed = now
		p.idle = append(p.idle, sc)
		ps.changedLocked()
		ps.mu.Unlock()
		return
	}
	p.active--
	p.open--
	ps.total--
	ps.changedLocked()
	ps.mu.Unlock()
	if err != nil {
		ps.cfg.Logger.Debug("upstream reset failed; closing", "error", err, "backend_pid", sc.pid)
	}
	sc.close()
}

// discard closes a lent connection that must not be reused.
func (ps *poolSet) discard(sc *serverConn) {
	ps.mu.Lock()
	sc.pool.active--
	sc.pool.open--
	ps.total--
	ps.changedLocked()
	ps.mu.Unlock()
	sc.close()
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
			dead = append(dead, ps.takeIdleLocked(p, func(c *serverConn) bool {
				return c.cred.Stale() || now.Sub(c.lastUsed) >= ps.lim().IdleTimeout
			})...)
		}
		for user, bl := range ps.baselines {
			if !bl.cred.Static && bl.cred.Finished() {
				delete(ps.baselines, user)
			}
		}
		ps.mu.Unlock()
		for _, c := range dead {
			c.close()
		}
	}
}

// close stops the reaper and closes idle connections; active ones are closed
// by their sessions, which see closed and do not return them. Waiters are
// woken and refused.
func (ps *poolSet) close() {
	ps.closeOnce.Do(func() {
		close(ps.stop)
		ps.reaperWG.Wait()
		ps.mu.Lock()
		ps.closed = true
		var idle []*serverConn
		for _, p := range ps.pools {
			idle = append(idle, p.idle...)
			p.open -= len(p.idle)
			ps.total -= len(p.idle)
			p.idle = nil
		}
		ps.changedLocked()
		ps.mu.Unlock()
		for _, c := range idle {
			c.close()
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
