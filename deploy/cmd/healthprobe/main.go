// Command healthprobe is the container images' HEALTHCHECK: the images have
// no shell and no curl, so a probe of the metrics listener's /healthz needs a
// binary of its own. It exits 0 when url answers 2xx within the timeout, 1
// otherwise, printing why on stderr.
//
//	healthprobe [-timeout 3s] [-cacert FILE] URL
//
// The default URL is http://127.0.0.1:9632/healthz, pgwarden's default
// metrics listener; -cacert trusts a CA for an https URL (the compose dev
// issuer's). It is not part of pgwarden: Kubernetes probes the same endpoints
// with httpGet and needs no binary.
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"time"
)

// DefaultURL is /healthz on pgwarden's default metrics listener.
const DefaultURL = "http://127.0.0.1:9632/healthz"

func main() {
	os.Exit(run(os.Args[1:], os.Stderr))
}

func run(args []string, stderr io.Writer) int {
	fs := flag.NewFlagSet("healthprobe", flag.ContinueOnError)
	fs.SetOutput(stderr)
	timeout := fs.Duration("timeout", 3*time.Second, "give up after this long")
	caFile := fs.String("cacert", "", "PEM file of a CA to trust for https (default: the system's)")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	url := DefaultURL
	switch fs.NArg() {
	case 0:
	case 1:
		url = fs.Arg(0)
	default:
		fmt.Fprintln(stderr, "usage: healthprobe [-timeout 3s] [-cacert FILE] [URL]")
		return 2
	}
	if err := probe(url, *caFile, *timeout); err != nil {
		fmt.Fprintln(stderr, "healthprobe:", err)
		return 1
	}
	return 0
}

// probe GETs url once, bounded by timeout.
func probe(url, caFile string, timeout time.Duration) error {
	tr := &http.Transport{Proxy: nil, DisableKeepAlives: true}
	if caFile != "" {
		pem, err := os.ReadFile(caFile)
		if err != nil {
			return err
		}
		roots := x509.NewCertPool()
		if !roots.AppendCertsFromPEM(pem) {
			return fmt.Errorf("%s holds no PEM certificate", caFile)
		}
		tr.TLSClientConfig = &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12}
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return fmt.Errorf("%s: %s", url, resp.Status)
	}
	return nil
}
