package main

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/pgwarden/pgwarden/authn"
)

// certDir holds the CA every test here trusts through SSL_CERT_FILE, as the
// compose file makes pgwarden and Vault trust the issuer's.
var certDir string

// TestMain makes the certificates before anything in this process loads the
// system roots, which Go does once: SSL_CERT_FILE must name the CA by then.
func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "devissuer-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	certDir = dir
	if _, err := ensureCerts(certDir, []string{"localhost", "127.0.0.1"}, time.Now()); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	os.Setenv("SSL_CERT_FILE", filepath.Join(certDir, caCertFile))
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// startServe runs `devissuer serve` on a free loopback port with certDir's
// certificates and returns the issuer URL; it stops when the test ends.
func startServe(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	url := fmt.Sprintf("https://localhost:%d", port)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	var out bytes.Buffer
	go func() {
		done <- serve(ctx, []string{"-listen", fmt.Sprintf("127.0.0.1:%d", port), "-url", url,
			"-certs", certDir, "-hosts", "localhost,127.0.0.1"}, &out, &out)
	}()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("serve: %v", err)
		}
	})
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port))
		if err == nil {
			c.Close()
			return url
		}
		if time.Now().After(deadline) {
			t.Fatalf("serve did not listen: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// The compose flow in one process: the issuer over https with its own CA,
// `devissuer mint` as the README runs it, and pgwarden's own verifier
// trusting the CA through SSL_CERT_FILE and accepting the token.
func TestServeMintVerify(t *testing.T) {
	url := startServe(t)
	var tok, errb bytes.Buffer
	if code := run([]string{"mint", "--sub", "alice", "--groups", "analyst,engineer", "-url", url,
		"-cacert", filepath.Join(certDir, caCertFile)}, &tok, &errb); code != 0 {
		t.Fatalf("mint: exit %d: %s", code, errb.String())
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	v, err := authn.New(ctx, authn.Config{IssuerURL: url, Audiences: []string{"pgwarden"}})
	if err != nil {
		t.Fatalf("pgwarden's verifier against the issuer over https: %v", err)
	}
	defer v.Close()
	id, err := v.Verify(ctx, strings.TrimSpace(tok.String()))
	if err != nil {
		t.Fatalf("minted token refused: %v", err)
	}
	if id.Subject != "alice" || !slices.Equal(id.Groups, []string{"analyst", "engineer"}) {
		t.Fatalf("identity %+v", id)
	}
}

// The discovery document names the issuer by its -url, which is what tokens
// carry and what pgwarden compares them with.
func TestDiscoveryNamesTheURL(t *testing.T) {
	url := startServe(t)
	resp, err := http.Get(url + "/.well-known/openid-configuration")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var doc struct {
		Issuer  string `json:"issuer"`
		JWKSURI string `json:"jwks_uri"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&doc); err != nil {
		t.Fatal(err)
	}
	if doc.Issuer != url || doc.JWKSURI != url+"/jwks" {
		t.Fatalf("discovery: %+v, want issuer %s", doc, url)
	}
}

// /mint answers loopback callers only; the handler is checked with a remote
// address off loopback, since a test may only talk to loopback.
func TestMintRefusedOffLoopback(t *testing.T) {
	h := loopbackMint(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusOK) }))
	for _, c := range []struct {
		remote, path string
		want         int
	}{
		{"172.18.0.5:40000", "/mint", http.StatusForbidden},
		{"172.18.0.5:40000", "//mint", http.StatusForbidden},
		{"172.18.0.5:40000", "/./mint", http.StatusForbidden},
		{"172.18.0.5:40000", "/jwks", http.StatusOK},
		{"127.0.0.1:40000", "/mint", http.StatusOK},
		{"[::1]:40000", "/mint", http.StatusOK},
		{"[::ffff:127.0.0.1]:40000", "/mint", http.StatusOK},
	} {
		req, _ := http.NewRequest(http.MethodGet, "https://issuer:8443"+c.path, nil)
		req.RemoteAddr = c.remote
		w := &statusRecorder{}
		h.ServeHTTP(w, req)
		if w.code != c.want {
			t.Errorf("%s from %s: %d, want %d", c.path, c.remote, w.code, c.want)
		}
	}
}

type statusRecorder struct {
	code int
	hdr  http.Header
}

func (r *statusRecorder) Header() http.Header {
	if r.hdr == nil {
		r.hdr = http.Header{}
	}
	return r.hdr
}
func (r *statusRecorder) Write(b []byte) (int, error) {
	if r.code == 0 {
		r.code = http.StatusOK
	}
	return len(b), nil
}
func (r *statusRecorder) WriteHeader(code int) { r.code = code }

// A restart keeps the CA the other containers already trust; certificates
// close to their end, or missing a host, are made again.
func TestEnsureCertsKeepsAndRenews(t *testing.T) {
	dir := t.TempDir()
	now := time.Now()
	first, err := ensureCerts(dir, []string{"issuer", "pgwarden", "localhost", "127.0.0.1"}, now)
	if err != nil {
		t.Fatal(err)
	}
	ca1, _ := os.ReadFile(filepath.Join(dir, caCertFile))
	again, err := ensureCerts(dir, []string{"issuer", "pgwarden"}, now)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(first.Certificate[0], again.Certificate[0]) {
		t.Fatal("a restart made new certificates")
	}
	if fi, err := os.Stat(filepath.Join(dir, serverKeyFile)); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("server key: %v %v", fi.Mode(), err)
	}
	if _, err := os.Stat(filepath.Join(dir, "ca.key")); !os.IsNotExist(err) {
		t.Fatalf("the CA's key was kept: %v", err)
	}
	renewed, err := ensureCerts(dir, []string{"issuer", "grafana"}, now)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(first.Certificate[0], renewed.Certificate[0]) {
		t.Fatal("a certificate missing a host was kept")
	}
	late, err := ensureCerts(dir, []string{"issuer", "grafana"}, now.Add(certLife-time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(renewed.Certificate[0], late.Certificate[0]) {
		t.Fatal("a certificate with an hour left was kept")
	}
	// The server certificate chains to the CA written beside it.
	caPEM, _ := os.ReadFile(filepath.Join(dir, caCertFile))
	if bytes.Equal(caPEM, ca1) {
		t.Fatal("new certificates kept the old CA")
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(caPEM)
	if _, err := late.Leaf.Verify(x509.VerifyOptions{Roots: roots, DNSName: "grafana", CurrentTime: now.Add(certLife - time.Hour)}); err != nil {
		t.Fatalf("server certificate does not chain to ca.crt: %v", err)
	}
}
