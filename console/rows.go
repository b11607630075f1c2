package console

import (
	"strconv"
	"strings"
	"time"
)

// Pool is one row of SHOW POOLS: the server connections kept for one
// (database, access level, credential) and the clients using them.
type Pool struct {
	Database  string        // database name clients ask for
	User      string        // access level (reader, writer, admin, ...)
	ClActive  int           // clients holding a server, or idle
	ClWaiting int           // clients queued for a server
	SvActive  int           // servers lent to a client
	SvIdle    int           // servers ready to lend
	SvUsed    int           // servers being reset (DISCARD ALL) or checked
	SvLogin   int           // servers being opened
	MaxWait   time.Duration // how long the oldest waiting client has waited
	PoolMode  string        // session or transaction
	DBUser    string        // PostgreSQL role the servers log in as (Vault-issued)
}

// Client is one row of SHOW CLIENTS: a connection to pgwarden.
type Client struct {
	ID              uint64        // what KILL takes; unique for the process's life
	User            string        // access level
	Database        string        // database name asked for
	State           string        // active (holds a server), idle, or waiting
	Addr            string        // peer address; "unix" for a unix socket
	Port            int           // peer port
	LocalAddr       string        // pgwarden's address of the connection
	LocalPort       int           // pgwarden's port of the connection
	ConnectTime     time.Time     // when it connected
	RequestTime     time.Time     // its last request; zero: none yet
	Wait            time.Duration // how long it has waited for a server now
	Link            uint64        // Server.ID it holds; 0: none
	RemotePID       int           // peer's OS pid over a unix socket; 0: unknown
	TLS             string        // TLS version and cipher; empty: none
	ApplicationName string        // application_name the client set
	Subject         string        // the token's subject
	BackendPID      uint32        // PostgreSQL pid of the server it holds; 0: none
}

// Server is one row of SHOW SERVERS: a connection from pgwarden to
// PostgreSQL.
type Server struct {
	ID              uint64    // unique for the process's life
	User            string    // access level of its pool
	Database        string    // database name of its pool
	State           string    // active (lent), idle, used (being reset), new (logging in)
	Addr            string    // PostgreSQL's address
	Port            int       // PostgreSQL's port
	LocalAddr       string    // pgwarden's address of the connection
	LocalPort       int       // pgwarden's port of the connection
	ConnectTime     time.Time // when it connected
	RequestTime     time.Time // when it was last lent or used; zero: never
	CloseNeeded     bool      // it closes when released: its credential retires
	Link            uint64    // Client.ID it is lent to; 0: none
	RemotePID       uint32    // PostgreSQL backend pid
	TLS             string    // TLS version and cipher; empty: none
	ApplicationName string    // application_name of the client it is lent to
	DBUser          string    // PostgreSQL role it is logged in as
	Lease           string    // Vault lease id of its credential, truncated
}

// Stat is one row of SHOW STATS: traffic of one database since start
// (Total*) and over the provider's last stats period (Avg*).
type Stat struct {
	Database        string
	TotalXactCount  int64         // transactions relayed
	TotalQueryCount int64         // queries relayed
	TotalReceived   int64         // bytes received from clients
	TotalSent       int64         // bytes sent to clients
	TotalXactTime   time.Duration // time in transactions
	TotalQueryTime  time.Duration // time running queries
	TotalWaitTime   time.Duration // time clients waited for a server
	AvgXactCount    int64         // transactions per second
	AvgQueryCount   int64         // queries per second
	AvgRecv         int64         // bytes per second received from clients
	AvgSent         int64         // bytes per second sent to clients
	AvgXactTime     time.Duration // mean transaction duration
	AvgQueryTime    time.Duration // mean query duration
	AvgWaitTime     time.Duration // mean wait for a server
}

// Database is one row of SHOW DATABASES: a database clients may ask for.
type Database struct {
	Name               string   // name clients ask for
	Host               string   // upstream host
	Port               int      // upstream port
	DBName             string   // database name upstream
	PoolSize           int      // server connections per pool, at most
	PoolMode           string   // session or transaction
	MaxConnections     int      // server connections for the database, at most; 0: no limit
	CurrentConnections int      // server connections open now
	Paused             bool     // PAUSE holds new work
	Disabled           bool     // new clients are refused
	Levels             []string // access levels granted on it
}

// Setting is one row of SHOW CONFIG. The provider redacts secrets before
// they reach the console.
type Setting struct {
	Key        string
	Value      string
	Default    string
	Changeable bool // RELOAD applies a new value
}

// Lease is one row of SHOW LEASES: a Vault credential lease and the
// sessions using it.
type Lease struct {
	Database string    // database name
	Level    string    // access level
	DBUser   string    // PostgreSQL role Vault created
	LeaseID  string    // Vault lease id, truncated by the provider
	Scope    string    // identity (one per subject) or role (shared)
	State    string    // e.g. active, retiring, ended
	Expires  time.Time // end of the lease as Vault last said; zero: none (static role)
	RetireAt time.Time // when new sessions stop using it; zero: not scheduled
	Sessions int       // server connections using it
	Subject  string    // owner in identity scope; empty in role scope
}

// PostgreSQL type OIDs of the console's columns (pg_type.dat).
const (
	int8OID = 20
	textOID = 25
)

// cell is one column of one row. The column's name and type travel with the
// value so that each row type describes its columns in one place, and the
// header of an empty answer comes from the zero row.
type cell struct {
	name string
	oid  uint32
	val  []byte // nil is SQL NULL
}

func text(name, v string) cell { return cell{name, textOID, []byte(v)} }

// optText is text whose empty value shows as NULL.
func optText(name, v string) cell {
	if v == "" {
		return cell{name, textOID, nil}
	}
	return text(name, v)
}

func num(name string, v int64) cell {
	return cell{name, int8OID, strconv.AppendInt(nil, v, 10)}
}

// unum is num for ids and pids, which are unsigned.
func unum(name string, v uint64) cell {
	return cell{name, int8OID, strconv.AppendUint(nil, v, 10)}
}

// flag is PgBouncer's 0/1 integer for a boolean column.
func flag(name string, v bool) cell {
	if v {
		return num(name, 1)
	}
	return num(name, 0)
}

// yesNo is PgBouncer's yes/no text for SHOW CONFIG's changeable.
func yesNo(name string, v bool) cell {
	if v {
		return text(name, "yes")
	}
	return text(name, "no")
}

// stamp formats t as PgBouncer does ("2006-01-02 15:04:05 UTC"), in UTC;
// the zero time is NULL.
func stamp(name string, t time.Time) cell {
	if t.IsZero() {
		return cell{name, textOID, nil}
	}
	return text(name, t.UTC().Format("2006-01-02 15:04:05 MST"))
}

func micros(name string, d time.Duration) cell { return num(name, d.Microseconds()) }

// ref shows an id as PgBouncer's ptr and link columns do; 0 is NULL.
func ref(name string, id uint64) cell {
	if id == 0 {
		return cell{name, textOID, nil}
	}
	return text(name, strconv.FormatUint(id, 10))
}

// wait splits d into PgBouncer's whole seconds and microsecond part.
func wait(prefix string, d time.Duration) (cell, cell) {
	return num(prefix, int64(d/time.Second)), num(prefix+"_us", int64(d%time.Second/time.Microsecond))
}

func (p Pool) cells() []cell {
	mw, mwUS := wait("maxwait", p.MaxWait)
	return []cell{
		text("database", p.Database), text("user", p.User),
		num("cl_active", int64(p.ClActive)), num("cl_waiting", int64(p.ClWaiting)),
		num("sv_active", int64(p.SvActive)), num("sv_idle", int64(p.SvIdle)),
		num("sv_used", int64(p.SvUsed)), num("sv_login", int64(p.SvLogin)),
		mw, mwUS, text("pool_mode", p.PoolMode),
		optText("db_user", p.DBUser),
	}
}

func (c Client) cells() []cell {
	w, wUS := wait("wait", c.Wait)
	return []cell{
		text("type", "C"), text("user", c.User), text("database", c.Database),
		text("state", c.State), text("addr", c.Addr), num("port", int64(c.Port)),
		text("local_addr", c.LocalAddr), num("local_port", int64(c.LocalPort)),
		stamp("connect_time", c.ConnectTime), stamp("request_time", c.RequestTime),
		w, wUS, num("close_needed", 0),
		ref("ptr", c.ID), ref("link", c.Link), num("remote_pid", int64(c.RemotePID)),
		text("tls", c.TLS), text("application_name", c.ApplicationName),
		unum("id", c.ID), text("subject", c.Subject),
		unum("backend_pid", uint64(c.BackendPID)),
	}
}

func (s Server) cells() []cell {
	return []cell{
		text("type", "S"), text("user", s.User), text("database", s.Database),
		text("state", s.State), text("addr", s.Addr), num("port", int64(s.Port)),
		text("local_addr", s.LocalAddr), num("local_port", int64(s.LocalPort)),
		stamp("connect_time", s.ConnectTime), stamp("request_time", s.RequestTime),
		num("wait", 0), num("wait_us", 0), flag("close_needed", s.CloseNeeded),
		ref("ptr", s.ID), ref("link", s.Link), unum("remote_pid", uint64(s.RemotePID)),
		text("tls", s.TLS), text("application_name", s.ApplicationName),
		unum("id", s.ID), optText("db_user", s.DBUser), optText("lease", s.Lease),
	}
}

func (s Stat) cells() []cell {
	return []cell{
		text("database", s.Database),
		num("total_xact_count", s.TotalXactCount), num("total_query_count", s.TotalQueryCount),
		num("total_received", s.TotalReceived), num("total_sent", s.TotalSent),
		micros("total_xact_time", s.TotalXactTime), micros("total_query_time", s.TotalQueryTime),
		micros("total_wait_time", s.TotalWaitTime),
		num("avg_xact_count", s.AvgXactCount), num("avg_query_count", s.AvgQueryCount),
		num("avg_recv", s.AvgRecv), num("avg_sent", s.AvgSent),
		micros("avg_xact_time", s.AvgXactTime), micros("avg_query_time", s.AvgQueryTime),
		micros("avg_wait_time", s.AvgWaitTime),
	}
}

func (d Database) cells() []cell {
	return []cell{
		text("name", d.Name), text("host", d.Host), num("port", int64(d.Port)),
		text("database", d.DBName), num("pool_size", int64(d.PoolSize)),
		text("pool_mode", d.PoolMode), num("max_connections", int64(d.MaxConnections)),
		num("current_connections", int64(d.CurrentConnections)),
		flag("paused", d.Paused), flag("disabled", d.Disabled),
		text("levels", strings.Join(d.Levels, ",")),
	}
}

func (s Setting) cells() []cell {
	return []cell{
		text("key", s.Key), text("value", s.Value), text("default", s.Default),
		yesNo("changeable", s.Changeable),
	}
}

func (l Lease) cells() []cell {
	return []cell{
		text("database", l.Database), text("level", l.Level), text("db_user", l.DBUser),
		text("lease_id", l.LeaseID), text("scope", l.Scope), text("state", l.State),
		stamp("expires", l.Expires), stamp("retire_at", l.RetireAt),
		num("sessions", int64(l.Sessions)), optText("subject", l.Subject),
	}
}
