// Command devstack runs the whole pgwarden stack for development (`make dev`):
// a throwaway PostgreSQL with the app database, a Vault dev server configured
// by vault-init's code, the dev OIDC issuer, and bin/pgwarden itself, started
// as a separate process from the config file it writes. When everything is
// ready it writes .dev/env and prints how to connect; on SIGINT or SIGTERM it
// stops every process it started and removes its temp dirs and .dev/env.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/pgwarden/pgwarden/testenv"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "devstack:", err)
		os.Exit(1)
	}
}

func run() error {
	devDir := flag.String("dir", ".dev", "where env, config, certificates and logs go")
	bin := flag.String("pgwarden", "bin/pgwarden", "the pgwarden binary to run")
	port := flag.Int("port", 6432, "pgwarden's client port (0 picks a free one)")
	metricsPort := flag.Int("metrics-port", 9632, "pgwarden's metrics port (0 picks a free one)")
	flag.Parse()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	absDev, err := filepath.Abs(*devDir)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(absDev, 0o700); err != nil {
		return err
	}
	// Everything below .dev is ours: remove it on the way out, whatever happens.
	defer os.RemoveAll(absDev)
	stateDir, err := os.MkdirTemp(absDev, "stack-")
	if err != nil {
		return err
	}

	fmt.Println("devstack: starting PostgreSQL, Vault and the OIDC issuer…")
	st, err := testenv.StartStack(ctx, testenv.StackOptions{Dir: stateDir, NoProxy: true})
	if err != nil {
		return err
	}
	defer st.Close()

	if st.Config.Listen, err = pickPort(*port); err != nil {
		return err
	}
	if st.Config.MetricsListen, err = pickPort(*metricsPort); err != nil {
		return err
	}
	st.Config.LogFormat = "text"
	cfgPath := filepath.Join(stateDir, "pgwarden.json")
	if err := st.WriteConfig(cfgPath); err != nil {
		return err
	}

	logPath := filepath.Join(absDev, "pgwarden.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		return err
	}
	defer logFile.Close()
	pg := exec.Command(*bin, "serve", "-config", cfgPath, "-shutdown-grace", "5s")
	pg.Env = append(os.Environ(), "VAULT_ADDR="+st.Vault.Addr)
	pg.Stdout, pg.Stderr = logFile, logFile
	pg.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGTERM}
	if err := pg.Start(); err != nil {
		return fmt.Errorf("start %s: %w (run `make build` first)", *bin, err)
	}
	exited := make(chan error, 1)
	go func() { exited <- pg.Wait() }()
	defer func() {
		_ = pg.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			_ = syscall.Kill(-pg.Process.Pid, syscall.SIGKILL)
			<-exited
		}
	}()
	if err := waitListening(ctx, st.Config.Listen, exited); err != nil {
		b, _ := os.ReadFile(logPath)
		return fmt.Errorf("pgwarden did not start: %w\n%s", err, b)
	}

	_, portStr, _ := net.SplitHostPort(st.Config.Listen)
	envPath := filepath.Join(absDev, "env")
	env := strings.Join([]string{
		"# pgwarden dev stack; source with: set -a; . .dev/env; set +a",
		"PGHOST=localhost",
		"PGPORT=" + portStr,
		"PGDATABASE=app",
		"PGSSLMODE=verify-full",
		"PGSSLROOTCERT=" + st.Certs.CAFile,
		"VAULT_ADDR=" + st.Vault.Addr,
		"PGWARDEN_METRICS_URL=http://" + st.Config.MetricsListen + "/metrics",
		"PGWARDEN_DEV_ISSUER=" + st.Issuer.URL,
		"",
	}, "\n")
	// Written last, and atomically: its presence means the stack is ready.
	tmp := envPath + ".tmp"
	if err := os.WriteFile(tmp, []byte(env), 0o600); err != nil {
		return err
	}
	if err := os.Rename(tmp, envPath); err != nil {
		return err
	}
	u, _ := url.Parse(st.Issuer.URL)
	shownLog := logPath // relative to where make dev runs, as the lines below are
	if wd, err := os.Getwd(); err == nil {
		if rel, err := filepath.Rel(wd, logPath); err == nil && !strings.HasPrefix(rel, "..") {
			shownLog = rel
		}
	}
	fmt.Printf(`devstack: ready — pgwarden on %s (TLS), metrics on http://%s/metrics
  PostgreSQL %s on 127.0.0.1:%d, Vault dev server %s, OIDC issuer %s
  pgwarden log: %s

In another terminal:
  set -a; . .dev/env; set +a
  export PGPASSWORD=$(bin/devtoken --sub alice --groups analyst)
  psql -U reader -c 'select current_user'

Levels: reader (groups analyst, engineer), writer (engineer), admin (dba).
Ctrl-C stops everything.
`, st.Config.Listen, st.Config.MetricsListen, st.PG.Version, st.PG.Port, st.Vault.Addr, u.Host, shownLog)

	select {
	case <-ctx.Done():
		fmt.Println("\ndevstack: stopping…")
	case err := <-exited:
		exited <- err // for the deferred stop
		return fmt.Errorf("pgwarden exited: %v (log: %s)", err, logPath)
	}
	os.Remove(envPath)
	return nil
}

// pickPort checks that 127.0.0.1:p is free (p 0: finds a free one).
func pickPort(p int) (string, error) {
	ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", p))
	if err != nil {
		return "", fmt.Errorf("port %d: %w (pass -port/-metrics-port, 0 picks a free one)", p, err)
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}

func waitListening(ctx context.Context, addr string, exited chan error) error {
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond); err == nil {
			c.Close()
			return nil
		}
		select {
		case err := <-exited:
			exited <- err
			return fmt.Errorf("exited: %v", err)
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
	return errors.New("timed out")
}
