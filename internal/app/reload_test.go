package app

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/pgwarden/pgwarden/internal/config"
	"github.com/pgwarden/pgwarden/metrics"
	"github.com/pgwarden/pgwarden/pgerror"
	"github.com/pgwarden/pgwarden/pool"
	"github.com/pgwarden/pgwarden/proxy"
)

// fakeProxy records what a reload applied, and refuses Reconfigure when told.
type fakeProxy struct {
	refuse error
	calls  []string
	pool   pool.Config
}

func (f *fakeProxy) Reconfigure(proxy.Reloadable) error {
	f.calls = append(f.calls, "Reconfigure")
	return f.refuse
}

func (f *fakeProxy) SetPoolConfig(pc pool.Config) error {
	f.calls = append(f.calls, "SetPoolConfig")
	f.pool = pc
	return nil
}

func (f *fakeProxy) SetConsoleGroups([]string) { f.calls = append(f.calls, "SetConsoleGroups") }

const reloadBase = `{
  "oidc": {"issuer_url": "https://idp.example", "audiences": ["pgwarden"]},
  "pool": {"max_per_pool": 10},
  "databases": [{"name": "app", "upstream": "host=127.0.0.1 dbname=app",
    "levels": [{"name": "reader", "groups": ["analyst"]}]}]
}`

// reloadApp is an App as far as Reload goes: it started with reloadBase and
// reloads whatever the file then holds, into fake.
func reloadApp(t *testing.T, fake *fakeProxy) (*App, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "pgwarden.json")
	if err := os.WriteFile(path, []byte(reloadBase), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := config.Load(path, map[string]string{})
	if err != nil {
		t.Fatal(err)
	}
	a := &App{cfg: cfg, log: slog.New(slog.NewTextHandler(io.Discard, nil)), metrics: metrics.New(nil),
		modes: map[levelKey]string{}, reloadTo: fake}
	a.cfgNow.Store(cfg)
	a.noteModesLocked(cfg.Databases)
	a.SetReloader(func() (*config.Config, error) { return config.Load(path, map[string]string{}) })
	return a, path
}

// A reload the proxy refuses changes nothing, the pool limits included:
// they are applied only once the routes are, so the log's "the running
// configuration is unchanged" is true.
func TestReloadRefusedByTheProxyChangesNoPoolLimit(t *testing.T) {
	t.Parallel()
	refusal := errors.New("proxy: this change needs a restart: database \"app\" has another upstream")
	fake := &fakeProxy{refuse: refusal}
	a, path := reloadApp(t, fake)
	if err := os.WriteFile(path, []byte(strings.Replace(reloadBase, `"max_per_pool": 10`, `"max_per_pool": 3`, 1)), 0o600); err != nil {
		t.Fatal(err)
	}
	err := a.Reload(context.Background(), "test")
	var pe *pgerror.Error
	if !errors.As(err, &pe) || pe.Code != pgerror.ConfigurationFileError || !errors.Is(err, refusal) {
		t.Fatalf("Reload: %v, want the proxy's refusal as F0000", err)
	}
	if !slices.Equal(fake.calls, []string{"Reconfigure"}) {
		t.Fatalf("a refused reload applied %v", fake.calls)
	}
	if got := a.current().Pool.MaxPerPool; got != 10 {
		t.Fatalf("the configuration in force says max_per_pool %d after a refused reload", got)
	}

	// Accepted, everything is applied and recorded.
	fake.refuse = nil
	fake.calls = nil
	if err := a.Reload(context.Background(), "test"); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(fake.calls, []string{"Reconfigure", "SetPoolConfig", "SetConsoleGroups"}) || fake.pool.MaxPerPool != 3 {
		t.Fatalf("an accepted reload applied %v, pool %+v", fake.calls, fake.pool)
	}
	if got := a.current().Pool.MaxPerPool; got != 3 {
		t.Fatalf("max_per_pool in force %d, want 3", got)
	}
}
