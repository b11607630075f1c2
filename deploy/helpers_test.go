package deploy

import (
	"net"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"

	"github.com/pgwarden/pgwarden/internal/config"
	"github.com/pgwarden/pgwarden/testenv"
)

// repoRoot is the repository's top directory.
func repoRoot(t testing.TB) string {
	t.Helper()
	root, err := testenv.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	return root
}

func readFile(t testing.TB, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// envNames are the environment variables config.Load reads: each env tag
// of config.Config with EnvPrefix and the envPrefix of the structs it sits
// in, as caarlos0/env composes them.
func envNames() map[string]bool {
	names := map[string]bool{}
	var walk func(t reflect.Type, prefix string)
	walk = func(t reflect.Type, prefix string) {
		for i := 0; i < t.NumField(); i++ {
			f := t.Field(i)
			if p, ok := f.Tag.Lookup("envPrefix"); ok && f.Type.Kind() == reflect.Struct {
				walk(f.Type, prefix+p)
				continue
			}
			if name, _, _ := strings.Cut(f.Tag.Get("env"), ","); name != "" {
				names[prefix+name] = true
			}
		}
	}
	walk(reflect.TypeOf(config.Config{}), config.EnvPrefix)
	return names
}

// checkEnv fails t for each PGWARDEN_* variable in env that pgwarden does not
// read: not a config setting, not PGWARDEN_CONFIG (the -config default), and
// not a database's admin.password_env in cfg.
func checkEnv(t testing.TB, where string, env map[string]string, cfg *config.Config) {
	t.Helper()
	known := envNames()
	known["PGWARDEN_CONFIG"] = true
	if cfg != nil {
		for _, d := range cfg.Databases {
			known[d.Admin.PasswordEnv] = true
		}
	}
	for k := range env {
		if strings.HasPrefix(k, config.EnvPrefix) && !known[k] {
			t.Errorf("%s: %s is not a variable pgwarden reads (see internal/config)", where, k)
		}
	}
}

// loadConfig loads the config text as `pgwarden serve -config` would, with
// env (only) as the environment.
func loadConfig(t testing.TB, where, text string, env map[string]string) *config.Config {
	t.Helper()
	p := filepath.Join(t.TempDir(), "pgwarden.json")
	if err := os.WriteFile(p, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := config.Load(p, env)
	if err != nil {
		t.Fatalf("%s: pgwarden refuses its config: %v", where, err)
	}
	return cfg
}

// port is the port of a host:port address.
func port(t testing.TB, addr string) int {
	t.Helper()
	_, p, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatalf("%q: %v", addr, err)
	}
	n, err := strconv.Atoi(p)
	if err != nil {
		t.Fatalf("%q: %v", addr, err)
	}
	return n
}

// connParams parses a libpq key=value connection string (no quoting, as
// the configs here write them).
func connParams(s string) map[string]string {
	m := map[string]string{}
	for _, f := range strings.Fields(s) {
		if k, v, ok := strings.Cut(f, "="); ok {
			m[k] = v
		}
	}
	return m
}
