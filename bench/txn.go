package main

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/pgwarden/pgwarden/testenv"
)

// Transaction pooling: pgwarden with pool_mode transaction beside PgBouncer
// in transaction mode and direct PostgreSQL (each client its own backend).
// The proxies get p.txnPool servers for up to 64 clients, so they only keep
// up if a client holds a server for a transaction, not a session.

// txnRun runs every query protocol (txnScripts) at every p.txnClients against
// direct, pgbouncer-txn and pgwarden-txn, interleaved, p.reps times. A run
// that fails is recorded with its reason: PgBouncer before 1.21 cannot run
// -M prepared in transaction mode, and a pgwarden that pins a server per
// client refuses the clients past its pool.
func (r *report) txnRun(ctx context.Context, e *env) error {
	p := r.profile
	if len(p.txnClients) == 0 {
		return nil
	}
	r.txnTargets = []target{e.direct(), e.pgbouncerTxn(), e.pgwardenTxn(false)}
	r.txnRes, r.txnErr = map[cellKey][]pgbenchResult{}, map[cellKey][]string{}
	// The credential first, as the session-mode pgwarden has from earlier
	// runs; pgbench's TPS leaves out connecting anyway.
	if _, err := firstRow(ctx, e.pgwardenTxn(false)); err != nil {
		if ctx.Err() != nil {
			return err
		}
		r.failedRun(fmt.Errorf("pgwarden-txn, first connection: %w", err))
	}
	total := p.reps * len(txnScripts) * len(p.txnClients) * len(r.txnTargets)
	n := 0
	for rep := 1; rep <= p.reps; rep++ {
		for _, s := range txnScripts {
			for _, c := range p.txnClients {
				for _, t := range r.txnTargets {
					res, err := runPgbench(ctx, e.work, t, c, p.duration, s.args...)
					n++
					k := cellKey{s.name, c, t.name}
					if err != nil {
						if ctx.Err() != nil {
							return err
						}
						r.failedRun(err)
						r.txnErr[k] = append(r.txnErr[k], failReason(err))
						continue
					}
					r.noteErrors(t, c, s.args, res)
					r.txnRes[k] = append(r.txnRes[k], res)
					logf("[%d/%d] transaction mode, %s, %d clients, %s: %.0f tps, p99 %.2f ms", n, total, s.name, c, t.name, res.tps, res.latP99)
				}
			}
		}
	}
	return nil
}

// manyResult is one run of many clients over a few servers.
type manyResult struct {
	target  string
	clients int
	res     pgbenchResult
	reason  string // why the run failed; empty when pgbench finished
}

// answered says whether every client finished transactions and none failed.
func (m manyResult) answered() bool {
	return m.reason == "" && m.res.failed == 0 && m.res.errors == 0 && m.res.clientsSeen == m.clients
}

// manyRun runs pgbench -S with p.many clients for p.duration against
// pgwarden-txn with pool.max_per_pool p.manyPool, every transaction logged,
// so that the report can say whether each client was answered; and against
// a PgBouncer in transaction mode with the same pool for scale (auth_type
// trust, so that its thousand logins take no time: pgbench's TPS leaves out
// connecting).
func (r *report) manyRun(ctx context.Context, e *env) error {
	p := r.profile
	if p.many == 0 {
		return nil
	}
	prev := e.pgwTxn.cfg.Pool.MaxPerPool
	e.pgwTxn.cfg.Pool.MaxPerPool = p.manyPool
	e.pgwTxn.cfg.Pool.MaxTotal = max(e.pgwTxn.cfg.Pool.MaxTotal, p.manyPool)
	defer func() { e.pgwTxn.cfg.Pool.MaxPerPool = prev }() // for a later restart; nothing after this uses it
	if err := e.pgwTxn.restart(ctx); err != nil {
		return err
	}
	b, err := testenv.StartPgBouncer(ctx, testenv.PgBouncerOptions{PG: e.stack.PG, Users: map[string]string{benchUser: benchPassword},
		AuthType: "trust", PoolMode: "transaction", PoolSize: p.manyPool, MaxClientConn: p.many + 100})
	if err != nil {
		return err
	}
	defer b.Close()
	ref := target{name: "pgbouncer-txn (trust)", host: "127.0.0.1", port: strconv.Itoa(b.Port), user: benchUser, sslmode: "disable", pid: b.Pid}
	for _, t := range []target{e.pgwardenTxn(false), ref} {
		if t.name == "pgwarden-txn" {
			if _, err := firstRow(ctx, t); err != nil && ctx.Err() != nil {
				return err
			}
		}
		start := time.Now()
		res, err := runPgbenchSampled(ctx, e.work, t, p.many, p.duration, 1, "-S", "-M", "simple")
		m := manyResult{target: t.name, clients: p.many, res: res}
		if err != nil {
			if ctx.Err() != nil {
				return err
			}
			r.failedRun(err)
			m.reason = failReason(err)
		}
		r.noteErrors(t, p.many, []string{"-S", "-M", "simple"}, res)
		r.many = append(r.many, m)
		logf("%d clients over %d servers, %s: %.0f tps, %d failed, %d clients answered, took %s%s", p.many, p.manyPool, t.name,
			res.tps, res.failed, res.clientsSeen, time.Since(start).Round(100*time.Millisecond), cond(m.reason != "", "; failed: "+m.reason, ""))
	}
	return nil
}

// txnCell is a transaction-mode cell: its median TPS and whether any run of
// it finished; text is the TPS as the report shows it, with what went wrong
// beside it, or why no run finished.
func (r *report) txnCell(s script, c int, target string) (v float64, ok bool, text string) {
	k := cellKey{s.name, c, target}
	rs, errs := r.txnRes[k], r.txnErr[k]
	if len(rs) == 0 {
		if len(errs) == 0 {
			return 0, false, "–"
		}
		return 0, false, r.failText(k, errs[0])
	}
	v = med(rs, tps)
	text = fmt.Sprintf("%.0f", v)
	if f := r.txnFailedTxns(k); f > 0 {
		text += fmt.Sprintf(" (%d failed transactions)", f)
	}
	if n, first := txnErrors(rs); n > 0 {
		label := r.bouncerLabel(k)
		if label == "" {
			label = "fails"
		}
		text += fmt.Sprintf(", %s: %d pgbench errors, the first %s", label, n, first)
	}
	if len(errs) > 0 {
		text += fmt.Sprintf(" (%d of %d runs failed: %s)", len(errs), len(errs)+len(rs), errs[0])
	}
	return v, true, text
}

// txnErrors is how many errors pgbench printed in runs that finished, and
// the first, shortened.
func txnErrors(rs []pgbenchResult) (int, string) {
	n, first := 0, ""
	for _, res := range rs {
		n += res.errors
		if first == "" && len(res.errorLines) > 0 {
			first = failReason(errors.New("\n" + res.errorLines[0]))
		}
	}
	return n, first
}

// txnClean says whether a cell has runs and none failed, printed an error or
// had a failed transaction.
func (r *report) txnClean(s script, c int, target string) bool {
	k := cellKey{s.name, c, target}
	n, _ := txnErrors(r.txnRes[k])
	return len(r.txnRes[k]) > 0 && len(r.txnErr[k]) == 0 && n == 0 && r.txnFailedTxns(k) == 0
}

func (r *report) txnFailedTxns(k cellKey) int64 {
	var n int64
	for _, res := range r.txnRes[k] {
		n += res.failed
	}
	return n
}

// failText says why a cell fails. PgBouncer before 1.21 keeps no prepared
// statements in transaction mode: a client's next transaction lands on a
// server that never saw its Parse ("does not exist"), or its Parse on one
// that another client's left there ("already exists").
func (r *report) failText(k cellKey, reason string) string {
	if l := r.bouncerLabel(k); l != "" {
		return l
	}
	return "fails (" + reason + ")"
}

// bouncerLabel is why PgBouncer fails a -M prepared cell, when its version
// explains it; "" otherwise.
func (r *report) bouncerLabel(k cellKey) string {
	if k.target == "pgbouncer-txn" && k.script == selectPrepared.name {
		if v, ok := bouncerBefore(r.machine.bouncer, 1, 21); ok && v {
			return fmt.Sprintf("fails (%s has no prepared statements in transaction mode)", majorMinor(r.machine.bouncer))
		}
	}
	return ""
}

// bouncerBefore says whether PgBouncer version v ("1.18.0") is older than
// major.minor; ok is false when v does not parse.
func bouncerBefore(v string, major, minor int) (before, ok bool) {
	f := strings.Split(majorMinor(v), ".")
	if len(f) != 2 {
		return false, false
	}
	ma, err1 := strconv.Atoi(f[0])
	mi, err2 := strconv.Atoi(f[1])
	if err1 != nil || err2 != nil {
		return false, false
	}
	return ma < major || ma == major && mi < minor, true
}

func majorMinor(v string) string {
	f := strings.SplitN(strings.TrimSpace(v), ".", 3)
	if len(f) < 2 {
		return v
	}
	return f[0] + "." + f[1]
}

// txnRatio is a/b when both cells have figures.
func txnRatio(a float64, aok bool, b float64, bok bool) string {
	if !aok || !bok || b == 0 {
		return "–"
	}
	return ratio(a, b)
}

// txnChecks are the transaction-mode targets: at the most clients, TPS at
// least direct's; at every client count at least 1.05× PgBouncer's in
// transaction mode; -M prepared without an error; idle clients in at most
// 8 KiB each; many clients over a pool of manyPool all answered.
func (r *report) txnChecks() []check {
	var out []check
	p := r.profile
	if len(p.txnClients) > 0 && (len(r.txnRes) > 0 || len(r.txnErr) > 0) {
		top := p.txnClients[len(p.txnClients)-1]
		for _, s := range txnScripts {
			pw, pok, ptext := r.txnCell(s, top, "pgwarden-txn")
			d, dok, dtext := r.txnCell(s, top, "direct")
			measured := txnRatio(pw, pok, d, dok)
			why := fmt.Sprintf("%d clients share %d servers and every transaction crosses the proxy (%.1f µs of its CPU per transaction, taken from PostgreSQL on these cores)",
				top, p.txnPool, r.txnMed(s, top, "pgwarden-txn", cpuTxn))
			clean := r.txnClean(s, top, "pgwarden-txn")
			switch {
			case !clean:
				measured, why = cond(pok, measured+": ", "")+"pgwarden-txn "+ptext, "pgbench failed or printed errors against pgwarden-txn: see Runs that failed"
			case !dok:
				measured, why = "direct "+dtext, "pgbench failed against PostgreSQL itself: see Runs that failed"
			}
			out = append(out, check{fmt.Sprintf("transaction mode, %s, %d clients: TPS ≥ 1.0× direct", s.name, top), measured, clean && dok && pw >= d, why})
		}
		for _, s := range txnScripts {
			for _, c := range p.txnClients {
				pw, pok, ptext := r.txnCell(s, c, "pgwarden-txn")
				pb, bok, btext := r.txnCell(s, c, "pgbouncer-txn")
				if s.name == selectPrepared.name && !r.txnClean(s, c, "pgbouncer-txn") {
					continue // PgBouncer cannot: the prepared check below is pgwarden's own
				}
				measured := txnRatio(pw, pok, pb, bok)
				why := fmt.Sprintf("proxy CPU per transaction %.1f µs vs PgBouncer's %.1f µs, taken from PostgreSQL on these cores",
					r.txnMed(s, c, "pgwarden-txn", cpuTxn), r.txnMed(s, c, "pgbouncer-txn", cpuTxn))
				clean := r.txnClean(s, c, "pgwarden-txn")
				met := clean && bok && pw >= 1.05*pb
				switch {
				case !clean:
					measured, why = cond(pok, measured+": ", "")+"pgwarden-txn "+ptext, "pgbench failed or printed errors against pgwarden-txn: see Runs that failed"
				case !bok:
					measured, met = "PgBouncer "+btext, true
				}
				out = append(out, check{fmt.Sprintf("transaction mode, %s, %d clients: TPS ≥ 1.05× PgBouncer in transaction mode", s.name, c), measured, met, why})
			}
		}
		runs, fails, errs, failedTxns := 0, 0, 0, int64(0)
		first := ""
		for _, c := range p.txnClients {
			k := cellKey{selectPrepared.name, c, "pgwarden-txn"}
			runs += len(r.txnRes[k]) + len(r.txnErr[k])
			fails += len(r.txnErr[k])
			failedTxns += r.txnFailedTxns(k)
			n, e := txnErrors(r.txnRes[k])
			errs += n
			if first == "" && len(r.txnErr[k]) > 0 {
				first = fmt.Sprintf("%d clients: %s", c, r.txnErr[k][0])
			} else if first == "" && n > 0 {
				first = fmt.Sprintf("%d clients: %s", c, e)
			}
		}
		measured := fmt.Sprintf("%d of %d runs completed, %d errors, %d failed transactions", runs-fails, runs, errs, failedTxns)
		out = append(out, check{"transaction mode: pgbench -M prepared completes with no errors", measured, runs > 0 && fails == 0 && errs == 0 && failedTxns == 0,
			cond(first != "", first, "transactions failed: see the tables of Transaction pooling")})
	}
	if n := maxIdle(p); n > 0 {
		for _, ir := range r.idle {
			if ir.target == "pgwarden-txn" && ir.wanted == n {
				m := fmt.Sprintf("%.1f KiB per client at %d held", ir.perClient/1024, ir.held)
				why := "see the heap profile of idle clients"
				if ir.held < n {
					m += fmt.Sprintf(" (cannot hold %d: at most %d)", n, ir.held)
					why = "the next client was refused: " + strings.ReplaceAll(ir.refusal, "|", `\|`)
				}
				out = append(out, check{fmt.Sprintf("transaction mode: ≤ 8 KiB per idle client at %d clients (no TLS)", n), m, ir.held == n && ir.perClient <= 8*1024, why})
			}
		}
	}
	for _, m := range r.many {
		if m.target != "pgwarden-txn" {
			continue
		}
		measured := fmt.Sprintf("%d of %d clients answered, %d failed transactions, %.0f TPS", m.res.clientsSeen, m.clients, m.res.failed, m.res.tps)
		why := "some clients finished no transaction in the run"
		switch {
		case m.reason != "":
			measured, why = "fails ("+m.reason+")", "pgbench failed: see Runs that failed"
		case m.res.errors > 0:
			measured += fmt.Sprintf(", %d errors", m.res.errors)
			why = "pgbench printed errors: see Runs that failed"
		case m.res.failed > 0:
			why = "transactions failed"
		}
		out = append(out, check{fmt.Sprintf("%d clients over %d servers in transaction mode: every client answered, no failed transaction", m.clients, p.manyPool),
			measured, m.answered(), why})
	}
	return out
}

// txnMed is the median of f over a transaction-mode cell's runs.
func (r *report) txnMed(s script, c int, target string, f func(pgbenchResult) float64) float64 {
	return med(r.txnRes[cellKey{s.name, c, target}], f)
}

// writeTxn writes the transaction-pooling section.
func (r *report) writeTxn(w func(string, ...any)) {
	p := r.profile
	if len(p.txnClients) == 0 {
		return
	}
	w("## Transaction pooling\n\n")
	w("`pgbench -S` (select-only) with each query protocol (`-M simple`, `extended`, `prepared`), %s per run, %d repetition(s), medians shown. "+
		"**direct**: PostgreSQL itself, every client its own backend. **pgbouncer-txn**: PgBouncer %s, `pool_mode = transaction`, `default_pool_size = %d` (SCRAM). "+
		"**pgwarden-txn**: a second pgwarden process whose database is in `pool_mode: transaction`, `pool.max_per_pool` %d, the same writer token. "+
		"Both proxies serve every client count with %d servers: a client must give its server back when its transaction ends for the others to get one. "+
		"With `-M prepared` each client prepares its statement once and then only binds it, so the proxy must make the statement exist on whichever server the next transaction lands on.\n\n",
		p.duration, p.reps, r.machine.bouncer, p.txnPool, p.txnPool, p.txnPool)
	for _, s := range txnScripts {
		w("### Transaction mode, %s\n\n", s.name)
		w("| clients | direct TPS | PgBouncer TPS | pgwarden TPS | pgwarden ×direct | pgwarden ×PgBouncer | p99 ms: direct / PgBouncer / pgwarden | proxy CPU per transaction: pgwarden / PgBouncer |\n")
		w("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n")
		for _, c := range p.txnClients {
			d, dok, dt := r.txnCell(s, c, "direct")
			b, bok, bt := r.txnCell(s, c, "pgbouncer-txn")
			pw, pok, pt := r.txnCell(s, c, "pgwarden-txn")
			p99 := func(t string, ok bool) string {
				if !ok {
					return "–"
				}
				return fmt.Sprintf("%.2f", r.txnMed(s, c, t, latP99))
			}
			cpu := func(t string, ok bool) string {
				if !ok {
					return "–"
				}
				return fmt.Sprintf("%.1f µs", r.txnMed(s, c, t, cpuTxn))
			}
			w("| %d | %s | %s | %s | %s | %s | %s / %s / %s | %s / %s |\n", c, dt, bt, pt,
				txnRatio(pw, pok, d, dok), txnRatio(pw, pok, b, bok),
				p99("direct", dok), p99("pgbouncer-txn", bok), p99("pgwarden-txn", pok), cpu("pgwarden-txn", pok), cpu("pgbouncer-txn", bok))
		}
		w("\n")
	}
	w("*fails* alone: no run of the cell finished. *fails* beside a figure: pgbench finished but printed errors — it reports a failed Prepare and goes on, " +
		"and since all its clients prepare the same text under the same name, a client whose Parse was refused (\"already exists\") runs the statement another client left on the server. " +
		"The pgbench output of both is under [Runs that failed](#runs-that-failed). " +
		"Idle memory in transaction mode is under [Memory per idle client](#memory-per-idle-client) (rows pgwarden-txn, pgwarden-txn-tls).\n\n")
	if len(r.many) > 0 {
		w("### %d clients over a pool of %d servers\n\n", p.many, p.manyPool)
		w("`pgbench -S -M simple -c %d -j 2`, %s, every transaction logged: pgwarden-txn with `pool.max_per_pool` %d, and for scale PgBouncer in transaction mode with `default_pool_size = %d` "+
			"(`auth_type = trust`, so that its logins take no time; pgbench's TPS leaves out connecting). *Answered*: clients that finished at least one transaction.\n\n",
			p.many, p.duration, p.manyPool, p.manyPool)
		w("| target | TPS | answered | failed transactions | latency average / p99 | proxy CPU per transaction | result |\n| --- | ---: | ---: | ---: | ---: | ---: | --- |\n")
		for _, m := range r.many {
			if m.reason != "" {
				w("| %s | – | – | – | – | – | fails (%s) |\n", m.target, m.reason)
				continue
			}
			result := cond(m.answered(), "every client answered", "**not every client answered**")
			if m.res.errors > 0 {
				result = fmt.Sprintf("**%d pgbench errors**: see Runs that failed", m.res.errors)
			}
			w("| %s | %.0f | %d of %d | %d | %.2f / %.2f ms | %.1f µs | %s |\n", m.target, m.res.tps, m.res.clientsSeen, m.clients, m.res.failed,
				m.res.latAvg, m.res.latP99, m.res.cpuPerTxn, result)
		}
		w("\n")
	}
}
