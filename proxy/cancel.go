package proxy

import (
	"context"
	"crypto/rand"
	"crypto/subtle"
	"encoding/binary"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/pgwarden/pgwarden/pool"
)

// cancelTimeout bounds forwarding one cancel request, dial to close.
const cancelTimeout = 5 * time.Second

// Outcomes of a CancelRequest, as Observer.CancelRequest reports them: a
// bounded set, fit for a metric label.
const (
	// CancelForwarded: the key matched a client holding an upstream
	// session, and the cancel was delivered to its postmaster.
	CancelForwarded = "forwarded"
	// CancelUnknown: the key matched no client, or its client held no
	// upstream session (nothing was running to cancel). Nothing was sent.
	CancelUnknown = "unknown"
	// CancelFailed: the key matched, but the upstream postmaster could not
	// be reached (dial, TLS or write failed, or cancelTimeout passed).
	CancelFailed = "failed"
)

// cancelMap maps the BackendKeyData pgwarden gave each client to that
// client's current upstream session, so a CancelRequest reaches the right
// backend even though upstream connections are pooled.
type cancelMap struct {
	obs Observer // told each request's outcome; set before the map is used
	mu  sync.Mutex
	m   map[uint32]*cancelTarget // guarded by mu; keyed by the client-facing pid
}

// cancelTarget is one client's cancel key and the upstream it holds.
type cancelTarget struct {
	secret [4]byte
	// mu is held while a cancel is forwarded to up, so the client cannot
	// give up (set) its upstream until the cancel has landed: a cancel
	// never reaches a session that has gone back to the pool, where it would
	// hit another client's query.
	mu sync.Mutex
	up *pool.Server // guarded by mu; nil while the client holds no upstream
}

// newCancelMap returns an empty map that reports to no Observer until its
// obs is set (the Server sets its own).
func newCancelMap() *cancelMap {
	return &cancelMap{obs: nopObserver{}, m: map[uint32]*cancelTarget{}}
}

// register allocates a fresh client-facing key.
func (cm *cancelMap) register() (uint32, *cancelTarget) {
	t := &cancelTarget{}
	var b [8]byte
	cm.mu.Lock()
	defer cm.mu.Unlock()
	for {
		_, _ = rand.Read(b[:])
		pid := binary.BigEndian.Uint32(b[:4]) &^ (1 << 31) // positive, as a real pid
		if pid == 0 || cm.m[pid] != nil {
			continue
		}
		copy(t.secret[:], b[4:])
		cm.m[pid] = t
		return pid, t
	}
}

func (cm *cancelMap) unregister(pid uint32) {
	cm.mu.Lock()
	delete(cm.m, pid)
	cm.mu.Unlock()
}

// set records the client's upstream (nil when it gives it up). It waits for
// a cancel being forwarded to the previous one to finish.
func (t *cancelTarget) set(up *pool.Server) {
	t.mu.Lock()
	t.up = up
	t.mu.Unlock()
}

// forward sends a cancel for the upstream behind req, if req's key matches and
// the client holds an upstream; it holds the client's target meanwhile (see
// cancelTarget.mu). Like PostgreSQL, it answers the requester nothing either
// way. It returns whether a cancel was delivered, and reports the outcome to
// the Observer.
func (cm *cancelMap) forward(ctx context.Context, req *pgproto3.CancelRequest) bool {
	result := cm.send(ctx, req)
	cm.obs.CancelRequest(result)
	return result == CancelForwarded
}

// send is forward's work; it returns the outcome.
func (cm *cancelMap) send(ctx context.Context, req *pgproto3.CancelRequest) string {
	cm.mu.Lock()
	t := cm.m[req.ProcessID]
	cm.mu.Unlock()
	if t == nil || len(req.SecretKey) != 4 || subtle.ConstantTimeCompare(req.SecretKey, t.secret[:]) != 1 {
		return CancelUnknown
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.up == nil {
		return CancelUnknown
	}
	ctx, cancel := context.WithTimeout(ctx, cancelTimeout)
	defer cancel()
	if t.up.Cancel(ctx) != nil {
		return CancelFailed
	}
	return CancelForwarded
}
