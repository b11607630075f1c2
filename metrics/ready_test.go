package metrics

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"regexp"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// getReadyz returns /readyz's status code, decoded body and raw body.
func getReadyz(t *testing.T, m *Metrics) (int, Readiness, string) {
	t.Helper()
	srv := httptest.NewServer(m.Handler())
	defer srv.Close()
	return getReadyzAt(t, srv.URL)
}

func getReadyzAt(t *testing.T, url string) (int, Readiness, string) {
	t.Helper()
	resp, err := http.Get(url + "/readyz")
	if err != nil {
		t.Error(err)
		return 0, Readiness{}, ""
	}
	defer resp.Body.Close()
	if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
		t.Errorf("Content-Type %q", ct)
	}
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Error(err)
	}
	var body Readiness
	if err := json.Unmarshal(raw, &body); err != nil {
		t.Errorf("%v: %s", err, raw)
	}
	return resp.StatusCode, body, string(raw)
}

// fakeClock is a clock the test moves.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *fakeClock) Now() time.Time      { c.mu.Lock(); defer c.mu.Unlock(); return c.now }
func (c *fakeClock) Add(d time.Duration) { c.mu.Lock(); c.now = c.now.Add(d); c.mu.Unlock() }

func TestReadyzNamesEachCheckAndWhichIsDegraded(t *testing.T) {
	t.Parallel()
	ok := func(context.Context) error { return nil }
	m := New(nil)
	if code, body, _ := getReadyz(t, m); code != 503 || body.Status != "starting" {
		t.Fatalf("before SetReadiness: %d %+v", code, body)
	}

	m.SetReadiness(Check{"issuer", ok}, Check{"vault", ok}, Check{"upstream app", ok})
	code, body, _ := getReadyz(t, m)
	if code != 200 || body.Status != "ready" || len(body.Degraded) != 0 {
		t.Fatalf("all ok: %d %+v", code, body)
	}
	if got := names(body.Checks); !slices.Equal(got, []string{"issuer", "vault", "upstream app"}) {
		t.Fatalf("checks %v, want them in the order set", got)
	}

	// A new set of checks is run at once, whatever was answered before.
	m.SetReadiness(Check{"issuer", ok}, Check{"vault", func(context.Context) error { return Unready("sealed", nil) }},
		Check{"upstream app", ok})
	code, body, _ = getReadyz(t, m)
	if code != 503 || body.Status != "degraded" || !slices.Equal(body.Degraded, []string{"vault"}) {
		t.Fatalf("vault failing: %d %+v", code, body)
	}
	for _, c := range body.Checks {
		want, wantErr := "ok", ""
		if c.Name == "vault" {
			want, wantErr = "degraded", "sealed"
		}
		if c.Status != want || c.Error != wantErr {
			t.Errorf("check %s: %q %q, want %q %q", c.Name, c.Status, c.Error, want, wantErr)
		}
	}
}

// A check that does not return within the budget is reported degraded, and
// the answer does not wait for it; the checks run concurrently, so one that
// hangs does not hold up the others' results.
func TestReadyzCheckThatHangsIsDegradedAndTheOthersStillAnswer(t *testing.T) {
	t.Parallel()
	release := make(chan struct{})
	defer close(release)
	m := New(nil)
	m.SetReadiness(
		Check{"hangs", func(context.Context) error { <-release; return nil }}, // ignores ctx on purpose
		Check{"waits", func(ctx context.Context) error { <-ctx.Done(); return ctx.Err() }},
		Check{"fine", func(context.Context) error { return nil }},
	)
	code, body, _ := getReadyz(t, m)
	if code != 503 || !slices.Equal(body.Degraded, []string{"hangs", "waits"}) {
		t.Fatalf("%d %+v", code, body)
	}
	if body.Checks[0].Error != "no answer within 2s" || body.Checks[1].Error != "no answer within 2s" || body.Checks[2].Status != "ok" {
		t.Errorf("%+v", body.Checks)
	}
}

// /readyz answers anyone who can reach the metrics listener, so it shows a
// reason in a few words and never an error's text, which names hosts and
// addresses; the whole error goes to the log, once per change of a check's
// state rather than on every request.
func TestReadyzShowsReasonsAndLogsTheDetailsOnChange(t *testing.T) {
	t.Parallel()
	var logBuf bytes.Buffer
	var logMu sync.Mutex
	m := New(nil)
	m.SetLogger(slog.New(slog.NewTextHandler(&lockedWriter{w: &logBuf, mu: &logMu}, nil)))
	var vaultUp atomic.Bool
	m.SetReadiness(
		Check{"vault", func(context.Context) error {
			if vaultUp.Load() {
				return nil
			}
			return Unready("unreachable", errors.New("Get https://vault.internal:8200/v1/sys/health: dial tcp 10.20.30.40:8200: connect: connection refused"))
		}},
		Check{"upstream app", func(context.Context) error {
			return errors.New("dial tcp [fd00::5]:5432: connect: no route to host")
		}},
		Check{"issuer", func(ctx context.Context) error {
			return fmt.Errorf("GET https://idp.internal:8443/keys: %w", context.DeadlineExceeded)
		}},
	)
	srv := httptest.NewServer(m.Handler())
	defer srv.Close()
	hostPort := regexp.MustCompile(`\d+\.\d+\.\d+\.\d+|\[[0-9a-f:]+\]|:\d{2,5}\b|\.internal`)
	for range 3 {
		m.RecheckReadiness() // each request runs the checks
		code, body, raw := getReadyzAt(t, srv.URL)
		if code != 503 {
			t.Fatalf("%d %s", code, raw)
		}
		if loc := hostPort.FindString(raw); loc != "" {
			t.Fatalf("/readyz shows %q of an error: %s", loc, raw)
		}
		want := map[string]string{"vault": "unreachable", "upstream app": "failed", "issuer": "no answer within 2s"}
		for _, c := range body.Checks {
			if c.Error != want[c.Name] {
				t.Errorf("check %s: reason %q, want %q", c.Name, c.Error, want[c.Name])
			}
		}
	}
	vaultUp.Store(true)
	m.RecheckReadiness()
	if code, body, raw := getReadyzAt(t, srv.URL); code != 503 || !slices.Equal(body.Degraded, []string{"upstream app", "issuer"}) {
		t.Fatalf("vault back: %d %s", code, raw)
	}

	logMu.Lock()
	logs := logBuf.String()
	logMu.Unlock()
	for _, want := range []string{"10.20.30.40:8200", "[fd00::5]:5432", "idp.internal:8443"} {
		if n := strings.Count(logs, want); n != 1 {
			t.Errorf("the log holds %q %d times over three failing runs, want once:\n%s", want, n, logs)
		}
	}
	if !strings.Contains(logs, `msg="readiness check passes again" check=vault`) {
		t.Errorf("vault's recovery is not logged:\n%s", logs)
	}
}

// Requests at the same moment share one run of the checks, and a result
// answers for ReadyCacheFor: however often /readyz is asked, each
// dependency is checked (an upstream dialled, PostgreSQL forking a backend
// for it) at most once per period.
func TestReadyzConcurrentRequestsShareOneRun(t *testing.T) {
	t.Parallel()
	clk := &fakeClock{now: time.Unix(1_800_000_000, 0)}
	m := New(nil)
	m.ready.now = clk.Now
	var runs atomic.Int32
	release := make(chan struct{})
	m.SetReadiness(Check{"upstream app", func(ctx context.Context) error {
		runs.Add(1)
		select {
		case <-release:
		case <-ctx.Done():
		}
		return nil
	}})
	srv := httptest.NewServer(m.Handler())
	defer srv.Close()

	const n = 20
	var wg sync.WaitGroup
	codes := make(chan int, n)
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			code, _, _ := getReadyzAt(t, srv.URL)
			codes <- code
		}()
	}
	waitUntil(t, "the first request to start the checks", func() bool { return runs.Load() > 0 })
	close(release)
	wg.Wait()
	close(codes)
	for c := range codes {
		if c != 200 {
			t.Errorf("a request got %d", c)
		}
	}
	if r := runs.Load(); r != 1 {
		t.Fatalf("%d concurrent requests ran the checks %d times, want once", n, r)
	}

	// Within the period the result answers; after it, the checks run again.
	getReadyzAt(t, srv.URL)
	if r := runs.Load(); r != 1 {
		t.Fatalf("a request within %v of the last run ran the checks again (%d runs)", ReadyCacheFor, r)
	}
	clk.Add(ReadyCacheFor)
	getReadyzAt(t, srv.URL)
	if r := runs.Load(); r != 2 {
		t.Fatalf("a request %v after the last run: %d runs, want 2", ReadyCacheFor, r)
	}
	// RecheckReadiness (the start of a drain) makes the next request run them.
	m.RecheckReadiness()
	getReadyzAt(t, srv.URL)
	if r := runs.Load(); r != 3 {
		t.Fatalf("after RecheckReadiness: %d runs, want 3", r)
	}
}

func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

type lockedWriter struct {
	w  io.Writer
	mu *sync.Mutex
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

func names(cs []CheckResult) []string {
	out := make([]string, 0, len(cs))
	for _, c := range cs {
		out = append(out, c.Name)
	}
	return out
}
