package deploy

import (
	"encoding/json"
	"fmt"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"testing"
)

// metricSpec is one metric pgwarden exports: its labels and, where the set
// is fixed, the values a label takes.
type metricSpec struct {
	histogram bool
	labels    []string
	values    map[string][]string
}

// exported lists pgwarden's metrics, as the README's Metrics section does
// (TestDashboardMetricsAreTheREADMEs compares the two); go_* and process_*
// come from the Go and process collectors.
var exported = map[string]metricSpec{
	"pgwarden_client_connections":       {},
	"pgwarden_client_connections_total": {},
	"pgwarden_auth_total":               {labels: []string{"database", "level", "result"}},
	"pgwarden_vault_request_duration_seconds": {histogram: true, labels: []string{"op"},
		values: map[string][]string{"op": {"login", "creds", "revoke"}}},
	"pgwarden_vault_request_errors_total": {labels: []string{"op"},
		values: map[string][]string{"op": {"login", "creds", "revoke", "renew"}}},
	"pgwarden_pool_connections": {labels: []string{"database", "level", "state"},
		values: map[string][]string{"state": {"idle", "active"}}},
	"pgwarden_config_reloads_total": {labels: []string{"result"},
		values: map[string][]string{"result": {"ok", "rejected"}}},
	"pgwarden_token_verify_duration_seconds": {histogram: true, labels: []string{"result"},
		values: map[string][]string{"result": {"ok", "refused"}}},
	"pgwarden_pool_waiting_clients":        {labels: []string{"database", "level"}},
	"pgwarden_pool_wait_duration_seconds":  {histogram: true, labels: []string{"database"}},
	"pgwarden_transactions_total":          {labels: []string{"database"}},
	"pgwarden_queries_total":               {labels: []string{"database"}},
	"pgwarden_client_received_bytes_total": {labels: []string{"database"}},
	"pgwarden_client_sent_bytes_total":     {labels: []string{"database"}},
	"pgwarden_cancel_requests_total": {labels: []string{"result"},
		values: map[string][]string{"result": {"forwarded", "unknown", "failed"}}},
	"pgwarden_leases": {labels: []string{"state"},
		values: map[string][]string{"state": {"active", "superseded", "retired", "ended"}}},
	"pgwarden_lease_events_total": {labels: []string{"event"},
		values: map[string][]string{"event": {"issued", "renewed", "revoked", "expired"}}},
	"process_resident_memory_bytes": {},
	"process_cpu_seconds_total":     {},
	"go_memstats_heap_inuse_bytes":  {},
	"go_goroutines":                 {},
}

// targetLabels are the labels Prometheus adds to every series it scrapes.
var targetLabels = []string{"instance", "job"}

type dashboard struct {
	UID        string `json:"uid"`
	Title      string `json:"title"`
	Templating struct {
		List []struct {
			Name    string `json:"name"`
			Type    string `json:"type"`
			Query   any    `json:"query"`
			Current struct {
				Value any `json:"value"`
			} `json:"current"`
		} `json:"list"`
	} `json:"templating"`
	Panels []panel `json:"panels"`
}

type panel struct {
	ID         int    `json:"id"`
	Type       string `json:"type"`
	Title      string `json:"title"`
	Datasource *struct {
		Type string `json:"type"`
		UID  string `json:"uid"`
	} `json:"datasource"`
	GridPos struct{ H, W, X, Y int } `json:"gridPos"`
	Targets []struct {
		Expr  string `json:"expr"`
		RefID string `json:"refId"`
	} `json:"targets"`
	Panels []panel `json:"panels"`
}

func readDashboard(t testing.TB) dashboard {
	t.Helper()
	var d dashboard
	if err := json.Unmarshal([]byte(readFile(t, filepath.Join(repoRoot(t), "deploy/grafana/dashboards/pgwarden.json"))), &d); err != nil {
		t.Fatal(err)
	}
	return d
}

// dashboardDatasourceDefault is the data source uid the dashboard's
// datasource variable starts with.
func dashboardDatasourceDefault(t testing.TB) string {
	t.Helper()
	for _, v := range readDashboard(t).Templating.List {
		if v.Type == "datasource" {
			if s, ok := v.Current.Value.(string); ok {
				return s
			}
		}
	}
	t.Fatal("the dashboard has no datasource variable")
	return ""
}

var (
	identRE    = regexp.MustCompile(`[a-zA-Z_:][a-zA-Z0-9_:]*`)
	selectorRE = regexp.MustCompile(`([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}`)
	matcherRE  = regexp.MustCompile(`^\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)"\s*$`)
	groupingRE = regexp.MustCompile(`\b(?:by|without)\s*\(([^)]*)\)`)
	legendRE   = regexp.MustCompile(`\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}`)
)

// metricOf maps a series name in a query to the metric exporting it
// (a histogram's _bucket, _sum and _count are the histogram's).
func metricOf(name string) (string, metricSpec, bool) {
	if s, ok := exported[name]; ok {
		return name, s, true
	}
	for _, suf := range []string{"_bucket", "_sum", "_count"} {
		if base, ok := strings.CutSuffix(name, suf); ok {
			if s, ok := exported[base]; ok && s.histogram {
				return base, s, true
			}
		}
	}
	return "", metricSpec{}, false
}

// checkQuery reports a metric pgwarden does not export, a label a metric
// lacks or a value a fixed label never takes; it returns the metrics the
// query uses.
func checkQuery(errorf func(format string, args ...any), where, expr, legend string) []string {
	var used []string
	allowed := slices.Clone(targetLabels)
	for _, id := range identRE.FindAllString(expr, -1) {
		if !strings.HasPrefix(id, "pgwarden_") && !strings.HasPrefix(id, "go_") && !strings.HasPrefix(id, "process_") {
			continue
		}
		base, spec, ok := metricOf(id)
		if !ok {
			errorf("%s: %s is not a metric pgwarden exports", where, id)
			continue
		}
		used = append(used, base)
		allowed = append(allowed, spec.labels...)
		if spec.histogram && id == base+"_bucket" {
			allowed = append(allowed, "le")
		}
	}
	for _, m := range selectorRE.FindAllStringSubmatch(expr, -1) {
		base, spec, ok := metricOf(m[1])
		if !ok {
			continue
		}
		for _, part := range strings.Split(m[2], ",") {
			mm := matcherRE.FindStringSubmatch(part)
			if mm == nil {
				errorf("%s: matcher %q of %s not understood", where, part, m[1])
				continue
			}
			label, op, value := mm[1], mm[2], mm[3]
			if !slices.Contains(spec.labels, label) && !slices.Contains(targetLabels, label) {
				errorf("%s: %s has no label %s", where, base, label)
			}
			if vals, fixed := spec.values[label]; fixed && (op == "=" || op == "!=") && !slices.Contains(vals, value) {
				errorf("%s: %s{%s} is never %q (%v)", where, base, label, value, vals)
			}
		}
	}
	for _, g := range groupingRE.FindAllStringSubmatch(expr, -1) {
		for _, l := range strings.Split(g[1], ",") {
			if l = strings.TrimSpace(l); l != "" && !slices.Contains(allowed, l) {
				errorf("%s: groups by %s, a label none of %v has", where, l, used)
			}
		}
	}
	for _, l := range legendRE.FindAllStringSubmatch(legend, -1) {
		if !slices.Contains(allowed, l[1]) {
			errorf("%s: legend names %s, a label none of %v has", where, l[1], used)
		}
	}
	return used
}

// The dashboard queries only metrics pgwarden exports, by labels they have,
// and shows every one of pgwarden's own metrics.
func TestDashboardMetrics(t *testing.T) {
	raw := readFile(t, filepath.Join(repoRoot(t), "deploy/grafana/dashboards/pgwarden.json"))
	var generic struct {
		Panels []struct {
			Title   string `json:"title"`
			Targets []struct {
				Expr   string `json:"expr"`
				Legend string `json:"legendFormat"`
			} `json:"targets"`
		} `json:"panels"`
	}
	if err := json.Unmarshal([]byte(raw), &generic); err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	queries := 0
	for _, p := range generic.Panels {
		for _, tg := range p.Targets {
			queries++
			for _, m := range checkQuery(t.Errorf, "panel "+p.Title, tg.Expr, tg.Legend) {
				seen[m] = true
			}
		}
	}
	d := readDashboard(t)
	for _, v := range d.Templating.List {
		if v.Type != "query" {
			continue
		}
		q, _ := json.Marshal(v.Query)
		var qs struct {
			Query string `json:"query"`
		}
		_ = json.Unmarshal(q, &qs)
		m := regexp.MustCompile(`^label_values\((\w+),\s*(\w+)\)$`).FindStringSubmatch(qs.Query)
		if m == nil {
			t.Errorf("variable %s: query %q is not label_values(metric, label)", v.Name, qs.Query)
			continue
		}
		spec, ok := exported[m[1]]
		if !ok || (!slices.Contains(spec.labels, m[2]) && !slices.Contains(targetLabels, m[2])) {
			t.Errorf("variable %s: %s has no label %s", v.Name, m[1], m[2])
		}
	}
	if queries < 20 {
		t.Fatalf("only %d queries found: the dashboard was not read", queries)
	}
	var missing []string
	for name := range exported {
		if strings.HasPrefix(name, "pgwarden_") && !seen[name] {
			missing = append(missing, name)
		}
	}
	sort.Strings(missing)
	if len(missing) > 0 {
		t.Errorf("the dashboard shows none of %v", missing)
	}
}

// The checker itself catches what it is there to catch.
func TestDashboardQueryChecker(t *testing.T) {
	for _, c := range []struct{ expr, legend string }{
		{`sum(pgwarden_client_conections)`, ""},
		{`sum by (subject) (pgwarden_auth_total)`, ""},
		{`pgwarden_pool_connections{state="waiting"}`, ""},
		{`pgwarden_auth_total{databse="app"}`, ""},
		{`sum by (op) (rate(pgwarden_queries_total[5m]))`, ""},
		{`sum(rate(pgwarden_auth_total[5m]))`, "{{op}}"},
		{`sum by (le) (rate(pgwarden_queries_total_bucket[5m]))`, ""},
	} {
		var got []string
		checkQuery(func(f string, a ...any) { got = append(got, fmt.Sprintf(f, a...)) }, "case", c.expr, c.legend)
		if len(got) == 0 {
			t.Errorf("checkQuery accepted %q %q", c.expr, c.legend)
		}
	}
	var got []string
	checkQuery(func(f string, a ...any) { got = append(got, fmt.Sprintf(f, a...)) }, "case",
		`histogram_quantile(0.99, sum by (le, op) (rate(pgwarden_vault_request_duration_seconds_bucket{instance=~"$instance"}[$__rate_interval])))`, "p99 {{op}}")
	if len(got) > 0 {
		t.Errorf("checkQuery refused a good query: %v", got)
	}
}

// Panels are laid out, identified and bound to the dashboard's data source
// variable, so the dashboard imports into any Grafana.
func TestDashboardShape(t *testing.T) {
	d := readDashboard(t)
	if d.UID != "pgwarden" || d.Title == "" {
		t.Errorf("uid %q title %q", d.UID, d.Title)
	}
	ids := map[int]bool{}
	for _, p := range d.Panels {
		if ids[p.ID] || p.ID == 0 {
			t.Errorf("panel %q: id %d missing or repeated", p.Title, p.ID)
		}
		ids[p.ID] = true
		if p.GridPos.W <= 0 || p.GridPos.X+p.GridPos.W > 24 || (p.Type != "row" && p.GridPos.H <= 0) {
			t.Errorf("panel %q: gridPos %+v", p.Title, p.GridPos)
		}
		if p.Type == "row" {
			continue
		}
		if p.Datasource == nil || p.Datasource.UID != "${datasource}" || p.Datasource.Type != "prometheus" {
			t.Errorf("panel %q is not bound to ${datasource}", p.Title)
		}
		refs := map[string]bool{}
		for _, tg := range p.Targets {
			if tg.Expr == "" || refs[tg.RefID] {
				t.Errorf("panel %q: empty query or repeated refId %q", p.Title, tg.RefID)
			}
			refs[tg.RefID] = true
		}
		if len(p.Targets) == 0 {
			t.Errorf("panel %q has no query", p.Title)
		}
	}
}

// The metrics the dashboard is checked against are the README's: the same
// names, types, labels and label values.
func TestDashboardMetricsAreTheREADMEs(t *testing.T) {
	readme := readFile(t, filepath.Join(repoRoot(t), "README.md"))
	rows := regexp.MustCompile("(?m)^\\| `(pgwarden_[a-z_]+)` \\| (gauge|counter|histogram) \\|([^|]*)\\|").FindAllStringSubmatch(readme, -1)
	documented := map[string]bool{}
	prev := ""
	for _, r := range rows {
		name, typ, labels := r[1], r[2], r[3]
		if strings.Contains(labels, "those") { // "`op`: those, and `renew`": the row above's
			labels += prev
		}
		prev = labels
		documented[name] = true
		spec, ok := exported[name]
		if !ok {
			t.Errorf("README documents %s, which the dashboard's list lacks", name)
			continue
		}
		if spec.histogram != (typ == "histogram") {
			t.Errorf("%s: README says %s", name, typ)
		}
		for _, l := range spec.labels {
			if !strings.Contains(labels, "`"+l+"`") {
				t.Errorf("%s: label %s is not in the README's %q", name, l, labels)
			}
			for _, v := range spec.values[l] {
				if !strings.Contains(labels, "`"+v+"`") {
					t.Errorf("%s: %s value %s is not in the README's %q", name, l, v, labels)
				}
			}
		}
		if n := strings.Count(labels, "`"); len(spec.labels) == 0 && n > 0 {
			t.Errorf("%s: README gives labels %q", name, labels)
		}
	}
	if len(rows) == 0 {
		t.Fatal("README has no metrics table")
	}
	for name := range exported {
		if strings.HasPrefix(name, "pgwarden_") && !documented[name] {
			t.Errorf("%s is not in the README's metrics table", name)
		}
	}
}
