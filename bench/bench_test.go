package main

import (
	"context"
	"errors"
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
	path, err := run(ctx, profiles["smoke"], bin, out, nil)
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
		// Transaction pooling: its section, every protocol, the idle rows,
		// the many clients, and every target of it.
		"## Transaction pooling", "### Transaction mode, select-only, simple", "### Transaction mode, select-only, extended",
		"### Transaction mode, select-only, prepared", "| 20 | pgwarden-txn |", "| 20 | pgwarden-txn-tls |",
		"### 4 clients over a pool of 4 servers", "| pgwarden-txn |", "| pgbouncer-txn (trust) |",
		"transaction mode, select-only, simple, 2 clients: TPS ≥ 1.0× direct",
		"transaction mode, select-only, extended, 2 clients: TPS ≥ 1.05× PgBouncer in transaction mode",
		"transaction mode: pgbench -M prepared completes with no errors",
		"transaction mode: ≤ 8 KiB per idle client at 20 clients (no TLS)",
		"4 clients over 4 servers in transaction mode: every client answered",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("report lacks %q", want)
		}
	}
	if strings.Contains(md, "NaN") || strings.Contains(md, "| 0 | 0 |") {
		t.Errorf("report has empty figures:\n%s", md)
	}
	// With no more clients than servers, transaction mode works whether or
	// not a client gives its server back between transactions: these runs
	// must not fail (PgBouncer's -M prepared may).
	for _, want := range []string{"| 2 | ", "every client answered |"} {
		if !strings.Contains(txnSection(md), want) {
			t.Errorf("transaction pooling section lacks %q:\n%s", want, txnSection(md))
		}
	}
	for _, l := range strings.Split(txnSection(md), "\n") {
		if strings.HasPrefix(l, "| 2 | ") && strings.Count(l, "fails") > cond(strings.Contains(l, "no prepared statements"), 1, 0) {
			t.Errorf("a transaction-mode run failed with clients ≤ servers: %s", l)
		}
	}
	png, err := os.ReadFile(strings.TrimSuffix(path, ".md") + ".png")
	if err != nil || len(png) < 1000 || string(png[1:4]) != "PNG" {
		t.Fatalf("chart: %d bytes, %v", len(png), err)
	}
}

// txnSection is the report's "Transaction pooling" section.
func txnSection(md string) string {
	_, s, _ := strings.Cut(md, "## Transaction pooling")
	if i := strings.Index(s, "\n## "); i >= 0 {
		s = s[:i]
	}
	return s
}

// PgBouncer before 1.21 cannot run -M prepared in transaction mode: its
// failure says so, beside the figure it lacks; other failures say why.
func TestTransactionModeFailureLabels(t *testing.T) {
	r := &report{machine: machine{bouncer: "1.18.0"}, txnRes: map[cellKey][]pgbenchResult{},
		txnErr: map[cellKey][]string{
			{selectPrepared.name, 8, "pgbouncer-txn"}: {`ERROR: prepared statement "P0_1" does not exist`},
			{selectSimple.name, 8, "pgwarden-txn"}:    {"FATAL: too many upstream connections"},
		}}
	for _, c := range []struct {
		s      script
		target string
		want   string
	}{
		{selectPrepared, "pgbouncer-txn", "fails (1.18 has no prepared statements in transaction mode)"},
		{selectSimple, "pgwarden-txn", "fails (FATAL: too many upstream connections)"},
		{selectSimple, "direct", "–"},
	} {
		if _, ok, text := r.txnCell(c.s, 8, c.target); ok || text != c.want {
			t.Errorf("%s, %s: %q, %v; want %q", c.s.name, c.target, text, ok, c.want)
		}
	}
	// A run that finished while pgbench printed errors keeps its figure and
	// fails beside it.
	r.txnRes[cellKey{selectPrepared.name, 64, "pgbouncer-txn"}] = []pgbenchResult{{tps: 19147, txns: 95000, errors: 60,
		errorLines: []string{`pgbench: error: ERROR:  prepared statement "P_0" already exists`}}}
	if v, ok, text := r.txnCell(selectPrepared, 64, "pgbouncer-txn"); !ok || v != 19147 ||
		text != `19147, fails (1.18 has no prepared statements in transaction mode): 60 pgbench errors, the first ERROR: prepared statement "P_0" already exists` {
		t.Errorf("PgBouncer with errors: %q, %v, %v", text, v, ok)
	}
	if r.txnClean(selectPrepared, 64, "pgbouncer-txn") {
		t.Error("a cell with pgbench errors is clean")
	}
	r.machine.bouncer = "1.22.1"
	if _, _, text := r.txnCell(selectPrepared, 8, "pgbouncer-txn"); !strings.HasPrefix(text, `fails (ERROR: prepared statement`) {
		t.Errorf("PgBouncer 1.22: %q", text)
	}
	err := errors.New("pgbench -c 8 -S -M prepared against pgbouncer-txn: exit status 2\npgbench (15.18)\n" +
		"pgbench: error: ERROR:  prepared statement \"P_0\" already exists\n" +
		"pgbench: error: client 3 script 0 aborted in command 1 query 0: ERROR:  prepared statement \"P0_1\" does not exist\n")
	if got, want := failReason(err), `ERROR: prepared statement "P0_1" does not exist`; got != want {
		t.Errorf("failReason: %q, want %q", got, want)
	}
}
