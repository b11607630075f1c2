package testenv

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"
)

// PgBouncerOptions configures StartPgBouncer.
type PgBouncerOptions struct {
	// PG is the server to pool.
	PG *Postgres
	// Database is the one database served, under the same name. Default "app".
	Database string
	// Users maps each user clients (and PgBouncer, upstream) log in as to its
	// password, written in plain text to PgBouncer's auth_file so it can do
	// SCRAM on both sides.
	Users map[string]string
	// AuthType is PgBouncer's auth_type for clients: "scram-sha-256" (the
	// default) or "trust" (no client authentication at all).
	AuthType string
	// PoolMode is pool_mode: "session" (the default: a client holds a server
	// from login to disconnect) or "transaction" (a server only for each
	// transaction). PgBouncer before 1.21 has no prepared statements in
	// transaction mode.
	PoolMode string
	// PoolSize is default_pool_size (and max_db_connections). Default 20.
	PoolSize int
	// MaxClientConn is max_client_conn. Default 1000.
	MaxClientConn int
	// CertFile and KeyFile, when set, offer clients TLS (client_tls_sslmode=allow).
	CertFile, KeyFile string
}

// PgBouncer is Debian's pgbouncer in session (or transaction) mode on 127.0.0.1, for
// benchmarks. Like PostgreSQL it refuses to run as root, so as root it runs as
// the postgres OS user. Close stops it and removes its directory.
type PgBouncer struct {
	Addr    string // host:port
	Port    int
	Version string

	cmd  *exec.Cmd
	done chan struct{}
	dir  string
	log  LockedBuffer
}

// PgBouncerBinary finds pgbouncer: on PATH, then Debian's /usr/sbin/pgbouncer.
func PgBouncerBinary() (string, error) {
	if p, err := exec.LookPath("pgbouncer"); err == nil {
		return p, nil
	}
	if _, err := os.Stat("/usr/sbin/pgbouncer"); err == nil {
		return "/usr/sbin/pgbouncer", nil
	}
	return "", fmt.Errorf("%w: pgbouncer not found; install Debian's 'pgbouncer' package (make deps does this when run as root)", ErrMissing)
}

// StartPgBouncer writes a configuration and starts pgbouncer.
func StartPgBouncer(ctx context.Context, opts PgBouncerOptions) (*PgBouncer, error) {
	bin, err := PgBouncerBinary()
	if err != nil {
		return nil, err
	}
	if opts.Database == "" {
		opts.Database = "app"
	}
	if opts.AuthType == "" {
		opts.AuthType = "scram-sha-256"
	}
	switch opts.PoolMode {
	case "":
		opts.PoolMode = "session"
	case "session", "transaction":
	default:
		return nil, fmt.Errorf("pgbouncer: pool mode %q is not session or transaction", opts.PoolMode)
	}
	if opts.PoolSize == 0 {
		opts.PoolSize = 20
	}
	if opts.MaxClientConn == 0 {
		opts.MaxClientConn = 1000
	}
	ra, err := serverUser()
	if err != nil {
		return nil, err
	}
	dir, err := ra.mkdirOwned("pgwarden-pgbouncer-")
	if err != nil {
		return nil, err
	}
	b := &PgBouncer{dir: dir, done: make(chan struct{})}
	ok := false
	defer func() {
		if !ok {
			b.Close()
		}
	}()
	if b.Port, err = freePort(); err != nil {
		return nil, err
	}
	b.Addr = fmt.Sprintf("127.0.0.1:%d", b.Port)
	users := make([]string, 0, len(opts.Users))
	for u := range opts.Users {
		users = append(users, u)
	}
	sort.Strings(users)
	var auth strings.Builder
	quote := func(s string) string { return `"` + strings.ReplaceAll(s, `"`, `""`) + `"` } // auth_file's quoting
	for _, u := range users {
		fmt.Fprintf(&auth, "%s %s\n", quote(u), quote(opts.Users[u]))
	}
	tls := ""
	if opts.CertFile != "" {
		// PgBouncer runs as another user: give it copies it can read.
		for _, f := range []struct{ from, to string }{{opts.CertFile, "server.crt"}, {opts.KeyFile, "server.key"}} {
			data, err := os.ReadFile(f.from)
			if err != nil {
				return nil, err
			}
			if err := writeOwned(ra, filepath.Join(dir, f.to), string(data)); err != nil {
				return nil, err
			}
		}
		tls = fmt.Sprintf("client_tls_sslmode = allow\nclient_tls_cert_file = %s\nclient_tls_key_file = %s\n",
			filepath.Join(dir, "server.crt"), filepath.Join(dir, "server.key"))
	}
	ini := fmt.Sprintf(`[databases]
%s = host=%s port=%d dbname=%s

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = %d
unix_socket_dir =
auth_type = %s
auth_file = %s
pool_mode = %s
default_pool_size = %d
max_db_connections = %d
max_client_conn = %d
ignore_startup_parameters = extra_float_digits
logfile =
pidfile =
log_connections = 0
log_disconnections = 0
%s`, opts.Database, opts.PG.Host, opts.PG.Port, opts.Database, b.Port, opts.AuthType, filepath.Join(dir, "userlist.txt"),
		opts.PoolMode, opts.PoolSize, opts.PoolSize, opts.MaxClientConn, tls)
	if err := writeOwned(ra, filepath.Join(dir, "userlist.txt"), auth.String()); err != nil {
		return nil, err
	}
	iniPath := filepath.Join(dir, "pgbouncer.ini")
	if err := writeOwned(ra, iniPath, ini); err != nil {
		return nil, err
	}
	if out, err := exec.Command(bin, "--version").Output(); err == nil {
		b.Version = strings.TrimPrefix(strings.SplitN(strings.TrimSpace(string(out)), "\n", 2)[0], "PgBouncer ")
	}
	b.cmd = ra.command(context.Background(), bin, iniPath)
	b.cmd.Stdout, b.cmd.Stderr = &b.log, &b.log
	if err := b.cmd.Start(); err != nil {
		return nil, err
	}
	go func() { _ = b.cmd.Wait(); close(b.done) }()
	wctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	if err := waitTCP(wctx, b.Addr, b.done); err != nil {
		return nil, fmt.Errorf("pgbouncer did not start: %w\n%s", err, b.log.String())
	}
	ok = true
	return b, nil
}

// writeOwned writes a file readable only by ra.
func writeOwned(ra runAs, path, content string) error {
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		return err
	}
	return os.Chown(path, ra.uid, ra.gid)
}

// Pid is pgbouncer's process id, for CPU and memory readings.
func (b *PgBouncer) Pid() int { return b.cmd.Process.Pid }

// Log is what pgbouncer printed.
func (b *PgBouncer) Log() string { return b.log.String() }

// Close stops pgbouncer and removes its directory.
func (b *PgBouncer) Close() {
	if b.cmd != nil && b.cmd.Process != nil {
		stopProcess(b.cmd, b.done, syscall.SIGTERM, 5*time.Second)
	}
	if b.dir != "" {
		os.RemoveAll(b.dir)
	}
}
