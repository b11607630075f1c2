package broker

import (
	"context"
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
	b, err := New(Config{Client: c, ObserveLease: ev.observe,
		Self: &Self{base: c, token: "hvs.vt-self", ctx: context.Background(), stop: func() {}, done: done}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = b.Close(context.Background(), false) })
	return b, ev
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
