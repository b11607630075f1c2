package app_test

import (
	"context"
	"io"
	"log/slog"
	"net/http"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/pgwarden/pgwarden/internal/app"
	"github.com/pgwarden/pgwarden/internal/config"
	"github.com/pgwarden/pgwarden/testenv"
)

// A metrics request that would run for ten minutes (a CPU profile, as an
// operator might leave running, or any client that stops reading) does not
// hold up the shutdown: the metrics listener gets
// app.MetricsShutdownTimeout, then its connections are cut, and the
// revocations and the exit follow, within app.StopBudget.
func TestShutdownDoesNotWaitForAHungMetricsRequest(t *testing.T) {
	st := testenv.NewStack(t, testenv.StackOptions{NoProxy: true, Configure: func(c *config.Config) { c.Pprof = true }})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	a, err := app.New(ctx, st.Config, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Start(); err != nil {
		t.Fatal(err)
	}

	profile := make(chan error, 1)
	go func() {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+a.MetricsAddr()+"/debug/pprof/profile?seconds=600", nil)
		if err != nil {
			profile <- err
			return
		}
		resp, err := http.DefaultClient.Do(req)
		if err == nil {
			_, err = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}
		profile <- err
	}()
	// pgwarden runs in this process: its profile handler shows in our stacks.
	deadline := time.Now().Add(time.Minute)
	for !strings.Contains(allStacks(), "net/http/pprof.Profile(") {
		if time.Now().After(deadline) {
			t.Fatal("the profile request never reached its handler")
		}
		time.Sleep(20 * time.Millisecond)
	}

	stopped := make(chan error, 1)
	go func() {
		sctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		stopped <- a.Shutdown(sctx)
	}()
	// No session is open, so the drain ends at once; what is left is the
	// metrics listener and the revocations.
	limit := app.StopBudget(0) + 30*time.Second
	select {
	case err := <-stopped:
		if err != nil {
			t.Fatalf("Shutdown: %v", err)
		}
	case <-time.After(limit):
		t.Fatalf("Shutdown still waiting %v after it began, held by a metrics request", limit)
	}
	select {
	case <-profile:
	case <-time.After(time.Minute):
		t.Fatal("the profile request still runs after Shutdown returned")
	}
}

func allStacks() string {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			return string(buf[:n])
		}
		buf = make([]byte, 2*len(buf))
	}
}
