package deploy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgwarden/pgwarden/broker/vaultinit"
	"github.com/pgwarden/pgwarden/internal/app"
	"github.com/pgwarden/pgwarden/testenv"
)

func freeAddr(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// proc is a process a test started, stopped with SIGTERM when the test ends.
type proc struct {
	cmd  *exec.Cmd
	out  testenv.LockedBuffer
	done chan error
}

func start(t *testing.T, env []string, name string, args ...string) *proc {
	t.Helper()
	p := &proc{cmd: exec.Command(name, args...), done: make(chan error, 1)}
	p.cmd.Env = env
	p.cmd.Stdout, p.cmd.Stderr = &p.out, &p.out
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.done <- p.cmd.Wait() }()
	t.Cleanup(func() {
		_ = p.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.done:
		case <-time.After(15 * time.Second):
			_ = p.cmd.Process.Kill()
			<-p.done
			t.Errorf("%s did not stop on SIGTERM", filepath.Base(name))
		}
	})
	return p
}

// run runs a command to its end (at most a minute) and returns its stdout
// and stderr.
func run(t *testing.T, env []string, name string, args ...string) (stdout, stderr string, err error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = env
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err = cmd.Run()
	return o.String(), e.String(), err
}

// until runs check until it succeeds, for at most d.
func until(t *testing.T, d time.Duration, what string, check func() error) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		err := check()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: %v", what, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// baseEnv is what every process here gets besides its own variables: no
// PGWARDEN_*, VAULT_* or PG* from the test's environment.
func baseEnv(extra map[string]string) []string {
	env := []string{"PATH=" + os.Getenv("PATH"), "HOME=" + os.Getenv("HOME")}
	for k, v := range extra {
		env = append(env, k+"="+v)
	}
	return env
}

// The compose stack, service by service, without Docker: the Makefile's
// pgwarden build (its version stamp included), the issuer as compose runs
// it, PostgreSQL seeded by the compose init.sql, Vault trusting the issuer's
// CA through SSL_CERT_FILE, the compose pgwarden.json (only its hosts and
// ports changed to this machine's) through `pgwarden vault-init` twice and
// `pgwarden serve`, the healthchecks, a token from `devissuer mint`, and psql
// as the README runs it.
func TestComposeStackWithoutDocker(t *testing.T) {
	testenv.Integration(t)
	if _, err := exec.LookPath("psql"); err != nil {
		t.Fatal("psql not found: install Debian's postgresql-client (make deps)")
	}
	root := repoRoot(t)
	c := readCompose(t)
	bin, version := makeBuild(t)
	if out, _, err := run(t, baseEnv(nil), bin+"/pgwarden", "version"); err != nil || out != "pgwarden "+version+"\n" {
		t.Fatalf("pgwarden version, as make build stamps it (%s): %q %v", version, out, err)
	}

	// The issuer, as compose runs it, on this machine's loopback.
	certs := t.TempDir()
	issuerAddr := freeAddr(t)
	issuerURL := "https://localhost:" + strings.Split(issuerAddr, ":")[1]
	is := c.Services["issuer"]
	composeCerts := flagValue(is.Command, "-certs")
	args := append([]string(nil), is.Command...)
	for flag, v := range map[string]string{"-listen": issuerAddr, "-url": issuerURL, "-certs": certs, "-hosts": "localhost,127.0.0.1"} {
		i := indexOf(args, flag)
		if i < 0 {
			t.Fatalf("the issuer's command has no %s", flag)
		}
		args[i+1] = v
	}
	issuer := start(t, baseEnv(nil), bin+"/devissuer", args...)
	// Its healthcheck, as compose runs it, with this machine's port and certificates.
	probe := rewriteArgs(is.Healthcheck.Test[1:], map[string]string{"https://localhost:8443": issuerURL, composeCerts: certs, "/usr/local/bin": bin})
	until(t, 30*time.Second, "the issuer's healthcheck", func() error {
		if _, e, err := run(t, baseEnv(nil), probe[0], probe[1:]...); err != nil {
			return fmt.Errorf("%v: %s%s", err, e, issuer.out.String())
		}
		return nil
	})

	// PostgreSQL, seeded by init.sql as the postgres image runs it.
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	pg, err := testenv.StartPostgres(ctx)
	testenv.Check(t, err)
	t.Cleanup(pg.Close)
	pgEnv := map[string]string{"PGHOST": pg.Host, "PGPORT": fmt.Sprint(pg.Port), "PGUSER": pg.Super, "PGPASSWORD": pg.Password,
		"VAULT_ADMIN_PASSWORD": c.Services["postgres"].Environment["VAULT_ADMIN_PASSWORD"]}
	if _, e, err := run(t, baseEnv(pgEnv), "psql", "-X", "-v", "ON_ERROR_STOP=1", "--no-password", "--dbname", "postgres",
		"-f", filepath.Join(root, "deploy/compose/postgres/init.sql")); err != nil {
		t.Fatalf("init.sql: %v\n%s", err, e)
	}

	// Vault, trusting the issuer's CA as the compose file makes it.
	t.Setenv("SSL_CERT_FILE", strings.Replace(c.Services["vault"].Environment["SSL_CERT_FILE"], composeCerts, certs, 1))
	v, err := testenv.StartVault(ctx)
	testenv.Check(t, err)
	t.Cleanup(v.Close)

	// The compose config, on this machine.
	listen, metrics := freeAddr(t), freeAddr(t)
	pgPort := fmt.Sprint(pg.Port)
	text := readFile(t, filepath.Join(root, "deploy/compose/pgwarden.json"))
	for from, to := range map[string]string{
		`"https://issuer:8443"`:   `"` + issuerURL + `"`,
		`"http://vault:8200"`:     `"` + v.Addr + `"`,
		"host=postgres port=5432": "host=127.0.0.1 port=" + pgPort,
		"@postgres:5432/":         "@127.0.0.1:" + pgPort + "/",
		`"0.0.0.0:6432"`:          `"` + listen + `"`,
		`"0.0.0.0:9632"`:          `"` + metrics + `"`,
		`"` + composeCerts + `/`:  `"` + certs + `/`,
	} {
		if !strings.Contains(text, from) {
			t.Fatalf("deploy/compose/pgwarden.json has no %s any more: update this test with the compose file", from)
		}
		text = strings.ReplaceAll(text, from, to)
	}
	cfgPath := filepath.Join(t.TempDir(), "pgwarden.json")
	if err := os.WriteFile(cfgPath, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}

	// vault-init, with the compose service's environment.
	viEnv := map[string]string{}
	for k, val := range c.Services["vault-init"].Environment {
		viEnv[k] = val
	}
	viEnv["VAULT_TOKEN"] = v.RootToken
	secrets := []string{v.RootToken, viEnv["PGWARDEN_DB_ADMIN_PASSWORD"]}
	viArgs := rewriteArgs(c.Services["vault-init"].Command, map[string]string{flagValue(c.Services["vault-init"].Command, "-config"): cfgPath})
	out, e, err := run(t, baseEnv(viEnv), bin+"/pgwarden", viArgs...)
	if err != nil {
		t.Fatalf("vault-init: %v\n%s%s", err, out, e)
	}
	t.Logf("vault-init's first run:\n%s", out)
	lines := strings.Split(strings.TrimSpace(out), "\n")
	for _, l := range lines {
		if !strings.HasPrefix(l, "created ") && !strings.HasPrefix(l, "updated ") {
			t.Errorf("vault-init printed %q: want one line per object created or updated", l)
		}
	}
	for _, want := range []string{"created secrets engine sys/mounts/database", "created auth method sys/auth/jwt",
		"created database connection database/config/app", "created database role database/roles/app-reader",
		"created policy sys/policies/acl/pgwarden-app-writer", "created JWT auth role auth/jwt/role/app-admin"} {
		if !strings.Contains(out, want) {
			t.Errorf("vault-init did not say %q", want)
		}
	}
	for _, s := range secrets {
		if strings.Contains(out+e, s) {
			t.Error("vault-init printed a secret")
		}
	}
	if out, e, err := run(t, baseEnv(viEnv), bin+"/pgwarden", viArgs...); err != nil || out != "no changes\n" {
		t.Fatalf("vault-init again: %q %v %s", out, err, e)
	}

	// pgwarden serve, with the compose service's environment.
	srvEnv := map[string]string{}
	for k, val := range c.Services["pgwarden"].Environment {
		srvEnv[k] = strings.Replace(val, composeCerts+"/", certs+"/", 1)
	}
	pgw := c.Services["pgwarden"]
	serve := start(t, baseEnv(srvEnv), bin+"/pgwarden", rewriteArgs(pgw.Command, map[string]string{flagValue(pgw.Command, "-config"): cfgPath})...)
	hc := rewriteArgs(pgw.Healthcheck.Test[1:], map[string]string{"http://127.0.0.1:9632": "http://" + metrics, "/usr/local/bin": bin})
	until(t, time.Minute, "pgwarden's healthcheck", func() error {
		if _, e, err := run(t, baseEnv(nil), hc[0], hc[1:]...); err != nil {
			return fmt.Errorf("%v: %s\n%s", err, e, serve.out.String())
		}
		return nil
	})
	until(t, time.Minute, "pgwarden's /readyz", func() error {
		_, e, err := run(t, baseEnv(nil), bin+"/healthprobe", "http://"+metrics+"/readyz")
		if err != nil {
			return fmt.Errorf("%v: %s", err, e)
		}
		return nil
	})

	// The README's commands: a token from the issuer, then psql.
	mint := append([]string{}, "mint", "--sub", "alice", "--groups", "analyst", "-url", issuerURL, "-cacert", certs+"/ca.crt")
	tok, e, err := run(t, baseEnv(nil), bin+"/devissuer", mint...)
	if err != nil {
		t.Fatalf("devissuer mint: %v %s", err, e)
	}
	psqlEnv := map[string]string{"PGPASSWORD": strings.TrimSpace(tok)}
	lport := strings.Split(listen, ":")[1]
	conn := "host=localhost port=" + lport + " dbname=app user=reader sslmode=require"
	got, e, err := run(t, baseEnv(psqlEnv), "psql", conn, "-XAt", "-c", "select current_user", "-c", "select count(*) from items")
	if err != nil {
		t.Fatalf("psql %q: %v\n%s\n%s", conn, err, e, serve.out.String())
	}
	if !regexp.MustCompile(`^v-jwt-alice-app-reader-\S+\n2\n$`).MatchString(got) {
		t.Fatalf("psql as reader: %q", got)
	}
	verified := "host=localhost port=" + lport + " dbname=app user=reader sslmode=verify-full sslrootcert=" + certs + "/ca.crt"
	if _, e, err := run(t, baseEnv(psqlEnv), "psql", verified, "-XAt", "-c", "select 1"); err != nil {
		t.Fatalf("psql verifying pgwarden's certificate against the issuer's CA: %v %s", err, e)
	}
	if _, e, err := run(t, baseEnv(psqlEnv), "psql", strings.Replace(conn, "user=reader", "user=writer", 1), "-XAt", "-c", "select 1"); err == nil ||
		!strings.Contains(e, `does not grant access level "writer"`) {
		t.Fatalf("alice as writer: %v %s", err, e)
	}
	if strings.Contains(serve.out.String(), psqlEnv["PGPASSWORD"]) {
		t.Error("pgwarden logged the token")
	}
	// What Prometheus scrapes.
	resp, err := http.Get("http://" + metrics + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if !bytes.Contains(body, []byte(`pgwarden_auth_total{database="app",level="reader",result="ok"} 2`)) {
		t.Errorf("metrics do not count the two logins:\n%s", grepLines(body, "pgwarden_auth_total"))
	}
}

// The binaries the stack runs are the Makefile's: `make test` builds them
// (its build target) before it runs the tests, and this reuses them rather
// than compiling them again.
var (
	buildOnce    sync.Once
	buildBin     string // the repository's bin/
	buildVersion string // what make build stamps into bin/pgwarden
	buildErr     error
)

// makeBuild returns the directory of the Makefile's pgwarden, devissuer
// and healthprobe, and the version make build stamps into pgwarden. The
// first call runs make build's own commands for those three (make -n
// prints them): go build leaves a binary alone when it is up to date, as
// after `make test`'s build, and builds it when it is missing or stale, as
// when this package's tests run on their own.
func makeBuild(t *testing.T) (bin, version string) {
	t.Helper()
	buildOnce.Do(func() {
		root, err := testenv.RepoRoot()
		if err != nil {
			buildErr = err
			return
		}
		buildBin = filepath.Join(root, "bin")
		cmd := exec.Command("make", "-s", "-n", "build")
		cmd.Dir = root
		out, err := cmd.Output()
		if err != nil {
			buildErr = fmt.Errorf("make -n build: %w", err)
			return
		}
		for _, name := range []string{"pgwarden", "devissuer", "healthprobe"} {
			line := regexp.MustCompile(`(?m)^go build .*-o bin/` + name + ` \./\S+$`).FindString(string(out))
			if line == "" {
				buildErr = fmt.Errorf("make build builds no bin/%s:\n%s", name, out)
				return
			}
			if name == "pgwarden" {
				m := regexp.MustCompile(`-X main\.buildVersion=([^' ]+)`).FindStringSubmatch(line)
				if m == nil {
					buildErr = fmt.Errorf("make build does not stamp pgwarden's version: %s", line)
					return
				}
				buildVersion = m[1]
			}
			b := exec.Command("sh", "-c", line)
			b.Dir = root
			if out, err := b.CombinedOutput(); err != nil {
				buildErr = fmt.Errorf("%s: %w\n%s", line, err, out)
				return
			}
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return buildBin, buildVersion
}

func indexOf(args []string, s string) int {
	for i, a := range args {
		if a == s {
			return i
		}
	}
	return -1
}

// rewriteArgs replaces, in a copy of args, each occurrence of a key of m
// within an argument by its value.
func rewriteArgs(args []string, m map[string]string) []string {
	out := make([]string, len(args))
	for i, a := range args {
		for from, to := range m {
			a = strings.ReplaceAll(a, from, to)
		}
		out[i] = a
	}
	return out
}

func grepLines(b []byte, prefix string) string {
	var out []string
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, prefix) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// The sidecar example's configuration against Vault: a token shaped as the
// kubelet projects it (the service account as subject, no groups claim, the
// projected audience) logs in to the level its subject is granted, through
// pgwarden and Vault's JWT auth method (groups_claim "sub" on both), and
// another service account's token does not.
func TestKubernetesSidecarWithVault(t *testing.T) {
	testenv.Integration(t)
	m := parseManifests(t, filepath.Join(repoRoot(t), "deploy/kubernetes/sidecar.yaml"))
	d := m.deployments[0]
	cm := m.configMap(d.Metadata.Namespace, "orders-pgwarden")
	if cm == nil {
		t.Fatal("sidecar.yaml has no ConfigMap orders-pgwarden")
	}
	var audience string
	for _, v := range d.Spec.Template.Spec.Volumes {
		if v.Projected != nil {
			for _, s := range v.Projected.Sources {
				if s.ServiceAccountToken != nil {
					audience = s.ServiceAccountToken.Audience
				}
			}
		}
	}
	var level, database string
	for _, c := range d.Spec.Template.Spec.Containers {
		for _, e := range c.Env {
			switch e.Name {
			case "PGUSER":
				level = e.Value
			case "PGDATABASE":
				database = e.Value
			}
		}
	}
	cfg := loadConfig(t, "sidecar.yaml", cm.Data["pgwarden.json"], nil)

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	pg, err := testenv.StartPostgres(ctx)
	testenv.Check(t, err)
	t.Cleanup(pg.Close)
	_, vc := testenv.NewVault(t)
	is, err := testenv.StartIssuer(audience)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { is.Close() })

	// The cluster's pieces, on this machine: the database and the roles the
	// level's creation statements join, an admin for Vault.
	adminPassword := fmt.Sprintf("adm-%d", time.Now().UnixNano())
	if len(cfg.Databases) != 1 {
		t.Fatalf("%d databases", len(cfg.Databases))
	}
	db := &cfg.Databases[0]
	stmts := []string{"CREATE DATABASE " + db.Name, "CREATE ROLE vault_admin WITH LOGIN SUPERUSER PASSWORD '" + adminPassword + "'"}
	for _, l := range db.Levels {
		for _, s := range l.CreationStatements {
			if m := regexp.MustCompile(`IN ROLE ([a-z_, ]+);`).FindStringSubmatch(s); m != nil {
				for _, r := range strings.Split(m[1], ",") {
					stmts = append(stmts, "CREATE ROLE "+strings.TrimSpace(r)+" NOLOGIN")
				}
			}
		}
	}
	for _, s := range stmts {
		if err := pg.Exec(ctx, "postgres", s); err != nil {
			t.Fatalf("%s: %v", s, err)
		}
	}
	cfg.OIDC.IssuerURL, cfg.Vault.Address = is.URL, vc.Address()
	cfg.Listen, cfg.MetricsListen = "127.0.0.1:0", "127.0.0.1:0"
	db.Upstream = fmt.Sprintf("host=127.0.0.1 port=%d dbname=%s sslmode=disable", pg.Port, db.Name)
	db.Admin.ConnectionURL = fmt.Sprintf("postgresql://{{username}}:{{password}}@127.0.0.1:%d/%s?sslmode=disable", pg.Port, db.Name)
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	if err := vaultinit.Apply(ctx, vc, app.VaultSpec(cfg, func(string) string { return adminPassword }), quiet); err != nil {
		t.Fatalf("vault-init of the sidecar's config: %v", err)
	}
	a, err := app.New(ctx, cfg, quiet)
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = a.Shutdown(sctx)
	})

	connect := func(sub, aud string) (string, error) {
		tok, err := is.Mint(testenv.Claims{Subject: sub, Audience: aud, TTL: 10 * time.Minute})
		if err != nil {
			t.Fatal(err)
		}
		host, p, _ := net.SplitHostPort(a.Addr())
		conn, err := pgx.Connect(ctx, fmt.Sprintf("host=%s port=%s dbname=%s user=%s password=%s sslmode=disable", host, p, database, level, tok))
		if err != nil {
			return "", err
		}
		defer conn.Close(context.Background())
		var user string
		err = conn.QueryRow(ctx, "select current_user").Scan(&user)
		return user, err
	}
	sa := "system:serviceaccount:" + d.Metadata.Namespace + ":" + d.Spec.Template.Spec.ServiceAccountName
	user, err := connect(sa, audience)
	if err != nil {
		t.Fatalf("the application's token: %v", err)
	}
	if !strings.HasPrefix(user, "v-jwt-system:serviceaccount:"+d.Metadata.Namespace+":") {
		t.Errorf("current_user %q is not the service account's own Vault user", user)
	}
	var pgErr *pgconn.PgError
	if _, err := connect("system:serviceaccount:"+d.Metadata.Namespace+":billing", audience); !errors.As(err, &pgErr) || pgErr.Code != "42501" {
		t.Errorf("another service account's token: %v, want 42501", err)
	}
	if _, err := connect(sa, "https://kubernetes.default.svc"); !errors.As(err, &pgErr) || pgErr.Code != "28P01" {
		t.Errorf("the pod's API token (another audience): %v, want 28P01", err)
	}
}
