package metrics

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"
	"strconv"
	"sync"
	"time"

	"golang.org/x/sync/singleflight"
)

// ReadyTimeout bounds one run of the readiness checks: every check runs
// within it, and a check still running when it ends is reported degraded. A
// /readyz request waits at most this long. Probes (a Kubernetes
// readinessProbe's timeoutSeconds, a load balancer's) should wait a little
// longer than this.
const ReadyTimeout = 2 * time.Second

// ReadyCacheFor is how long one run's result answers /readyz. /readyz needs
// no credentials and its checks cost the dependencies something (each
// upstream check opens a TCP connection, for which PostgreSQL forks a
// backend), so however many requests come, the checks run at most once per
// this period, and requests that come during a run wait for it rather than
// start their own.
const ReadyCacheFor = time.Second

// Check is one dependency /readyz reports on.
type Check struct {
	// Name says what is checked: "issuer", "vault", "upstream app". It comes
	// from the configuration, never from a client.
	Name string
	// Run returns nil while the dependency is usable, or why it is not. It
	// must return when ctx ends. /readyz shows only the reason of a
	// *CheckError in its chain (or "failed"); the whole error goes to the
	// log when the check's state changes.
	Run func(ctx context.Context) error
}

// CheckError is a readiness check's failure: Reason, a few words such as
// "unreachable" or "sealed", is what /readyz shows to anyone who asks; Err,
// which may name hosts and addresses, goes only to pgwarden's log.
type CheckError struct {
	Reason string
	Err    error
}

func (e *CheckError) Error() string {
	if e.Err == nil {
		return e.Reason
	}
	return e.Reason + ": " + e.Err.Error()
}

func (e *CheckError) Unwrap() error { return e.Err }

// Unready returns a *CheckError: reason for the /readyz body, err (may be
// nil) for the log.
func Unready(reason string, err error) error { return &CheckError{Reason: reason, Err: err} }

// readiness is /readyz's state; its fields are guarded by mu.
type readiness struct {
	mu     sync.Mutex
	checks *[]Check // nil until SetReadiness
	// gen counts SetReadiness and RecheckReadiness calls: a result of an
	// older generation is not served, and requests of a newer one do not
	// join a run of an older one.
	gen  uint64
	last *readyResult // the newest run's result
	// seen is each check's last reason ("" when it passed), so that a
	// change of state is logged once rather than on every request.
	seen   map[string]string
	log    *slog.Logger
	flight singleflight.Group
	now    func() time.Time // time.Now; tests set a clock of their own
}

func (r *readiness) clock() time.Time {
	if r.now != nil {
		return r.now()
	}
	return time.Now()
}

type readyResult struct {
	gen  uint64
	at   time.Time
	body Readiness
}

// SetReadiness sets the checks /readyz runs, all of them concurrently; until
// it is called /readyz answers 503 "starting".
func (m *Metrics) SetReadiness(checks ...Check) {
	c := append([]Check(nil), checks...)
	r := &m.ready
	r.mu.Lock()
	r.checks = &c
	r.gen++
	r.mu.Unlock()
}

// SetLogger sets where readiness changes are logged: each check's failure,
// with its whole error, when the check starts failing or fails for another
// reason, and its recovery. Without it nothing is logged.
func (m *Metrics) SetLogger(log *slog.Logger) {
	m.ready.mu.Lock()
	m.ready.log = log
	m.ready.mu.Unlock()
}

// RecheckReadiness drops the result /readyz would answer from, so the next
// request runs the checks again: for a change its caller knows of, such as
// the start of a drain, that must show at once.
func (m *Metrics) RecheckReadiness() {
	m.ready.mu.Lock()
	m.ready.gen++
	m.ready.mu.Unlock()
}

// Readiness is the JSON body of /readyz.
type Readiness struct {
	// Status is "ready" (every check passed: HTTP 200), "degraded" (some
	// failed: 503) or "starting" (no checks set yet: 503).
	Status string `json:"status"`
	// Degraded names the checks that failed, in Checks' order; empty when
	// ready.
	Degraded []string `json:"degraded"`
	// Checks is every check's result, in the order they were set.
	Checks []CheckResult `json:"checks"`
}

// CheckResult is one check's outcome.
type CheckResult struct {
	Name string `json:"name"`
	// Status is "ok" or "degraded".
	Status string `json:"status"`
	// Error says in a few words why a degraded check failed ("unreachable",
	// "sealed", "no answer within 2s"); the details are in the log.
	Error string `json:"error,omitempty"`
}

// readyz answers with the newest Readiness (see ReadyCacheFor): 200 when
// every check passed, 503 otherwise.
func (m *Metrics) readyz(w http.ResponseWriter, r *http.Request) {
	body, ok := m.readiness(r.Context())
	if !ok {
		return // the client left
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	if body.Status != "ready" {
		w.WriteHeader(http.StatusServiceUnavailable)
	}
	_ = json.NewEncoder(w).Encode(body)
}

// readiness returns a result younger than ReadyCacheFor, or joins (or
// starts) a run of the checks and waits for it until ctx ends (ok false).
// The run belongs to no request: it runs under its own ReadyTimeout, so the
// first requester leaving does not cut it short for the others.
func (m *Metrics) readiness(ctx context.Context) (Readiness, bool) {
	r := &m.ready
	r.mu.Lock()
	checks, gen, last := r.checks, r.gen, r.last
	r.mu.Unlock()
	if checks == nil {
		return Readiness{Status: "starting", Degraded: []string{}, Checks: []CheckResult{}}, true
	}
	if last != nil && last.gen == gen && r.clock().Sub(last.at) < ReadyCacheFor {
		return last.body, true
	}
	ch := r.flight.DoChan(strconv.FormatUint(gen, 10), func() (any, error) {
		rctx, cancel := context.WithTimeout(context.Background(), ReadyTimeout)
		defer cancel()
		body, errs := runChecks(rctx, *checks)
		r.record(gen, body, errs)
		return body, nil
	})
	select {
	case res := <-ch:
		return res.Val.(Readiness), true
	case <-ctx.Done():
		return Readiness{}, false
	}
}

// record keeps body as the newest result of generation gen (unless a newer
// one is kept already) and logs each check whose state changed.
func (r *readiness) record(gen uint64, body Readiness, errs []error) {
	type change struct {
		name, reason string
		err          error
	}
	var changes []change
	r.mu.Lock()
	if r.last == nil || r.last.gen <= gen {
		r.last = &readyResult{gen: gen, at: r.clock(), body: body}
	}
	if r.seen == nil {
		r.seen = map[string]string{}
	}
	for i, c := range body.Checks {
		was, known := r.seen[c.Name]
		if c.Error != was && (known || c.Error != "") {
			changes = append(changes, change{c.Name, c.Error, errs[i]})
		}
		r.seen[c.Name] = c.Error
	}
	log := r.log
	r.mu.Unlock()
	if log == nil {
		return
	}
	for _, ch := range changes {
		if ch.reason == "" {
			log.Info("readiness check passes again", "check", ch.name)
			continue
		}
		log.Warn("readiness check failed; /readyz answers 503", "check", ch.name, "reason", ch.reason, "error", ch.err)
	}
}

// runChecks runs checks concurrently and waits for them until ctx ends; one
// that has not answered by then is degraded. A check that ignores ctx is
// left to finish on its own: it only writes to a buffered channel. It
// returns each check's error beside the body, for the log.
func runChecks(ctx context.Context, checks []Check) (Readiness, []error) {
	type result struct {
		i   int
		err error
	}
	done := make(chan result, len(checks))
	for i, c := range checks {
		go func() { done <- result{i, c.Run(ctx)} }()
	}
	errs := make([]error, len(checks))
	answered := make([]bool, len(checks))
	for n := 0; n < len(checks); n++ {
		select {
		case r := <-done:
			errs[r.i], answered[r.i] = r.err, true
		case <-ctx.Done():
			n = len(checks) // stop waiting; the rest are unanswered
		}
	}
	body := Readiness{Status: "ready", Degraded: []string{}, Checks: make([]CheckResult, 0, len(checks))}
	for i, c := range checks {
		res := CheckResult{Name: c.Name, Status: "ok"}
		if !answered[i] {
			errs[i] = context.DeadlineExceeded
		}
		if errs[i] != nil {
			res.Status, res.Error = "degraded", reason(errs[i])
			body.Status = "degraded"
			body.Degraded = append(body.Degraded, c.Name)
		}
		body.Checks = append(body.Checks, res)
	}
	return body, errs
}

// reason is what /readyz shows of a check's error: never the error's text,
// which may name hosts, addresses and paths of the deployment.
func reason(err error) string {
	var ce *CheckError
	switch {
	case errors.Is(err, context.DeadlineExceeded):
		return "no answer within " + ReadyTimeout.String()
	case errors.As(err, &ce) && ce.Reason != "":
		return ce.Reason
	}
	return "failed"
}
