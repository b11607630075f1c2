package metrics

import (
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
)

// The snapshot collectors export what their sources say at scrape time, and
// the event hooks count into series that exist from the start.
func TestSnapshotsAndEventsExport(t *testing.T) {
	t.Parallel()
	m := New(func() []PoolSize {
		return []PoolSize{{Database: "app", Level: "reader", Idle: 1, Active: 2, Waiting: 3}}
	})
	traffic := []Traffic{{Database: "app", Transactions: 7, Queries: 9, Received: 100, Sent: 2000}}
	m.ReadTraffic(func() []Traffic { return traffic })
	m.ReadLeases(func() map[string]int { return map[string]int{"active": 2, "retired": 1} })

	// Series at zero before any event.
	if err := testutil.GatherAndCompare(m.reg, strings.NewReader(`
# HELP pgwarden_cancel_requests_total Cancel requests by result (forwarded, unknown key or no query to cancel, failed to reach the database).
# TYPE pgwarden_cancel_requests_total counter
pgwarden_cancel_requests_total{result="failed"} 0
pgwarden_cancel_requests_total{result="forwarded"} 0
pgwarden_cancel_requests_total{result="unknown"} 0
`), "pgwarden_cancel_requests_total"); err != nil {
		t.Error(err)
	}

	m.TokenVerified(VerifyOK, time.Millisecond)
	m.TokenVerified(VerifyOK, 2*time.Millisecond)
	m.TokenVerified(VerifyRefused, time.Millisecond)
	m.PoolWaited("app", "reader", 300*time.Millisecond)
	m.CancelRequest("forwarded")
	m.CancelRequest("unknown")
	m.CancelRequest("unknown")
	m.LeaseEvent("issued")
	m.LeaseEvent("renewed")
	m.LeaseEvent("renewed")

	for _, c := range []struct {
		name   string
		got    float64
		expect float64
	}{
		{"verify series (ok, refused)", float64(testutil.CollectAndCount(m.verify)), 2},
		{"cancels forwarded", testutil.ToFloat64(m.cancels.WithLabelValues("forwarded")), 1},
		{"cancels unknown", testutil.ToFloat64(m.cancels.WithLabelValues("unknown")), 2},
		{"cancels failed", testutil.ToFloat64(m.cancels.WithLabelValues("failed")), 0},
		{"leases issued", testutil.ToFloat64(m.leaseEvents.WithLabelValues("issued")), 1},
		{"leases renewed", testutil.ToFloat64(m.leaseEvents.WithLabelValues("renewed")), 2},
		{"leases revoked", testutil.ToFloat64(m.leaseEvents.WithLabelValues("revoked")), 0},
	} {
		if c.got != c.expect {
			t.Errorf("%s = %v, want %v", c.name, c.got, c.expect)
		}
	}

	mfs, err := m.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	counts := map[string]uint64{}
	for _, mf := range mfs {
		for _, s := range mf.GetMetric() {
			if h := s.GetHistogram(); h != nil {
				key := mf.GetName()
				for _, l := range s.GetLabel() {
					key += "," + l.GetName() + "=" + l.GetValue()
				}
				counts[key] = h.GetSampleCount()
			}
		}
	}
	for key, want := range map[string]uint64{
		"pgwarden_token_verify_duration_seconds,result=ok":      2,
		"pgwarden_token_verify_duration_seconds,result=refused": 1,
		"pgwarden_pool_wait_duration_seconds,database=app":      1,
	} {
		if counts[key] != want {
			t.Errorf("%s observations = %d, want %d", key, counts[key], want)
		}
	}

	want := `
# HELP pgwarden_client_received_bytes_total Bytes received from clients, by database.
# TYPE pgwarden_client_received_bytes_total counter
pgwarden_client_received_bytes_total{database="app"} 100
# HELP pgwarden_client_sent_bytes_total Bytes sent to clients, by database.
# TYPE pgwarden_client_sent_bytes_total counter
pgwarden_client_sent_bytes_total{database="app"} 2000
# HELP pgwarden_leases Vault leases pgwarden holds now, by state (active, superseded, retired, ended).
# TYPE pgwarden_leases gauge
pgwarden_leases{state="active"} 2
pgwarden_leases{state="retired"} 1
# HELP pgwarden_pool_waiting_clients Clients queued for an upstream connection now, by database and access level.
# TYPE pgwarden_pool_waiting_clients gauge
pgwarden_pool_waiting_clients{database="app",level="reader"} 3
# HELP pgwarden_queries_total Queries (statements) completed, by database.
# TYPE pgwarden_queries_total counter
pgwarden_queries_total{database="app"} 9
# HELP pgwarden_transactions_total Transactions completed, by database.
# TYPE pgwarden_transactions_total counter
pgwarden_transactions_total{database="app"} 7
`
	if err := testutil.GatherAndCompare(m.reg, strings.NewReader(want), "pgwarden_client_received_bytes_total",
		"pgwarden_client_sent_bytes_total", "pgwarden_leases", "pgwarden_pool_waiting_clients",
		"pgwarden_queries_total", "pgwarden_transactions_total"); err != nil {
		t.Error(err)
	}

	// The sources are read at each scrape, not once.
	traffic[0].Transactions = 8
	if err := testutil.GatherAndCompare(m.reg, strings.NewReader(`
# HELP pgwarden_transactions_total Transactions completed, by database.
# TYPE pgwarden_transactions_total counter
pgwarden_transactions_total{database="app"} 8
`), "pgwarden_transactions_total"); err != nil {
		t.Error(err)
	}
}
