package testenv

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
)

// Postgres is a throwaway PostgreSQL cluster on 127.0.0.1 with scram-sha-256
// for every connection. Close stops it and removes its directory.
type Postgres struct {
	Host     string
	Port     int
	Dir      string // holds a unix socket; so does Dir/data, bound by a relative path
	Super    string // superuser name
	Password string // superuser password
	Version  string

	cmd  *exec.Cmd
	done chan struct{}
	log  LockedBuffer
}

// PostgresBinDir finds the PostgreSQL server binaries: pg_config --bindir,
// then the newest /usr/lib/postgresql/*/bin, then initdb on PATH.
func PostgresBinDir() (string, error) {
	if out, err := exec.Command("pg_config", "--bindir").Output(); err == nil {
		dir := strings.TrimSpace(string(out))
		if _, err := os.Stat(filepath.Join(dir, "initdb")); err == nil {
			return dir, nil
		}
	}
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	sort.Slice(dirs, func(i, j int) bool { return versionOf(dirs[i]) > versionOf(dirs[j]) })
	for _, d := range dirs {
		if _, err := os.Stat(filepath.Join(d, "initdb")); err == nil {
			return d, nil
		}
	}
	if p, err := exec.LookPath("initdb"); err == nil {
		if r, err := filepath.EvalSymlinks(p); err == nil {
			return filepath.Dir(r), nil
		}
	}
	return "", fmt.Errorf("%w: PostgreSQL server binaries (initdb, postgres) not found; install Debian's 'postgresql' package (make deps does this when run as root)", ErrMissing)
}

func versionOf(binDir string) int {
	v, _ := strconv.Atoi(filepath.Base(filepath.Dir(binDir)))
	return v
}

// StartPostgres initialises and starts a cluster.
func StartPostgres(ctx context.Context) (*Postgres, error) {
	bin, err := PostgresBinDir()
	if err != nil {
		return nil, err
	}
	ra, err := serverUser()
	if err != nil {
		return nil, err
	}
	dir, err := ra.mkdirOwned("pgwarden-pg-")
	if err != nil {
		return nil, err
	}
	p := &Postgres{Host: "127.0.0.1", Dir: dir, Super: "postgres", Password: randomHex(16), done: make(chan struct{})}
	ok := false
	defer func() {
		if !ok {
			p.Close()
		}
	}()
	pwfile := filepath.Join(dir, "pwfile")
	if err := os.WriteFile(pwfile, []byte(p.Password+"\n"), 0o600); err != nil {
		return nil, err
	}
	if err := os.Chown(pwfile, ra.uid, ra.gid); err != nil {
		return nil, err
	}
	data := filepath.Join(dir, "data")
	if err := ra.run(ctx, filepath.Join(bin, "initdb"), "-D", data, "-U", p.Super, "--pwfile", pwfile,
		"--auth-local=scram-sha-256", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync"); err != nil {
		return nil, err
	}
	os.Remove(pwfile)
	if p.Port, err = freePort(); err != nil {
		return nil, err
	}
	conf := fmt.Sprintf(`
listen_addresses = '127.0.0.1'
port = %d
unix_socket_directories = '%s, .'
max_connections = 300
fsync = off
synchronous_commit = off
full_page_writes = off
shared_buffers = 64MB
log_min_messages = warning
`, p.Port, dir)
	f, err := os.OpenFile(filepath.Join(data, "postgresql.conf"), os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		return nil, err
	}
	_, err = f.WriteString(conf)
	f.Close()
	if err != nil {
		return nil, err
	}
	if out, err := exec.Command(filepath.Join(bin, "postgres"), "--version").Output(); err == nil {
		p.Version = strings.TrimPrefix(strings.TrimSpace(string(out)), "postgres (PostgreSQL) ")
	}
	p.cmd = ra.command(context.Background(), filepath.Join(bin, "postgres"), "-D", data)
	p.cmd.Stdout, p.cmd.Stderr = &p.log, &p.log
	if err := p.cmd.Start(); err != nil {
		return nil, err
	}
	go func() { _ = p.cmd.Wait(); close(p.done) }()
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := waitTCP(wctx, p.Addr(), p.done); err != nil {
		return nil, fmt.Errorf("postgres did not start: %w\n%s", err, p.log.String())
	}
	// The port accepts before the cluster accepts logins; wait for that too.
	for {
		err := p.Exec(wctx, "postgres", "select 1")
		if err == nil {
			break
		}
		if wctx.Err() != nil {
			return nil, fmt.Errorf("postgres not ready: %w", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	ok = true
	return p, nil
}

// Addr is host:port.
func (p *Postgres) Addr() string { return fmt.Sprintf("%s:%d", p.Host, p.Port) }

// DSN returns a superuser connection string for database.
func (p *Postgres) DSN(database string) string {
	return fmt.Sprintf("postgres://%s:%s@%s/%s?sslmode=disable", p.Super, p.Password, p.Addr(), database)
}

// Close stops the server (fast shutdown) and removes its directory.
func (p *Postgres) Close() {
	if p.cmd != nil && p.cmd.Process != nil {
		stopProcess(p.cmd, p.done, syscall.SIGINT, 10*time.Second)
	}
	if p.Dir != "" {
		os.RemoveAll(p.Dir)
	}
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// Exec runs sql (one or more statements, simple protocol) as the superuser in database.
func (p *Postgres) Exec(ctx context.Context, database, sql string) error {
	conn, err := pgconn.Connect(ctx, p.DSN(database))
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	_, err = conn.Exec(ctx, sql).ReadAll()
	return err
}
