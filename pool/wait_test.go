package pool_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/pgwarden/pgwarden/broker"
	"github.com/pgwarden/pgwarden/pgerror"
	"github.com/pgwarden/pgwarden/pool"
	"github.com/pgwarden/pgwarden/testenv"
)

// waits records Options.ObserveWait's calls.
type waits struct {
	mu   sync.Mutex
	keys []pool.Key
}

func (w *waits) observe(k pool.Key, d time.Duration) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if d < 0 {
		panic("negative wait")
	}
	w.keys = append(w.keys, k)
}

func (w *waits) count() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.keys)
}

func waitingOf(ps *pool.Set, k pool.Key) int {
	for _, st := range ps.Stats() {
		if st.Key == k {
			return st.Waiting
		}
	}
	return 0
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// A client that has to queue is counted in Stat.Waiting while it waits and
// reported once to ObserveWait when its wait ends, whether it was served, gave
// up, or waited out a pause; a client served at once is not reported.
func TestQueuedClientsAreCountedAndTheirWaitReported(t *testing.T) {
	testenv.Integration(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	pg, err := testenv.StartPostgres(ctx)
	testenv.Check(t, err)
	t.Cleanup(pg.Close)

	rec := &waits{}
	ps, err := pool.NewSet(pool.Config{MaxPerPool: 1, AcquireTimeout: 10 * time.Second},
		pool.Options{Upstreams: map[string]pool.Upstream{"postgres": {
			Conn: fmt.Sprintf("host=127.0.0.1 port=%d dbname=postgres sslmode=disable", pg.Port)}},
			ObserveWait: rec.observe})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ps.Close)
	cred := broker.Fixed(pg.Super, pg.Password, "", time.Now().Add(time.Hour), time.Now().Add(2*time.Hour))
	k := pool.Key{Database: "postgres", Level: "reader"}

	first, err := ps.Acquire(ctx, k.Database, k.Level, cred)
	if err != nil {
		t.Fatal(err)
	}
	if n := rec.count(); n != 0 || waitingOf(ps, k) != 0 {
		t.Fatalf("a client served at once: %d waits reported, %d waiting", n, waitingOf(ps, k))
	}

	// Served: the second client queues behind the first, which gives its
	// connection back.
	got := make(chan error, 1)
	go func() {
		sc, err := ps.Acquire(ctx, k.Database, k.Level, cred)
		if err == nil {
			ps.Release(sc)
		}
		got <- err
	}()
	eventually(t, "the second client to be counted waiting", func() bool { return waitingOf(ps, k) == 1 })
	if n := rec.count(); n != 0 {
		t.Fatalf("%d waits reported while the client still waits", n)
	}
	ps.Release(first)
	if err := <-got; err != nil {
		t.Fatalf("the queued client: %v", err)
	}
	if n, w := rec.count(), waitingOf(ps, k); n != 1 || w != 0 {
		t.Fatalf("after the queued client was served: %d waits reported (want 1), %d waiting (want 0)", n, w)
	}

	// Gave up: its context ends while the pool is full.
	held, err := ps.Acquire(ctx, k.Database, k.Level, cred)
	if err != nil {
		t.Fatal(err)
	}
	wctx, wcancel := context.WithCancel(ctx)
	go func() { _, err := ps.Acquire(wctx, k.Database, k.Level, cred); got <- err }()
	eventually(t, "the next client to be counted waiting", func() bool { return waitingOf(ps, k) == 1 })
	wcancel()
	if err := <-got; pgerror.Code(err) != pgerror.ConnectionFailure {
		t.Fatalf("a client that gave up: %v", err)
	}
	if n, w := rec.count(), waitingOf(ps, k); n != 2 || w != 0 {
		t.Fatalf("after a client gave up: %d waits reported (want 2), %d waiting (want 0)", n, w)
	}
	ps.Release(held)

	// Paused: a client waiting for RESUME is waiting too.
	if err := ps.Pause(ctx, k.Database); err != nil {
		t.Fatal(err)
	}
	go func() {
		sc, err := ps.Acquire(ctx, k.Database, k.Level, cred)
		if err == nil {
			ps.Release(sc)
		}
		got <- err
	}()
	eventually(t, "a client of a paused database to be counted waiting", func() bool { return waitingOf(ps, k) == 1 })
	ps.Resume(k.Database)
	if err := <-got; err != nil {
		t.Fatalf("after RESUME: %v", err)
	}
	rec.mu.Lock()
	defer rec.mu.Unlock()
	if len(rec.keys) != 3 || waitingOf(ps, k) != 0 {
		t.Fatalf("after a paused wait: %d waits reported (want 3), %d waiting", len(rec.keys), waitingOf(ps, k))
	}
	for _, rk := range rec.keys {
		if rk != k {
			t.Fatalf("a wait reported for %v, want %v", rk, k)
		}
	}
}
