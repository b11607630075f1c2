package main

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"
)

// script is one pgbench workload.
type script struct {
	name string
	args []string
}

var (
	selectSimple   = script{"select-only, simple", []string{"-S", "-M", "simple"}}
	selectExtended = script{"select-only, extended", []string{"-S", "-M", "extended"}}
	selectPrepared = script{"select-only, prepared", []string{"-S", "-M", "prepared"}}
	tpcb           = script{"TPC-B-like, simple", []string{"-M", "simple"}}
	allScripts     = []script{selectSimple, selectPrepared, tpcb}
	// txnScripts are the transaction-pooling section's: the three query
	// protocols of pgbench, the last one needing prepared statements to
	// follow a client from server to server.
	txnScripts = []script{selectSimple, selectExtended, selectPrepared}
)

// pgbenchResult is one pgbench run.
type pgbenchResult struct {
	tps         float64
	txns        int64
	failed      int64
	latAvg      float64 // ms
	latP99      float64 // ms, from the sampled transaction log
	cpuPerTxn   float64 // µs of the proxy's CPU (user+system) per transaction; 0 for direct
	cpuUser     float64 // of which user
	connAvg     float64 // ms, average connection time (with -C)
	proxyRSSKiB int64
	sampledTxns int
	clientsSeen int // distinct clients in the transaction log: all that finished a transaction when every one is logged
	// errors counts the errors pgbench printed in a run that finished: it
	// reports a failed Prepare (-M prepared) and goes on with the statement
	// another client's Parse left on the server, exiting 0.
	errors     int
	errorLines []string // the first few
}

var (
	reTPS     = regexp.MustCompile(`(?m)^tps = ([0-9.]+)`)
	reTxns    = regexp.MustCompile(`(?m)^number of transactions actually processed: ([0-9]+)`)
	reFailed  = regexp.MustCompile(`(?m)^number of failed transactions: ([0-9]+)`)
	reLatAvg  = regexp.MustCompile(`(?m)^latency average = ([0-9.]+) ms`)
	reConnAvg = regexp.MustCompile(`(?m)^average connection time = ([0-9.]+) ms`)
)

// runPgbench runs pgbench against t with clients clients for d, plus extra
// arguments (the script, -C), reading the proxy's CPU over the run. It logs
// one transaction in ten, for the p99 latency.
func runPgbench(ctx context.Context, work string, t target, clients int, d time.Duration, extra ...string) (pgbenchResult, error) {
	return runPgbenchSampled(ctx, work, t, clients, d, 0.1, extra...)
}

// runPgbenchSampled is runPgbench logging the fraction sampling of the
// transactions (1: every one, so clientsSeen counts every client answered).
func runPgbenchSampled(ctx context.Context, work string, t target, clients int, d time.Duration, sampling float64, extra ...string) (pgbenchResult, error) {
	logDir, err := os.MkdirTemp(work, "pgbench-log-")
	if err != nil {
		return pgbenchResult{}, err
	}
	defer os.RemoveAll(logDir)
	args := []string{"-n", "-c", strconv.Itoa(clients), "-j", strconv.Itoa(min(2, clients)), "-T", strconv.Itoa(int(d.Seconds())),
		"-l", "--log-prefix", filepath.Join(logDir, "tx")}
	if sampling < 1 {
		args = append(args, "--sampling-rate", strconv.FormatFloat(sampling, 'f', -1, 64))
	}
	args = append(args, "-h", t.host, "-p", t.port, "-U", t.user)
	args = append(append(args, extra...), "app")
	cmd := exec.CommandContext(ctx, "pgbench", args...)
	cmd.Env = append(os.Environ(), "PGSSLMODE="+t.sslmode, "PGPASSWORD="+t.pass, "PGAPPNAME=pgbench")
	var before cpuTimes
	if t.pid != nil {
		if before, err = readCPU(t.pid()); err != nil {
			return pgbenchResult{}, err
		}
	}
	out, err := cmd.CombinedOutput()
	var (
		res  pgbenchResult
		used cpuTimes
	)
	if t.pid != nil {
		after, cerr := readCPU(t.pid())
		if cerr != nil {
			return res, cerr
		}
		used = after.sub(before)
		res.proxyRSSKiB, _ = readRSS(t.pid())
	}
	if err != nil {
		return res, fmt.Errorf("pgbench -c %d %s against %s: %w\n%s", clients, strings.Join(extra, " "), t.name, err, headLines(string(out), 30))
	}
	s := string(out)
	res.tps = parseFloat(reTPS, s)
	res.txns = int64(parseFloat(reTxns, s))
	res.failed = int64(parseFloat(reFailed, s))
	res.latAvg = parseFloat(reLatAvg, s)
	res.connAvg = parseFloat(reConnAvg, s)
	if res.txns == 0 {
		return res, fmt.Errorf("pgbench against %s processed no transaction:\n%s", t.name, headLines(s, 30))
	}
	for _, l := range strings.Split(s, "\n") {
		if strings.HasPrefix(l, "pgbench: error:") {
			res.errors++
			if len(res.errorLines) < 5 {
				res.errorLines = append(res.errorLines, l)
			}
		}
	}
	res.cpuPerTxn = used.total() / float64(res.txns)
	res.cpuUser = used.user / float64(res.txns)
	lats, seen, err := readLatencies(logDir)
	if err != nil {
		return res, err
	}
	res.sampledTxns, res.clientsSeen = len(lats), seen
	res.latP99 = percentile(lats, 0.99)
	return res, nil
}

func parseFloat(re *regexp.Regexp, s string) float64 {
	m := re.FindStringSubmatch(s)
	if m == nil {
		return 0
	}
	v, _ := strconv.ParseFloat(m[1], 64)
	return v
}

// readLatencies reads pgbench's per-transaction logs (client, transaction,
// latency in µs, …) and returns the latencies in ms and how many distinct
// clients the logs name.
func readLatencies(dir string) ([]float64, int, error) {
	files, err := filepath.Glob(filepath.Join(dir, "tx*"))
	if err != nil {
		return nil, 0, err
	}
	var out []float64
	clients := map[string]bool{}
	for _, f := range files {
		fh, err := os.Open(f)
		if err != nil {
			return nil, 0, err
		}
		sc := bufio.NewScanner(fh)
		for sc.Scan() {
			fields := strings.Fields(sc.Text())
			if len(fields) < 3 {
				continue
			}
			if us, err := strconv.ParseFloat(fields[2], 64); err == nil {
				out = append(out, us/1000)
				clients[fields[0]] = true
			}
		}
		fh.Close()
	}
	return out, len(clients), nil
}

// headLines is the first n lines of s: a thousand clients refused say so a
// thousand times.
func headLines(s string, n int) string {
	lines := strings.SplitAfter(s, "\n")
	if len(lines) <= n {
		return s
	}
	return strings.Join(lines[:n], "") + fmt.Sprintf("… (%d more lines)\n", len(lines)-n)
}

// failReason is the line of a failed run's output that says why, short
// enough for a table cell.
func failReason(err error) string {
	lines := strings.Split(err.Error(), "\n")
	reason := lines[0]
	// The line that aborted a client, else the first error: pgbench goes on
	// after some ("already exists" from a Prepare).
	pick := func(match func(string) bool) bool {
		for _, l := range lines[1:] {
			if match(l) {
				reason = strings.TrimSpace(l)
				if _, after, ok := strings.Cut(reason, "ERROR:  "); ok {
					reason = "ERROR: " + after
				} else if _, after, ok := strings.Cut(reason, "FATAL:  "); ok {
					reason = "FATAL: " + after
				}
				return true
			}
		}
		return false
	}
	_ = pick(func(l string) bool { return strings.Contains(l, "aborted in command") }) ||
		pick(func(l string) bool {
			return strings.Contains(l, "ERROR:") || strings.Contains(l, "FATAL:") || strings.Contains(l, "error:")
		})
	if r := []rune(reason); len(r) > 140 {
		reason = string(r[:140]) + "…"
	}
	return strings.ReplaceAll(reason, "|", "\\|")
}

// percentile is the q-th quantile of xs (nearest rank), 0 for none.
func percentile(xs []float64, q float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	i := int(q*float64(len(s))+0.5) - 1
	return s[min(max(i, 0), len(s)-1)]
}

func median(xs []float64) float64 { return percentile(xs, 0.5) }
