// Command pgwarden is a PostgreSQL auth proxy: clients send an OIDC token as
// their password and get a session under short-lived credentials from Vault.
//
//	pgwarden serve      -config pgwarden.json   run the proxy
//	pgwarden vault-init -config pgwarden.json   configure Vault from the same file
//	                    [-dry-run] [-prune] [-write-passwords]
//	pgwarden check      -config pgwarden.json   validate the file, reach the issuer and Vault
//	pgwarden version
//
// The config file path may also come from PGWARDEN_CONFIG; PGWARDEN_*
// variables override the file (see internal/config).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"runtime/debug"
	"strings"
	"syscall"
	"time"

	"github.com/pgwarden/pgwarden/authn"
	"github.com/pgwarden/pgwarden/broker/vaultinit"
	"github.com/pgwarden/pgwarden/internal/app"
	"github.com/pgwarden/pgwarden/internal/config"
)

const usage = `usage: pgwarden <command> [-config FILE] [flags]

commands:
  serve       run the proxy until SIGINT or SIGTERM (a second one stops it at once);
              SIGHUP reloads the config file (grants, TLS pair, log level, pool limits)
              -shutdown-grace D   how long sessions may drain (default 30s)
  vault-init  configure Vault (database engine, JWT auth, connections, roles, policies)
              from the config file; prints one line per object created, updated or
              deleted, or "no changes"; needs VAULT_ADDR and a VAULT_TOKEN allowed to
              manage them, and each database's admin password in admin.password_env
              -dry-run            print the plan and change nothing (no password needed)
              -prune              also delete the database roles, policies, JWT auth
                                  roles and connections pgwarden wrote that the config
                                  no longer names (never a mount or an auth method);
                                  revoking a deleted role's leases needs sudo
              -write-passwords    send each connection's admin password even when
                                  nothing else changed (after rotating it)
  check       validate the config and reach the issuer and Vault
  version     print the version
`

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		fmt.Fprint(stderr, usage)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	cmd := args[0]
	if cmd == "version" {
		fmt.Fprintln(stdout, "pgwarden", version())
		return 0
	}
	fs := flag.NewFlagSet(cmd, flag.ContinueOnError)
	fs.SetOutput(stderr)
	path := fs.String("config", os.Getenv("PGWARDEN_CONFIG"), "config file (JSON); env PGWARDEN_CONFIG")
	shutdownGrace := fs.Duration("shutdown-grace", app.DefaultShutdownGrace, "serve: how long sessions may drain on SIGTERM")
	var vi vaultInitFlags
	fs.BoolVar(&vi.dryRun, "dry-run", false, "vault-init: print the plan, change nothing")
	fs.BoolVar(&vi.prune, "prune", false, "vault-init: also delete what pgwarden wrote that the config no longer names")
	fs.BoolVar(&vi.writePasswords, "write-passwords", false, "vault-init: send the admin passwords even when nothing else changed")
	if err := fs.Parse(args[1:]); err != nil {
		return 2
	}
	misplaced := ""
	fs.Visit(func(f *flag.Flag) {
		if cmd != "vault-init" && strings.HasPrefix(f.Usage, "vault-init:") {
			misplaced = f.Name
		}
	})
	if misplaced != "" {
		fmt.Fprintf(stderr, "pgwarden %s: -%s is not a flag of %s\n\n%s", cmd, misplaced, cmd, usage)
		return 2
	}
	cfg, err := config.Load(*path, environ())
	if err != nil {
		fmt.Fprintln(stderr, "pgwarden:", err)
		return 2
	}
	log, level := newLogger(cfg, stderr)
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	switch cmd {
	case "serve":
		// Registered before the start, which takes a while (the issuer's
		// keys, Vault): a SIGHUP sent meanwhile waits for it rather than
		// ending the process, which is SIGHUP's default.
		hup := make(chan os.Signal, 1)
		signal.Notify(hup, syscall.SIGHUP)
		defer signal.Stop(hup)
		err = serve(ctx, stop, cfg, log, level, *shutdownGrace, hup, func() (*config.Config, error) { return config.Load(*path, environ()) })
	case "vault-init":
		err = vaultInit(ctx, cfg, vi, stdout)
	case "check":
		err = check(ctx, cfg, stdout)
	default:
		fmt.Fprintf(stderr, "pgwarden: unknown command %q\n\n%s", cmd, usage)
		return 2
	}
	if err != nil {
		log.Error("pgwarden failed", "command", cmd, "error", err)
		return 1
	}
	return 0
}

// serve runs pgwarden until ctx ends (SIGINT, SIGTERM) or a listener fails,
// reloading the configuration on each signal from hup; then it drains for up
// to grace. stopSignals hands SIGINT and SIGTERM back to their default, so
// that a second one during the drain ends the process at once.
func serve(ctx context.Context, stopSignals func(), cfg *config.Config, log *slog.Logger, level *slog.LevelVar,
	grace time.Duration, hup <-chan os.Signal, reload func() (*config.Config, error)) error {
	a, err := app.New(ctx, cfg, log)
	if err != nil {
		return err
	}
	a.SetReloader(reload)
	a.SetLogLevel(level)
	if err := a.Start(); err != nil {
		return err
	}
wait:
	for {
		select {
		case <-ctx.Done():
			break wait
		case err := <-a.Errors():
			log.Error("listener stopped", "error", err)
			break wait
		case <-hup:
			_ = a.Reload(ctx, "SIGHUP") // logged and counted by Reload
		}
	}
	stopSignals()
	log.Info("shutting down", "grace", grace.String())
	sctx, cancel := context.WithTimeout(context.Background(), grace)
	defer cancel()
	return a.Shutdown(sctx)
}

type vaultInitFlags struct{ dryRun, prune, writePasswords bool }

// vaultInit plans the config's Vault setup and, unless it is a dry run,
// applies it, printing one line per change on out (the plan's "create…", or
// "created…" as each is made) or "no changes". No line holds a password.
func vaultInit(ctx context.Context, cfg *config.Config, f vaultInitFlags, out io.Writer) error {
	vc, err := app.NewVaultClient(cfg)
	if err != nil {
		return err
	}
	if vc.Token() == "" {
		return errors.New("vault-init needs VAULT_TOKEN (a token allowed to manage mounts, auth methods, policies and the database engine)")
	}
	var missing []string
	spec := app.VaultSpec(cfg, func(name string) string {
		v := os.Getenv(name)
		if v == "" {
			missing = append(missing, name)
		}
		return v
	})
	// A dry run writes no connection, so it needs no password.
	if len(missing) > 0 && !f.dryRun {
		return fmt.Errorf("vault-init: admin password variable(s) not set: %s", strings.Join(missing, ", "))
	}
	spec.Prune, spec.WritePasswords = f.prune, f.writePasswords
	changes, err := vaultinit.Plan(ctx, vc, spec)
	if err != nil {
		return err
	}
	if len(changes) == 0 {
		fmt.Fprintln(out, "no changes")
		return nil
	}
	if f.dryRun {
		for _, c := range changes {
			fmt.Fprintln(out, c)
		}
		fmt.Fprintf(out, "dry run: %d change(s) planned, none made\n", len(changes))
		return nil
	}
	return changes.Apply(ctx, vc, func(c vaultinit.Change) {
		fmt.Fprintln(out, c.Action.Past(), c.Kind, c.Path+":", c.Detail)
	})
}

// check reports on out what it verified: the config (already loaded and
// validated by config.Load, which refuses with the field named), the issuer
// (authn.New: https or loopback http, the discovery document's issuer, the
// JWKS) and Vault. The first failure is returned as is, so its message names
// the problem.
func check(ctx context.Context, cfg *config.Config, out io.Writer) error {
	if err := app.CheckUpstreams(cfg); err != nil {
		return err
	}
	fmt.Fprintln(out, "config: ok")
	v, err := authn.New(ctx, app.VerifierConfig(cfg))
	if err != nil {
		return err
	}
	v.Close()
	fmt.Fprintln(out, "issuer: ok")
	vc, err := app.NewVaultClient(cfg)
	if err != nil {
		return err
	}
	h, err := vc.Sys().HealthWithContext(ctx)
	if err != nil {
		return fmt.Errorf("vault %s: %w", vc.Address(), err)
	}
	if h.Sealed {
		return fmt.Errorf("vault %s is sealed", vc.Address())
	}
	fmt.Fprintf(out, "vault: ok (%s, version %s)\n", vc.Address(), h.Version)
	fmt.Fprintf(out, "databases: %d configured\n", len(cfg.Databases))
	return nil
}

// newLogger returns the logger cfg asks for and its level, which a reload
// may change (config.Load has checked log_level).
func newLogger(cfg *config.Config, w io.Writer) (*slog.Logger, *slog.LevelVar) {
	level := new(slog.LevelVar)
	var l slog.Level
	if err := l.UnmarshalText([]byte(cfg.LogLevel)); err == nil {
		level.Set(l)
	}
	opts := &slog.HandlerOptions{Level: level}
	if cfg.LogFormat == "text" {
		return slog.New(slog.NewTextHandler(w, opts)), level
	}
	return slog.New(slog.NewJSONHandler(w, opts)), level
}

func environ() map[string]string {
	m := map[string]string{}
	for _, kv := range os.Environ() {
		if k, v, ok := strings.Cut(kv, "="); ok {
			m[k] = v
		}
	}
	return m
}

// buildVersion is stamped by the build (make build, the image):
// -ldflags "-X main.buildVersion=<git describe>". A plain go build leaves it
// empty, and version falls back on what the Go toolchain recorded.
var buildVersion string

func version() string {
	if buildVersion != "" {
		return buildVersion
	}
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" {
				return bi.Main.Version + " " + s.Value
			}
		}
		return bi.Main.Version
	}
	return "unknown"
}
