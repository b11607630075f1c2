// Command bench measures pgwarden beside direct PostgreSQL and PgBouncer on
// the same machine, in the same run, and writes a report of absolute figures
// and ratios (`make bench`, `make bench BENCH=full`).
//
// It starts the stack through testenv as the tests do — a throwaway
// PostgreSQL, a Vault dev server, the OIDC issuer — then the real
// bin/pgwarden as a process of its own, and two of Debian's PgBouncer (SCRAM,
// and trust for the connection-storm ceiling), pooling in session mode with
// pgwarden's pool size; for transaction pooling, a second bin/pgwarden and a
// third PgBouncer, both in transaction mode. Every measurement runs its
// targets interleaved (A, B, C, A, B, C…) so that drift hits them alike, and
// reports medians over the profile's repetitions:
//
//   - steady throughput: pgbench select-only (simple and prepared) and
//     TPC-B-like, at several client counts: TPS, average and p99 latency,
//     failed transactions, and the proxies' CPU per transaction;
//   - connection storm: pgbench -C (a new connection per transaction);
//   - cold path: connect to first row for an identity's first connection;
//   - transaction pooling: select-only (simple, extended, prepared) against
//     direct PostgreSQL, PgBouncer and a second pgwarden, both proxies in
//     transaction mode over a pool of 4 servers; idle memory in
//     transaction mode; 1,000 clients over a pool of 20;
//   - memory: resident memory per idle authenticated client;
//   - Go micro-benchmarks of the relay and the auth path;
//   - a CPU profile of pgwarden under select-only load.
//
// Targets and what each figure is compared with are in report.go.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// profile is how much a run measures.
type profile struct {
	name       string
	reps       int           // repetitions of each interleaved round; medians are reported
	duration   time.Duration // one pgbench run
	clients    []int
	scripts    []script
	storm      time.Duration
	stormConns int // pgbench -c for the storm
	cold       int // cold starts
	idle       []int
	scale      int
	cpuProfile time.Duration // length of the pprof capture
	micro      bool          // run the Go micro-benchmarks

	// Transaction pooling: select-only (simple, extended, prepared) at
	// txnClients against direct PostgreSQL, PgBouncer and pgwarden, both
	// proxies in transaction mode over txnPool servers; then many clients
	// over manyPool servers.
	txnClients []int
	txnPool    int
	many       int
	manyPool   int
}

var profiles = map[string]profile{
	"quick": {name: "quick", reps: 1, duration: 5 * time.Second, clients: []int{1, 8, 32, 64},
		scripts: allScripts, storm: 5 * time.Second, stormConns: 8, cold: 30, idle: []int{100, 1000},
		scale: 10, cpuProfile: 5 * time.Second, micro: true,
		txnClients: []int{8, 64}, txnPool: 4, many: 1000, manyPool: 20},
	"full": {name: "full", reps: 3, duration: 10 * time.Second, clients: []int{1, 8, 32, 64},
		scripts: allScripts, storm: 10 * time.Second, stormConns: 8, cold: 30, idle: []int{100, 1000, 10000},
		scale: 10, cpuProfile: 10 * time.Second, micro: true,
		txnClients: []int{8, 32, 64}, txnPool: 4, many: 1000, manyPool: 20},
	// smoke checks that every part of the run works, in a minute; its
	// figures mean nothing. Its transaction-mode runs have no more clients
	// than servers, so they pass whether or not a client gives its server
	// back between transactions.
	"smoke": {name: "smoke", reps: 1, duration: time.Second, clients: []int{1, 8},
		scripts: []script{selectSimple, tpcb}, storm: time.Second, stormConns: 2, cold: 3, idle: []int{20},
		scale: 1, cpuProfile: time.Second,
		txnClients: []int{2}, txnPool: 4, many: 4, manyPool: 4},
}

func main() {
	prof := flag.String("profile", "quick", "quick (under 10 minutes), full (3 repetitions, 10,000 idle clients) or smoke")
	out := flag.String("out", "bench/results", "where the report and chart go")
	bin := flag.String("pgwarden", "bin/pgwarden", "the pgwarden binary")
	only := flag.String("only", "", "run only these sections (comma separated: steady, txn, storm, vault, cold, idle, many, profile, micro) and write no report: for a quick loop while optimising")
	flag.Parse()
	p, ok := profiles[*prof]
	if !ok {
		fmt.Fprintf(os.Stderr, "bench: unknown profile %q (quick, full, smoke)\n", *prof)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM, syscall.SIGHUP)
	defer stop()
	if err := raiseFileLimit(maxClients(p)); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
	var sections map[string]bool
	if *only != "" {
		sections = map[string]bool{}
		for _, s := range strings.Split(*only, ",") {
			sections[strings.TrimSpace(s)] = true
		}
	}
	path, err := run(ctx, p, *bin, *out, sections)
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
	fmt.Println("bench: report written to", path)
}

func run(ctx context.Context, p profile, bin, outDir string, only map[string]bool) (string, error) {
	start := time.Now()
	if err := os.MkdirAll(outDir, 0o755); err != nil {
		return "", err
	}
	bin, err := filepath.Abs(bin)
	if err != nil {
		return "", err
	}
	logf("starting PostgreSQL, Vault, the issuer, two pgwardens and three PgBouncers (profile %s)…", p.name)
	en, err := startEnv(ctx, p, bin)
	if err != nil {
		return "", err
	}
	defer en.close()
	r := &report{profile: p, machine: describeMachine(en), started: start}

	for _, sec := range []struct {
		name string
		run  func(context.Context, *env) error
	}{
		{"steady", r.steady}, {"txn", r.txnRun}, {"storm", r.stormRun}, {"vault", r.vaultRun}, {"cold", r.coldRun},
		{"idle", r.idleRun}, {"many", r.manyRun}, {"profile", r.profileRun},
	} {
		if only != nil && !only[sec.name] {
			continue
		}
		if err := sec.run(ctx, en); err != nil {
			return "", err
		}
	}
	if p.micro && (only == nil || only["micro"]) {
		r.microRun(ctx, en.root)
	}
	if only != nil {
		for _, pt := range r.profiles {
			logf("%s, %d clients:\n%s", pt.target, pt.clients, pt.top)
		}
		return "(no report: -only)", nil
	}
	r.elapsed = time.Since(start)
	return r.write(outDir)
}

// raiseFileLimit lifts the soft limit on open files to the hard one. Go does
// that for itself but hands its children the original soft limit unless the
// program sets it explicitly, and PgBouncer keeps what it is given: at
// Debian's 1024 it would refuse idle clients past a thousand. idle clients
// need a descriptor here and one in the proxy. So do the many clients of
// transaction mode (in pgbench, a child, and in the proxy).
func raiseFileLimit(idle int) error {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return err
	}
	lim.Cur = lim.Max
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return err
	}
	if need := uint64(idle + 500); lim.Max < need {
		return fmt.Errorf("the open-file limit is %d; %d idle clients need %d (raise it with ulimit -n, or use a smaller profile)", lim.Max, idle, need)
	}
	return nil
}

func logf(format string, args ...any) {
	fmt.Printf("bench: "+format+"\n", args...)
}
