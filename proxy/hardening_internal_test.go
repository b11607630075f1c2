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

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/pgwarden/pgwarden/testenv/pki"
)

// 5. An upstream off loopback must be TLS-verified (sslmode=verify-full by
// default) and SCRAM is pinned; weaker is refused at start unless allowed.
func TestItem05UpstreamTLSIsEnforcedOffLoopback(t *testing.T) {
	t.Parallel()
	certs, err := pki.New(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name, conn string
		allow      bool
		wantErr    string // "" = accepted
		verifyFull bool   // when accepted off loopback: verifies certificate and name
	}{
		{"no sslmode off loopback defaults to verify-full", "host=db.example.com dbname=app", false, "", true},
		{"URL without sslmode defaults to verify-full", "postgres://db.example.com/app", false, "", true},
		{"prefer off loopback", "host=db.example.com dbname=app sslmode=prefer", false, "allows an unencrypted", false},
		{"disable off loopback", "postgres://db.example.com/app?sslmode=disable", false, "allows an unencrypted", false},
		{"require off loopback", "host=10.1.2.3 dbname=app sslmode=require", false, "does not verify the server's certificate", false},
		{"verify-ca off loopback", "host=db.example.com dbname=app sslmode=verify-ca sslrootcert=" + certs.CAFile, false, "does not verify the server's name", false},
		{"verify-full with a CA file", "host=db.example.com dbname=app sslmode=verify-full sslrootcert=" + certs.CAFile, false, "", true},
		{"a second host that is remote", "host=127.0.0.1,db.example.com dbname=app sslmode=prefer", false, "db.example.com", false},
		{"prefer allowed explicitly", "host=db.example.com dbname=app sslmode=prefer", true, "", false},
		{"loopback keeps disable", "host=127.0.0.1 dbname=app sslmode=disable", false, "", false},
		{"localhost keeps prefer", "host=localhost dbname=app", false, "", false},
		{"unix socket", "host=/var/run/postgresql dbname=app", false, "", false},
		{"md5 asked for", "host=127.0.0.1 dbname=app require_auth=md5", false, "SCRAM-SHA-256 only", false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			cfg, err := ParseUpstream(tc.conn, UpstreamPolicy{AllowInsecure: tc.allow})
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want it to say %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if cfg.RequireAuth != "scram-sha-256" {
				t.Errorf("require_auth = %q, want scram-sha-256", cfg.RequireAuth)
			}
			if tc.verifyFull {
				if r, _ := weakTLS(cfg.TLSConfig); r != 0 || len(cfg.Fallbacks) != 0 {
					t.Errorf("TLS %+v with %d fallbacks: not verified", cfg.TLSConfig, len(cfg.Fallbacks))
				}
			}
		})
	}
	// And the server refuses to start on such a route.
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
	target.set(&serverConn{pid: 42, secret: []byte{1, 2, 3, 4}, cancel: cancelAddr{network: "tcp", address: pm.ln.Addr().String()}})

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

// peerConn reports a chosen peer address.
type peerConn struct {
	net.Conn
	peer net.Addr
}

func (p peerConn) RemoteAddr() net.Addr { return p.peer }

// 10a (unit). A cancel goes to the session's own network and address; a unix
// peer name is the path PostgreSQL bound, which may be relative, and then
// the configured socket directory is used.
func TestItem10CancelAddressFollowsTheSessionsNetwork(t *testing.T) {
	t.Parallel()
	cfg := &pgconn.Config{Host: "/var/run/postgresql", Port: 5433}
	cases := []struct {
		peer          net.Addr
		network, addr string
	}{
		{&net.UnixAddr{Name: "./.s.PGSQL.5433", Net: "unix"}, "unix", "/var/run/postgresql/.s.PGSQL.5433"},
		{&net.UnixAddr{Name: ".s.PGSQL.5433", Net: "unix"}, "unix", "/var/run/postgresql/.s.PGSQL.5433"},
		{&net.UnixAddr{Name: "/run/pg/.s.PGSQL.5433", Net: "unix"}, "unix", "/run/pg/.s.PGSQL.5433"},
		{&net.TCPAddr{IP: net.IPv4(10, 0, 0, 7), Port: 5432}, "tcp", "10.0.0.7:5432"},
	}
	for _, tc := range cases {
		got := cancelAddrOf(&pgconn.HijackedConn{Conn: peerConn{peer: tc.peer}, Config: cfg})
		if got.network != tc.network || got.address != tc.addr {
			t.Errorf("peer %s: cancel to %s %s, want %s %s", tc.peer, got.network, got.address, tc.network, tc.addr)
		}
	}
}
