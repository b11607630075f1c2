package proxy

import (
	"context"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/pgwarden/pgwarden/authn"
	"github.com/pgwarden/pgwarden/broker"
	"github.com/pgwarden/pgwarden/pgerror"
)

// fakeVerifier accepts the token "good" for alice in group analyst.
type fakeVerifier struct{}

func (fakeVerifier) Verify(_ context.Context, tok string) (*authn.Identity, error) {
	if tok != "good" {
		return nil, pgerror.New(pgerror.InvalidPassword, "token rejected")
	}
	return &authn.Identity{Subject: "alice", Groups: []string{"analyst"}, Expiry: time.Now().Add(time.Hour)}, nil
}

type fakeAuthorizer struct{}

func (fakeAuthorizer) Decide(_ *authn.Identity, db, user string) (string, error) { return user, nil }

// fakeCreds fails: edge-case tests never get as far as an upstream.
type fakeCreds struct{}

func (fakeCreds) Credential(context.Context, broker.Request) (*broker.Credential, error) {
	return nil, pgerror.New(pgerror.ConnectionFailure, "no upstream in unit tests")
}

func (fakeCreds) Forget(*broker.Credential) {}

var (
	_ TokenVerifier    = fakeVerifier{}
	_ Authorizer       = fakeAuthorizer{}
	_ CredentialSource = fakeCreds{}
)

func testConfig() Config {
	return Config{
		Verifier: fakeVerifier{}, Authorizer: fakeAuthorizer{}, Credentials: fakeCreds{},
		Routes:      map[string]Route{"app": {Upstream: "host=127.0.0.1 port=1 dbname=app", VaultRoles: map[string]string{"reader": "app-reader"}}},
		AuthTimeout: 5 * time.Second,
	}
}

// startServer serves cfg on 127.0.0.1 and returns its address.
func startServer(t *testing.T, cfg Config) string {
	t.Helper()
	s, err := NewServer(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go s.Serve(ln)
	t.Cleanup(func() { s.Close() })
	return ln.Addr().String()
}

func loopbackOnly() []netip.Prefix { return []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")} }
