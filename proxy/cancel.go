package proxy

import (
	"context"
	"crypto/rand"
	"crypto/subtle"
	"encoding/binary"
	"net"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"
)

// cancelMap maps the BackendKeyData pgwarden gave each client to that
// client's current upstream session, so a CancelRequest reaches the right
// backend even though upstream connections are pooled.
type cancelMap struct {
	mu sync.Mutex
	m  map[uint32]*cancelTarget // guarded by mu; keyed by the client-facing pid
}

type cancelTarget struct {
	secret [4]byte
	mu     sync.Mutex
	up     *serverConn // guarded by mu; nil between upstreams
}

func newCancelMap() *cancelMap { return &cancelMap{m: map[uint32]*cancelTarget{}} }

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

func (t *cancelTarget) set(up *serverConn) {
	t.mu.Lock()
	t.up = up
	t.mu.Unlock()
}

// forward sends a cancel for the upstream behind req, if req's key matches.
// Like PostgreSQL, it answers nothing either way.
func (cm *cancelMap) forward(ctx context.Context, req *pgproto3.CancelRequest, timeout time.Duration) bool {
	cm.mu.Lock()
	t := cm.m[req.ProcessID]
	cm.mu.Unlock()
	if t == nil || len(req.SecretKey) != 4 || subtle.ConstantTimeCompare(req.SecretKey, t.secret[:]) != 1 {
		return false
	}
	t.mu.Lock()
	up := t.up
	t.mu.Unlock()
	if up == nil {
		return false
	}
	msg, err := (&pgproto3.CancelRequest{ProcessID: up.pid, SecretKey: up.secret}).Encode(nil)
	if err != nil {
		return false
	}
	d := net.Dialer{Timeout: timeout}
	nc, err := d.DialContext(ctx, "tcp", up.addr)
	if err != nil {
		return false
	}
	defer nc.Close()
	_ = nc.SetDeadline(time.Now().Add(timeout))
	if _, err := nc.Write(msg); err != nil {
		return false
	}
	// The server closes the connection once it has read the request; waiting
	// for that makes the cancel land before we report done.
	_, _ = nc.Read(make([]byte, 1))
	return true
}
