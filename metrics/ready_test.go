package metrics

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"slices"
	"testing"
)

// getReadyz returns /readyz's status code and decoded body.
func getReadyz(t *testing.T, m *Metrics) (int, Readiness) {
	t.Helper()
	srv := httptest.NewServer(m.Handler())
	defer srv.Close()
	resp, err := http.Get(srv.URL + "/readyz")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
		t.Errorf("Content-Type %q", ct)
	}
	var body Readiness
	if err := json.NewDecoder(resp.Body).Decode(&body); err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, body
}

func TestReadyzNamesEachCheckAndWhichIsDegraded(t *testing.T) {
	t.Parallel()
	ok := func(context.Context) error { return nil }
	m := New(nil)
	if code, body := getReadyz(t, m); code != 503 || body.Status != "starting" {
		t.Fatalf("before SetReadiness: %d %+v", code, body)
	}

	m.SetReadiness(Check{"issuer", ok}, Check{"vault", ok}, Check{"upstream app", ok})
	code, body := getReadyz(t, m)
	if code != 200 || body.Status != "ready" || len(body.Degraded) != 0 {
		t.Fatalf("all ok: %d %+v", code, body)
	}
	if got := names(body.Checks); !slices.Equal(got, []string{"issuer", "vault", "upstream app"}) {
		t.Fatalf("checks %v, want them in the order set", got)
	}

	m.SetReadiness(Check{"issuer", ok}, Check{"vault", func(context.Context) error { return errors.New("vault is sealed") }},
		Check{"upstream app", ok})
	code, body = getReadyz(t, m)
	if code != 503 || body.Status != "degraded" || !slices.Equal(body.Degraded, []string{"vault"}) {
		t.Fatalf("vault failing: %d %+v", code, body)
	}
	for _, c := range body.Checks {
		want, wantErr := "ok", ""
		if c.Name == "vault" {
			want, wantErr = "degraded", "vault is sealed"
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
	code, body := getReadyz(t, m)
	if code != 503 || !slices.Equal(body.Degraded, []string{"hangs", "waits"}) {
		t.Fatalf("%d %+v", code, body)
	}
	if body.Checks[0].Error != "no answer within 2s" || body.Checks[2].Status != "ok" {
		t.Errorf("%+v", body.Checks)
	}
}

func TestReadyzClipsLongErrors(t *testing.T) {
	t.Parallel()
	long := make([]byte, 5000)
	for i := range long {
		long[i] = 'x'
	}
	m := New(nil)
	m.SetReadiness(Check{"chatty", func(context.Context) error { return errors.New(string(long)) }})
	_, body := getReadyz(t, m)
	if n := len(body.Checks[0].Error); n > maxCheckError+len("…") {
		t.Fatalf("error of %d bytes shown", n)
	}
}

func names(cs []CheckResult) []string {
	out := make([]string, 0, len(cs))
	for _, c := range cs {
		out = append(out, c.Name)
	}
	return out
}
