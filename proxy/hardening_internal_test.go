package proxy

// Unit-level regression tests for the hardening issue, at the package's own
// boundary (fakes for verifier, authorizer and credentials; a scripted
// postmaster for cancel). The integration ones are in hardening_test.go.

import (
	"context"
	"crypto/tls"
	"encoding/binary"
	"io"
	"net"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/pgwarden/pgwarden/pool"
)

// 5. A route whose upstream is off loopback without TLS verification
// (pool.ParseUpstream refuses it; the cases are in package pool's tests)
// keeps the server from starting, and the error says what to change.
func TestItem05ServerRefusesAnInsecureUpstream(t *testing.T) {
	t.Parallel()
	cfg := testConfig()
	cfg.Routes = map[string]Route{"app": {Upstream: "host=db.example.com dbname=app sslmode=prefer", VaultRoles: map[string]string{"reader": "r"}}}
	if _, err := NewServer(cfg); err == nil || !strings.Contains(err.Error(), "allow_insecure_upstream") {
		t.Fatalf("NewServer with sslmode=prefer off loopback: %v, want a refusal naming allow_insecure_upstream", err)
	}
}

// fakePostmaster accepts cancel requests, holds each connection for hold
// before closing it (as PostgreSQL does once it has signalled the backend),
// and counts them.
type fakePostmaster struct {
	ln                  net.Listener
	hold                time.Duration
	received, delivered atomic.Int32
}

func startFakePostmaster(t *testing.T, hold time.Duration) *fakePostmaster {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	pm := &fakePostmaster{ln: ln, hold: hold}
	go func() {
		for {
			nc, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer nc.Close()
				buf := make([]byte, 16)
				if _, err := io.ReadFull(nc, buf); err == nil && binary.BigEndian.Uint32(buf[4:]) == cancelReqCode {
					pm.received.Add(1)
					time.Sleep(pm.hold)
					pm.delivered.Add(1)
				}
			}()
		}
	}()
	return pm
}

// 10b. Between looking up which upstream a cancel is for and delivering it,
// the client may give that upstream back to the pool, where another client's
// query would be cancelled. The client cannot give it up until the cancel has
// landed.
func TestItem10CancelLandsBeforeTheSessionIsGivenBack(t *testing.T) {
	t.Parallel()
	pm := startFakePostmaster(t, 300*time.Millisecond)
	cm := newCancelMap()
	pid, target := cm.register()
	target.set(&pool.Server{PID: 42, Secret: []byte{1, 2, 3, 4}, CancelAddr: pool.CancelAddr{Network: "tcp", Address: pm.ln.Addr().String()}})

	forwarded := make(chan bool, 1)
	go func() {
		forwarded <- cm.forward(context.Background(), &pgproto3.CancelRequest{ProcessID: pid, SecretKey: target.secret[:]})
	}()
	// Once the postmaster has the request (and before it has acted on it),
	// the session goes back to the pool.
	deadline := time.Now().Add(10 * time.Second)
	for pm.received.Load() == 0 {
		if time.Now().After(deadline) {
			t.Fatal("the cancel never reached the postmaster")
		}
		time.Sleep(5 * time.Millisecond)
	}
	target.set(nil)
	if pm.delivered.Load() != 1 {
		t.Fatal("the client gave its upstream back while a cancel for it was still on its way")
	}
	if !<-forwarded {
		t.Fatal("cancel not delivered")
	}
	// Once given back, a late cancel goes nowhere.
	if cm.forward(context.Background(), &pgproto3.CancelRequest{ProcessID: pid, SecretKey: target.secret[:]}) {
		t.Fatal("a cancel after the session was given back was forwarded")
	}
}

// 13a. Connections still authenticating are capped: one over the cap is
// refused at once with 53300, before anything is read from it.
func TestItem13HandshakesAreCapped(t *testing.T) {
	t.Parallel()
	obs := &countingObserver{}
	cfg := testConfig()
	cfg.MaxHandshakes = 2
	cfg.Observer = obs
	addr := startServer(t, cfg)
	var held []net.Conn
	for range 2 {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		held = append(held, c)
	}
	// The two silent connections are being served (waiting for a startup
	// packet) once the server answers a third with its refusal.
	time.Sleep(100 * time.Millisecond)
	if got := fatalCode(t, exchange(t, addr, nil)); got != "53300" {
		t.Fatalf("third concurrent handshake: SQLSTATE %s, want 53300", got)
	}
	// When one of them ends, there is room again.
	held[0].Close()
	deadline := time.Now().Add(10 * time.Second)
	for {
		out := exchange(t, addr, nil, startupPacket(t, pgproto3.ProtocolVersion30, map[string]string{"user": "reader", "database": "app"}))
		if len(out) > 0 && out[0] == 'R' {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no room after a handshake ended; got %q", out)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// 13b. A connection that has sent nothing yet holds only small buffers: no
// relay-sized buffer is allocated before a client has authenticated.
func TestItem13IdleHandshakesHoldLittleMemory(t *testing.T) {
	cfg := testConfig()
	addr := startServer(t, cfg)
	const n = 200
	heap := func() uint64 {
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		return ms.HeapAlloc
	}
	before := heap()
	conns := make([]net.Conn, 0, n)
	for range n {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
	}
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	// Every connection is accepted and parked in its read of the first byte.
	time.Sleep(500 * time.Millisecond)
	per := (int64(heap()) - int64(before)) / n
	t.Logf("heap per idle, unauthenticated connection: %d bytes (goroutine stacks not included)", per)
	if per > 16<<10 {
		t.Fatalf("each connection that has sent nothing holds %d bytes of heap; want well under the relay's buffers", per)
	}
}

// 9 (unit). GSSENCRequest → 'N' → SSLRequest → 'S' → TLS → startup is
// accepted; a second GSSENCRequest is not.
func TestItem09GSSENCThenSSLRequestNegotiatesTLS(t *testing.T) {
	t.Parallel()
	addr, certs := startTLSServer(t)
	gss, _ := (&pgproto3.GSSEncRequest{}).Encode(nil)
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	ans := make([]byte, 1)
	if _, err := c.Write(gss); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(c, ans); err != nil || ans[0] != 'N' {
		t.Fatalf("GSSENCRequest: %q %v", ans, err)
	}
	if _, err := c.Write(sslRequest()); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(c, ans); err != nil || ans[0] != 'S' {
		t.Fatalf("SSLRequest after GSSENC: %q %v, want 'S'", ans, err)
	}
	tc := tls.Client(c, certs.ClientTLS())
	if _, err := tc.Write(startupPacket(t, pgproto3.ProtocolVersion30, map[string]string{"user": "reader", "database": "app"})); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(tc, ans); err != nil || ans[0] != 'R' {
		t.Fatalf("after TLS: %q %v, want the password request", ans, err)
	}
	// The same request twice is a protocol violation, as in PostgreSQL.
	if out := exchange(t, addr, nil, gss); len(out) != 1 || out[0] != 'N' {
		t.Fatalf("first GSSENCRequest: %q", out)
	}
	d, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	_ = d.SetDeadline(time.Now().Add(10 * time.Second))
	_, _ = d.Write(gss)
	_, _ = io.ReadFull(d, ans)
	_, _ = d.Write(gss)
	if n, _ := d.Read(ans); n != 0 {
		t.Fatalf("a repeated GSSENCRequest was answered %q", ans[:n])
	}
}
