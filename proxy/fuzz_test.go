package proxy

import (
	"bytes"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgproto3"
)

// FuzzStartup feeds arbitrary bytes to a connection from its first byte:
// startup packets, encryption requests, cancel requests and the password
// exchange. The connection must end (no hang) without a panic, and nothing it
// writes may echo the token-shaped secret in the input.
func FuzzStartup(f *testing.F) {
	startup := func(v uint32, p map[string]string) []byte {
		b, _ := (&pgproto3.StartupMessage{ProtocolVersion: v, Parameters: p}).Encode(nil)
		return b
	}
	pw, _ := (&pgproto3.PasswordMessage{Password: "sekrit-token"}).Encode(nil)
	ssl, _ := (&pgproto3.SSLRequest{}).Encode(nil)
	cancel, _ := (&pgproto3.CancelRequest{ProcessID: 1, SecretKey: []byte{1, 2, 3, 4}}).Encode(nil)
	f.Add(startup(pgproto3.ProtocolVersion30, map[string]string{"user": "reader", "database": "app"}))
	f.Add(append(startup(pgproto3.ProtocolVersion30, map[string]string{"user": "reader", "options": `-c a=b\ c --x=y`}), pw...))
	f.Add(append(startup(pgproto3.ProtocolVersion32, map[string]string{"user": "r", "_pq_.x": "1"}), pw...))
	f.Add(append(ssl, startup(pgproto3.ProtocolVersion30, map[string]string{"user": "reader"})...))
	f.Add(cancel)
	f.Add([]byte{0, 0, 0, 8, 0, 3, 0, 0})
	f.Add([]byte{0x16, 3, 1, 0, 5})
	cfg := testConfig()
	// Most fuzzed inputs stop short of a whole message, so the connection
	// waits for the rest until the authentication deadline: keep it short, or
	// every such input costs a second and the fuzzer barely moves.
	cfg.AuthTimeout = 20 * time.Millisecond
	srv, err := NewServer(cfg)
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { srv.Close() })
	f.Fuzz(func(t *testing.T, in []byte) {
		client, server := net.Pipe()
		c := newClientConn(srv, pipeConn{server})
		done := make(chan struct{})
		go func() { c.serve(); close(done) }()
		var out bytes.Buffer
		readDone := make(chan struct{})
		go func() { _, _ = io.Copy(&out, client); close(readDone) }()
		_, _ = client.Write(in)
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Fatal("connection did not end within 5s of a 20ms authentication timeout")
		}
		client.Close()
		<-readDone
		if bytes.Contains(out.Bytes(), []byte("sekrit-token")) {
			t.Fatal("the token was echoed back")
		}
	})
}

// pipeConn gives a net.Pipe end a TCP remote address outside loopback, so
// fuzzed clients are treated as untrusted.
type pipeConn struct{ net.Conn }

func (pipeConn) RemoteAddr() net.Addr { return &net.TCPAddr{IP: net.IPv4(192, 0, 2, 1), Port: 5432} }

// FuzzStartupSettings checks the options parser never panics and only
// returns named settings.
func FuzzStartupSettings(f *testing.F) {
	for _, s := range []string{"", "-c a=b", `-c a=b\ c -cx=y --z=w`, `\`, "-c", "-c =x", "--", "-f s"} {
		f.Add(s, "app")
	}
	f.Fuzz(func(t *testing.T, options, appName string) {
		out, err := startupSettings(map[string]string{"user": "u", "options": options, "application_name": appName})
		if err != nil {
			return
		}
		for _, kv := range out {
			if kv[0] == "" {
				t.Fatalf("empty setting name from %q", options)
			}
		}
	})
}

func TestStartupSettings(t *testing.T) {
	t.Parallel()
	got, err := startupSettings(map[string]string{
		"user": "reader", "database": "app", "_pq_.x": "1", "application_name": "psql",
		"options": `-c search_path=a,b -cstatement_timeout=5s --work-mem=64MB -c x.y=with\ space`,
	})
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	for _, kv := range got {
		b.WriteString(kv[0] + "=" + kv[1] + ";")
	}
	want := "application_name=psql;search_path=a,b;statement_timeout=5s;work_mem=64MB;x.y=with space;"
	if b.String() != want {
		t.Fatalf("settings = %s\nwant       %s", b.String(), want)
	}
	if _, err := startupSettings(map[string]string{"options": "-c novalue"}); err == nil {
		t.Fatal("a -c without = was accepted")
	}
}
