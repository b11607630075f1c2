package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"github.com/pgwarden/pgwarden/internal/config"
	"github.com/pgwarden/pgwarden/testenv"
)

// poolSize is the server pool of pgwarden and of PgBouncer: more than the
// most clients a run uses, so neither ever makes a client wait.
const poolSize = 80

// benchUser is the static role direct PostgreSQL and PgBouncer clients log in
// as; it has the privileges of pgwarden's writer level.
const (
	benchUser     = "bench"
	benchPassword = "bench-password-not-a-secret"
)

// target is one thing pgbench can point at.
type target struct {
	name       string
	host, port string
	user, pass string
	sslmode    string
	pid        func() int // the proxy process, for CPU and memory; nil for PostgreSQL itself
}

// env is everything a run uses.
type env struct {
	root  string // the repository
	stack *testenv.Stack
	token string // a writer token for subject "bench"

	pgw         *pgwardenProc
	bouncer     *testenv.PgBouncer // SCRAM
	bouncerTrst *testenv.PgBouncer // auth_type=trust
	work        string             // temp dir: pgbench logs, profiles

	// Transaction pooling: a second pgwarden, its database "app" (and every
	// level) in pool_mode transaction with pool.max_per_pool p.txnPool, and
	// PgBouncer (SCRAM) in pool_mode transaction with default_pool_size
	// p.txnPool. pool.max_per_pool is global, so the session-mode figures
	// keep their own process and pool.
	pgwTxn     *pgwardenProc
	bouncerTxn *testenv.PgBouncer
}

func (e *env) direct() target {
	return target{name: "direct", host: "127.0.0.1", port: strconv.Itoa(e.stack.PG.Port), user: benchUser, pass: benchPassword, sslmode: "disable"}
}

func (e *env) pgbouncer() target {
	return target{name: "pgbouncer", host: "127.0.0.1", port: strconv.Itoa(e.bouncer.Port), user: benchUser, pass: benchPassword,
		sslmode: "disable", pid: e.bouncer.Pid}
}

func (e *env) pgbouncerTrust() target {
	return target{name: "pgbouncer-trust", host: "127.0.0.1", port: strconv.Itoa(e.bouncerTrst.Port), user: benchUser, pass: "",
		sslmode: "disable", pid: e.bouncerTrst.Pid}
}

// pgwarden is reached from loopback (trusted: no TLS needed) or over TLS.
func (e *env) pgwarden(tls bool) target {
	t := target{name: "pgwarden", host: "127.0.0.1", port: e.pgw.port, user: "writer", pass: e.token, sslmode: "disable", pid: e.pgw.pid}
	if tls {
		t.name, t.sslmode = "pgwarden-tls", "require"
	}
	return t
}

func (e *env) pgbouncerTxn() target {
	return target{name: "pgbouncer-txn", host: "127.0.0.1", port: strconv.Itoa(e.bouncerTxn.Port), user: benchUser, pass: benchPassword,
		sslmode: "disable", pid: e.bouncerTxn.Pid}
}

// pgwardenTxn is the pgwarden whose database is in pool_mode transaction.
func (e *env) pgwardenTxn(tls bool) target {
	t := target{name: "pgwarden-txn", host: "127.0.0.1", port: e.pgwTxn.port, user: "writer", pass: e.token, sslmode: "disable", pid: e.pgwTxn.pid}
	if tls {
		t.name, t.sslmode = "pgwarden-txn-tls", "require"
	}
	return t
}

func startEnv(ctx context.Context, p profile, bin string) (e *env, err error) {
	e = &env{}
	defer func() {
		if err != nil {
			e.close()
		}
	}()
	if e.root, err = testenv.RepoRoot(); err != nil {
		return e, err
	}
	if _, err := exec.LookPath("pgbench"); err != nil {
		return e, errors.New("pgbench not found: install Debian's postgresql-client (make deps)")
	}
	if e.work, err = os.MkdirTemp("", "pgwarden-bench-"); err != nil {
		return e, err
	}
	sctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	if e.stack, err = testenv.StartStack(sctx, testenv.StackOptions{Dir: e.work, NoProxy: true}); err != nil {
		return e, err
	}
	pg := e.stack.PG
	logf("PostgreSQL %s; pgbench -i -s %d…", pg.Version, p.scale)
	init := exec.CommandContext(ctx, "pgbench", "-i", "-q", "-s", strconv.Itoa(p.scale), "-d", pg.DSN("app"))
	if out, err := init.CombinedOutput(); err != nil {
		return e, fmt.Errorf("pgbench -i: %w\n%s", err, out)
	}
	for _, q := range []string{
		"GRANT SELECT ON ALL TABLES IN SCHEMA public TO app_read",
		"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO app_write",
		fmt.Sprintf("CREATE ROLE %s LOGIN PASSWORD '%s' IN ROLE app_read, app_write", benchUser, benchPassword),
		"VACUUM ANALYZE",
	} {
		if err := pg.Exec(ctx, "app", q); err != nil {
			return e, fmt.Errorf("%s: %w", q, err)
		}
	}
	if e.token, err = e.stack.Issuer.Mint(testenv.Claims{Subject: "bench", Groups: []string{"engineer"}, TTL: 6 * time.Hour}); err != nil {
		return e, err
	}

	cfg := e.stack.Config
	cfg.Pool.MaxPerPool, cfg.Pool.MaxTotal = poolSize, poolSize
	cfg.Pool.AcquireTimeout = config.Duration(2 * time.Second)
	cfg.Pprof = true
	txnCfg, err := transactionMode(cfg, p.txnPool)
	if err != nil {
		return e, err
	}
	e.pgw = &pgwardenProc{name: "pgwarden", bin: bin, dir: e.work, vaultAddr: e.stack.Vault.Addr, cfg: cfg}
	if err := e.pgw.start(ctx); err != nil {
		return e, err
	}
	// The same Vault roles (the stack configured them): the second process
	// logs in to Vault on its own and gets credentials of its own.
	e.pgwTxn = &pgwardenProc{name: "pgwarden-txn", bin: bin, dir: e.work, vaultAddr: e.stack.Vault.Addr, cfg: txnCfg}
	if err := e.pgwTxn.start(ctx); err != nil {
		return e, err
	}

	users := map[string]string{benchUser: benchPassword}
	bopts := testenv.PgBouncerOptions{PG: pg, Users: users, PoolSize: poolSize, MaxClientConn: maxIdle(p) + 100,
		CertFile: e.stack.Certs.CertFile, KeyFile: e.stack.Certs.KeyFile}
	if e.bouncer, err = testenv.StartPgBouncer(ctx, bopts); err != nil {
		return e, err
	}
	topts := bopts
	topts.PoolMode, topts.PoolSize, topts.MaxClientConn = "transaction", p.txnPool, maxClients(p)+100
	if e.bouncerTxn, err = testenv.StartPgBouncer(ctx, topts); err != nil {
		return e, err
	}
	bopts.AuthType, bopts.CertFile, bopts.KeyFile = "trust", "", ""
	if e.bouncerTrst, err = testenv.StartPgBouncer(ctx, bopts); err != nil {
		return e, err
	}
	return e, nil
}

// transactionMode copies cfg with every database and level in pool_mode
// transaction and pool.max_per_pool pool. Levels carry the database's mode
// once the configuration is loaded, so each is set too.
func transactionMode(cfg *config.Config, pool int) (*config.Config, error) {
	b, err := json.Marshal(cfg)
	if err != nil {
		return nil, err
	}
	out := &config.Config{}
	if err := json.Unmarshal(b, out); err != nil {
		return nil, err
	}
	out.Listen, out.MetricsListen = "", ""
	for i := range out.Databases {
		d := &out.Databases[i]
		d.PoolMode = config.PoolTransaction
		for j := range d.Levels {
			d.Levels[j].PoolMode = config.PoolTransaction
		}
	}
	out.Pool.MaxPerPool = pool
	out.Pool.MaxTotal = max(out.Pool.MaxTotal, pool)
	return out, nil
}

func maxIdle(p profile) int {
	m := 0
	for _, n := range p.idle {
		m = max(m, n)
	}
	return m
}

// maxClients is the most clients a proxy must hold at once: idle ones, or
// the many clients of transaction mode.
func maxClients(p profile) int { return max(maxIdle(p), p.many) }

func (e *env) close() {
	for _, w := range []*pgwardenProc{e.pgw, e.pgwTxn} {
		if w != nil {
			w.stop()
		}
	}
	for _, b := range []*testenv.PgBouncer{e.bouncer, e.bouncerTrst, e.bouncerTxn} {
		if b != nil {
			b.Close()
		}
	}
	if e.stack != nil {
		e.stack.Close()
	}
	if e.work != "" {
		os.RemoveAll(e.work)
	}
}

// pgwardenProc is bin/pgwarden running as a process of its own (so its CPU
// and memory can be read from /proc), restartable for cold starts.
type pgwardenProc struct {
	name                string // of its files in dir: <name>.json, <name>.log
	bin, dir, vaultAddr string
	cfg                 *config.Config // written at every start: a change takes effect on restart
	port, metrics       string
	extraEnv            []string // for experiments: GOMAXPROCS=…, GODEBUG=…

	cmd    *exec.Cmd
	exited chan error
}

func (w *pgwardenProc) pid() int { return w.cmd.Process.Pid }

// start writes its config with fixed ports (kept across restarts) and
// starts pgwarden.
func (w *pgwardenProc) start(ctx context.Context) error {
	if w.port == "" {
		addr, err := freeAddr()
		if err != nil {
			return err
		}
		_, w.port, _ = net.SplitHostPort(addr)
		if w.metrics, err = freeAddr(); err != nil {
			return err
		}
	}
	w.cfg.Listen, w.cfg.MetricsListen, w.cfg.LogFormat = "127.0.0.1:"+w.port, w.metrics, "json"
	b, err := json.MarshalIndent(w.cfg, "", "  ")
	if err != nil {
		return err
	}
	cfgPath, logPath := filepath.Join(w.dir, w.name+".json"), filepath.Join(w.dir, w.name+".log")
	if err := os.WriteFile(cfgPath, append(b, '\n'), 0o600); err != nil {
		return err
	}
	logFile, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	defer logFile.Close()
	w.cmd = exec.Command(w.bin, "serve", "-config", cfgPath, "-shutdown-grace", "2s")
	w.cmd.Env = append(append(os.Environ(), "VAULT_ADDR="+w.vaultAddr), w.extraEnv...)
	w.cmd.Stdout, w.cmd.Stderr = logFile, logFile
	w.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGTERM}
	if err := w.cmd.Start(); err != nil {
		return fmt.Errorf("start %s: %w (run `make build` first)", w.bin, err)
	}
	w.exited = make(chan error, 1)
	go func() { w.exited <- w.cmd.Wait() }()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if c, err := net.DialTimeout("tcp", "127.0.0.1:"+w.port, 200*time.Millisecond); err == nil {
			c.Close()
			return nil
		}
		select {
		case err := <-w.exited:
			w.exited <- err
			b, _ := os.ReadFile(logPath)
			return fmt.Errorf("%s exited: %v\n%s", w.name, err, b)
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
	return fmt.Errorf("%s did not start listening within 30s", w.name)
}

// stop ends pgwarden (SIGTERM, then SIGKILL).
func (w *pgwardenProc) stop() {
	if w.cmd == nil || w.cmd.Process == nil {
		return
	}
	_ = w.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-w.exited:
	case <-time.After(5 * time.Second):
		_ = syscall.Kill(-w.cmd.Process.Pid, syscall.SIGKILL)
		<-w.exited
	}
	w.cmd = nil
}

// restart gives a pgwarden with empty caches and pools (and w.cfg as it is
// now).
func (w *pgwardenProc) restart(ctx context.Context) error {
	w.stop()
	return w.start(ctx)
}

func freeAddr() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}
