package main

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pgwarden/pgwarden/testenv"
)

// The smoke profile runs every part of `make bench` for a second or so each
// (its figures mean nothing), so the benchmark cannot rot unnoticed: every
// section, every ratio and the chart must be there.
func TestSmokeProfileWritesTheWholeReport(t *testing.T) {
	testenv.Integration(t)
	root, err := testenv.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(root, "bin", "pgwarden")
	if _, err := os.Stat(bin); err != nil {
		t.Fatalf("%s: %v (make build, which make test runs first, builds it)", bin, err)
	}
	out := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	path, err := run(ctx, profiles["smoke"], bin, out)
	testenv.Check(t, err)
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	md := string(b)
	for _, want := range []string{
		"| PgBouncer | 1.", "## Targets", "## Steady throughput", "### select-only, simple", "### TPC-B-like, simple",
		"## Proxy CPU per transaction", "## Connection storm", "| pgbouncer-trust |", "## Cold path", "| pgwarden, cold |",
		"## Memory per idle client", "| 20 | pgbouncer | 20 |", "## Where pgwarden's CPU goes", "flat%",
		"×PgBouncer", "×direct", "connection storm: ≥ 1.0× PgBouncer with auth_type=trust", "cold path median < 25 ms",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("report lacks %q", want)
		}
	}
	if strings.Contains(md, "NaN") || strings.Contains(md, "| 0 | 0 |") {
		t.Errorf("report has empty figures:\n%s", md)
	}
	png, err := os.ReadFile(strings.TrimSuffix(path, ".md") + ".png")
	if err != nil || len(png) < 1000 || string(png[1:4]) != "PNG" {
		t.Fatalf("chart: %d bytes, %v", len(png), err)
	}
}
