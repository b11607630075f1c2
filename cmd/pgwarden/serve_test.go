package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgwarden/pgwarden/internal/config"
	"github.com/pgwarden/pgwarden/metrics"
	"github.com/pgwarden/pgwarden/testenv"
	"github.com/pgwarden/pgwarden/testenv/pki"
)

// runMainEnv makes the test binary run pgwarden's main instead of the
// tests, so a test can start `pgwarden serve` as its own process and send it
// signals, as an operator (or Kubernetes) does.
const runMainEnv = "PGWARDEN_TEST_RUN_MAIN"

func TestMain(m *testing.M) {
	if os.Getenv(runMainEnv) == "1" {
		os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
	}
	os.Exit(m.Run())
}

// serveProc is `pgwarden serve` running as a child process.
type serveProc struct {
	cmd     *exec.Cmd
	out     *testenv.LockedBuffer // its stdout and stderr: the JSON log
	exited  chan struct{}         // closed when it has exited; then waitErr is set
	waitErr error
	addr    string // client address
	metrics string // metrics address
}

// startServe starts `pgwarden serve -config path args...` and waits until it
// listens. The child gets no VAULT_TOKEN and no PGWARDEN_* variable from the
// test's environment: only the file configures it. It is killed when the
// test ends if it is still running.
func startServe(t *testing.T, path string, args ...string) *serveProc {
	t.Helper()
	p := &serveProc{out: &testenv.LockedBuffer{}, exited: make(chan struct{})}
	p.cmd = exec.Command(os.Args[0], append([]string{"serve", "-config", path}, args...)...)
	p.cmd.Env = []string{runMainEnv + "=1"}
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "VAULT_") && !strings.HasPrefix(kv, config.EnvPrefix) {
			p.cmd.Env = append(p.cmd.Env, kv)
		}
	}
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.waitErr = p.cmd.Wait(); close(p.exited) }()
	t.Cleanup(func() {
		select {
		case <-p.exited:
		default:
			_ = p.cmd.Process.Kill()
			<-p.exited
		}
		if strings.Contains(p.out.String(), "DATA RACE") {
			t.Errorf("pgwarden serve reported a data race:\n%s", p.out.String())
		}
	})
	l := p.waitLog(t, "pgwarden listening", nil)
	p.addr, _ = l["addr"].(string)
	p.metrics, _ = l["metrics"].(string)
	if p.addr == "" || p.metrics == "" {
		t.Fatalf("listening line without addresses: %v", l)
	}
	return p
}

// logs returns the records logged so far with msg.
func (p *serveProc) logs(msg string) []map[string]any {
	var out []map[string]any
	sc := bufio.NewScanner(strings.NewReader(p.out.String()))
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		var rec map[string]any
		if json.Unmarshal(sc.Bytes(), &rec) == nil && rec["msg"] == msg {
			out = append(out, rec)
		}
	}
	return out
}

// waitLog waits for a record with msg beyond the first len(seen) ones (the
// records with msg already read) and returns it. It fails the test if the
// process exits first, or after a minute.
func (p *serveProc) waitLog(t *testing.T, msg string, seen []map[string]any) map[string]any {
	t.Helper()
	deadline := time.After(time.Minute)
	for {
		if recs := p.logs(msg); len(recs) > len(seen) {
			return recs[len(seen)]
		}
		select {
		case <-p.exited:
			t.Fatalf("pgwarden exited (%v) before logging %q:\n%s", p.waitErr, msg, p.out.String())
		case <-deadline:
			t.Fatalf("pgwarden did not log %q within a minute:\n%s", msg, p.out.String())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// waitFor waits for a record with msg that match accepts, as waitLog does.
func (p *serveProc) waitFor(t *testing.T, msg string, match func(map[string]any) bool) map[string]any {
	t.Helper()
	deadline := time.After(time.Minute)
	for {
		for _, rec := range p.logs(msg) {
			if match(rec) {
				return rec
			}
		}
		select {
		case <-p.exited:
			t.Fatalf("pgwarden exited (%v) before logging the %q wanted:\n%s", p.waitErr, msg, p.out.String())
		case <-deadline:
			t.Fatalf("pgwarden did not log the %q wanted within a minute:\n%s", msg, p.out.String())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func (p *serveProc) signal(t *testing.T, sig syscall.Signal) {
	t.Helper()
	if err := p.cmd.Process.Signal(sig); err != nil {
		t.Fatal(err)
	}
}

// reload sends SIGHUP and waits for the outcome's log record: msg is
// "configuration reloaded" or the rejection's.
func (p *serveProc) reload(t *testing.T, msg string) map[string]any {
	t.Helper()
	seen := p.logs(msg)
	p.signal(t, syscall.SIGHUP)
	return p.waitLog(t, msg, seen)
}

const reloadRejected = "configuration reload rejected; the running configuration is unchanged"

// connString is a libpq connection string to pgwarden at addr for level
// with token, over TLS verified against caFile.
func connString(addr, level, token, caFile string) string {
	host, port, _ := net.SplitHostPort(addr)
	return fmt.Sprintf("host=%s port=%s dbname=app user=%s password=%s sslmode=verify-full sslrootcert=%s connect_timeout=30",
		host, port, level, token, caFile)
}

func connect(ctx context.Context, conn string) (*pgconn.PgConn, error) {
	return pgconn.Connect(ctx, conn)
}

// query1 returns the first column of the first row sql returns.
func query1(ctx context.Context, c *pgconn.PgConn, sql string) (string, error) {
	res, err := c.Exec(ctx, sql).ReadAll()
	if err != nil {
		return "", err
	}
	for _, r := range res {
		if len(r.Rows) > 0 {
			return string(r.Rows[0][0]), nil
		}
	}
	return "", errors.New("no row")
}

// sqlstate is err's SQLSTATE, or "" when it carries none.
func sqlstate(err error) string {
	var pe *pgconn.PgError
	if errors.As(err, &pe) {
		return pe.Code
	}
	return ""
}

// metricLine returns the line of pgwarden's /metrics that starts with
// series, or "".
func metricLine(t *testing.T, addr, series string) string {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, series+" ") {
			return l
		}
	}
	return ""
}

// writeJSON writes cfg as pgwarden's config file at path.
func writeJSON(t *testing.T, path string, cfg *config.Config) {
	t.Helper()
	b, err := json.MarshalIndent(cfg, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// withGroups returns a copy of cfg whose app levels have the groups given
// (level name → groups); other levels keep theirs.
func withGroups(cfg *config.Config, groups map[string][]string) *config.Config {
	c := *cfg
	c.Databases = slices.Clone(cfg.Databases)
	c.Databases[0].Levels = slices.Clone(cfg.Databases[0].Levels)
	for i, l := range c.Databases[0].Levels {
		if g, ok := groups[l.Name]; ok {
			c.Databases[0].Levels[i].Groups = g
		}
	}
	return &c
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// The acceptance test of reloading: `pgwarden serve` as a process, the real
// stack behind it, the operator's sequence (edit the file, vault-init, then
// SIGHUP). A session open across every reload keeps answering under the
// level it logged in with; new connections get the new grants (a group
// newly granted a level connects, one whose grant was removed is refused
// with 42501); an invalid file and an unreadable key are rejected, logged
// with the reason and counted, and the configuration in force stays; the
// console's RELOAD takes the same path; a new TLS pair is served to new
// handshakes; a new log_level applies.
func TestSIGHUPReloadsGrantsTLSAndLogLevelWhileSessionsRun(t *testing.T) {
	st := testenv.NewStack(t, testenv.StackOptions{NoProxy: true})
	dir := t.TempDir()
	path := filepath.Join(dir, "pgwarden.json")
	// pgwarden's own copy of the TLS pair, replaced in place below as a
	// certificate renewal does.
	certFile, keyFile := filepath.Join(dir, "server.crt"), filepath.Join(dir, "server.key")
	copyFile(t, st.Certs.CertFile, certFile)
	copyFile(t, st.Certs.KeyFile, keyFile)
	base := *st.Config
	base.TLSCert, base.TLSKey = certFile, keyFile
	writeJSON(t, path, &base)
	p := startServe(t, path)

	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	alice, err := st.Token("alice", "analyst")
	if err != nil {
		t.Fatal(err)
	}
	as := func(level, caFile string) (*pgconn.PgConn, error) {
		return connect(ctx, connString(p.addr, level, alice, caFile))
	}
	ca1 := st.Certs.CAFile

	// Before: analyst reads, and may not write.
	session, err := as("reader", ca1)
	if err != nil {
		t.Fatalf("alice as reader before any reload: %v", err)
	}
	defer session.Close(context.Background())
	if n, err := query1(ctx, session, "SELECT count(*) FROM items"); err != nil || n != "2" {
		t.Fatalf("the session's first query: %q %v", n, err)
	}
	if _, err := as("writer", ca1); sqlstate(err) != "42501" {
		t.Fatalf("alice as writer before the reload: %v, want 42501", err)
	}
	if strings.Contains(p.out.String(), `"level":"DEBUG"`) {
		t.Fatal("debug records at log_level info")
	}

	// The new file: analysts move from reader to writer, and the log level
	// goes to debug. Vault's JWT roles follow it (vault-init), as the
	// operator runs it; pgwarden still grants by the file it read until it
	// reloads.
	// Also: the reader level asks for transaction pooling (an existing
	// level keeps its mode until a restart), a new level in transaction
	// mode, and a new auth_timeout (a restart's).
	next := withGroups(&base, map[string][]string{"reader": {"engineer"}, "writer": {"engineer", "analyst"}})
	next.LogLevel = "debug"
	next.Databases[0].Levels[0].PoolMode = config.PoolTransaction
	auditor := testenv.ReadLevel("auditor", time.Hour, "analyst")
	auditor.PoolMode = config.PoolTransaction
	next.Databases[0].Levels = append(next.Databases[0].Levels, auditor)
	next.AuthTimeout = config.Duration(20 * time.Second)
	writeJSON(t, path, next)
	t.Setenv("VAULT_TOKEN", st.Vault.RootToken)
	t.Setenv("PGWARDEN_DB_ADMIN_PASSWORD", st.AdminPassword)
	var out, errb bytes.Buffer
	if code := run([]string{"vault-init", "-config", path}, &out, &errb); code != 0 {
		t.Fatalf("vault-init: exit %d\n%s%s", code, out.String(), errb.String())
	}
	if _, err := as("writer", ca1); sqlstate(err) != "42501" {
		t.Fatalf("alice as writer before SIGHUP: %v, want 42501 (the old grants)", err)
	}

	rec := p.reload(t, "configuration reloaded")
	if rec["source"] != "SIGHUP" || !slices.Contains(anyStrings(rec["applied"]), "databases") || !slices.Contains(anyStrings(rec["applied"]), "log_level") {
		t.Errorf("reload record: %v", rec)
	}
	if r := anyStrings(rec["restart_needed_for"]); !slices.Equal(r, []string{"databases[0].levels[0].pool_mode", "timeouts and limits"}) {
		t.Errorf("restart_needed_for %q", r)
	}
	if n, err := query1(ctx, session, "SELECT count(*) FROM items"); err != nil || n != "2" {
		t.Fatalf("the session after the reload: %q %v", n, err)
	}
	writer, err := as("writer", ca1)
	if err != nil {
		t.Fatalf("alice as writer after the reload: %v", err)
	}
	if _, err := query1(ctx, writer, "INSERT INTO items (name) VALUES ('plum') RETURNING id"); err != nil {
		t.Fatalf("a writer's insert: %v", err)
	}
	writer.Close(ctx)
	// The new level, in the mode the file gives it.
	if c, err := as("auditor", ca1); err != nil {
		t.Fatalf("alice as the new level: %v", err)
	} else {
		if _, err := query1(ctx, c, "SELECT count(*) FROM items"); err != nil {
			t.Fatal(err)
		}
		c.Close(ctx)
	}
	if rec := p.waitFor(t, "session", func(r map[string]any) bool { return r["level"] == "auditor" }); rec["pool_mode"] != config.PoolTransaction {
		t.Errorf("the new level's session: %v", rec)
	}
	_, err = as("reader", ca1)
	var pe *pgconn.PgError
	if !errors.As(err, &pe) || pe.Code != "42501" || !strings.Contains(pe.Detail, "writer") {
		t.Fatalf("alice as reader after the reload: %v, want 42501 naming what she has", err)
	}
	// log_level debug now: reading the writer's credential was logged at debug.
	if len(p.logs("vault issued credentials")) == 0 {
		t.Error("no debug record after log_level became debug")
	}
	if l := metricLine(t, p.metrics, `pgwarden_config_reloads_total{result="ok"}`); !strings.HasSuffix(l, " 1") {
		t.Errorf("ok reloads: %q", l)
	}

	// An invalid file: rejected, the reason logged, nothing changes.
	bad := withGroups(next, map[string][]string{"reader": {"analyst"}})
	bad.Databases[0].Levels[0].PoolMode = "sometimes"
	writeJSON(t, path, bad)
	rec = p.reload(t, reloadRejected)
	if e, _ := rec["error"].(string); !strings.Contains(e, "databases[0].levels[0].pool_mode") {
		t.Errorf("the rejection does not name the field: %v", rec)
	}
	if l := metricLine(t, p.metrics, `pgwarden_config_reloads_total{result="rejected"}`); !strings.HasSuffix(l, " 1") {
		t.Errorf("rejected reloads: %q", l)
	}
	if _, err := as("reader", ca1); sqlstate(err) != "42501" {
		t.Fatalf("alice as reader after a rejected reload: %v, want 42501 still", err)
	}
	if c, err := as("writer", ca1); err != nil {
		t.Fatalf("alice as writer after a rejected reload: %v", err)
	} else {
		c.Close(ctx)
	}
	// The console's RELOAD takes the same path: the same refusal, to the
	// console as F0000.
	carol, err := st.Token("carol", "dba")
	if err != nil {
		t.Fatal(err)
	}
	admin, err := connect(ctx, strings.Replace(connString(p.addr, "admin", carol, ca1), "dbname=app", "dbname=pgwarden", 1))
	if err != nil {
		t.Fatalf("the admin console: %v", err)
	}
	defer admin.Close(context.Background())
	// The configuration in force: the reader level kept its mode.
	cfgRows, err := admin.Exec(ctx, "SHOW CONFIG").ReadAll()
	if err != nil {
		t.Fatal(err)
	}
	var levels string
	for _, row := range cfgRows[0].Rows {
		if string(row[0]) == "databases.app.levels" {
			levels = string(row[1])
		}
	}
	if !strings.Contains(levels, "reader=session/") || !strings.Contains(levels, "auditor=transaction/") {
		t.Errorf("SHOW CONFIG's levels in force: %q", levels)
	}
	seen := p.logs(reloadRejected)
	if _, err := admin.Exec(ctx, "RELOAD").ReadAll(); sqlstate(err) != "F0000" {
		t.Fatalf("RELOAD of an invalid file: %v, want F0000", err)
	}
	if rec := p.waitLog(t, reloadRejected, seen); rec["source"] != "RELOAD" {
		t.Errorf("RELOAD's rejection: %v", rec)
	}

	// A renewed certificate that cannot be read (the key half-written):
	// rejected, the old pair still served.
	certs2, err := pki.New(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	writeJSON(t, path, next)
	if err := os.WriteFile(keyFile, []byte("-----BEGIN EC PRIVATE KEY-----\ntruncated"), 0o600); err != nil {
		t.Fatal(err)
	}
	rec = p.reload(t, reloadRejected)
	if e, _ := rec["error"].(string); !strings.Contains(e, "tls") {
		t.Errorf("the rejection does not say TLS: %v", rec)
	}
	if c, err := as("writer", ca1); err != nil {
		t.Fatalf("the old pair after a rejected reload: %v", err)
	} else {
		c.Close(ctx)
	}

	// The renewed pair in place: new handshakes get it.
	copyFile(t, certs2.CertFile, certFile)
	copyFile(t, certs2.KeyFile, keyFile)
	p.reload(t, "configuration reloaded")
	if _, err := as("writer", ca1); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("a client trusting only the old CA after the new pair: %v, want a certificate error", err)
	}
	if c, err := as("writer", certs2.CAFile); err != nil {
		t.Fatalf("a client trusting the new CA: %v", err)
	} else {
		c.Close(ctx)
	}
	if n, err := query1(ctx, session, "SELECT count(*) FROM items"); err != nil || n != "3" {
		t.Fatalf("the session that began before every reload, at the end: %q %v", n, err)
	}
	if l := metricLine(t, p.metrics, `pgwarden_config_reloads_total{result="rejected"}`); !strings.HasSuffix(l, " 3") {
		t.Errorf("rejected reloads at the end: %q", l)
	}
	for _, secret := range []string{alice, carol, st.Vault.RootToken, st.AdminPassword} {
		if strings.Contains(p.out.String(), secret) {
			t.Fatal("pgwarden's log holds a token or password")
		}
	}
}

func anyStrings(v any) []string {
	var out []string
	if xs, ok := v.([]any); ok {
		for _, x := range xs {
			if s, ok := x.(string); ok {
				out = append(out, s)
			}
		}
	}
	return out
}

// readyz returns /readyz's status code and body.
func readyz(t *testing.T, addr string) (int, metrics.Readiness) {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/readyz")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var body metrics.Readiness
	if err := json.NewDecoder(resp.Body).Decode(&body); err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, body
}

// readyzUntil asks /readyz until done accepts its answer, for at most a
// minute, and returns that answer.
func readyzUntil(t *testing.T, addr, what string, done func(int, metrics.Readiness) bool) (int, metrics.Readiness) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		code, body := readyz(t, addr)
		if done(code, body) {
			return code, body
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: %d %+v", what, code, body)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// checkError is the reason /readyz gave for the check named name.
func checkError(body metrics.Readiness, name string) string {
	for _, c := range body.Checks {
		if c.Name == name {
			return c.Error
		}
	}
	return ""
}

// statusOf is the status /readyz gave the check named name.
func statusOf(body metrics.Readiness, name string) string {
	for _, c := range body.Checks {
		if c.Name == name {
			return c.Status
		}
	}
	return "missing"
}

// /readyz names each dependency and says which is degraded; SIGTERM drains:
// no new connections, open sessions carry on, /readyz says so, and the
// process exits 0 once the last session ends.
func TestReadyzNamesDegradedVaultAndSIGTERMDrains(t *testing.T) {
	st := testenv.NewStack(t, testenv.StackOptions{NoProxy: true})
	path := filepath.Join(t.TempDir(), "pgwarden.json")
	if err := st.WriteConfig(path); err != nil {
		t.Fatal(err)
	}
	p := startServe(t, path, "-shutdown-grace", "5m")
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	all := []string{"issuer", "vault", "upstream app", "proxy"}

	code, body := readyz(t, p.metrics)
	if code != 200 || body.Status != "ready" || len(body.Degraded) != 0 {
		t.Fatalf("/readyz with everything up: %d %+v", code, body)
	}
	var names []string
	for _, c := range body.Checks {
		names = append(names, c.Name)
	}
	if !slices.Equal(names, all) {
		t.Fatalf("/readyz checks %v, want %v", names, all)
	}

	tok, err := st.Token("bob", "engineer")
	if err != nil {
		t.Fatal(err)
	}
	session, err := connect(ctx, connString(p.addr, "reader", tok, st.Certs.CAFile))
	if err != nil {
		t.Fatal(err)
	}
	defer session.Close(context.Background())

	// Vault frozen (SIGSTOP: it accepts connections and never answers): the
	// answer still comes, naming vault alone.
	if err := st.Vault.Pause(); err != nil {
		t.Fatal(err)
	}
	code, body = readyzUntil(t, p.metrics, "/readyz with Vault frozen", func(code int, _ metrics.Readiness) bool { return code != 200 })
	if err := st.Vault.Resume(); err != nil {
		t.Fatal(err)
	}
	if code != 503 || !slices.Equal(body.Degraded, []string{"vault"}) || statusOf(body, "upstream app") != "ok" || statusOf(body, "issuer") != "ok" {
		t.Fatalf("/readyz with Vault frozen: %d %+v", code, body)
	}
	// A result answers for metrics.ReadyCacheFor: Vault's return shows
	// after that.
	readyzUntil(t, p.metrics, "/readyz with Vault back", func(code int, _ metrics.Readiness) bool { return code == 200 })

	// Vault stopped: degraded, and only Vault, with a reason and no address
	// in the answer; the log has the details, once.
	seenFailed := p.logs("readiness check failed; /readyz answers 503")
	st.Vault.Close()
	code, body = readyzUntil(t, p.metrics, "/readyz with Vault stopped", func(code int, body metrics.Readiness) bool {
		return code == 503 && statusOf(body, "vault") == "degraded" && !strings.HasPrefix(checkError(body, "vault"), "no answer")
	})
	if body.Status != "degraded" || !slices.Equal(body.Degraded, []string{"vault"}) {
		t.Fatalf("/readyz with Vault stopped: %d %+v", code, body)
	}
	for _, c := range body.Checks {
		want := "ok"
		if c.Name == "vault" {
			want = "degraded"
			if c.Error != "unreachable" {
				t.Errorf("vault's check says %q, want unreachable", c.Error)
			}
		}
		if c.Status != want {
			t.Errorf("check %s: %s, want %s (%+v)", c.Name, c.Status, want, body)
		}
	}
	vaultHostPort := strings.TrimPrefix(st.Vault.Addr, "http://")
	if raw := fmt.Sprintf("%+v", body); strings.Contains(raw, vaultHostPort) {
		t.Errorf("/readyz shows Vault's address: %s", raw)
	}
	if rec := p.waitLog(t, "readiness check failed; /readyz answers 503", seenFailed); rec["check"] != "vault" || rec["reason"] != "unreachable" ||
		!strings.Contains(fmt.Sprint(rec["error"]), vaultHostPort) || !strings.Contains(fmt.Sprint(rec["error"]), "refused") {
		t.Errorf("the log of Vault's failure, with its address and cause: %v", rec)
	}

	// SIGTERM: the drain begins; the session carries on.
	seen := p.logs("shutting down")
	p.signal(t, syscall.SIGTERM)
	p.waitLog(t, "shutting down", seen)
	if n, err := query1(ctx, session, "SELECT count(*) FROM items"); err != nil || n != "2" {
		t.Fatalf("the session during the drain: %q %v", n, err)
	}
	readyzUntil(t, p.metrics, "/readyz during the drain", func(code int, body metrics.Readiness) bool {
		return code == 503 && statusOf(body, "proxy") == "degraded" && checkError(body, "proxy") == "shutting down"
	})
	if c, err := net.DialTimeout("tcp", p.addr, 5*time.Second); err == nil {
		c.Close()
		t.Fatal("pgwarden accepts connections during the drain")
	}
	select {
	case <-p.exited:
		t.Fatalf("pgwarden exited with a session still open: %v", p.waitErr)
	default:
	}
	session.Close(ctx)
	select {
	case <-p.exited:
	case <-time.After(2 * time.Minute):
		t.Fatalf("pgwarden still running two minutes after its last session ended:\n%s", p.out.String())
	}
	if p.waitErr != nil {
		t.Fatalf("pgwarden exited with %v after draining:\n%s", p.waitErr, p.out.String())
	}
	if len(p.logs("pgwarden failed")) > 0 {
		t.Fatalf("the drain was reported as a failure:\n%s", p.out.String())
	}
	// However often /readyz was asked, Vault's failure was logged once.
	n := 0
	for _, rec := range p.logs("readiness check failed; /readyz answers 503") {
		if rec["check"] == "vault" && rec["reason"] == "unreachable" {
			n++
		}
	}
	if n != 1 {
		t.Errorf("Vault's failure logged %d times, want once", n)
	}
}
