package console

import (
	"errors"
	"testing"

	"github.com/pgwarden/pgwarden/pgerror"
)

func TestParseReadsEachCommand(t *testing.T) {
	t.Parallel()
	tests := []struct {
		in   string
		want command
	}{
		{"SHOW POOLS", command{op: opShow, view: "pools"}},
		{"show Leases;;", command{op: opShow, view: "leases"}},
		{"\t/* why */ SHOW -- trailing\n STATS ; -- done", command{op: opShow, view: "stats"}},
		{"RELOAD;", command{op: opReload}},
		{"PAUSE", command{op: opPause}},
		{"PAUSE Sales_DB", command{op: opPause, database: "Sales_DB"}},
		{`resume "a;b"`, command{op: opResume, database: "a;b"}},
		{"KILL 0012", command{op: opKill, client: 12}},
		{"kill_client 5", command{op: opKill, client: 5}},
		{"KILL SUBJECT 'it''s'", command{op: opKillSubject, subject: "it's"}},
		{"KILL subject'x;y'", command{op: opKillSubject, subject: "x;y"}},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			t.Parallel()
			got, err := parse(tt.in)
			if err != nil || got != tt.want {
				t.Fatalf("parse(%q) = %+v, %v; want %+v", tt.in, got, err, tt.want)
			}
		})
	}
}

func TestParseRefusesWithASQLSTATE(t *testing.T) {
	t.Parallel()
	tests := map[string]string{
		"SELECT 1":                syntaxError,
		"SHOW":                    syntaxError,
		"SHOW POOLS CLIENTS":      syntaxError,
		"PAUSE a b":               syntaxError,
		`PAUSE ""`:                syntaxError,
		`PAUSE "open`:             syntaxError,
		"KILL":                    syntaxError,
		"KILL -1":                 syntaxError,
		"KILL 1x":                 syntaxError,
		"KILL SUBJECT 'open":      syntaxError,
		"KILL SUBJECT E'x'":       syntaxError,
		"KILL_CLIENT SUBJECT 'x'": syntaxError,
		"RELOAD; RELOAD":          pgerror.FeatureNotSupported,
		"SHOW POOLS /* open":      syntaxError,
	}
	for in, code := range tests {
		t.Run(in, func(t *testing.T) {
			t.Parallel()
			_, err := parse(in)
			var pe *pgerror.Error
			if !errors.As(err, &pe) || pe.Code != code {
				t.Fatalf("parse(%q) error = %v, want SQLSTATE %s", in, err, code)
			}
		})
	}
}

// FuzzCommand checks that parse never panics, that its errors are
// client-ready, and that what it accepts survives a round trip through the
// canonical form.
func FuzzCommand(f *testing.F) {
	for _, seed := range []string{
		"SHOW POOLS", "show clients;", "RELOAD", "PAUSE", `PAUSE "a""b"`, "RESUME db1",
		"KILL 7", "KILL SUBJECT 'o''brien'", "KILL_CLIENT 1", "", ";;", "-- x\nRELOAD",
		"/* /* */ */ SHOW HELP", "SHOW POOLS; KILL 1", "KILL SUBJECT '", "PAUSE \xff\xfe",
	} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, in string) {
		c, err := parse(in)
		if errors.Is(err, errEmpty) {
			return
		}
		if err != nil {
			var pe *pgerror.Error
			if !errors.As(err, &pe) || pe.Code == "" || pe.Message == "" {
				t.Fatalf("parse(%q) error %v carries no SQLSTATE and message", in, err)
			}
			return
		}
		if c.verb() == "" {
			t.Fatalf("parse(%q) = %+v: no command", in, c)
		}
		back, err := parse(c.String())
		if err != nil || back != c {
			t.Fatalf("parse(%q) = %+v; its form %q parses to %+v, %v", in, c, c.String(), back, err)
		}
	})
}
