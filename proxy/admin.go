package proxy

import (
	"context"
	"errors"
	"net"
	"slices"
	"sort"
	"strings"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/pgwarden/pgwarden/authn"
	"github.com/pgwarden/pgwarden/broker"
	"github.com/pgwarden/pgwarden/console"
	"github.com/pgwarden/pgwarden/pgerror"
	"github.com/pgwarden/pgwarden/pool"
	"github.com/pgwarden/pgwarden/wire"
)

// ConsoleDatabase is the admin console's virtual database.
const ConsoleDatabase = "pgwarden"

// ConsoleConfig opens the admin console.
type ConsoleConfig struct {
	// Groups whose members may open it. Empty: nobody may.
	Groups []string
	// Settings lists the configuration for SHOW CONFIG, secrets redacted.
	Settings func() []console.Setting
	// Reload re-reads the configuration and applies what can change
	// without a restart (RELOAD).
	Reload func(ctx context.Context) error
}

// clientInfo is what the console shows of a client, set once it has
// authenticated.
type clientInfo struct {
	subject, database, level, mode, appName string
	tls                                     bool
}

// dbStats are one database's counters since start, for SHOW STATS.
type dbStats struct {
	xacts, queries, recv, sent    atomic.Int64
	xactTime, queryTime, waitTime atomic.Int64 // nanoseconds
	maxWait                       atomic.Int64
	_                             [0]func() // not comparable
}

// Traffic is one database's counters since start, as SHOW STATS counts
// them, for metrics read at scrape time (the relay only adds to atomics).
type Traffic struct {
	Database string
	// Transactions and Queries completed. In session mode they are added
	// when the session ends; in transaction mode a transaction is added when
	// it ends and the queries when the session does.
	Transactions, Queries int64
	// Received from clients and Sent to them, in bytes; added when the
	// session ends.
	Received, Sent int64
}

// Traffic returns every configured database's counters, sorted by name.
func (s *Server) Traffic() []Traffic {
	out := make([]Traffic, 0, len(s.stats))
	for _, db := range s.databases() {
		st := s.stats[db]
		out = append(out, Traffic{Database: db, Transactions: st.xacts.Load(), Queries: st.queries.Load(),
			Received: st.recv.Load(), Sent: st.sent.Load()})
	}
	return out
}

// clientIDs numbers client connections for the console and KILL.
var clientIDs atomic.Uint64

// statsFor is the counters of database, or nil for one not configured.
func (s *Server) statsFor(database string) *dbStats { return s.stats[database] }

// pauseWait bounds how long PAUSE waits for lent servers to come back.
const pauseWait = 30 * time.Second

// admin is the console's view of the server.
type admin struct{ s *Server }

var _ console.Backend = admin{}

func (a admin) clients() []*clientConn {
	a.s.mu.Lock()
	defer a.s.mu.Unlock()
	out := make([]*clientConn, 0, len(a.s.conns))
	for c := range a.s.conns {
		if c.info.Load() != nil {
			out = append(out, c)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].cid < out[j].cid })
	return out
}

func hostPort(addr net.Addr) (string, int) {
	switch a := addr.(type) {
	case *net.TCPAddr:
		return a.IP.String(), a.Port
	case *net.UnixAddr:
		return "unix", 0
	}
	return "", 0
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

func (a admin) Clients() []console.Client {
	var out []console.Client
	now := time.Now()
	for _, c := range a.clients() {
		in := c.info.Load()
		row := console.Client{ID: c.cid, User: in.level, Database: in.database, State: "idle",
			ConnectTime: c.start, Subject: in.subject, TLS: yesNo(in.tls), ApplicationName: in.appName}
		row.Addr, row.Port = hostPort(c.raw.RemoteAddr())
		row.LocalAddr, row.LocalPort = hostPort(c.raw.LocalAddr())
		if t := c.lastReq.Load(); t != 0 {
			row.RequestTime = time.Unix(0, t)
		} else {
			row.RequestTime = c.start
		}
		if w := c.waitSince.Load(); w != 0 {
			row.State, row.Wait = "waiting", now.Sub(time.Unix(0, w))
		}
		if sc := c.attached.Load(); sc != nil {
			row.State, row.Link, row.BackendPID = "active", sc.ID, sc.PID
		}
		if in.database == ConsoleDatabase {
			row.State = "active"
		}
		out = append(out, row)
	}
	return out
}

func (a admin) Servers() []console.Server {
	all := a.s.pools.Servers()
	out := make([]console.Server, 0, len(all))
	for _, st := range all {
		sc := st.Server
		k := sc.Key()
		row := console.Server{ID: sc.ID, User: k.Level, Database: k.Database, State: "active",
			ConnectTime: sc.Created, RequestTime: sc.Created, CloseNeeded: sc.Cred.Stale(), Link: sc.Client.Load(),
			RemotePID: sc.PID, TLS: yesNo(sc.CancelAddr.TLS != nil), ApplicationName: derefString(sc.AppName.Load()),
			DBUser: sc.Cred.Username, Lease: truncateLease(sc.Cred.LeaseID)}
		if st.Idle {
			row.State, row.ApplicationName = "idle", ""
		}
		row.Addr, row.Port = hostPort(sc.Conn.RemoteAddr())
		row.LocalAddr, row.LocalPort = hostPort(sc.Conn.LocalAddr())
		out = append(out, row)
	}
	return out
}

func derefString(s *string) string {
	if s == nil {
		return ""
	}
	return *s
}

// truncateLease shows a lease id's path and the start of its id: enough to
// find it in Vault's audit log, not to act on it by copy and paste.
func truncateLease(id string) string {
	i := strings.LastIndexByte(id, '/')
	if i < 0 || len(id)-i-1 <= 8 {
		return id
	}
	return id[:i+9] + "…"
}

func (a admin) Pools() []console.Pool {
	type key struct{ db, level string }
	clients := map[key]*console.Pool{}
	var order []key
	get := func(k key) *console.Pool {
		if p := clients[k]; p != nil {
			return p
		}
		p := &console.Pool{Database: k.db, User: k.level, PoolMode: a.s.modeOf(k.db, k.level)}
		clients[k] = p
		order = append(order, k)
		return p
	}
	now := time.Now()
	for _, c := range a.clients() {
		in := c.info.Load()
		if in.database == ConsoleDatabase {
			continue
		}
		p := get(key{in.database, in.level})
		if w := c.waitSince.Load(); w != 0 {
			p.ClWaiting++
			p.MaxWait = max(p.MaxWait, now.Sub(time.Unix(0, w)))
		} else {
			p.ClActive++
		}
	}
	for _, p := range a.s.pools.Stats() {
		row := get(key{p.Database, p.Level})
		row.SvIdle += p.Idle
		row.SvActive += p.Active
		if p.Idle > 0 {
			row.DBUser = p.IdleUser
		}
	}
	sort.Slice(order, func(i, j int) bool {
		if order[i].db != order[j].db {
			return order[i].db < order[j].db
		}
		return order[i].level < order[j].level
	})
	out := make([]console.Pool, 0, len(order))
	for _, k := range order {
		out = append(out, *clients[k])
	}
	return out
}

// modeOf is a level's pool mode.
func (s *Server) modeOf(database, level string) string {
	if m := s.routes()[database].Modes[level]; m != "" {
		return m
	}
	return PoolSession
}

func (a admin) Stats() []console.Stat {
	up := time.Since(a.s.started).Seconds()
	if up < 1 {
		up = 1
	}
	var out []console.Stat
	for _, db := range a.s.databases() {
		st := a.s.stats[db]
		x, q := st.xacts.Load(), st.queries.Load()
		row := console.Stat{Database: db, TotalXactCount: x, TotalQueryCount: q, TotalReceived: st.recv.Load(),
			TotalSent: st.sent.Load(), TotalXactTime: time.Duration(st.xactTime.Load()),
			TotalQueryTime: time.Duration(st.queryTime.Load()), TotalWaitTime: time.Duration(st.waitTime.Load()),
			AvgXactCount: int64(float64(x) / up), AvgQueryCount: int64(float64(q) / up),
			AvgRecv: int64(float64(st.recv.Load()) / up), AvgSent: int64(float64(st.sent.Load()) / up)}
		if x > 0 {
			row.AvgXactTime = row.TotalXactTime / time.Duration(x)
			row.AvgWaitTime = row.TotalWaitTime / time.Duration(x)
		}
		if q > 0 {
			row.AvgQueryTime = row.TotalQueryTime / time.Duration(q)
		}
		out = append(out, row)
	}
	return out
}

// databases are the configured database names, sorted.
func (s *Server) databases() []string {
	out := make([]string, 0, len(s.cfg.Routes))
	for db := range s.cfg.Routes {
		out = append(out, db)
	}
	sort.Strings(out)
	return out
}

func (a admin) Databases() []console.Database {
	ps := a.s.pools
	lim := ps.Limits()
	var out []console.Database
	for _, db := range a.s.databases() {
		r := a.s.routes()[db]
		row := console.Database{Name: db, PoolSize: lim.MaxPerPool, MaxConnections: lim.MaxTotal}
		if tmpl, err := pool.ParseUpstream(r.Upstream, r.Policy); err == nil {
			row.Host, row.Port, row.DBName = tmpl.Host, int(tmpl.Port), tmpl.Database
		}
		modes := map[string]bool{}
		for level := range r.VaultRoles {
			row.Levels = append(row.Levels, level)
			modes[a.s.modeOf(db, level)] = true
		}
		sort.Strings(row.Levels)
		row.PoolMode = "mixed"
		if len(modes) == 1 {
			for m := range modes {
				row.PoolMode = m
			}
		}
		for _, p := range ps.Stats() {
			if p.Database == db {
				row.CurrentConnections += p.Open
			}
		}
		row.Paused = ps.Paused(db)
		out = append(out, row)
	}
	return out
}

func (a admin) Config() []console.Setting {
	if f := a.s.cfg.Console.Settings; f != nil {
		return f()
	}
	return nil
}

// leaseLister is what a CredentialSource offers for SHOW LEASES.
type leaseLister interface{ Leases() []broker.LeaseInfo }

func (a admin) Leases() []console.Lease {
	ll, ok := a.s.cfg.Credentials.(leaseLister)
	if !ok {
		return nil
	}
	var out []console.Lease
	for _, l := range ll.Leases() {
		level := ""
		for lv, role := range a.s.routes()[l.Database].VaultRoles {
			if role == l.VaultRole {
				level = lv
			}
		}
		row := console.Lease{Database: l.Database, Level: level, DBUser: l.Username, LeaseID: truncateLease(l.LeaseID),
			Scope: l.Scope, State: l.State, Sessions: l.Holders, Subject: l.Subject}
		if !l.Static {
			row.Expires, row.RetireAt = l.ExpiresAt, l.RetireAt
		}
		out = append(out, row)
	}
	return out
}

func (a admin) Reload(ctx context.Context) error {
	if f := a.s.cfg.Console.Reload; f != nil {
		return f(ctx)
	}
	return pgerror.New(pgerror.FeatureNotSupported, "RELOAD is not available: pgwarden was started without a configuration to re-read")
}

func (a admin) Pause(ctx context.Context, database string) error {
	if err := a.knownDatabase(database); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, pauseWait)
	defer cancel()
	return a.s.pools.Pause(ctx, database)
}

func (a admin) Resume(database string) error {
	if err := a.knownDatabase(database); err != nil {
		return err
	}
	a.s.pools.Resume(database)
	return nil
}

func (a admin) knownDatabase(database string) error {
	if _, ok := a.s.cfg.Routes[database]; database != "" && !ok {
		return pgerror.Newf(pgerror.InvalidCatalogName, "no database %q", pgerror.Clip(database))
	}
	return nil
}

func (a admin) Kill(id uint64) (bool, error) {
	for _, c := range a.clients() {
		if c.cid == id {
			c.kill()
			return true, nil
		}
	}
	return false, nil
}

// KillSubject ends every session of subject, the console's included, and
// refuses the tokens those sessions used (any of that subject's tokens that
// expire no later) until they expire: the person's identity provider decides
// whether they get another.
func (a admin) KillSubject(subject string) (int, error) {
	n := 0
	var until time.Time
	for _, c := range a.clients() {
		if in := c.info.Load(); in.subject == subject {
			if exp := c.id.Expiry; exp.After(until) {
				until = exp
			}
			c.kill()
			n++
		}
	}
	if !until.IsZero() {
		a.s.mu.Lock()
		a.s.denied[subject] = until
		a.s.mu.Unlock()
	}
	return n, nil
}

// errKilled refuses the tokens of a subject whose sessions an operator
// ended.
var errKilled = pgerror.New(pgerror.InvalidAuthorization, "an operator ended this identity's sessions; the token you used then is no longer accepted").
	WithHint("Sign in again to your identity provider for a new token, if it still gives you one.")

// deniedToken reports whether id's token is one KILL SUBJECT refused.
func (s *Server) deniedToken(id *authn.Identity) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	until, ok := s.denied[id.Subject]
	if !ok {
		return false
	}
	if s.cfg.Now().After(until) {
		delete(s.denied, id.Subject)
		return false
	}
	return !id.Expiry.After(until)
}

// errNoConsole and errNotAdmin refuse the console.
var (
	errNoConsole = pgerror.New(pgerror.InsufficientPrivilege, "the pgwarden admin console is not enabled").
			WithHint("Its operator opens it to members of the groups in console.groups.")
	errNotAdmin = pgerror.New(pgerror.InsufficientPrivilege, "your token grants no access to the pgwarden admin console").
			WithHint("The console is open to members of the groups its operator configured (console.groups).")
)

// isAdmin reports whether id belongs to a console group.
func (s *Server) isAdmin(id *authn.Identity) bool {
	groups := *s.consoleGroups.Load()
	for _, g := range id.Groups {
		if slices.Contains(groups, g) {
			return true
		}
	}
	return false
}

// SetConsoleGroups replaces the groups that may open the console (RELOAD).
func (s *Server) SetConsoleGroups(groups []string) {
	g := slices.Clone(groups)
	s.consoleGroups.Store(&g)
}

// serveConsole runs an admin session: the token checked as for any
// database, then membership of a console group, then console.Serve.
func (c *clientConn) serveConsole(ctx context.Context, sm *pgproto3.StartupMessage) (string, error) {
	cfg := &c.srv.cfg
	c.database, c.level = ConsoleDatabase, "admin"
	if _, _, err := c.identify(ctx, sm); err != nil {
		return "", err
	}
	if len(*c.srv.consoleGroups.Load()) == 0 {
		return "", errNoConsole
	}
	if !c.srv.isAdmin(c.id) {
		return "", errNotAdmin
	}
	buf, _ := (&pgproto3.AuthenticationOk{}).Encode(nil)
	for _, kv := range [][2]string{{"server_version", "15.0 (pgwarden console)"}, {"server_encoding", "UTF8"},
		{"client_encoding", "UTF8"}, {"DateStyle", "ISO, MDY"}, {"integer_datetimes", "on"},
		{"standard_conforming_strings", "on"}, {"TimeZone", "UTC"}} {
		buf, _ = (&pgproto3.ParameterStatus{Name: kv[0], Value: kv[1]}).Encode(buf)
	}
	buf, _ = (&pgproto3.BackendKeyData{ProcessID: 0, SecretKey: make([]byte, 4)}).Encode(buf)
	buf, _ = (&pgproto3.ReadyForQuery{TxStatus: 'I'}).Encode(buf)
	if _, err := c.w.Write(buf); err != nil {
		return "", err
	}
	if err := c.w.Flush(); err != nil {
		return "", err
	}
	c.endHandshake()
	cfg.Observer.AuthResult(ConsoleDatabase, "admin", "ok")
	_ = c.raw.SetDeadline(time.Time{})
	c.info.Store(&clientInfo{subject: c.id.Subject, database: ConsoleDatabase, level: "admin", mode: PoolSession,
		appName: sm.Parameters["application_name"], tls: c.tls})
	if c.srv.deniedToken(c.id) {
		_ = sendFatal(c.w, errKilled) // KILL SUBJECT ran while this login was under way
		return "killed", nil
	}
	// The session ends when the admin's token does.
	ctx, cancel := context.WithCancel(context.Background())
	if !c.id.Expiry.IsZero() {
		ctx, cancel = context.WithDeadline(context.Background(), c.id.Expiry)
	}
	defer cancel()
	err := console.Serve(ctx, c.r, wire.NewDeadlineWriter(c.nc, cfg.WriteTimeout), admin{c.srv}, c.id.Subject, cfg.Logger)
	switch {
	case err == nil:
		return "client terminated", nil
	case errors.Is(err, net.ErrClosed):
		return "killed", nil
	case errors.Is(err, context.DeadlineExceeded):
		return "token expired", nil
	}
	return "client disconnected", nil
}
