package pool

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgwarden/pgwarden/broker"
	"github.com/pgwarden/pgwarden/pgerror"
	"github.com/pgwarden/pgwarden/wire"
)

// Set holds one pool per (database, access level) and bounds the number
// of upstream connections per pool and in total. It is safe for concurrent
// use.
//
// It owns every upstream connection: it opens them, lends them to one client
// at a time (Acquire), takes them back (Release, Checkin, Discard) and is the
// only one to let go of them. A connection is never handed out, and never
// kept idle, past its credential's retirement: Vault drops the role at the
// lease's end and a session of a dropped role still answers `select 1` while
// failing every privilege check, so no liveness probe could catch it. An idle
// connection is checked before it is lent (see Server.alive), since the
// server may have ended it meanwhile.
//
// When the total is reached and a pool needs a connection, the longest-idle
// connection of another pool is closed to make room, so one pool's idle
// connections never starve the others.
type Set struct {
	opts Options

	mu      sync.Mutex
	pools   map[Key]*pool // guarded by mu
	total   int           // guarded by mu; connections open or being opened, all pools
	changed chan struct{} // guarded by mu; closed (and replaced) when a slot frees or a connection turns idle
	closed  bool          // guarded by mu
	// baselines are each database user's role-level settings as its first
	// session found them (see rolesettings.go), keyed by user name — a
	// static role's user outlives each credential Vault rotates for it, and
	// a tampered setting must not become the next credential's baseline;
	// guarded by mu, dropped when a dynamic user's credential is finished.
	baselines map[string]baseline

	// limits are the Config in force, replaced whole by SetLimits (RELOAD).
	limits atomic.Pointer[Config]
	// servers are every connection open or being checked, for SHOW
	// SERVERS; guarded by mu.
	servers map[*Server]struct{}
	// paused databases: no server is lent for them until RESUME; a client
	// that needs one waits (up to AcquireTimeout). resumed is closed (and
	// replaced) by RESUME; guarded by mu.
	paused  map[string]bool
	resumed chan struct{}

	stop      chan struct{}
	reaperWG  sync.WaitGroup
	closeOnce sync.Once
}

// Options are what a Set needs besides its limits. They do not change for
// the Set's life.
type Options struct {
	// Upstreams maps each database name, as clients ask for it, to where
	// its connections go. NewSet parses every one; Acquire refuses a
	// database not in it (3D000).
	Upstreams map[string]Upstream
	// WriteTimeout bounds every write to an upstream session: one that
	// takes no bytes for this long fails. Default 60s.
	WriteTimeout time.Duration
	// Logger. Default slog.Default().
	Logger *slog.Logger
	// Now is the clock for idle times. Default time.Now.
	Now func() time.Time
	// ObserveWait, when set, is called once for every Acquire that had to
	// queue (the pool or the total was full of busy connections, or the
	// database was paused), when its wait ends, served or not, with how
	// long it waited. An Acquire served at once is not reported, so the
	// hook sees only real waits and costs nothing on the fast path. It is
	// called without the Set's lock held and must be fast.
	ObserveWait func(k Key, d time.Duration)
}

// Upstream is where one database's connections go.
type Upstream struct {
	// Conn is a PostgreSQL connection string (keyword/value or URL) without
	// user or password.
	Conn string
	// Policy is what ParseUpstream enforces on Conn (TLS, SCRAM).
	Policy UpstreamPolicy
}

// NewSet returns a Set with limits cfg (its defaults filled in; see
// Config.CheckAndSetDefaults) and starts its background reaper, which
// Close stops. It fails when cfg is invalid or an upstream does not parse.
func NewSet(cfg Config, opts Options) (*Set, error) {
	if err := cfg.CheckAndSetDefaults(); err != nil {
		return nil, err
	}
	if opts.WriteTimeout == 0 {
		opts.WriteTimeout = 60 * time.Second
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	ps := &Set{opts: opts, pools: map[Key]*pool{}, changed: make(chan struct{}), stop: make(chan struct{}),
		baselines: map[string]baseline{}, servers: map[*Server]struct{}{}, paused: map[string]bool{}, resumed: make(chan struct{})}
	ps.limits.Store(&cfg)
	// Parse every upstream now, so a bad connection string fails at start.
	for db, u := range opts.Upstreams {
		if _, err := ParseUpstream(u.Conn, u.Policy); err != nil {
			return nil, fmt.Errorf("database %q: upstream: %w", db, err)
		}
	}
	ps.reaperWG.Add(1)
	go ps.reap()
	return ps, nil
}

// lim is the pool limits in force.
func (ps *Set) lim() *Config { return ps.limits.Load() }

// Limits returns the limits in force. The Config must not be modified.
func (ps *Set) Limits() *Config { return ps.lim() }

// Key names a pool: the database as clients ask for it and the access
// level.
type Key struct{ Database, Level string }

// baseline is a database user's recorded role settings and the newest
// credential seen for it.
type baseline struct {
	settings []roleSetting
	cred     *broker.Credential
}

type pool struct {
	key  Key
	tmpl *pgconn.Config
	// All guarded by Set.mu.
	open    int       // connections open or being opened: idle + active
	active  int       // lent to a client, being opened or being checked
	idle    []*Server // least recently used first
	waiters []*waiter // clients waiting for a connection, first come first
	waiting int       // Acquires that had to queue and are still waiting (paused ones too)
}

// waiter is a client waiting in Acquire. A connection checked in under its
// credential is handed to it directly (already counted active), so a busy
// pool serves its queue in order without waking everyone.
type waiter struct {
	cred  *broker.Credential
	ch    chan *Server // buffered: the hand-off never blocks
	timer *time.Timer  // AcquireTimeout; reused with the waiter
}

// waiters are reused: in transaction mode many clients wait for few servers
// at every transaction, and a waiter, its channel and its timer would
// otherwise be garbage each time.
var waiters = sync.Pool{New: func() any { return &waiter{ch: make(chan *Server, 1)} }}

// newWaiter is a waiter for cred whose timer fires after d.
func newWaiter(cred *broker.Credential, d time.Duration) *waiter {
	w := waiters.Get().(*waiter)
	w.cred = cred
	if w.timer == nil {
		w.timer = time.NewTimer(d)
	} else {
		w.timer.Reset(d)
	}
	return w
}

// freeWaiter gives w back: out of every queue, its channel empty.
func (ps *Set) freeWaiter(w *waiter) {
	w.timer.Stop()
	w.cred = nil
	select {
	case sc := <-w.ch:
		// Never expected; but a server left here would go to whoever
		// reuses the waiter, under another credential.
		ps.opts.Logger.Error("pool: a waiter was freed holding a server; checking it in")
		ps.Checkin(sc, false)
	default:
	}
	waiters.Put(w)
}

// changedLocked wakes everyone waiting for room.
func (ps *Set) changedLocked() {
	close(ps.changed)
	ps.changed = make(chan struct{})
}

func (ps *Set) get(database, level string) (*pool, error) {
	k := Key{database, level}
	ps.mu.Lock()
	defer ps.mu.Unlock()
	if ps.closed {
		return nil, errShuttingDown
	}
	if p := ps.pools[k]; p != nil {
		return p, nil
	}
	u, ok := ps.opts.Upstreams[database]
	if !ok {
		return nil, pgerror.Newf(pgerror.InvalidCatalogName, "database %q has no upstream", database)
	}
	tmpl, err := ParseUpstream(u.Conn, u.Policy)
	if err != nil {
		return nil, pgerror.Wrap(err, pgerror.ConfigurationFileError, "upstream connection string is invalid")
	}
	p := &pool{key: k, tmpl: tmpl}
	ps.pools[k] = p
	return p, nil
}

var errShuttingDown = pgerror.New(pgerror.AdminShutdown, "pgwarden is shutting down")

// Acquire lends a connection of (database, level) under cred: an idle one
// that is still alive, or a new one. Only a connection under cred itself is
// lent, so one person's lease (identity scope) never serves another, and
// after a rotation new sessions use the new credential. When the pool is full
// of idle connections under other credentials the longest idle is closed to
// make room; when the pool or the total is full of busy ones it waits up to
// AcquireTimeout. The caller holds the Server until it gives it back with
// Release, Checkin or Discard. Errors carry a SQLSTATE: 53300 when no
// connection came in time (or the database is paused), 57P01 once the Set
// is closed, PostgreSQL's own (*pgconn.PgError) when it refused the login,
// 08006 when it could not be reached.
func (ps *Set) Acquire(ctx context.Context, database, level string, cred *broker.Credential) (*Server, error) {
	p, err := ps.get(database, level)
	if err != nil {
		return nil, err
	}
	var wait <-chan time.Time // the acquire timeout, once waiting
	var w *waiter             // in p's queue while set
	var waitFrom time.Time    // when it first had to wait (counted in p.waiting); zero until then
	defer func() {
		if w != nil {
			if sc := ps.leaveQueue(p, w); sc != nil {
				ps.Checkin(sc, false) // handed over after this Acquire returned otherwise
			}
			ps.freeWaiter(w)
		}
		if !waitFrom.IsZero() {
			ps.endWait(p, waitFrom)
		}
	}()
	for {
		ps.mu.Lock()
		if w != nil {
			// A hand-off may have come with another wake-up, and the select
			// below took the other: it is ours (counted active, w out of the
			// queue), before anything else.
			select {
			case sc := <-w.ch:
				ps.mu.Unlock()
				ps.freeWaiter(w)
				w = nil
				return sc, nil
			default:
			}
		}
		if ps.closed {
			ps.mu.Unlock()
			return nil, errShuttingDown
		}
		if ps.paused[database] {
			resumed := ps.resumed
			if w == nil {
				w = newWaiter(cred, ps.lim().AcquireTimeout) // queued only for its timer while paused
				wait = w.timer.C
			}
			startWaitLocked(p, &waitFrom)
			ps.mu.Unlock()
			select {
			case <-resumed:
				continue
			case <-ctx.Done():
				return nil, pgerror.Wrap(ctx.Err(), pgerror.ConnectionFailure, "timed out waiting for an upstream connection")
			case <-wait:
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
				ps.opts.Logger.Debug("idle upstream session not reusable; closing", "backend_pid", sc.PID, "error", err)
				ps.Discard(sc)
				if wire.IsTimeout(err) {
					// A silent network: the sessions idle as long as this one
					// most likely went with it. Do not ping each in turn.
					ps.dropIdleSince(p, sc.lastUsed)
				}
				continue
			}
			return sc, nil
		}
		var victim *Server
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
					ps.opts.Logger.Debug("closed an idle upstream session to make room",
						"database", victim.pool.key.Database, "level", victim.pool.key.Level, "backend_pid", victim.PID)
					victim.Close()
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
			w = newWaiter(cred, ps.lim().AcquireTimeout)
			wait = w.timer.C
		}
		startWaitLocked(p, &waitFrom)
		if !slices.Contains(p.waiters, w) {
			p.waiters = append(p.waiters, w)
		}
		ch := ps.changed
		ps.mu.Unlock()
		select {
		case sc := <-w.ch:
			ps.freeWaiter(w) // out of the queue: the hand-off took it out
			w = nil
			return sc, nil
		case <-ch:
		case <-ctx.Done():
			return nil, pgerror.Wrap(ctx.Err(), pgerror.ConnectionFailure, "timed out waiting for an upstream connection")
		case <-wait:
			return nil, pgerror.Newf(pgerror.TooManyConnections,
				"too many upstream connections for database %q at level %q", p.key.Database, p.key.Level).
				WithHint(fmt.Sprintf("Waited %v for a free connection; try again, or raise the pool limits.", ps.lim().AcquireTimeout))
		}
	}
}

// startWaitLocked counts an Acquire of p as waiting, once: from the first
// time it has to wait until it returns (endWait).
func startWaitLocked(p *pool, from *time.Time) {
	if from.IsZero() {
		*from = time.Now()
		p.waiting++
	}
}

// endWait counts an Acquire that had to wait since from out of p's waiting
// clients and reports its wait (Options.ObserveWait).
func (ps *Set) endWait(p *pool, from time.Time) {
	ps.mu.Lock()
	p.waiting--
	ps.mu.Unlock()
	if f := ps.opts.ObserveWait; f != nil {
		f(p.key, time.Since(from))
	}
}

// leaveQueue takes w out of p's queue and returns a connection handed to it
// meanwhile, if any.
func (ps *Set) leaveQueue(p *pool, w *waiter) *Server {
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
func (ps *Set) handOffLocked(sc *Server) bool {
	p := sc.pool
	if ps.paused[p.key.Database] {
		return false // PAUSE: it waits idle; the waiters wait for RESUME
	}
	for i, w := range p.waiters {
		if w.cred == sc.Cred {
			p.waiters = slices.Delete(p.waiters, i, i+1)
			sc.lastUsed = ps.opts.Now()
			w.ch <- sc
			return true
		}
	}
	return false
}

// forget takes a closed connection out of the registry.
func (ps *Set) forget(sc *Server) {
	ps.mu.Lock()
	delete(ps.servers, sc)
	ps.mu.Unlock()
}

// SetLimits replaces the limits (RELOAD), after filling in cfg's defaults
// and checking it (Config.CheckAndSetDefaults, whose error it returns).
// Connections already open beyond a lowered limit close as they are
// released or idle out.
func (ps *Set) SetLimits(cfg Config) error {
	if err := cfg.CheckAndSetDefaults(); err != nil {
		return err
	}
	ps.limits.Store(&cfg)
	ps.mu.Lock()
	ps.changedLocked()
	ps.mu.Unlock()
	return nil
}

// Pause stops lending servers for database ("" for every one) and waits
// until none of its servers is lent, or ctx ends (then the pause stays in
// effect, and the error, 55006, says so).
func (ps *Set) Pause(ctx context.Context, database string) error {
	ps.mu.Lock()
	for db := range ps.opts.Upstreams {
		if database == "" || db == database {
			ps.paused[db] = true
		}
	}
	ps.mu.Unlock()
	for {
		ps.mu.Lock()
		busy := 0
		for k, p := range ps.pools {
			if database == "" || k.Database == database {
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

// Resume lends servers for database ("" for every one) again.
func (ps *Set) Resume(database string) {
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
func lastIdleUnder(idle []*Server, cred *broker.Credential) int {
	for i := len(idle) - 1; i >= 0; i-- {
		if idle[i].Cred == cred {
			return i
		}
	}
	return -1
}

// evictLocked takes the longest-idle connection of any pool out of the set
// (its slot is the caller's now) and returns it for the caller to close, or
// nil when no connection is idle.
func (ps *Set) evictLocked() *Server {
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
func (ps *Set) check(ctx context.Context, sc *Server) error {
	now := ps.opts.Now()
	if sc.Cred.Stale() {
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
func (ps *Set) dropIdleSince(p *pool, t time.Time) {
	ps.mu.Lock()
	dead := ps.takeIdleLocked(p, func(c *Server) bool { return !c.lastUsed.After(t) })
	ps.mu.Unlock()
	for _, c := range dead {
		c.Close()
	}
}

// takeIdleLocked takes p's idle connections for which drop is true out of
// the set (their slots free) and returns them for the caller to close.
func (ps *Set) takeIdleLocked(p *pool, drop func(*Server) bool) []*Server {
	var dead []*Server
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
func (ps *Set) open(ctx context.Context, p *pool, cred *broker.Credential) (*Server, error) {
	if _, ok := ctx.Deadline(); !ok {
		// Opening, checking and restoring role settings, all of it: a
		// server that answers nothing holds no slot for ever.
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, 2*ps.lim().DialTimeout)
		defer cancel()
	}
	canceled := 0
	for attempt := 0; ; attempt++ {
		sc, err := dialServer(ctx, p.tmpl, cred, ps.lim().DialTimeout, ps.opts.WriteTimeout)
		if err != nil {
			return nil, err
		}
		sc.maxStmts = ps.lim().MaxPreparedStatements
		got, err := sc.readRoleSettings(ctx)
		if err != nil {
			sc.Close()
			if queryCanceled(err) && canceled < 2 && ctx.Err() == nil {
				// A role-level statement_timeout tampered down to a
				// millisecond can fire before safeTx lifts it, on a busy
				// machine: a new session tries again.
				canceled++
				attempt--
				continue
			}
			return nil, UpstreamFailure(err)
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
		sc.Close()
		if err != nil && queryCanceled(err) && canceled < 2 && ctx.Err() == nil {
			canceled++ // as above: the restore ran in a transaction, rolled back
			attempt--
			continue
		}
		log := ps.opts.Logger.With("database", p.key.Database, "level", p.key.Level, "db_user", cred.Username,
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

// queryCanceled reports PostgreSQL's query_canceled (57014).
func queryCanceled(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && pgErr.Code == "57014"
}

// Release resets sc (DISCARD ALL) and checks it in: the end of a session
// in session mode.
func (ps *Set) Release(sc *Server) { ps.Checkin(sc, true) }

// Checkin takes back a lent connection: handed to the first client waiting
// under its credential, or made idle; closed instead when it cannot be
// reused (reset failed, its credential retires, or the set is closed). With
// reset it is returned to its startup state first; without (transaction
// mode) it keeps its prepared statements, and the next client's settings
// are applied over its own when it attaches.
func (ps *Set) Checkin(sc *Server, reset bool) {
	var err error
	if reset {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		err = sc.Reset(ctx)
		cancel()
	}
	now := ps.opts.Now()
	ps.mu.Lock()
	p := sc.pool
	if err == nil && !ps.closed && !sc.Cred.Stale() {
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
		ps.opts.Logger.Debug("upstream reset failed; closing", "error", err, "backend_pid", sc.PID)
	}
	sc.Close()
}

// Discard takes back a lent connection that must not be reused, closes it
// and frees its slot. It may follow the borrower's own Server.Close.
func (ps *Set) Discard(sc *Server) {
	ps.mu.Lock()
	sc.pool.active--
	sc.pool.open--
	ps.total--
	ps.changedLocked()
	ps.mu.Unlock()
	sc.Close()
}

// reap closes idle connections whose credential retires or that sat idle too
// long, every second.
func (ps *Set) reap() {
	defer ps.reaperWG.Done()
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-ps.stop:
			return
		case <-t.C:
		}
		now := ps.opts.Now()
		var dead []*Server
		ps.mu.Lock()
		for _, p := range ps.pools {
			dead = append(dead, ps.takeIdleLocked(p, func(c *Server) bool {
				return c.Cred.Stale() || now.Sub(c.lastUsed) >= ps.lim().IdleTimeout
			})...)
		}
		for user, bl := range ps.baselines {
			if !bl.cred.Static && bl.cred.Finished() {
				delete(ps.baselines, user)
			}
		}
		ps.mu.Unlock()
		for _, c := range dead {
			c.Close()
		}
	}
}

// Close stops the reaper and closes idle connections; lent ones are closed
// as their borrowers give them back, and Acquire refuses from now on.
// Waiters are woken and refused. It may be called more than once.
func (ps *Set) Close() {
	ps.closeOnce.Do(func() {
		close(ps.stop)
		ps.reaperWG.Wait()
		ps.mu.Lock()
		ps.closed = true
		var idle []*Server
		for _, p := range ps.pools {
			idle = append(idle, p.idle...)
			p.open -= len(p.idle)
			ps.total -= len(p.idle)
			p.idle = nil
		}
		ps.changedLocked()
		ps.mu.Unlock()
		for _, c := range idle {
			c.Close()
		}
	})
}

// Stat is a snapshot of one pool.
type Stat struct {
	Key
	// Idle connections, Active ones (lent, being opened or being checked),
	// and Open ones (both).
	Idle, Active, Open int
	// Waiting is how many clients are queued for a connection now (the
	// pool or the total full of busy connections, or the database paused).
	Waiting int
	// IdleUser is the database user of the most recently used idle
	// connection; "" when none is idle.
	IdleUser string
}

// Stats returns a snapshot of every pool, in no particular order, for
// metrics and the console.
func (ps *Set) Stats() []Stat {
	ps.mu.Lock()
	defer ps.mu.Unlock()
	out := make([]Stat, 0, len(ps.pools))
	for k, p := range ps.pools {
		st := Stat{Key: k, Idle: len(p.idle), Active: p.active, Open: p.open, Waiting: p.waiting}
		if len(p.idle) > 0 {
			st.IdleUser = p.idle[len(p.idle)-1].Cred.Username
		}
		out = append(out, st)
	}
	return out
}

// ServerState is one connection as SHOW SERVERS sees it.
type ServerState struct {
	Server *Server
	Idle   bool // in its pool, not lent
}

// Servers returns every connection open or being checked, by ID. The
// Servers are the Set's or their borrowers': read only what is safe to read
// from another goroutine (ID, Key, PID, CancelAddr, Cred, Created, AppName,
// Client, and Conn's addresses).
func (ps *Set) Servers() []ServerState {
	ps.mu.Lock()
	idle := map[*Server]bool{}
	for _, p := range ps.pools {
		for _, sc := range p.idle {
			idle[sc] = true
		}
	}
	out := make([]ServerState, 0, len(ps.servers))
	for sc := range ps.servers {
		out = append(out, ServerState{Server: sc, Idle: idle[sc]})
	}
	ps.mu.Unlock()
	sort.Slice(out, func(i, j int) bool { return out[i].Server.ID < out[j].Server.ID })
	return out
}

// Paused reports whether database is paused (Pause).
func (ps *Set) Paused(database string) bool {
	ps.mu.Lock()
	defer ps.mu.Unlock()
	return ps.paused[database]
}
