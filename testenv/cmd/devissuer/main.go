// Command devissuer is the dev OIDC issuer as a process of its own, for the
// compose stack (docker-compose.yml), where the issuer, Vault and pgwarden are
// separate containers:
//
//	devissuer serve [-listen :8443] [-url https://issuer:8443] [-certs /certs]
//	                [-hosts issuer,pgwarden,localhost,127.0.0.1] [-aud pgwarden]
//	devissuer mint --sub alice --groups analyst,engineer [--ttl 1h] [--aud pgwarden]
//	               [-url https://localhost:8443] [-cacert /certs/ca.crt]
//
// serve runs testenv's issuer (an RSA and an EC key, discovery, JWKS) over
// https. pgwarden and Vault refuse to fetch signing keys over plain http from
// a host that is not loopback, and on a compose network the issuer is not on
// their loopback, so serve first makes a throwaway CA and one server
// certificate for -hosts in -certs (kept across restarts, so the others'
// trust in the CA survives one), which pgwarden also uses for its own TLS;
// the other containers trust the CA through SSL_CERT_FILE, as Go and Vault
// read it. The signing keys live in memory only: a restarted issuer has new
// ones, and tokens minted before are refused.
//
// mint asks the issuer for a token, as bin/devtoken does with `make dev`'s
// issuer. The issuer answers /mint to loopback callers only, so another
// container on the network cannot mint itself a token: run mint inside the
// issuer's container (docker compose exec -T issuer devissuer mint …).
package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"os/signal"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/pgwarden/pgwarden/testenv"
)

const usage = `usage:
  devissuer serve [-listen :8443] [-url https://issuer:8443] [-certs /certs] [-hosts issuer,pgwarden,localhost,127.0.0.1] [-aud pgwarden]
  devissuer mint --sub alice [--groups a,b] [--ttl 1h] [--aud pgwarden] [-url https://localhost:8443] [-cacert /certs/ca.crt]
`

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	var err error
	switch args[0] {
	case "serve":
		ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
		defer stop()
		err = serve(ctx, args[1:], stdout, stderr)
	case "mint":
		err = mint(args[1:], stdout, stderr)
	case "-h", "--help", "help":
		fmt.Fprint(stdout, usage)
		return 0
	default:
		fmt.Fprintf(stderr, "devissuer: unknown command %q\n%s", args[0], usage)
		return 2
	}
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintln(stderr, "devissuer:", err)
		return 1
	}
	return 0
}

func serve(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	fs.SetOutput(stderr)
	listen := fs.String("listen", ":8443", "address to serve https on")
	issuerURL := fs.String("url", "https://issuer:8443", "the issuer URL: tokens' iss, and where the others reach it")
	certDir := fs.String("certs", "/certs", "where the CA and the server certificate are kept")
	hosts := fs.String("hosts", "issuer,pgwarden,localhost,127.0.0.1", "names and addresses the server certificate is for")
	aud := fs.String("aud", testenv.Audience, "default audience of minted tokens")
	if err := fs.Parse(args); err != nil {
		return err
	}
	u, err := url.Parse(*issuerURL)
	if err != nil || u.Scheme != "https" || u.Host == "" {
		return fmt.Errorf("-url %q: want https://host[:port]", *issuerURL)
	}
	names := splitList(*hosts)
	if !slices.Contains(names, u.Hostname()) {
		return fmt.Errorf("-hosts %q does not name the issuer's host %q", *hosts, u.Hostname())
	}
	cert, err := ensureCerts(*certDir, names, time.Now())
	if err != nil {
		return err
	}
	is, err := testenv.NewIssuer(strings.TrimSuffix(*issuerURL, "/"), *aud)
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		return err
	}
	srv := &http.Server{
		Handler:           loopbackMint(is.Handler()),
		TLSConfig:         &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12},
		ReadHeaderTimeout: 5 * time.Second,
	}
	served := make(chan error, 1)
	go func() { served <- srv.ServeTLS(ln, "", "") }()
	fmt.Fprintf(stdout, "devissuer: issuer %s (audience %s) on %s, CA and certificate for %s in %s\n",
		is.URL, *aud, ln.Addr(), strings.Join(names, ", "), *certDir)
	select {
	case err := <-served:
		return err
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return srv.Shutdown(sctx)
}

// loopbackMint refuses /mint to callers that are not on loopback: on a
// compose network any container could otherwise mint itself any identity.
func loopbackMint(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if path.Clean("/"+r.URL.Path) == "/mint" && !fromLoopback(r.RemoteAddr) {
			http.Error(w, "devissuer: /mint answers loopback callers only; run `devissuer mint` in the issuer's container", http.StatusForbidden)
			return
		}
		h.ServeHTTP(w, r)
	})
}

func fromLoopback(remote string) bool {
	ap, err := netip.ParseAddrPort(remote)
	return err == nil && ap.Addr().Unmap().IsLoopback()
}

func mint(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("mint", flag.ContinueOnError)
	fs.SetOutput(stderr)
	sub := fs.String("sub", "", "subject (required)")
	groups := fs.String("groups", "", "comma-separated groups")
	ttl := fs.String("ttl", "1h", "lifetime, e.g. 30s, 1h; negative for an expired token")
	aud := fs.String("aud", "", "audience (default: the issuer's, the one pgwarden accepts)")
	issuerURL := fs.String("url", "https://localhost:8443", "the issuer, reached from where mint runs")
	caFile := fs.String("cacert", "/certs/ca.crt", "the CA that signed the issuer's certificate")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *sub == "" {
		return errors.New("mint: --sub is required")
	}
	pemCA, err := os.ReadFile(*caFile)
	if err != nil {
		return fmt.Errorf("mint: %w", err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pemCA) {
		return fmt.Errorf("mint: %s holds no PEM certificate", *caFile)
	}
	client := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12}}}
	q := url.Values{"sub": {*sub}, "groups": {*groups}, "ttl": {*ttl}, "aud": {*aud}}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, strings.TrimSuffix(*issuerURL, "/")+"/mint?"+q.Encode(), nil)
	if err != nil {
		return fmt.Errorf("mint: %w", err)
	}
	resp, err := client.Do(req)
	if err != nil {
		return fmt.Errorf("mint: %w", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return fmt.Errorf("mint: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("mint: issuer said %s: %s", resp.Status, strings.TrimSpace(string(body)))
	}
	_, err = stdout.Write(body)
	return err
}

func splitList(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

// Files ensureCerts keeps in its directory. The server key is readable by
// its owner only: pgwarden's container runs as the same user as the
// issuer's. The CA's key is not kept: new certificates come with a new CA.
const (
	caCertFile     = "ca.crt"
	serverCertFile = "server.crt"
	serverKeyFile  = "server.key"
)

// certLife is how long the dev certificates are valid; they are made again
// when less than a day of it is left.
const certLife = 365 * 24 * time.Hour

// ensureCerts returns the server certificate in dir when it is there, still
// valid for a day and for every one of hosts; otherwise it makes a new CA and
// server certificate and writes them there.
func ensureCerts(dir string, hosts []string, now time.Time) (tls.Certificate, error) {
	certPath, keyPath := filepath.Join(dir, serverCertFile), filepath.Join(dir, serverKeyFile)
	if cert, err := tls.LoadX509KeyPair(certPath, keyPath); err == nil && covers(cert.Leaf, hosts, now) {
		if _, err := os.Stat(filepath.Join(dir, caCertFile)); err == nil {
			return cert, nil
		}
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return tls.Certificate{}, err
	}
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	caTmpl := &x509.Certificate{
		SerialNumber: serial(), Subject: pkix.Name{CommonName: "pgwarden dev CA (compose)"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(certLife),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return tls.Certificate{}, err
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		return tls.Certificate{}, err
	}
	srvKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	srvTmpl := &x509.Certificate{
		SerialNumber: serial(), Subject: pkix.Name{CommonName: hosts[0]},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(certLife),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			srvTmpl.IPAddresses = append(srvTmpl.IPAddresses, ip)
		} else {
			srvTmpl.DNSNames = append(srvTmpl.DNSNames, h)
		}
	}
	srvDER, err := x509.CreateCertificate(rand.Reader, srvTmpl, ca, &srvKey.PublicKey, caKey)
	if err != nil {
		return tls.Certificate{}, err
	}
	srvKeyDER, err := x509.MarshalECPrivateKey(srvKey)
	if err != nil {
		return tls.Certificate{}, err
	}
	// The certificate last: a directory with a server certificate is complete.
	for _, f := range []struct {
		name  string
		block *pem.Block
		mode  os.FileMode
	}{
		{caCertFile, &pem.Block{Type: "CERTIFICATE", Bytes: caDER}, 0o644},
		{serverKeyFile, &pem.Block{Type: "EC PRIVATE KEY", Bytes: srvKeyDER}, 0o600},
		{serverCertFile, &pem.Block{Type: "CERTIFICATE", Bytes: srvDER}, 0o644},
	} {
		if err := writeAtomic(filepath.Join(dir, f.name), pem.EncodeToMemory(f.block), f.mode); err != nil {
			return tls.Certificate{}, err
		}
	}
	return tls.LoadX509KeyPair(certPath, keyPath)
}

// covers reports whether leaf is valid a day from now for every host.
func covers(leaf *x509.Certificate, hosts []string, now time.Time) bool {
	if leaf == nil || now.Add(24*time.Hour).After(leaf.NotAfter) {
		return false
	}
	for _, h := range hosts {
		if leaf.VerifyHostname(h) != nil {
			return false
		}
	}
	return true
}

func serial() *big.Int {
	n, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	return n.Add(n, big.NewInt(1))
}

func writeAtomic(p string, b []byte, mode os.FileMode) error {
	tmp := p + ".tmp"
	if err := os.WriteFile(tmp, b, mode); err != nil {
		return err
	}
	if err := os.Chmod(tmp, mode); err != nil {
		return err
	}
	return os.Rename(tmp, p)
}
