package testenv

import (
	"errors"
	"os"
	"testing"
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
