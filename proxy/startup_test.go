package proxy

import (
	"bytes"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/pgwarden/pgwarden/testenv/pki"
)

func startupPacket(t *testing.T, version uint32, params map[string]string) []byte {
	t.Helper()
	b, err := (&pgproto3.StartupMessage{ProtocolVersion: version, Parameters: params}).Encode(nil)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func sslRequest() []byte {
	b, _ := (&pgproto3.SSLRequest{}).Encode(nil)
	return b
}

// exchange dials addr (from local, when set), writes each chunk in turn and
// returns everything the server sent until it closed the connection.
func exchange(t *testing.T, addr string, local net.IP, chunks ...[]byte) []byte {
	t.Helper()
	d := net.Dialer{Timeout: 5 * time.Second}
	if local != nil {
		d.LocalAddr = &net.TCPAddr{IP: local}
	}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	for _, ch := range chunks {
		if _, err := c.Write(ch); err != nil {
			break // the server may already have closed
		}
	}
	_ = c.(*net.TCPConn).CloseWrite() // the client has nothing more to say
	out, err := io.ReadAll(c)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("server neither answered nor closed within 10s; got %q", out)
	}
	return out
}

// backendMessages decodes what a server sent after startup.
func backendMessages(t *testing.T, b []byte) []pgproto3.BackendMessage {
	t.Helper()
	f := pgproto3.NewFrontend(bytes.NewReader(b), io.Discard)
	var out []pgproto3.BackendMessage
	for {
		m, err := f.Receive()
		if err != nil {
			return out
		}
		switch m := m.(type) { // Receive reuses message structs; copy the ones we inspect.
		case *pgproto3.ErrorResponse:
			cp := *m
			out = append(out, &cp)
		case *pgproto3.NegotiateProtocolVersion:
			cp := *m
			out = append(out, &cp)
		default:
			out = append(out, m)
		}
	}
}

func fatalCode(t *testing.T, b []byte) string {
	t.Helper()
	for _, m := range backendMessages(t, b) {
		if e, ok := m.(*pgproto3.ErrorResponse); ok {
			if e.Severity != "FATAL" {
				t.Errorf("severity %q, want FATAL", e.Severity)
			}
			return e.Code
		}
	}
	t.Fatalf("no ErrorResponse in %q", b)
	return ""
}

func TestMalformedStartupIsClosedSilently(t *testing.T) {
	t.Parallel()
	addr := startServer(t, testConfig())
	huge := binary.BigEndian.AppendUint32(nil, 20000)
	cases := map[string][]byte{
		"length under 8":    {0, 0, 0, 4, 0, 3, 0, 0},
		"length over 10000": append(huge, make([]byte, 8)...),
		"http request":      []byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
		"bad cancel":        {0, 0, 0, 9, 0x04, 0xd2, 0x16, 0x2e, 1},
	}
	for name, pkt := range cases {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			if out := exchange(t, addr, nil, pkt); len(out) != 0 {
				t.Fatalf("server answered %q; want a silent close", out)
			}
		})
	}
}

// startTLSServer serves the test config with a certificate for localhost.
func startTLSServer(t *testing.T) (string, *pki.Certs) {
	t.Helper()
	certs, err := pki.New(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	cfg := testConfig()
	cfg.TLS = &tls.Config{Certificates: []tls.Certificate{certs.Server}}
	return startServer(t, cfg), certs
}

func TestBytesBehindSSLRequestCloseTheConnection(t *testing.T) {
	t.Parallel()
	addr, _ := startTLSServer(t)
	// CVE-2021-23214: a startup packet injected behind the SSLRequest, in the
	// same segment, must never be processed as if it came over TLS.
	pkt := append(sslRequest(), startupPacket(t, pgproto3.ProtocolVersion30, map[string]string{"user": "reader", "database": "app"})...)
	if out := exchange(t, addr, nil, pkt); len(out) != 0 {
		t.Fatalf("server answered %q; want the connection closed", out)
	}
}

func TestEncryptionRequestsWithoutTLSAreDeclined(t *testing.T) {
	t.Parallel()
	addr := startServer(t, testConfig())
	gss := binary.BigEndian.AppendUint32([]byte{0, 0, 0, 8}, 80877104)
	for name, req := range map[string][]byte{"ssl": sslRequest(), "gss": gss} {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			c, err := net.Dial("tcp", addr)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			_ = c.SetDeadline(time.Now().Add(10 * time.Second))
			if _, err := c.Write(req); err != nil {
				t.Fatal(err)
			}
			ans := make([]byte, 1)
			if _, err := io.ReadFull(c, ans); err != nil || ans[0] != 'N' {
				t.Fatalf("answer %q, %v; want 'N'", ans, err)
			}
			// The client may go on in the clear: it is asked for its token.
			if _, err := c.Write(startupPacket(t, pgproto3.ProtocolVersion30, map[string]string{"user": "reader", "database": "app"})); err != nil {
				t.Fatal(err)
			}
			hdr := make([]byte, 9)
			if _, err := io.ReadFull(c, hdr); err != nil || hdr[0] != 'R' || binary.BigEndian.Uint32(hdr[5:]) != 3 {
				t.Fatalf("got %q, %v; want AuthenticationCleartextPassword", hdr, err)
			}
		})
	}
}

func TestStartupRefusals(t *testing.T) {
	t.Parallel()
	cfg := testConfig()
	cfg.TrustedNetworks = loopbackOnly()
	cfg.MaxTokenBytes = 1024
	addr := startServer(t, cfg)
	bigPassword, _ := (&pgproto3.PasswordMessage{Password: string(bytes.Repeat([]byte("x"), 2048))}).Encode(nil)
	good, _ := (&pgproto3.PasswordMessage{Password: "good"}).Encode(nil)
	bad, _ := (&pgproto3.PasswordMessage{Password: "bad"}).Encode(nil)
	app := map[string]string{"user": "reader", "database": "app"}
	cases := []struct {
		name   string
		local  net.IP
		chunks [][]byte
		code   string
	}{
		{"protocol 2.0", nil, [][]byte{startupPacket(t, 2<<16, nil)}, "0A000"},
		{"no user", nil, [][]byte{startupPacket(t, pgproto3.ProtocolVersion30, map[string]string{"database": "app"})}, "28000"},
		{"replication", nil, [][]byte{startupPacket(t, pgproto3.ProtocolVersion30, map[string]string{"user": "reader", "replication": "database"})}, "0A000"},
		{"unsupported option", nil, [][]byte{startupPacket(t, pgproto3.ProtocolVersion30, map[string]string{"user": "reader", "options": "-f s"})}, "0A000"},
		{"cleartext from an untrusted address", net.ParseIP("127.0.0.2"), [][]byte{startupPacket(t, pgproto3.ProtocolVersion30, app)}, "28000"},
		{"oversized token", nil, [][]byte{startupPacket(t, pgproto3.ProtocolVersion30, app), bigPassword}, "08P01"},
		{"wrong message for a password", nil, [][]byte{startupPacket(t, pgproto3.ProtocolVersion30, app), {'Q', 0, 0, 0, 5, 0}}, "08P01"},
		{"bad token", nil, [][]byte{startupPacket(t, pgproto3.ProtocolVersion30, app), bad}, "28P01"},
		{"credential failure", nil, [][]byte{startupPacket(t, pgproto3.ProtocolVersion30, app), good}, "08006"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			if got := fatalCode(t, exchange(t, addr, tc.local, tc.chunks...)); got != tc.code {
				t.Fatalf("SQLSTATE %s, want %s", got, tc.code)
			}
		})
	}
}

func TestNewerMinorProtocolIsNegotiatedDown(t *testing.T) {
	t.Parallel()
	addr := startServer(t, testConfig())
	bad, _ := (&pgproto3.PasswordMessage{Password: "bad"}).Encode(nil)
	out := exchange(t, addr, nil, startupPacket(t, pgproto3.ProtocolVersion32,
		map[string]string{"user": "reader", "database": "app", "_pq_.test": "x"}), bad)
	msgs := backendMessages(t, out)
	npv, ok := msgs[0].(*pgproto3.NegotiateProtocolVersion)
	if !ok {
		t.Fatalf("first message %T, want NegotiateProtocolVersion", msgs[0])
	}
	if npv.NewestMinorProtocol != 0 || len(npv.UnrecognizedOptions) != 1 || npv.UnrecognizedOptions[0] != "_pq_.test" {
		t.Fatalf("NegotiateProtocolVersion = %+v", npv)
	}
}

func TestAuthTimeoutIsATotalDeadline(t *testing.T) {
	t.Parallel()
	cfg := testConfig()
	cfg.AuthTimeout = 300 * time.Millisecond
	addr := startServer(t, cfg)
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	// Trickle a startup packet one byte at a time, each well inside any idle
	// timer: the total deadline still ends the connection.
	pkt := startupPacket(t, pgproto3.ProtocolVersion30, map[string]string{"user": "reader", "database": "app"})
	closed := false
	for _, b := range pkt {
		if _, err := c.Write([]byte{b}); err != nil {
			closed = true
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if !closed {
		_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
		out, err := io.ReadAll(c)
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Fatal("a trickling client held the connection past the authentication timeout")
		}
		if len(out) > 0 && out[0] == 'R' {
			t.Fatalf("server asked for a password after the deadline: %q", out)
		}
	}
}

func TestDirectTLSNeedsALPN(t *testing.T) {
	t.Parallel()
	addr, certs := startTLSServer(t)
	for _, alpn := range [][]string{{"postgresql"}, nil} {
		tc := certs.ClientTLS()
		tc.NextProtos = alpn
		c, err := tls.Dial("tcp", addr, tc)
		if err != nil {
			if alpn != nil {
				t.Fatalf("direct TLS with ALPN postgresql: %v", err)
			}
			continue // refused during the handshake: fine
		}
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		_, _ = c.Write(startupPacket(t, pgproto3.ProtocolVersion30, map[string]string{"user": "reader", "database": "app"}))
		hdr := make([]byte, 1)
		_, err = io.ReadFull(c, hdr)
		c.Close()
		if alpn != nil && (err != nil || hdr[0] != 'R') {
			t.Fatalf("direct TLS with ALPN: got %q, %v; want the password request", hdr, err)
		}
		if alpn == nil && err == nil {
			t.Fatalf("direct TLS without ALPN was served (%q)", hdr)
		}
	}
}

// countingObserver records auth results.
type countingObserver struct {
	nopObserver
	mu      sync.Mutex
	results []string
}

func (o *countingObserver) AuthResult(db, level, result string) {
	o.mu.Lock()
	o.results = append(o.results, result)
	o.mu.Unlock()
}

func TestPortProbeIsNotAnAuthAttempt(t *testing.T) {
	t.Parallel()
	obs := &countingObserver{}
	cfg := testConfig()
	cfg.Observer = obs
	addr := startServer(t, cfg)
	exchange(t, addr, nil)                  // connect, send nothing, close
	exchange(t, addr, nil, []byte{0, 0, 0}) // a truncated packet is an attempt
	time.Sleep(100 * time.Millisecond)
	obs.mu.Lock()
	defer obs.mu.Unlock()
	if len(obs.results) != 1 || obs.results[0] != "protocol" {
		t.Fatalf("auth results = %v, want one protocol failure (the probe is not counted)", obs.results)
	}
}
