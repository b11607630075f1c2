// Command devtoken mints a token from the running dev issuer (`make dev`):
//
//	devtoken --sub alice --groups analyst,engineer [--ttl 1h] [--aud pgwarden]
//
// It finds the issuer through PGWARDEN_DEV_ISSUER, or in .dev/env when that
// is not set, and prints the token on stdout.
package main

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strings"
	"time"
)

func main() {
	sub := flag.String("sub", "", "subject (required)")
	groups := flag.String("groups", "", "comma-separated groups")
	ttl := flag.String("ttl", "1h", "lifetime, e.g. 30s, 1h; negative for an expired token")
	aud := flag.String("aud", "", "audience (default: the one pgwarden accepts)")
	envFile := flag.String("env", ".dev/env", "dev env file to read PGWARDEN_DEV_ISSUER from")
	flag.Parse()
	if *sub == "" {
		fmt.Fprintln(os.Stderr, "devtoken: --sub is required")
		os.Exit(2)
	}
	issuer := os.Getenv("PGWARDEN_DEV_ISSUER")
	if issuer == "" {
		issuer = fromEnvFile(*envFile, "PGWARDEN_DEV_ISSUER")
	}
	if issuer == "" {
		fmt.Fprintln(os.Stderr, "devtoken: no dev issuer: start the stack with `make dev` (it writes .dev/env)")
		os.Exit(1)
	}
	q := url.Values{"sub": {*sub}, "groups": {*groups}, "ttl": {*ttl}, "aud": {*aud}}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, strings.TrimSuffix(issuer, "/")+"/mint?"+q.Encode(), nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		fmt.Fprintln(os.Stderr, "devtoken:", err)
		os.Exit(1)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if resp.StatusCode != http.StatusOK {
		fmt.Fprintf(os.Stderr, "devtoken: issuer said %s: %s", resp.Status, body)
		os.Exit(1)
	}
	fmt.Print(string(body))
}

func fromEnvFile(path, key string) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), "="); ok && k == key {
			return v
		}
	}
	return ""
}
