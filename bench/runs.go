package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgwarden/pgwarden/testenv"
)

type cellKey struct {
	script  string
	clients int
	target  string
}

// steady runs every script at every client count against every target,
// interleaved, reps times.
func (r *report) steady(ctx context.Context, e *env) error {
	p := r.profile
	r.steadyTargets = []target{e.direct(), e.pgbouncer(), e.pgwarden(false), e.pgwarden(true)}
	r.steadyRes = map[cellKey][]pgbenchResult{}
	total := p.reps * len(p.scripts) * len(p.clients) * len(r.steadyTargets)
	n := 0
	for rep := 1; rep <= p.reps; rep++ {
		for _, s := range p.scripts {
			for _, c := range p.clients {
				for _, t := range r.steadyTargets {
					res, err := runPgbench(ctx, e.work, t, c, p.duration, s.args...)
					n++
					if err != nil {
						if ctx.Err() != nil {
							return err
						}
						r.failedRun(err)
						continue
					}
					r.noteErrors(t, c, s.args, res)
					k := cellKey{s.name, c, t.name}
					r.steadyRes[k] = append(r.steadyRes[k], res)
					logf("[%d/%d] %s, %d clients, %s: %.0f tps, p99 %.2f ms", n, total, s.name, c, t.name, res.tps, res.latP99)
				}
			}
		}
	}
	return nil
}

// failedRun records a pgbench run that failed, for the report, so that one
// aborted client does not lose a whole run's figures.
func (r *report) failedRun(err error) {
	logf("run failed (reported, going on): %v", err)
	r.failures = append(r.failures, err.Error())
}

// noteErrors records, for the report, the errors pgbench printed in a run
// that nonetheless finished.
func (r *report) noteErrors(t target, clients int, args []string, res pgbenchResult) {
	if res.errors == 0 {
		return
	}
	logf("pgbench -c %d %s against %s finished with %d errors", clients, strings.Join(args, " "), t.name, res.errors)
	r.failures = append(r.failures, fmt.Sprintf("pgbench -c %d %s against %s finished (exit status 0) but printed %d errors, the first:\n%s",
		clients, strings.Join(args, " "), t.name, res.errors, strings.Join(res.errorLines, "\n")))
}

// stormRun opens a new connection per transaction (pgbench -C -S) against
// PostgreSQL, PgBouncer (SCRAM and trust) and pgwarden with its caches warm.
func (r *report) stormRun(ctx context.Context, e *env) error {
	p := r.profile
	r.stormTargets = []target{e.direct(), e.pgbouncer(), e.pgbouncerTrust(), e.pgwarden(false)}
	r.stormRes = map[string][]pgbenchResult{}
	// Warm pgwarden's token and credential caches.
	if _, err := runPgbench(ctx, e.work, e.pgwarden(false), 1, time.Second, "-S", "-C"); err != nil {
		return err
	}
	for rep := 1; rep <= p.reps; rep++ {
		for _, t := range r.stormTargets {
			res, err := runPgbench(ctx, e.work, t, p.stormConns, p.storm, "-S", "-M", "simple", "-C")
			if err != nil {
				if ctx.Err() != nil {
					return err
				}
				r.failedRun(err)
				continue
			}
			r.stormRes[t.name] = append(r.stormRes[t.name], res)
			logf("storm %s: %.0f connections/s", t.name, res.tps)
		}
	}
	return nil
}

// firstRow connects as t and reads one row, returning the time from the
// connection attempt to the row.
func firstRow(ctx context.Context, t target) (time.Duration, error) {
	ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	start := time.Now()
	c, err := pgconn.Connect(ctx, fmt.Sprintf("host=%s port=%s user=%s password=%s dbname=app sslmode=%s",
		t.host, t.port, t.user, t.pass, t.sslmode))
	if err != nil {
		return 0, err
	}
	defer c.Close(context.Background())
	if _, err := c.Exec(ctx, "select 1").ReadAll(); err != nil {
		return 0, err
	}
	return time.Since(start), nil
}

// coldRun measures connect-to-first-row for an identity's first connection:
// cold (a pgwarden just started, so the token check, the Vault login, the
// credential's creation and the upstream SCRAM all happen), and warm (a new
// identity on a running pgwarden: token check and Vault login, a pooled
// session). PostgreSQL and PgBouncer are measured the same way for scale.
func (r *report) coldRun(ctx context.Context, e *env) error {
	p := r.profile
	r.cold = map[string][]float64{}
	for i := range p.cold {
		if err := e.pgw.restart(ctx); err != nil {
			return err
		}
		t := e.pgwarden(false)
		var err error
		if t.pass, err = e.stack.Issuer.Mint(testenv.Claims{Subject: fmt.Sprintf("cold-%d", i), Groups: []string{"engineer"}, TTL: time.Hour}); err != nil {
			return err
		}
		d, err := firstRow(ctx, t)
		if err != nil {
			return fmt.Errorf("cold start %d: %w", i, err)
		}
		r.cold["pgwarden, cold"] = append(r.cold["pgwarden, cold"], ms(d))
	}
	logf("cold starts: median %.1f ms", median(r.cold["pgwarden, cold"]))
	for i := range p.cold {
		t := e.pgwarden(false)
		var err error
		if t.pass, err = e.stack.Issuer.Mint(testenv.Claims{Subject: fmt.Sprintf("warm-%d", i), Groups: []string{"engineer"}, TTL: time.Hour}); err != nil {
			return err
		}
		d, err := firstRow(ctx, t)
		if err != nil {
			return fmt.Errorf("new identity %d: %w", i, err)
		}
		r.cold["pgwarden, new identity"] = append(r.cold["pgwarden, new identity"], ms(d))
		for _, o := range []target{e.direct(), e.pgbouncer()} {
			if d, err = firstRow(ctx, o); err != nil {
				return err
			}
			r.cold[o.name] = append(r.cold[o.name], ms(d))
		}
	}
	return nil
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// vaultRun counts the Vault calls pgwarden makes for 1,000 connections of
// one identity, sequential: with one token (an application's pool), and
// with a fresh token each time (a client that fetches one per connection).
func (r *report) vaultRun(ctx context.Context, e *env) error {
	const conns = 1000
	r.vaultCalls = map[string]map[string]float64{}
	for _, how := range []string{"one token", "a token each"} {
		before, err := vaultCalls(ctx, e.pgw.metrics)
		if err != nil {
			return err
		}
		t := e.pgwarden(false)
		sub := "calls-" + strings.ReplaceAll(how, " ", "-")
		for i := range conns {
			if i == 0 || how == "a token each" {
				if t.pass, err = e.stack.Issuer.Mint(testenv.Claims{Subject: sub, Groups: []string{"engineer"}, TTL: time.Hour, Extra: map[string]any{"n": i}}); err != nil {
					return err
				}
			}
			if _, err := firstRow(ctx, t); err != nil {
				return fmt.Errorf("vault calls, %s, connection %d: %w", how, i, err)
			}
		}
		after, err := vaultCalls(ctx, e.pgw.metrics)
		if err != nil {
			return err
		}
		r.vaultCalls[how] = map[string]float64{}
		for op, n := range after {
			r.vaultCalls[how][op] = n - before[op]
		}
		logf("vault calls for %d connections of one identity, %s: %v", conns, how, r.vaultCalls[how])
	}
	return nil
}

// vaultCalls reads pgwarden's Vault call counts by operation from its
// metrics endpoint.
func vaultCalls(ctx context.Context, addr string) (map[string]float64, error) {
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+"/metrics", nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	const prefix = `pgwarden_vault_request_duration_seconds_count{op="`
	out := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, prefix) {
			continue
		}
		op, rest, ok := strings.Cut(line[len(prefix):], `"} `)
		if !ok {
			continue
		}
		n, err := strconv.ParseFloat(rest, 64)
		if err != nil {
			return nil, fmt.Errorf("metrics line %q: %w", line, err)
		}
		out[op] = n
	}
	return out, sc.Err()
}

// idleResult is one idle-memory measurement.
type idleResult struct {
	target    string
	wanted    int
	held      int
	perClient float64 // bytes of resident memory per held client
	refusal   string  // what the first client that could not be held got
	waited    time.Duration
}

// idleRun opens many authenticated clients that then sit idle, and reads the
// proxy's resident memory before and after. pgwarden is restarted before
// each measurement so earlier runs' heap does not count. pgwarden-txn is the
// pgwarden in transaction mode, where an idle client holds no server.
func (r *report) idleRun(ctx context.Context, e *env) error {
	for _, n := range r.profile.idle {
		for _, name := range []string{"pgwarden", "pgwarden-tls", "pgwarden-txn", "pgwarden-txn-tls", "pgbouncer"} {
			var t target
			switch name {
			case "pgbouncer":
				t = e.pgbouncer()
			default:
				w, tls := e.pgw, strings.HasSuffix(name, "-tls")
				t = e.pgwarden(tls)
				if strings.HasPrefix(name, "pgwarden-txn") {
					w, t = e.pgwTxn, e.pgwardenTxn(tls)
				}
				if err := w.restart(ctx); err != nil {
					return err
				}
				// One client first, so the credential and the first session
				// (and the baseline heap) exist before the count starts.
				if _, err := firstRow(ctx, t); err != nil {
					if ctx.Err() != nil {
						return err
					}
					r.failedRun(fmt.Errorf("idle %s, %d clients: the first client: %w", name, n, err))
					continue
				}
			}
			res, err := holdIdle(ctx, t, n)
			if err != nil {
				return err
			}
			r.idle = append(r.idle, res)
			logf("idle %s, %d clients: held %d, %.1f KiB each%s", name, n, res.held, res.perClient/1024, cond(res.refusal != "", "; next refused: "+res.refusal, ""))
		}
	}
	return nil
}

func cond[T any](c bool, a, b T) T {
	if c {
		return a
	}
	return b
}

// holdIdle opens n clients to t (16 at a time), stopping at the first one
// refused, and measures t's resident memory per client held.
func holdIdle(ctx context.Context, t target, n int) (idleResult, error) {
	res := idleResult{target: t.name, wanted: n}
	time.Sleep(500 * time.Millisecond)
	before, err := readRSS(t.pid())
	if err != nil {
		return res, err
	}
	conn := fmt.Sprintf("host=%s port=%s user=%s password=%s dbname=app sslmode=%s", t.host, t.port, t.user, t.pass, t.sslmode)
	var (
		mu       sync.Mutex
		conns    []*pgconn.PgConn
		refusal  error
		waited   time.Duration
		next     = make(chan struct{})
		wg       sync.WaitGroup
		stopOnce sync.Once
		stopped  = make(chan struct{})
	)
	go func() {
		defer close(next)
		for range n {
			select {
			case next <- struct{}{}:
			case <-stopped:
				return
			}
		}
	}()
	for range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range next {
				cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
				start := time.Now()
				c, err := pgconn.Connect(cctx, conn)
				cancel()
				mu.Lock()
				if err != nil {
					if refusal == nil {
						refusal, waited = err, time.Since(start)
					}
					mu.Unlock()
					stopOnce.Do(func() { close(stopped) })
					continue
				}
				conns = append(conns, c)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	defer func() {
		for _, c := range conns {
			c.Close(context.Background())
		}
	}()
	time.Sleep(time.Second)
	after, err := readRSS(t.pid())
	if err != nil {
		return res, err
	}
	res.held = len(conns)
	if res.held > 0 {
		res.perClient = float64(after-before) * 1024 / float64(res.held)
	}
	if refusal != nil {
		var pe *pgconn.PgError
		if errors.As(refusal, &pe) {
			res.refusal = fmt.Sprintf("%s %s", pe.Code, pe.Message)
		} else {
			res.refusal = refusal.Error()
		}
		res.waited = waited
	}
	return res, nil
}

// profileRun takes a CPU profile of pgwarden, and the allocations it makes,
// while pgbench -S runs through it, and keeps pprof's top functions for the
// report.
func (r *report) profileRun(ctx context.Context, e *env) error {
	p := r.profile
	clients := []int{8, 32}
	if p.name == "smoke" {
		clients = clients[:1]
	}
	for _, c := range clients {
		if err := r.profileOne(ctx, e.pgwarden(false), e.pgw, c); err != nil {
			return err
		}
	}
	// Transaction mode, many clients over few servers.
	c := p.txnClients[len(p.txnClients)-1]
	return r.profileOne(ctx, e.pgwardenTxn(false), e.pgwTxn, c)
}

// profileOne captures pgwarden's CPU and allocation profiles under
// pgbench -S -M simple -c c against t.
func (r *report) profileOne(ctx context.Context, t target, w *pgwardenProc, c int) error {
	p := r.profile
	secs := int(p.cpuProfile.Seconds())
	done := make(chan error, 1)
	go func() {
		_, err := runPgbench(ctx, w.dir, t, c, 2*p.cpuProfile+3*time.Second, "-S", "-M", "simple")
		done <- err
	}()
	time.Sleep(time.Second)
	base := fmt.Sprintf("http://%s/debug/pprof/", w.metrics)
	cpu := filepath.Join(w.dir, fmt.Sprintf("cpu-%s-%d.pprof", t.name, c))
	a0, a1 := filepath.Join(w.dir, fmt.Sprintf("allocs0-%s-%d.pprof", t.name, c)), filepath.Join(w.dir, fmt.Sprintf("allocs1-%s-%d.pprof", t.name, c))
	if err := fetch(ctx, base+fmt.Sprintf("profile?seconds=%d", secs), cpu); err != nil {
		return err
	}
	if err := fetch(ctx, base+"allocs", a0); err != nil {
		return err
	}
	time.Sleep(p.cpuProfile)
	if err := fetch(ctx, base+"allocs", a1); err != nil {
		return err
	}
	if err := <-done; err != nil {
		return err
	}
	top, err := pprofTop(ctx, w.bin, "-top", "-nodecount=25", cpu)
	if err != nil {
		return err
	}
	allocs, err := pprofTop(ctx, w.bin, "-sample_index=alloc_space", "-top", "-nodecount=15", "-diff_base="+a0, a1)
	if err != nil {
		return err
	}
	logf("profile of %s at %d clients: %s", t.name, c, cpu)
	r.profiles = append(r.profiles, profileTop{target: t.name, clients: c, top: top, allocs: allocs, seconds: secs})
	return nil
}

func pprofTop(ctx context.Context, bin string, args ...string) (string, error) {
	args = append([]string{"tool", "pprof"}, args...)
	args = append(args[:len(args)-1], bin, args[len(args)-1])
	out, err := exec.CommandContext(ctx, "go", args...).CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("go tool pprof: %w\n%s", err, out)
	}
	return trimPprof(string(out)), nil
}

type profileTop struct {
	target      string
	clients     int
	top, allocs string
	seconds     int // length of the allocation window
}

// trimPprof drops pprof's header lines before the table.
func trimPprof(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	for i, l := range lines {
		if strings.Contains(l, "flat%") {
			return strings.Join(lines[max(i-1, 0):], "\n")
		}
	}
	return s
}

func fetch(ctx context.Context, url, path string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = io.Copy(f, resp.Body)
	return err
}

// microRun runs the Go micro-benchmarks of the relay and the auth path.
func (r *report) microRun(ctx context.Context, root string) {
	logf("Go micro-benchmarks…")
	cmd := exec.CommandContext(ctx, "go", "test", "-run", "^$", "-bench", ".", "-benchmem", "-count", "1", "./proxy", "./authn")
	cmd.Dir = root
	out, err := cmd.CombinedOutput()
	for _, l := range strings.Split(string(out), "\n") {
		if strings.HasPrefix(l, "Benchmark") {
			r.micro = append(r.micro, l)
		}
	}
	if err != nil {
		r.micro = append(r.micro, "go test -bench failed: "+err.Error())
	}
}

// relayAllocs is the most allocs/op of the relay's micro-benchmarks
// (BenchmarkCopyFrame, BenchmarkRelayOverSockets), or -1 when none ran.
func (r *report) relayAllocs() int {
	most := -1
	for _, l := range r.micro {
		if !strings.HasPrefix(l, "BenchmarkCopyFrame") && !strings.HasPrefix(l, "BenchmarkRelayOverSockets") {
			continue
		}
		f := strings.Fields(l)
		for i := 1; i < len(f); i++ {
			if f[i] == "allocs/op" {
				n, _ := strconv.Atoi(f[i-1])
				most = max(most, n)
			}
		}
	}
	return most
}
