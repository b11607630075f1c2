package main

import (
	"bytes"
	"encoding/pem"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestProbe(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/healthz":
			_, _ = w.Write([]byte("ok\n"))
		case "/slow":
			time.Sleep(500 * time.Millisecond)
		default:
			http.Error(w, "starting", http.StatusServiceUnavailable)
		}
	}))
	defer srv.Close()
	for _, c := range []struct {
		args []string
		want int
		says string
	}{
		{[]string{"-timeout", "30s", srv.URL + "/healthz"}, 0, ""},
		{[]string{"-timeout", "30s", srv.URL + "/readyz"}, 1, "503"},
		{[]string{"-timeout", "50ms", srv.URL + "/slow"}, 1, "deadline"},
		{[]string{"-timeout", "30s", "http://127.0.0.1:1/healthz"}, 1, "refused"},
		{[]string{"a", "b"}, 2, "usage"},
	} {
		var errb bytes.Buffer
		if got := run(c.args, &errb); got != c.want || !strings.Contains(errb.String(), c.says) {
			t.Errorf("healthprobe %v: exit %d (%q), want %d with %q", c.args, got, errb.String(), c.want, c.says)
		}
	}
}

// An https URL is probed against the CA given, and refused without it.
func TestProbeTLS(t *testing.T) {
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	defer srv.Close()
	if err := probe(srv.URL, "", 30*time.Second); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("an unknown CA was trusted: %v", err)
	}
	ca := filepath.Join(t.TempDir(), "ca.crt")
	if err := os.WriteFile(ca, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw}), 0o644); err != nil {
		t.Fatal(err)
	}
	var errb bytes.Buffer
	if code := run([]string{"-timeout", "30s", "-cacert", ca, srv.URL}, &errb); code != 0 {
		t.Fatalf("with -cacert: exit %d: %s", code, errb.String())
	}
}
