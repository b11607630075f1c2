package testenv

import (
	"context"
	"errors"
	"os"
	"testing"
	"time"

	vault "github.com/hashicorp/vault/api"
)

// InCI reports whether we run under CI (CI=true), where integration tests
// never skip.
func InCI() bool { return os.Getenv("CI") == "true" }

// Integration skips t under `go test -short` outside CI. Call it first in
// every test that starts real components.
func Integration(t testing.TB) {
	t.Helper()
	if testing.Short() && !InCI() {
		t.Skip("integration test: starts real PostgreSQL/Vault; skipped with -short")
	}
}

// Check fails t on err. A missing component is a failure too: the message
// names what to install. (Outside CI, use -short to skip integration tests.)
func Check(t testing.TB, err error) {
	t.Helper()
	if err == nil {
		return
	}
	if errors.Is(err, ErrMissing) {
		t.Fatalf("%v (integration tests need it; `make deps` installs it)", err)
	}
	t.Fatal(err)
}

// NewVault starts a Vault dev server of its own for t, stopped when t ends,
// and returns it with a root client; a missing Vault fails t in CI.
func NewVault(t testing.TB) (*Vault, *vault.Client) {
	t.Helper()
	Integration(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	v, err := StartVault(ctx)
	Check(t, err)
	t.Cleanup(v.Close)
	vc, err := v.Client()
	if err != nil {
		t.Fatal(err)
	}
	return v, vc
}

// NewStack starts a Stack for one test and stops it when the test ends. It
// skips under -short outside CI, like Integration.
func NewStack(t testing.TB, opts StackOptions) *Stack {
	t.Helper()
	Integration(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	st, err := StartStack(ctx, opts)
	Check(t, err)
	t.Cleanup(st.Close)
	return st
}
