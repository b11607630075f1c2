package pool

// Unit-level tests of the upstream side, moved from package proxy's
// hardening tests (items 5 and 10 of the hardening issue); the integration
// ones are in proxy/hardening_test.go.

import (
	"net"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5/pgconn"

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
		if got.Network != tc.network || got.Address != tc.addr {
			t.Errorf("peer %s: cancel to %s %s, want %s %s", tc.peer, got.Network, got.Address, tc.network, tc.addr)
		}
	}
}

func TestQuoteLiteralKeepsInputData(t *testing.T) {
	t.Parallel()
	for in, want := range map[string]string{
		`plain`:          `E'plain'`,
		`it's`:           `E'it''s'`,
		`back\slash`:     `E'back\\slash'`,
		`'); drop x; --`: `E'''); drop x; --'`,
	} {
		if got := QuoteLiteral(in); got != want {
			t.Errorf("QuoteLiteral(%q) = %s, want %s", in, got, want)
		}
	}
}
