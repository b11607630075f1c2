package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/pgwarden/pgwarden/pgerror"
	"github.com/pgwarden/pgwarden/pool"
	"github.com/pgwarden/pgwarden/wire"
)

// ErrServerClosed is returned by Serve after Shutdown or Close.
var ErrServerClosed = errors.New("proxy: server closed")

// Server accepts PostgreSQL clients, authenticates them with their token and
// relays them to pooled upstream sessions. Serve may be called on several
// listeners; Shutdown stops them all.
type Server struct {
	cfg     Config
	pools   *pool.Set
	cancels *cancelMap
	stmts   *pool.StmtRegistry  // named statements of clients in transaction mode
	stats   map[string]*dbStats // per configured database; the map is not changed after NewServer
	started time.Time
	// consoleGroups may open the console; RELOAD replaces them.
	consoleGroups atomic.Pointer[[]string]
	// reloadable is the configuration new connections take (Reconfigure
	// replaces it whole); never nil after NewServer.
	reloadable atomic.Pointer[Reloadable]

	// parker holds idle transaction-mode clients without a goroutine
	// each; nil where it is not available (then they keep theirs).
	parker *wire.Parker

	inShutdown atomic.Bool
	handshakes atomic.Int64 // connections between accept and AuthenticationOk (or their end)
	mu         sync.Mutex
	listeners  map[net.Listener]struct{} // guarded by mu
	conns      map[*clientConn]struct{}  // guarded by mu
	connsDone  chan struct{}             // closed when conns empties during shutdown; guarded by mu
	subjects   map[string]int            // guarded by mu; sessions per token subject, entries > 0 only
	denied     map[string]time.Time      // guarded by mu; subjects KILL SUBJECT ended: their tokens expiring no later are refused
}

// NewServer returns a Server; it starts the pool's background reaper, which
// Close or Shutdown stops. It fails when cfg is incomplete or invalid, or a
// route's upstream does not parse (pool.ParseUpstream).
func NewServer(cfg Config) (*Server, error) {
	if err := cfg.checkAndSetDefaults(); err != nil {
		return nil, err
	}
	s := &Server{cfg: cfg, cancels: newCancelMap(), stmts: pool.NewStmtRegistry(), stats: map[string]*dbStats{}, started: time.Now(), listeners: map[net.Listener]struct{}{}, conns: map[*clientConn]struct{}{},
		subjects: map[string]int{}, denied: map[string]time.Time{}}
	s.cancels.obs = cfg.Observer
	for db := range cfg.Routes {
		s.stats[db] = &dbStats{}
	}
	s.SetConsoleGroups(cfg.Console.Groups)
	s.reloadable.Store(&Reloadable{Authorizer: cfg.Authorizer, Routes: cfg.Routes, TLS: cfg.TLS})
	ups := make(map[string]pool.Upstream, len(cfg.Routes))
	for db, r := range cfg.Routes {
		ups[db] = pool.Upstream{Conn: r.Upstream, Policy: r.Policy}
	}
	pools, err := pool.NewSet(s.cfg.Pool, pool.Options{Upstreams: ups, WriteTimeout: cfg.WriteTimeout, Logger: cfg.Logger, Now: cfg.Now,
		ObserveWait: func(k pool.Key, d time.Duration) { cfg.Observer.PoolWaited(k.Database, k.Level, d) }})
	if err != nil {
		return nil, fmt.Errorf("proxy: %w", err)
	}
	s.pools = pools
	if s.parker, err = wire.NewParker(); err != nil {
		s.parker = nil
		cfg.Logger.Debug("idle clients keep a goroutine each", "reason", err)
	}
	return s, nil
}

// Serve accepts connections on ln until Shutdown or Close, one goroutine each.
// Temporary accept errors back off, doubling from 5ms to 1s. It always returns
// a non-nil error; after Shutdown or Close, ErrServerClosed.
func (s *Server) Serve(ln net.Listener) error {
	s.mu.Lock()
	if s.inShutdown.Load() {
		s.mu.Unlock()
		return ErrServerClosed
	}
	s.listeners[ln] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.listeners, ln)
		s.mu.Unlock()
	}()
	var delay time.Duration
	for {
		nc, err := ln.Accept()
		if err != nil {
			if s.inShutdown.Load() {
				return ErrServerClosed
			}
			if errors.Is(err, net.ErrClosed) {
				return err
			}
			// Anything else (EMFILE, ECONNABORTED…) is taken as temporary.
			delay = min(max(2*delay, 5*time.Millisecond), time.Second)
			s.cfg.Logger.Warn("accept failed; retrying", "error", err, "delay", delay)
			time.Sleep(delay)
			continue
		}
		delay = 0
		if s.handshakes.Add(1) > int64(s.cfg.MaxHandshakes) {
			s.handshakes.Add(-1)
			go s.refuseBusy(nc)
			continue
		}
		c := newClientConn(s, wire.WithRawIO(nc))
		if !s.track(c) {
			s.handshakes.Add(-1)
			nc.Close()
			return ErrServerClosed
		}
		go c.serve() // which untracks c when it ends
	}
}

// errBusy refuses a connection beyond MaxHandshakes.
var errBusy = pgerror.New(pgerror.TooManyConnections, "sorry, too many clients are connecting to pgwarden at once").
	WithHint("Try again in a moment.")

// refuseBusy answers a connection over MaxHandshakes with a FATAL at once,
// before reading anything, and closes it. PostgreSQL's postmaster answers a
// failed fork the same way; libpq reports such an answer to an SSLRequest or
// startup packet as the server's error.
func (s *Server) refuseBusy(nc net.Conn) {
	defer nc.Close()
	s.cfg.Observer.AuthResult("", "", "busy")
	buf, err := errorResponse("FATAL", errBusy).Encode(nil)
	if err != nil {
		return
	}
	_ = nc.SetWriteDeadline(time.Now().Add(time.Second))
	_, _ = nc.Write(buf)
}

// holdSubject counts one more session of subject, unless that would pass
// MaxSubjectConnections.
func (s *Server) holdSubject(subject string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if n := s.cfg.MaxSubjectConnections; n > 0 && s.subjects[subject] >= n {
		return false
	}
	s.subjects[subject]++
	return true
}

func (s *Server) releaseSubject(subject string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.subjects[subject]--; s.subjects[subject] <= 0 {
		delete(s.subjects, subject)
	}
}

func (s *Server) track(c *clientConn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.inShutdown.Load() {
		return false
	}
	s.conns[c] = struct{}{}
	return true
}

func (s *Server) untrack(c *clientConn) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.conns, c)
	if len(s.conns) == 0 && s.connsDone != nil {
		close(s.connsDone)
		s.connsDone = nil
	}
}

// Shutdown stops accepting, then waits for client sessions to end until ctx
// is done, then closes what is left and the pools. It returns ctx's error if
// sessions had to be cut.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.inShutdown.Store(true)
	for ln := range s.listeners {
		ln.Close()
	}
	var done chan struct{}
	if len(s.conns) > 0 {
		done = make(chan struct{})
		s.connsDone = done
	}
	s.mu.Unlock()
	var err error
	if done != nil {
		select {
		case <-done:
		case <-ctx.Done():
			err = ctx.Err()
		}
	}
	s.closeConns()
	s.pools.Close()
	s.closeParker()
	return err
}

// closeParker stops the Parker once every client was told to end (a client
// parked still is woken to find its socket closed).
func (s *Server) closeParker() {
	if s.parker != nil {
		_ = s.parker.Close()
	}
}

// Close stops accepting and closes every client and upstream connection now.
func (s *Server) Close() error {
	s.mu.Lock()
	s.inShutdown.Store(true)
	for ln := range s.listeners {
		ln.Close()
	}
	s.mu.Unlock()
	s.closeConns()
	s.pools.Close()
	s.closeParker()
	return nil
}

func (s *Server) closeConns() {
	s.mu.Lock()
	conns := make([]*clientConn, 0, len(s.conns))
	for c := range s.conns {
		conns = append(conns, c)
	}
	s.mu.Unlock()
	for _, c := range conns {
		c.kill()
	}
}

// PoolStat is a snapshot of one pool.
type PoolStat struct {
	Database, Level string
	Idle, Active    int
	// Waiting is how many clients are queued for one of its connections.
	Waiting int
}

// PoolStats returns a snapshot of every pool, for metrics.
func (s *Server) PoolStats() []PoolStat {
	st := s.pools.Stats()
	out := make([]PoolStat, 0, len(st))
	for _, p := range st {
		out = append(out, PoolStat{Database: p.Database, Level: p.Level, Idle: p.Idle, Active: p.Active, Waiting: p.Waiting})
	}
	return out
}

// SetPoolConfig replaces the pool limits (RELOAD). Connections already open
// beyond a lowered limit close as they are released or idle out.
func (s *Server) SetPoolConfig(pc pool.Config) error {
	if err := s.pools.SetLimits(pc); err != nil {
		return fmt.Errorf("proxy: %w", err)
	}
	return nil
}

// Reloadable is the part of a Server's configuration that Reconfigure
// replaces while it runs (SIGHUP, the console's RELOAD). A connection takes
// one snapshot of it when it is accepted and uses that snapshot from its TLS
// handshake to the route of its level, so a reload never mixes two
// configurations in one handshake; a session already running keeps the level
// and route it logged in with. Nothing in it may be modified once given to
// NewServer or Reconfigure.
type Reloadable struct {
	// Authorizer decides levels; see Config.Authorizer. Required.
	Authorizer Authorizer
	// Routes must name exactly the databases the Server started with, each
	// with the Upstream and Policy it started with: pools and statistics
	// are per database and upstream, so those need a restart. The levels,
	// Vault roles, scopes and pool modes may change.
	Routes map[string]Route
	// TLS is offered to new connections as Config.TLS is; nil stops
	// offering TLS (SSLRequest is answered 'N').
	TLS *tls.Config
}

// ErrRestartNeeded is returned by Reconfigure for a change only a restart
// can make.
var ErrRestartNeeded = errors.New("proxy: this change needs a restart")

// Reconfigure publishes r for connections accepted from now on; those
// already accepted keep theirs. It returns an error wrapping
// ErrRestartNeeded, and changes nothing, when r adds or drops a database or
// changes one's upstream or policy.
func (s *Server) Reconfigure(r Reloadable) error {
	if r.Authorizer == nil {
		return errors.New("proxy: Reconfigure: Authorizer is required")
	}
	if len(r.Routes) != len(s.cfg.Routes) {
		return fmt.Errorf("%w: the set of databases changed", ErrRestartNeeded)
	}
	for db, was := range s.cfg.Routes {
		now, ok := r.Routes[db]
		if !ok {
			return fmt.Errorf("%w: database %q is gone", ErrRestartNeeded, db)
		}
		if now.Upstream != was.Upstream || now.Policy != was.Policy {
			return fmt.Errorf("%w: database %q has another upstream", ErrRestartNeeded, db)
		}
	}
	r.TLS = clientTLS(r.TLS)
	s.reloadable.Store(&r)
	return nil
}

// routes are the routes new connections take.
func (s *Server) routes() map[string]Route { return s.reloadable.Load().Routes }
