package metrics

import (
	"context"
	"encoding/json"
	"net/http"
	"time"
)

// ReadyTimeout bounds one /readyz answer: every check runs within it, and a
// check still running when it ends is reported degraded. Probes (a
// Kubernetes readinessProbe's timeoutSeconds, a load balancer's) should wait
// a little longer than this.
const ReadyTimeout = 2 * time.Second

// Check is one dependency /readyz reports on.
type Check struct {
	// Name says what is checked: "issuer", "vault", "upstream app". It comes
	// from the configuration, never from a client.
	Name string
	// Run returns nil while the dependency is usable, or why it is not. It
	// must return when ctx ends. Its error is shown in the /readyz body, so
	// it must hold nothing secret.
	Run func(ctx context.Context) error
}

// SetReadiness sets the checks /readyz runs, all of them concurrently on
// each request; until it is called /readyz answers 503 "starting".
func (m *Metrics) SetReadiness(checks ...Check) {
	c := append([]Check(nil), checks...)
	m.ready.Store(&c)
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
	// Error says why a degraded check failed.
	Error string `json:"error,omitempty"`
}

// maxCheckError caps each error shown, so a chatty dependency cannot bloat
// the answer.
const maxCheckError = 300

// readyz runs every check at once, within ReadyTimeout, and answers with a
// Readiness: 200 when all passed, 503 otherwise.
func (m *Metrics) readyz(w http.ResponseWriter, r *http.Request) {
	body := Readiness{Status: "starting", Degraded: []string{}, Checks: []CheckResult{}}
	if checks := m.ready.Load(); checks != nil {
		ctx, cancel := context.WithTimeout(r.Context(), ReadyTimeout)
		defer cancel()
		body = runChecks(ctx, *checks)
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	if body.Status != "ready" {
		w.WriteHeader(http.StatusServiceUnavailable)
	}
	_ = json.NewEncoder(w).Encode(body)
}

// runChecks runs checks concurrently and waits for them until ctx ends; one
// that has not answered by then is degraded. A check that ignores ctx is
// left to finish on its own: it only writes to a buffered channel.
func runChecks(ctx context.Context, checks []Check) Readiness {
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
		switch {
		case !answered[i]:
			res.Status, res.Error = "degraded", "no answer within "+ReadyTimeout.String()
			if err := ctx.Err(); err != nil && err != context.DeadlineExceeded {
				res.Error = "not checked: " + err.Error()
			}
		case errs[i] != nil:
			res.Status, res.Error = "degraded", clip(errs[i].Error())
		}
		if res.Status != "ok" {
			body.Status = "degraded"
			body.Degraded = append(body.Degraded, c.Name)
		}
		body.Checks = append(body.Checks, res)
	}
	return body
}

func clip(s string) string {
	if len(s) <= maxCheckError {
		return s
	}
	return s[:maxCheckError] + "…"
}
