package proxy

import (
	"sort"
	"strings"

	"github.com/pgwarden/pgwarden/pgerror"
)

// startupSettings returns the run-time settings a client asked for in its
// startup packet: every parameter but the ones that steer the connection
// itself, plus the -c name=value and --name=value pairs of "options" (whose
// spaces separate arguments and whose backslash escapes the next character, as
// in PostgreSQL's pg_split_opts). They are applied with set_config after the
// upstream session is chosen, so a pooled session can serve any client.
func startupSettings(params map[string]string) ([][2]string, error) {
	var out [][2]string
	for k, v := range params {
		switch {
		case k == "user", k == "database", k == "replication", k == "options", strings.HasPrefix(k, "_pq_."):
			continue
		}
		out = append(out, [2]string{k, v})
	}
	opts, err := splitOptions(params["options"])
	if err != nil {
		return nil, err
	}
	for i := 0; i < len(opts); i++ {
		o := opts[i]
		var kv string
		switch {
		case o == "-c" && i+1 < len(opts):
			i++
			kv = opts[i]
		case strings.HasPrefix(o, "-c"):
			kv = o[2:]
		case strings.HasPrefix(o, "--"):
			kv = o[2:]
		default:
			return nil, pgerror.Newf(pgerror.FeatureNotSupported, "unsupported startup option %q", pgerror.Clip(o)).
				WithHint("pgwarden accepts only -c name=value and --name=value in options.")
		}
		name, value, ok := strings.Cut(kv, "=")
		if !ok || name == "" {
			return nil, pgerror.Newf(pgerror.InvalidParameterValue, "invalid startup option %q: expected name=value", pgerror.Clip(o))
		}
		out = append(out, [2]string{strings.ReplaceAll(name, "-", "_"), value})
	}
	for _, kv := range out {
		if hasIdentityPrefix([]byte(kv[0])) {
			return nil, errForged
		}
		if strings.EqualFold(kv[0], "standard_conforming_strings") && !strings.EqualFold(kv[1], "on") && !strings.EqualFold(kv[1], "true") {
			return nil, errForged
		}
	}
	// A stable order makes the settings query deterministic (and testable).
	sort.SliceStable(out, func(i, j int) bool { return out[i][0] < out[j][0] })
	return out, nil
}

func splitOptions(s string) ([]string, error) {
	var (
		out  []string
		cur  strings.Builder
		have bool
	)
	for i := 0; i < len(s); i++ {
		ch := s[i]
		switch {
		case ch == '\\':
			if i+1 == len(s) {
				return nil, pgerror.New(pgerror.InvalidParameterValue, "invalid startup options: trailing backslash")
			}
			i++
			cur.WriteByte(s[i])
			have = true
		case ch == ' ' || ch == '\t' || ch == '\n' || ch == '\r':
			if have {
				out = append(out, cur.String())
				cur.Reset()
				have = false
			}
		default:
			cur.WriteByte(ch)
			have = true
		}
	}
	if have {
		out = append(out, cur.String())
	}
	return out, nil
}
