// Package metrics owns pgwarden's Prometheus collectors on a registry of its
// own (never the global one) and the HTTP side: /metrics, /healthz, /readyz.
// Other packages do not import Prometheus: proxy and broker report events
// through small hooks (proxy.Observer, broker.Config.ObserveVault and
// ObserveLease) that *Metrics implements, and what they already count (pool
// sizes, per-database traffic, leases by state) is read from snapshot
// functions at scrape time, so the relay's hot path makes no Prometheus call.
//
// Labels are bounded: database (a configured name), access level, result,
// operation, state, event. Never a subject, token or credential.
package metrics

import (
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Metrics holds the collectors. Its methods are safe for concurrent use.
type Metrics struct {
	reg *prometheus.Registry

	clientsOpen   prometheus.Gauge
	clientsTotal  prometheus.Counter
	authTotal     *prometheus.CounterVec
	vaultDuration *prometheus.HistogramVec
	vaultErrors   *prometheus.CounterVec
	reloads       *prometheus.CounterVec
	verify        *prometheus.HistogramVec
	poolWait      *prometheus.HistogramVec
	cancels       *prometheus.CounterVec
	leaseEvents   *prometheus.CounterVec

	ready readiness // see SetReadiness
}

// PoolSize is one pool's size at scrape time.
type PoolSize struct {
	Database, Level string
	Idle, Active    int
	// Waiting is how many clients are queued for a connection of it now.
	Waiting int
}

// Traffic is one database's totals since start at scrape time.
type Traffic struct {
	Database              string
	Transactions, Queries int64
	// Received from clients and Sent to them, in bytes.
	Received, Sent int64
}

// Token verification results (pgwarden_token_verify_duration_seconds).
const (
	VerifyOK      = "ok"
	VerifyRefused = "refused"
)

// Label values created at zero by New, so that every series exists from the
// start and a rate over it is defined: the outcomes of a CancelRequest and
// the events in a lease's life (proxy.Cancel* and broker.Lease*).
var (
	cancelResults = []string{"forwarded", "unknown", "failed"}
	leaseEvents   = []string{"issued", "renewed", "revoked", "expired"}
)

// New registers pgwarden's collectors, plus the Go and process collectors,
// on a fresh registry. pools is called at scrape time; it may be nil.
func New(pools func() []PoolSize) *Metrics {
	m := &Metrics{reg: prometheus.NewRegistry()}
	m.clientsOpen = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "pgwarden_client_connections", Help: "Client connections open now."})
	m.clientsTotal = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "pgwarden_client_connections_total", Help: "Client connections accepted."})
	m.authTotal = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "pgwarden_auth_total", Help: "Authentication outcomes by database, access level and result (ok or the reason for refusal)."},
		[]string{"database", "level", "result"})
	m.vaultDuration = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name: "pgwarden_vault_request_duration_seconds", Help: "Vault calls by operation (login, creds).",
		Buckets: []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5}},
		[]string{"op"})
	m.vaultErrors = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "pgwarden_vault_request_errors_total", Help: "Failed Vault calls by operation."},
		[]string{"op"})
	m.reloads = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "pgwarden_config_reloads_total", Help: "Configuration reloads (SIGHUP or the console's RELOAD) by result (ok, rejected)."},
		[]string{"result"})
	m.verify = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name: "pgwarden_token_verify_duration_seconds", Help: "Token verifications by result (ok, refused): signature, claims, and a JWKS fetch when the key is new.",
		Buckets: []float64{.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5}},
		[]string{"result"})
	m.poolWait = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name: "pgwarden_pool_wait_duration_seconds", Help: "How long clients that had to queue for an upstream connection waited, served or not, by database.",
		Buckets: []float64{.001, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30}},
		[]string{"database"})
	m.cancels = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "pgwarden_cancel_requests_total", Help: "Cancel requests by result (forwarded, unknown key or no query to cancel, failed to reach the database)."},
		[]string{"result"})
	m.leaseEvents = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "pgwarden_lease_events_total", Help: "Vault lease events (issued, renewed, revoked, expired)."},
		[]string{"event"})
	for _, r := range []string{VerifyOK, VerifyRefused} {
		m.verify.WithLabelValues(r)
	}
	for _, r := range cancelResults {
		m.cancels.WithLabelValues(r)
	}
	for _, e := range leaseEvents {
		m.leaseEvents.WithLabelValues(e)
	}
	m.reg.MustRegister(m.clientsOpen, m.clientsTotal, m.authTotal, m.vaultDuration, m.vaultErrors, m.reloads,
		m.verify, m.poolWait, m.cancels, m.leaseEvents,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	if pools != nil {
		m.reg.MustRegister(&poolCollector{pools: pools})
	}
	return m
}

// Registry returns the registry, for tests and extra collectors.
func (m *Metrics) Registry() *prometheus.Registry { return m.reg }

// ClientConnected implements proxy.Observer.
func (m *Metrics) ClientConnected() { m.clientsOpen.Inc(); m.clientsTotal.Inc() }

// ClientClosed implements proxy.Observer.
func (m *Metrics) ClientClosed() { m.clientsOpen.Dec() }

// AuthResult implements proxy.Observer.
func (m *Metrics) AuthResult(database, level, result string) {
	m.authTotal.WithLabelValues(database, level, result).Inc()
}

// ObserveVault is the broker's hook for Vault call latency. A negative d
// means the call's duration is not known (renewals vault/api's
// LifetimeWatcher makes): only an error is counted.
func (m *Metrics) ObserveVault(op string, d time.Duration, err error) {
	if d >= 0 {
		m.vaultDuration.WithLabelValues(op).Observe(d.Seconds())
	}
	if err != nil {
		m.vaultErrors.WithLabelValues(op).Inc()
	}
}

// TokenVerified records one token verification: result is VerifyOK or
// VerifyRefused.
func (m *Metrics) TokenVerified(result string, d time.Duration) {
	m.verify.WithLabelValues(result).Observe(d.Seconds())
}

// PoolWaited implements proxy.Observer: one client that had to queue for an
// upstream connection, and how long it waited.
func (m *Metrics) PoolWaited(database, _ string, d time.Duration) {
	m.poolWait.WithLabelValues(database).Observe(d.Seconds())
}

// CancelRequest implements proxy.Observer.
func (m *Metrics) CancelRequest(result string) { m.cancels.WithLabelValues(result).Inc() }

// LeaseEvent is the broker's hook for lease events (broker.Config.ObserveLease).
func (m *Metrics) LeaseEvent(event string) { m.leaseEvents.WithLabelValues(event).Inc() }

// ReadTraffic registers f, called at scrape time, as the source of the
// per-database counters (pgwarden_transactions_total, _queries_total,
// _client_received_bytes_total, _client_sent_bytes_total). Call it once.
func (m *Metrics) ReadTraffic(f func() []Traffic) { m.reg.MustRegister(&trafficCollector{traffic: f}) }

// ReadLeases registers f, called at scrape time, as the source of
// pgwarden_leases: the leases pgwarden holds by state (active, superseded,
// retired, ended). Call it once.
func (m *Metrics) ReadLeases(f func() map[string]int) { m.reg.MustRegister(&leaseCollector{leases: f}) }

// ConfigReloaded counts one reload attempt; result is "ok" or "rejected".
func (m *Metrics) ConfigReloaded(result string) { m.reloads.WithLabelValues(result).Inc() }

// Handler serves /metrics, /healthz (the process is up) and /readyz (every
// readiness check passes; see SetReadiness).
func (m *Metrics) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{Registry: m.reg}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		_, _ = w.Write([]byte("ok\n"))
	})
	mux.HandleFunc("GET /readyz", m.readyz)
	return mux
}

type poolCollector struct{ pools func() []PoolSize }

var poolDesc = prometheus.NewDesc("pgwarden_pool_connections", "Upstream connections by database, access level and state (idle, active).",
	[]string{"database", "level", "state"}, nil)

var waitingDesc = prometheus.NewDesc("pgwarden_pool_waiting_clients", "Clients queued for an upstream connection now, by database and access level.",
	[]string{"database", "level"}, nil)

func (c *poolCollector) Describe(ch chan<- *prometheus.Desc) { ch <- poolDesc; ch <- waitingDesc }

func (c *poolCollector) Collect(ch chan<- prometheus.Metric) {
	for _, p := range c.pools() {
		ch <- prometheus.MustNewConstMetric(poolDesc, prometheus.GaugeValue, float64(p.Idle), p.Database, p.Level, "idle")
		ch <- prometheus.MustNewConstMetric(poolDesc, prometheus.GaugeValue, float64(p.Active), p.Database, p.Level, "active")
		ch <- prometheus.MustNewConstMetric(waitingDesc, prometheus.GaugeValue, float64(p.Waiting), p.Database, p.Level)
	}
}

// trafficCollector exports the proxy's per-database counters (kept for SHOW
// STATS) at scrape time.
type trafficCollector struct{ traffic func() []Traffic }

var (
	xactsDesc = prometheus.NewDesc("pgwarden_transactions_total", "Transactions completed, by database.", []string{"database"}, nil)
	queryDesc = prometheus.NewDesc("pgwarden_queries_total", "Queries (statements) completed, by database.", []string{"database"}, nil)
	recvDesc  = prometheus.NewDesc("pgwarden_client_received_bytes_total", "Bytes received from clients, by database.", []string{"database"}, nil)
	sentDesc  = prometheus.NewDesc("pgwarden_client_sent_bytes_total", "Bytes sent to clients, by database.", []string{"database"}, nil)
)

func (c *trafficCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- xactsDesc
	ch <- queryDesc
	ch <- recvDesc
	ch <- sentDesc
}

func (c *trafficCollector) Collect(ch chan<- prometheus.Metric) {
	for _, t := range c.traffic() {
		ch <- prometheus.MustNewConstMetric(xactsDesc, prometheus.CounterValue, float64(t.Transactions), t.Database)
		ch <- prometheus.MustNewConstMetric(queryDesc, prometheus.CounterValue, float64(t.Queries), t.Database)
		ch <- prometheus.MustNewConstMetric(recvDesc, prometheus.CounterValue, float64(t.Received), t.Database)
		ch <- prometheus.MustNewConstMetric(sentDesc, prometheus.CounterValue, float64(t.Sent), t.Database)
	}
}

// leaseCollector exports the broker's lease registry by state at scrape time.
type leaseCollector struct{ leases func() map[string]int }

var leasesDesc = prometheus.NewDesc("pgwarden_leases", "Vault leases pgwarden holds now, by state (active, superseded, retired, ended).",
	[]string{"state"}, nil)

func (c *leaseCollector) Describe(ch chan<- *prometheus.Desc) { ch <- leasesDesc }

func (c *leaseCollector) Collect(ch chan<- prometheus.Metric) {
	for state, n := range c.leases() {
		ch <- prometheus.MustNewConstMetric(leasesDesc, prometheus.GaugeValue, float64(n), state)
	}
}
