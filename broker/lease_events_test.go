package broker

import (
	"context"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	vault "github.com/hashicorp/vault/api"
)

// leaseEvents records Config.ObserveLease's calls.
type leaseEvents struct {
	mu sync.Mutex
	n  map[string]int
}

func (e *leaseEvents) observe(ev string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.n == nil {
		e.n = map[string]int{}
	}
	e.n[ev]++
}

func (e *leaseEvents) all() map[string]int {
	e.mu.Lock()
	defer e.mu.Unlock()
	out := map[string]int{}
	for k, v := range e.n {
		out[k] = v
	}
	return out
}

func (e *leaseEvents) get(ev string) int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.n[ev]
}

// revokingVault is fv that also answers sys/leases/revoke (pgwarden's own
// revocation of a role-scoped lease) with status, counting the calls.
type revokingVault struct {
	*fakeVault
	status      int
	leaseRevoke atomic.Int32
}

func (v *revokingVault) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path == "/v1/sys/leases/revoke" {
		v.leaseRevoke.Add(1)
		w.WriteHeader(v.status)
		return
	}
	v.fakeVault.ServeHTTP(w, r)
}

// eventBroker is newBrokerWith's broker over v, with pgwarden's own identity
// (role scope) and its lease events recorded.
func eventBroker(t *testing.T, v http.Handler) (*Broker, *leaseEvents) {
	t.Helper()
	b, ev, _ := eventBrokerConfig(t, v)
	return b, ev
}

// eventBrokerConfig is eventBroker, with the Vault client's configuration
// (its Clone reads it).
func eventBrokerConfig(t *testing.T, v http.Handler) (*Broker, *leaseEvents, *vault.Config) {
	t.Helper()
	srv := httptest.NewServer(v)
	t.Cleanup(srv.Close)
	vcfg := vault.DefaultConfig()
	vcfg.Address = srv.URL
	vcfg.MaxRetries = 0
	c, err := vault.NewClient(vcfg)
	if err != nil {
		t.Fatal(err)
	}
	c.ClearToken()
	done := make(chan struct{})
	close(done)
	ev := &leaseEvents{}
	b, err := New(Config{Client: c, ObserveLease: ev.observe, Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
		Self: &Self{base: c, token: "hvs.vt-self", ctx: context.Background(), stop: func() {}, done: done}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = b.Close(context.Background(), false) })
	return b, ev, vcfg
}

// Each lease is reported issued once, each renewal once, and once let go
// either revoked (pgwarden revoked it, or the client login that read it,
// within its TTL) or expired (nothing was revoked: the revocation failed, or
// a static role's password rotated).
func TestLeaseEventsFollowEachLeasesLife(t *testing.T) {
	t.Parallel()
	ctx := context.Background()

	t.Run("identity scope: issued, renewed, revoked with its login", func(t *testing.T) {
		t.Parallel()
		fv := &fakeVault{leaseTTL: 30, tokenTTL: 3600, renewable: true, renewTTL: 600}
		b, ev := eventBroker(t, fv)
		c, err := b.Credential(ctx, reqAs("alice", "good-a", time.Now().Add(2*time.Second)))
		if err != nil {
			t.Fatal(err)
		}
		if ev.get(LeaseIssued) != 1 {
			t.Fatalf("issued = %d after one read", ev.get(LeaseIssued))
		}
		c.Hold()
		waitFor(t, "a renewal to be reported", func() bool { return ev.get(LeaseRenewed) >= 1 })
		if r := ev.get(LeaseRenewed); int32(r) > fv.renews.Load() {
			t.Fatalf("%d renewals reported, Vault saw %d", r, fv.renews.Load())
		}
		waitFor(t, "the lease to retire with its token", c.Retired)
		if ev.get(LeaseRevoked)+ev.get(LeaseExpired) != 0 {
			t.Fatal("a lease still held was reported let go")
		}
		c.Release()
		waitFor(t, "the login's token, and the lease with it, to be revoked", func() bool { return ev.get(LeaseRevoked) == 1 })
		if ev.get(LeaseExpired) != 0 || ev.get(LeaseIssued) != 1 {
			t.Fatalf("events %v", ev.all())
		}
	})

	t.Run("role scope: revoked by pgwarden, or expired when Vault refuses", func(t *testing.T) {
		t.Parallel()
		for _, status := range []int{http.StatusNoContent, http.StatusInternalServerError} {
			v := &revokingVault{fakeVault: &fakeVault{leaseTTL: 3600, tokenTTL: 3600}, status: status}
			b, ev := eventBroker(t, v)
			r := reqAs("alice", "good-a", time.Now().Add(time.Hour))
			r.Scope = ScopeRole
			c, err := b.Credential(ctx, r)
			if err != nil {
				t.Fatal(err)
			}
			b.Forget(c) // superseded and unheld: finished, and revoked
			want, other := LeaseRevoked, LeaseExpired
			if status != http.StatusNoContent {
				want, other = LeaseExpired, LeaseRevoked
			}
			waitFor(t, "the role-scoped lease to be reported "+want, func() bool { return ev.get(want) == 1 })
			if ev.get(other) != 0 || ev.get(LeaseIssued) != 1 || v.leaseRevoke.Load() != 1 {
				t.Fatalf("revocation answered %d: events %v, %d revocations", status, ev.all(), v.leaseRevoke.Load())
			}
		}
	})

	t.Run("static role: expired by its rotation", func(t *testing.T) {
		t.Parallel()
		b, ev := eventBroker(t, &fakeVault{staticTTL: 1})
		r := reqAs("alice", "good-a", time.Now().Add(time.Hour))
		r.Scope, r.Static = ScopeRole, true
		c, err := b.Credential(ctx, r)
		if err != nil {
			t.Fatal(err)
		}
		waitFor(t, "the static credential to finish after the rotation", c.Finished)
		if ev.get(LeaseIssued) != 1 || ev.get(LeaseExpired) != 1 || ev.get(LeaseRevoked) != 0 {
			t.Fatalf("events %v", ev.all())
		}
	})

	t.Run("close: every lease revoked with its login", func(t *testing.T) {
		t.Parallel()
		b, ev := eventBroker(t, &fakeVault{leaseTTL: 3600, tokenTTL: 3600})
		for _, sub := range []string{"a", "b"} {
			c, err := b.Credential(ctx, reqAs(sub, "good-"+sub, time.Now().Add(time.Hour)))
			if err != nil {
				t.Fatal(err)
			}
			c.Hold() // sessions still open: Close revokes anyway
		}
		if err := b.Close(ctx, true); err != nil {
			t.Fatal(err)
		}
		if ev.get(LeaseIssued) != 2 || ev.get(LeaseRevoked) != 2 || ev.get(LeaseExpired) != 0 {
			t.Fatalf("events %v", ev.all())
		}
	})
}

// Every lease issued is reported revoked or expired exactly once by the time
// Close returns, whatever stopped its revocation: issued = revoked + expired.
func TestLeaseEventsAddUpAtClose(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	// leases reads one identity-scoped lease for each of subs and one
	// role-scoped lease, and holds them all, as open sessions do.
	leases := func(t *testing.T, b *Broker, subs ...string) []*Credential {
		t.Helper()
		var out []*Credential
		for _, sub := range subs {
			c, err := b.Credential(ctx, reqAs(sub, "good-"+sub, time.Now().Add(time.Hour)))
			if err != nil {
				t.Fatal(err)
			}
			out = append(out, c)
		}
		r := reqAs("svc", "good-svc", time.Now().Add(time.Hour))
		r.Scope = ScopeRole
		c, err := b.Credential(ctx, r)
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range append(out, c) {
			c.Hold()
		}
		return append(out, c)
	}
	addUp := func(t *testing.T, ev *leaseEvents, issued, revoked int) {
		t.Helper()
		if ev.get(LeaseIssued) != issued || ev.get(LeaseRevoked) != revoked || ev.get(LeaseExpired) != issued-revoked {
			t.Fatalf("events %v, want %d issued, %d revoked, %d expired", ev.all(), issued, revoked, issued-revoked)
		}
	}

	t.Run("a login whose revocation cannot start: its leases expired", func(t *testing.T) {
		t.Parallel()
		v := &revokingVault{fakeVault: &fakeVault{leaseTTL: 3600, tokenTTL: 3600}, status: http.StatusNoContent}
		b, ev, vcfg := eventBrokerConfig(t, v)
		leases(t, b, "a")
		// The client can no longer be cloned for the login's token.
		vcfg.Address = "http://[::1"
		if err := b.Close(ctx, true); err != nil {
			t.Fatal(err)
		}
		addUp(t, ev, 2, 0) // pgwarden's own client, for the role-scoped lease, is a clone too
		if n := v.revokes.Load() + v.leaseRevoke.Load(); n != 0 {
			t.Fatalf("%d revocations reached Vault", n)
		}
	})

	t.Run("a close whose time is up: what it did not revoke expired", func(t *testing.T) {
		t.Parallel()
		v := &revokingVault{fakeVault: &fakeVault{leaseTTL: 3600, tokenTTL: 3600}, status: http.StatusNoContent}
		b, ev := eventBroker(t, v)
		leases(t, b, "a", "b")
		done, cancel := context.WithCancel(ctx)
		cancel()
		_ = b.Close(done, true)
		addUp(t, ev, 3, 0)
		if v.revokes.Load()+v.leaseRevoke.Load() != 0 {
			t.Fatal("Close revoked with its time up")
		}
	})

	t.Run("a close without revocation: every lease expired", func(t *testing.T) {
		t.Parallel()
		b, ev := eventBroker(t, &revokingVault{fakeVault: &fakeVault{leaseTTL: 3600, tokenTTL: 3600}, status: http.StatusNoContent})
		for _, c := range leases(t, b, "a", "b") {
			c.Release() // finished after Close: still counted once
		}
		if err := b.Close(ctx, false); err != nil {
			t.Fatal(err)
		}
		addUp(t, ev, 3, 0)
	})

	t.Run("sessions ending while Close runs: each lease counted once", func(t *testing.T) {
		t.Parallel()
		for i := range 20 {
			v := &revokingVault{fakeVault: &fakeVault{leaseTTL: 3600, tokenTTL: 3600}, status: http.StatusNoContent}
			b, ev := eventBroker(t, v)
			all := leases(t, b, "a", "b")
			// a's login is dropped (its token expired, say): it is revoked
			// when its lease finishes, as Close runs.
			b.dropLogin(all[0].by)
			var wg sync.WaitGroup
			for _, c := range all {
				wg.Add(1)
				go func() { defer wg.Done(); b.Forget(c); c.Release() }()
			}
			if err := b.Close(ctx, true); err != nil {
				t.Fatal(err)
			}
			wg.Wait()
			if ev.get(LeaseIssued) != 3 || ev.get(LeaseRevoked)+ev.get(LeaseExpired) != 3 {
				t.Fatalf("round %d: events %v, want 3 issued and 3 let go", i, ev.all())
			}
		}
	})
}
