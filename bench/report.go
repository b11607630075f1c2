package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/plotutil"
	"gonum.org/v1/plot/vg"
)

// report collects a run's figures and writes them.
type report struct {
	profile profile
	machine machine
	started time.Time
	elapsed time.Duration

	steadyTargets []target
	steadyRes     map[cellKey][]pgbenchResult
	stormTargets  []target
	stormRes      map[string][]pgbenchResult
	cold          map[string][]float64
	vaultCalls    map[string]map[string]float64 // how → Vault operation → calls, for 1,000 connections of one identity
	idle          []idleResult
	txnTargets    []target // transaction pooling: direct, pgbouncer-txn, pgwarden-txn
	txnRes        map[cellKey][]pgbenchResult
	txnErr        map[cellKey][]string // why each failed run of a cell failed
	many          []manyResult         // p.many clients over p.manyPool servers
	profiles      []profileTop
	micro         []string
	failures      []string // pgbench runs that failed (their cells lack them), or finished printing errors
}

// med returns the median of f over the repetitions of one cell.
func med(rs []pgbenchResult, f func(pgbenchResult) float64) float64 {
	xs := make([]float64, len(rs))
	for i, r := range rs {
		xs[i] = f(r)
	}
	return median(xs)
}

func tps(r pgbenchResult) float64      { return r.tps }
func latAvg(r pgbenchResult) float64   { return r.latAvg }
func latP99(r pgbenchResult) float64   { return r.latP99 }
func cpuTxn(r pgbenchResult) float64   { return r.cpuPerTxn }
func cpuUser(r pgbenchResult) float64  { return r.cpuUser }
func failed(r pgbenchResult) float64   { return float64(r.failed) }
func connTime(r pgbenchResult) float64 { return r.connAvg }

func (r *report) cell(script string, clients int, target string, f func(pgbenchResult) float64) float64 {
	return med(r.steadyRes[cellKey{script, clients, target}], f)
}

func ratio(a, b float64) string {
	if b == 0 {
		return "–"
	}
	return fmt.Sprintf("%.2f×", a/b)
}

// check is one target of the issue and whether the run met it.
type check struct {
	what, measured string
	met            bool
	why            string // for a missed target: what the run shows causes it
}

func (r *report) checks() []check {
	var out []check
	p := r.profile
	has := func(c int) bool {
		for _, x := range p.clients {
			if x == c {
				return true
			}
		}
		return false
	}
	for _, s := range []script{selectSimple, selectPrepared} {
		if _, ok := r.steadyRes[cellKey{s.name, p.clients[0], "direct"}]; !ok {
			continue
		}
		for _, c := range p.clients {
			pw, pb, d := r.cell(s.name, c, "pgwarden", tps), r.cell(s.name, c, "pgbouncer", tps), r.cell(s.name, c, "direct", tps)
			want := 1.1
			if c == 1 {
				want = 1.0
			}
			cw, cb := r.cell(s.name, c, "pgwarden", cpuTxn), r.cell(s.name, c, "pgbouncer", cpuTxn)
			out = append(out, check{fmt.Sprintf("%s, %d clients: TPS ≥ %.1f× PgBouncer", s.name, c, want), ratio(pw, pb), pw >= want*pb,
				fmt.Sprintf("proxy CPU per transaction %.1f µs vs PgBouncer's %.1f µs, taken from PostgreSQL on these cores; see the profile", cw, cb)})
			if c == 8 || c == 32 {
				out = append(out, check{fmt.Sprintf("%s, %d clients: TPS ≥ 0.85× direct", s.name, c), ratio(pw, d), pw >= 0.85*d,
					fmt.Sprintf("every transaction crosses the proxy (two more loopback round trips) and its %.1f µs of CPU come out of PostgreSQL's", cw)})
			}
		}
	}
	for _, c := range []int{8, 32} {
		if !has(c) {
			continue
		}
		pw, pb := r.cell(selectSimple.name, c, "pgwarden", cpuTxn), r.cell(selectSimple.name, c, "pgbouncer", cpuTxn)
		out = append(out, check{fmt.Sprintf("proxy CPU per select-only transaction, %d clients: ≤ 1.0× PgBouncer", c),
			fmt.Sprintf("%.1f µs vs %.1f µs (%s)", pw, pb, ratio(pw, pb)), pw <= pb,
			"the profile shows system calls and the Go scheduler waking a goroutine for every message (netpoll, futex), where PgBouncer's one thread loops on epoll"})
	}
	if len(r.stormRes) > 0 {
		pw, tr := med(r.stormRes["pgwarden"], tps), med(r.stormRes["pgbouncer-trust"], tps)
		out = append(out, check{"connection storm: ≥ 1.0× PgBouncer with auth_type=trust", fmt.Sprintf("%.0f vs %.0f conn/s (%s)", pw, tr, ratio(pw, tr)), pw >= tr,
			fmt.Sprintf("asking for the token is a round trip trust does not make, and each connection also checks its pooled session and applies the client's settings: %.0f µs of CPU per connection vs %.0f µs",
				med(r.stormRes["pgwarden"], cpuTxn), med(r.stormRes["pgbouncer-trust"], cpuTxn))})
	}
	if xs := r.cold["pgwarden, cold"]; len(xs) > 0 {
		out = append(out, check{"cold path median < 25 ms", fmt.Sprintf("%.1f ms", median(xs)), median(xs) < 25,
			"Vault's JWT login and credential creation dominate it"})
	}
	if n := maxIdle(p); n > 0 {
		for _, ir := range r.idle {
			if ir.target == "pgwarden" && ir.wanted == n {
				m := fmt.Sprintf("%.1f KiB per client at %d held", ir.perClient/1024, ir.held)
				if ir.held < n {
					m += fmt.Sprintf(" (cannot hold %d: at most %d)", n, ir.held)
				}
				out = append(out, check{fmt.Sprintf("≤ 8 KiB per idle client at %d clients", n), m, ir.held == n && ir.perClient <= 8*1024,
					"in session mode an idle client keeps its goroutine (8 KiB of stack) and buffers; only transaction mode parks idle clients without one"})
			}
		}
	}
	out = append(out, r.txnChecks()...)
	if a := r.relayAllocs(); a >= 0 {
		out = append(out, check{"the relay allocates nothing per message", fmt.Sprintf("%d allocs/op (BenchmarkCopyFrame, BenchmarkRelayOverSockets)", a), a == 0,
			"see the allocation profile"})
	}
	return out
}

func (r *report) write(dir string) (string, error) {
	name := r.started.UTC().Format("2006-01-02") + "-" + r.profile.name
	chart := name + ".png"
	if err := r.chart(filepath.Join(dir, chart)); err != nil {
		return "", err
	}
	var b strings.Builder
	w := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	m := r.machine
	p := r.profile
	w("# pgwarden beside PostgreSQL and PgBouncer — %s, profile %s\n\n", r.started.UTC().Format("2006-01-02 15:04 UTC"), p.name)
	w("| machine | |\n| --- | --- |\n")
	w("| CPU | %d cores, %s |\n| kernel | %s |\n| PostgreSQL | %s |\n| PgBouncer | %s |\n| Go | %s |\n| commit | %s |\n| run took | %s |\n\n",
		m.cores, m.cpu, m.kernel, m.postgres, m.bouncer, m.goVersion, m.commit, r.elapsed.Round(time.Second))
	w("Everything ran on this one machine: pgbench, the proxies and PostgreSQL share its %d cores, so a proxy's CPU is taken from PostgreSQL. "+
		"Targets, interleaved in every round: **direct** PostgreSQL (SCRAM), **pgbouncer** (session pooling, SCRAM, pool %d), "+
		"**pgwarden** from loopback without TLS and **pgwarden-tls** (`sslmode=require`), both session pooling with pool %d, "+
		"a writer token, credentials from Vault. pgbench scale %d, `-j 2`, %s per run, %d repetition(s), medians shown. "+
		"p99 latency from pgbench's transaction log sampled at 10%%. "+
		"Every figure is session mode but those of [Transaction pooling](#transaction-pooling) and the transaction-mode rows (`-txn`) of idle memory.\n\n",
		m.cores, poolSize, poolSize, p.scale, p.duration, p.reps)

	w("## Targets\n\n| target | measured | | why, when missed |\n| --- | --- | --- | --- |\n")
	for _, c := range r.checks() {
		w("| %s | %s | %s | %s |\n", c.what, c.measured, cond(c.met, "met", "**missed**"), cond(c.met, "", c.why))
	}
	w("\nThe CPU profile under [Where pgwarden's CPU goes](#where-pgwardens-cpu-goes) shows where a proxy's time goes.\n\n")

	w("## Steady throughput\n\n![select-only TPS by clients](%s)\n\n", chart)
	for _, s := range p.scripts {
		w("### %s\n\n", s.name)
		w("| clients | direct TPS | PgBouncer TPS | pgwarden TPS | ×direct | ×PgBouncer | pgwarden-tls TPS | ×direct | ×PgBouncer |\n")
		w("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n")
		for _, c := range p.clients {
			d, pb := r.cell(s.name, c, "direct", tps), r.cell(s.name, c, "pgbouncer", tps)
			pw, pt := r.cell(s.name, c, "pgwarden", tps), r.cell(s.name, c, "pgwarden-tls", tps)
			w("| %d | %.0f | %.0f | %.0f | %s | %s | %.0f | %s | %s |\n", c, d, pb, pw, ratio(pw, d), ratio(pw, pb), pt, ratio(pt, d), ratio(pt, pb))
		}
		w("\nLatency, average / p99 (ms), and failed transactions when there were any:\n\n| clients |")
		for _, t := range r.steadyTargets {
			w(" %s |", t.name)
		}
		w("\n| ---: |")
		for range r.steadyTargets {
			w(" ---: |")
		}
		w("\n")
		for _, c := range p.clients {
			w("| %d |", c)
			for _, t := range r.steadyTargets {
				fails := 0.0
				for _, res := range r.steadyRes[cellKey{s.name, c, t.name}] {
					fails += failed(res)
				}
				w(" %.3f / %.3f%s |", r.cell(s.name, c, t.name, latAvg), r.cell(s.name, c, t.name, latP99),
					cond(fails > 0, fmt.Sprintf(", %.0f failed", fails), ""))
			}
			w("\n")
		}
		w("\n")
	}

	w("## Proxy CPU per transaction\n\nFrom `/proc/<pid>/stat` over each run (user + system), select-only simple:\n\n")
	w("| clients | pgwarden µs (user + sys) | pgwarden-tls µs | PgBouncer µs (user + sys) | pgwarden ×PgBouncer |\n| ---: | ---: | ---: | ---: | ---: |\n")
	for _, c := range p.clients {
		pw, pwu := r.cell(selectSimple.name, c, "pgwarden", cpuTxn), r.cell(selectSimple.name, c, "pgwarden", cpuUser)
		pb, pbu := r.cell(selectSimple.name, c, "pgbouncer", cpuTxn), r.cell(selectSimple.name, c, "pgbouncer", cpuUser)
		pt := r.cell(selectSimple.name, c, "pgwarden-tls", cpuTxn)
		w("| %d | %.1f (%.1f + %.1f) | %.1f | %.1f (%.1f + %.1f) | %s |\n", c, pw, pwu, pw-pwu, pt, pb, pbu, pb-pbu, ratio(pw, pb))
	}

	if len(p.txnClients) > 0 {
		w("\n")
		r.writeTxn(w)
	}

	w("\n## Connection storm\n\n`pgbench -C -S -c %d`: a new connection for every transaction. pgwarden's token and credential caches are warm (one token, as an application's pool would use).\n\n", p.stormConns)
	w("| target | connections/s | ×PgBouncer (SCRAM) | ×PgBouncer (trust) | ×direct | average connection time | proxy CPU per connection |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n")
	pbS, pbT, dRate := med(r.stormRes["pgbouncer"], tps), med(r.stormRes["pgbouncer-trust"], tps), med(r.stormRes["direct"], tps)
	for _, t := range r.stormTargets {
		v := med(r.stormRes[t.name], tps)
		cpu := "–"
		if t.pid != nil {
			cpu = fmt.Sprintf("%.0f µs", med(r.stormRes[t.name], cpuTxn))
		}
		w("| %s | %.0f | %s | %s | %s | %.2f ms | %s |\n", t.name, v, ratio(v, pbS), ratio(v, pbT), ratio(v, dRate), med(r.stormRes[t.name], connTime), cpu)
	}

	w("\n## Cold path\n\nTime from the connection attempt to the first row (`select 1`), %d times each, no TLS. *cold*: a pgwarden just started, so the token check, the Vault JWT login, the creation of the database credential and the upstream SCRAM all happen; *new identity*: a person never seen before on a running pgwarden — in `identity` scope (the default, measured here) that is the same work: the token check, the person's Vault login, their own credential and a new upstream session.\n\n", p.cold)
	w("| connection | median | p99 |\n| --- | ---: | ---: |\n")
	for _, k := range []string{"pgwarden, cold", "pgwarden, new identity", "direct", "pgbouncer"} {
		if xs := r.cold[k]; len(xs) > 0 {
			w("| %s | %.1f ms | %.1f ms |\n", k, median(xs), percentile(xs, 0.99))
		}
	}

	if len(r.vaultCalls) > 0 {
		w("\n## Vault calls per 1,000 connections of one identity\n\nSequential connections (connect, `select 1`, close) of one person, counted from pgwarden's `pgwarden_vault_request_duration_seconds_count` by operation.\n\n")
		w("| tokens | login | creds | revoke | total |\n| --- | ---: | ---: | ---: | ---: |\n")
		for _, how := range []string{"one token", "a token each"} {
			c := r.vaultCalls[how]
			w("| %s | %.0f | %.0f | %.0f | %.0f |\n", how, c["login"], c["creds"], c["revoke"], c["login"]+c["creds"]+c["revoke"])
		}
		w("\nOne token: one login, one credential, shared by the person's connections. A token each: Vault must see every new token once (its login is how Vault decides), while the person's credential is shared by every token that ends about when the login that read it does (within a tenth of its remaining life, at most 5 min).\n")
	}

	w("\n## Memory per idle client\n\nResident memory of the proxy process (`VmRSS`) after opening authenticated clients that then sit idle, minus before, per client held. pgwarden is restarted before each measurement.\n\n")
	w("| clients asked for | target | held | per client | the next client |\n| ---: | --- | ---: | ---: | --- |\n")
	for _, ir := range r.idle {
		next := "–"
		if ir.refusal != "" {
			next = fmt.Sprintf("refused after %s: %s", ir.waited.Round(10*time.Millisecond), ir.refusal)
		}
		w("| %d | %s | %d | %.1f KiB | %s |\n", ir.wanted, ir.target, ir.held, ir.perClient/1024, next)
	}
	w("\npgwarden and pgwarden-tls pool per session (`pool.max_total` %d): a client holds an upstream session from its first message to its end, so clients that logged in and sent nothing hold none, and keep a goroutine each. "+
		"pgwarden-txn and pgwarden-txn-tls are the pgwarden in transaction mode (`pool.max_per_pool` %d): a client holds a server only during a transaction, so idle clients hold none, and an idle client over plain TCP is parked without a goroutine. "+
		"PgBouncer (session mode here) gives a client a server only when it sends a query.\n", poolSize, p.txnPool)

	w("\n## Where pgwarden's CPU goes\n\n")
	for _, pt := range r.profiles {
		w("`go tool pprof -top` of %s's CPU during `pgbench -S -M simple -c %d`:\n\n```\n%s\n```\n\n", pt.target, pt.clients, pt.top)
		w("What it allocated in %d s of the same run (`-sample_index=alloc_space`, the difference of two heap profiles):\n\n```\n%s\n```\n\n", pt.seconds, pt.allocs)
	}
	if len(r.micro) > 0 {
		w("## Go micro-benchmarks\n\n`go test -bench . -benchmem ./proxy ./authn`:\n\n```\n%s\n```\n", strings.Join(r.micro, "\n"))
	}
	if len(r.failures) > 0 {
		w("\n## Runs that failed\n\nRuns that failed, and runs that finished but printed errors. A failed run's cell is the median of the runs that did not fail (or empty).\n\n```\n%s\n```\n", strings.Join(r.failures, "\n"))
	}
	w("\nReproduce with `make bench` (quick) or `make bench BENCH=full`.\n")
	path := filepath.Join(dir, name+".md")
	return path, os.WriteFile(path, []byte(b.String()), 0o644)
}

// chart draws select-only (simple) TPS by client count for each target.
func (r *report) chart(path string) error {
	pl := plot.New()
	pl.Title.Text = "pgbench select-only (simple), TPS by clients"
	pl.X.Label.Text = "clients"
	pl.Y.Label.Text = "transactions per second"
	var lines []any
	for _, t := range r.steadyTargets {
		var pts plotter.XYs
		for _, c := range r.profile.clients {
			pts = append(pts, plotter.XY{X: float64(c), Y: r.cell(selectSimple.name, c, t.name, tps)})
		}
		lines = append(lines, t.name, pts)
	}
	if err := plotutil.AddLinePoints(pl, lines...); err != nil {
		return err
	}
	pl.Legend.Top = false // the lines run high; the bottom right is free
	pl.Legend.Left = false
	pl.Y.Min = 0
	return pl.Save(7*vg.Inch, 4*vg.Inch, path)
}
